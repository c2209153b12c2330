"""Sans-IO MQTT 3.1.1 / 5.0 codec: bytes in, packets out; packets in, bytes out.

Configuration that drives it (``edgeway.yaml``)::

    mqtt:
      limits:
        max_packet_size: 1MiB   # -> MqttReader(max_packet_size=1048576)

Usage, in the h11 style (no sockets, no asyncio)::

    reader = MqttReader(max_packet_size=1 << 20)   # server side: version learnt from CONNECT
    for packet in reader.feed(data):               # raises ProtocolError on bad input
        ...
    transport.write(encode(ConnAck(), reader.protocol_level))
    transport.write(encode_puback(packet_id, reader.protocol_level))

Rules the codec keeps, so callers can rely on them:

* ``encode`` raises ``ValueError`` for exactly what ``MqttReader.feed`` would reject as a
  malformed packet or protocol error (qos > 0 without a packet id, a property not allowed in
  that packet type, a reason code not defined for that packet type, a missing topic filter,
  out-of-range integers, ...). Topic *semantics* (wildcards in a PUBLISH topic, filter syntax)
  are checked by neither: the broker calls :func:`validate_topic_name` /
  :func:`validate_topic_filter` and decides between a failure code and a DISCONNECT. That
  keeps decode(encode(p)) == p for every packet ``encode`` accepts. One exception: an MQTT
  3.1 CONNECT (``Connect(3, ..., protocol_name="MQIsdp")``) encodes, so tests can check that
  the broker refuses it.
* On a 3.1.1 connection v5-only fields (properties, ack reason codes, subscription options
  other than qos) are not written and decode to their defaults.
* A QoS 0 PUBLISH has no packet id on the wire: ``packet_id`` is ignored on encode and
  ``None`` on decode.
* ``ProtocolError.reason_code`` is the v5 reason code for the DISCONNECT:

  - 0x81 malformed: bad remaining length, reserved flag bits, truncated or trailing fields,
    bad UTF-8 or U+0000, unknown or not-allowed property, a non-repeatable property given
    twice, qos 3, undefined reason code, SUBSCRIBE/UNSUBSCRIBE without filters, subscription
    options with reserved bits, retain handling 3. For a duplicate property, qos 3 and
    retain handling 3 in SUBSCRIBE and for missing filters the v5 text says "Protocol
    Error"; we answer as Mosquitto 2.0 does (checked on the wire): malformed. Either way
    the connection closes.
  - 0x82 protocol error: packet id 0 (Mosquitto agrees), a first packet that is not
    CONNECT, property values the spec forbids (0/1 flags set to 2+, receive maximum or
    maximum packet size 0, subscription identifier 0), CONNACK with session present and a
    refusal.
  - 0x94 topic alias 0; 0x95 a packet over ``max_packet_size``; 0x84 (as
    :class:`UnsupportedProtocolVersion`) a CONNECT that is not MQTT 3.1.1 or 5.0.
* The codec does not log: every problem is an exception for the connection to act on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from operator import attrgetter
from typing import Any, Final

from edgeway.south.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    PingReq,
    PingResp,
    Properties,
    ProtocolError,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

__all__ = [
    "MAX_REMAINING_LENGTH",
    "PINGREQ_BYTES",
    "PINGRESP_BYTES",
    "MqttReader",
    "UnsupportedProtocolVersion",
    "connack_code",
    "decode_packet",
    "disconnect_code",
    "encode",
    "encode_puback",
    "encode_pubcomp",
    "encode_publish",
    "encode_pubrec",
    "encode_pubrel",
    "validate_topic_filter",
    "validate_topic_name",
]

MAX_REMAINING_LENGTH: Final = 268_435_455
"""Largest remaining length a four-byte Variable Byte Integer can carry (spec 1.5.5)."""

_MAX_VARINT: Final = MAX_REMAINING_LENGTH
_MAX_STRING: Final = 0xFFFF  # UTF-8 strings and binary data carry a two-byte length (1.5.4)

_MALFORMED: Final = 0x81
_PROTOCOL_ERROR: Final = 0x82
_UNSUPPORTED_VERSION: Final = 0x84
_TOPIC_FILTER_INVALID: Final = 0x8F
_TOPIC_NAME_INVALID: Final = 0x90
_TOPIC_ALIAS_INVALID: Final = 0x94
_PACKET_TOO_LARGE: Final = 0x95

PINGREQ_BYTES: Final = b"\xc0\x00"
"""A whole PINGREQ packet (the same in both versions)."""
PINGRESP_BYTES: Final = b"\xd0\x00"
"""A whole PINGRESP packet (the same in both versions)."""

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_ACK_SHORT = struct.Struct(">HH")  # first byte + remaining length 2, then the packet id
_ACK_REASON = struct.Struct(">HHB")  # first byte + remaining length 3, packet id, reason code


class UnsupportedProtocolVersion(ProtocolError):
    """A CONNECT for a protocol other than MQTT 3.1.1 (level 4) or 5.0 (level 5).

    Carries what the broker needs to refuse politely: a 3.1.1-style CONNACK with return
    code 1 for anything that is not level 5 (the client cannot parse a v5 CONNACK), see
    :meth:`connack`.
    """

    def __init__(self, protocol_level: int, protocol_name: str) -> None:
        super().__init__(
            _UNSUPPORTED_VERSION,
            f"unsupported protocol {protocol_name!r} level {protocol_level}",
        )
        self.protocol_level = protocol_level
        self.protocol_name = protocol_name

    def connack(self) -> bytes:
        """The CONNACK refusing this client, encoded in a version it understands."""
        if self.protocol_level == MQTT_5:
            return b"\x20\x03\x00\x84\x00"  # v5: reason 0x84, empty properties
        return b"\x20\x02\x00\x01"  # 3.1.x: return code 1, unacceptable protocol version


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(_MALFORMED, message)


def _protocol_error(message: str) -> ProtocolError:
    return ProtocolError(_PROTOCOL_ERROR, message)


# --------------------------------------------------------------------------------------------
# Reason codes each v5 packet type may carry (spec 2.4 and each packet's reason code table).

_PUBACK_CODES_5: Final = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES_5: Final = frozenset({0x00, 0x92})  # PUBREL and PUBCOMP
_CONNACK_CODES_5: Final = frozenset(
    {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C}
    | {0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
_SUBACK_CODES_5: Final = frozenset(
    {0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}
)
_SUBACK_CODES_311: Final = frozenset({0x00, 0x01, 0x02, 0x80})
_UNSUBACK_CODES_5: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_DISCONNECT_CODES_5: Final = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90}
    | {0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0}
    | {0xA1, 0xA2}
)
_AUTH_CODES_5: Final = frozenset({0x00, 0x18, 0x19})
_CONNACK_CODES_311: Final = frozenset(range(6))

# What a server may answer for a reason it has in v5 terms, when the packet it
# answers with cannot carry that code (spec 3.2.2.2, 3.14.2.1; 3.1.1 3.2.2.3).
_PROTOCOL_VIOLATIONS: Final = frozenset(
    {0x81, 0x82, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x98, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E}
    | {0xA0, 0xA1, 0xA2}
)
_CONNACK_311_FOR: Final = {
    0x84: 1,  # unacceptable protocol version
    0x85: 2,  # identifier rejected
    0x80: 3,  # server unavailable: unspecified, implementation specific, busy, quota ...
    0x83: 3,
    0x88: 3,
    0x89: 3,
    0x8B: 3,
    0x97: 3,
    0x9F: 3,
    0x86: 4,  # bad user name or password
    0x87: 5,  # not authorised: not authorised, banned, bad authentication method
    0x8A: 5,
    0x8C: 5,
}
_DISCONNECT_FOR: Final = {
    0x84: 0x82,  # CONNACK-only codes, as the nearest DISCONNECT code
    0x85: 0x82,
    0x86: 0x87,
    0x8A: 0x87,
    0x8C: 0x87,
    0x88: 0x89,
}


def connack_code(reason: int, protocol_level: int) -> int | None:
    """The code a refusing CONNACK carries for the v5 reason ``reason``, valid
    for ``protocol_level``; None when that version answers with no CONNACK.

    MQTT 5: ``reason`` itself when CONNACK may carry it, else 0x82 (protocol
    error) for a protocol violation and 0x80 (unspecified error) for the rest.
    MQTT 3.1.1 has return codes 1 to 5 only: refusals map to the nearest one
    (0x86 -> 4, 0x87/0x8A -> 5, busy or unavailable -> 3, ...); a protocol
    violation has none, and 3.1.1 says to close without a CONNACK (4.8).
    """
    if protocol_level == MQTT_5:
        if reason in _CONNACK_CODES_5 and reason != 0:
            return reason
        return _PROTOCOL_ERROR if reason in _PROTOCOL_VIOLATIONS else 0x80
    if reason in _PROTOCOL_VIOLATIONS:
        return None
    return _CONNACK_311_FOR.get(reason, 3)


def disconnect_code(reason: int) -> int:
    """The reason code of a server's MQTT 5 DISCONNECT for the v5 reason
    ``reason``: itself when a server's DISCONNECT may carry it, else the
    nearest one (a CONNACK-only refusal as 0x87 or 0x82, anything else as
    0x80 unspecified error). 0x04 is the client's alone. MQTT 3.1.1 has no
    server DISCONNECT: the connection is just closed."""
    if reason in _DISCONNECT_CODES_5 and reason != 0x04:
        return reason
    return _DISCONNECT_FOR.get(reason, 0x80)


# --------------------------------------------------------------------------------------------
# Properties (spec 2.2.2.2). The table is in identifier order, which is also the field order
# of ``Properties``, so one attrgetter call fetches every value for the "is it empty?" test.

_WILL: Final = 0  # pseudo packet type for will properties; type 0 never appears on the wire

_BYTE, _TWO, _FOUR, _VARINT, _STR, _BIN, _PAIR = range(7)

_C = PacketType.CONNECT
_CA = PacketType.CONNACK
_PUB = PacketType.PUBLISH
_ACKS = frozenset({PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP})
_DIS = PacketType.DISCONNECT
_AU = PacketType.AUTH
_ALL_WITH_PROPS = frozenset(
    {_C, _CA, _PUB, _WILL, PacketType.SUBSCRIBE, PacketType.SUBACK, PacketType.UNSUBSCRIBE}
    | {PacketType.UNSUBACK, _DIS, _AU}
    | _ACKS
)

_PROPS: Final[tuple[tuple[int, str, int, frozenset[int]], ...]] = (
    (0x01, "payload_format_indicator", _BYTE, frozenset({_PUB, _WILL})),
    (0x02, "message_expiry_interval", _FOUR, frozenset({_PUB, _WILL})),
    (0x03, "content_type", _STR, frozenset({_PUB, _WILL})),
    (0x08, "response_topic", _STR, frozenset({_PUB, _WILL})),
    (0x09, "correlation_data", _BIN, frozenset({_PUB, _WILL})),
    (0x0B, "subscription_identifiers", _VARINT, frozenset({_PUB, PacketType.SUBSCRIBE})),
    (0x11, "session_expiry_interval", _FOUR, frozenset({_C, _CA, _DIS})),
    (0x12, "assigned_client_identifier", _STR, frozenset({_CA})),
    (0x13, "server_keep_alive", _TWO, frozenset({_CA})),
    (0x15, "authentication_method", _STR, frozenset({_C, _CA, _AU})),
    (0x16, "authentication_data", _BIN, frozenset({_C, _CA, _AU})),
    (0x17, "request_problem_information", _BYTE, frozenset({_C})),
    (0x18, "will_delay_interval", _FOUR, frozenset({_WILL})),
    (0x19, "request_response_information", _BYTE, frozenset({_C})),
    (0x1A, "response_information", _STR, frozenset({_CA})),
    (0x1C, "server_reference", _STR, frozenset({_CA, _DIS})),
    (
        0x1F,
        "reason_string",
        _STR,
        frozenset({_CA, PacketType.SUBACK, PacketType.UNSUBACK, _DIS, _AU}) | _ACKS,
    ),
    (0x21, "receive_maximum", _TWO, frozenset({_C, _CA})),
    (0x22, "topic_alias_maximum", _TWO, frozenset({_C, _CA})),
    (0x23, "topic_alias", _TWO, frozenset({_PUB})),
    (0x24, "maximum_qos", _BYTE, frozenset({_CA})),
    (0x25, "retain_available", _BYTE, frozenset({_CA})),
    (0x26, "user_properties", _PAIR, _ALL_WITH_PROPS),
    (0x27, "maximum_packet_size", _FOUR, frozenset({_C, _CA})),
    (0x28, "wildcard_subscription_available", _BYTE, frozenset({_CA})),
    (0x29, "subscription_identifier_available", _BYTE, frozenset({_CA})),
    (0x2A, "shared_subscription_available", _BYTE, frozenset({_CA})),
)
_PROP_BY_ID: Final = {pid: (name, kind, allowed) for pid, name, kind, allowed in _PROPS}
_props_values: Callable[[Properties], tuple[Any, ...]] = attrgetter(*(p[1] for p in _PROPS))
_EMPTY_PROPS_VALUES: Final = _props_values(Properties())

# Spec: "It is a Protocol Error to include a value other than 0 or 1" for these.
_ZERO_OR_ONE: Final = frozenset(
    {
        "request_problem_information",
        "request_response_information",
        "maximum_qos",
        "retain_available",
        "wildcard_subscription_available",
        "subscription_identifier_available",
        "shared_subscription_available",
    }
)
# Spec: "It is a Protocol Error to include the value 0" for these.
_NON_ZERO: Final = frozenset({"receive_maximum", "maximum_packet_size"})
_INT_LIMIT: Final = {_BYTE: 0xFF, _TWO: 0xFFFF, _FOUR: 0xFFFFFFFF}
_INT_SIZE: Final = {_BYTE: 1, _TWO: 2, _FOUR: 4}


def _packet_name(ptype: int) -> str:
    return "will" if ptype == _WILL else PacketType(ptype).name


# --------------------------------------------------------------------------------------------
# Decoding primitives (slow path: everything but the PUBLISH fast path in MqttReader).


def _read_u16(data: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise _malformed("truncated two-byte integer")
    return (data[pos] << 8) | data[pos + 1], pos + 2


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise _malformed("truncated variable byte integer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift == 28:
            raise _malformed("variable byte integer longer than 4 bytes")


def _read_bin(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise _malformed("truncated length prefix")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise _malformed("length prefix runs past the end of the packet")
    return data[pos + 2 : stop], stop


def _read_str(data: bytes, pos: int, end: int) -> tuple[str, int]:
    raw, pos = _read_bin(data, pos, end)
    try:
        text = raw.decode("utf-8")  # rejects overlongs and surrogates, as spec 1.5.4 requires
    except UnicodeDecodeError:
        raise _malformed("string is not well-formed UTF-8") from None
    if "\x00" in text:
        raise _malformed("string contains U+0000")
    return text, pos


def _read_properties(data: bytes, pos: int, end: int, ptype: int) -> tuple[Properties, int]:
    length, pos = _read_varint(data, pos, end)
    stop = pos + length
    if stop > end:
        raise _malformed("property length runs past the end of the packet")
    props = Properties()
    seen: set[int] = set()
    while pos < stop:
        # Identifiers are variable byte integers, but every defined one is < 0x80, so one byte
        # that is >= 0x80 (or any other undefined value) is an unknown identifier.
        pid = data[pos]
        pos += 1
        spec = _PROP_BY_ID.get(pid)
        if spec is None:
            raise _malformed(f"unknown property identifier 0x{pid:02X}")
        name, kind, allowed = spec
        if ptype not in allowed:
            raise _malformed(f"property {name} not allowed in {_packet_name(ptype)}")
        value: Any
        if kind == _BYTE:
            if pos >= stop:
                raise _malformed(f"truncated property {name}")
            value = data[pos]
            pos += 1
        elif kind == _TWO:
            if pos + 2 > stop:
                raise _malformed(f"truncated property {name}")
            value = (data[pos] << 8) | data[pos + 1]
            pos += 2
        elif kind == _FOUR:
            if pos + 4 > stop:
                raise _malformed(f"truncated property {name}")
            value = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
        elif kind == _VARINT:
            value, pos = _read_varint(data, pos, stop)
        elif kind == _STR:
            value, pos = _read_str(data, pos, stop)
        elif kind == _BIN:
            value, pos = _read_bin(data, pos, stop)
        else:  # _PAIR
            key, pos = _read_str(data, pos, stop)
            val, pos = _read_str(data, pos, stop)
            props.user_properties.append((key, val))
            continue
        if pid == 0x0B:
            if value == 0:
                raise _protocol_error("subscription identifier 0")
            if ptype != _PUB and props.subscription_identifiers:
                raise _malformed("subscription identifier given twice in SUBSCRIBE")
            props.subscription_identifiers.append(value)
            continue
        if pid in seen:
            raise _malformed(f"property {name} given twice")
        seen.add(pid)
        if name in _ZERO_OR_ONE and value > 1:
            raise _protocol_error(f"property {name} must be 0 or 1, got {value}")
        if name in _NON_ZERO and value == 0:
            raise _protocol_error(f"property {name} must not be 0")
        if pid == 0x23 and value == 0:
            raise ProtocolError(_TOPIC_ALIAS_INVALID, "topic alias 0")
        setattr(props, name, value)
    return props, stop


# --------------------------------------------------------------------------------------------
# Packet body decoders: (data, start of body, end of packet, first byte, level) -> Packet.


def _dec_connect(data: bytes, pos: int, end: int, b0: int, level: int | None) -> Connect:
    name, pos = _read_str(data, pos, end)
    if pos >= end:
        raise _malformed("CONNECT truncated before protocol level")
    proto = data[pos]
    if name != "MQTT" or proto not in (MQTT_311, MQTT_5):
        raise UnsupportedProtocolVersion(proto, name)
    if pos + 4 > end:
        raise _malformed("CONNECT truncated in variable header")
    flags = data[pos + 1]
    keepalive = (data[pos + 2] << 8) | data[pos + 3]
    pos += 4
    if flags & 0x01:
        raise _malformed("CONNECT reserved flag set")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = flags & 0x20
    if not will_flag and (will_qos or will_retain):
        raise _malformed("CONNECT will qos/retain set without will flag")
    if will_qos == 3:
        raise _malformed("CONNECT will qos 3")
    if proto == MQTT_311 and flags & 0x40 and not flags & 0x80:
        raise _malformed("CONNECT password without user name (3.1.1)")
    v5 = proto == MQTT_5
    props = Properties()
    if v5:
        props, pos = _read_properties(data, pos, end, _C)
    client_id, pos = _read_str(data, pos, end)
    will = None
    if will_flag:
        will_props = Properties()
        if v5:
            will_props, pos = _read_properties(data, pos, end, _WILL)
        will_topic, pos = _read_str(data, pos, end)
        will_payload, pos = _read_bin(data, pos, end)
        will = Will(will_topic, will_payload, will_qos, will_retain != 0, will_props)
    username = None
    if flags & 0x80:
        username, pos = _read_str(data, pos, end)
    password = None
    if flags & 0x40:
        password, pos = _read_bin(data, pos, end)
    if pos != end:
        raise _malformed("CONNECT has trailing bytes")
    return Connect(
        proto, client_id, flags & 0x02 != 0, keepalive, username, password, will, props, name
    )


def _dec_connack(data: bytes, pos: int, end: int, b0: int, level: int | None) -> ConnAck:
    if end - pos < 2:
        raise _malformed("CONNACK too short")
    ack_flags = data[pos]
    code = data[pos + 1]
    if ack_flags & 0xFE:
        raise _malformed("CONNACK reserved flags set")
    if ack_flags and code:
        # 3.2.2.1.1 / [MQTT-3.2.2-4]: a refused connection has no session.
        raise _protocol_error("CONNACK sets session present with a non-zero reason code")
    pos += 2
    props = Properties()
    if level == MQTT_5:
        if code not in _CONNACK_CODES_5:
            raise _malformed(f"CONNACK reason code 0x{code:02X} undefined")
        props, pos = _read_properties(data, pos, end, _CA)
    elif code not in _CONNACK_CODES_311:
        raise _malformed(f"CONNACK return code {code} undefined")
    if pos != end:
        raise _malformed("CONNACK has trailing bytes")
    return ConnAck(ack_flags == 1, code, props)


_ACK_CLASSES: Final[dict[int, type[PubAck | PubRec | PubRel | PubComp]]] = {
    PacketType.PUBACK: PubAck,
    PacketType.PUBREC: PubRec,
    PacketType.PUBREL: PubRel,
    PacketType.PUBCOMP: PubComp,
}
_ACK_CODES_5: Final[dict[int, frozenset[int]]] = {
    PacketType.PUBACK: _PUBACK_CODES_5,
    PacketType.PUBREC: _PUBACK_CODES_5,
    PacketType.PUBREL: _PUBREL_CODES_5,
    PacketType.PUBCOMP: _PUBREL_CODES_5,
}


def _dec_ack(
    data: bytes, pos: int, end: int, b0: int, level: int | None
) -> PubAck | PubRec | PubRel | PubComp:
    ptype = b0 >> 4
    cls = _ACK_CLASSES[ptype]
    length = end - pos
    if length < 2:
        raise _malformed(f"{cls.__name__} too short")
    packet_id = (data[pos] << 8) | data[pos + 1]
    if packet_id == 0:
        raise _protocol_error(f"{cls.__name__} packet id 0")
    if level != MQTT_5:
        if length != 2:
            raise _malformed(f"{cls.__name__} remaining length {length}, expected 2")
        return cls(packet_id, 0, Properties())
    if length == 2:  # v5 short form: reason 0, no properties (3.4.2.1)
        return cls(packet_id, 0, Properties())
    code = data[pos + 2]
    if code not in _ACK_CODES_5[ptype]:
        raise _malformed(f"{cls.__name__} reason code 0x{code:02X} undefined")
    props = Properties()
    if length > 3:
        props, stop = _read_properties(data, pos + 3, end, ptype)
        if stop != end:
            raise _malformed(f"{cls.__name__} has trailing bytes")
    return cls(packet_id, code, props)


def _dec_subscribe(data: bytes, pos: int, end: int, b0: int, level: int | None) -> Subscribe:
    packet_id, pos = _read_u16(data, pos, end)
    if packet_id == 0:
        raise _protocol_error("SUBSCRIBE packet id 0")
    props = Properties()
    v5 = level == MQTT_5
    if v5:
        props, pos = _read_properties(data, pos, end, PacketType.SUBSCRIBE)
    subs: list[Subscription] = []
    while pos < end:
        topic_filter, pos = _read_str(data, pos, end)
        if pos >= end:
            raise _malformed("SUBSCRIBE truncated before subscription options")
        opts = data[pos]
        pos += 1
        qos = opts & 3
        if v5:
            if opts & 0xC0:
                raise _malformed("SUBSCRIBE options reserved bits set")
            retain_handling = (opts >> 4) & 3
            if qos == 3:
                raise _malformed("SUBSCRIBE maximum qos 3")
            if retain_handling == 3:
                raise _malformed("SUBSCRIBE retain handling 3")
            subs.append(
                Subscription(topic_filter, qos, opts & 0x04 != 0, opts & 0x08 != 0, retain_handling)
            )
        else:
            if opts & 0xFC:
                raise _malformed("SUBSCRIBE options reserved bits set")
            if qos == 3:
                raise _malformed("SUBSCRIBE qos 3")
            subs.append(Subscription(topic_filter, qos))
    if not subs:
        raise _malformed("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, subs, props)


def _dec_suback(data: bytes, pos: int, end: int, b0: int, level: int | None) -> SubAck:
    packet_id, pos = _read_u16(data, pos, end)
    if packet_id == 0:
        raise _protocol_error("SUBACK packet id 0")
    props = Properties()
    allowed = _SUBACK_CODES_311
    if level == MQTT_5:
        props, pos = _read_properties(data, pos, end, PacketType.SUBACK)
        allowed = _SUBACK_CODES_5
    return SubAck(packet_id, _read_reason_codes(data, pos, end, allowed, "SUBACK"), props)


def _read_reason_codes(
    data: bytes, pos: int, end: int, allowed: frozenset[int], packet: str
) -> list[int]:
    """The payload of a SUBACK/UNSUBACK: one or more defined reason codes."""
    codes = list(data[pos:end])
    if not codes:
        raise _malformed(f"{packet} without reason codes")
    for code in codes:
        if code not in allowed:
            raise _malformed(f"{packet} reason code 0x{code:02X} undefined")
    return codes


def _dec_unsubscribe(data: bytes, pos: int, end: int, b0: int, level: int | None) -> Unsubscribe:
    packet_id, pos = _read_u16(data, pos, end)
    if packet_id == 0:
        raise _protocol_error("UNSUBSCRIBE packet id 0")
    props = Properties()
    if level == MQTT_5:
        props, pos = _read_properties(data, pos, end, PacketType.UNSUBSCRIBE)
    filters: list[str] = []
    while pos < end:
        topic_filter, pos = _read_str(data, pos, end)
        filters.append(topic_filter)
    if not filters:
        raise _malformed("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, filters, props)


def _dec_unsuback(data: bytes, pos: int, end: int, b0: int, level: int | None) -> UnsubAck:
    packet_id, pos = _read_u16(data, pos, end)
    if packet_id == 0:
        raise _protocol_error("UNSUBACK packet id 0")
    if level != MQTT_5:
        if pos != end:
            raise _malformed("UNSUBACK remaining length must be 2 in 3.1.1")
        return UnsubAck(packet_id, [], Properties())
    props, pos = _read_properties(data, pos, end, PacketType.UNSUBACK)
    codes = _read_reason_codes(data, pos, end, _UNSUBACK_CODES_5, "UNSUBACK")
    return UnsubAck(packet_id, codes, props)


def _dec_pingreq(data: bytes, pos: int, end: int, b0: int, level: int | None) -> PingReq:
    if pos != end:
        raise _malformed("PINGREQ with a body")
    return PingReq()


def _dec_pingresp(data: bytes, pos: int, end: int, b0: int, level: int | None) -> PingResp:
    if pos != end:
        raise _malformed("PINGRESP with a body")
    return PingResp()


def _read_reason_and_properties(
    data: bytes, pos: int, end: int, ptype: int, allowed: frozenset[int]
) -> tuple[int, Properties]:
    """DISCONNECT/AUTH body: reason code and properties, each omissible from the end."""
    if pos == end:
        return 0, Properties()
    code = data[pos]
    if code not in allowed:
        raise _malformed(f"{_packet_name(ptype)} reason code 0x{code:02X} undefined")
    if pos + 1 == end:
        return code, Properties()
    props, stop = _read_properties(data, pos + 1, end, ptype)
    if stop != end:
        raise _malformed(f"{_packet_name(ptype)} has trailing bytes")
    return code, props


def _dec_disconnect(data: bytes, pos: int, end: int, b0: int, level: int | None) -> Disconnect:
    if level != MQTT_5:
        if pos != end:
            raise _malformed("DISCONNECT with a body in 3.1.1")
        return Disconnect()
    code, props = _read_reason_and_properties(data, pos, end, _DIS, _DISCONNECT_CODES_5)
    return Disconnect(code, props)


def _dec_auth(data: bytes, pos: int, end: int, b0: int, level: int | None) -> Auth:
    code, props = _read_reason_and_properties(data, pos, end, _AU, _AUTH_CODES_5)
    return Auth(code, props)


_DECODERS: Final[tuple[Callable[[bytes, int, int, int, int | None], Packet] | None, ...]] = (
    None,
    _dec_connect,
    _dec_connack,
    None,  # PUBLISH is decoded inline in MqttReader._parse (the hot path)
    _dec_ack,
    _dec_ack,
    _dec_ack,
    _dec_ack,
    _dec_subscribe,
    _dec_suback,
    _dec_unsubscribe,
    _dec_unsuback,
    _dec_pingreq,
    _dec_pingresp,
    _dec_disconnect,
    _dec_auth,
)


def _first_byte_table(level: int | None) -> bytes:
    """256 flags: 1 where a packet may start with that byte at this protocol level.

    Checked as soon as the first byte arrives so a packet with bad fixed-header flags is
    refused before its body is buffered.
    """
    ok = bytearray(256)
    if level is None:  # before CONNECT nothing else may arrive (spec 3.1: first packet)
        ok[0x10] = 1
        return bytes(ok)
    for b0 in range(256):
        ptype, flags = b0 >> 4, b0 & 0x0F
        if ptype == PacketType.PUBLISH:
            qos = (flags >> 1) & 3
            ok[b0] = qos != 3 and not (qos == 0 and flags & 0x08)
        elif ptype in (PacketType.PUBREL, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE):
            ok[b0] = flags == 0x02
        elif 1 <= ptype <= 14 or (ptype == PacketType.AUTH and level == MQTT_5):
            ok[b0] = flags == 0
    return bytes(ok)


_FIRST_BYTE_OK: Final = {
    None: _first_byte_table(None),
    MQTT_311: _first_byte_table(MQTT_311),
    MQTT_5: _first_byte_table(MQTT_5),
}


def _bad_first_byte(b0: int, level: int | None) -> ProtocolError:
    ptype, flags = b0 >> 4, b0 & 0x0F
    if level is None:
        if _FIRST_BYTE_OK[MQTT_5][b0]:
            return _protocol_error(f"first packet must be CONNECT, got {PacketType(ptype).name}")
        level = MQTT_5
    if ptype == 0 or (ptype == PacketType.AUTH and level != MQTT_5):
        return _malformed(f"reserved packet type {ptype}")
    if ptype == PacketType.PUBLISH:
        if (flags >> 1) & 3 == 3:
            return _malformed("PUBLISH qos 3")
        return _malformed("PUBLISH qos 0 with DUP set")
    return _malformed(f"{PacketType(ptype).name} reserved fixed header flags 0x{flags:X}")


# --------------------------------------------------------------------------------------------
# The streaming decoder.


class MqttReader:
    """Streaming MQTT decoder: ``feed(bytes) -> list[Packet]``.

    Buffers a partial packet across calls and returns every complete one. A server-side
    reader is made with ``protocol_level=None`` and learns the version from the CONNECT; a
    client sets it. Raises :class:`ProtocolError` (``reason_code`` = the v5 DISCONNECT reason)
    for bad input; packets decoded earlier in the same chunk are on the exception's
    ``packets`` attribute. After an error the stream is unusable and every later ``feed``
    raises the same error.

    Memory: a packet whose fixed header announces more than ``max_packet_size`` bytes (whole
    packet, as MQTT 5's Maximum Packet Size counts it) is refused with 0x95 before its body is
    buffered, so the reader never holds more than one such packet plus the chunk being fed.

    Speed: building a fresh ``Properties`` (27 slots, two lists) is about half the cost of
    decoding a small PUBLISH. With ``share_empty_properties=True`` every PUBLISH decoded
    without properties gets this reader's one empty ``Properties`` instead (~1.5x faster
    ingest). Only for callers that never mutate a decoded PUBLISH's ``properties`` or its
    lists in place (build a new ``Properties`` instead): a mutation would show up in every
    later PUBLISH from this connection.
    """

    __slots__ = (
        "_empty_properties",
        "_error",
        "_level",
        "_need",
        "_pending",
        "max_packet_size",
    )

    def __init__(
        self,
        max_packet_size: int = MAX_REMAINING_LENGTH,
        protocol_level: int | None = None,
        *,
        share_empty_properties: bool = False,
    ) -> None:
        if max_packet_size < 2:
            raise ValueError("max_packet_size must be at least 2 (the smallest packet)")
        self.max_packet_size = max_packet_size
        self._level: int | None = None
        self.protocol_level = protocol_level
        # The bytes of one incomplete packet, in one growing buffer: a packet
        # trickled in small reads costs about its size (a list of the reads
        # cost ~40 bytes per 1-byte read), and it is copied out once, whole.
        self._pending = bytearray()
        self._need = 0  # total size of the incomplete packet once its header is known
        self._error: ProtocolError | None = None
        self._empty_properties = Properties() if share_empty_properties else None

    @property
    def protocol_level(self) -> int | None:
        """4 (3.1.1), 5 (5.0), or None until a CONNECT is decoded (server side)."""
        return self._level

    @protocol_level.setter
    def protocol_level(self, level: int | None) -> None:
        if level not in (None, MQTT_311, MQTT_5):
            raise ValueError(f"protocol_level must be None, 4 or 5, got {level}")
        self._level = level

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a packet that is not complete yet."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Packet]:
        """Add received bytes; return every packet completed by them, in order."""
        if self._error is not None:
            raise self._stream_failed(self._error)
        if type(data) is not bytes:
            data = bytes(data)  # slices of the chunk become payloads: keep them immutable bytes
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._need:
                return []  # still short of the announced size: copied once, when complete
            data = bytes(pending)
            self._pending = bytearray()
        self._need = 0
        out: list[Packet] = []
        try:
            try:
                pos = self._parse(data, out)
            except IndexError:
                raise _malformed("field runs past the end of the packet") from None
        except ProtocolError as exc:
            exc.packets = out
            self._error = exc
            self._pending = bytearray()
            raise
        if pos < len(data):
            self._pending = bytearray(memoryview(data)[pos:])
        return out

    @staticmethod
    def _stream_failed(first: ProtocolError) -> ProtocolError:
        """The error for a feed after a failure: same type and code, no packets to redo."""
        if isinstance(first, UnsupportedProtocolVersion):
            return UnsupportedProtocolVersion(first.protocol_level, first.protocol_name)
        return ProtocolError(first.reason_code, first.message)

    def _parse(self, data: bytes, out: list[Packet]) -> int:
        """Decode whole packets from ``data`` into ``out``; return where the remainder starts.

        Reads at indexes past ``end`` may raise IndexError only for a truncated field inside a
        complete packet; ``feed`` turns that into a malformed-packet error. Bounds are checked
        once per field group instead of once per byte to keep the PUBLISH path short.
        """
        n = len(data)
        pos = 0
        max_size = self.max_packet_size
        level = self._level
        ok = _FIRST_BYTE_OK[level]
        append = out.append
        fast_v5 = level == MQTT_5
        fast = level is not None  # before CONNECT the first-byte table refuses PUBLISH anyway
        publish = Publish
        properties = Properties
        empty = self._empty_properties  # None unless the caller opted in to sharing
        while pos + 1 < n:
            b0 = data[pos]
            if not ok[b0]:
                raise _bad_first_byte(b0, level)
            length = data[pos + 1]
            body = pos + 2
            if length > 0x7F:
                length &= 0x7F
                shift = 7
                while True:
                    if body >= n:
                        return pos  # remaining length not complete yet
                    byte = data[body]
                    body += 1
                    length |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        break
                    if shift == 21:
                        raise _malformed("remaining length longer than 4 bytes")
                    shift += 7
            end = body + length
            if end - pos > max_size:
                raise ProtocolError(
                    _PACKET_TOO_LARGE,
                    f"packet of {end - pos} bytes exceeds maximum packet size {max_size}",
                )
            if end > n:
                self._need = end - pos
                return pos
            if b0 & 0xF0 == 0x30 and fast:
                # PUBLISH fast path: the broker's hot path, inlined (no per-field calls).
                # A body shorter than 2 bytes makes p > end below (or IndexError at the end
                # of the chunk), so one check covers both the length and the topic.
                p = body + 2 + ((data[body] << 8) | data[body + 1])
                if p > end:
                    raise _malformed("PUBLISH topic runs past the end of the packet")
                try:
                    topic = data[body + 2 : p].decode()
                except UnicodeDecodeError:
                    raise _malformed("PUBLISH topic is not well-formed UTF-8") from None
                if "\x00" in topic:
                    raise _malformed("PUBLISH topic contains U+0000")
                if b0 & 0x06:
                    packet_id = (data[p] << 8) | data[p + 1]
                    p += 2
                    if p > end:
                        raise _malformed("PUBLISH truncated in packet id")
                    if packet_id == 0:
                        raise _protocol_error("PUBLISH packet id 0")
                    if fast_v5:
                        if p >= end:
                            raise _malformed("PUBLISH truncated before properties")
                        if data[p]:
                            props, p = _read_properties(data, p, end, _PUB)
                        else:
                            props = empty or properties()
                            p += 1
                    else:
                        props = empty or properties()
                    append(
                        publish(
                            topic,
                            data[p:end],
                            (b0 >> 1) & 3,
                            b0 & 1 == 1,
                            b0 & 8 == 8,
                            packet_id,
                            props,
                        )
                    )
                else:
                    if fast_v5:
                        if p >= end:
                            raise _malformed("PUBLISH truncated before properties")
                        if data[p]:
                            props, p = _read_properties(data, p, end, _PUB)
                        else:
                            props = empty or properties()
                            p += 1
                    else:
                        props = empty or properties()
                    append(publish(topic, data[p:end], 0, b0 & 1 == 1, False, None, props))
            else:
                decoder = _DECODERS[b0 >> 4]
                # Type 0 was refused by the first-byte table; PUBLISH took the branch above.
                assert decoder is not None
                packet = decoder(data, body, end, b0, level)
                if type(packet) is Connect:
                    # The version is learnt from CONNECT; everything after it uses that level.
                    self._level = level = packet.protocol_level
                    ok = _FIRST_BYTE_OK[level]
                    fast_v5 = level == MQTT_5
                    fast = True
                append(packet)
            pos = end
        return pos


def decode_packet(data: bytes, protocol_level: int) -> Packet:
    """Decode exactly one whole packet (no more, no less bytes), for tests and tools."""
    reader = MqttReader(protocol_level=protocol_level)
    packets = reader.feed(data)
    if len(packets) != 1 or reader.buffered_bytes:
        raise _malformed(
            f"expected exactly one whole packet, got {len(packets)} and "
            f"{reader.buffered_bytes} spare bytes"
        )
    return packets[0]


# --------------------------------------------------------------------------------------------
# Encoding primitives.


def _enc_varint(value: int) -> bytes:
    if not 0 <= value <= _MAX_VARINT:
        raise ValueError(f"variable byte integer out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fixed_header(b0: int, length: int) -> bytes:
    if length < 0x80:
        return bytes((b0, length))
    if length < 0x4000:
        return bytes((b0, (length & 0x7F) | 0x80, length >> 7))
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"packet too large to encode: remaining length {length}")
    return bytes((b0,)) + _enc_varint(length)


def _enc_bin(value: bytes) -> bytes:
    if len(value) > _MAX_STRING:
        raise ValueError(f"binary data longer than {_MAX_STRING} bytes")
    return _U16.pack(len(value)) + value


def _enc_str(value: str) -> bytes:
    if "\x00" in value:
        raise ValueError("MQTT strings must not contain U+0000")
    raw = value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for lone surrogates
    if len(raw) > _MAX_STRING:
        raise ValueError(f"string longer than {_MAX_STRING} bytes in UTF-8")
    return _U16.pack(len(raw)) + raw


def _enc_packet_id(packet_id: int | None, what: str) -> bytes:
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"{what} needs a packet id in 1..65535, got {packet_id}")
    return _U16.pack(packet_id)


def _encode_properties(props: Properties, ptype: int) -> bytes:
    values = _props_values(props)
    if values == _EMPTY_PROPS_VALUES:
        return b"\x00"
    out = bytearray()
    for (pid, name, kind, allowed), value in zip(_PROPS, values, strict=True):
        if value is None or (kind in (_PAIR, _VARINT) and not value):
            continue
        if ptype not in allowed:
            raise ValueError(f"property {name} is not allowed in {_packet_name(ptype)}")
        if kind == _PAIR:
            for key, val in value:
                out.append(0x26)
                out += _enc_str(key)
                out += _enc_str(val)
        elif kind == _VARINT:
            if ptype != _PUB and len(value) > 1:
                raise ValueError("only one subscription identifier is allowed in SUBSCRIBE")
            for sub_id in value:
                if not 0 < sub_id <= _MAX_VARINT:
                    raise ValueError(f"subscription identifier out of range: {sub_id}")
                out.append(0x0B)
                out += _enc_varint(sub_id)
        else:
            out.append(pid)
            if kind == _STR:
                out += _enc_str(value)
            elif kind == _BIN:
                out += _enc_bin(value)
            else:
                if not 0 <= value <= _INT_LIMIT[kind]:
                    raise ValueError(f"property {name} out of range: {value}")
                if name in _ZERO_OR_ONE and value > 1:
                    raise ValueError(f"property {name} must be 0 or 1, got {value}")
                if (name in _NON_ZERO or pid == 0x23) and value == 0:
                    raise ValueError(f"property {name} must not be 0")
                out += value.to_bytes(_INT_SIZE[kind], "big")
    return _enc_varint(len(out)) + bytes(out)


def _check_level(protocol_level: int) -> None:
    if protocol_level != MQTT_5 and protocol_level != MQTT_311:
        raise ValueError(f"protocol_level must be 4 (3.1.1) or 5 (5.0), got {protocol_level}")


# --------------------------------------------------------------------------------------------
# Packet encoders.


def encode_publish(packet: Publish, protocol_level: int) -> bytes:
    """Encode a PUBLISH (the fast path ``encode`` uses for PUBLISH).

    ``packet_id`` is required for qos 1/2 and not written for qos 0. DUP with qos 0 is
    refused, as the decoder would refuse it.
    """
    qos = packet.qos
    topic = packet.topic
    if "\x00" in topic:
        raise ValueError("topic must not contain U+0000")
    raw_topic = topic.encode()
    topic_len = len(raw_topic)
    if topic_len > _MAX_STRING:
        raise ValueError(f"topic longer than {_MAX_STRING} bytes in UTF-8")
    if protocol_level == MQTT_5:
        props = packet.properties
        if _props_values(props) == _EMPTY_PROPS_VALUES:
            props_raw = b"\x00"
        else:
            props_raw = _encode_properties(props, _PUB)
    elif protocol_level == MQTT_311:
        props_raw = b""
    else:
        raise ValueError(f"protocol_level must be 4 or 5, got {protocol_level}")
    payload = packet.payload
    if qos:
        packet_id = packet.packet_id
        if not 0 < qos <= 2 or packet_id is None or not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"PUBLISH qos {qos} needs qos <= 2 and packet id in 1..65535")
        head = _U16.pack(topic_len)
        pid_raw = _U16.pack(packet_id)
        length = 4 + topic_len + len(props_raw) + len(payload)
        b0 = 0x30 | (qos << 1) | (0x08 if packet.dup else 0) | (0x01 if packet.retain else 0)
        return b"".join((_fixed_header(b0, length), head, raw_topic, pid_raw, props_raw, payload))
    if qos != 0:
        raise ValueError(f"PUBLISH qos must be 0, 1 or 2, got {qos}")
    if packet.dup:
        raise ValueError("PUBLISH qos 0 must not have DUP set")
    length = 2 + topic_len + len(props_raw) + len(payload)
    b0 = 0x31 if packet.retain else 0x30
    return b"".join(
        (_fixed_header(b0, length), _U16.pack(topic_len), raw_topic, props_raw, payload)
    )


def _encode_ack(
    first: int, packet_id: int, protocol_level: int, reason_code: int, allowed: frozenset[int]
) -> bytes:
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet id must be in 1..65535, got {packet_id}")
    if reason_code == 0 or protocol_level == MQTT_311:
        return _ACK_SHORT.pack((first << 8) | 2, packet_id)
    if protocol_level != MQTT_5:
        raise ValueError(f"protocol_level must be 4 or 5, got {protocol_level}")
    if reason_code not in allowed:
        raise ValueError(f"reason code 0x{reason_code:02X} undefined for this packet")
    return _ACK_REASON.pack((first << 8) | 3, packet_id, reason_code)


def encode_puback(packet_id: int, protocol_level: int, reason_code: int = 0) -> bytes:
    """A whole PUBACK: 4 bytes (v5 short form when reason is 0; 3.1.1 ignores the reason)."""
    if reason_code == 0 and 0 < packet_id <= 0xFFFF:
        return _ACK_SHORT.pack(0x4002, packet_id)  # the hot path: one struct call
    return _encode_ack(0x40, packet_id, protocol_level, reason_code, _PUBACK_CODES_5)


def encode_pubacks(packet_ids: list[int], protocol_level: int, reason_code: int = 0) -> bytes:
    """PUBACKs for ``packet_ids``, in order, as one bytes (see :func:`encode_puback`)."""
    if reason_code == 0 or protocol_level != MQTT_5:
        n = len(packet_ids)
        words = [0x4002] * (2 * n)
        words[1::2] = packet_ids  # parsed ids: 1..65535 (the reader refuses 0)
        return struct.pack(f">{2 * n}H", *words)
    return b"".join([encode_puback(pid, protocol_level, reason_code) for pid in packet_ids])


def encode_pubrec(packet_id: int, protocol_level: int, reason_code: int = 0) -> bytes:
    """A whole PUBREC (see :func:`encode_puback`)."""
    return _encode_ack(0x50, packet_id, protocol_level, reason_code, _PUBACK_CODES_5)


def encode_pubrel(packet_id: int, protocol_level: int, reason_code: int = 0) -> bytes:
    """A whole PUBREL (see :func:`encode_puback`)."""
    return _encode_ack(0x62, packet_id, protocol_level, reason_code, _PUBREL_CODES_5)


def encode_pubcomp(packet_id: int, protocol_level: int, reason_code: int = 0) -> bytes:
    """A whole PUBCOMP (see :func:`encode_puback`)."""
    return _encode_ack(0x70, packet_id, protocol_level, reason_code, _PUBREL_CODES_5)


def _enc_connect(packet: Connect, protocol_level: int) -> bytes:
    level = packet.protocol_level
    if level != protocol_level:
        raise ValueError(f"CONNECT protocol_level {level} differs from {protocol_level}")
    if (packet.protocol_name, level) not in (("MQTT", 4), ("MQTT", 5), ("MQIsdp", 3)):
        raise ValueError(f"no such protocol: {packet.protocol_name!r} level {level}")
    v5 = level == MQTT_5
    flags = 0x02 if packet.clean_start else 0
    will = packet.will
    if will is not None:
        if not 0 <= will.qos <= 2:
            raise ValueError(f"will qos must be 0, 1 or 2, got {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if packet.username is not None:
        flags |= 0x80
    if packet.password is not None:
        if not v5 and packet.username is None:
            raise ValueError("MQTT 3.1.1 CONNECT cannot carry a password without a user name")
        flags |= 0x40
    if not 0 <= packet.keepalive <= 0xFFFF:
        raise ValueError(f"keepalive out of range: {packet.keepalive}")
    parts = [_enc_str(packet.protocol_name), bytes((level, flags)), _U16.pack(packet.keepalive)]
    if v5:
        parts.append(_encode_properties(packet.properties, _C))
    parts.append(_enc_str(packet.client_id))
    if will is not None:
        if v5:
            parts.append(_encode_properties(will.properties, _WILL))
        parts.append(_enc_str(will.topic))
        parts.append(_enc_bin(will.payload))
    if packet.username is not None:
        parts.append(_enc_str(packet.username))
    if packet.password is not None:
        parts.append(_enc_bin(packet.password))
    body = b"".join(parts)
    return _fixed_header(0x10, len(body)) + body


def _enc_connack(packet: ConnAck, protocol_level: int) -> bytes:
    code = packet.reason_code
    if packet.session_present and code != 0:
        raise ValueError("CONNACK with a non-zero reason code must not set session present")
    first = b"\x01" if packet.session_present else b"\x00"
    if protocol_level == MQTT_5:
        if code not in _CONNACK_CODES_5:
            raise ValueError(f"CONNACK reason code 0x{code:02X} undefined in MQTT 5")
        body = first + bytes((code,)) + _encode_properties(packet.properties, _CA)
    else:
        _check_level(protocol_level)
        if code not in _CONNACK_CODES_311:
            raise ValueError(f"CONNACK return code {code} undefined in MQTT 3.1.1")
        body = first + bytes((code,))
    return _fixed_header(0x20, len(body)) + body


def _enc_ack_packet(packet: PubAck | PubRec | PubRel | PubComp, protocol_level: int) -> bytes:
    first, ptype = _ACK_FIRST[type(packet)]
    _check_level(protocol_level)
    props = packet.properties
    if protocol_level == MQTT_311 or _props_values(props) == _EMPTY_PROPS_VALUES:
        return _encode_ack(
            first, packet.packet_id, protocol_level, packet.reason_code, _ACK_CODES_5[ptype]
        )
    code = packet.reason_code
    if code not in _ACK_CODES_5[ptype]:
        raise ValueError(f"{type(packet).__name__} reason code 0x{code:02X} undefined")
    body = _enc_packet_id(packet.packet_id, type(packet).__name__) + bytes((code,))
    body += _encode_properties(props, ptype)
    return _fixed_header(first, len(body)) + body


_ACK_FIRST: Final[dict[type, tuple[int, int]]] = {
    PubAck: (0x40, PacketType.PUBACK),
    PubRec: (0x50, PacketType.PUBREC),
    PubRel: (0x62, PacketType.PUBREL),
    PubComp: (0x70, PacketType.PUBCOMP),
}


def _enc_subscribe(packet: Subscribe, protocol_level: int) -> bytes:
    _check_level(protocol_level)
    if not packet.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one subscription")
    parts = [_enc_packet_id(packet.packet_id, "SUBSCRIBE")]
    v5 = protocol_level == MQTT_5
    if v5:
        parts.append(_encode_properties(packet.properties, PacketType.SUBSCRIBE))
    for sub in packet.subscriptions:
        if not 0 <= sub.qos <= 2:
            raise ValueError(f"subscription qos must be 0, 1 or 2, got {sub.qos}")
        opts = sub.qos
        if v5:
            if not 0 <= sub.retain_handling <= 2:
                raise ValueError(f"retain_handling must be 0, 1 or 2, got {sub.retain_handling}")
            opts |= (
                (0x04 if sub.no_local else 0)
                | (0x08 if sub.retain_as_published else 0)
                | (sub.retain_handling << 4)
            )
        parts.append(_enc_str(sub.topic_filter))
        parts.append(bytes((opts,)))
    body = b"".join(parts)
    return _fixed_header(0x82, len(body)) + body


def _enc_suback(packet: SubAck, protocol_level: int) -> bytes:
    _check_level(protocol_level)
    if not packet.reason_codes:
        raise ValueError("SUBACK needs at least one reason code")
    v5 = protocol_level == MQTT_5
    allowed = _SUBACK_CODES_5 if v5 else _SUBACK_CODES_311
    for code in packet.reason_codes:
        if code not in allowed:
            raise ValueError(f"SUBACK reason code 0x{code:02X} undefined")
    body = _enc_packet_id(packet.packet_id, "SUBACK")
    if v5:
        body += _encode_properties(packet.properties, PacketType.SUBACK)
    body += bytes(packet.reason_codes)
    return _fixed_header(0x90, len(body)) + body


def _enc_unsubscribe(packet: Unsubscribe, protocol_level: int) -> bytes:
    _check_level(protocol_level)
    if not packet.topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_enc_packet_id(packet.packet_id, "UNSUBSCRIBE")]
    if protocol_level == MQTT_5:
        parts.append(_encode_properties(packet.properties, PacketType.UNSUBSCRIBE))
    parts.extend(_enc_str(f) for f in packet.topic_filters)
    body = b"".join(parts)
    return _fixed_header(0xA2, len(body)) + body


def _enc_unsuback(packet: UnsubAck, protocol_level: int) -> bytes:
    _check_level(protocol_level)
    body = _enc_packet_id(packet.packet_id, "UNSUBACK")
    if protocol_level == MQTT_5:
        if not packet.reason_codes:
            raise ValueError("MQTT 5 UNSUBACK needs at least one reason code")
        for code in packet.reason_codes:
            if code not in _UNSUBACK_CODES_5:
                raise ValueError(f"UNSUBACK reason code 0x{code:02X} undefined")
        body += _encode_properties(packet.properties, PacketType.UNSUBACK)
        body += bytes(packet.reason_codes)
    return _fixed_header(0xB0, len(body)) + body


def _enc_pingreq(packet: PingReq, protocol_level: int) -> bytes:
    return PINGREQ_BYTES


def _enc_pingresp(packet: PingResp, protocol_level: int) -> bytes:
    return PINGRESP_BYTES


def _enc_reason_and_properties(
    first: int, code: int, props: Properties, ptype: int, allowed: frozenset[int]
) -> bytes:
    if code not in allowed:
        raise ValueError(f"{_packet_name(ptype)} reason code 0x{code:02X} undefined")
    if _props_values(props) == _EMPTY_PROPS_VALUES:
        if code == 0:
            return bytes((first, 0))  # short form: remaining length 0
        return bytes((first, 1, code))
    body = bytes((code,)) + _encode_properties(props, ptype)
    return _fixed_header(first, len(body)) + body


def _enc_disconnect(packet: Disconnect, protocol_level: int) -> bytes:
    if protocol_level == MQTT_311:
        return b"\xe0\x00"
    _check_level(protocol_level)
    return _enc_reason_and_properties(
        0xE0, packet.reason_code, packet.properties, _DIS, _DISCONNECT_CODES_5
    )


def _enc_auth(packet: Auth, protocol_level: int) -> bytes:
    if protocol_level != MQTT_5:
        raise ValueError("AUTH exists only in MQTT 5")
    return _enc_reason_and_properties(
        0xF0, packet.reason_code, packet.properties, _AU, _AUTH_CODES_5
    )


_ENCODERS: Final[dict[type, Callable[[Any, int], bytes]]] = {
    Connect: _enc_connect,
    ConnAck: _enc_connack,
    Publish: encode_publish,
    PubAck: _enc_ack_packet,
    PubRec: _enc_ack_packet,
    PubRel: _enc_ack_packet,
    PubComp: _enc_ack_packet,
    Subscribe: _enc_subscribe,
    SubAck: _enc_suback,
    Unsubscribe: _enc_unsubscribe,
    UnsubAck: _enc_unsuback,
    PingReq: _enc_pingreq,
    PingResp: _enc_pingresp,
    Disconnect: _enc_disconnect,
    Auth: _enc_auth,
}


def encode(packet: Packet, protocol_level: int) -> bytes:
    """Encode one packet for a connection at ``protocol_level`` (4 = 3.1.1, 5 = 5.0).

    Raises ``ValueError`` for a packet the decoder would refuse (see the module docstring).
    A CONNECT is encoded at its own ``protocol_level``, which must equal the argument.
    """
    if type(packet) is Publish:
        return encode_publish(packet, protocol_level)
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise TypeError(f"not an MQTT packet: {packet!r}")
    return encoder(packet, protocol_level)


# --------------------------------------------------------------------------------------------
# Topic helpers for the broker.


def validate_topic_name(topic: str, *, alias: bool = False) -> None:
    """Check a PUBLISH topic name; raise ProtocolError if the broker must refuse it.

    ``alias`` is True when the PUBLISH carries a topic alias, which allows an empty name
    (v5 3.3.2.3.4). Reason codes: 0x82 empty without alias (spec: Protocol Error), 0x90
    wildcard or over 65535 bytes, 0x81 U+0000 (a malformed string).
    """
    if not topic:
        if alias:
            return
        raise _protocol_error("empty topic name without a topic alias")
    if "+" in topic or "#" in topic:
        raise ProtocolError(_TOPIC_NAME_INVALID, f"wildcard in topic name {topic!r}")
    if "\x00" in topic:
        raise _malformed("topic name contains U+0000")
    if len(topic) * 4 > _MAX_STRING and len(topic.encode("utf-8", "surrogatepass")) > _MAX_STRING:
        raise ProtocolError(_TOPIC_NAME_INVALID, "topic name longer than 65535 bytes")


def _check_filter_levels(topic_filter: str, whole: str) -> None:
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            raise ProtocolError(
                _TOPIC_FILTER_INVALID, f"'#' must be last and alone in its level: {whole!r}"
            )
        if "+" in level and level != "+":
            raise ProtocolError(_TOPIC_FILTER_INVALID, f"'+' must be alone in its level: {whole!r}")


def validate_topic_filter(topic_filter: str) -> None:
    """Check a SUBSCRIBE/UNSUBSCRIBE topic filter, including ``$share/{group}/{filter}``.

    Raises ProtocolError 0x8F (Topic Filter invalid; the broker puts it in the SUBACK or
    DISCONNECTs), or 0x81 for U+0000 (a malformed string).
    """
    if not topic_filter:
        raise ProtocolError(_TOPIC_FILTER_INVALID, "empty topic filter")
    if "\x00" in topic_filter:
        raise _malformed("topic filter contains U+0000")
    if len(topic_filter) * 4 > _MAX_STRING and (
        len(topic_filter.encode("utf-8", "surrogatepass")) > _MAX_STRING
    ):
        raise ProtocolError(_TOPIC_FILTER_INVALID, "topic filter longer than 65535 bytes")
    if topic_filter.startswith("$share/"):
        group, sep, rest = topic_filter[7:].partition("/")
        if not group or "+" in group or "#" in group:
            raise ProtocolError(
                _TOPIC_FILTER_INVALID, f"shared subscription needs a plain group: {topic_filter!r}"
            )
        if not sep or not rest:
            raise ProtocolError(
                _TOPIC_FILTER_INVALID, f"shared subscription without a filter: {topic_filter!r}"
            )
        _check_filter_levels(rest, topic_filter)
        return
    _check_filter_levels(topic_filter, topic_filter)
