"""Commands to devices connected to the embedded broker.

Configuration (``commands.mqtt``; defaults shown)::

    commands:
      mqtt:
        topic: devices/{device_id}/commands/{name}
        result_topic: devices/{device_id}/commands/{name}/result

A device takes commands by subscribing to its command topic at QoS 1
(``devices/<its id>/commands/+``). A command goes out as a QoS 1 PUBLISH of a
JSON object ``{"id", "name", "params", "expires_at"[, "redelivery": true]}``;
MQTT 5 devices also get the result topic as the response topic, the command
id as correlation data, and the time to live as the message expiry interval.

The device answers on the result topic with ``{"id", "status": "ok"|"error",
"result"?, "error"?}`` (an MQTT 5 device may leave ``id`` out and send the
correlation data back instead).

Identity: on the embedded broker a device is the MQTT client whose client id
is the device id (as the ACL placeholder ``{client_id}`` assumes). A command
is *reachable* when that client is connected and one of its subscriptions
matches the command's topic; it is *delivered* when that client's PUBACK
comes back (other subscribers, a monitoring tool say, may see the command, as
the ACL allows, but their PUBACKs do not count). A result is taken only from
the device's own client id: a client cannot answer another device's command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.downlink import DownlinkEvents
from edgeway.south.mqtt.packets import Properties
from edgeway.south.mqtt.topics import topic_matches

if TYPE_CHECKING:
    from edgeway.commands.config import CommandsMqttSection
    from edgeway.commands.model import Command
    from edgeway.south.mqtt.broker import Broker
    from edgeway.south.mqtt.session import Session

log = logging.getLogger(__name__)

RESULT_MAX_BYTES = 256 * 1024
"""A result PUBLISH larger than this is not parsed (the command queue caps
results at ``commands.max_params_bytes`` anyway); bounds the work a client
can cause per packet."""


class TopicTemplate:
    """``devices/{device_id}/commands/{name}``: build topics, and read the
    device id and name back out of a topic (exact level match, no wildcards)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.levels = template.split("/")
        self._fixed = [(i, lv) for i, lv in enumerate(self.levels) if "{" not in lv]
        self._device = self.levels.index("{device_id}")
        self._name = self.levels.index("{name}")

    def topic(self, device_id: str, name: str) -> str:
        return self.template.replace("{device_id}", device_id).replace("{name}", name)

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(device_id, name) if ``topic`` has this template's shape, else None."""
        levels = topic.split("/")
        if len(levels) != len(self.levels):
            return None
        for i, lv in self._fixed:
            if levels[i] != lv:
                return None
        device, name = levels[self._device], levels[self._name]
        if not device or not name:
            return None
        return device, name

    def device_in_filter(self, topic_filter: str) -> str | None:
        """The device id a subscription filter names literally, or None when it
        could cover many devices (a wildcard at the device level)."""
        levels = topic_filter.split("/")
        if len(levels) <= self._device:
            return None
        device = levels[self._device]
        if device in ("+", "#") or any(lv == "#" for lv in levels[: self._device]):
            return None
        return device


class BrokerDownlink:
    """The embedded broker's :class:`~edgeway.downlink.Downlink`; a
    :class:`~edgeway.south.mqtt.broker.BrokerObserver` for sessions and results."""

    name = "mqtt"
    ordered = True
    """A device's commands travel its one connection at QoS 1 (or 0), which
    keeps them in order: the queue hands the next over before the PUBACK of
    the one before (edgeway.commands.service.ORDERED_IN_FLIGHT)."""

    def __init__(self, broker: Broker, config: CommandsMqttSection, events: DownlinkEvents) -> None:
        self.broker = broker
        self.commands = TopicTemplate(config.topic)
        self.results = TopicTemplate(config.result_topic)
        self.events = events
        self._waiting: dict[str, dict[str, asyncio.Future[bool]]] = {}
        """device id -> command id -> delivery future (resolved by the PUBACK,
        or False when the device's connection ends first)."""
        self.results_refused = 0

    def set_topics(self, config: CommandsMqttSection) -> None:
        """Use other command and result topics from now on (a reload)."""
        self.commands = TopicTemplate(config.topic)
        self.results = TopicTemplate(config.result_topic)

    def attach(self) -> None:
        self.broker.observers.append(self)

    def detach(self) -> None:
        if self in self.broker.observers:
            self.broker.observers.remove(self)
        for futs in self._waiting.values():
            for fut in futs.values():
                if not fut.done():
                    fut.set_result(False)
        self._waiting.clear()

    # --------------------------------------------------------------- Downlink

    def _matching_qos(self, session: Session, topic: str) -> int:
        """Highest QoS of the session's own subscriptions matching ``topic``, -1 if none."""
        qos = -1
        for flt, entry in session.subscriptions.items():
            if flt.startswith("$share/"):
                continue  # a shared group is not one device
            if entry.qos > qos and topic_matches(flt, topic):
                qos = entry.qos
        return qos

    def reachable(self, command: Command) -> bool:
        session = self.broker.sessions.get(command.device_id)
        if session is None or session.conn is None:
            return False
        return (
            self._matching_qos(session, self.commands.topic(command.device_id, command.name)) >= 0
        )

    def deliver(self, command: Command) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        device = command.device_id
        session = self.broker.sessions.get(device)
        topic = self.commands.topic(device, command.name)
        qos = -1 if session is None or session.conn is None else self._matching_qos(session, topic)
        if qos < 0:
            fut.set_result(False)
            return fut
        remaining = max(1, int(command.expires_at - time.time()))
        props = Properties(
            message_expiry_interval=remaining,
            response_topic=self.results.topic(device, command.name),
            correlation_data=command.id.encode(),
            content_type="application/json",
        )
        self._waiting.setdefault(device, {})[command.id] = fut

        def acked(client_id: str) -> None:
            if client_id == device and not fut.done():
                fut.set_result(True)

        payload = orjson.dumps(command.device_payload())
        self.broker.publish(topic, payload, qos=1, properties=props, on_ack=acked)
        if qos == 0 and not fut.done():
            # The device subscribed at QoS 0: no PUBACK will come; handing it
            # to the connection is as far as delivery can be known.
            fut.set_result(True)
        fut.add_done_callback(lambda _f: self._settled(device, command.id))
        return fut

    def _settled(self, device: str, command_id: str) -> None:
        futs = self._waiting.get(device)
        if futs is not None:
            futs.pop(command_id, None)
            if not futs:
                del self._waiting[device]

    # --------------------------------------------------------- BrokerObserver

    def session_online(self, session: Session) -> None:
        # A new connection for this client id: a delivery still waiting for
        # the old connection's PUBACK will not get it (a take-over by a new
        # connection does not end the old one through session_offline), so
        # the command goes out again, flagged as a redelivery.
        self._connection_ended(session.client_id)
        if session.subscriptions:
            # A resumed session: its subscriptions are already in place.
            self._kick(session.client_id)

    def session_offline(self, session: Session) -> None:
        self._connection_ended(session.client_id)

    def _connection_ended(self, device_id: str) -> None:
        futs = self._waiting.pop(device_id, None)
        if futs:
            for fut in futs.values():
                if not fut.done():
                    fut.set_result(False)

    def subscribed(self, session: Session, topic_filter: str) -> None:
        self._kick(session.client_id)

    def _kick(self, device_id: str) -> None:
        # Delivered on the next loop iteration: the CONNACK/SUBACK goes first.
        asyncio.get_running_loop().call_soon(self.events.device_reachable, device_id)

    def published(
        self, topic: str, payload: bytes, properties: Properties | None, sender: str
    ) -> None:
        parsed = self.results.parse(topic)
        if parsed is None:
            return
        device, _name = parsed
        if not self.broker.speaks_for(sender, device):
            self.results_refused += 1
            log.warning(
                "command result refused: client may not answer for another device",
                extra={"fields": {"client_id": sender, "device_id": device}},
            )
            return
        if len(payload) > RESULT_MAX_BYTES:
            self.results_refused += 1
            return
        from edgeway.commands.model import CommandResult

        corr = properties.correlation_data if properties is not None else None
        try:
            doc: Any = orjson.loads(payload) if payload else {}
            result = CommandResult.from_payload(
                device, doc, corr.decode("utf-8", "replace") if corr else None
            )
        except (ValueError, orjson.JSONDecodeError) as e:
            self.results_refused += 1
            log.warning(
                "command result not understood: %s",
                e,
                extra={"fields": {"device_id": device}},
            )
            return
        self.events.report(result)


class BrokerReceipts:
    """Receipts to devices on the embedded broker (:mod:`edgeway.receipts`):
    QoS 1 on the receipt topic, routed to whoever subscribed (the ACL decides
    who may) and queued for an offline persistent session, as any message."""

    name = "mqtt"

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def send_receipt(self, device_id: str, payload: bytes, default_topic: str) -> bool:
        from edgeway.receipts import receipt_topic

        self.broker.publish(receipt_topic(default_topic, device_id), payload, qos=1)
        return True
