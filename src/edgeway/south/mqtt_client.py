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

The MQTT client is our own: the broker's sans-IO codec
(:mod:`edgeway.south.mqtt.codec`, fuzzed) on an asyncio protocol, so a
message costs a decode and a submit on the event loop and a read's PUBACKs go
out in one write. paho-mqtt, used before, ran its network loop in a thread and
handed every message across (``call_soon_threadsafe``) and every
acknowledgement back: 0.108 CPU-s per 1,000 records end to end against
Node-RED's 0.039 (shared/MEASUREMENTS.md, 2026-12-06). Reconnection is ours
(:class:`~edgeway.south.base.Backoff`, forever), and each connection is a new
:class:`_Connection`, so stale acknowledgements are never sent on a new one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

from edgeway.codecs.base import Codec, DecodeError, check_device_id, get_codec
from edgeway.config_types import input_limits
from edgeway.downlink import Downlink, DownlinkEvents
from edgeway.ingest import Ingest, IngestStatus
from edgeway.limits import InputLimits
from edgeway.quickack import ack_now, quickack_socket
from edgeway.reading import Origin, Reading
from edgeway.record_ids import message_key
from edgeway.south.base import Backoff, SouthAdapter, register_adapter
from edgeway.south.decode_errors import DecodeErrorCounter
from edgeway.south.mqtt.codec import PINGREQ_BYTES, MqttReader, encode, encode_pubacks
from edgeway.south.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingResp,
    Properties,
    ProtocolError,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
)
from edgeway.south.mqtt_client_config import MqttClientConfig, MqttClientSubscription
from edgeway.south.mqtt_client_downlink import MqttClientDownlink, MqttClientReceipts

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
"""Seconds allowed for TCP connect, TLS and CONNACK, and for SUBACK: a broker
that has not answered by then is treated as down and retried with backoff."""

CLOSE_TIMEOUT = 2.0
"""Seconds a DISCONNECT may take to go out before the socket is dropped: a
link that went silent never drains its send buffer."""

"""Linux only. A broker with Nagle on (Mosquitto's default) sends the first
PUBLISH of a burst and holds the rest until we ACK it; the kernel would delay
that ACK up to 40 ms, waiting for data of ours to ride on."""

PRESETS: dict[str, list[MqttClientSubscription]] = {
    # Zigbee2MQTT: zigbee2mqtt/<friendly_name> JSON; the bridge's own topics are not devices.
    # last_seen is ISO 8601 or epoch ms when the bridge is set to report it.
    "zigbee2mqtt": [
        MqttClientSubscription(
            topic="zigbee2mqtt/{device_id}",
            codec="json",
            codec_options={"timestamp": "last_seen"},
            exclude=["zigbee2mqtt/bridge", "zigbee2mqtt/bridge/#"],
            command_topic="zigbee2mqtt/{device_id}/set",
        )
    ],
    # Tasmota: tele/<topic>/SENSOR JSON with one object per sensor. Its "Time" is
    # local time without a zone, so the receive time is used instead.
    "tasmota": [
        MqttClientSubscription(
            topic="tele/{device_id}/SENSOR",
            codec="json",
            codec_options={"timestamp": None, "exclude": ["Time"]},
            command_topic="cmnd/{device_id}/{name}",
            command_payload="value",
        )
    ],
    # Shelly Gen2+ status notifications: <device id>/status/<component> JSON, e.g.
    # shellyplus1pm-441793a3f0c4/status/switch:0 -> metrics "switch:0.apower", ...
    "shelly": [
        MqttClientSubscription(
            topic="{device_id}/status/{metric_prefix}",
            codec="json",
            codec_options={"timestamp": None, "exclude": ["id", "source"]},
            command_topic="{device_id}/rpc",
            command_payload="shelly_rpc",
        )
    ],
    # Sparkplug B: the codec reads group, node and device from the topic;
    # commands become NCMD/DCMD to the node or device the births came from.
    "sparkplug_b": [
        MqttClientSubscription(
            topic="spBv1.0/#", codec="sparkplug_b", command_payload="sparkplug_b"
        )
    ],
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

    @property
    def commandable(self) -> bool:
        """Its devices take commands: a command topic, or Sparkplug NCMD/DCMD."""
        return self.config.command_topic is not None or self.config.command_payload == "sparkplug_b"

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


def identifies_message(
    readings: Sequence[Reading], now: float, sequence_metric: str | None
) -> bool:
    """The payload these readings came from (received at ``now``) tells one
    message from another: a device timestamp (a ``ts`` other than ``now``), a
    message id, or the sequence metric (:mod:`edgeway.record_ids`)."""
    for r in readings:
        if r.ts != now or r.origin.message_id is not None:
            return True
        if sequence_metric is not None and sequence_metric in r.metrics:
            return True
    return False


def _rebuilt(
    readings: list[Reading], prefix: str | None, key: str | None, now: float
) -> list[Reading]:
    """The readings with their metric names under ``prefix`` and, with ``key``,
    an origin carrying the message key (one new origin per origin shared)."""
    keyed: dict[int, Origin] = {}
    out = []
    for r in readings:
        origin = r.origin
        if key is not None:
            o = keyed.get(id(origin))
            if o is None:
                o = keyed[id(origin)] = dataclasses.replace(origin, key=key, received=now)
            origin = o
        metrics = {f"{prefix}.{k}": v for k, v in r.metrics.items()} if prefix else r.metrics
        out.append(Reading(r.device_id, r.ts, metrics, origin, r.tags, r.priority))
    return out


@dataclasses.dataclass(slots=True)
class _Pending:
    mid: int
    ack: bool | None = None
    """None: waiting for the ingest; True: acknowledge; False: never (redeliver)."""


class _Connection(asyncio.Protocol):
    """One network connection to the broker; lives until it is lost or closed.

    Bytes go through the sans-IO codec; the packets are the adapter's to act
    on (:meth:`MqttClientAdapter._received`). PUBACKs asked for during one
    loop turn are written together at its end.
    """

    def __init__(
        self,
        received: Callable[[_Connection, list[Packet]], None],
        level: int,
        max_packet_size: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.level = level
        self.reader = MqttReader(max_packet_size, level, share_empty_properties=True)
        self.connack: asyncio.Future[ConnAck] = loop.create_future()
        self.suback: dict[int, asyncio.Future[SubAck]] = {}
        self.puback: dict[int, asyncio.Future[int | None]] = {}
        """Our QoS 1 PUBLISHes (commands) by packet id -> PUBACK reason code
        (None: the connection was lost first)."""
        self.send_window = 1
        """Our PUBLISHes in flight at most: the broker's receive maximum (MQTT 5
        CONNACK) or ``max_commands_in_flight``, whichever is lower."""
        self._next_id = 1
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.pending: collections.deque[_Pending] = collections.deque()
        self.redeliver = False
        """A message was not stored: a reconnect is asked for (once per connection)."""
        self.last_in = time.monotonic()
        self._received = received
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        self._acks: list[int] = []
        self._held = 0
        self.subscribed = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._sock = quickack_socket(transport)

    def data_received(self, data: bytes) -> None:
        if self._sock is not None:
            # Not sticky: the kernel falls back to delayed ACKs, hence once per read.
            if not ack_now(self._sock):
                self._sock = None
        self.last_in = time.monotonic()
        try:
            packets = self.reader.feed(data)
        except ProtocolError as e:
            self._received(self, e.packets)
            self.fail(f"bad packet from the broker: {e.message!r}")
            return
        self._received(self, packets)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"{type(exc).__name__}: {exc}" if exc else "closed by the broker")

    # for the adapter

    def hold(self) -> None:
        """A submit of this connection's readings is waiting for the outbox: read
        nothing more until it is stored. A broker can send faster than the
        outbox stores (a backlog at the broker): reading on would let ingest
        take the whole event loop and starve the sinks; held, the loop has
        the commit's time for them. The broker keeps what it has not sent."""
        self._held += 1
        if self._held == 1 and self.subscribed and self._transport is not None:
            self._transport.pause_reading()

    def release(self) -> None:
        self._held -= 1
        if self._held == 0 and self._transport is not None and not self.lost.is_set():
            self.last_in = time.monotonic()  # our pause was no silence of the broker's
            self._transport.resume_reading()

    @property
    def held(self) -> bool:
        return self._held > 0

    def mark_subscribed(self) -> None:
        """SUBACK is in: from now on reads may pause (before, a redelivered
        message waiting for the outbox would keep the SUBACK unread)."""
        self.subscribed = True
        if self._held and self._transport is not None:
            self._transport.pause_reading()

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def ack(self, mid: int) -> None:
        """PUBACK ``mid`` (in the order of the calls), at the end of this loop turn."""
        if not self._acks:
            self._loop.call_soon(self._write_acks)
        self._acks.append(mid)

    def _write_acks(self) -> None:
        acks, self._acks = self._acks, []
        if not self.lost.is_set():
            self.send(encode_pubacks(acks, self.level))

    def fail(self, reason: str) -> None:
        """The connection is unusable: wake whoever waits on it, drop the socket."""
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        waiters: list[asyncio.Future[ConnAck] | asyncio.Future[SubAck]] = [self.connack]
        for fut in [*waiters, *self.suback.values()]:
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
        for pub in self.puback.values():
            if not pub.done():
                pub.set_result(None)
        self.puback.clear()
        if self._transport is not None:
            self._transport.abort()

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[int | None]:
        """PUBLISH at QoS 1; the future gets the PUBACK's reason code."""
        fut: asyncio.Future[int | None] = self._loop.create_future()
        if self.lost.is_set():
            fut.set_result(None)
            return fut
        mid = self._next_id
        while mid == 1 or mid in self.puback:  # 1 is SUBSCRIBE's
            mid = mid % 65535 + 1
        self._next_id = mid % 65535 + 1
        self.puback[mid] = fut
        self.send(encode(Publish(topic, payload, qos=1, packet_id=mid), self.level))
        return fut

    async def close(self) -> None:
        """DISCONNECT (the session stays at the broker) and close, within CLOSE_TIMEOUT."""
        transport = self._transport
        if transport is None or self.lost.is_set():
            return
        self.send(encode(Disconnect(), self.level))
        transport.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.lost.wait()
        except TimeoutError:
            transport.abort()


@register_adapter
class MqttClientAdapter(SouthAdapter):
    """Subscribes to one external broker and ingests the matching messages."""

    section = "mqtt_client"
    config_model = MqttClientConfig

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
        self.command_devices: dict[str, Route] = {}
        """Device ids seen in telemetry on a route with a command topic (commandable)."""
        self._downlink: MqttClientDownlink | None = None
        self.receipt_devices: dict[str, Route] = {}
        """Device ids seen in telemetry on any route, once receipts are on
        (capped by ``max_command_devices`` too)."""
        self._receipts: MqttClientReceipts | None = None
        self._rpc_topic: str | None = None
        self._command_devices_full = False
        if any(s.command_payload == "shelly_rpc" and s.command_topic for s in subs):
            # Shelly RPC responses come back on <src>/rpc; src is our client id.
            if any(c in self.client_id for c in "/+#"):
                raise ValueError(
                    f"mqtt_client {config.name}: client_id {self.client_id!r} is the Shelly "
                    "RPC src, a topic level: no '/', '+', '#'"
                )
            self._rpc_topic = f"{self.client_id}/rpc"
        self._level = MQTT_5 if config.protocol == "5" else MQTT_311
        try:  # once, so that a CONNECT the codec refuses stops start-up, not each connection
            self._connect_bytes = encode(self._connect_packet(), self._level)
        except ValueError as e:
            raise ValueError(f"mqtt_client {config.name}: {e}") from None
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

    # ------------------------------------------------------------------ commands

    def downlink(self, events: DownlinkEvents) -> Downlink | None:
        """Commands for the devices of subscriptions with a ``command_topic``;
        see :mod:`edgeway.south.mqtt_client_downlink`."""
        if not any(r.commandable for r in self.routes):
            return None
        self._downlink = MqttClientDownlink(self, events)
        return self._downlink

    def receipt_downlink(self) -> MqttClientReceipts:
        """Receipts to the devices this connection hears from (see
        :class:`~edgeway.south.mqtt_client_downlink.MqttClientReceipts`)."""
        if self._receipts is None:
            self._receipts = MqttClientReceipts(self)
        return self._receipts

    def can_publish(self) -> bool:
        """Connected, subscribed, and the broker's in-flight window has room."""
        conn = self._conn
        return (
            conn is not None
            and self.state.connected
            and not conn.lost.is_set()
            and len(conn.puback) < conn.send_window
        )

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[int | None]:
        """PUBLISH at QoS 1 on the current connection; the future gets the
        PUBACK's reason code, None if there is no connection or it is lost first."""
        conn = self._conn
        if conn is None:
            fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        return conn.publish(topic, payload)

    def _command_device(self, device_id: str, route: Route) -> None:
        devices = self.command_devices
        if len(devices) >= self.config.max_command_devices:
            if not self._command_devices_full:
                self._command_devices_full = True
                log.warning(
                    "mqtt_client %s: %d devices known for commands (max_command_devices); "
                    "new ones are not commandable",
                    self.name,
                    len(devices),
                )
            return
        devices[device_id] = route
        self._notify()
        if self._downlink is not None:
            self._downlink.events.device_reachable(device_id)

    def _receipt_devices(self, readings: list[Reading], route: Route) -> None:
        """Remember who sent these readings (the topic's id or the codec's)."""
        known = self.receipt_devices
        for r in readings:
            if r.device_id not in known and len(known) < self.config.max_command_devices:
                known[r.device_id] = route

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
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
        cfg = self.config
        conn = _Connection(self._received, self._level, cfg.max_packet_size)
        self._conn = conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl_context() if self._tls else None,
                )
                conn.send(self._connect_bytes)
                connack = await conn.connack
        except TimeoutError:
            raise ConnectionError(f"no CONNACK within {CONNECT_TIMEOUT:.0f}s") from None
        if connack.reason_code != 0:
            raise ConnectionError(
                f"broker refused the connection: reason code 0x{connack.reason_code:02x}"
            )
        keepalive = connack.properties.server_keep_alive or cfg.keepalive
        conn.send_window = min(
            connack.properties.receive_maximum or 65535, cfg.max_commands_in_flight
        )
        await self._subscribe(conn)
        conn.mark_subscribed()
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
            # PINGREQ every half keepalive: the broker drops a client it has not
            # heard from for 1.5 keepalives, and a broker we have not heard from
            # for as long is gone (a cut link shows no error until then).
            while not (lost.done() or again.done()):
                await asyncio.wait(
                    {lost, again}, timeout=keepalive / 2, return_when=asyncio.FIRST_COMPLETED
                )
                if not conn.held and time.monotonic() - conn.last_in > keepalive * 1.5:
                    conn.fail(f"no packet from the broker for {keepalive * 1.5:.0f}s")
                elif not lost.done():
                    conn.send(PINGREQ_BYTES)
        finally:
            lost.cancel()
            again.cancel()
        if conn.lost.is_set():
            self.state.record_error(f"connection lost: {conn.lost_reason}")
            log.warning("mqtt_client %s: connection lost: %s", self.name, conn.lost_reason)

    def _connect_packet(self) -> Connect:
        cfg = self.config
        props = Properties()
        if self._level == MQTT_5:
            props.session_expiry_interval = int(cfg.session_expiry)
            props.receive_maximum = cfg.receive_maximum
            props.maximum_packet_size = cfg.max_packet_size
        return Connect(
            self._level,
            self.client_id,
            clean_start=False,
            keepalive=cfg.keepalive,
            username=cfg.username,
            password=cfg.password.encode() if cfg.password is not None else None,
            properties=props,
        )

    def _ssl_context(self) -> ssl.SSLContext:
        tls = self.config.tls
        ctx = ssl.create_default_context(cafile=str(tls.ca) if tls and tls.ca else None)
        if tls is not None and tls.cert is not None and tls.key is not None:
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        return ctx

    async def _subscribe(self, conn: _Connection) -> None:
        subs = [
            Subscription(f, qos=r.config.qos)
            for f, r in zip(self.subscription_filters, self.routes, strict=True)
        ]
        if self._rpc_topic is not None:
            subs.append(Subscription(self._rpc_topic, qos=1))
        fut: asyncio.Future[SubAck] = asyncio.get_running_loop().create_future()
        conn.suback[1] = fut
        conn.send(encode(Subscribe(1, subs), self._level))
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                suback = await fut
        except TimeoutError:
            raise ConnectionError(f"no SUBACK within {CONNECT_TIMEOUT:.0f}s") from None
        for f, rc in zip(self.subscription_filters, suback.reason_codes, strict=False):
            if rc >= 0x80:
                raise ConnectionError(f"broker refused subscription {f!r}: 0x{rc:02x}")

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.state.connected = False
        if conn is None:
            return
        # Messages still waiting for the ingest are not acknowledged on this connection;
        # the broker redelivers them on the next one.
        conn.pending.clear()
        await conn.close()

    # ------------------------------------------------------------------ packets

    def _received(self, conn: _Connection, packets: list[Packet]) -> None:
        """Act on the packets of one read. With a batchable ingest the readings of
        all its messages go in one submit (one future, one done-callback)."""
        if self._conn is not conn:
            return  # a connection we already closed: the broker redelivers
        batch: list[Reading] = []
        waiting: list[_Pending] = []
        batchable = self.ingest.batchable
        for packet in packets:
            if type(packet) is Publish:
                self.messages += 1
                if packet.qos > 1 or not packet.topic:
                    # We subscribe at QoS 0/1 and announce no topic aliases.
                    conn.fail(f"broker sent QoS {packet.qos} or a topic alias")
                    return
                pending = None
                if packet.qos:
                    pending = _Pending(packet.packet_id or 0)
                    # Not checked against receive_maximum: Mosquitto 2.0 resending
                    # a session's in-flight messages after a reconnect goes over it,
                    # and what a message holds here is a few dozen bytes (its
                    # readings are the outbox's, bounded there).
                    conn.pending.append(pending)
                readings = self._decode(packet.topic, packet.payload)
                if not readings:
                    self._settle(conn, [pending] if pending else [], True)
                elif batchable:
                    batch += readings
                    if pending is not None:
                        waiting.append(pending)
                else:
                    self._submit(conn, readings, [pending] if pending else [])
            elif isinstance(packet, ConnAck):
                if not conn.connack.done():
                    conn.connack.set_result(packet)
            elif isinstance(packet, SubAck):
                fut = conn.suback.pop(packet.packet_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(packet)
            elif isinstance(packet, PubAck):
                pub = conn.puback.pop(packet.packet_id, None)
                if pub is not None and not pub.done():
                    pub.set_result(packet.reason_code)
            elif isinstance(packet, Disconnect):
                conn.fail(f"broker disconnected us: reason code 0x{packet.reason_code:02x}")
                return
            elif not isinstance(packet, PingResp):
                conn.fail(f"unexpected {type(packet).__name__} from the broker")
                return
        if batch:
            self._submit(conn, batch, waiting)

    def _submit(self, conn: _Connection, readings: list[Reading], waiting: list[_Pending]) -> None:
        future = self.ingest.submit(readings)
        n = len(readings)
        conn.hold()
        future.add_done_callback(lambda f: self._stored(conn, waiting, f, n))

    def _decode(self, topic: str, payload: bytes) -> list[Reading]:
        for route in self.routes:
            found = route.match(topic)
            if found is None:
                continue
            device_id, prefix = found
            origin = Origin("mqtt_client", address=topic, client_id=self.config.name)
            now = time.time()
            try:
                if device_id is not None:
                    device_id = check_device_id(device_id)
                    if route.commandable and device_id not in self.command_devices:
                        self._command_device(device_id, route)
                readings = route.codec.decode(payload, device_id=device_id, origin=origin, now=now)
            except DecodeError as e:
                self.decode_errors.record(self.state, device_id or topic, e.reason, e.detail)
                return []
            if device_id is None and route.commandable:
                # The codec found the ids (Sparkplug: group, node, device).
                for r in readings:
                    if r.device_id not in self.command_devices:
                        self._command_device(r.device_id, route)
            if self._receipts is not None:
                self._receipt_devices(readings, route)
            key = None
            if route.config.record_ids == "message" and identifies_message(
                readings, now, route.config.sequence_metric
            ):
                key = message_key(self.config.name, topic, payload)
            if prefix or key:
                readings = _rebuilt(readings, prefix, key, now)
            return readings
        if topic == self._rpc_topic and self._downlink is not None:
            self._downlink.rpc_response(payload)
        return []  # excluded, or a topic no route claims (overlapping broker subscriptions)

    def _stored(
        self,
        conn: _Connection,
        waiting: list[_Pending],
        future: asyncio.Future[IngestStatus],
        n: int,
    ) -> None:
        conn.release()
        if future.cancelled() or future.exception() is not None:
            # Not stored (a failed outbox commit): keep it at the broker and have it
            # redelivered. Not acknowledging it alone would block every later
            # acknowledgement (they go out in order) until the broker's in-flight
            # window is full and it sends nothing more.
            error = future.exception() if not future.cancelled() else "cancelled"
            self.state.record_error(f"ingest failed: {error}")
            self._settle(conn, waiting, False)
            self._redeliver(conn, logging.WARNING, f"ingest failed ({error!r})")  # repr: one line
            return
        status = future.result()
        if status is IngestStatus.ACCEPTED:
            self.state.record_readings(n)
            self._settle(conn, waiting, True)
        elif status is IngestStatus.REJECTED_INVALID:
            self.state.rejected += 1
            self._settle(conn, waiting, True)  # redelivering would be refused again
        else:  # REJECTED_FULL: keep it at the broker; reconnect later to have it redelivered
            self.state.rejected += 1
            self._settle(conn, waiting, False)
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

    def _settle(self, conn: _Connection, waiting: Sequence[_Pending], ack: bool) -> None:
        for pending in waiting:
            pending.ack = ack
        if self._conn is not conn:
            return
        # Acknowledge in arrival order; stop at the first message that must not be.
        queue = conn.pending
        while queue and queue[0].ack:
            conn.ack(queue.popleft().mid)
