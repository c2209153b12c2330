"""Commands to devices behind an external broker (MQTT client mode).

A subscription with a ``command_topic`` (presets set one) makes its devices
commandable: a command is published at QoS 1 on that template with
``{device_id}`` and ``{name}`` filled in, its payload shaped by
``command_payload``:

========================  ==================================  ======================================
preset                    command topic                       payload
========================  ==================================  ======================================
``zigbee2mqtt``           ``zigbee2mqtt/{device_id}/set``     params as JSON (``{"state": "ON"}``)
``tasmota``               ``cmnd/{device_id}/{name}``         ``params.value`` (else params JSON)
``shelly``                ``{device_id}/rpc``                 ``{"id", "src", "method", "params"}``
========================  ==================================  ======================================

Sparkplug B (preset ``sparkplug_b``, ``command_payload: sparkplug_b``): a
command is a DCMD protobuf on ``spBv1.0/{group}/DCMD/{node}/{device}`` (NCMD
on ``spBv1.0/{group}/NCMD/{node}`` for a node's own id) writing the metric
``params.metric`` (else the command's name) = ``params.value``, or every
``params.metrics`` entry. The codec maps the device id back to the group,
edge node and device its messages came from, and writes
the metric with the datatype and alias its birth announced
(:meth:`edgeway.codecs.sparkplug.SparkplugCodec.encode_command`). Params it
cannot write (a string for a boolean metric, say) fail the command at once.

Reachable: the connection is up and the device id was seen in telemetry on
a subscription with a command topic (that subscription's template is used).
Any id is not taken: several client-mode connections (and the embedded
broker) may offer commands, and the one that actually hears from a device is
the one that reaches it. Remembered ids are capped by ``max_command_devices``.

Delivered: the external broker's PUBACK. These ecosystems have no
acknowledgement from the device itself, so "delivered to the broker" is the
strongest confirmation there is; the command then succeeds at once with
``{"delivered_to": "broker", "topic": ...}``, except for Shelly RPC, whose
device answers on ``<src>/rpc`` (src: our client id) with the result or an
error: that answer is the command's result. An MQTT 5 PUBACK with a failure
reason code (not authorized, say) fails the command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.codecs.sparkplug import SparkplugCodec
from edgeway.commands.model import Command, CommandResult
from edgeway.downlink import DeliveryError, DownlinkEvents

if TYPE_CHECKING:
    from edgeway.south.mqtt_client import MqttClientAdapter, Route
    from edgeway.south.mqtt_client_config import MqttClientSubscription

log = logging.getLogger(__name__)

RPC_RESPONSE_MAX_BYTES = 64 * 1024
"""A Shelly RPC response larger than this is not parsed: results are small
(a component's status) and this bounds the JSON work one message can cause."""


def command_topic(template: str, device_id: str, name: str) -> str:
    """Fill a command topic template (levels, so a value cannot add levels)."""
    if any(c in name for c in "/+#\x00"):
        raise DeliveryError(f"command name {name!r} cannot be a topic level")
    return "/".join(
        device_id if lv == "{device_id}" else name if lv == "{name}" else lv
        for lv in template.split("/")
    )


def command_payload(sub: MqttClientSubscription, command: Command, src: str) -> bytes:
    """The PUBLISH payload of ``command`` for this subscription's ecosystem."""
    params = command.params
    if sub.command_payload == "value":
        if "value" not in params:
            return orjson.dumps(params) if params else b""  # empty: Tasmota's query
        value = params["value"]
        return value.encode() if isinstance(value, str) else orjson.dumps(value)
    if sub.command_payload == "shelly_rpc":
        return orjson.dumps(
            {"id": command.id, "src": src, "method": command.name, "params": params}
        )
    return orjson.dumps(params)


def _message(route: Route, command: Command, src: str) -> tuple[str, bytes] | None:
    """The command's topic and payload on this route; None if the route cannot
    reach the device now (Sparkplug: the codec forgot it)."""
    sub = route.config
    if sub.command_payload == "sparkplug_b":
        if not isinstance(route.codec, SparkplugCodec):
            return None
        try:
            return route.codec.encode_command(
                command.device_id, command.name, command.params, now_ms=int(time.time() * 1000)
            )
        except ValueError as e:
            raise DeliveryError(str(e)) from None
    if sub.command_topic is None:
        return None
    topic = command_topic(sub.command_topic, command.device_id, command.name)
    return topic, command_payload(sub, command, src)


class MqttClientDownlink:
    """The :class:`~edgeway.downlink.Downlink` of one client-mode connection."""

    name = "mqtt_client"

    def __init__(self, adapter: MqttClientAdapter, events: DownlinkEvents) -> None:
        self.adapter = adapter
        self.events = events

    @property
    def devices(self) -> Iterable[str]:
        """Devices the command timer tries (queued commands go out after a
        reconnect, or once the broker's in-flight window has room)."""
        return self.adapter.command_devices if self.adapter.state.connected else ()

    def reachable(self, command: Command) -> bool:
        route = self.adapter.command_devices.get(command.device_id)
        if route is None or not self.adapter.can_publish():
            return False
        codec = route.codec
        # A Sparkplug node or device that sent its death certificate waits
        # for its next birth (the command timer tries again).
        return not isinstance(codec, SparkplugCodec) or codec.online(command.device_id)

    def deliver(self, command: Command) -> asyncio.Future[bool]:
        route = self.adapter.command_devices.get(command.device_id)
        message = _message(route, command, self.adapter.client_id) if route else None
        if route is None or message is None:
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            fut.set_result(False)
            return fut
        sub = route.config
        topic, payload = message
        acked = self.adapter.publish(topic, payload)
        out: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future[int | None]) -> None:
            if out.done():
                return
            reason = None if f.cancelled() or f.exception() is not None else f.result()
            if reason is None:
                out.set_result(False)  # connection lost first: sent again when back
                return
            out.set_result(True)
            if reason >= 0x80:
                self._report(command, False, None, f"broker refused the command: 0x{reason:02x}")
            elif sub.command_payload != "shelly_rpc":  # Shelly answers itself
                self._report(command, True, {"delivered_to": "broker", "topic": topic}, None)

        acked.add_done_callback(done)
        return out

    def _report(self, command: Command, ok: bool, result: Any, error: str | None) -> None:
        self.events.report(CommandResult(command.id, command.device_id, ok, result, error))

    def rpc_response(self, payload: bytes) -> None:
        """A Shelly Gen2 RPC response frame ``{"id", "src", "result"|"error"}``."""
        if len(payload) > RPC_RESPONSE_MAX_BYTES:
            return
        try:
            frame = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(frame, dict):
            return
        cid, device = frame.get("id"), frame.get("src")
        if not isinstance(cid, str) or not isinstance(device, str):
            return
        error = frame.get("error")
        if error is not None:
            if isinstance(error, dict):
                text = f"{error.get('code')}: {error.get('message')}"
            else:
                text = str(error)
            self.events.report(CommandResult(cid, device, False, None, text[:1024]))
        else:
            self.events.report(CommandResult(cid, device, True, frame.get("result"), None))


class MqttClientReceipts:
    """Receipts to devices behind an external broker (:mod:`edgeway.receipts`).

    A device gets its receipt from the connection that heard its telemetry
    (``adapter.receipt_devices``, capped like the command devices), at QoS 1
    on its subscription's ``receipt_topic``, else ``receipts.topic``. Nothing
    is queued here: with the connection down, or the broker's in-flight
    window full (commands first), the receipt is not sent (counted as
    unreachable); the next one names a higher ``confirmed_seq``.
    """

    name = "mqtt_client"

    def __init__(self, adapter: MqttClientAdapter) -> None:
        self.adapter = adapter
        self.sent = 0
        self.not_sent = 0

    def send_receipt(self, device_id: str, payload: bytes, default_topic: str) -> bool:
        from edgeway.receipts import receipt_topic

        adapter = self.adapter
        route = adapter.receipt_devices.get(device_id)
        if route is None:
            return False
        if not adapter.can_publish():
            self.not_sent += 1
            return False
        template = route.config.receipt_topic or default_topic
        # The PUBACK's future resolves on its own (or when the connection is
        # lost); nothing waits on it: a receipt is not sent again.
        adapter.publish(receipt_topic(template, device_id), payload)
        self.sent += 1
        return True
