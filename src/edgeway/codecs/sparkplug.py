"""Sparkplug B payloads (Eclipse Sparkplug 3.0, ``spBv1.0`` topic namespace).

Example (the ``sparkplug_b`` preset of ``mqtt_client`` sets this up)::

    codec: sparkplug_b
    codec_options:
      node_device_id: "{node}"              # readings of NBIRTH/NDATA/NDEATH
      device_device_id: "{node}.{device}"   # readings of DBIRTH/DDATA/DDEATH
      state_metric: online                  # births true, deaths false; null: off

The codec reads the message type, group, edge node and device from the MQTT
topic (``origin.address``: ``spBv1.0/{group}/{type}/{node}[/{device}]``).

* ``NBIRTH``/``DBIRTH``: the metric values they carry, plus ``state_metric`` =
  true. A birth teaches the codec the metrics' aliases; an ``NBIRTH`` starts a
  new session of the edge node and forgets its previous aliases. Aliases are
  unique per edge node (its devices share them), so the state is kept per
  (group, node).
* ``NDATA``/``DDATA``: metric values; a metric sent by alias only is named
  from the births. An alias never announced gives ``unknown_alias`` (the host
  should ask the node for a rebirth; this codec only decodes).
* ``NDEATH``/``DDEATH``: ``state_metric`` = false; an ``NDEATH`` forgets the
  node's aliases.
* ``NCMD``/``DCMD`` and ``STATE``: no readings (commands are not telemetry).

Commands go the other way (:meth:`SparkplugCodec.encode_command`, used by the
``sparkplug_b`` preset of MQTT client mode): a device id the codec produced
is mapped back to its group, edge node and device, and a command becomes an
``NCMD`` (node-level id) or ``DCMD`` (device-level id) on
``spBv1.0/{group}/NCMD|DCMD/{node}[/{device}]`` writing one metric: the one
named ``params.metric`` (else the command's name) with ``params.value``, or
several, ``params.metrics`` (name -> value). A device or node whose last message was
a death certificate (``DDEATH``; ``NDEATH`` for the node and its devices) is
not reachable: its commands wait for its next birth. The metric's datatype is the one
its birth announced (else taken from the JSON value: bool, int64, double,
string); when the birth gave it an alias, the metric is sent by alias only,
as Sparkplug 3.0 requires of a node that uses aliases.

Metrics are grouped into one reading per timestamp (a metric's own timestamp,
else the payload's, else the receive time). Control metrics (``bdSeq``,
``Node Control/*``, ``Device Control/*``) and null values are not stored;
DataSet, Template, bytes, file and array values are skipped because a reading
holds scalars only. Signed types are read as two's complement of the unsigned
field that carries them (Sparkplug 3.0 §6.4.16).

The protobuf is decoded by a small reader in this module rather than by the
``protobuf`` package: there is no ``protoc`` on the build machines to generate
``sparkplug_b_pb2`` from the ``.proto``, the payload uses only four wire types
and a dozen fields, and a hand reader raises exactly :class:`DecodeError` for
every malformed input (the property tests feed it arbitrary bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from edgeway.codecs.base import (
    Codec,
    CodecOptions,
    DecodeError,
    check_device_id,
    metric_value,
    parse_timestamp,
    register_codec,
)
from edgeway.limits import DEFAULT_LIMITS, InputLimits
from edgeway.reading import MetricValue, Origin, Reading

NAMESPACE = "spBv1.0"

MAX_ALIASES_PER_NODE = 100_000
"""Aliases remembered per edge node. Real nodes announce hundreds to a few
thousand metrics; the bound keeps a misbehaving node from growing the map
without limit."""

MAX_NODES = 10_000
"""Edge nodes whose alias tables are kept; beyond it the oldest is forgotten
(its next data message then gives ``unknown_alias`` until it is reborn)."""

MAX_TARGETS = 100_000
"""Device ids mapped back to (group, node, device) for commands; beyond it the
oldest is forgotten until the device sends again (about 200 bytes each)."""

MAX_COMMAND_METRICS = 256
"""Metrics one command may write (``params.metrics``): bounds the payload built."""

# Sparkplug B DataType enum (sparkplug_b.proto)
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15

_CONTROL_PREFIXES = ("Node Control/", "Device Control/")
_CONTROL_NAMES = frozenset({"bdSeq"})


# --------------------------------------------------------------------------
# a minimal protobuf wire-format reader


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("protobuf_error", "truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:  # a varint is at most 10 bytes
            raise DecodeError("protobuf_error", "varint too long")


def read_fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Split a message into ``(field number, wire type, value)``.

    Varints come back as ``int`` (unsigned 64-bit), fixed32/fixed64 as raw
    ``bytes`` of 4/8, length-delimited fields as ``bytes``. Groups (wire types 3
    and 4) are refused: proto2 groups are not used by Sparkplug.
    """
    out: list[tuple[int, int, Any]] = []
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("protobuf_error", "field number 0")
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
            value &= (1 << 64) - 1
        elif wire == 1:
            if pos + 8 > n:
                raise DecodeError("protobuf_error", "truncated fixed64")
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > n:
                raise DecodeError("protobuf_error", "truncated length-delimited field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > n:
                raise DecodeError("protobuf_error", "truncated fixed32")
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise DecodeError("protobuf_error", f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


@dataclass(slots=True)
class SparkplugMetric:
    """One ``Payload.Metric`` (only the fields this codec uses).

    ``datatype`` 0 means "not sent" (data messages should leave it out; the
    birth said it). ``value`` is what the encoder writes; the decoder keeps the
    undecoded value field in ``raw`` until the datatype is known.
    """

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int = 0
    is_null: bool = False
    value: MetricValue | None = None
    raw: tuple[int, int, Any] | None = None
    """``(field number, wire type, value)`` of the value oneof, as read."""

    def decoded_value(self, datatype: int) -> MetricValue | None:
        """The value read as ``datatype``; None for null and non-scalar values."""
        if self.is_null or self.raw is None:
            return None
        return _metric_value(*self.raw, datatype)


@dataclass(slots=True)
class SparkplugPayload:
    """A decoded ``Payload``."""

    timestamp: int | None = None
    seq: int | None = None
    metrics: list[SparkplugMetric] = field(default_factory=list)


def _wire(wire: int, expected: int, what: str) -> None:
    if wire != expected:
        raise DecodeError("protobuf_error", f"{what}: wire type {wire}, expected {expected}")


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("protobuf_error", f"{what}: invalid UTF-8") from None


def _decode_metric(buf: bytes) -> SparkplugMetric:
    m = SparkplugMetric()
    for number, wire, value in read_fields(buf):
        if number == 1:
            _wire(wire, 2, "name")
            m.name = _text(value, "name")
        elif number == 2:
            _wire(wire, 0, "alias")
            m.alias = value
        elif number == 3:
            _wire(wire, 0, "timestamp")
            m.timestamp = value
        elif number == 4:
            _wire(wire, 0, "datatype")
            m.datatype = value
        elif number == 7:
            _wire(wire, 0, "is_null")
            m.is_null = bool(value)
        elif 10 <= number <= 19:
            m.raw = (number, wire, value)  # a oneof: the last one wins
    if m.raw is not None:
        m.decoded_value(INT64)  # check the wire type now, whatever the datatype turns out to be
    return m


def _metric_value(number: int, wire: int, value: Any, datatype: int) -> MetricValue | None:
    if number == 10:  # int_value (uint32)
        _wire(wire, 0, "int_value")
        v = int(value) & 0xFFFFFFFF
        if datatype == INT8:
            return _signed(v, 8)
        if datatype == INT16:
            return _signed(v, 16)
        if datatype == INT32:
            return _signed(v, 32)
        return v
    if number == 11:  # long_value (uint64)
        _wire(wire, 0, "long_value")
        v = int(value)
        return _signed(v, 64) if datatype == INT64 else v
    if number == 12:
        _wire(wire, 5, "float_value")
        return float(struct.unpack("<f", value)[0])
    if number == 13:
        _wire(wire, 1, "double_value")
        return float(struct.unpack("<d", value)[0])
    if number == 14:
        _wire(wire, 0, "boolean_value")
        return bool(value)
    if number == 15:
        _wire(wire, 2, "string_value")
        return _text(value, "string_value")
    return None  # bytes, DataSet, Template, extension: not a scalar


def decode_payload(buf: bytes) -> SparkplugPayload:
    """Decode a Sparkplug B ``Payload`` message."""
    p = SparkplugPayload()
    for number, wire, value in read_fields(buf):
        if number == 1:
            _wire(wire, 0, "timestamp")
            p.timestamp = value
        elif number == 2:
            _wire(wire, 2, "metrics")
            p.metrics.append(_decode_metric(value))
        elif number == 3:
            _wire(wire, 0, "seq")
            p.seq = value
    return p


# --------------------------------------------------------------------------
# the codec


class SparkplugOptions(CodecOptions):
    """Options of the ``sparkplug_b`` codec."""

    node_device_id: str = Field(default="{node}", min_length=1)
    """Device id of node-level readings; placeholders ``{group}``, ``{node}``."""
    device_device_id: str = Field(default="{node}.{device}", min_length=1)
    """Device id of device-level readings; placeholders ``{group}``, ``{node}``, ``{device}``."""
    state_metric: str | None = "online"
    """Metric set true by births and false by deaths; ``null`` to leave it out."""


@dataclass(slots=True)
class _NodeState:
    """What the births of one edge node (and its devices) taught."""

    aliases: dict[int, str] = field(default_factory=dict)
    datatypes: dict[str, int] = field(default_factory=dict)
    """``name`` (node metrics) or ``device/name`` -> datatype: data messages omit it."""
    alias_of: dict[str, int] = field(default_factory=dict)
    """``name`` or ``device/name`` -> alias, for commands (aliases are unique per
    node, names only per node or device)."""


_MESSAGE_TYPES = frozenset(
    {"NBIRTH", "DBIRTH", "NDATA", "DDATA", "NDEATH", "DDEATH", "NCMD", "DCMD"}
)


@dataclass(slots=True, frozen=True)
class SparkplugTopic:
    """The parts of a ``spBv1.0/{group}/{type}/{node}[/{device}]`` topic."""

    group: str
    message_type: str
    node: str
    device: str | None

    @classmethod
    def parse(cls, topic: str) -> SparkplugTopic | None:
        """Parse a topic; ``None`` for ``spBv1.0/STATE/...``; :class:`DecodeError` otherwise bad."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != NAMESPACE:
            raise DecodeError("sparkplug_topic", f"not a Sparkplug B topic: {topic[:128]!r}")
        if parts[1] == "STATE":
            return None
        if len(parts) not in (4, 5) or parts[2] not in _MESSAGE_TYPES or not all(parts):
            raise DecodeError("sparkplug_topic", f"not a Sparkplug B topic: {topic[:128]!r}")
        device = parts[4] if len(parts) == 5 else None
        if (device is None) != parts[2].startswith("N"):
            raise DecodeError("sparkplug_topic", f"{parts[2]} with the wrong topic levels")
        return cls(parts[1], parts[2], parts[3], device)


@register_codec
class SparkplugCodec(Codec):
    """Sparkplug B births, data and deaths; learns metric aliases from births.

    One instance keeps the alias tables of every edge node it has seen; use
    one instance per broker subscription.
    """

    name = "sparkplug_b"
    content_types = ("application/vnd.sparkplug.b",)
    coap_formats = ()
    Options = SparkplugOptions

    def __init__(
        self, options: Mapping[str, Any] | None = None, *, limits: InputLimits = DEFAULT_LIMITS
    ) -> None:
        super().__init__(options, limits=limits)
        self._nodes: dict[tuple[str, str], _NodeState] = {}
        self._targets: dict[str, SparkplugTopic] = {}
        """Device id -> the topic parts of its last message (for commands)."""
        self._by_node: dict[tuple[str, str], set[str]] = {}
        """(group, node) -> its device ids in ``_targets`` (an NDEATH marks them
        dead without scanning every target)."""
        self._dead: set[str] = set()
        """Device ids (of ``_targets``) whose last word was a death certificate
        (theirs, or their node's): commands wait for the next birth."""

    def aliases(self, group: str, node: str) -> Mapping[int, str]:
        """The alias table learned for one edge node (for diagnostics and tests)."""
        state = self._nodes.get((group, node))
        return state.aliases if state is not None else {}

    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        topic = SparkplugTopic.parse(origin.address)
        if topic is None or topic.message_type in ("NCMD", "DCMD"):
            return []
        opts: SparkplugOptions = self.options
        msg = decode_payload(payload)
        key = (topic.group, topic.node)
        kind = topic.message_type
        if device_id is None:
            template = opts.node_device_id if topic.device is None else opts.device_device_id
            device_id = check_device_id(
                template.format(group=topic.group, node=topic.node, device=topic.device or "")
            )
        self._track(device_id, topic)

        if kind == "NBIRTH":
            self._nodes.pop(key, None)  # a new session: aliases may have changed
        state = self._nodes.get(key)
        if kind.endswith("BIRTH"):
            if state is None:
                if len(self._nodes) >= MAX_NODES:
                    self._nodes.pop(next(iter(self._nodes)))
                state = self._nodes[key] = _NodeState()
            prefix = "" if topic.device is None else topic.device + "/"
            for m in msg.metrics:
                if m.name is None:
                    continue
                if len(state.datatypes) >= MAX_ALIASES_PER_NODE and m.alias not in state.aliases:
                    raise DecodeError("too_many_aliases", f"more than {MAX_ALIASES_PER_NODE}")
                if m.alias is not None:
                    state.aliases[m.alias] = m.name
                    state.alias_of[prefix + m.name] = m.alias
                state.datatypes[prefix + m.name] = m.datatype

        default_ts = msg.timestamp
        groups: dict[float, dict[str, MetricValue]] = {}
        prefix = "" if topic.device is None else topic.device + "/"
        for m in msg.metrics:
            name = m.name
            if name is None:
                if m.alias is None:
                    raise DecodeError("protobuf_error", "a metric with neither name nor alias")
                name = state.aliases.get(m.alias) if state is not None else None
                if name is None:
                    raise DecodeError("unknown_alias", f"alias {m.alias} of {topic.node}")
            if name in _CONTROL_NAMES or name.startswith(_CONTROL_PREFIXES):
                continue
            datatype = m.datatype
            if not datatype and state is not None:
                datatype = state.datatypes.get(prefix + name, 0)
            value = m.decoded_value(datatype)
            if value is None:
                continue
            raw_ts = m.timestamp if m.timestamp is not None else default_ts
            ts = parse_timestamp(raw_ts, "ms") if raw_ts is not None else now
            groups.setdefault(ts, {})[name] = metric_value(value, name)

        if kind.endswith("DEATH"):
            groups = {}  # a death carries only bdSeq
            if kind == "NDEATH":
                self._nodes.pop(key, None)
        if opts.state_metric is not None and (kind.endswith("BIRTH") or kind.endswith("DEATH")):
            ts = parse_timestamp(default_ts, "ms") if default_ts is not None else now
            groups.setdefault(ts, {})[opts.state_metric] = kind.endswith("BIRTH")
        return [
            Reading(device_id=device_id, ts=ts, metrics=metrics, origin=origin)
            for ts, metrics in groups.items()
        ]

    def _track(self, device_id: str, topic: SparkplugTopic) -> None:
        """Remember where ``device_id`` lives and whether it is alive."""
        targets = self._targets
        node = (topic.group, topic.node)
        if device_id not in targets:
            if len(targets) >= MAX_TARGETS:
                self._forget(next(iter(targets)))
            targets[device_id] = topic
            self._by_node.setdefault(node, set()).add(device_id)
        kind = topic.message_type
        if kind == "NDEATH":
            # The node and every device behind it are gone.
            self._dead.update(self._by_node.get(node, ()))
        elif kind == "DDEATH":
            self._dead.add(device_id)
        elif self._dead:
            # Alive again. A reborn node's devices come back with their own
            # DBIRTHs; until then they stay dead.
            self._dead.discard(device_id)

    def _forget(self, device_id: str) -> None:
        """Drop the oldest target to stay within :data:`MAX_TARGETS`."""
        topic = self._targets.pop(device_id)
        self._dead.discard(device_id)
        node = (topic.group, topic.node)
        peers = self._by_node.get(node)
        if peers is not None:
            peers.discard(device_id)
            if not peers:
                del self._by_node[node]

    def online(self, device_id: str) -> bool:
        """Whether commands can go to ``device_id`` now: the codec decoded a
        message of it and its last word (or its node's) was not a death."""
        return device_id in self._targets and device_id not in self._dead

    def encode_command(
        self, device_id: str, name: str, params: Mapping[str, Any], *, now_ms: int
    ) -> tuple[str, bytes] | None:
        """``(topic, payload)`` of an NCMD/DCMD writing the metrics ``params``
        names (see the module docstring); None if this codec never decoded a
        message of ``device_id`` or its last word was a death. Raises ``ValueError`` for params that cannot
        be written (the command fails with that message)."""
        target = self._targets.get(device_id)
        if target is None or device_id in self._dead:
            return None
        if "metrics" in params:
            wanted = params["metrics"]
            if not isinstance(wanted, dict) or not wanted:
                raise ValueError("params.metrics must be an object of metric name -> value")
            if len(wanted) > MAX_COMMAND_METRICS:
                raise ValueError(f"at most {MAX_COMMAND_METRICS} metrics per command")
        else:
            if "value" not in params:
                raise ValueError("a Sparkplug command needs params.value (or params.metrics)")
            metric = params.get("metric", name)
            if not isinstance(metric, str) or not metric:
                raise ValueError("params.metric must be a metric name")
            wanted = {metric: params["value"]}
        state = self._nodes.get((target.group, target.node))
        prefix = "" if target.device is None else target.device + "/"
        metrics = [_command_metric(state, prefix, m, v) for m, v in wanted.items()]
        kind = "NCMD" if target.device is None else "DCMD"
        topic = f"{NAMESPACE}/{target.group}/{kind}/{target.node}"
        if target.device is not None:
            topic += "/" + target.device
        return topic, encode_payload(metrics, timestamp=now_ms)


_INT_RANGES = {
    INT8: (-(2**7), 2**7 - 1),
    INT16: (-(2**15), 2**15 - 1),
    INT32: (-(2**31), 2**31 - 1),
    INT64: (-(2**63), 2**63 - 1),
    UINT8: (0, 2**8 - 1),
    UINT16: (0, 2**16 - 1),
    UINT32: (0, 2**32 - 1),
    UINT64: (0, 2**64 - 1),
    DATETIME: (0, 2**64 - 1),
}


def _command_metric(
    state: _NodeState | None, prefix: str, name: str, value: Any
) -> SparkplugMetric:
    """One metric of a command: the birth's datatype (checked against the
    value) and alias when known, else a datatype from the JSON value."""
    datatype = state.datatypes.get(prefix + name, 0) if state is not None else 0
    alias = state.alias_of.get(prefix + name) if state is not None else None
    if not datatype:
        datatype = _datatype_of(name, value)
    elif datatype in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: an integer is expected (its birth says so)")
        lo, hi = _INT_RANGES[datatype]
        if not lo <= value <= hi:
            raise ValueError(f"{name}: {value} is out of range for its datatype")
    elif datatype in (FLOAT, DOUBLE):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: a number is expected (its birth says so)")
    elif datatype == BOOLEAN:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: true or false is expected (its birth says so)")
    elif datatype in (STRING, TEXT, UUID):
        if not isinstance(value, str):
            raise ValueError(f"{name}: a string is expected (its birth says so)")
    else:
        raise ValueError(f"{name}: datatype {datatype} cannot be written by a command")
    if alias is not None:
        # Sparkplug 3.0: a node that uses aliases gets commands by alias only.
        return SparkplugMetric(alias=alias, datatype=datatype, value=value)
    return SparkplugMetric(name=name, datatype=datatype, value=value)


def _datatype_of(name: str, value: Any) -> int:
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{name}: {value} does not fit an int64")
        return INT64
    if isinstance(value, float):
        return DOUBLE
    if isinstance(value, str):
        return STRING
    raise ValueError(f"{name}: a number, boolean or string is expected")


# --------------------------------------------------------------------------
# encoding, for simulators and tests (the gateway itself only decodes)


def _enc_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_key(number: int, wire: int) -> bytes:
    return _enc_varint(number << 3 | wire)


def _enc_bytes(number: int, data: bytes) -> bytes:
    return _enc_key(number, 2) + _enc_varint(len(data)) + data


def encode_metric(m: SparkplugMetric) -> bytes:
    """Encode one metric; the value field follows ``datatype`` (Sparkplug 3.0 §6.4.16)."""
    out = bytearray()
    if m.name is not None:
        out += _enc_bytes(1, m.name.encode("utf-8"))
    if m.alias is not None:
        out += _enc_key(2, 0) + _enc_varint(m.alias)
    if m.timestamp is not None:
        out += _enc_key(3, 0) + _enc_varint(m.timestamp)
    out += _enc_key(4, 0) + _enc_varint(m.datatype)
    if m.is_null or m.value is None:
        out += _enc_key(7, 0) + _enc_varint(1)
        return bytes(out)
    v, dt = m.value, m.datatype
    if dt in (INT8, INT16, INT32, UINT8, UINT16, UINT32):
        out += _enc_key(10, 0) + _enc_varint(int(v) & 0xFFFFFFFF)
    elif dt in (INT64, UINT64, DATETIME):
        out += _enc_key(11, 0) + _enc_varint(int(v))
    elif dt == FLOAT:
        out += _enc_key(12, 5) + struct.pack("<f", float(v))
    elif dt == DOUBLE:
        out += _enc_key(13, 1) + struct.pack("<d", float(v))
    elif dt == BOOLEAN:
        out += _enc_key(14, 0) + _enc_varint(1 if v else 0)
    elif dt in (STRING, TEXT, UUID):
        out += _enc_bytes(15, str(v).encode("utf-8"))
    else:
        raise ValueError(f"cannot encode datatype {dt}")
    return bytes(out)


def encode_payload(
    metrics: list[SparkplugMetric], *, timestamp: int | None = None, seq: int | None = None
) -> bytes:
    """Encode a Sparkplug B ``Payload`` (timestamp in ms since the epoch)."""
    out = bytearray()
    if timestamp is not None:
        out += _enc_key(1, 0) + _enc_varint(timestamp)
    for m in metrics:
        out += _enc_bytes(2, encode_metric(m))
    if seq is not None:
        out += _enc_key(3, 0) + _enc_varint(seq)
    return bytes(out)
