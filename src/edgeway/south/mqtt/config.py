"""The embedded MQTT broker's configuration section (``mqtt:``): listeners,
limits, users, ACL and the client event log (docs/protocols/mqtt-broker.md).
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from edgeway.config_types import (
    Duration,
    HostPort,
    InputLimitsSection,
    Size,
    TlsConfig,
    _Model,
)


class ListenerConfig(_Model):
    bind: HostPort = "127.0.0.1:1883"
    """``HOST:PORT``; port 0 picks a free port (logged at start)."""
    transport: Literal["tcp", "websocket"] = "tcp"
    """``websocket`` serves MQTT over WebSocket (subprotocol ``mqtt``) for browsers."""
    websocket_path: str = "/mqtt"
    """HTTP path of the WebSocket endpoint."""
    tls: TlsConfig | None = None
    """Serve TLS on this listener (also for WebSocket: ``wss://``)."""
    allow_anonymous: bool = False
    """Let clients connect without credentials. Embedded defaults turn this on
    for the loopback listener only, and say so in the log."""
    unregistered: Literal["allow", "refuse"] = "allow"
    """Devices the registry does not know: ``allow`` (listed as unregistered) or
    ``refuse`` (CONNACK 0x87 not authorised). See docs/devices.md."""


class MqttLimits(_Model):
    """Broker limits. Each one protects the gateway's memory or fairness."""

    max_packet_size: Size = 1024 * 1024
    """Largest packet accepted (bytes). 1 MiB: telemetry is small; a large
    packet held in memory per connection times 10,000 connections must fit."""
    receive_maximum: int = Field(default=64, ge=1, le=65535)
    """QoS 1/2 PUBLISH a client may have unacknowledged towards us, and the
    inflight window we use towards each client."""
    max_queued_messages: int = Field(default=10000, ge=0)
    """Messages queued per offline persistent session (or per slow online
    one); beyond it the oldest QoS 0 and then the oldest message is dropped
    and counted. Mosquitto's default of 1000 silently loses data (see docs)."""
    max_queued_bytes: Size = 8 * 1024 * 1024
    """The same per session in bytes (topic + payload + ~100), so a few large
    messages cannot take what 10,000 small ones would: 8 MiB is 10,000
    messages of ~700 bytes. Beyond it, as beyond ``max_queued_messages``,
    except that an online client losing a QoS 1/2 message is disconnected
    (v5: 0x97). 0: no byte limit."""
    max_retained_messages: int = Field(default=100_000, ge=0)
    """Topics with a retained message at most (0: no limit). Sites keep a few
    thousand; the bound is against a client retaining on ever new topics
    (each one is kept in memory and on disk, and loaded at start). Beyond it a
    new retained message is refused: v5 QoS 1/2 PUBACK/PUBREC 0x97, not
    routed; otherwise routed without being retained. Counted."""
    max_retained_bytes: Size = 64 * 1024 * 1024
    """The same in bytes (topic + payload + ~200 per message): 64 MiB is
    100,000 messages of ~450 bytes (0: no limit)."""
    max_persistent_sessions: int = Field(default=10_000, ge=0)
    """Sessions kept for their client when it disconnects, at most (0: no
    limit): each holds its subscriptions and a queue of up to
    ``max_queued_bytes``. A CONNECT that would create one more is refused
    (v5 CONNACK 0x97 Quota exceeded, 3.1.1 0x03 Server unavailable); resuming
    or replacing an existing one is not. 10,000 devices per site, one session each."""
    max_subscriptions_per_client: int = Field(default=1000, ge=0)
    """Topic filters one session may hold (0: no limit). Devices hold a few,
    a dashboard a few hundred; each costs a node in the subscription tree and
    a row on disk. Beyond it a filter is refused (SUBACK v5 0x97, 3.1.1 0x80),
    counted, and costs no more work than that check."""
    max_subscription_chars: int = Field(default=256_000, ge=0)
    """Characters of topic filters one session may hold, all filters together
    (0: no limit): a filter may be 65,535 characters, so the count alone let
    one client keep 64 MiB in the subscription tree. 256,000 is 1,000
    filters of 256. Beyond it, as beyond ``max_subscriptions_per_client``."""
    max_connections: int = Field(default=100000, ge=1)
    """Refuse connections beyond this many (file descriptors and memory)."""
    max_connections_per_address: int = Field(default=0, ge=0)
    """Open TCP connections one source address may hold, counted from accept
    (so idle sockets that never send CONNECT count too); beyond it the socket
    is closed at once. 0: no limit (the default, because a site behind one
    NAT address may hold thousands of devices); set it where devices have
    their own addresses."""
    max_failed_logins_per_address: int = Field(default=20, ge=1)
    """Distinct user names failing to log in (bad name, password or token)
    from one source address before it is locked out for 1 s, doubling up to
    60 s (CONNACK 0x8A, no credential checked). It stops one address
    guessing across many user names, which the per-user lockout (5
    failures) alone does not; distinct names, so one misconfigured device
    retrying does not lock out every device sharing its NAT address."""
    connect_timeout: Duration = 10.0
    """Time allowed between TCP accept and CONNECT, against idle sockets."""
    disconnect_linger: Duration = 2.0
    """After a DISCONNECT or refusing CONNACK with a reason, time the client
    gets to read it before the socket is closed; what it sends meanwhile is
    read and discarded (closing with unread input resets the connection and
    the reason is lost). 2 s: a client reads it in milliseconds and closes;
    one that does neither holds only a socket, no session, this long. 0: close
    at once."""
    max_keepalive: int = Field(default=65535, ge=0, le=65535)
    """Upper bound on a client's keep alive; v5 clients are told via Server Keep Alive."""
    max_session_expiry: Duration = 7 * 86400.0
    """Upper bound on how long a persistent session outlives its connection."""
    session_downtime_credit: Duration = 0.0
    """How much of a stop across a reboot counts towards session expiry, at
    most (the wall-clock gap, clamped). 0: none, since a board without a
    real-time clock cannot tell a long stop from a clock correction of years;
    set it (e.g. to max_session_expiry) with a battery-backed clock. A restart
    without a reboot is measured exactly, whatever this says."""
    topic_alias_maximum: int = Field(default=64, ge=0, le=65535)
    """Topic aliases a v5 client may use towards us (bounds the alias table per connection)."""
    max_topic_levels: int = Field(default=32, ge=1)
    """Deeper topics are refused; bounds the subscription tree's depth."""
    packet_timeout: Duration = 60.0
    """Time a packet may take to arrive once its first byte has (0: no limit).
    Keep alive counts any byte, so without it a client sending a byte now and
    then holds its socket and partial packet forever. 60 s carries a 1 MiB
    packet at 140 kbit/s; the connection is closed (v5: DISCONNECT 0x8D)."""


ACL_PLACEHOLDER_RE = re.compile(r"\{(client_id|username|device_id)\}")
"""The placeholders an ACL rule's topic may use (filled per client)."""


def validate_acl_topic(topic: str) -> None:
    """Raise ``ValueError`` unless ``topic`` is a valid ACL pattern: a topic
    filter (``+`` a whole level, ``#`` only as the last level) whose only
    placeholders are ``{client_id}``, ``{username}`` and ``{device_id}``."""
    if not topic:
        raise ValueError("topic must not be empty")
    rest = ACL_PLACEHOLDER_RE.sub("", topic)
    if "{" in rest or "}" in rest:
        bad = re.findall(r"\{[^}]*\}?", rest)
        raise ValueError(
            f"unknown placeholder {bad[0] if bad else '{'!r}; "
            "use {client_id}, {username} or {device_id}"
        )
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError("'#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError("'+' must be a whole level")


class AclRule(_Model):
    """One ACL rule. The first rule matching user/client and topic decides.

    ``topic`` may use ``+``/``#`` and the placeholders ``{client_id}``,
    ``{username}`` and ``{device_id}`` (the same as ``{username}``: the
    verified name); ``access`` is what the rule grants or denies.
    """

    username: str | None = None
    """Match this user (``*`` = any authenticated user, absent = anyone)."""
    device: str | None = None
    """Match this device id (the verified name; ``*`` globs like ``username``).
    Another spelling of ``username`` for rules about devices; give one of them."""
    group: str | None = None
    """Match devices in this group (``edgeway credentials groups ID G1,G2``)."""
    client_id: str | None = None
    """Match this client id (absent = any client)."""
    topic: str
    """Topic filter the rule covers; ``+``, ``#``, ``{client_id}``, ``{username}``,
    ``{device_id}``."""
    access: Literal["publish", "subscribe", "all"] = "all"
    """What the rule covers."""
    allow: bool = True
    """``false`` makes it a deny rule."""

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, v: str) -> str:
        validate_acl_topic(v)
        return v

    @model_validator(mode="after")
    def _one_name_matcher(self) -> Self:
        if self.username is not None and self.device is not None:
            raise ValueError("give username or device, not both (they match the same name)")
        return self


class MqttUser(_Model):
    username: str = Field(min_length=1)
    """The MQTT user name."""
    password_hash: str = Field(pattern=r"^\$argon2(id|i|d)\$")
    """An argon2 hash: make one with ``edgeway passwd``."""


class MqttEventLog(_Model):
    """Log lines for client events (connect, disconnect, refused login, denied
    publish or subscribe), rate-limited per kind with a token bucket."""

    lines_per_second: float = Field(default=10.0, gt=0)
    """Sustained lines per second per kind. 10: a site's normal reconnects all
    show; a reconnect storm of 10,000 devices or a device retrying a denied
    publish in a loop costs ~10 lines/s, and the lines left out are counted in
    the next one."""
    burst: int = Field(default=100, ge=1)
    """Lines per kind that may come at once before the rate applies (a
    gateway restart reconnecting 100 devices is logged in full)."""


class MqttSection(_Model):
    enabled: bool = True
    """Run the embedded MQTT broker."""
    listeners: list[ListenerConfig] = Field(
        default_factory=lambda: [ListenerConfig(bind="127.0.0.1:1883", allow_anonymous=True)]
    )
    """Where devices connect. Default: one TCP listener on 127.0.0.1:1883, anonymous."""
    telemetry_topics: list[str] = Field(default_factory=lambda: ["devices/{device_id}/telemetry"])
    """Topic patterns whose publishes enter the pipeline. ``{device_id}`` is
    one topic level and becomes the reading's device id."""
    limits: MqttLimits = Field(default_factory=MqttLimits)
    """Limits; each protects memory or fairness (see the reason per key)."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for the broker's telemetry
    (only the keys given)."""
    users: list[MqttUser] = Field(default_factory=list)
    """Users allowed to connect with a password (see docs/security.md)."""
    acl: list[AclRule] = Field(default_factory=list)
    """Empty: every authenticated client may publish and subscribe anywhere
    except other devices' ``$``-topics. Non-empty: default deny."""
    event_log: MqttEventLog = Field(default_factory=MqttEventLog)
    """Log lines per client event (see docs/protocols/mqtt-broker.md#logging)."""
