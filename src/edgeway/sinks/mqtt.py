"""MQTT sink: forward records to a cloud MQTT broker at QoS 1.

Config example::

    sinks:
      - name: cloud-mqtt
        url: mqtts://user:secret@broker.example.com:8883
        options:
          topic: "edgeway/{gateway_id}/{device_id}/telemetry"   # the default
          mode: record            # one record per message; or batch
          protocol: "5"           # or "3.1.1"
          client_id: "edgeway-{gateway_id}-{sink}"             # the default
          ca: /etc/edgeway/cloud-ca.pem
          cert: /etc/edgeway/gw1.crt
          key: /etc/edgeway/gw1.key

      - name: aws
        url: mqtts://abc123-ats.iot.eu-west-1.amazonaws.com
        options: {preset: aws_iot, thing_name: gw1, ca: AmazonRootCA1.pem,
                  cert: gw1.pem.crt, key: gw1-private.pem.key}

What it does:

- **QoS 1, confirmed batches.** Every record (``mode: record``) or every
  per-device group of records (``mode: batch``) is one PUBLISH at QoS 1. The
  publishes of a batch are pipelined (up to ``max_inflight`` unacknowledged,
  lowered to the broker's MQTT 5 Receive Maximum) and :meth:`MqttSink.send_batch`
  returns only when every PUBACK has arrived, so the outbox cursor advances only
  over what the broker has taken. An MQTT 5 PUBACK with a failure reason code
  (>= 0x80) fails the batch.
- **Persistent session.** Clean start off and a session expiry (MQTT 5;
  clean session off for 3.1.1), under a stable client id, so the broker keeps
  the session across reconnects.
- **Reconnects forever, on the runner's schedule.** A lost connection fails
  the batch in flight with :class:`RetryableSinkError`; the next
  ``send_batch`` (after the runner's backoff) opens a new connection and the
  whole batch is published again with the same record ids. Duplicates are
  possible (at least once), losses are not.
- ``mode: batch`` sends one message **per device per batch**, body
  ``{"gateway_id": ..., "records": [...]}`` (the HTTP sink's body), split when
  it would exceed ``max_message_bytes``. Per device rather than per batch so
  the topic template's ``{device_id}`` keeps its meaning and per-topic cloud
  rules still work; it is the mode for clouds that meter or throttle per
  message (AWS IoT Core: 100 publishes/s per connection).
- ``preset: aws_iot`` / ``preset: azure_iot_hub`` set the conventions of those
  clouds (docs/sinks/mqtt.md).

Why gmqtt: it is asyncio-native and the fastest Python client measured on
this machine (QoS 1: gmqtt 52k msg/s, paho-mqtt 18k, aiomqtt 4k; see
shared/MEASUREMENTS.md), does MQTT 5 and TLS client certificates, and is
already a core dependency. It does the connection: TCP/TLS, CONNECT/CONNACK
with properties and auth, keep-alive, parsing incoming packets. Four of its
behaviours are replaced here:

- its reconnect loop: one gmqtt client is used per network connection, so a
  stale client can never reconnect behind our back with the same client id
  and take over the session;
- its in-memory replay store: we resend from the outbox, which survives
  restarts; a second copy in memory would only double the duplicates;
- its PUBLISH path, one ``send()`` system call per message: the sink encodes
  the QoS 1 PUBLISH packets of a window itself (a dozen bytes of header) and
  writes them at once, which more than doubled throughput;
- its PUBACK handler, which ignores MQTT 5 reason codes and logs twice per
  packet: ours reads the code and costs a third less CPU.

The last three touch gmqtt 0.8 internals (``storage.PersistentStorage``,
``Client._connection``, ``_package_handler._handle_puback_packet``), hence
the ``<0.9`` pin in pyproject.toml; the tests against Mosquitto cover them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import ssl
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from gmqtt import Client as _GmqttClient
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.storage import PersistentStorage as _GmqttStorage
from pydantic import BeforeValidator, ConfigDict, Field

from edgeway.commands.cloud import REQUEST_MAX_BYTES
from edgeway.config_types import Duration, Size
from edgeway.quickack import TCP_QUICKACK, quickack_socket
from edgeway.sinks.base import (
    BatchOptions,
    CommandSource,
    PermanentSinkError,
    Record,
    RetryableSinkError,
    Sink,
    SinkOptionsError,
    SinkSideTask,
    client_ssl_context,
    register_sink,
)
from edgeway.sinks.config import SinkConfig
from edgeway.south.mqtt.codec import validate_topic_filter, validate_topic_name
from edgeway.south.mqtt.packets import ProtocolError

if TYPE_CHECKING:
    from edgeway.commands.service import CommandService

logger = logging.getLogger(__name__)

_AZURE_API_VERSION = "2021-04-12"

# MQTT 5 PUBACK reason codes that will fail the same way on every retry
# (MQTT 5.0 section 3.4.2.1): the batch is dead-lettered instead of blocking.
_PERMANENT_PUBACK_CODES = {
    0x87: "not authorized",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x99: "payload format invalid",
}

# Topic strings per device are cached because formatting the template per
# record costs more than the publish itself; capped because device ids come
# from the field and a gateway that sees churning ids must not grow forever.
_TOPIC_CACHE_MAX = 100_000
_H = struct.Struct(">H")
_AUTO_INFLIGHT = 80
"""``connections: auto``: publishes in flight to aim for (see :meth:`MqttSink._auto_connections`)."""
_AUTO_INFLIGHT_BEHIND = 320
"""``connections: auto``: publishes in flight to aim for while the sink is behind."""
_AUTO_BEHIND_MESSAGES = 500
"""``connections: auto``: a batch of at least this many messages means the sink is behind."""
_AUTO_CONNECTIONS_MAX = 16
# Seconds a graceful DISCONNECT may take before the socket is aborted.
_CLOSE_TIMEOUT = 2.0


def _protocol_str(value: Any) -> Any:
    """YAML turns ``protocol: 5`` into an int and ``5.0`` into a float."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {5: "5", 3.1: "3.1.1"}.get(value, str(value))
    return value


class MqttSinkOptions(BatchOptions):
    """The ``options`` of an ``mqtt://`` / ``mqtts://`` sink."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["aws_iot", "azure_iot_hub"] | None = None
    """Conventions of a cloud broker; explicit options still win."""
    topic: str | None = None
    """Template with ``{gateway_id}``, ``{device_id}``, ``{sink}``; default
    ``edgeway/{gateway_id}/{device_id}/telemetry`` (or the preset's)."""
    mode: Literal["record", "batch"] | None = None
    """``record``: one message per record (default). ``batch``: one per device per batch."""
    client_id: str | None = None
    """Template with ``{gateway_id}`` and ``{sink}``; default ``edgeway-{gateway_id}-{sink}``."""
    protocol: Annotated[Literal["5", "3.1.1"] | None, BeforeValidator(_protocol_str)] = None
    """MQTT version, ``"5"`` or ``"3.1.1"`` (none: the preset's, else 5)."""
    username: str | None = None
    """User name for the broker (``azure_iot_hub`` makes its own)."""
    password: str | None = None
    """Password for ``username``."""
    ca: Path | None = None
    """CA bundle to verify the broker (default: the system's CAs)."""
    cert: Path | None = None
    """Client certificate (PEM) for mutual TLS."""
    key: Path | None = None
    """Private key of ``cert`` (PEM)."""
    key_password: str | None = None
    """Password of an encrypted ``key``."""
    session_expiry: Duration = 86400.0
    """MQTT 5 session expiry. A day rides out a long outage; the broker frees
    the session after it (AWS IoT caps it at one hour by default)."""
    keepalive: int = Field(default=60, ge=5, le=65535)
    """MQTT keep alive (seconds) sent in CONNECT."""
    connect_timeout: Duration = 10.0
    """Longest wait for TCP, TLS and CONNACK; then the batch is retried with backoff."""
    ack_timeout: Duration = 30.0
    """A batch whose PUBACKs have not all arrived after this long fails and the
    connection is dropped: a broker that stopped answering must not hang the sink."""
    max_inflight: int = Field(default=1000, ge=1, le=65534)
    """Unacknowledged publishes at once (lowered to the broker's Receive
    Maximum). Enough to keep a WAN link busy; bounded so a slow broker holds
    at most this many packets of ours."""
    connections: Annotated[int, Field(ge=1, le=16)] | Literal["auto"] = "auto"
    """Connections to the broker, each with its own in-flight window; each
    batch is shared out a device at a time (so one device's records keep
    their order on one connection). ``auto``: one, and up to four when the
    broker's MQTT 5 Receive Maximum allows fewer than 80 unacknowledged
    publishes per connection (Mosquitto's default: 20), so that about 80 are
    in flight; while the sink is behind (batches of 500 messages or more),
    up to 16, about 320 in flight (opened then, left idle once caught up); an
    extra connection the broker refuses is done without. Client ids after
    the first get ``-1``, ``-2``, ... appended. The cloud presets (one
    connection per identity) use 1 and refuse more."""
    max_records: int = Field(default=2000, ge=1, le=100_000)
    """Records per batch. A batch keeps the window full (refilled as PUBACKs
    come) and then waits for its last PUBACKs, during which the broker works
    and this sink does not; two windows per batch halve those waits. Measured
    with bench/end_to_end.py's fixed W1, alternating runs: 500 -> 1,000 gave
    10-20% more records/s at 10% less CPU per record; 1,000 -> 2,000 (2026-12-03)
    68,700 -> 76,200 records/s and 0.0106 -> 0.0097 CPU-s/1k; 3,000 gave
    nothing more."""
    max_message_bytes: Size = 256 * 1024
    """Largest payload we send. ``batch`` mode splits below it; a single record
    above it is refused (dead-lettered). Azure IoT Hub's limit is 256 KiB,
    AWS IoT Core's 128 KiB."""
    thing_name: str | None = None
    """``aws_iot``: the AWS IoT thing name, used as client id (default: gateway id)."""
    azure_device_id: str | None = None
    """``azure_iot_hub``: the IoT Hub device identity of this gateway (default: gateway id)."""
    sas_key: str | None = None
    """``azure_iot_hub``: the device's base64 shared access key; a fresh SAS
    token is made at every connect (instead of a fixed ``password``)."""
    sas_ttl: Duration = 3600.0
    """Lifetime of each generated SAS token; IoT Hub closes the connection when
    it expires and we reconnect with a new one."""
    commands: bool = False
    """Take commands for devices from the cloud by subscribing to
    ``commands_topic`` on this broker (its own connection; docs/commands.md).
    Off by default: a sink only publishes unless asked to take orders."""
    commands_topic: str = "edgeway/{gateway_id}/commands/#"
    """Topic filter of the cloud's requests (placeholders ``{gateway_id}``,
    ``{sink}``). With a trailing ``/#``, the levels after the prefix may name
    the device and the command: ``.../commands/{device_id}/{name}``."""
    commands_answers_topic: str = "edgeway/{gateway_id}/commands/answers"
    """Where answers go when a request has no MQTT 5 response topic
    (placeholders ``{gateway_id}``, ``{sink}``); never taken as a request."""
    status_topic: str | None = None
    """Where the gateway's birth and death are kept, retained, with a will
    (placeholders ``{gateway_id}``, ``{sink}``; e.g. ``edgeway/{gateway_id}/status``),
    on a connection of its own; see :mod:`edgeway.sinks.mqtt_presence`. None: off."""
    commands_max_inflight: int = Field(default=16, ge=1, le=65535)
    """Requests being stored at once (the MQTT 5 Receive Maximum we announce,
    so the broker holds the rest): each costs a database commit, so more
    would only queue in memory. MQTT 3.1.1 has no such limit: the broker's
    own in-flight limit applies (Mosquitto: 20)."""


def azure_sas_token(resource_uri: str, key_b64: str, expiry: int) -> str:
    """An Azure IoT Hub shared access signature for ``resource_uri`` until ``expiry``.

    ``resource_uri`` is ``{hub}.azure-devices.net/devices/{device_id}``; the
    algorithm is Azure's (HMAC-SHA256 of the URL-encoded URI and the expiry).
    """
    uri = urllib.parse.quote(resource_uri, safe="")
    signed = hmac.new(
        base64.b64decode(key_b64), f"{uri}\n{expiry}".encode(), hashlib.sha256
    ).digest()
    sig = urllib.parse.quote(base64.b64encode(signed).decode(), safe="")
    return f"SharedAccessSignature sr={uri}&sig={sig}&se={expiry}"


class _NoReconnectClient(_GmqttClient):  # type: ignore[misc]
    """A gmqtt client that never reconnects on its own (see module docstring)."""

    async def reconnect(self, delay: bool = False) -> None:
        return None


class _AckWindow(_GmqttStorage):  # type: ignore[misc]
    """Tracks this connection's unacknowledged publishes and refills the window.

    :class:`_Connection` adds each packet id it writes to ``inflight``; a
    PUBACK removes it (through :func:`_bulk_pubacks` or
    :func:`_take_over_pubacks`) and calls ``refill``, which writes the next
    publishes of the batch right there, in the callback that read the PUBACKs
    (a sliding window: no task wake-up between a PUBACK and the PUBLISH that
    takes its slot). It is also plugged into gmqtt as its "persistent
    storage" (the same method names), keeping no packets, so gmqtt never
    replays anything: the outbox does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inflight: set[int] = set()
        self.refused: list[int] = []
        self.error: BaseException | None = None
        self.refill: Callable[[], None] | None = None
        """Set while a batch has publishes not yet written (see :meth:`_Connection.publish_all`)."""
        self.writes = 0
        """Writes so far (a read that caused none must ACK on its own)."""
        self._waiter: asyncio.Future[None] | None = None

    def push_message(self, mid: int, raw_package: bytes) -> None:
        self.inflight.add(mid)

    def remove_message_by_mid(self, mid: int) -> None:
        self.inflight.discard(mid)
        self._acked()

    def ack_many(self, mids: Sequence[int]) -> None:
        """Successful PUBACKs for ``mids`` (one read's worth, see :func:`_bulk_pubacks`)."""
        self.inflight.difference_update(mids)
        self._acked()

    def _acked(self) -> None:
        if self.refill is not None:
            self.refill()
        w = self._waiter
        if w is not None and not self.inflight and self.refill is None and not w.done():
            w.set_result(None)

    def clear(self) -> None:
        # Called on a CONNACK without a session: nothing of ours is in flight then.
        if self.inflight:
            self.fail(RetryableSinkError("broker dropped the session"))

    def get_all(self) -> list[tuple[int, bytes]]:
        return []

    def fail(self, error: BaseException) -> None:
        """The connection is gone: whatever is in flight will never be acknowledged."""
        if self.error is None:
            self.error = error
        self.refill = None
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_done(self) -> None:
        """Return once every publish of the batch is written and acknowledged;
        raise if the connection is lost before (acks that all arrived count,
        even if the connection dropped right after)."""
        while self.inflight or self.refill is not None:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


def _varint(n: int) -> bytes:
    """MQTT Variable Byte Integer (remaining length)."""
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


_PUBLISH_HEADERS: dict[int, bytes] = {}
"""QoS 1 PUBLISH fixed header (type byte and remaining length) by remaining
length: records of one device are about the same size, so a batch needs a
handful of them; bounded by clearing (see :func:`_publish_header`)."""


def _publish_header(remaining: int) -> bytes:
    h = _PUBLISH_HEADERS.get(remaining)
    if h is None:
        if len(_PUBLISH_HEADERS) >= 4096:
            _PUBLISH_HEADERS.clear()
        h = _PUBLISH_HEADERS[remaining] = b"\x32" + _varint(remaining)
    return h


class _Feed:
    """One batch's messages for several connections: grouped per topic (so per
    device, whose order MQTT keeps only on one connection) and taken a whole
    group at a time by whichever connection has room, largest first, so the
    connections finish together (a fixed split by hash left some idle while
    the slowest finished; see docs/sinks/mqtt.md)."""

    __slots__ = ("groups", "messages")

    def __init__(self, messages: Sequence[tuple[bytes, bytes]]) -> None:
        self.messages = messages
        by_topic: dict[bytes, list[tuple[bytes, bytes]]] = {}
        for m in messages:
            group = by_topic.get(m[0])
            if group is None:
                by_topic[m[0]] = [m]
            else:
                group.append(m)
        # pop() takes from the end: smallest first in the list.
        self.groups = sorted(by_topic.values(), key=len)


class _Connection:
    """One network connection to the broker: a gmqtt client and its ack window.

    gmqtt connects, keeps the connection alive and splits incoming packets;
    the PUBLISH packets of a batch are encoded here and written in one
    ``transport.write`` per window instead of one per message, which more than
    doubles throughput (a ``send()`` system call per message was half of the
    CPU time). Packet ids are allocated here (gmqtt's allocator is not used)
    and PUBACKs go straight to :class:`_AckWindow`.
    """

    def __init__(
        self,
        client: _NoReconnectClient,
        window: _AckWindow,
        max_inflight: int,
        v5: bool,
        max_packet_size: int | None = None,
    ) -> None:
        self.client = client
        self.window = window
        self.max_inflight = max_inflight
        # QoS 1 PUBLISH variable header tail: v5 adds an empty property list.
        self._props = b"\x00" if v5 else b""
        self._next_mid = 0
        self.max_packet_size = max_packet_size
        """The broker's MQTT 5 Maximum Packet Size, if it announced one."""
        self._queue: Sequence[tuple[bytes, bytes]] = ()
        """The batch being published; ``_sent`` of it are written."""
        self._sent = 0
        self._feed: _Feed | None = None
        self._published = 0
        self._refill_min = max_inflight - max_inflight // 2
        """Free slots worth a write: refilling from half-empty rather than at
        every PUBACK makes fewer, larger writes (and fewer packets for the
        broker to read) at the same throughput (bench/results)."""
        self.quickack_socket: socket.socket | None = None
        """Our duplicate of the socket's descriptor (see :func:`_bulk_pubacks`)."""

    @property
    def usable(self) -> bool:
        return self.window.error is None and bool(self.client.is_connected)

    def _check_sizes(self, messages: Sequence[tuple[bytes, bytes]]) -> None:
        """A broker disconnects a client that sends a packet larger than its
        Maximum Packet Size (MQTT-3.2.2-15): refuse the batch before writing any of it."""
        if self.max_packet_size is None:
            return
        overhead = 1 + 4 + 2 + len(self._props)  # header, length, packet id, properties
        for topic, payload in messages:
            size = overhead + len(topic) + len(payload)
            if size > self.max_packet_size:
                raise PermanentSinkError(
                    f"a {size}-byte PUBLISH exceeds the broker's maximum packet size "
                    f"{self.max_packet_size}"
                )

    async def publish_all(self, work: Sequence[tuple[bytes, bytes]] | _Feed) -> None:
        """Publish at QoS 1, pipelined, and return when every PUBACK is in.

        ``work``: (length-prefixed topic, payload) pairs, or a :class:`_Feed`
        shared with other connections that this one takes whole devices'
        messages from. The first window is written here; the rest by
        :meth:`_refill`, called where the PUBACKs are read, as slots free up.
        """
        window = self.window
        window.refused.clear()
        if isinstance(work, _Feed):
            feed: _Feed | None = work
            self._check_sizes(work.messages)
            self._queue = ()
        else:
            feed = None
            self._check_sizes(work)
            self._queue = work
        if not self.usable:
            window.fail(RetryableSinkError("connection to the broker lost"))
            raise window.error  # type: ignore[misc]
        self._sent = 0
        self._published = 0
        self._feed = feed
        window.refill = self._refill
        try:
            self._refill()
            await window.wait_done()
        except BaseException:
            if feed is not None:
                feed.groups.clear()  # the batch failed: the others can stop
            raise
        finally:
            window.refill = None
            self._queue = ()
            self._feed = None
        if window.refused:
            codes = sorted(set(window.refused))
            text = ", ".join(
                f"0x{c:02x} {_PERMANENT_PUBACK_CODES.get(c, '')}".strip() for c in codes
            )
            msg = f"broker refused {len(window.refused)} of {self._published} messages: {text}"
            if all(c in _PERMANENT_PUBACK_CODES for c in codes):
                raise PermanentSinkError(msg)
            raise RetryableSinkError(msg)

    def _refill(self) -> None:
        """Write the batch's next publishes into the free slots of the window,
        in one write; when none are left, tell the window (``refill = None``).

        Runs in the protocol callback that read the PUBACKs, so it must not
        raise: a lost connection fails the window instead.
        """
        window = self.window
        inflight = window.inflight
        free = self.max_inflight - len(inflight)
        queue, start = self._queue, self._sent
        left = len(queue) - start
        feed = self._feed
        more = feed is not None and bool(feed.groups)
        if free < (self._refill_min if more else min(self._refill_min, left)):
            return  # wait for a few more slots: fewer, larger writes
        props = self._props
        pack_h = _H.pack
        headers = _PUBLISH_HEADERS
        fixed = 2 + len(props)  # packet id and properties
        mid = self._next_mid
        chunks: list[bytes] = []
        append = chunks.append
        add = inflight.add
        while free:
            if left == 0:
                if feed is None or not feed.groups:
                    break
                # The next device's messages, all on this connection (its order).
                queue, start = feed.groups.pop(), 0
                left = len(queue)
            end = start + min(free, left)
            for i in range(start, end):
                topic, payload = queue[i]
                # Packet ids 1..65535; skip ids still in flight (possible only
                # after wrap-around with a window close to 65535).
                mid = mid % 65535 + 1
                while mid in inflight:
                    mid = mid % 65535 + 1
                add(mid)
                remaining = len(topic) + fixed + len(payload)
                append(headers.get(remaining) or _publish_header(remaining))
                append(topic)
                append(pack_h(mid) + props if props else pack_h(mid))
                append(payload)
            free -= end - start
            left -= end - start
            self._published += end - start
            start = end
        self._queue, self._sent = queue, start
        self._next_mid = mid
        if left == 0 and (feed is None or not feed.groups):
            window.refill = None
        if not chunks:
            return
        if not self.usable:
            window.fail(RetryableSinkError("connection to the broker lost"))
            return
        window.writes += 1
        self.client._connection.send_package(b"".join(chunks))

    async def close(self) -> None:
        """Send DISCONNECT and close; abort the socket if that does not finish.

        A graceful close waits for the send buffer to drain, which never
        happens on a link that went silent (a cut cable, a NAT that forgot
        us), so it is bounded.
        """
        if self.quickack_socket is not None:
            self.quickack_socket.close()
            self.quickack_socket = None
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.client.disconnect()
        except Exception as e:  # already gone, or stuck: drop the socket
            logger.debug("disconnect failed: %r", e)
            transport = getattr(getattr(self.client, "_connection", None), "_transport", None)
            if transport is not None:
                transport.abort()


@register_sink
class MqttSink(Sink):
    """Publishes records to an MQTT broker at QoS 1 (see the module docstring).

    The sink keeps ``state.connected`` current; the runner records successes,
    errors and batch latency in ``state``.
    """

    schemes = ("mqtt", "mqtts")
    options_model = MqttSinkOptions
    options: MqttSinkOptions

    def __init__(self, config: SinkConfig, gateway_id: str) -> None:
        super().__init__(config, gateway_id)
        opts = self.options
        url = urllib.parse.urlsplit(config.url)
        tls = url.scheme.lower() == "mqtts"
        if not url.hostname:
            raise SinkOptionsError.at("url", f"no host in {config.url!r}")
        self.host = url.hostname
        try:
            port = url.port
        except ValueError:
            raise SinkOptionsError.at("url", f"bad port in {config.url!r}") from None
        self.port = port or (8883 if tls else 1883)

        topic = opts.topic
        mode = opts.mode
        protocol = opts.protocol
        client_id = opts.client_id
        username = opts.username or (urllib.parse.unquote(url.username) if url.username else None)
        password = opts.password or (urllib.parse.unquote(url.password) if url.password else None)
        session_expiry = opts.session_expiry
        max_message_bytes = opts.max_message_bytes
        self._sas: tuple[str, str] | None = None

        if opts.preset is not None and not tls:
            raise SinkOptionsError.at("options.preset", f"{opts.preset} needs an mqtts:// url")
        if opts.preset == "aws_iot":
            # AWS IoT Core: X.509 client certificate, client id = thing name,
            # topics per its "dt/<app>/<context>/<thing>/<type>" guidance,
            # 100 publishes/s per connection and 128 KiB per message.
            if opts.cert is None or opts.key is None:
                raise SinkOptionsError.at(
                    "options.cert", "aws_iot needs cert and key (the thing's X.509 certificate)"
                )
            thing = opts.thing_name or gateway_id
            client_id = client_id or thing.replace("{", "{{").replace("}", "}}")
            topic = topic or "dt/edgeway/{gateway_id}/{device_id}/telemetry"
            mode = mode or "batch"
            protocol = protocol or "5"
            if "session_expiry" not in opts.model_fields_set:
                session_expiry = 3600.0  # AWS IoT's default maximum
            if "max_message_bytes" not in opts.model_fields_set:
                max_message_bytes = 128 * 1024
        elif opts.preset == "azure_iot_hub":
            # Azure IoT Hub: MQTT 3.1.1, client id = device id, username
            # "{hub}.azure-devices.net/{device}/?api-version=...", a SAS token
            # (or an X.509 certificate) as password, and the one telemetry
            # topic "devices/{device}/messages/events/".
            dev = opts.azure_device_id or gateway_id
            esc = dev.replace("{", "{{").replace("}", "}}")
            client_id = client_id or esc
            username = username or f"{self.host}/{dev}/?api-version={_AZURE_API_VERSION}"
            topic = topic or f"devices/{esc}/messages/events/"
            mode = mode or "batch"
            protocol = protocol or "3.1.1"
            if opts.sas_key is not None:
                try:
                    base64.b64decode(opts.sas_key, validate=True)
                except ValueError:
                    raise SinkOptionsError.at("options.sas_key", "not base64") from None
                self._sas = (f"{self.host}/devices/{dev}", opts.sas_key)
            elif password is None and opts.cert is None:
                raise SinkOptionsError.at(
                    "options.sas_key",
                    "azure_iot_hub needs sas_key, password (a SAS token) or cert/key",
                )
        elif opts.sas_key is not None:
            raise SinkOptionsError.at("options.sas_key", "only for azure_iot_hub")

        self.topic_template = topic or "edgeway/{gateway_id}/{device_id}/telemetry"
        self.mode: Literal["record", "batch"] = mode or "record"
        self.protocol = MQTTv311 if protocol == "3.1.1" else MQTTv50
        self.username = username
        self.password = password
        self.session_expiry = int(session_expiry)
        self.max_message_bytes = max_message_bytes
        try:
            self.topic_template.format(gateway_id="g", device_id="d", sink="s")
        except (KeyError, IndexError, ValueError) as e:
            raise SinkOptionsError.at(
                "options.topic",
                f"bad template {self.topic_template!r} "
                f"(placeholders: gateway_id, device_id, sink): {e}",
            ) from None
        try:
            self.client_id = (client_id or "edgeway-{gateway_id}-{sink}").format(
                gateway_id=gateway_id, sink=self.name
            )
        except (KeyError, IndexError, ValueError) as e:
            raise SinkOptionsError.at(
                "options.client_id", f"bad template (placeholders: gateway_id, sink): {e}"
            ) from None
        self.commands_topic: str | None = None
        self.commands_answers_topic = ""
        if opts.commands:
            self.commands_topic = self._command_topic("commands_topic", True)
            self.commands_answers_topic = self._command_topic("commands_answers_topic", False)
        self.status_topic = (
            self._command_topic("status_topic", False) if opts.status_topic is not None else None
        )
        self.ssl_context = self._make_ssl_context(tls, opts)
        self._topics: dict[str, bytes] = {}
        n = opts.connections
        if opts.preset is not None and n != "auto" and n > 1:
            raise SinkOptionsError.at(
                "options.connections", f"{opts.preset} allows one connection per identity"
            )
        self._auto = n == "auto" and opts.preset is None
        """``connections: auto`` (see :meth:`_auto_connections`)."""
        size = _AUTO_CONNECTIONS_MAX if self._auto else 1 if n == "auto" else n
        self._conns: list[_Connection | None] = [None] * size
        self._locks = [asyncio.Lock() for _ in range(size)]
        self._busy = [0] * size
        """Batches using each connection (taken when a batch is shared out,
        before its publishes wait for the connection's lock)."""
        self._active = 1 if self._auto else size
        """Connections a batch is shared out to."""
        self._active_behind = self._active
        """Connections a batch is shared out to while the sink is behind."""

    def _command_topic(self, key: str, is_filter: bool) -> str:
        """Option ``key`` formatted; a topic filter when ``is_filter``, else a topic name."""
        template: str = getattr(self.options, key)
        try:
            topic = template.format(gateway_id=self.gateway_id, sink=self.name)
        except (KeyError, IndexError, ValueError) as e:
            raise SinkOptionsError.at(
                f"options.{key}", f"bad template {template!r} (placeholders: gateway_id, sink): {e}"
            ) from None
        try:
            (validate_topic_filter if is_filter else validate_topic_name)(topic)
        except ProtocolError:
            raise SinkOptionsError.at(f"options.{key}", f"invalid MQTT topic {topic!r}") from None
        return topic

    def credentials(self) -> tuple[str | None, str | None]:
        """User name and password for a CONNECT (a fresh SAS token for Azure)."""
        username, password = self.username, self.password
        if self._sas is not None:
            resource, key = self._sas
            password = azure_sas_token(resource, key, int(time.time() + self.options.sas_ttl))
        return username, password

    def _make_ssl_context(self, tls: bool, opts: MqttSinkOptions) -> ssl.SSLContext | None:
        return client_ssl_context(
            opts.ca, opts.cert, opts.key, opts.key_password, enabled=tls, scheme="mqtts"
        )

    # -- encoding ---------------------------------------------------------

    def _topic(self, device_id: str) -> bytes:
        t = self._topics.get(device_id)
        if t is None:
            if len(self._topics) >= _TOPIC_CACHE_MAX:
                self._topics.clear()
            raw = self.topic_template.format(
                gateway_id=self.gateway_id, device_id=device_id, sink=self.name
            ).encode()
            if not raw or len(raw) > 65535 or b"+" in raw or b"#" in raw:
                raise PermanentSinkError(f"invalid topic {raw[:100]!r} for device {device_id!r}")
            t = _H.pack(len(raw)) + raw
            self._topics[device_id] = t
        return t

    def encode(self, records: Sequence[Record]) -> list[tuple[bytes, bytes]]:
        """The (length-prefixed topic, payload) messages for ``records`` in this sink's mode."""
        dumps = orjson.dumps
        limit = self.max_message_bytes
        if self.mode == "record":
            # Once per record: the topic cache and the stored text read inline.
            topics, make_topic = self._topics, self._topic
            out = [
                (topics.get(r.device_id) or make_topic(r.device_id), r.json or r.to_json_bytes())
                for r in records
            ]
            for _, payload in out:
                if len(payload) > limit:
                    raise PermanentSinkError(
                        f"a record of {len(payload)} bytes exceeds max_message_bytes={limit}"
                    )
            return out
        by_device: dict[str, list[bytes]] = {}
        for r in records:
            by_device.setdefault(r.device_id, []).append(r.to_json_bytes())
        head = b'{"gateway_id":' + dumps(self.gateway_id) + b',"records":['
        messages: list[tuple[bytes, bytes]] = []
        for device_id, items in by_device.items():
            topic = self._topic(device_id)
            part: list[bytes] = []
            size = len(head) + 2
            for item in items:
                if len(head) + 2 + len(item) > limit:
                    raise PermanentSinkError(
                        f"a record of {len(item)} bytes exceeds max_message_bytes={limit}"
                    )
                if part and size + len(item) + 1 > limit:
                    messages.append((topic, head + b",".join(part) + b"]}"))
                    part, size = [], len(head) + 2
                part.append(item)
                size += len(item) + 1
            messages.append((topic, head + b",".join(part) + b"]}"))
        return messages

    # -- connection -------------------------------------------------------

    def _client_id(self, i: int) -> str:
        return self.client_id if i == 0 else f"{self.client_id}-{i}"

    async def _connect(self, i: int = 0) -> _Connection:
        window = _AckWindow()
        props: dict[str, Any] = {}
        if self.protocol == MQTTv50:
            props["session_expiry_interval"] = self.session_expiry
        client = _NoReconnectClient(
            self._client_id(i), clean_session=False, persistent_storage=window, **props
        )
        _take_over_pubacks(client, window)
        receive_maximum: list[int] = []
        max_packet_size: list[int] = []

        def on_connect(_c: Any, _flags: Any, _rc: Any, properties: dict[str, Any]) -> None:
            receive_maximum.extend(properties.get("receive_maximum") or [])
            max_packet_size.extend(properties.get("maximum_packet_size") or [])

        lost = asyncio.Event()

        def on_disconnect(_c: Any, _packet: Any, _exc: Any = None) -> None:
            window.fail(RetryableSinkError("connection to the broker lost"))
            self.state.connected = False
            lost.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        username, password = self.credentials()
        if username is not None:
            client.set_auth_credentials(username, password)
        connecting = asyncio.ensure_future(
            client.connect(
                self.host,
                self.port,
                ssl=self.ssl_context or False,
                keepalive=self.options.keepalive,
                version=self.protocol,
            )
        )
        closed = asyncio.ensure_future(lost.wait())
        try:
            # gmqtt waits for CONNACK even when the broker closed the connection
            # first (a refused TLS client certificate shows up after the
            # handshake with TLS 1.3), so a close ends the wait too.
            async with asyncio.timeout(self.options.connect_timeout):
                await asyncio.wait({connecting, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                raise ConnectionError("connection closed before CONNACK")
            connecting.result()
        except BaseException:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            await _Connection(client, window, 1, False).close()
            raise
        finally:
            closed.cancel()
        # MQTT 5 Receive Maximum: the broker's own limit on our unacknowledged
        # QoS 1 publishes; exceeding it is a protocol error (MQTT-3.3.4-7).
        limit = self.options.max_inflight
        if receive_maximum:
            limit = max(1, min(limit, receive_maximum[0]))
        logger.info(
            "sink %s: connected to %s:%d as %s (inflight window %d)",
            self.name,
            self.host,
            self.port,
            self._client_id(i),
            limit,
        )
        conn = _Connection(
            client,
            window,
            limit,
            self.protocol == MQTTv50,
            max_packet_size[0] if max_packet_size else None,
        )
        conn.quickack_socket = _bulk_pubacks(client, window, limit, self._inflight)
        return conn

    async def _connection(self, i: int = 0) -> _Connection:
        conn = self._conns[i]
        if conn is not None and conn.usable:
            return conn
        self._conns[i] = None
        if conn is not None:
            await conn.close()
        try:
            conn = await self._connect(i)
        except TimeoutError:
            raise RetryableSinkError(
                f"no CONNACK from {self.host}:{self.port} within {self.options.connect_timeout}s"
            ) from None
        except (OSError, ssl.SSLError) as e:
            raise RetryableSinkError(f"cannot connect to {self.host}:{self.port}: {e}") from e
        except Exception as e:  # gmqtt's MQTTConnectError: refused CONNACK
            raise RetryableSinkError(f"broker {self.host}:{self.port} refused: {e}") from e
        self._conns[i] = conn
        if i == 0 and self._auto:
            self._auto_connections(conn.max_inflight)
        return conn

    def _inflight(self) -> int:
        """Publishes of this sink not acknowledged yet, on all its connections."""
        return sum(len(c.window.inflight) for c in self._conns if c is not None)

    def _auto_connections(self, window: int) -> None:
        """``connections: auto``: as many connections as bring the publishes in
        flight to about :data:`_AUTO_INFLIGHT`, given the window the broker
        granted the first one (decided again at each of its connects).

        With a window of 20 (Mosquitto's default Receive Maximum) a single
        connection waits for a round trip through the broker every 20
        publishes, and while the gateway's event loop is busy taking readings
        in, every turn of the loop moves at most 20 records out; four
        connections move 80 (bench/results/end_to_end-2026-12-07-mqtt5.md).
        While the sink is behind (a batch of :data:`_AUTO_BEHIND_MESSAGES`
        or more) it aims for :data:`_AUTO_INFLIGHT_BEHIND` instead (16
        connections of 20): the extra ones are opened by the first such batch
        and stay open, idle, once it has caught up
        (bench/results/end_to_end-2026-12-07-connections.md).
        """
        n = min(len(self._conns), -(-_AUTO_INFLIGHT // window))
        behind = min(len(self._conns), -(-_AUTO_INFLIGHT_BEHIND // window))
        if (n, behind) != (self._active, self._active_behind):
            logger.info(
                "sink %s: the broker allows %d unacknowledged publishes per connection: "
                "using %d connection%s (%d while behind)",
                self.name,
                window,
                n,
                "" if n == 1 else "s",
                behind,
            )
        self._active = n
        self._active_behind = behind

    # -- Sink -------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to do: the first batch connects (so a down broker never delays start-up)."""
        logger.info(
            "sink %s: mqtt%s://%s:%d, topic %s, mode %s",
            self.name,
            "s" if self.ssl_context else "",
            self.host,
            self.port,
            self.topic_template,
            self.mode,
        )

    async def send_batch(self, records: Sequence[Record]) -> None:
        """Publish ``records`` at QoS 1; return when the broker acknowledged all of them."""
        if not records:
            return
        messages = self.encode(records)
        n = self._active_behind if len(messages) >= _AUTO_BEHIND_MESSAGES else self._active
        if n == 1:
            await self._publish_on(0, messages)
            return
        feed = _Feed(messages)
        # A batch sent while another is in flight (max_batches_in_flight)
        # takes the connections that one does not hold: it goes out now
        # instead of after that one's PUBACKs. (They hold different devices,
        # so no device's order depends on which connection carries it.)
        busy = self._busy
        use = ([i for i in range(n) if not busy[i]] or list(range(n)))[: len(feed.groups)]
        for i in use:
            busy[i] += 1
        try:
            results = await asyncio.gather(
                *(self._publish_on(i, feed) for i in use), return_exceptions=True
            )
        finally:
            for i in use:
                busy[i] -= 1
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # A permanent refusal wins (the batch would fail the same way again).
            raise next((e for e in errors if isinstance(e, PermanentSinkError)), errors[0])
        if feed.groups:
            # Every connection this batch took was an extra one the broker
            # refused (they give up their share quietly): the first one,
            # busy with another batch, takes the rest when it is free.
            await self._publish_on(0, feed)

    def max_batches_in_flight(self) -> int:
        """One per connection a batch is shared out to: a batch that leaves
        one of them free does not wait for another's PUBACKs."""
        return self._active

    async def _publish_on(self, i: int, messages: Sequence[tuple[bytes, bytes]] | _Feed) -> None:
        """Publish on connection ``i`` (one batch at a time: the ack window is
        per connection), connecting it first if needed."""
        try:
            async with self._locks[i]:
                try:
                    conn = await self._connection(i)
                except RetryableSinkError as e:
                    if i == 0 or not self._auto:
                        raise
                    # An extra connection of `auto` that the broker will not
                    # take (a connection limit, an ACL on client ids): the
                    # others take its share, now and until the first connects again.
                    if i < self._active_behind:  # once, not for each refused
                        logger.warning(
                            "sink %s: going on with %d connection%s: %s",
                            self.name,
                            i,
                            "" if i == 1 else "s",
                            e,
                        )
                    self._active = min(self._active, i)
                    self._active_behind = min(self._active_behind, i)
                    return
                self.state.connected = True
                try:
                    async with asyncio.timeout(self.options.ack_timeout):
                        await conn.publish_all(messages)
                except TimeoutError:
                    self._conns[i] = None
                    await conn.close()
                    raise RetryableSinkError(
                        f"PUBACKs missing after {self.options.ack_timeout}s; reconnecting"
                    ) from None
                except PermanentSinkError:
                    raise  # the broker answered: the connection is fine
                except BaseException as e:
                    # Lost connection, or cancelled mid-batch: PUBACKs of this
                    # batch may still be due, so the next batch starts afresh.
                    # (A refused PUBACK code alone leaves the connection usable.)
                    if not conn.usable or not isinstance(e, RetryableSinkError):
                        self._conns[i] = None
                        await conn.close()
                    raise
        except BaseException:
            if self._conns[i] is None:
                self.state.connected = False
            raise

    def command_source(self, service: CommandService) -> CommandSource | None:
        """Commands from the cloud on ``commands_topic``, when ``commands`` is on."""
        if self.commands_topic is None:
            return None
        return MqttCommandSource(self, self.commands_topic, service)

    def side_task(self) -> SinkSideTask | None:
        """The gateway's birth/death on ``status_topic``, when it is set."""
        if self.status_topic is None:
            return None
        from edgeway.sinks.mqtt_presence import MqttPresence

        return MqttPresence(self, self.status_topic)

    def probe_addresses(self) -> list[tuple[str, int]]:
        # The sink connects lazily: while it backs off there is no connection
        # whose state could be asked, so the broker's port is.
        return [(self.host, self.port)]

    async def close(self) -> None:
        """Disconnect cleanly; the broker keeps the session until it expires."""
        conns, self._conns = self._conns, [None] * len(self._conns)
        for conn in conns:
            if conn is not None:
                await conn.close()
        self.state.connected = False


async def reconnect_forever(
    session: Callable[[Any], Awaitable[None]], sink: MqttSink, what: str, on_end: Callable[[], None]
) -> None:
    """Run ``session(backoff)`` again after each end (logged), with backoff,
    until cancelled: the loop of the sink's own long-lived connections."""
    from edgeway.south.base import Backoff

    backoff = Backoff(initial=0.5, maximum=30.0)
    while True:
        try:
            await session(backoff)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("sink %s: %s: %s", sink.name, what, e)
        on_end()
        await backoff.wait()


async def connect_side_client(sink: MqttSink, client: _NoReconnectClient) -> None:
    """Connect one of the sink's own extra clients (commands, status) with its
    credentials, TLS, keep-alive and protocol, within ``connect_timeout``."""
    username, password = sink.credentials()
    if username is not None:
        client.set_auth_credentials(username, password)
    opts = sink.options
    async with asyncio.timeout(opts.connect_timeout):
        await client.connect(
            sink.host,
            sink.port,
            ssl=sink.ssl_context or False,
            keepalive=opts.keepalive,
            version=sink.protocol,
        )


_COMMANDS_PACKET_MAX = REQUEST_MAX_BYTES + 4096
"""The MQTT 5 Maximum Packet Size the downlink announces: the largest request
parsed plus room for topic and properties; a broker drops larger messages for
us (MQTT-3.1.2-25) instead of making us read them."""


class MqttCommandSource:
    """Takes cloud command requests from ``commands_topic`` and acknowledges
    each once its command is on disk (see :mod:`edgeway.commands.cloud`).

    Its own connection, apart from the publishing one (which connects only
    while there is something to send and whose packet handling is tuned for
    PUBACKs): client id ``<sink client id>-commands``, persistent session
    (clean start off, the sink's ``session_expiry``) and a QoS 1 subscription,
    so requests sent while the gateway was away are delivered when it
    returns. The PUBACK of a request is sent only after
    :func:`~edgeway.commands.cloud.accept` returned; if the command could not
    be stored the connection is dropped without it, and the broker delivers
    the request again on the next connection (the idempotency key makes that
    safe). The answer goes to the request's MQTT 5 response topic (with its
    correlation data), else to ``commands_answers_topic``.
    """

    def __init__(self, sink: MqttSink, topic: str, service: CommandService) -> None:
        self.sink = sink
        self.topic = topic
        self.service = service
        self.name = f"{sink.name}:commands"
        self.client_id = f"{sink.client_id}-commands"
        self.connected = False
        self.subscribed = asyncio.Event()
        """Set while the broker has confirmed the subscription (SUBACK)."""
        self.requests = 0
        # ".../commands/#": the levels after this prefix name device and command.
        self._prefix = topic[:-1] if topic.endswith("/#") else None
        self._source = f"cloud:{sink.name}"

    def _address(self, topic: str) -> tuple[str | None, str | None] | None:
        """Device id and command name carried by ``topic``; None if it has too many levels."""
        if self._prefix is None or not topic.startswith(self._prefix):
            return None, None
        rest = topic[len(self._prefix) :]
        levels = rest.split("/") if rest else []
        if len(levels) > 2:
            return None
        return (levels[0] if levels else None), (levels[1] if len(levels) > 1 else None)

    async def handle(
        self, client: Any, topic: str, payload: bytes, properties: dict[str, Any]
    ) -> None:
        """Store one request and publish its answer; raises if it was not stored."""
        from edgeway.commands.cloud import accept

        if topic == self.sink.commands_answers_topic:
            return  # our own answers, when the filter covers them (MQTT 3.1.1)
        self.requests += 1
        address = self._address(topic)
        if address is None:
            answer: dict[str, Any] = {
                "error": "invalid",
                "message": "topic has more than two levels after the commands prefix",
            }
        else:
            answer = await accept(
                self.service, payload, self._source, device_id=address[0], name=address[1]
            )
        reply = (properties.get("response_topic") or [None])[0]
        if not isinstance(reply, str) or not reply or "+" in reply or "#" in reply:
            # No (usable) response topic: a wildcard in a PUBLISH topic would
            # make the broker drop our connection (MQTT-3.3.2-2).
            reply = self.sink.commands_answers_topic
        extra: dict[str, Any] = {}
        correlation = (properties.get("correlation_data") or [None])[0]
        if correlation is not None and self.sink.protocol == MQTTv50:
            extra["correlation_data"] = correlation
        client.publish(reply, orjson.dumps(answer), qos=1, **extra)

    async def run(self) -> None:
        def ended() -> None:
            self.connected = False

        await reconnect_forever(self._session, self.sink, "commands", ended)

    async def _session(self, backoff: Any) -> None:
        """One connection: connect, subscribe, take requests until it is lost
        or a request could not be stored."""
        sink = self.sink
        opts = sink.options
        props: dict[str, Any] = {}
        if sink.protocol == MQTTv50:
            props = {
                "session_expiry_interval": sink.session_expiry,
                "receive_maximum": opts.commands_max_inflight,
                "maximum_packet_size": _COMMANDS_PACKET_MAX,
            }
        client = _NoReconnectClient(
            self.client_id, clean_session=False, optimistic_acknowledgement=False, **props
        )
        ended = asyncio.Event()
        failure: list[str] = []
        tasks: set[asyncio.Task[None]] = set()

        async def on_message(_c: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
            # QoS 0 requests (nothing to acknowledge) come through here.
            try:
                await self.handle(client, topic, payload, props)
            except Exception as e:
                logger.warning("sink %s: command not stored: %s", sink.name, e)
            return 0

        async def take(mid: int, topic: str, payload: bytes, props: dict[str, Any]) -> None:
            try:
                await self.handle(client, topic, payload, props)
            except Exception as e:
                # No PUBACK: drop the connection so the broker sends it again.
                failure.append(f"command not stored, reconnecting for redelivery: {e}")
                ended.set()
                return
            if not ended.is_set():
                client._package_handler._send_puback(mid)

        def on_qos1(mid: int, payload: bytes, topic: str, props: dict[str, Any]) -> None:
            # Replaces gmqtt's handler: PUBACK only once the request is stored.
            task = asyncio.ensure_future(take(mid, topic, payload, props))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def on_disconnect(_c: Any, _packet: Any, _exc: Any = None) -> None:
            ended.set()

        def on_subscribe(_c: Any, _mid: int, qos: Any, _props: Any) -> None:
            if qos and all(q in (0, 1, 2) for q in qos):
                self.subscribed.set()
            else:
                failure.append(f"subscription to {self.topic!r} refused: {qos}")
                ended.set()

        client.on_message = on_message
        client.on_disconnect = on_disconnect
        client.on_subscribe = on_subscribe
        client._package_handler._handle_qos_1_publish_packet = on_qos1
        try:
            await connect_side_client(sink, client)
            # no_local: our answers never come back to us (MQTT 5 only: in
            # 3.1.1 that bit is reserved and the broker would disconnect us).
            client.subscribe(self.topic, qos=1, no_local=sink.protocol == MQTTv50)
            self.connected = True
            backoff.reset()
            logger.info(
                "sink %s: taking commands on MQTT topic %s as %s",
                sink.name,
                self.topic,
                self.client_id,
            )
            await ended.wait()
            if failure:
                raise RuntimeError(failure[0])
            raise ConnectionError("connection to the broker lost")
        finally:
            self.connected = False
            self.subscribed.clear()
            for task in tasks:
                task.cancel()
            await _Connection(client, _AckWindow(), 1, False).close()


_GATHER_MIN = 64
"""Unacknowledged publishes from which reads pause to gather PUBACKs (below
it, as at low rates, every PUBACK is read at once: no added latency): of the
connection, or of all the sink's connections when each has a window smaller
than this (see :func:`_bulk_pubacks`)."""
_GATHER_DELAY = 0.001
"""The pause (seconds). With a 1,000-message window against Mosquitto here,
CPU per record of the sink alone fell from 0.0056-0.0084 to 0.0019-0.0038
ms and its rate rose 10% (bench/sinks_bench.py, alternating runs). The
"no change inside the gateway" measured with it was void: under uvloop this
code did not run until 2026-12-06 (see :func:`_bulk_pubacks`); since, the
3.1.1 sink runs at 1.55-1.83x a Mosquitto bridge end to end
(bench/results/end_to_end-2026-12-06.md), with this pause in effect."""
_PUBACK_RUN = 16384
_PUBACK_TYPES = b"\x40" * _PUBACK_RUN
_PUBACK_LENGTHS = {2: b"\x02" * _PUBACK_RUN, 3: b"\x03" * _PUBACK_RUN}
_PUBACK_IDS = {2: struct.Struct(">2xH"), 3: struct.Struct(">2xHx")}


def _quickack_socket(transport: Any) -> socket.socket | None:
    """A socket object on a duplicate of ``transport``'s descriptor, to set
    TCP_QUICKACK on (None where that option does not exist)."""
    sock = quickack_socket(transport)
    if sock is None:
        return None
    fd = sock.fileno()
    return socket.socket(fileno=os.dup(fd)) if fd >= 0 else None


def _bulk_pubacks(
    client: Any, window: _AckWindow, limit: int, sink_inflight: Callable[[], int]
) -> socket.socket | None:
    """Acknowledge runs of PUBACKs in bulk, before gmqtt parses packets.

    At full rate most reads from the broker are nothing but PUBACKs: ``40 02
    <id>`` (v3.1.1, or v5 success without reason code) or ``40 03 <id> <rc>``
    (v5 with a reason code, which Mosquitto always sends: 0x10 "no matching
    subscribers" is a success too). gmqtt turns every one into a Package,
    routes it through its connection and handler and calls a per-type method:
    several microseconds per PUBACK, the largest CPU cost of this sink
    (bench/sinks_bench.py profile). This wraps the connected protocol's packet
    parser and its data_received: each run of same-size PUBACKs is checked
    with slice compares and acknowledged with one set operation; refusals
    (reason code 0x80 and up) are collected as before. Any other packet
    (PINGRESP, DISCONNECT, a PUBACK with properties) goes to gmqtt's parser
    on its own, in order. tests/sinks/test_mqtt_sink.py splits PUBACKs at
    every byte offset against this.
    """
    conn: Any = getattr(client, "_connection", None)
    proto: Any = getattr(conn, "_protocol", None)
    parse = getattr(proto, "_read_packet", None)
    if conn is None or proto is None or parse is None:
        logger.warning("gmqtt internals changed: PUBACKs are parsed one by one")
        return None
    ack_many = window.ack_many
    refused = window.refused
    monotonic = time.monotonic

    def run_length(data: bytes, length: int, stride: int, k: int) -> int:
        """How many of the first ``k`` packets are PUBACKs of this size."""
        if (
            data[0 : stride * k : stride] == _PUBACK_TYPES[:k]
            and data[1 : stride * k : stride] == _PUBACK_LENGTHS[length][:k]
        ):
            return k
        run = 0
        while run < k and data[stride * run] == 0x40 and data[stride * run + 1] == length:
            run += 1
        return run

    def take(data: bytes) -> int:
        """Acknowledge the leading run of PUBACKs in ``data``; bytes used."""
        if len(data) < 4 or data[0] != 0x40 or data[1] not in (2, 3):
            return 0
        length = data[1]
        stride = length + 2
        run = run_length(data, length, stride, min(len(data) // stride, _PUBACK_RUN))
        if run == 0:
            return 0
        end = stride * run
        conn._last_data_in = monotonic()  # gmqtt's keepalive bookkeeping
        if length == 3:
            codes = data[4:end:stride]
            if max(codes) >= 0x80:
                refused.extend(c for c in codes if c >= 0x80)
        ack_many([m for (m,) in _PUBACK_IDS[length].iter_unpack(data[:end])])
        return end

    def consume(data: bytes) -> int:
        """Handle every complete packet in ``data``: PUBACK runs here, any
        other packet one at a time through gmqtt's parser, in order. Returns
        the bytes used (less than ``len(data)`` when a packet is incomplete;
        -1 when gmqtt found a malformed length)."""
        pos, size = 0, len(data)
        while pos < size:
            used = take(data[pos:] if pos else data)
            if used:
                pos += used
                continue
            # One packet of another kind: its length, then gmqtt parses it.
            i, length, mult = pos + 1, 0, 1
            while True:
                if i >= size:
                    return pos
                b = data[i]
                length += (b & 0x7F) * mult
                i += 1
                if not b & 0x80:
                    break
                mult *= 128
                if mult > 128**3:
                    return pos if pos else int(parse(data))
            if i + length > size:
                return pos
            parse(data[pos : i + length])
            pos = i + length
        return pos

    # gmqtt reads through an asyncio StreamReader and a reader task: each
    # segment from the socket costs a feed, a task wake-up and a read before
    # any packet is parsed, and the broker sends a few PUBACKs per segment.
    # So packets are handled as they arrive, in data_received, when gmqtt
    # holds nothing unparsed (no buffered bytes, no partial packet in its read
    # loop); an incomplete packet at the end is fed to gmqtt's reader, whose
    # loop then calls read_packet below with it and what follows.
    reader = getattr(proto, "_stream_reader", None)
    feed = proto.data_received
    tail = False
    """gmqtt's read loop holds a partial packet (it did not parse all it read)."""

    def read_packet(data: bytes) -> int:
        nonlocal tail
        used = consume(data)
        tail = 0 <= used < len(data)
        return used

    # A broker answers each PUBLISH at once, so with a full window the
    # PUBACKs come a few per TCP segment and every segment costs a read and a
    # callback. While many are due, reading pauses for a moment after each
    # read so that the next one finds them gathered in the socket buffer.
    # A small window (a Receive Maximum of 20, several connections) holds too
    # few to count on its own: there the sink's publishes in flight count, and
    # only a read that refilled the window pauses. A read that did not (the
    # one PUBACK a Nagle-bound broker sends before it waits for our ACK) is
    # ACKed at once and the rest read as soon as they come; pausing after it
    # would cost a pause per window. Against a default Mosquitto with four
    # connections this took reads from 0.41 to 0.15 per record and the sink's
    # CPU per record from 0.0062-0.0065 to 0.0044-0.0048 ms at the same rate
    # (sink alone, alternating runs).
    loop = asyncio.get_running_loop()
    inflight = window.inflight
    paused = False
    small = limit < _GATHER_MIN

    def resume() -> None:
        nonlocal paused
        paused = False
        transport = proto._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def gather_next_read(refilled: bool) -> None:
        nonlocal paused
        if paused:
            return
        if small:
            if not refilled or sink_inflight() < _GATHER_MIN:
                return
        elif len(inflight) < _GATHER_MIN:
            return
        transport = proto._transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            paused = True
            loop.call_later(_GATHER_DELAY, resume)

    # A broker that leaves Nagle on (Mosquitto unless `set_tcp_nodelay true`)
    # sends the first PUBACK of a burst and holds the rest until we ACK it, and
    # Linux delays that ACK by up to 40 ms when we have nothing to send (the
    # ack waits to ride on data): 20 publishes per 40 ms with a window of 20,
    # and 40 ms added to every small batch. So while PUBACKs are due, each read
    # asks the kernel to ACK at once (TCP_QUICKACK does not stay set: the
    # kernel drops back to delayed ACKs by itself, hence once per read).
    # Measured against a default Mosquitto (alternating, bench/sinks_bench.py):
    # v5 450 -> 75,000 records/s, 3.1.1 11,000 -> 90,000; a 10-record batch
    # 44 ms -> 0.4 ms.
    # uvloop's transport socket is a stand-in that builds a socket object
    # (two more system calls) per setsockopt: use a duplicate of the descriptor.
    sock = _quickack_socket(proto._transport)
    quickack = TCP_QUICKACK or 0

    def data_received(data: bytes) -> None:
        writes = window.writes
        if not tail and reader is not None and not reader._buffer:
            used = consume(data)
            if used == len(data):
                data = b""
                gather_next_read(window.writes != writes)
            elif used > 0:
                data = data[used:]
        if data:
            feed(data)
        # A refill written just now carried the ACK; otherwise send it now.
        if inflight and sock is not None and window.writes == writes:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    proto._read_packet = read_packet
    proto.data_received = data_received
    # uvloop's transport keeps the bound data_received it saw at connect (the
    # asyncio loop looks it up per read): hand the protocol over again, or
    # under `edgeway run` (uvloop) none of the above is ever called.
    if proto._transport is not None:
        proto._transport.set_protocol(proto)
    return sock


def _take_over_pubacks(client: Any, window: _AckWindow) -> None:
    """Route PUBACKs straight to ``window``, with their MQTT 5 reason codes.

    gmqtt dispatches each packet type to ``_handle_<type>_packet`` on its
    handler; its PUBACK handler ignores v5 reason codes, frees ids in its own
    allocator (we allocate ours) and logs twice per packet. Replacing that one
    method cuts the CPU per acknowledgement by about a third. If a gmqtt
    version lacks it we fall back to its storage callback (acks still counted,
    reason codes not checked) and say so.
    """
    handler = getattr(client, "_package_handler", None)
    if handler is None or not hasattr(handler, "_handle_puback_packet"):
        logger.warning("gmqtt internals changed: MQTT 5 PUBACK reason codes are not checked")
        return
    ack = window.remove_message_by_mid
    refused = window.refused

    def on_puback(cmd: int, packet: bytes) -> None:
        # Packet id (2 bytes), then in v5 an optional reason code (absent = success).
        if len(packet) > 2 and packet[2] >= 0x80:
            refused.append(packet[2])
        ack((packet[0] << 8) | packet[1])

    handler._handle_puback_packet = on_puback
