"""MQTT client mode: subscribe to existing brokers and ingest what devices publish there.

Example::

    mqtt_client:
      - name: plant
        url: mqtts://broker.plant.local:8883
        username: edgeway
        password: "..."
        tls: {ca: /etc/edgeway/plant-ca.pem}
        shared_group: edgeway          # several gateways split the load
        subscriptions:
          - topic: "plant/+/sensors/{device_id}"
            codec: json
            codec_options: {timestamp: time, timestamp_unit: ms}
      - name: zigbee
        url: mqtt://127.0.0.1:1883
        preset: zigbee2mqtt

Each subscription's ``topic`` is an MQTT filter in which ``{device_id}`` (and
``{metric_prefix}``) stand for one level each; the broker is asked for the
filter with those placeholders as ``+`` (as ``$share/<group>/<filter>`` with
``shared_group``). A message's readings are acknowledged to the broker (PUBACK
for QoS 1) only when the ingest future resolves
``ACCEPTED``, so the outbox has them first: until then the broker keeps the
message in flight and redelivers it after a reconnect (subscriptions use QoS 1
or 0; see ``MqttClientSubscription.qos`` for why not 2). Acknowledgements go
out in the order the messages came (MQTT 3.1.1 §4.6 and 5.0 §4.6 ask for it).
A payload that does not decode, or that the pipeline refuses as invalid, is
acknowledged and counted (redelivering it would not help). When the outbox
refuses new readings (``REJECTED_FULL``) the message is not acknowledged and
the client reconnects after a backoff, so the broker redelivers it later.

The session is persistent (MQTT 5 clean start off with ``session_expiry``;
3.1.1 clean session off) under a stable client id, so that redelivery works
and the broker queues for us while we are away. Mosquitto's default
``max_queued_messages`` of 1000 silently drops what a slow or absent client
has not taken yet: raise it on the broker.

Why paho-mqtt: it is the one Python client here that acknowledges by hand on
both MQTT 3.1.1 and 5 (``manual_ack=True`` and ``Client.ack(mid, qos)``).
gmqtt, the faster client, acknowledges after an async handler returns only on
MQTT 5, acknowledges at once on 3.1.1, and needs a task per message; aiomqtt
is built on paho and slower. paho's network loop runs in its own thread
(``loop_start``); messages are handed to the event loop with
``call_soon_threadsafe`` and ``Client.ack`` is thread-safe. Reconnection is
ours (:class:`~edgeway.south.base.Backoff`, forever), not paho's, so each
connection gets a fresh client and stale acknowledgements are never sent on a
new connection.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeway.codecs.base import Codec, DecodeError, check_device_id, get_codec
from edgeway.config import MqttClientConfig, MqttClientSubscription, input_limits
from edgeway.ingest import Ingest, IngestStatus
from edgeway.limits import InputLimits
from edgeway.reading import Origin, Reading
from edgeway.south.base import Backoff, SouthAdapter, register_adapter
from edgeway.south.decode_errors import DecodeErrorCounter

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
"""Seconds allowed for TCP connect, TLS and CONNACK, and for SUBACK: a broker
that has not answered by then is treated as down and retried with backoff."""

PRESETS: dict[str, list[MqttClientSubscription]] = {
    # Zigbee2MQTT: zigbee2mqtt/<friendly_name> JSON; the bridge's own topics are not devices.
    # last_seen is ISO 8601 or epoch ms when the bridge is set to report it.
    "zigbee2mqtt": [
        MqttClientSubscription(
            topic="zigbee2mqtt/{device_id}",
            codec="json",
            codec_options={"timestamp": "last_seen"},
            exclude=["zigbee2mqtt/bridge", "zigbee2mqtt/bridge/#"],
        )
    ],
    # Tasmota: tele/<topic>/SENSOR JSON with one object per sensor. Its "Time" is
    # local time without a zone, so the receive time is used instead.
    "tasmota": [
        MqttClientSubscription(
            topic="tele/{device_id}/SENSOR",
            codec="json",
            codec_options={"timestamp": None, "exclude": ["Time"]},
        )
    ],
    # Shelly Gen2+ status notifications: <device id>/status/<component> JSON, e.g.
    # shellyplus1pm-441793a3f0c4/status/switch:0 -> metrics "switch:0.apower", ...
    "shelly": [
        MqttClientSubscription(
            topic="{device_id}/status/{metric_prefix}",
            codec="json",
            codec_options={"timestamp": None, "exclude": ["id", "source"]},
        )
    ],
    # Sparkplug B: the codec reads group, node and device from the topic.
    "sparkplug_b": [MqttClientSubscription(topic="spBv1.0/#", codec="sparkplug_b")],
}


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest; ``$`` topics need a literal)."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if t_levels[0].startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


@dataclasses.dataclass(slots=True)
class Route:
    """A subscription ready to match topics: its filter, its codec instance."""

    config: MqttClientSubscription
    codec: Codec
    levels: list[str]
    filter: str

    @classmethod
    def build(cls, sub: MqttClientSubscription, limits: InputLimits) -> Route:
        levels = sub.topic.split("/")
        mqtt_filter = "/".join("+" if lv.startswith("{") else lv for lv in levels)
        codec = get_codec(sub.codec, sub.codec_options, limits=limits)
        return cls(sub, codec, levels, mqtt_filter)

    def match(self, topic: str) -> tuple[str | None, str | None] | None:
        """``(device_id, metric_prefix)`` from the topic, or None when it does not match."""
        if not topic_matches(self.filter, topic):
            return None
        for excluded in self.config.exclude:
            if topic_matches(excluded, topic):
                return None
        parts = topic.split("/")
        device_id = self.config.device_id
        prefix = None
        for level, value in zip(self.levels, parts, strict=False):
            if level == "{device_id}":
                device_id = value
            elif level == "{metric_prefix}":
                prefix = value
        return device_id, prefix


@dataclasses.dataclass(slots=True)
class _Pending:
    mid: int
    qos: int
    ack: bool | None = None
    """None: waiting for the ingest; True: acknowledge; False: never (redeliver)."""


class _Connection:
    """One paho client and its connection; lives until it is lost or closed."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.connack: asyncio.Future[tuple[bool, Any]] | None = None
        self.suback: dict[int, asyncio.Future[list[Any]]] = {}
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.pending: collections.deque[_Pending] = collections.deque()
        self.redeliver = False
        """A message was not stored: a reconnect is asked for (once per connection)."""


@register_adapter
class MqttClientAdapter(SouthAdapter):
    """Subscribes to one external broker and ingests the matching messages."""

    section = "mqtt_client"

    def __init__(
        self, config: MqttClientConfig, *, ingest: Ingest, gateway_id: str, data_dir: Path
    ) -> None:
        super().__init__(config, ingest=ingest, gateway_id=gateway_id, data_dir=data_dir)
        self.config: MqttClientConfig = config
        subs = list(PRESETS.get(config.preset or "", [])) + list(config.subscriptions)
        limits = input_limits(config.input_limits)
        self.routes = [Route.build(s, limits) for s in subs]
        self.client_id = config.client_id or f"edgeway-{gateway_id}-{config.name}"
        self.decode_errors = DecodeErrorCounter()
        self.messages = 0
        """Messages received (every connection)."""
        self.connections = 0
        """Successful connections so far (1 after the first CONNACK)."""
        self._conn: _Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reconnect = asyncio.Event()
        self._changed = asyncio.Event()
        url = urlsplit(config.url)
        self._tls = url.scheme == "mqtts"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (8883 if self._tls else 1883)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked whenever the connection state,
        the error or the connection count changes (tests and the admin API use this)."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()

    def request_reconnect(self) -> None:
        """Drop the connection and connect again (after a backoff delay)."""
        self._reconnect.set()

    @property
    def subscription_filters(self) -> list[str]:
        """What is asked of the broker (with ``$share/<group>/`` when configured)."""
        group = self.config.shared_group
        return [f"$share/{group}/{r.filter}" if group else r.filter for r in self.routes]

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            self._reconnect.clear()
            try:
                await self._connected_session(backoff)
            except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as e:
                self.state.record_error(e)
                log.warning("mqtt_client %s: %s; retrying", self.name, self.state.last_error)
            finally:
                await self._close()
                self._notify()
            delay = backoff.next_delay()
            log.debug("mqtt_client %s: reconnecting in %.2fs", self.name, delay)
            await asyncio.sleep(delay)

    async def _connected_session(self, backoff: Backoff) -> None:
        conn = _Connection(self._new_client())
        self._conn = conn
        loop = asyncio.get_running_loop()
        conn.connack = loop.create_future()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await asyncio.to_thread(self._connect, conn.client)
            conn.client.loop_start()
            ok, reason = await conn.connack
        if not ok:
            raise ConnectionError(f"broker refused the connection: {reason}")
        await self._subscribe(conn)
        self.connections += 1
        self.state.connected = True
        self.state.last_error = None
        backoff.reset()
        log.info(
            "mqtt_client %s: connected to %s:%d as %s",
            self.name,
            self._host,
            self._port,
            self.client_id,
        )
        self.ready.set()
        self._notify()
        lost = asyncio.create_task(conn.lost.wait())
        again = asyncio.create_task(self._reconnect.wait())
        try:
            await asyncio.wait({lost, again}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            again.cancel()
        if conn.lost.is_set():
            self.state.record_error(f"connection lost: {conn.lost_reason}")
            log.warning("mqtt_client %s: connection lost: %s", self.name, conn.lost_reason)

    def _new_client(self) -> Any:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.config
        v5 = cfg.protocol == "5"
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": self.client_id,
            "protocol": paho.MQTTv5 if v5 else paho.MQTTv311,
            "manual_ack": True,
            "reconnect_on_failure": False,
        }
        if not v5:
            kwargs["clean_session"] = False
        client = paho.Client(**kwargs)
        # paho logs "Client is not connected" at ERROR from its loop thread after every
        # disconnect we ask for; errors that matter are recorded in self.state by us.
        client.disable_logger()
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if self._tls:
            client.tls_set_context(self._ssl_context())
        # Inflight window towards us; paho's default of 20 for 3.1.1 is the broker's side.
        client.max_inflight_messages_set(cfg.receive_maximum)
        conn_box = self
        client.on_connect = lambda c, _u, flags, rc, _p: conn_box._threadsafe(
            conn_box._on_connect, c, flags, rc
        )
        client.on_disconnect = lambda c, _u, _f, rc, _p: conn_box._threadsafe(
            conn_box._on_disconnect, c, rc
        )
        client.on_subscribe = lambda c, _u, mid, rcs, _p: conn_box._threadsafe(
            conn_box._on_subscribe, c, mid, rcs
        )
        client.on_message = lambda c, _u, msg: conn_box._threadsafe(conn_box._on_message, c, msg)
        return client

    def _ssl_context(self) -> ssl.SSLContext:
        tls = self.config.tls
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls and tls.ca else None)
        if tls is not None and tls.cert is not None and tls.key is not None:
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        return ctx

    def _connect(self, client: Any) -> None:
        """Blocking TCP connect, TLS handshake and CONNECT (runs in a thread)."""
        cfg = self.config
        if cfg.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = int(cfg.session_expiry)
            props.ReceiveMaximum = cfg.receive_maximum
            client.connect(
                self._host, self._port, cfg.keepalive, clean_start=False, properties=props
            )
        else:
            client.connect(self._host, self._port, cfg.keepalive)

    async def _subscribe(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        if cfg.protocol == "5":
            from paho.mqtt.subscribeoptions import SubscribeOptions

            topics: list[Any] = [
                (f, SubscribeOptions(qos=r.config.qos))
                for f, r in zip(self.subscription_filters, self.routes, strict=True)
            ]
        else:
            topics = [
                (f, r.config.qos)
                for f, r in zip(self.subscription_filters, self.routes, strict=True)
            ]
        fut: asyncio.Future[list[Any]] = loop.create_future()
        result, mid = conn.client.subscribe(topics)
        if result != 0:
            raise ConnectionError(f"subscribe failed: {result}")
        # paho's SUBACK callback reaches us through call_soon_threadsafe, so it runs
        # after this line even when the broker answered before subscribe() returned.
        conn.suback[mid] = fut
        async with asyncio.timeout(CONNECT_TIMEOUT):
            codes = await fut
        for f, rc in zip(self.subscription_filters, codes, strict=False):
            value = getattr(rc, "value", rc)
            if value >= 0x80:
                raise ConnectionError(f"broker refused subscription {f!r}: {rc}")

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.state.connected = False
        if conn is None:
            return
        client = conn.client
        # Messages still waiting for the ingest are not acknowledged on this connection;
        # the broker redelivers them on the next one.
        conn.pending.clear()

        def stop() -> None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()

        await asyncio.to_thread(stop)

    # ------------------------------------------------------------------ paho callbacks

    def _threadsafe(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _current(self, client: Any) -> _Connection | None:
        conn = self._conn
        return conn if conn is not None and conn.client is client else None

    def _on_connect(self, client: Any, flags: Any, rc: Any) -> None:
        conn = self._current(client)
        if conn is None or conn.connack is None or conn.connack.done():
            return
        failed = bool(getattr(rc, "is_failure", False)) or (isinstance(rc, int) and rc != 0)
        conn.connack.set_result((not failed, rc))

    def _on_disconnect(self, client: Any, rc: Any) -> None:
        conn = self._current(client)
        if conn is None:
            return
        conn.lost_reason = str(rc)
        if conn.connack is not None and not conn.connack.done():
            conn.connack.set_result((False, f"disconnected: {rc}"))
        for fut in conn.suback.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"disconnected: {rc}"))
        conn.lost.set()

    def _on_subscribe(self, client: Any, mid: int, codes: list[Any]) -> None:
        conn = self._current(client)
        if conn is None:
            return
        fut = conn.suback.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(list(codes))

    def _on_message(self, client: Any, msg: Any) -> None:
        conn = self._current(client)
        if conn is None:
            return  # a message of a connection we already closed: the broker redelivers it
        self.messages += 1
        qos = int(msg.qos)
        pending = _Pending(int(msg.mid), qos) if qos > 0 else None
        if pending is not None:
            conn.pending.append(pending)
        readings = self._decode(msg.topic, bytes(msg.payload))
        if not readings:
            self._settle(conn, pending, True)
            return
        future = self.ingest.submit(readings)
        n = len(readings)
        future.add_done_callback(lambda f: self._stored(conn, pending, f, n))

    def _decode(self, topic: str, payload: bytes) -> list[Reading]:
        for route in self.routes:
            found = route.match(topic)
            if found is None:
                continue
            device_id, prefix = found
            origin = Origin("mqtt_client", address=topic, client_id=self.config.name)
            try:
                if device_id is not None:
                    device_id = check_device_id(device_id)
                readings = route.codec.decode(
                    payload, device_id=device_id, origin=origin, now=time.time()
                )
            except DecodeError as e:
                self.decode_errors.record(self.state, device_id or topic, e.reason, e.detail)
                return []
            if prefix:
                readings = [
                    dataclasses.replace(
                        r, metrics={f"{prefix}.{k}": v for k, v in r.metrics.items()}
                    )
                    for r in readings
                ]
            return readings
        return []  # excluded, or a topic no route claims (overlapping broker subscriptions)

    def _stored(
        self,
        conn: _Connection,
        pending: _Pending | None,
        future: asyncio.Future[IngestStatus],
        n: int,
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            # Not stored (a failed outbox commit): keep it at the broker and have it
            # redelivered. Not acknowledging it alone would block every later
            # acknowledgement (they go out in order) until the broker's in-flight
            # window is full and it sends nothing more.
            error = future.exception() if not future.cancelled() else "cancelled"
            self.state.record_error(f"ingest failed: {error}")
            self._settle(conn, pending, False)
            self._redeliver(conn, logging.WARNING, f"ingest failed ({error!r})")  # repr: one line
            return
        status = future.result()
        if status is IngestStatus.ACCEPTED:
            self.state.record_readings(n)
            self._settle(conn, pending, True)
        elif status is IngestStatus.REJECTED_INVALID:
            self.state.rejected += 1
            self._settle(conn, pending, True)  # redelivering would be refused again
        else:  # REJECTED_FULL: keep it at the broker; reconnect later to have it redelivered
            self.state.rejected += 1
            self._settle(conn, pending, False)
            self._redeliver(conn, logging.INFO, "outbox full")

    def _redeliver(self, conn: _Connection, level: int, why: str) -> None:
        """Reconnect (after a backoff) so that the broker redelivers what was not
        acknowledged on ``conn``; logged once per connection."""
        if self._conn is not conn or conn.redeliver:
            return
        conn.redeliver = True
        log.log(
            level,
            "mqtt_client %s: %s; reconnecting to have the broker redeliver",
            self.name,
            why,
        )
        self._reconnect.set()

    def _settle(self, conn: _Connection, pending: _Pending | None, ack: bool) -> None:
        if pending is not None:
            pending.ack = ack
        if self._conn is not conn:
            return
        # Acknowledge in arrival order; stop at the first message that must not be.
        while conn.pending and conn.pending[0].ack:
            head = conn.pending.popleft()
            conn.client.ack(head.mid, head.qos)
