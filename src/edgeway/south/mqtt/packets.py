"""MQTT control packets as small data classes (MQTT 3.1.1 and 5.0).

These are the events of the sans-IO codec (see ``codec.py``): the codec turns
bytes into these objects and these objects into bytes; it never touches a
socket. One class per packet type; v5-only fields (``properties``, reason codes)
are simply unused (left at their defaults) on a 3.1.1 connection.

Not frozen: the broker reuses a decoded PUBLISH when forwarding, adjusting
qos/packet_id/retain on a copy made with ``dataclasses.replace``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeAlias

MQTT_311 = 4
"""Protocol level byte of MQTT 3.1.1."""
MQTT_5 = 5
"""Protocol level byte of MQTT 5.0."""


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class ReasonCode(enum.IntEnum):
    """MQTT 5.0 reason codes (section 2.4). Some values have several names."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    REAUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnackReturnCode311(enum.IntEnum):
    """MQTT 3.1.1 CONNACK return codes (section 3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USER_NAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE_311 = 0x80
"""MQTT 3.1.1 SUBACK failure return code."""


class ProtocolError(Exception):
    """Raised by the codec (and the broker) for a malformed or illegal packet.

    ``reason_code`` is the v5 reason code to put in the DISCONNECT that closes
    the connection (0x81 malformed packet, 0x82 protocol error, 0x95 packet too
    large, ...). On a 3.1.1 connection the connection is simply closed.

    ``packets`` holds the packets the codec decoded from the same chunk before it met the
    error, in order, so a server may act on them before closing (empty otherwise).
    """

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message
        self.packets: list[Packet] = []


@dataclass(slots=True)
class Properties:
    """MQTT 5.0 properties (section 2.2.2.2). ``None`` means absent.

    Which properties a packet may carry is checked by the codec: a property
    not allowed in a packet type is a malformed packet (0x81) on decode and a
    ``ValueError`` on encode.
    """

    payload_format_indicator: int | None = None  # 0x01, byte
    message_expiry_interval: int | None = None  # 0x02, four-byte int
    content_type: str | None = None  # 0x03
    response_topic: str | None = None  # 0x08
    correlation_data: bytes | None = None  # 0x09
    subscription_identifiers: list[int] = field(
        default_factory=list
    )  # 0x0B, varint, repeatable in PUBLISH
    session_expiry_interval: int | None = None  # 0x11, four-byte int
    assigned_client_identifier: str | None = None  # 0x12
    server_keep_alive: int | None = None  # 0x13, two-byte int
    authentication_method: str | None = None  # 0x15
    authentication_data: bytes | None = None  # 0x16
    request_problem_information: int | None = None  # 0x17, byte
    will_delay_interval: int | None = None  # 0x18, four-byte int
    request_response_information: int | None = None  # 0x19, byte
    response_information: str | None = None  # 0x1A
    server_reference: str | None = None  # 0x1C
    reason_string: str | None = None  # 0x1F
    receive_maximum: int | None = None  # 0x21, two-byte int
    topic_alias_maximum: int | None = None  # 0x22, two-byte int
    topic_alias: int | None = None  # 0x23, two-byte int
    maximum_qos: int | None = None  # 0x24, byte
    retain_available: int | None = None  # 0x25, byte
    user_properties: list[tuple[str, str]] = field(default_factory=list)  # 0x26, repeatable
    maximum_packet_size: int | None = None  # 0x27, four-byte int
    wildcard_subscription_available: int | None = None  # 0x28, byte
    subscription_identifier_available: int | None = None  # 0x29, byte
    shared_subscription_available: int | None = None  # 0x2A, byte


@dataclass(slots=True)
class Will:
    """The will message carried in CONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Connect:
    protocol_level: int  # 4 = 3.1.1, 5 = 5.0 (3 = MQIsdp 3.1 is refused by the broker)
    client_id: str
    clean_start: bool = True  # "clean session" in 3.1.1
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=Properties)
    protocol_name: str = "MQTT"


@dataclass(slots=True)
class ConnAck:
    session_present: bool = False
    reason_code: int = 0  # v5 ReasonCode, or a 3.1.1 ConnackReturnCode311
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Publish:
    topic: str  # may be "" in v5 when properties.topic_alias is set
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # required for qos > 0, absent for qos 0
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class PubAck:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class PubRec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class PubRel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class PubComp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Subscription:
    """One topic filter in a SUBSCRIBE with its options."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False  # v5
    retain_as_published: bool = False  # v5
    retain_handling: int = 0  # v5: 0 send at subscribe, 1 only if new, 2 never


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class SubAck:
    packet_id: int
    reason_codes: list[int]
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: list[str]
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class UnsubAck:
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)  # empty on 3.1.1
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class PingResp:
    pass


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties = field(default_factory=Properties)


@dataclass(slots=True)
class Auth:
    reason_code: int = 0
    properties: Properties = field(default_factory=Properties)


Packet: TypeAlias = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
    | Auth
)
