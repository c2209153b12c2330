"""Auto-provisioning over the embedded MQTT broker.

A device that holds a provisioning key ``ID:SECRET`` connects with user name
``$provision:ID`` and password ``SECRET`` (any client id; its session is
never kept), then::

    SUBSCRIBE  $edgeway/provision/{client_id}/accepted and .../rejected
               (or .../+ with MQTT 5 no_local, so its request is not echoed)
    PUBLISH    $edgeway/provision/{client_id}/request   {"device_id": "pump-17"}
    <-         $edgeway/provision/{client_id}/accepted  {"device_id", "credentials": {...}, ...}
           or  $edgeway/provision/{client_id}/rejected  {"error": CODE, "message": TEXT}

With MQTT 5, a response topic under ``$edgeway/provision/{client_id}/`` (and
its correlation data) is answered instead. Then it disconnects and connects
again as itself: user name = its device id, password = ``credentials.mqtt``.

What such a connection may do: publish that one request topic and read
under its own ``$edgeway/provision/{client_id}/`` - nothing else (no
telemetry, no will, no retained or shared reads of anything else); the
authoriser in front of the ACL (:class:`ProvisioningAuthoriser`) decides it
before any rule is looked at. The answer, which carries secrets, is never
routed: it is written to the requesting connection alone, so no subscriber
(``$edgeway/#`` in a careless ACL, another client with the same client id)
can read it. Topics start with ``$`` so that ``#`` subscribers never match
them (MQTT 4.7.2). One request at a time per connection; more are answered
``busy``; a request body over :data:`MAX_REQUEST` bytes is refused.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.devices.auth import AuthDecision, ConnectInfo, Principal
from edgeway.devices.provisioning import ProvisioningError
from edgeway.south.mqtt.device_requests import DeviceRequests

if TYPE_CHECKING:
    from edgeway.devices.auth import Authoriser
    from edgeway.devices.provisioning import Provisioner
    from edgeway.south.mqtt.broker import Broker
    from edgeway.south.mqtt.connection import MqttConnection
    from edgeway.south.mqtt.packets import Properties

__all__ = [
    "TOPIC_PREFIX",
    "USER_PREFIX",
    "ProvisioningAuthoriser",
    "ProvisioningMqtt",
    "authenticate",
]

log = logging.getLogger(__name__)

USER_PREFIX = "$provision:"
"""User name prefix of a provisioning CONNECT (device ids never start with ``$``)."""
TOPIC_PREFIX = "$edgeway/provision/"
MAX_REQUEST = 4096
"""Bytes of a request: ``{"device_id": ...}`` is well under 200."""


def is_provisioning_user(username: str | None) -> bool:
    return username is not None and username.startswith(USER_PREFIX)


def _namespace(client_id: str) -> str:
    return f"{TOPIC_PREFIX}{client_id}/"


async def authenticate(provisioner: Provisioner | None, info: ConnectInfo) -> AuthDecision:
    """A CONNECT with user name ``$provision:ID``: the key's secret is the
    password. Refused like a wrong password (0x86), or 0x8A while locked out."""
    assert info.username is not None
    key_id = info.username[len(USER_PREFIX) :]
    if provisioner is None:
        return AuthDecision(False, None, 0x86, "provisioning is not enabled")
    if any(c in info.client_id for c in "+#/"):
        # It names the topics this client may use: keep it one topic level.
        return AuthDecision(False, None, 0x85, "a provisioning client id is one topic level")
    secret = (info.password or b"").decode("utf-8", "replace")
    try:
        provisioner.check_key(key_id, secret, info.remote)
    except ProvisioningError as e:
        code = {"locked": 0x8A, "forbidden": 0x87}.get(e.code, 0x86)
        return AuthDecision(False, None, code, str(e))
    principal = Principal(
        info.client_id, info.username, method="provisioning", provisioning_key=key_id
    )
    return AuthDecision(True, principal)


class ProvisioningAuthoriser:
    """The ACL's front: a provisioning client may publish its request topic
    and read its own namespace, nothing else; every other client goes to
    ``inner`` (the configured ACL) unchanged."""

    def __init__(self, inner: Authoriser) -> None:
        self.inner = inner

    def may_publish(self, principal: Principal, topic: str) -> bool:
        if principal.provisioning_key is not None:
            return topic == _namespace(principal.client_id) + "request"
        return self.inner.may_publish(principal, topic)

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        if principal.provisioning_key is not None:
            # Its namespace, but not its own request echoed back (asked
            # again with each topic name at delivery, so ``ns/+`` is granted
            # and the echo dropped).
            ns = _namespace(principal.client_id)
            return (
                topic_filter.startswith(ns)
                and len(topic_filter) > len(ns)
                and topic_filter != ns + "request"
            )
        return self.inner.may_subscribe(principal, topic_filter)

    def invalidate(self) -> None:
        self.inner.invalidate()


class ProvisioningMqtt(DeviceRequests):
    """A BrokerObserver answering enrolment requests (see the module): one
    request at a time per provisioning client (``take`` by client id)."""

    what = "provisioning request"

    def __init__(self, broker: Broker, provisioner: Provisioner) -> None:
        super().__init__(broker, max_pending=1)
        self.provisioner = provisioner
        self.ignored = 0
        """Requests on provisioning topics from clients that are not
        provisioning clients, or for another client's namespace."""

    def published(
        self, topic: str, payload: bytes, properties: Properties | None, sender: str
    ) -> None:
        if not topic.startswith(TOPIC_PREFIX):
            return
        session = self.broker.sessions.get(sender)
        conn = session.conn if session is not None else None
        principal = getattr(conn, "principal", None)
        if (
            conn is None
            or principal is None
            or principal.provisioning_key is None
            or topic != _namespace(sender) + "request"
        ):
            self.ignored += 1
            return
        if len(payload) > MAX_REQUEST:
            self._answer(
                conn, properties, {"error": "invalid", "message": f"over {MAX_REQUEST} bytes"}
            )
            return
        try:
            body = orjson.loads(payload) if payload.strip() else {}
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self._answer(
                conn, properties, {"error": "invalid", "message": "the request is a JSON object"}
            )
            return
        if not self.take(sender):
            self._answer(conn, properties, {"error": "busy", "message": "one request at a time"})
            return
        self.spawn(self._enrol(conn, principal.provisioning_key, body, properties))

    async def _enrol(
        self,
        conn: MqttConnection,
        key_id: str,
        body: dict[str, Any],
        properties: Properties | None,
    ) -> None:
        try:
            result = await self.provisioner.enrol(
                key_id, "", body, remote=conn.remote, protocol="mqtt", proved=True
            )
            self._answer(conn, properties, result.to_json(), accepted=True)
        except ProvisioningError as e:
            self._answer(conn, properties, {"error": e.code, "message": str(e)})
        except Exception:
            log.exception("provisioning over MQTT for %s failed", conn.remote)
            self._answer(conn, properties, {"error": "internal", "message": "see the gateway log"})
        finally:
            self.release(conn.client_id)

    def _answer(
        self,
        conn: MqttConnection,
        props: Properties | None,
        body: dict[str, Any],
        *,
        accepted: bool = False,
    ) -> None:
        """Write the answer to ``conn`` alone (it may carry secrets)."""
        from edgeway.south.mqtt.packets import Properties as Props
        from edgeway.south.mqtt.retained import Message
        from edgeway.south.mqtt.session import Delivery

        ns = _namespace(conn.client_id)
        out_props = None
        rt = props.response_topic if props is not None else None
        if rt and rt.startswith(ns) and "+" not in rt and "#" not in rt:
            assert props is not None
            topic = rt
            out_props = Props(correlation_data=props.correlation_data)
        else:
            topic = ns + ("accepted" if accepted else "rejected")
        msg = Message(topic, orjson.dumps(body), 1, False, out_props)
        try:
            conn.deliver(Delivery(msg, 1, False), None)
        except Exception:
            log.exception("provisioning answer to %s could not be written", conn.remote)
        self.broker.flush_writes_soon()
