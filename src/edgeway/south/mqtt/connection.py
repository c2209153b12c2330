"""One client connection: an ``asyncio.Protocol`` between a transport and the broker.

Configuration: the limits that act per connection::

    mqtt:
      limits:
        max_packet_size: 1MiB    # larger packets close the connection (v5: DISCONNECT 0x95)
        receive_maximum: 64      # unacknowledged QoS 1/2 PUBLISH each way
        topic_alias_maximum: 64  # aliases a v5 client may use towards us
        connect_timeout: 10s     # time from accept to CONNECT
        max_keepalive: 65535     # v5 clients are told a lower Server Keep Alive

The transport may be asyncio's TCP/TLS transport or the WebSocket adapter of
``listeners.py``; only ``write``, ``close``, ``abort``, ``is_closing``,
``get_extra_info``, ``pause_reading``, ``resume_reading``, ``can_write_eof``
and ``write_eof`` are used.

Hot path rules: no task per message, no per-message logging, and output is
collected in a list during one ``data_received`` (or one routing pass) and
written once (:meth:`Broker.flush_writes`).

Acknowledgements of inbound QoS 1/2 PUBLISH go out in arrival order (MQTT
4.6): telemetry PUBLISHes wait for the ingest future, so every PUBLISH that
arrives while an earlier one waits joins a FIFO, and a done-callback on the
ingest future flushes the completed prefix (routing then acknowledging each).
Inbound QoS 2 is routed when its PUBLISH is accepted (like Mosquitto), and its
packet id is kept until PUBREL so a re-sent PUBLISH is not delivered twice.

Telemetry is stored per read, not per PUBLISH: the QoS 0/1 telemetry of one
``data_received`` forms one FIFO entry (a batch: one ingest submit, its PUBACKs
written together), unless the ingest validates each message on its own
(``Ingest.batchable``). The usual telemetry PUBLISH is taken straight from the
read's bytes (:meth:`MqttConnection._fast_telemetry`); everything else goes
through :class:`MqttReader` and :meth:`MqttConnection._on_publish`.

Any exception while handling a packet closes this connection only: a
:class:`ProtocolError` with its reason code (v5: DISCONNECT first), anything
else logged as a bug with DISCONNECT 0x83.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.devices.auth import AuthDecision, ConnectInfo, Principal
from edgeway.devices.backoff import address_key
from edgeway.ingest import IngestStatus
from edgeway.quickack import ack_now, quickack_socket
from edgeway.reading import Origin, Reading
from edgeway.south.mqtt.codec import (
    PINGRESP_BYTES,
    MqttReader,
    UnsupportedProtocolVersion,
    connack_code,
    disconnect_code,
    encode,
    encode_puback,
    encode_pubacks,
    validate_topic_filter,
)
from edgeway.south.mqtt.packets import (
    MQTT_5,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    Properties,
    ProtocolError,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
)
from edgeway.south.mqtt.retained import Message
from edgeway.south.mqtt.session import (
    Delivery,
    Inflight,
    RetainedBacklog,
    RetainedWalk,
    Session,
)
from edgeway.south.mqtt.telemetry import TelemetryError, decode_telemetry, reading_from
from edgeway.south.mqtt.topics import CACHED_TOPIC_MAX, SubEntry

if TYPE_CHECKING:
    from edgeway.south.mqtt.broker import Broker
    from edgeway.south.mqtt.config import ListenerConfig

log = logging.getLogger(__name__)

# Connection states.
AWAIT_CONNECT = 0
AUTHENTICATING = 1
CONNECTED = 2
CLOSED = 3

_PAUSE_AUTH = 1
_PAUSE_SATURATED = 2
_PAUSE_ACKS = 4
_PAUSE_WRITE = 8

MAX_PENDING_ACKS_311 = 1000
"""A 3.1.1 client has no receive maximum; while this many of its PUBLISHes
wait for ingest we stop reading its socket, which bounds memory per client."""

OUTPUT_PER_TURN = 256 * 1024
"""Bytes of PUBLISHes written to one connection per event-loop turn; the rest
waits (session queue, retained backlog) for the next turn. With the transport's
64 KiB high-water mark (past which nothing more is written and the client's
socket is not read until it drains) this bounds what a client that does not
read holds in our socket buffer: about 320 KiB."""

DRAIN_PER_TURN = 256
"""Waiting PUBLISHes (retained backlog, session queue) sent to one connection
per event-loop turn: ~1 ms of encoding. Live messages are not counted (their
work is the publisher's read's), only the backlog, which may be 100,000 deep."""

RETAINED_NODES_PER_TURN = 1024
"""Retained-trie nodes one connection's SUBSCRIBEs walk per event-loop turn
(~0.3 ms): a filter whose walk finds nothing for long still yields the loop."""

MAX_BATCH = 256
"""Telemetry PUBLISHes of one read submitted together at most (a read of
many small messages still makes batches of a bounded size)."""

ACL_CACHE_MAX = 256
"""Publish decisions (and telemetry origins) remembered per connection:
devices publish to a few topics; a client cycling through many just
re-asks the authoriser."""


EMPTY_PROPS = Properties()

_PUBLISH_OK = 0
_TOO_DEEP = 1
_DENIED = 2
_TopicInfo = tuple[int, str | None, Origin | None]
"""Per topic a connection publishes to: verdict (``_PUBLISH_OK``, ``_TOO_DEEP``,
``_DENIED``), telemetry device id (None: not telemetry) and its Origin."""

_NO_ACKS: deque[Any] = deque()
"""Shared empty FIFO (never appended to): an idle connection does not pay
~600 bytes for a deque of its own; the first waiting PUBLISH creates one."""


@dataclass(slots=True)
class _PendingAck:
    """An inbound PUBLISH waiting (for ingest, or behind one that waits)."""

    fut: asyncio.Future[IngestStatus] | None
    msg: Message | None
    """Routed when accepted; None if it must not be routed."""
    packet_id: int | None
    qos: int
    reason: int
    """Reason code for the acknowledgement if accepted (v5)."""
    readings: Sequence[Reading] | None = None
    """Kept on 3.1.1 connections so a PUBLISH the full outbox refused can be
    submitted again once it has room (3.1.1 has no refusal code)."""
    pids: list[int] | None = None
    """A batch: the telemetry PUBLISHes (QoS 0 and 1) of one socket read,
    stored with one submit and acknowledged together, in order; these are
    the QoS 1 packet ids (``packet_id`` is None, ``qos`` 1 if any)."""
    msgs: list[Message] | None = None
    """A batch's messages to route once stored (telemetry somebody subscribes to)."""
    n: int = 1
    """PUBLISHes this entry answers (a batch: all of its read's telemetry)."""


def _new_batch() -> _PendingAck:
    """An empty batch entry (see :attr:`_PendingAck.pids`)."""
    return _PendingAck(None, None, None, 0, 0, [], [], None, 0)


def _forwardable(props: Properties) -> Properties | None:
    """The properties of an inbound PUBLISH that travel with the message
    (MQTT 3.3.2.3): None when there are none, which keeps routing cheap."""
    if (
        props.payload_format_indicator is None
        and props.content_type is None
        and props.response_topic is None
        and props.correlation_data is None
        and not props.user_properties
    ):
        return None
    return Properties(
        payload_format_indicator=props.payload_format_indicator,
        content_type=props.content_type,
        response_topic=props.response_topic,
        correlation_data=props.correlation_data,
        user_properties=list(props.user_properties),
    )


def _split_at_packet_id(data: bytes) -> tuple[bytes, bytes]:
    """Split an encoded QoS>0 PUBLISH around its packet id, so one encoding
    serves every subscriber: head + id + tail."""
    i = 1
    while data[i] & 0x80:
        i += 1
    i += 1
    pos = i + 2 + ((data[i] << 8) | data[i + 1])
    return data[:pos], data[pos + 2 :]


class MqttConnection(asyncio.Protocol):
    """Protocol instance for one client; see the module docstring."""

    __slots__ = (
        "_acks",
        "_aliases_in",
        "_aliases_out",
        "_announced",
        "_auth_task",
        "_batch",
        "_cb_future",
        "_dirty",
        "_end",
        "_fast_topics",
        "_held",
        "_in_quota",
        "_normal_disconnect",
        "_out",
        "_out_bytes",
        "_out_drained",
        "_out_walked",
        "_output_scheduled",
        "_pause",
        "_pending",
        "_quickack",
        "_readable",
        "_saturation_check",
        "_topics",
        "_waiting",
        "_why",
        "_write_paused",
        "accepted_at",
        "alias_max_out",
        "broker",
        "client_id",
        "keepalive",
        "last_rx",
        "level",
        "lingering_since",
        "listener",
        "max_out_packet",
        "partial_since",
        "principal",
        "reader",
        "remote",
        "rx",
        "session",
        "state",
        "transport",
        "will",
        "window",
    )

    fast_telemetry = True
    """Whether :meth:`_fast_telemetry` may take telemetry straight from the
    bytes (a class attribute: tests turn it off to compare both paths)."""

    def __init__(self, broker: Broker, listener: ListenerConfig) -> None:
        self.broker = broker
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        # Decoded PUBLISHes are only read, never mutated (forwarded properties
        # are copies), so they may share one empty Properties: ~1.5x faster decode.
        self.reader = MqttReader(broker.limits.max_packet_size, share_empty_properties=True)
        self.level = 0
        self.state = AWAIT_CONNECT
        self.session: Session | None = None
        self._quickack: Any = None
        """The transport's TCP socket where TCP_QUICKACK exists (see
        :meth:`data_received`), else None."""
        self.principal: Principal | None = None
        self.client_id = ""
        self.remote = ""
        self.keepalive = 0
        self.rx = False
        """Set on every read; the broker's sweep turns it into ``last_rx``."""
        self.last_rx = 0.0
        self.partial_since = 0.0
        """Loop time the incomplete packet in :attr:`reader` began arriving (0:
        none); the broker's sweep enforces ``packet_timeout`` on it."""
        self.accepted_at = 0.0
        self.will: Will | None = None
        self.window = broker.limits.receive_maximum
        self.max_out_packet = 0
        """Client's maximum packet size (0: no limit beyond the protocol's)."""
        self.alias_max_out = 0
        self._aliases_out: dict[str, int] | None = None
        self._aliases_in: dict[int, str] | None = None
        self._out: list[bytes] = []
        self._out_bytes = 0
        """PUBLISH bytes in ``_out`` (see :data:`OUTPUT_PER_TURN`)."""
        self._out_drained = 0
        """Waiting PUBLISHes sent this turn (see :data:`DRAIN_PER_TURN`)."""
        self._out_walked = 0
        """Retained-trie nodes walked this turn (:data:`RETAINED_NODES_PER_TURN`)."""
        self._output_scheduled = False
        self._dirty = False
        self._acks: deque[_PendingAck] = _NO_ACKS
        self._waiting = 0
        """PUBLISHes answered by the entries of ``_acks`` (batches count all theirs)."""
        self._batch: _PendingAck | None = None
        """Telemetry of the read being handled, not submitted yet (None outside
        :meth:`_handle_packets`)."""
        self._held = False
        self._cb_future: asyncio.Future[IngestStatus] | None = None
        self._in_quota = 0
        self._pending: list[Packet] | None = None
        self._pause = 0
        self._write_paused = False
        self._normal_disconnect = False
        self._saturation_check = False
        self._topics: dict[str, _TopicInfo] | None = None
        self._readable: dict[str, bool] | None = None
        """Read ACL decisions per topic this connection was sent (see
        :meth:`_may_read`), bounded like ``_topics``."""
        self._fast_topics: dict[bytes, tuple[str, Origin, str]] | None = None
        """Topics (as the bytes on the wire) this connection sent telemetry to,
        with device id, origin and topic: what :meth:`_fast_telemetry` may take."""
        self._auth_task: asyncio.Task[AuthDecision] | None = None
        self._announced = False
        """A connect line was logged: a disconnect line follows."""
        self._why: str | None = None
        """Why the connection ends (for its disconnect line), once we know."""
        self._end: str | None = None
        """Why it ended, as a registry reason (see :attr:`end_reason`), when
        the broker ended it."""
        self.lingering_since = 0.0
        """When we closed after telling the client why (0: not lingering); see
        :meth:`_linger`."""

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "write")
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.remote = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.remote = str(peer)
        now = self.broker.loop.time()
        self.accepted_at = self.last_rx = now
        self._quickack = quickack_socket(transport)
        self.broker.connection_made(self)

    def data_received(self, data: bytes) -> None:
        self.rx = True
        if self.state == CLOSED:
            return
        if self._quickack is not None and self.session is not None and self.session.inflight:
            # A PUBLISH of ours awaits its PUBACK: a client that leaves Nagle
            # on (paho's default) holds its next packet (a reading) until we
            # ACK the PUBACK's segment, which Linux delays up to 40 ms when we
            # have nothing to send. Ask for the ACK now (not sticky: per read).
            if not ack_now(self._quickack):
                self._quickack = None
        broker = self.broker
        broker.receiving += 1
        try:
            pos = 0
            if self._fast_topics is not None and self.state == CONNECTED and self.fast_telemetry:
                # Telemetry the slow path has seen from this topic before is
                # taken straight from the bytes; the rest of the read (if any)
                # goes through the reader as usual.
                pos = self._fast_telemetry(data)
                if pos:
                    data = data[pos:]
            reader = self.reader
            try:
                packets = reader.feed(data) if data else []
            except ProtocolError as e:
                # Packets before the bad one are handled, as if read one by one.
                before: list[Packet] = getattr(e, "packets", None) or []
                if (before or self._batch is not None) and self._pending is None:
                    self._handle_packets(before)
                raise
            if reader.buffered_bytes:
                if packets or pos or not self.partial_since:
                    self.partial_since = broker.loop.time()  # a packet began in this read
            elif self.partial_since:
                self.partial_since = 0.0
            if self._pending is not None:
                self._pending.extend(packets)
            elif packets or self._batch is not None:
                self._handle_packets(packets)
            if self._saturation_check:
                self._saturation_check = False
                if broker.ingest.is_saturated():
                    self._pause_reading(_PAUSE_SATURATED)
                    broker.watch_saturation(self)
        except ProtocolError as e:
            self._protocol_error(e)
        except Exception:
            log.exception("error handling MQTT data from %s (%s)", self.client_id, self.remote)
            self._protocol_error(ProtocolError(0x83, "internal error"))
        finally:
            broker.receiving -= 1
            if not broker.receiving:
                broker.flush_writes()

    def _fast_telemetry(self, data: bytes) -> int:
        """Take the leading telemetry PUBLISHes of ``data`` into the read's
        batch without building packets; return where the rest starts.

        The hot path of a gateway: under load each read holds ~15 telemetry
        PUBLISHes, and going through ``Publish`` objects, the generic packet
        dispatch and :meth:`_on_publish` cost about as much as decoding the
        JSON. Only the case the slow path has already validated is taken here:
        QoS 0/1, no retain, a topic this connection published telemetry to
        before (so its UTF-8, wildcards, depth and ACL were checked: see
        :attr:`_fast_topics`), no v5 properties, one JSON object that is a
        valid reading (:func:`reading_from`, the slow path's own decoder)
        within the input limits (the same :meth:`InputLimits.check_readings`;
        for a payload of at most ``unchecked_payload_size`` bytes, which cannot
        break any other limit, only its timestamp is checked, and for a flat
        object :meth:`InputLimits.flat_object_within` judges by its length).
        Anything else, including every malformed packet and every refused
        payload, stops here and is handled by the reader and
        :meth:`_on_publish` from that packet on, so errors, reason codes and
        counters are theirs.
        """
        if type(data) is not bytes or self.reader.buffered_bytes or self._pending is not None:
            return 0
        topics = self._fast_topics
        assert topics is not None
        broker = self.broker
        max_size = broker.limits.max_packet_size
        v5 = self.level == MQTT_5
        quota = broker.limits.receive_maximum if v5 else 1 << 30
        # No subscription at all (the usual gateway): no lookup per message.
        # Subscriptions cannot change during this call.
        has_subscribers = broker.has_subscribers if len(broker.tree) else None
        loads = orjson.loads
        limits = broker.input_limits
        unchecked = limits.unchecked_payload_size
        batch_max = broker.batch_max
        n = len(data)
        pos = 0
        now = time.time()
        taken = 0
        try:
            while pos + 1 < n:
                b0 = data[pos]
                if b0 != 0x32 and b0 != 0x3A and b0 != 0x30:  # QoS 1 (DUP or not), QoS 0
                    break
                body = pos + 2
                length = data[pos + 1]
                if length > 0x7F:
                    if body >= n or data[body] > 0x7F:
                        break  # longer than 16 KiB, or not all here: the reader's case
                    length = (length & 0x7F) | (data[body] << 7)
                    body += 1
                end = body + length
                if end > n or end - pos > max_size:
                    break
                p = body + 2 + ((data[body] << 8) | data[body + 1])
                if p > end:
                    break
                info = topics.get(data[body + 2 : p])
                if info is None:
                    break
                pid = 0
                if b0 != 0x30:
                    pid = (data[p] << 8) | data[p + 1]
                    p += 2
                    if pid == 0 or self._in_quota >= quota:
                        break
                if v5:
                    if p >= end or data[p]:
                        break  # properties (or truncated): the slow path
                    p += 1
                if p > end:
                    break
                payload = data[p:end]
                device_id, origin, topic = info
                try:
                    # An array (several readings) is refused here as not an
                    # object, and goes to the slow path like any refusal.
                    obj = loads(payload)
                    reading = reading_from(obj, device_id, now, origin, None, limits)
                    if end - p > unchecked:
                        # The usual object is its own metrics (and stamped now).
                        if reading.metrics is not obj or not limits.flat_object_within(
                            obj, end - p
                        ):
                            limits.check_readings([reading], now, end - p)
                    elif reading.ts != now:
                        limits.check_timestamp(reading.ts, now)
                except (orjson.JSONDecodeError, TelemetryError):
                    break  # the slow path counts and answers it
                msg = None
                if has_subscribers is not None and has_subscribers(topic):
                    msg = Message(
                        topic, payload, 1 if pid else 0, False, None, None, self.client_id
                    )
                if pid:
                    self._in_quota += 1
                taken += 1
                pos = end
                # _join_batch, inlined: the call per message cost 0.45 of the
                # path's 6.5 us (bench/ingest_micro.py).
                batch = self._batch
                if batch is None:
                    batch = self._batch = _new_batch()
                batch.readings.append(reading)  # type: ignore[union-attr]
                if pid:
                    batch.pids.append(pid)  # type: ignore[union-attr]
                if msg is not None:
                    if batch.msgs is None:
                        batch.msgs = []
                    batch.msgs.append(msg)
                batch.n += 1
                if batch.n >= batch_max:
                    self._submit_batch()
        except IndexError:
            pass  # a field past the end of the read: the reader reports it
        finally:
            broker.messages_in += taken
            broker.readings_in += taken
        return pos

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        if self._announced:
            self._announced = False
            why = self._why
            if why is None:
                why = (
                    f"connection lost: {exc}"
                    if exc is not None
                    else "connection closed without DISCONNECT"
                )
            self.broker.events.emit(
                "disconnect",
                logging.WARNING if why.startswith("protocol error") else logging.INFO,
                "MQTT client %s disconnected (%s): %s",
                self.client_id,
                self.remote,
                why,
            )
        if self._auth_task is not None:
            self._auth_task.cancel()
        self._forget_unanswered()
        self.broker.connection_lost(self)

    def pause_writing(self) -> None:
        # The client does not read what we send: deliveries wait in its
        # session queue (bounded) and its socket is not read either, so the
        # acknowledgements it asks for cannot pile up in our buffer.
        self._write_paused = True
        self._pause_reading(_PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._write_paused = False
        self.resume_reading(_PAUSE_WRITE)
        if self.state == CONNECTED:
            self._drain_queue()
            self.broker.flush_writes_soon()

    # --------------------------------------------------------------- output

    def write(self, data: bytes) -> None:
        """Queue bytes for the end of this loop turn's flush."""
        self._out.append(data)
        if not self._dirty:
            self._dirty = True
            self.broker.mark_dirty(self)

    def send(self, packet: Packet) -> None:
        self.write(encode(packet, self.level or 4))

    def flush(self) -> None:
        self._dirty = False
        self._out_bytes = self._out_drained = self._out_walked = 0
        out = self._out
        if not out:
            return
        t = self.transport
        if t is not None and not t.is_closing() and not self.lingering_since:
            # (Lingering: the reason was the last thing written; our side is shut.)
            t.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def close(
        self, reason_code: int | None = None, why: str | None = None, *, told: bool = False
    ) -> None:
        """Close the connection; v5 clients get DISCONNECT ``reason_code`` first
        (mapped to a code a server's DISCONNECT may carry). ``why`` goes to the
        disconnect log line; ``told``: a refusing CONNACK was just written.
        A client that was told why gets to read it (:meth:`_linger`)."""
        if self.state == CLOSED:
            return
        if why is not None and self._why is None:
            self._why = why
        if self._end is None and reason_code is not None:
            self._end = _END_BY_CODE.get(reason_code)
        if reason_code is not None and self.level == MQTT_5 and self.state == CONNECTED:
            self.send(Disconnect(disconnect_code(reason_code)))
            told = True
        self.state = CLOSED
        self.flush()
        t = self.transport
        if t is None:
            return
        if told and not t.is_closing() and self.broker.limits.disconnect_linger > 0:
            self._linger(t)
        else:
            t.close()

    def _linger(self, t: asyncio.Transport) -> None:
        """Close after a DISCONNECT (or refusing CONNACK) so the client reads it.

        Closing a socket that still has unread input makes the kernel answer
        with a reset, and a client that is still sending (a burst that ran
        into a limit) then sees "connection reset" instead of the reason. So:
        the session is released now (will, takeover, expiry as if the
        connection were gone), our side is shut for writing once the reason
        is out (TCP: FIN after it), and what the client still sends is read
        and discarded (``data_received`` ignores a closed connection) until
        it closes its side or ``disconnect_linger`` passes (the broker's
        sweep calls :meth:`linger_expired`)."""
        self.lingering_since = self.broker.loop.time()
        self._forget_unanswered()
        self.broker.release(self)
        if t.can_write_eof():
            try:
                t.write_eof()
            except OSError:
                # The client went first (ENOTCONN): nothing left to linger for.
                t.abort()
                return
        if self._pause:
            self._pause = 0
            t.resume_reading()

    def linger_expired(self) -> None:
        """The client neither closed nor went away in ``disconnect_linger``."""
        if self.transport is not None:
            self.transport.abort()

    def _protocol_error(self, e: ProtocolError) -> None:
        self.broker.count("protocol_errors")
        told = False
        if self.state == AWAIT_CONNECT or self.state == AUTHENTICATING:
            if isinstance(e, UnsupportedProtocolVersion):
                # Answered in a form that client version can parse.
                self.write(e.connack())
                told = True
            elif self.level == MQTT_5:
                code = connack_code(e.reason_code, MQTT_5)
                assert code is not None  # v5 has a CONNACK code for every reason
                self.write(encode(ConnAck(False, code), MQTT_5))
                told = True
            # 3.1.1: a protocol violation is answered by closing (4.8), no CONNACK.
        self._end = self._end or "error"
        self.close(e.reason_code, f"protocol error 0x{e.reason_code:02X}: {e}", told=told)

    def _pause_reading(self, why: int) -> None:
        if not self._pause and self.transport is not None:
            self.transport.pause_reading()
        self._pause |= why

    def resume_reading(self, why: int) -> None:
        if why & _PAUSE_SATURATED and self._held:
            self._resubmit_held()
        if not self._pause & why:
            return
        self._pause &= ~why
        if not self._pause and self.transport is not None and self.state != CLOSED:
            if self.partial_since:
                # The packet could not progress while we did not read.
                self.partial_since = self.broker.loop.time()
            self.transport.resume_reading()

    # ------------------------------------------------------------ dispatch

    def _handle_packets(self, packets: list[Packet]) -> None:
        try:
            self._handle_each(packets)
        finally:
            # The read's telemetry is submitted even if a later packet was bad
            # (as if it had been read alone) or the connection closed.
            if self._batch is not None:
                self._submit_batch()

    def _handle_each(self, packets: list[Packet]) -> None:
        for i, p in enumerate(packets):
            if self.state != CONNECTED:
                if self.state == AWAIT_CONNECT and type(p) is Connect:
                    self._on_connect(p)
                    if self._pending is not None:
                        # Authentication is pending: keep the rest for after CONNACK.
                        self._pending.extend(packets[i + 1 :])
                        return
                    continue
                if self.state == CLOSED:
                    return
                raise ProtocolError(0x82, f"{type(p).__name__} before CONNECT")
            t = type(p)
            if t is Publish:
                self._on_publish(p)  # type: ignore[arg-type]
            elif t is PubAck:
                self._on_puback(p.packet_id)  # type: ignore[union-attr,arg-type]
            elif t is PubRec:
                self._on_pubrec(p)  # type: ignore[arg-type]
            elif t is PubRel:
                self._on_pubrel(p.packet_id)  # type: ignore[union-attr,arg-type]
            elif t is PubComp:
                self._on_puback(p.packet_id)  # type: ignore[union-attr,arg-type]
            elif t is PingReq:
                self.write(PINGRESP_BYTES)
            elif t is Subscribe:
                self._on_subscribe(p)  # type: ignore[arg-type]
            elif t is Unsubscribe:
                self._on_unsubscribe(p)  # type: ignore[arg-type]
            elif t is Disconnect:
                if self._batch is not None:
                    self._submit_batch()
                self._on_disconnect(p)  # type: ignore[arg-type]
                return
            elif t is Auth:
                raise ProtocolError(0x82, "AUTH without an authentication method")
            else:
                raise ProtocolError(0x82, f"unexpected {t.__name__} from a client")
            if self.state == CLOSED:
                return

    # -------------------------------------------------------------- CONNECT

    def _on_connect(self, p: Connect) -> None:
        broker = self.broker
        self.level = p.protocol_level
        v5 = self.level == MQTT_5
        cid = p.client_id
        assigned: str | None = None
        if not cid:
            if not v5 and not p.clean_start:
                self._refuse(0x85, "empty client id needs clean session")
                return
            cid = assigned = broker.assign_client_id()
        if v5 and p.properties.authentication_method is not None:
            self._refuse(0x8C, "enhanced authentication is not supported")
            return
        if broker.connected_count() >= broker.limits.max_connections:
            broker.count_drop("max_connections")
            self._refuse(0x97, "max_connections reached")
            return
        wait = broker.login_backoff.locked_for(address_key(self.remote))
        if wait > 0:
            broker.count("address_locked_out")
            self._refuse(0x8A, f"too many failed logins from this address; retry in {wait:.0f} s")
            return
        if p.will is not None:
            t = p.will.topic
            if not t or "+" in t or "#" in t:
                raise ProtocolError(0x90, "invalid will topic")
        self.client_id = cid
        self.will = p.will
        transport = self.transport
        cn: str | None = None
        if transport is not None:
            ssl_obj = transport.get_extra_info("ssl_object")
            if ssl_obj is not None:
                cn = _peer_cn(ssl_obj)
        info = ConnectInfo(
            client_id=cid,
            username=p.username,
            password=p.password,
            listener=self.listener.bind,
            remote=self.remote,
            allow_anonymous=self.listener.allow_anonymous,
            cert_subject_cn=cn,
        )
        self.state = AUTHENTICATING
        self._pending = []
        self._pause_reading(_PAUSE_AUTH)
        task = broker.loop.create_task(broker.authenticator.authenticate(info))
        self._auth_task = task
        broker.track_task(task)
        task.add_done_callback(lambda t: self._auth_done(t, p, assigned))

    def _refuse(self, v5_reason: int, why: str, username: str | None = None) -> None:
        level = self.level or 4
        code = connack_code(v5_reason, level)
        if code is None:
            code = 5  # a refusal is never a protocol violation; not authorised
        self.write(encode(ConnAck(False, code), level))
        self.broker.events.emit(
            "login_failed",
            logging.WARNING,
            "MQTT client %s (%s, user %s) refused: %s (CONNACK 0x%02X)",
            self.client_id,
            self.remote,
            username,
            why,
            code,
        )
        self.broker.count("connect_refused")
        self.close(told=True)

    def _auth_done(
        self, task: asyncio.Task[AuthDecision], p: Connect, assigned: str | None
    ) -> None:
        self._auth_task = None
        if self.state == CLOSED:
            return
        broker = self.broker
        broker.receiving += 1
        try:
            try:
                decision = task.result()
            except asyncio.CancelledError:
                return
            except Exception:
                log.exception("authenticator failed for %s", self.client_id)
                self._refuse(0x80, "authenticator error")
                return
            if not decision.allowed:
                if decision.reason_code in (0x86, 0x87):
                    # A wrong secret or none: a new user name failing counts
                    # against the address (busy 0x89 and locked 0x8A are not
                    # the client's guess).
                    broker.login_backoff.failed(address_key(self.remote), p.username or "")
                self._refuse(decision.reason_code, decision.reason or "not authorised", p.username)
                return
            principal = decision.principal or Principal(
                self.client_id, p.username, p.username is None
            )
            owner = broker.session_owner(self.client_id)
            if owner is not None and owner != principal.identity:
                # A session belongs to the identity that created it: another
                # one may neither resume it (its queue, subscriptions) nor
                # take it over or end it (clean start). Refused, not given a
                # fresh session, so the owner's session and connection stay.
                broker.count("client_id_in_use")
                self._refuse(0x85, f"client id in use by another identity ({owner})", p.username)
                return
            self.principal = principal
            self._connected(p, assigned)
            pending, self._pending = self._pending, None
            self.resume_reading(_PAUSE_AUTH)
            if pending and self.state == CONNECTED:
                self._handle_packets(pending)
        except ProtocolError as e:
            self._protocol_error(e)
        except Exception:
            log.exception("error completing CONNECT of %s (%s)", self.client_id, self.remote)
            self._protocol_error(ProtocolError(0x83, "internal error"))
        finally:
            broker.receiving -= 1
            if not broker.receiving:
                broker.flush_writes()

    def _connected(self, p: Connect, assigned: str | None) -> None:
        broker = self.broker
        limits = broker.limits
        v5 = self.level == MQTT_5
        props = p.properties
        cap = int(limits.max_session_expiry)
        told_expiry: int | None = None
        if v5:
            expiry = props.session_expiry_interval or 0
            if cap and expiry > cap:
                expiry = told_expiry = cap
            if props.receive_maximum is not None:
                self.window = min(limits.receive_maximum, props.receive_maximum)
            self.max_out_packet = props.maximum_packet_size or 0
            self.alias_max_out = props.topic_alias_maximum or 0
        else:
            expiry = 0 if p.clean_start else (cap or 0xFFFFFFFF)
        clean_start = p.clean_start
        if self.principal is not None and self.principal.provisioning_key is not None:
            # A provisioning client's session is never kept (nor resumed): it
            # must not hold a client id a device will need.
            if expiry and v5:
                told_expiry = 0
            expiry, clean_start = 0, True
        keepalive = p.keepalive
        server_ka: int | None = None
        if (
            v5
            and limits.max_keepalive < 65535
            and (keepalive == 0 or keepalive > limits.max_keepalive)
        ):
            keepalive = server_ka = limits.max_keepalive
        self.keepalive = keepalive
        if expiry and not broker.may_keep_session(self.client_id):
            broker.count_drop("persistent_sessions_full")
            self._refuse(0x97, "max_persistent_sessions reached", p.username)
            return
        session, present = broker.attach_session(self, clean_start, expiry)
        self.session = session
        self.state = CONNECTED
        ack = ConnAck(present, 0)
        if v5:
            ack.properties = Properties(
                session_expiry_interval=told_expiry,
                assigned_client_identifier=assigned,
                server_keep_alive=server_ka,
                receive_maximum=limits.receive_maximum,
                topic_alias_maximum=limits.topic_alias_maximum or None,
                maximum_packet_size=limits.max_packet_size,
                retain_available=1,
                wildcard_subscription_available=1,
                subscription_identifier_available=1,
                shared_subscription_available=1,
            )
        self.send(ack)
        self._announced = True
        principal = self.principal
        broker.events.emit(
            "connect",
            logging.INFO,
            "MQTT client %s connected (%s) as %s: MQTT %s, %s session, keep alive %d s",
            self.client_id,
            self.remote,
            "anonymous" if principal is None or principal.anonymous else principal.username,
            "5.0" if v5 else "3.1.1",
            "resumed" if present else ("persistent" if session.persistent else "clean"),
            keepalive,
        )
        # Redeliver what the session had in flight (DUP), then its queue.
        for inf in list(session.inflight.values()):
            if inf.released:
                self.send(PubRel(inf.packet_id))
            else:
                self._write_publish(inf.delivery, inf.packet_id, True, None)
        self._drain_queue()

    # -------------------------------------------------------------- PUBLISH

    def _on_publish(self, p: Publish) -> None:
        broker = self.broker
        broker.messages_in += 1
        session = self.session
        assert session is not None
        topic = p.topic
        qos = p.qos
        props = p.properties
        v5 = self.level == MQTT_5
        if v5:
            if props.subscription_identifiers:
                raise ProtocolError(0x82, "subscription identifier in a client's PUBLISH")
            alias = props.topic_alias
            if alias is not None:
                topic = self._resolve_alias(topic, alias)
            elif not topic:
                raise ProtocolError(0x82, "empty topic without topic alias")
        pid = p.packet_id
        if qos:
            if qos == 2 and pid in session.in_qos2:
                # Re-sent before PUBREL: acknowledge again, do not deliver twice.
                self._complete_or_queue(_PendingAck(None, None, pid, 2, 0))
                return
            self._in_quota += 1
            if v5 and self._in_quota > broker.limits.receive_maximum:
                raise ProtocolError(0x93, "receive maximum exceeded")
            if qos == 2:
                session.remember_qos2(pid)  # type: ignore[arg-type]
        # Everything that depends on the topic alone, one lookup per message.
        topics = self._topics
        info = topics.get(topic) if topics is not None else None
        if info is None:
            info = self._topic_info(topic)
        verdict, device_id, origin = info
        if verdict:
            if verdict == _TOO_DEEP:
                broker.count_drop("too_many_topic_levels")
                self._complete_or_queue(_PendingAck(None, None, pid, qos, 0x90 if v5 else 0))
            else:
                broker.count_drop("not_authorised")
                broker.events.emit(
                    "publish_denied",
                    logging.WARNING,
                    "MQTT client %s (user %s) may not publish to %s: dropped",
                    self.client_id,
                    self._username(),
                    topic,
                )
                self._complete_or_queue(_PendingAck(None, None, pid, qos, 0x87 if v5 else 0))
            return
        fwd: Properties | None = None
        expires_at: float | None = None
        if v5:
            if props.payload_format_indicator == 1:
                try:
                    p.payload.decode("utf-8")
                except UnicodeDecodeError:
                    broker.count_drop("payload_format_invalid")
                    self._complete_or_queue(_PendingAck(None, None, pid, qos, 0x99))
                    return
            fwd = _forwardable(props)
            if props.message_expiry_interval is not None:
                expires_at = broker.clock.now() + props.message_expiry_interval
        retain = p.retain
        if retain and p.payload and not broker.retained.fits(topic, len(p.payload)):
            # Over max_retained_messages / max_retained_bytes. (The byte-level
            # fast path never takes a retained PUBLISH: nothing to mirror there.)
            broker.count_drop("retained_full")
            if v5 and qos:
                self._complete_or_queue(_PendingAck(None, None, pid, qos, 0x97))
                return
            retain = False  # no way to say it: delivered, not retained
        if device_id is None and not self._acks and self._batch is None:
            # The common case: route and acknowledge now, without a pending entry.
            broker.route_publish(topic, p.payload, qos, retain, fwd, expires_at, self.client_id)
            if qos == 1:
                self.write(encode_puback(pid, self.level))  # type: ignore[arg-type]
                self._in_quota -= 1
            elif qos == 2:
                self.send(PubRec(pid))  # type: ignore[arg-type]
            return
        msg: Message | None
        if device_id is None:
            msg = Message(topic, p.payload, qos, retain, fwd, expires_at, self.client_id)
            self._complete_or_queue(_PendingAck(None, msg, pid, qos, 0))
            return
        # Telemetry is routed (once stored) like any message, but usually
        # nobody subscribes to it: then no Message is built and nothing is
        # routed. Decided on arrival, as Mosquitto routes on arrival; a
        # subscription made while the reading is being stored does not get it.
        msg = (
            Message(topic, p.payload, qos, retain, fwd, expires_at, self.client_id)
            if retain or broker.has_subscribers(topic)
            else None
        )
        try:
            readings = decode_telemetry(
                p.payload,
                device_id,
                topic,
                self.client_id,
                props.correlation_data,
                origin,
                broker.input_limits,
            )
        except TelemetryError as e:
            broker.telemetry_error(e, topic)
            self._complete_or_queue(_PendingAck(None, msg, pid, qos, 0x99 if v5 else 0))
            return
        broker.readings_in += len(readings)
        if qos == 2:
            if self._batch is not None:
                self._submit_batch()
            self._enqueue(
                _PendingAck(
                    broker.ingest.submit(readings), msg, pid, 2, 0, None if v5 else readings
                )
            )
            return
        # QoS 0 and 1 telemetry joins the read's batch: one submit and one
        # acknowledgement pass for all of it (reads carry ~15 PUBLISHes under
        # load), submitted at the end of the read (_handle_packets).
        self._join_batch(readings, pid if qos else 0, msg)  # type: ignore[arg-type]

    def _join_batch(self, readings: list[Reading], pid: int, msg: Message | None) -> None:
        """Add one telemetry PUBLISH (QoS 1 if ``pid``, else 0) to the read's batch."""
        batch = self._batch
        if batch is None:
            batch = self._batch = _new_batch()
        batch.readings += readings  # type: ignore[operator]
        if pid:
            batch.pids.append(pid)  # type: ignore[union-attr]
        if msg is not None:
            if batch.msgs is None:
                batch.msgs = []
            batch.msgs.append(msg)
        batch.n += 1
        if batch.n >= self.broker.batch_max:
            self._submit_batch()

    def _submit_batch(self) -> None:
        """Submit the read's telemetry (:attr:`_batch`) and queue its acknowledgements."""
        e = self._batch
        assert e is not None and e.readings is not None
        self._batch = None
        e.fut = self.broker.ingest.submit(e.readings)
        if self.state == CLOSED:
            return  # stored all the same; nobody to acknowledge
        if e.pids:
            e.qos = 1
        if self.level == MQTT_5:
            e.readings = None  # only 3.1.1 submits again (see _hold)
        else:
            self._saturation_check = True
        self._enqueue(e)

    def _enqueue(self, entry: _PendingAck) -> None:
        """Acknowledge ``entry`` now if its turn has come and it is stored (or
        waits for nothing), or queue it (its future armed if it is the first
        one waiting)."""
        fut = entry.fut
        if not self._acks and (fut is None or fut.done()):
            self._complete(entry)
            return
        acks = self._acks
        if acks is _NO_ACKS:
            acks = self._acks = deque()
        acks.append(entry)
        self._waiting += entry.n
        if self._cb_future is None and fut is not None and not fut.done():
            # One callback armed at a time, on the head of the FIFO: futures of
            # one group commit complete together, so this costs one callback
            # per commit, not one per message.
            self._cb_future = fut
            fut.add_done_callback(self._ingest_done)
        if self._waiting >= MAX_PENDING_ACKS_311 and self.level != MQTT_5:
            self._pause_reading(_PAUSE_ACKS)

    def _topic_info(self, topic: str) -> _TopicInfo:
        """Check ``topic`` (wildcards, depth, ACL) and find its telemetry device
        id and origin; remembered per connection (:data:`ACL_CACHE_MAX`)."""
        if "+" in topic or "#" in topic:
            raise ProtocolError(0x90, "wildcard in topic name")
        broker = self.broker
        info: _TopicInfo
        if topic.count("/") >= broker.limits.max_topic_levels:
            info = (_TOO_DEEP, None, None)
        else:
            assert self.principal is not None
            if not broker.authoriser.may_publish(self.principal, topic):
                info = (_DENIED, None, None)
            else:
                telemetry = broker.telemetry
                device_id = telemetry.device_id(topic) if telemetry is not None else None
                # One Origin per topic: readings share it (it is frozen).
                origin = Origin("mqtt", topic, self.client_id) if device_id is not None else None
                info = (_PUBLISH_OK, device_id, origin)
        if len(topic) > CACHED_TOPIC_MAX:
            return info  # not kept: ACL_CACHE_MAX of them would be ~16 MiB per cache
        topics = self._topics
        if topics is None:
            topics = self._topics = {}
        elif len(topics) >= ACL_CACHE_MAX:
            topics.clear()
            self._fast_topics = None
        topics[topic] = info
        if info[1] is not None:
            fast = self._fast_topics
            if fast is None:
                fast = self._fast_topics = {}
            fast[topic.encode()] = (info[1], info[2], topic)  # type: ignore[assignment]
        return info

    def _resolve_alias(self, topic: str, alias: int) -> str:
        if alias == 0 or alias > self.broker.limits.topic_alias_maximum:
            raise ProtocolError(0x94, f"topic alias {alias} out of range")
        aliases = self._aliases_in
        if aliases is None:
            aliases = self._aliases_in = {}
        if topic:
            aliases[alias] = topic
            return topic
        known = aliases.get(alias)
        if known is None:
            raise ProtocolError(0x82, f"unknown topic alias {alias}")
        return known

    def _complete_or_queue(self, entry: _PendingAck) -> None:
        """Acknowledge ``entry`` (which waits for nothing) in its turn: now, or
        after the PUBLISHes before it (the read's batch is submitted first)."""
        if self._batch is not None:
            self._submit_batch()
        self._enqueue(entry)

    def _hold(self, e: _PendingAck) -> None:
        """Keep a refused 3.1.1 PUBLISH at the head of the FIFO until the outbox
        has room; reading stops meanwhile, which is 3.1.1's back-pressure."""
        acks = self._acks
        if acks is _NO_ACKS:
            acks = self._acks = deque()
        acks.appendleft(e)
        self._waiting += e.n
        self._held = True
        self.broker.count_drop("ingest_full_held", e.n)
        self._pause_reading(_PAUSE_SATURATED)
        self.broker.watch_saturation(self)

    def _resubmit_held(self) -> None:
        """The outbox has room again: submit every refused PUBLISH in the FIFO
        again, in order, and wait for them like any other."""
        self._held = False
        if self.state == CLOSED:
            return
        ingest = self.broker.ingest
        for e in self._acks:
            fut = e.fut
            if (
                e.readings is not None
                and fut is not None
                and fut.done()
                and not fut.cancelled()
                and fut.exception() is None
                and fut.result() is IngestStatus.REJECTED_FULL
            ):
                e.fut = ingest.submit(e.readings)
        if self._acks and self._cb_future is None:
            head = self._acks[0].fut
            if head is not None:
                self._cb_future = head
                head.add_done_callback(self._ingest_done)

    def _complete(self, e: _PendingAck) -> bool:
        """Route and acknowledge one inbound PUBLISH whose turn has come.

        False when it was held back (3.1.1, outbox full): stop completing."""
        reason = e.reason
        fut = e.fut
        if fut is not None:
            if fut.cancelled() or fut.exception() is not None:
                # Ingest failed (e.g. the outbox is closing): not stored, so not
                # acknowledged as stored; answered like a full outbox.
                self.broker.count_drop("ingest_failed", e.n)
                status: IngestStatus = IngestStatus.REJECTED_FULL
            else:
                status = fut.result()
                if status is IngestStatus.REJECTED_FULL:
                    self.broker.count_drop("ingest_full", e.n)
            if status is IngestStatus.REJECTED_FULL:
                if self.level != MQTT_5:
                    if e.qos and e.readings is not None:
                        # No refusal code in 3.1.1: hold this PUBLISH (and the
                        # acknowledgements behind it, to keep their order), stop
                        # reading the socket, and submit it again once the
                        # outbox has room (_resubmit_held).
                        self._hold(e)
                        return False
                    if e.qos:
                        # Nothing to submit again: close unacknowledged, the
                        # client sends it again (and it must not look like a duplicate).
                        if e.qos == 2 and self.session is not None:
                            self.session.in_qos2.discard(e.packet_id)
                        self.close()
                    return True
                e.msg = None
                e.msgs = None
                reason = 0x97
            elif status is IngestStatus.REJECTED_INVALID:
                reason = 0x99 if self.level == MQTT_5 else 0
        if e.msg is not None:
            self.broker.route(e.msg)
        qos = e.qos
        pids = e.pids
        if pids is not None:
            if e.msgs is not None:
                for m in e.msgs:
                    self.broker.route(m)
            if pids:
                self.write(encode_pubacks(pids, self.level, reason))
                self._in_quota -= len(pids)
        elif qos == 1:
            self.write(encode_puback(e.packet_id, self.level, reason))  # type: ignore[arg-type]
            self._in_quota -= 1
        elif qos == 2:
            self.send(PubRec(e.packet_id, reason))  # type: ignore[arg-type]
            if reason >= 0x80:
                # An error PUBREC ends the exchange (MQTT 4.3.3).
                self._in_quota -= 1
                if self.session is not None:
                    self.session.in_qos2.discard(e.packet_id)
        return True

    def _ingest_done(self, _fut: asyncio.Future[IngestStatus]) -> None:
        self._cb_future = None
        if self.state == CLOSED:
            self._acks.clear()
            self._waiting = 0
            return
        broker = self.broker
        broker.receiving += 1
        try:
            acks = self._acks
            while acks:
                head = acks[0]
                if head.fut is not None and not head.fut.done():
                    break
                acks.popleft()
                self._waiting -= head.n
                if not self._complete(head):
                    break  # held: the outbox is full; _resubmit_held goes on
                if self.state == CLOSED:
                    acks.clear()
                    self._waiting = 0
                    break
            if acks and self.state != CLOSED and not self._held:
                head_fut = acks[0].fut
                assert head_fut is not None  # the loop stopped at an unfinished future
                self._cb_future = head_fut
                head_fut.add_done_callback(self._ingest_done)
            if self._pause & _PAUSE_ACKS and self._waiting < MAX_PENDING_ACKS_311 // 2:
                self.resume_reading(_PAUSE_ACKS)
        except Exception:
            log.exception("error acknowledging for %s", self.client_id)
            self.close(0x83)
        finally:
            broker.receiving -= 1
            if not broker.receiving:
                broker.flush_writes()

    # --------------------------------------------------- acks from the client

    def _on_puback(self, pid: int) -> None:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2) for a message we sent."""
        session = self.session
        assert session is not None
        done = session.inflight.pop(pid, None)
        if done is not None:
            session.dirty = True
            on_ack = done.delivery.msg.on_ack
            if on_ack is not None:
                on_ack(session.client_id)
            if session.queue or session.retained is not None:
                self._drain_queue()

    def _on_pubrec(self, p: PubRec) -> None:
        session = self.session
        assert session is not None
        inf = session.inflight.get(p.packet_id)
        if inf is None:
            self.send(PubRel(p.packet_id, 0x92 if self.level == MQTT_5 else 0))
            return
        if p.reason_code >= 0x80:
            del session.inflight[p.packet_id]
            session.dirty = True
            if session.queue or session.retained is not None:
                self._drain_queue()
            return
        inf.released = True
        session.dirty = True
        self.send(PubRel(p.packet_id))

    def _on_pubrel(self, pid: int) -> None:
        session = self.session
        assert session is not None
        if pid in session.in_qos2:
            if self._acks and any(a.packet_id == pid and a.qos == 2 for a in self._acks):
                raise ProtocolError(0x82, "PUBREL before PUBREC")
            session.in_qos2.discard(pid)
            if self._in_quota > 0:
                self._in_quota -= 1
            self.send(PubComp(pid))
        else:
            self.send(PubComp(pid, 0x92 if self.level == MQTT_5 else 0))

    # ---------------------------------------------------- SUBSCRIBE / UNSUB

    def _on_subscribe(self, p: Subscribe) -> None:
        broker = self.broker
        session = self.session
        assert session is not None and self.principal is not None
        v5 = self.level == MQTT_5
        sub_id = (
            p.properties.subscription_identifiers[0]
            if v5 and p.properties.subscription_identifiers
            else None
        )
        codes: list[int] = []
        walks: list[RetainedWalk] = []
        max_subs = broker.limits.max_subscriptions_per_client
        max_chars = broker.limits.max_subscription_chars
        for sub in p.subscriptions:
            flt = sub.topic_filter
            if (
                (max_subs and len(session.subscriptions) >= max_subs)
                or (max_chars and session.subscription_chars + len(flt) > max_chars)
            ) and flt not in session.subscriptions:
                # First, so the rest of a huge SUBSCRIBE costs a lookup each.
                broker.count("subscribe_quota_exceeded")
                codes.append(0x97 if v5 else 0x80)
                continue
            try:
                validate_topic_filter(flt)
            except ProtocolError as e:
                codes.append(e.reason_code if v5 else 0x80)
                continue
            if flt.count("/") >= broker.limits.max_topic_levels + (
                2 if flt.startswith("$share/") else 0
            ):
                codes.append(0x8F if v5 else 0x80)
                continue
            shared = flt.startswith("$share/")
            if shared and sub.no_local:
                raise ProtocolError(0x82, "no local on a shared subscription")
            real = flt.split("/", 2)[2] if shared else flt
            if not broker.authoriser.may_subscribe(self.principal, real):
                broker.count("subscribe_denied")
                broker.events.emit(
                    "subscribe_denied",
                    logging.WARNING,
                    "MQTT client %s (user %s) may not subscribe to %s: refused",
                    self.client_id,
                    self._username(),
                    flt,
                )
                codes.append(0x87 if v5 else 0x80)
                continue
            entry = SubEntry(
                flt,
                sub.qos,
                sub.no_local if v5 else False,
                sub.retain_as_published if v5 else False,
                sub.retain_handling if v5 else 0,
                sub_id,
            )
            existed = broker.subscribe(session, entry)
            codes.append(sub.qos)
            if not shared and (
                entry.retain_handling == 0 or (entry.retain_handling == 1 and not existed)
            ):
                ids = (entry.subscription_id,) if entry.subscription_id else ()
                walks.append(RetainedWalk(broker.retained.cursor(real), entry.qos, ids))
        self.send(SubAck(p.packet_id, codes))
        if walks and len(broker.retained):
            backlog = session.retained
            if backlog is None:
                backlog = session.retained = RetainedBacklog(deque(), deque())
            backlog.walks.extend(walks)
            self._drain_queue()

    def _on_unsubscribe(self, p: Unsubscribe) -> None:
        session = self.session
        assert session is not None
        codes = [0x00 if self.broker.unsubscribe(session, f) else 0x11 for f in p.topic_filters]
        self.send(UnsubAck(p.packet_id, codes if self.level == MQTT_5 else []))

    def _on_disconnect(self, p: Disconnect) -> None:
        session = self.session
        if self.level == MQTT_5:
            new_expiry = p.properties.session_expiry_interval
            if new_expiry is not None and session is not None:
                if session.expiry_interval == 0 and new_expiry > 0:
                    raise ProtocolError(0x82, "session expiry changed from 0 at DISCONNECT")
                cap = int(self.broker.limits.max_session_expiry)
                session.expiry_interval = min(new_expiry, cap) if cap else new_expiry
            if p.reason_code == 0x04:
                # "Disconnect with Will Message": the will is sent.
                self._why = "client DISCONNECT 0x04 (with will message)"
                self.state = CLOSED
                self.flush()
                if self.transport is not None:
                    self.transport.close()
                return
        self._normal_disconnect = True
        self._why = "client DISCONNECT"
        self.will = None
        self.state = CLOSED
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------- delivery

    def deliver(self, d: Delivery, cache: dict[Any, Any] | None) -> None:
        """Send (or queue) one message for this connection's session."""
        session = self.session
        if session is None:
            return
        if self.state == CLOSED:
            # Closing (e.g. just disconnected as too slow): as if offline.
            if d.qos and session.persistent:
                self.broker.queue_offline(session, d)
            return
        if (
            self._write_paused
            or session.queue
            or session.retained is not None
            or self._out_bytes >= OUTPUT_PER_TURN
        ):
            self._queue(session, d)
            if not self._write_paused and self.state != CLOSED:
                self._drain_queue()
            return
        if d.qos == 0:
            self._write_publish(d, None, False, cache)
            return
        inflight = session.inflight
        if len(inflight) >= self.window:
            self._queue(session, d)
            return
        pid = session.next_packet_id()
        inflight[pid] = Inflight(pid, d)
        session.dirty = True
        self._write_publish(d, pid, False, cache)

    def _queue(self, session: Session, d: Delivery) -> None:
        """Queue ``d`` within the session's limits (``max_queued_messages``,
        ``max_queued_bytes``). QoS 0 messages are dropped first, counted; if a
        QoS 1/2 one has to go, this client cannot keep up with what it asked
        for at least once: it is told so (v5: DISCONNECT 0x97) and closed, and
        a persistent session keeps the rest of its queue for its return."""
        broker = self.broker
        limits = broker.limits
        dropped, lost_qos = session.enqueue(d, limits.max_queued_messages, limits.max_queued_bytes)
        if not dropped:
            return
        broker.count_drop("queue_full", dropped)
        if lost_qos:
            broker.count("slow_subscriber_disconnects")
            self.close(0x97, "its queue is full: too slow for its QoS 1/2 subscriptions")
            if self._write_paused and self.transport is not None:
                # It does not read: the DISCONNECT would wait behind what it
                # has not read, and a graceful close would wait for it forever.
                self.transport.abort()

    def _drain_queue(self) -> None:
        """Send what waits (retained backlog, then the session queue) while
        the window, the socket and this turn's budget allow; a spent budget
        goes on next turn (:meth:`_output_turn`)."""
        session = self.session
        if session is None:
            return
        if session.retained is not None and not self._send_retained(session, session.retained):
            return
        queue = session.queue
        now = self.broker.clock.now()
        while queue and not self._write_paused and not self._turn_spent():
            d = queue[0]
            if d.msg.expires_at is not None and d.msg.expires_at <= now:
                session.dequeue()
                self.broker.count_drop("expired")
                continue
            if not self._send_head(session, d, session.dequeue):
                break

    def _turn_spent(self) -> bool:
        """Whether this turn's output budget is spent (then it goes on next turn)."""
        if self._out_bytes >= OUTPUT_PER_TURN or self._out_drained >= DRAIN_PER_TURN:
            self._continue_output()
            return True
        return False

    def _send_head(self, session: Session, d: Delivery, pop: Callable[[], object]) -> bool:
        """Send ``d``, the first of what waits, taking it off with ``pop``;
        False (it stays) when it needs a packet id and the window is full."""
        if d.qos == 0:
            pop()
            self._out_drained += 1
            self._write_publish(d, None, False, None)
            return True
        inflight = session.inflight
        if len(inflight) >= self.window:
            return False  # a PUBACK goes on (_on_puback)
        pop()
        pid = session.next_packet_id()
        inflight[pid] = Inflight(pid, d)
        session.dirty = True
        self._out_drained += 1
        self._write_publish(d, pid, False, None)
        return True

    def _send_retained(self, session: Session, backlog: RetainedBacklog) -> bool:
        """Walk and send retained messages owed to SUBSCRIBEs, within this
        turn's budgets; True once all are sent."""
        ready = backlog.ready
        walks = backlog.walks
        while True:
            while ready:
                if (
                    self._write_paused
                    or self._turn_spent()
                    or not self._send_head(session, ready[0], ready.popleft)
                ):
                    return False
            if not walks:
                session.retained = None
                return True
            nodes = RETAINED_NODES_PER_TURN - self._out_walked
            if nodes <= 0:
                self._continue_output()
                return False
            walk = walks[0]
            msgs, visited = walk.cursor.take(nodes)
            self._out_walked += visited
            qos = walk.qos
            for m in msgs:
                ready.append(Delivery(m, m.qos if m.qos < qos else qos, True, walk.sub_ids))
            if walk.cursor.done:
                walks.popleft()

    def _continue_output(self) -> None:
        """This turn's output budget is spent: go on next turn."""
        if not self._output_scheduled:
            self._output_scheduled = True
            self.broker.loop.call_soon(self._output_turn)

    def _output_turn(self) -> None:
        self._output_scheduled = False
        if self.state != CONNECTED or self._write_paused:
            return  # resume_writing goes on
        # A new turn (the last one's output was flushed, or there was none).
        self._out_drained = self._out_walked = 0
        broker = self.broker
        broker.receiving += 1
        try:
            self._drain_queue()
        except Exception:
            log.exception("error sending to MQTT client %s", self.client_id)
            self.close(0x83)
        finally:
            broker.receiving -= 1
            if not broker.receiving:
                broker.flush_writes()

    def _write_publish(
        self, d: Delivery, pid: int | None, dup: bool, cache: dict[Any, Any] | None
    ) -> None:
        msg = d.msg
        if not self._may_read(msg.topic):
            # Read access is checked where data leaves, not only at SUBSCRIBE:
            # queued, in-flight and restored messages were routed under an
            # earlier ACL (a restart with a new configuration) and every path
            # to the client (live, queue, retained, redelivery) passes here.
            self._not_readable(msg.topic, pid)
            return
        level = self.level
        alias: int | None = None
        topic = msg.topic
        if self.alias_max_out:
            aliases = self._aliases_out
            if aliases is None:
                aliases = self._aliases_out = {}
            known = aliases.get(topic)
            if known is not None:
                alias = known
                topic = ""
            elif len(aliases) < self.alias_max_out:
                alias = aliases[topic] = len(aliases) + 1
            cache = None  # per-connection alias state: this encoding is not shareable
        key: Any = None
        if cache is not None and not dup:
            key = (level, d.qos, d.retain, d.sub_ids)
            hit = cache.get(key)
            if hit is not None:
                self._emit(hit, pid)
                return
        props: Properties = EMPTY_PROPS
        if level == MQTT_5:
            base = msg.properties
            expiry = (
                msg.remaining_expiry(self.broker.clock.now())
                if msg.expires_at is not None
                else None
            )
            if base is not None or d.sub_ids or expiry is not None or alias is not None:
                props = Properties(
                    payload_format_indicator=base.payload_format_indicator if base else None,
                    message_expiry_interval=expiry,
                    content_type=base.content_type if base else None,
                    response_topic=base.response_topic if base else None,
                    correlation_data=base.correlation_data if base else None,
                    subscription_identifiers=list(d.sub_ids),
                    topic_alias=alias,
                    user_properties=base.user_properties if base else [],
                )
        data = encode(
            Publish(topic, msg.payload, d.qos, d.retain, dup, pid if d.qos else None, props),
            level,
        )
        enc: bytes | tuple[bytes, bytes] = _split_at_packet_id(data) if d.qos else data
        if key is not None and cache is not None:
            cache[key] = enc
        self._emit(enc, pid)

    def _may_read(self, topic: str) -> bool:
        """The read ACL for ``topic`` (``may_subscribe`` on the topic name),
        remembered per connection: a hit in the authoriser's own cache costs
        ~0.45-0.65 us (it hashes the principal), one in this connection's dict
        ~0.1-0.2 us (timeit on this 2-core machine, loaded), per delivery."""
        readable = self._readable
        if readable is not None:
            hit = readable.get(topic)
            if hit is not None:
                return hit
        principal = self.principal
        if principal is None:
            return True  # not connected yet: nothing is sent
        ok = self.broker.authoriser.may_subscribe(principal, topic)
        if len(topic) > CACHED_TOPIC_MAX:
            return ok
        if readable is None:
            readable = self._readable = {}
        elif len(readable) >= ACL_CACHE_MAX:
            readable.clear()
        readable[topic] = ok
        return ok

    def _not_readable(self, topic: str, pid: int | None) -> None:
        """Drop a message this client may not read (counted, logged)."""
        broker = self.broker
        broker.count_drop("read_not_authorised")
        broker.events.emit(
            "delivery_denied",
            logging.WARNING,
            "MQTT client %s (user %s) may not read %s: not delivered",
            self.client_id,
            self._username(),
            topic,
        )
        session = self.session
        if pid is not None and session is not None:
            session.inflight.pop(pid, None)
            session.dirty = True

    def _emit(self, enc: bytes | tuple[bytes, bytes], pid: int | None) -> None:
        if type(enc) is tuple:
            head, tail = enc
            size = len(head) + 2 + len(tail)
            if self.max_out_packet and size > self.max_out_packet:
                self._too_large(pid)
                return
            self.write(head)
            self.write(pid.to_bytes(2, "big"))  # type: ignore[union-attr]
            self.write(tail)
            self._out_bytes += size
        else:
            assert isinstance(enc, bytes)
            if self.max_out_packet and len(enc) > self.max_out_packet:
                self._too_large(pid)
                return
            self.write(enc)
            self._out_bytes += len(enc)
        self.broker.messages_out += 1

    def _too_large(self, pid: int | None) -> None:
        # MQTT 3.1.2.11.4 (v5 Maximum Packet Size): the server must not send
        # it; it is dropped for this client as if it had been delivered.
        self.broker.count_drop("packet_too_large")
        if pid is not None and self.session is not None:
            self.session.inflight.pop(pid, None)

    # ------------------------------------------------------------ lifecycle

    def packet_stalled(self, now: float, timeout: float) -> bool:
        """Whether a partial packet has taken more than ``timeout`` seconds
        while we were reading (see ``packet_timeout``)."""
        since = self.partial_since
        return since != 0.0 and not self._pause and now - since > timeout

    def packet_timed_out(self) -> None:
        """Called by the broker's sweep when :meth:`packet_stalled`."""
        self.broker.count("packet_timeouts")
        self.close(0x8D, "a partial packet took longer than packet_timeout")

    @property
    def held(self) -> bool:
        """Whether we stopped reading this client for back-pressure (the
        outbox is full or its acknowledgements pile up), not for its own
        doing (a client that does not read what we send is not exempt)."""
        return bool(self._pause & (_PAUSE_SATURATED | _PAUSE_ACKS))

    def keepalive_expired(self) -> None:
        """Called by the broker's sweep: nothing received for 1.5x keep alive."""
        self.broker.count("keepalive_timeouts")
        self._end = "keepalive"
        self.close(0x8D, f"keep alive timeout (nothing received for 1.5 x {self.keepalive} s)")

    def taken_over(self) -> None:
        """Another connection took this client id (v5: DISCONNECT 0x8E)."""
        self._forget_unanswered()
        self.close(0x8E, "session taken over by a new connection with this client id")

    def _forget_unanswered(self) -> None:
        """Drop PUBLISHes still waiting for ingest; the client sends them again.

        QoS 2 ones were not routed yet, so their packet ids must not make the
        re-sent PUBLISH look like a duplicate (it would never be routed).
        """
        if not self._acks:
            return
        session = self.session
        if session is not None:
            for e in self._acks:
                # Not yet routed or stored: a PUBLISH to route, or telemetry
                # waiting for the outbox (which may have no Message to route).
                if e.qos == 2 and (e.msg is not None or e.fut is not None):
                    session.in_qos2.discard(e.packet_id)
        self._acks.clear()
        self._waiting = 0

    def server_shutdown(self) -> None:
        self.close(0x8B, "gateway shutting down")

    def forget_acl(self) -> None:
        """Drop this connection's remembered ACL decisions (publish verdicts,
        the telemetry fast path's topics, read verdicts): the ACL or an
        identity changed, and the next message must be decided afresh."""
        self._topics = None
        self._fast_topics = None
        self._readable = None

    def revoke(self, why: str) -> None:
        """Disconnect at once because this client's identity was revoked
        (device disabled, credential removed or replaced): v5 clients get
        DISCONNECT 0x98 (administrative action); no will is published, as
        the client no longer speaks for anyone."""
        self.forget_acl()
        self.will = None
        self.close(0x98, why)

    def _username(self) -> str | None:
        p = self.principal
        return None if p is None or p.anonymous else p.username

    @property
    def sends_will(self) -> bool:
        return self.will is not None and not self._normal_disconnect

    @property
    def end_reason(self) -> str:
        """Why the connection ended, in the device registry's words: clean
        (DISCONNECT), will (ended without one, will sent: DISCONNECT 0x04 or
        a lost connection), keepalive, error, revoked, taken_over, shutdown."""
        if self._end is not None:
            return self._end
        if self._normal_disconnect:
            return "clean"
        return "will" if self.will is not None else "error"


_END_BY_CODE = {0x8B: "shutdown", 0x8E: "taken_over", 0x98: "revoked"}
"""Registry reasons (:attr:`MqttConnection.end_reason`) for the broker's own
DISCONNECT codes: server shutting down, session taken over, administrative
action (a revoked identity)."""


def _peer_cn(ssl_obj: Any) -> str | None:
    try:
        cert = ssl_obj.getpeercert()
    except Exception:
        return None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
