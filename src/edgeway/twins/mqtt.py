"""Twins over the embedded MQTT broker.

Topics (``{id}`` is the device id, which on the embedded broker is the
device's MQTT client id, as for commands):

- ``devices/{id}/twin/desired/delta`` (the gateway publishes, QoS 1):
  ``{"version": <desired version>, "reported_version": ..., "delta": {...}}``,
  what desired asks that reported does not show yet. Sent when desired or
  reported changes while the device is connected, and once, consolidated at
  the latest version, when the device (re)subscribes: a device that was away
  while 1,000 patches were made gets one message, not 1,000. Not retained and
  not queued for an offline device (its session would otherwise queue every
  intermediate delta).
- ``devices/{id}/twin/reported`` (the device publishes): a JSON merge patch of
  its reported state. The answer goes to the MQTT 5 response topic (with the
  correlation data) if given and the device may publish there itself (its
  ACL: a response topic must not make the gateway publish where the device
  may not, ``Broker.may_answer_on``), else to ``devices/{id}/twin/reported/accepted``
  ``{"version"}`` or ``.../rejected`` ``{"error", "message"[, "version"]}``.
  A ``version`` field in an MQTT 5 user property ``if-match`` makes it
  conditional.
- ``devices/{id}/twin/get`` (the device publishes, any payload): the whole
  twin goes to the response topic, else ``devices/{id}/twin/get/response``.

Only the device itself may publish on its twin topics: a PUBLISH from another
client id, or from a client that proved another identity than the device id
it claims as its client id (``Broker.speaks_for``), is dropped and counted
(the ACL should also keep other clients from subscribing to
``devices/{id}/twin/#``: the template ``devices/{client_id}/#`` does).
Each device has at most :data:`MAX_PENDING` twin requests being stored at
once; more are answered ``busy``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.south.mqtt.device_requests import DeviceRequests
from edgeway.south.mqtt.packets import Properties
from edgeway.south.mqtt.topics import topic_matches
from edgeway.twins.model import Twin, TwinError, parse_patch

if TYPE_CHECKING:
    from edgeway.south.mqtt.broker import Broker
    from edgeway.south.mqtt.session import Session
    from edgeway.twins.service import Section, TwinService

log = logging.getLogger(__name__)

MAX_PENDING = 16
"""Twin requests of one device being stored at once."""


def _topic_parts(topic: str) -> tuple[str, str] | None:
    """``devices/{id}/twin/<rest>`` -> (id, rest)."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "devices" or parts[2] != "twin" or not parts[1]:
        return None
    return parts[1], "/".join(parts[3:])


class TwinMqtt(DeviceRequests):
    """A BrokerObserver serving twins to MQTT devices (see the module docstring)."""

    what = "twin request"

    def __init__(self, broker: Broker, service: TwinService) -> None:
        super().__init__(broker, MAX_PENDING)
        self.service = service
        self._last_sent: dict[str, tuple[int, int, int]] = {}
        """Per connected device: (its connection, desired and reported version)
        of the last delta sent, so a resumed session that also subscribes again
        gets one delta, not two."""
        self.requests = 0

    def attach(self) -> None:
        super().attach()
        self.service.add_listener(self._changed)

    def detach(self) -> None:
        super().detach()
        self.service.remove_listener(self._changed)

    # -- BrokerObserver ---------------------------------------------------------

    def session_online(self, session: Session) -> None:
        if any(self._delta_filter(session, f) for f in session.subscriptions):
            self.spawn(self._send_delta(session.client_id))  # a resumed session

    def session_offline(self, session: Session) -> None:
        self._last_sent.pop(session.client_id, None)

    def subscribed(self, session: Session, topic_filter: str) -> None:
        if self._delta_filter(session, topic_filter):
            self.spawn(self._send_delta(session.client_id))

    def published(
        self, topic: str, payload: bytes, properties: Properties | None, sender: str
    ) -> None:
        parsed = _topic_parts(topic)
        if parsed is None:
            return
        device, rest = parsed
        if rest not in ("reported", "get"):
            return
        if not self.admit(sender, device):
            return
        if not self.take(device):
            self._answer(
                device,
                rest,
                properties,
                False,
                {"error": "busy", "message": "too many requests at once"},
            )
            return
        self.requests += 1
        self.spawn(self._handle(device, rest, payload, properties))

    # -- work --------------------------------------------------------------------

    @staticmethod
    def _delta_filter(session: Session, topic_filter: str) -> bool:
        return not topic_filter.startswith("$share/") and topic_matches(
            topic_filter, f"devices/{session.client_id}/twin/desired/delta"
        )

    async def _handle(
        self, device: str, rest: str, payload: bytes, properties: Properties | None
    ) -> None:
        try:
            if rest == "get":
                twin = await self.service.get(device)
                self._answer(device, rest, properties, True, twin.to_json())
                return
            if len(payload) > self.service.limits.max_bytes:
                raise TwinError("too_large", f"over {self.service.limits.max_bytes} bytes")
            twin = await self.service.patch(
                device,
                "reported",
                parse_patch(payload),
                if_match=_if_match(properties),
                by=f"mqtt:{device}",
            )
            self._answer(device, rest, properties, True, {"version": twin.reported_version})
        except TwinError as e:
            self._answer(
                device, rest, properties, False, {"error": e.code, "message": str(e), **e.extra}
            )
        except Exception:
            log.exception("twin request of %s failed", device)
        finally:
            self.release(device)

    def _answer(
        self, device: str, rest: str, props: Properties | None, ok: bool, body: dict[str, Any]
    ) -> None:
        out_props = None
        if (
            props is not None
            and props.response_topic
            and self.broker.may_answer_on(device, props.response_topic)
        ):
            topic = props.response_topic
            out_props = Properties(correlation_data=props.correlation_data)
        elif rest == "get":
            topic = f"devices/{device}/twin/get/response"
        else:
            topic = f"devices/{device}/twin/reported/{'accepted' if ok else 'rejected'}"
        self.broker.publish(topic, orjson.dumps(body), qos=1, properties=out_props)

    def _changed(self, twin: Twin, _section: Section) -> None:
        session = self.broker.sessions.get(twin.device_id)
        if session is None or session.conn is None:
            return  # sent, consolidated, when it comes back
        if any(self._delta_filter(session, f) for f in session.subscriptions):
            self._publish_delta(twin)

    async def _send_delta(self, device: str) -> None:
        self._publish_delta(await self.service.get(device))

    def _publish_delta(self, twin: Twin) -> None:
        session = self.broker.sessions.get(twin.device_id)
        if session is None or session.conn is None:
            return
        mark = (id(session.conn), twin.desired_version, twin.reported_version)
        if self._last_sent.get(twin.device_id) == mark:
            return
        self._last_sent[twin.device_id] = mark
        body = {
            "version": twin.desired_version,
            "reported_version": twin.reported_version,
            "delta": twin.delta,
        }
        self.broker.publish(
            f"devices/{twin.device_id}/twin/desired/delta", orjson.dumps(body), qos=1
        )


def _if_match(props: Properties | None) -> int | None:
    if props is None or not props.user_properties:
        return None
    for key, value in props.user_properties:
        if key.lower() == "if-match":
            try:
                return int(value)
            except ValueError:
                raise TwinError("invalid", "if-match must be a version number") from None
    return None
