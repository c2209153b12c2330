"""The YAML configuration: schema (pydantic) and loading with precise errors.

Every error names the file, the line and the key path, and what was expected::

    edgeway.yaml:12: mqtt.listeners[0].bind: expected HOST:PORT, got '1883'

Unknown keys are errors (``extra="forbid"`` everywhere). ``edgeway check FILE``
runs :func:`load_config` and prints these errors without starting anything.

Example (every key is optional; this is close to the embedded defaults)::

    gateway:
      id: site-a-gw1
      data_dir: ./edgeway-data
    log: {level: info, format: text}
    mqtt:
      listeners:
        - {bind: "127.0.0.1:1883", allow_anonymous: true}
      telemetry_topics: ["devices/{device_id}/telemetry"]
    outbox: {durability: fsync}
    sinks:
      - {name: cloud, url: "https://ingest.example.com/v1/telemetry"}
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The shared value types live in a leaf module (re-exported: __all__ at the end).
from edgeway.config_types import (
    Duration,
    InputLimitsSection,
    Size,
    TlsConfig,
    _check_codec,
    _is_ip,
    _Model,
    input_limits,
    is_loopback,
    parse_host_port,
)


class GatewaySection(_Model):
    id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    """This gateway's id; part of every record id, so a cloud can tell gateways apart."""
    data_dir: Path = Path("./edgeway-data")
    """Outbox, retained messages, sessions and window state live here."""
    health_interval: Duration = 0.0
    """Send a health summary record of the gateway to every sink this often
    (``record_type: health``, see edgeway/health_report.py). 0: off."""


class LogSection(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level written."""
    format: Literal["text", "json"] = "text"
    """``text`` for people, ``json`` for one JSON object per line (log shippers)."""


class ListenerConfig(_Model):
    bind: str = "127.0.0.1:1883"
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

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, v: str) -> str:
        parse_host_port(v)
        return v


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
        from edgeway.devices.config_auth import validate_acl_topic

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


class OutboxSection(_Model):
    durability: Literal["fsync", "os"] = "fsync"
    """``fsync``: a committed reading survives power loss. ``os``: survives a
    process crash (the OS has it) but not a power cut; faster."""
    max_bytes: Size | None = None
    """Size limit of the stored backlog (none: disk is the limit)."""
    max_age: Duration | None = None
    """Readings older than this are dropped (counted per sink). Ages run on a
    clock that no wall-clock correction moves (docs/outbox.md, "Clocks")."""
    max_age_downtime: Duration = 0.0
    """How much of the time edgeway was stopped counts towards ``max_age``, at
    most (the wall-clock gap since the last commit, clamped). 0: none, since a
    board without a real-time clock cannot tell a long stop from a clock
    correction of years; set it (e.g. to ``max_age``) with a battery-backed clock."""
    when_full: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    """``drop_oldest`` (counted, logged) or ``reject_new`` (back-pressure to devices)."""
    drain: Literal["ordered", "live_first"] = "ordered"
    """``ordered``: per-device order; ``live_first``: fresh readings share the link with a backlog."""
    commit_interval: Duration = 0.0
    """Extra wait before a group commit to gather more readings (0: commit as
    soon as the previous commit finished)."""
    disk_reserve: Size = 8 * 1024 * 1024
    """Disk space held back in ``outbox.db.reserve`` and released when the disk
    is full, so that sinks' confirmations still commit and the backlog drains
    (0: none). 8 MiB is twice the WAL SQLite lets grow between checkpoints
    (1,000 pages of 4 KiB). Readings are refused while the disk is full and
    accepted again once twice this is free."""


class SinkConfig(_Model):
    """A cloud-side sink. ``url``'s scheme picks the type (http, https, mqtt,
    mqtts, nats, amqp, postgresql, file); ``options`` holds the type's own
    settings, validated by that sink type at start-up."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Unique name; appears in counters, logs and dead letters."""
    url: str
    """The scheme picks the type: http, https, mqtt, mqtts, nats, amqp, postgresql, file."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The sink type's own settings; see docs/sinks/."""
    probe_interval: Duration = 1.0
    """While the sink backs off after a connection failure, check this often
    whether its remote side accepts a TCP connection again, and retry at once
    when it does (0: no probe; the retry waits out the backoff, up to 60 s).
    1 s starts a drain within about a second of the cloud's return for one
    connection attempt a second, which a server that is down does not notice."""


_ALLOWED_HOST_RE = re.compile(
    r"^\.?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"
)


class AdminSection(_Model):
    """The local admin API (health, status, Prometheus metrics); see docs/admin-api.md."""

    enabled: bool = True
    """Serve the admin API."""
    listen: str = "127.0.0.1:9180"
    """``HOST:PORT``; keep it on loopback or behind a proxy."""
    auth: Literal["tokens", "none"] | None = None
    """``tokens``: every endpoint but the health probes needs a bearer token
    (``edgeway tokens create``). ``none``: no tokens, allowed only when
    ``listen`` is a loopback address. Absent: ``none`` on a loopback
    ``listen`` (logged at start), ``tokens`` on any other."""
    metrics_public: bool = False
    """Serve ``/metrics`` without a token (for a Prometheus without credentials)."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Extra names accepted in the ``Host`` header (the listener's own address
    and localhost names always are); ``.example.com`` also accepts its
    subdomains. Other names get 421: a defence against DNS rebinding."""
    tls: TlsConfig | None = None
    """Serve the admin API and the HMI over HTTPS with this certificate (the
    session cookie is then ``Secure``)."""
    trend_points: int = Field(default=3600, ge=60, le=10_000_000)
    """Points kept per trended metric for the HMI (3600: an hour at 1 Hz;
    604800: a week). 16 bytes a point, in memory."""
    trend_series: int = Field(default=2000, ge=0, le=1_000_000)
    """Trended metrics at most; memory is at most ``trend_points * trend_series
    * 16`` bytes. Beyond it, new metrics show their latest value only."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            host = name.strip().lower().rstrip(".")
            if not (_ALLOWED_HOST_RE.match(host) or _is_ip(host.strip("[]"))):
                raise ValueError(f"expected a host name or address without port, got {name!r}")
            out.append(host.strip("[]"))
        return out

    @field_validator("auth")
    @classmethod
    def _check_auth(cls, v: str | None, info: ValidationInfo) -> str | None:
        listen = info.data.get("listen")
        if v == "none" and listen is not None and not is_loopback(parse_host_port(listen)[0]):
            raise ValueError(
                f"'none' (no tokens) is only allowed on a loopback admin.listen, got {listen!r}: "
                "create tokens with 'edgeway tokens create' and set auth: tokens"
            )
        return v

    @property
    def tokens_required(self) -> bool:
        """Whether requests need a bearer token (``auth``, or its default for ``listen``)."""
        if self.auth is not None:
            return self.auth == "tokens"
        return not is_loopback(parse_host_port(self.listen)[0])


class ReceiptsSection(_Model):
    enabled: bool = False
    """Publish a receipt once every sink a reading was routed to confirmed it."""
    topic: str = "devices/{device_id}/receipts"
    """Where receipts go; ``{device_id}`` is replaced."""


class CommandsMqttSection(_Model):
    """Commands to devices on the embedded broker."""

    topic: str = "devices/{device_id}/commands/{name}"
    """Where a command is published (QoS 1); ``{device_id}`` and ``{name}`` are replaced.
    A device subscribes to it (``devices/<its id>/commands/#``) to take commands."""
    result_topic: str = "devices/{device_id}/commands/{name}/result"
    """Where a device publishes its answer (MQTT 5: also sent as the response topic,
    with the command id as correlation data; 3.1.1 devices put ``id`` in the payload)."""

    @field_validator("topic", "result_topic")
    @classmethod
    def _check_template(cls, v: str) -> str:
        if "{device_id}" not in v or "{name}" not in v:
            raise ValueError("needs both {device_id} and {name}")
        if "+" in v or "#" in v:
            raise ValueError("a command topic cannot contain wildcards")
        return v


class CommandsSection(_Model):
    """The durable command queue to devices (``edgeway.commands``)."""

    enabled: bool = True
    """Accept commands (API, CLI, cloud, rules) and deliver them to devices."""
    max_per_device: int = Field(default=1000, ge=1, le=1_000_000)
    """Unfinished commands queued per device; beyond it a new command is refused
    (``queue_full``, counted). Bounds the memory one device's backlog can take."""
    default_ttl: Duration = Field(default=3600.0, gt=0)
    """How long a command may wait for its device before it expires, unless the
    command says otherwise."""
    max_ttl: Duration = Field(default=7 * 86400.0, gt=0)
    """The longest time to live a command may ask for."""
    result_timeout: Duration = Field(default=30.0, gt=0)
    """How long after delivery the device has to report a result before the command
    ends ``timed_out``, unless the command says otherwise."""
    max_params_bytes: Size = Field(default=65536, ge=2)
    """Largest JSON encoding of a command's parameters (and of a device's result)."""
    history: Duration = Field(default=7 * 86400.0, gt=0)
    """How long finished commands stay listed (``edgeway command list``) before they
    are purged."""
    max_history: int = Field(default=100_000, ge=100)
    """Finished commands kept at most; the oldest are purged first."""
    mqtt: CommandsMqttSection = Field(default_factory=CommandsMqttSection)
    """The embedded broker's command topics."""


def _public_keys(value: dict[str, str]) -> dict[str, str]:
    from edgeway.signing import check_public_keys

    check_public_keys(value)
    return value


PublicKeys = Annotated[dict[str, str], AfterValidator(_public_keys)]
"""Trusted Ed25519 public keys by name (PEM, or base64 of the 32 raw bytes);
one that does not parse is a configuration error naming its key."""


class ModelsSection(_Model):
    """The model registry and the inference thread (``edgeway.ml``, docs/models.md)."""

    enabled: bool = True
    """Keep a model registry and run ``model`` steps (needs the ``ml`` extra:
    onnxruntime). Off: ``model`` steps pass readings through unscored."""
    max_size: Size = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest model file accepted by an upload."""
    keys: PublicKeys = Field(default_factory=dict)
    """Trusted Ed25519 public keys by name (PEM text, or base64 of the 32 raw
    bytes); an upload's signature must match one of them."""
    require_signature: bool = False
    """Refuse uploads without a valid signature."""
    queue: int = Field(default=1000, ge=1, le=1_000_000)
    """Inference jobs (one per step batch) waiting for the inference thread;
    beyond it rows are not scored and are counted (``dropped``)."""
    window: int = Field(default=200, ge=10, le=100_000)
    """Calls each version's budget is judged over."""
    min_calls: int = Field(default=20, ge=1)
    """Calls a version makes before it is judged."""
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    """Share of failed calls (an exception, a NaN or infinite output) over which a
    version is taken out of service (an active one rolled back)."""
    max_latency: Duration = Field(default=0.05, gt=0)
    """p99 of a version's call latency over which it is taken out of service."""
    agree_within: float = Field(default=0.05, ge=0)
    """Shadow comparison: outputs that differ by at most this count as agreeing."""


class TwinsSection(_Model):
    """Device twins: desired and reported state per device (``edgeway.twins``, docs/twins.md)."""

    enabled: bool = True
    """Keep twins (DATA_DIR/twins.db) and serve them over MQTT, HTTP and the admin API."""
    max_bytes: Size = Field(default=64 * 1024, ge=2, le=16 * 1024 * 1024)
    """Largest JSON encoding of one document (desired or reported); a patch
    that would make it larger is refused (``too_large``)."""
    max_depth: int = Field(default=8, ge=1, le=64)
    """Deepest nesting of objects and arrays in a document (``too_deep``)."""


class FirmwareSection(_Model):
    """Firmware images and update campaigns (``edgeway.firmware``, docs/firmware.md)."""

    enabled: bool = True
    """Keep firmware images (DATA_DIR/firmware) and run campaigns."""
    max_image_size: Size = Field(default=256 * 1024 * 1024, ge=1024)
    """Largest image accepted by an upload."""
    keys: PublicKeys = Field(default_factory=dict)
    """Trusted Ed25519 public keys by name (PEM, or base64 of the 32 raw bytes)."""
    require_signature: bool = True
    """Refuse images without a valid signature (turn off only to try the feature)."""
    download_base: str | None = None
    """The URL devices download images from, up to ``/firmware/{image}``
    (``http://gateway.site:8080``: the HTTP ingest listener as devices reach it).
    Absent: the command carries no URL; devices that know the gateway's address
    build it themselves."""


class FleetSection(_Model):
    """Configurations pushed by the cloud, signed (``edgeway.runtime.fleet``, docs/fleet.md)."""

    enabled: bool = True
    """Take ``config.apply`` commands addressed to this gateway's id (from any
    cloud downlink: the MQTT, NATS or HTTP sink's commands). They are refused
    unless ``keys`` holds the key that signed them."""
    keys: PublicKeys = Field(default_factory=dict)
    """Trusted Ed25519 public keys by name (PEM, or base64 of the 32 raw bytes).
    A pushed configuration must keep at least one of them, so that the next one
    can still be verified."""


class AlarmTypeSection(_Model):
    """How alarms of one type behave (``alarms.types.TYPE``, ``alarms.defaults``)."""

    latching: bool = False
    """ISA-18.2 latching: the alarm stays active after its condition cleared,
    until an operator resets it."""
    require_confirm: bool = False
    """OPC UA Part 9 confirm: an acknowledged alarm stays listed until an
    operator also confirms it."""


class AlarmsSection(_Model):
    """Alarms: the state machine, its journal and health figures (``edgeway.alarms``)."""

    enabled: bool = True
    """Keep alarms (rules raise them; the API and CLI act on them)."""
    max_alarms: int = Field(default=10_000, ge=1, le=1_000_000)
    """Alarms kept at once (active, unacknowledged, shelved, suppressed); a raise
    of a new one beyond it is refused and counted. Bounds memory (about 2 KB each,
    measured with a short message and one value)."""
    max_shelve: Duration = Field(default=8 * 3600.0, gt=0)
    """Longest timed shelving (ISA-18.2: shelving is time-limited; one shift)."""
    standing_after: Duration = Field(default=24 * 3600.0, gt=0)
    """An alarm active longer than this counts as standing (stale)."""
    flood_threshold: int = Field(default=10, ge=1)
    """More than this many alarms in 10 minutes is a flood (ISA-18.2: 10)."""
    history: Duration = Field(default=30 * 86400.0, gt=0)
    """How long transitions stay in the journal (``edgeway alarms history``)."""
    max_history: int = Field(default=100_000, ge=100)
    """Transitions kept at most; the oldest are purged first."""
    defaults: AlarmTypeSection = Field(default_factory=AlarmTypeSection)
    """Behaviour of every type not listed under ``types``."""
    types: dict[str, AlarmTypeSection] = Field(default_factory=dict)
    """Behaviour per alarm type (``high_temperature: {latching: true}``)."""


class DevicesSection(_Model):
    """The device registry and device status (``edgeway.devices``; docs/devices.md)."""

    enabled: bool = True
    """Keep the registry (``devices.db``) and every device's status."""
    flush_interval: Duration = Field(default=2.0, gt=0, le=60)
    """How often status (last seen, online, ...) is written: one write per device
    that changed per interval, never one per reading."""
    offline_after: Duration = 300.0
    """A device without a connection (HTTP, CoAP, pollers) is offline after this
    long without a message; 0: never by silence."""
    max_unregistered: int = Field(default=10_000, ge=0)
    """Records kept for devices seen but not registered; beyond it they are
    counted, not recorded (ids on the wire are the sender's choice)."""
    events: bool = False
    """Send lifecycle events (connected, disconnected, auth_failed, registered,
    revoked) up through the outbox to every sink (``record_type:
    device_event``). Off by default: it adds records of a new type to what the
    cloud receives, which its receiver must expect."""
    events_per_second: float = Field(default=200.0, gt=0)
    """Most lifecycle events per second (burst 1,000); the rest are counted."""


# --------------------------------------------------------------------------
# south adapters: CoAP, Modbus, OPC-UA, serial, BLE (edgeway.south.*)


class CoapSection(_Model):
    """The CoAP listener (``edgeway.south.coap``)."""

    enabled: bool = True
    """Run the CoAP listener (the section's presence turns it on)."""
    listen: str = "127.0.0.1:5683"
    """``HOST:PORT`` (UDP); port 0 picks a free port (logged at start)."""
    allow_anonymous: bool = True
    """Accept requests for devices that have no CoAP token in the credential
    store, without a token. ``true`` (the default, as before per-device
    tokens): a trusted network; ``false``: only devices given a token
    (``edgeway credentials issue ID --kind coap``, sent as the Uri-Query
    ``token=...``) may post. A device that has a token must always send it."""
    max_body_size: Size = 64 * 1024
    """Largest request body accepted, after Block1 reassembly (4.13 beyond).
    64 KiB: a SenML pack of a few hundred records; a body is held in memory
    until the outbox has it, for every device uploading at once."""
    default_format: str = "json"
    """Codec for requests without a Content-Format option."""
    codec_options: dict[str, Any] = Field(default_factory=dict)
    """Options for the codec of each content format, by codec name."""
    retry_after: Duration = 5.0
    """Max-Age sent with 5.03 when the outbox refuses new readings."""
    probe_interval: Duration = 5.0
    """Seconds between the listener's checks of itself: a CoAP ping from the
    gateway to its own listener. When three pings in a row (1 s each) go
    unanswered the listener is marked not serving (``/healthz`` 503) and
    restarted. 5 s: a listener that stopped reading is noticed within about
    8 s, for one 4-byte datagram per interval. 0 turns the checks off."""
    unregistered: Literal["allow", "refuse"] = "allow"
    """Devices the registry does not know: ``allow`` (listed as unregistered) or
    ``refuse`` (4.03 Forbidden). See docs/devices.md."""
    observe: Literal["allow", "deny"] = "allow"
    """Who may observe ``devices/{id}/commands``: ``allow``: clients whose
    address is in ``observe_networks`` (any address when that is empty);
    ``deny``: nobody (4.03 Forbidden; devices poll with a plain GET)."""
    observe_networks: list[str] = Field(default_factory=list)
    """Client networks (CIDR, e.g. ``10.20.0.0/16``) allowed to observe, and
    with ``commands`` on, to poll commands and post results; empty: any.
    Without DTLS the source address is the only identity CoAP offers; others
    get 4.03 Forbidden."""
    max_observations: int = Field(default=1000, ge=0)
    """Observations held at once over all clients (5.03 with Max-Age beyond).
    Each holds a task, a pipe and its request in memory (9.1 KB measured with
    tracemalloc over 2,000 observations): 1,000 is about 9 MB, a site's
    devices several times over."""
    max_observations_per_address: int = Field(default=8, ge=0)
    """Observations held at once per client IP address (5.03 with Max-Age
    beyond), so that one address cannot take the whole ``max_observations``.
    An address holds one observation per device (observing it again replaces
    the old one), so 8 is a gateway or host behind one address watching 8
    devices' commands."""
    commands: bool = False
    """Take commands to devices over this listener: devices observe (or GET)
    ``devices/{id}/commands`` and POST results to
    ``devices/{id}/commands/{command_id}/result``. Off by default: without
    DTLS a CoAP client has no credentials, so whoever can reach the port (from
    ``observe_networks``, when set) can take any device's commands. Turn it on
    on a trusted network only."""
    command_poll_wait: Duration = Field(default=1.0, gt=0, le=60)
    """Longest wait of a plain GET (no Observe) of ``devices/{id}/commands`` for
    the queue to hand it a command (2.05 with an empty payload after it). A
    queued command is handed over after one commit (a few ms); 1 s leaves room
    for a busy disk. Devices that wait longer should observe instead."""
    max_command_polls: int = Field(default=1000, ge=1)
    """Plain GETs of commands waiting at once (5.03 with Max-Age beyond): each
    holds a request and a task (a few KB) for up to ``command_poll_wait``."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this adapter (only the keys given)."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @field_validator("observe_networks")
    @classmethod
    def _check_observe_networks(cls, v: list[str]) -> list[str]:
        for i, net in enumerate(v):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"[{i}]: {e}") from None
        return v

    @model_validator(mode="after")
    def _check_codecs(self) -> Self:
        # So that `edgeway check` finds these, not only the adapter at start-up.
        for name, options in self.codec_options.items():
            try:
                _check_codec(name, options)
            except ValueError as e:
                raise ValueError(f"codec_options.{name}: {e}") from None
        try:
            _check_codec(self.default_format, self.codec_options.get(self.default_format, {}))
        except ValueError as e:
            raise ValueError(f"default_format: {e}") from None
        return self


ModbusFunction = Literal["coils", "discrete_inputs", "holding_registers", "input_registers"]
ModbusDataType = Literal[
    "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string", "bits"
]


class ModbusPoint(_Model):
    """One value in a Modbus register map."""

    metric: str = Field(min_length=1)
    """Metric name in the reading."""
    address: int = Field(ge=0, le=65535)
    """Zero-based protocol address (register 40001 is holding address 0)."""
    data_type: ModbusDataType = "uint16"
    """Ignored for coils and discrete inputs (always booleans)."""
    count: int = Field(default=1, ge=1, le=125)
    """Registers for ``string``; registers for ``bits`` (16 booleans each);
    coils or inputs for coils/discrete inputs (more than 1: ``metric.N``)."""
    byte_order: Literal["big", "little"] = "big"
    """Byte order inside each 16-bit register (Modbus itself is big-endian)."""
    word_order: Literal["big", "little"] = "big"
    """Register order of 32/64-bit values: ``big`` = high word first."""
    scale: float = 1.0
    """Multiplier applied to the raw number."""
    offset: float = 0.0
    """value = raw * scale + offset (numbers only)."""
    unit: str | None = None
    """Stored as the tag ``unit:<metric>`` on each reading."""
    writable: bool = False
    """Allow :meth:`ModbusAdapter.write` (holding registers and coils only)."""


class ModbusGroup(_Model):
    """Points read together at one interval, from one table of one unit."""

    function: ModbusFunction = "holding_registers"
    """Modbus table the group reads (function code 1, 2, 3 or 4)."""
    unit_id: int | None = Field(default=None, ge=0, le=255)
    """Defaults to the device's ``unit_id``."""
    interval: Duration = 10.0
    """Time between two polls of the group."""
    points: list[ModbusPoint] = Field(min_length=1)
    """Values read; adjacent addresses share one request."""


class ModbusDeviceConfig(_Model):
    """One Modbus TCP server or RTU line polled by ``edgeway.south.modbus``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name (logs, state, commands)."""
    enabled: bool = True
    """Poll this device."""
    device_id: str = Field(min_length=1, max_length=128)
    """Device id of the readings."""
    transport: Literal["tcp", "rtu"] = "tcp"
    """``tcp`` (Modbus TCP) or ``rtu`` (serial line)."""
    host: str | None = None
    """TCP: the server's host."""
    port: int = Field(default=502, ge=1, le=65535)
    """TCP: the server's port."""
    serial_port: str | None = None
    """RTU: the serial device (``/dev/ttyUSB0``)."""
    baudrate: int = Field(default=9600, ge=50)
    """RTU: line speed."""
    bytesize: Literal[7, 8] = 8
    """RTU: data bits."""
    parity: Literal["N", "E", "O"] = "N"
    """RTU: parity (none, even, odd)."""
    stopbits: Literal[1, 2] = 1
    """RTU: stop bits."""
    unit_id: int = Field(default=1, ge=0, le=255)
    """Unit (slave) id; a group may override it."""
    timeout: Duration = 3.0
    """Per request; a timeout drops the connection and reconnects with backoff."""
    max_gap: int = Field(default=0, ge=0, le=124)
    """Merge points into one request across gaps of up to this many unused
    registers (some devices refuse reads of unmapped registers: default 0)."""
    groups: list[ModbusGroup] = Field(min_length=1)
    """Register groups, each polled at its own interval."""

    @field_validator("host")
    @classmethod
    def _host_nonempty(cls, v: str | None) -> str | None:
        if v is not None and not v:
            raise ValueError("expected a host name or address")
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport tcp needs 'host'")
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError("transport rtu needs 'serial_port'")
        return self


class OpcUaNode(_Model):
    """One OPC-UA variable mapped to a metric."""

    metric: str = Field(min_length=1)
    """Metric name in the reading."""
    node_id: str | None = None
    """``ns=2;i=1001`` or ``ns=2;s=Boiler.Temp``."""
    browse_path: str | None = None
    """From the Objects folder: ``2:Boiler/2:Temperature``."""
    sampling_interval: Duration = 1.0
    """How often the server samples the variable."""
    deadband: float | None = Field(default=None, ge=0)
    """Report only changes larger than this (none: every change)."""
    deadband_type: Literal["absolute", "percent"] = "absolute"
    """``percent`` is of the variable's EURange."""
    writable: bool = False
    """Allow ``write()`` commands to this node."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("give exactly one of 'node_id' and 'browse_path'")
        return self


class OpcUaMethod(_Model):
    """A method that commands may call."""

    name: str = Field(min_length=1)
    """Name that ``call()`` uses."""
    object: str
    """Node id or browse path of the object that owns the method."""
    method: str
    """Node id of the method, or its browse name relative to ``object`` (``2:Reset``)."""


class OpcUaSecurity(_Model):
    policy: Literal["None", "Basic256Sha256"] = "None"
    """Security policy of the secure channel."""
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    """Message security mode with a policy other than None."""
    certificate: Path | None = None
    """Our client certificate (DER or PEM); required with Basic256Sha256."""
    private_key: Path | None = None
    """Key of ``certificate`` (PEM or DER, unencrypted)."""
    server_certificate: Path | None = None
    """Pin the server's certificate; absent: take the one the endpoint offers."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if self.policy != "None" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"policy {self.policy} needs 'certificate' and 'private_key'")
        return self


class OpcUaServerConfig(_Model):
    """One OPC-UA server subscribed to by ``edgeway.south.opcua``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name (logs, state, commands)."""
    enabled: bool = True
    """Subscribe to this server."""
    device_id: str = Field(min_length=1, max_length=128)
    """Device id of the readings."""
    endpoint: str = Field(pattern=r"^opc\.tcp://")
    """Server endpoint URL, ``opc.tcp://host:port/path``."""
    username: str | None = None
    """User name token; absent: anonymous."""
    password: str | None = None
    """Password of ``username``."""
    security: OpcUaSecurity = Field(default_factory=OpcUaSecurity)
    """Secure channel policy, mode and certificates."""
    publishing_interval: Duration = 1.0
    """Subscription publishing interval."""
    timeout: Duration = 5.0
    """Request timeout; connecting may take three times this."""
    nodes: list[OpcUaNode] = Field(min_length=1)
    """Variables monitored, one metric each."""
    methods: list[OpcUaMethod] = Field(default_factory=list)
    """Methods commands may call."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this server (only the keys given):
    string values and source timestamps come from the server."""


class SerialCsv(_Model):
    columns: list[str] = Field(min_length=1)
    """Metric name per column, in order; ``""`` skips a column."""
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    """Column separator (one character)."""
    header: bool = False
    """Skip lines equal to the joined column names."""


class SerialPortConfig(_Model):
    """One serial line device read by ``edgeway.south.serial``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name (logs, state)."""
    enabled: bool = True
    """Read this port."""
    device_id: str = Field(min_length=1, max_length=128)
    """Device id of the readings."""
    port: str = Field(min_length=1)
    """Serial device (``/dev/ttyUSB0``) or a pyserial URL (``socket://host:port``)."""
    baudrate: int = Field(default=9600, ge=50)
    """Line speed."""
    bytesize: Literal[5, 6, 7, 8] = 8
    """Data bits."""
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    """Parity: none, even, odd, mark, space."""
    stopbits: float = Field(default=1, ge=1, le=2)
    """1, 1.5 or 2."""
    format: Literal["json", "csv", "kv", "nmea"] = "json"
    """Line format: JSON objects, CSV, ``key=value`` pairs or NMEA 0183."""
    csv: SerialCsv | None = None
    """Column map for ``format: csv``."""
    codec_options: dict[str, Any] = Field(default_factory=dict)
    """Options of the ``json`` codec for JSON lines."""
    max_line: Size = 4096
    """Longest line kept (bytes). NMEA sentences are at most 82 characters and
    telemetry lines a few hundred; a longer line is noise or a wrong baud
    rate, and is dropped and counted."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this port (only the keys given)."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if self.format == "csv" and self.csv is None:
            raise ValueError("format csv needs 'csv: {columns: [...]}'")
        if self.stopbits not in (1, 1.5, 2):
            raise ValueError(f"stopbits must be 1, 1.5 or 2, got {self.stopbits}")
        return self


class BleDevice(_Model):
    address: str = Field(pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
    """Bluetooth address ``AA:BB:CC:DD:EE:FF``."""
    device_id: str = Field(min_length=1, max_length=128)
    """Device id of its readings."""


class BleSection(_Model):
    """BTHome v2 advertisements received by ``edgeway.south.ble``."""

    enabled: bool = True
    """Scan for BTHome advertisements."""
    adapter: str | None = None
    """Bluetooth adapter (``hci0``); absent: the system default."""
    devices: list[BleDevice] = Field(default_factory=list)
    """Known devices by address."""
    allow_unknown: bool = False
    """Also take advertisements from unlisted devices (device id
    ``bthome-<address without colons>``)."""
    scanning_mode: Literal["active", "passive"] = "passive"
    """``passive`` listens only; ``active`` also asks for scan responses."""


class HttpIngestSection(_Model):
    """HTTP ingest (``edgeway.south.http``): ``POST /devices/{device_id}/telemetry``."""

    enabled: bool = True
    """Run the HTTP ingest listener (the section's presence turns it on)."""
    name: str = Field(default="http", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name: the readings' origin and the name in logs and the status."""
    listen: str = "127.0.0.1:8080"
    """``HOST:PORT``; port 0 picks a free port (logged at start)."""
    tls: TlsConfig | None = None
    """Serve HTTPS with this certificate (``require_client_cert`` for mutual TLS)."""
    tokens: dict[str, str] = Field(default_factory=dict)
    """Bearer token per device id; the key ``"*"`` is a token valid for every
    device (a trusted upstream). A value ``sha256:<64 hex digits>`` is the
    SHA-256 of the token, so the file need not hold the token itself."""
    allow_anonymous: bool = False
    """Accept requests without a token. Off by default: nothing is reachable
    without credentials unless the operator says so (guarantee 5)."""
    max_body_size: Size = 256 * 1024
    """Largest request body (413 beyond). 256 KiB: a SenML pack or JSON array
    of about a thousand readings; each body is held in memory until the outbox
    has it, for every device uploading at once."""
    rate_limit: float | None = Field(default=None, gt=0)
    """Requests per second per device (token bucket, 429 beyond); absent: no limit."""
    rate_burst: int = Field(default=10, ge=1)
    """Requests a device may send at once before ``rate_limit`` applies."""
    retry_after: Duration = 5.0
    """Seconds sent in Retry-After with 429 and 503."""
    ack_timeout: Duration = 30.0
    """Longest wait for the outbox before answering 503 (the reading may
    still be stored; the device's retry is then a duplicate the cloud drops)."""
    default_codec: str = "json"
    """Codec for a request without Content-Type."""
    codec_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Options for the codec of each content type, by codec name."""
    command_poll_max: Duration = Field(default=60.0, gt=0, le=3600)
    """Longest ``wait`` of a command long-poll (``GET /devices/{id}/commands``)."""
    max_command_polls: int = Field(default=10_000, ge=1)
    """Devices long-polling for commands at once (503 beyond): one poll holds a
    connection and about a kilobyte."""
    commands_allow_anonymous: bool = False
    """Let devices without a token poll commands and post results. Off even with
    ``allow_anonymous``: whoever polls takes the device's commands."""
    unregistered: Literal["allow", "refuse"] = "allow"
    """Devices the registry does not know: ``allow`` (listed as unregistered) or
    ``refuse`` (403). See docs/devices.md."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this adapter (only the keys given)."""

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, v: dict[str, str]) -> dict[str, str]:
        for device, token in v.items():
            if token.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", token):
                raise ValueError(f"{device}: sha256: must be followed by 64 hex digits")
            if len(token) < 16:
                raise ValueError(f"{device}: a token needs at least 16 characters")
        return v

    @model_validator(mode="after")
    def _check_codecs(self) -> Self:
        _check_codec(self.default_codec, self.codec_options.get(self.default_codec, {}))
        for name, options in self.codec_options.items():
            _check_codec(name, options)
        return self


class MqttClientTls(_Model):
    ca: Path | None = None
    """CA bundle that signed the broker's certificate; absent: the system's CAs."""
    cert: Path | None = None
    """Client certificate (PEM) for brokers that authenticate clients by certificate."""
    key: Path | None = None
    """Private key of ``cert`` (PEM, unencrypted)."""


def _check_topic_template(key: str, template: str, placeholders: tuple[str, ...]) -> None:
    """A topic name template: ``{device_id}`` a level, only ``placeholders``
    as whole levels, no wildcards."""
    levels = template.split("/")
    if "{device_id}" not in levels:
        raise ValueError(f"{key} needs {{device_id}} as a level")
    for level in levels:
        if level.startswith("{") and level not in placeholders:
            raise ValueError(f"{key}: unknown placeholder {level!r}")
        if "+" in level or "#" in level or "\x00" in level:
            raise ValueError(f"{key}: no wildcards in a topic name")


class MqttClientSubscription(_Model):
    """One topic pattern of an external broker, its device ids and its codec."""

    topic: str = Field(min_length=1)
    """An MQTT filter in which ``{device_id}`` (and optionally ``{metric_prefix}``)
    each stand for one topic level: ``plant/+/sensors/{device_id}``."""
    codec: str = "json"
    """Payload format of these topics (see docs/codecs.md)."""
    codec_options: dict[str, Any] = Field(default_factory=dict)
    """Options of ``codec``."""
    qos: Literal[0, 1] = 1
    """1 (default): acknowledged only once the outbox has the reading, so the broker
    redelivers until then. Not 2: its exactly-once costs two more packets per
    message and record ids already let the cloud drop a duplicate; 0: no
    redelivery at all."""
    device_id: str | None = Field(default=None, min_length=1, max_length=128)
    """Fixed device id for a topic without ``{device_id}`` (else the codec finds it)."""
    exclude: list[str] = Field(default_factory=list)
    """Filters of topics to ignore although ``topic`` matches them."""
    command_topic: str | None = Field(default=None, min_length=1, max_length=1024)
    """Where commands to this subscription's devices are published (QoS 1), with
    ``{device_id}`` and optionally ``{name}`` (the command's name) each filling a
    level: ``plant/{device_id}/cmd/{name}``. Absent: no commands (presets set
    one, see docs/protocols/mqtt-client.md)."""
    receipt_topic: str | None = Field(default=None, min_length=1, max_length=1024)
    """Where receipts to this subscription's devices are published (QoS 1, on
    the external broker; with ``receipts.enabled``), ``{device_id}`` filling a
    level: ``plant/{device_id}/receipts``. Absent: ``receipts.topic``."""
    command_payload: Literal["params", "value", "shelly_rpc", "sparkplug_b"] = "params"
    """What a command's PUBLISH carries: ``params`` its params as a JSON object;
    ``value`` ``params.value`` alone (a string as is, else JSON), the params
    JSON when there is no ``value``; ``shelly_rpc`` a Shelly Gen2 RPC request
    ``{"id", "src", "method", "params"}`` whose response is the result;
    ``sparkplug_b`` an NCMD/DCMD protobuf on the topic the device's births came
    from (no ``command_topic``; the ``sparkplug_b`` codec only)."""

    @model_validator(mode="after")
    def _check_topic(self) -> Self:
        if self.command_payload == "sparkplug_b":
            if self.codec != "sparkplug_b":
                raise ValueError("command_payload sparkplug_b needs codec sparkplug_b")
            if self.command_topic is not None:
                raise ValueError(
                    "command_payload sparkplug_b takes no command_topic "
                    "(commands go to spBv1.0/<group>/NCMD|DCMD/<node>[/<device>])"
                )
        if self.command_topic is not None:
            _check_topic_template("command_topic", self.command_topic, ("{device_id}", "{name}"))
        if self.receipt_topic is not None:
            _check_topic_template("receipt_topic", self.receipt_topic, ("{device_id}",))
        levels = self.topic.split("/")
        for i, level in enumerate(levels):
            if level.startswith("{") and level not in ("{device_id}", "{metric_prefix}"):
                raise ValueError(
                    f"unknown placeholder {level!r} (use {{device_id}}, {{metric_prefix}})"
                )
            if level == "#" and i != len(levels) - 1:
                raise ValueError("'#' must be the last level")
            if level not in ("+", "#") and ("+" in level or "#" in level):
                raise ValueError(f"wildcards must fill a whole level, got {level!r}")
        if levels.count("{device_id}") > 1:
            raise ValueError("{device_id} may appear once")
        _check_codec(self.codec, self.codec_options)
        return self


class MqttClientConfig(_Model):
    """One external MQTT broker that ``edgeway.south.mqtt_client`` subscribes to."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name: the readings' origin and the name in logs and the status."""
    enabled: bool = True
    """Connect to this broker."""
    url: str = Field(pattern=r"^mqtts?://[^/]+$")
    """``mqtt://host:1883`` or ``mqtts://host:8883`` (TLS)."""
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    """Default ``edgeway-<gateway id>-<name>``: stable, so the broker keeps the
    session (and redelivers unacknowledged messages) across reconnects."""
    username: str | None = None
    """User name for the broker; absent: connect without credentials."""
    password: str | None = None
    """Password of ``username``."""
    tls: MqttClientTls | None = None
    """CA and client certificate for ``mqtts://`` (absent: the system's CAs)."""
    protocol: Literal["5", "3.1.1"] = "5"
    """MQTT version spoken to the broker."""
    session_expiry: Duration = 3600.0
    """How long the broker keeps our session (and queues for us) while we are away (MQTT 5)."""
    keepalive: int = Field(default=60, ge=5, le=65535)
    """MQTT keep alive (seconds) sent in CONNECT."""
    receive_maximum: int = Field(default=100, ge=1, le=65535)
    """Unacknowledged QoS 1/2 messages the broker may have in flight to us (MQTT 5).
    Each waits in memory for the outbox; 100 keeps a group commit busy."""
    max_packet_size: Size = Field(default=1024 * 1024, ge=64, le=268_435_460)
    """Largest packet accepted from the broker (announced to it in MQTT 5; a
    larger one drops the connection): the most a packet being received holds
    in memory. 1 MiB, as the embedded broker's default."""
    shared_group: str | None = Field(default=None, pattern=r"^[^/+#$]+$")
    """Subscribe as ``$share/<group>/<filter>`` so gateways with the same group split the load."""
    preset: Literal["zigbee2mqtt", "tasmota", "shelly", "sparkplug_b"] | None = None
    """Adds the preset's subscriptions (see docs/protocols/mqtt-client.md)."""
    subscriptions: list[MqttClientSubscription] = Field(default_factory=list)
    """Topics to subscribe to, each with its device ids and codec."""
    max_commands_in_flight: int = Field(default=100, ge=1, le=65_000)
    """Commands published and not yet PUBACKed at once (fewer if the broker's MQTT 5
    Receive Maximum is lower: going over it gets us disconnected). Each holds a
    future and its packet id; the rest wait in the command queue."""
    max_command_devices: int = Field(default=10_000, ge=1, le=1_000_000)
    """Device ids remembered as reachable for commands (learned from telemetry on
    subscriptions with a ``command_topic``). Each costs about 200 bytes; the cap
    bounds what a broker publishing under endless ids can make us hold. Ids past
    it are not commandable (logged once)."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this connection (only the keys given)."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if self.preset is None and not self.subscriptions:
            raise ValueError("give 'subscriptions', a 'preset', or both")
        if self.tls is not None and (self.tls.cert is None) != (self.tls.key is None):
            raise ValueError("tls: 'cert' and 'key' go together")
        return self


# --------------------------------------------------------------------------
# the pipeline: routes and steps (edgeway.pipeline; see docs/pipeline.md)


def _check_step(value: dict[str, Any]) -> dict[str, Any]:
    """Validate one ``{step_type: {params}}`` entry with that step's own model.

    The step registry is imported here, at validation time, not when this module
    loads (the step modules import this one). Errors keep their full key path
    (``routes[0].steps[1].window.size``) so ``edgeway check`` names the line.
    """
    from edgeway.pipeline.registry import check_step_spec

    return check_step_spec(value)


class RouteMatch(_Model):
    """Which readings a route takes. Every given criterion must hold; an empty
    match takes every reading."""

    devices: list[str] = Field(default_factory=list)
    """Globs on the device id (``sensor-*``); any may match."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Tags the reading must carry; values may be globs."""
    device_types: list[str] = Field(default_factory=list)
    """Globs on the reading's ``type`` tag."""
    metrics: list[str] = Field(default_factory=list)
    """Globs on metric names: the route takes readings carrying any of them,
    and only those metrics (the others go to the other matching routes, or to
    the default sinks when no route takes them)."""
    adapters: list[str] = Field(default_factory=list)
    """Source adapter names (``mqtt``, ``coap``, ``modbus``, ...)."""
    topics: list[str] = Field(default_factory=list)
    """MQTT filters (``+``/``#``) on the origin address (topic, CoAP path, ...)."""


class RouteConfig(_Model):
    """A route: match readings, apply steps in order, store for ``sinks``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Unique name; appears in counters, ``edgeway stats`` and logs."""
    match: RouteMatch = Field(default_factory=RouteMatch)
    """Which readings the route takes (absent: every reading)."""
    steps: list[Annotated[dict[str, Any], AfterValidator(_check_step)]] = Field(
        default_factory=list
    )
    """Each entry is ``{step_type: {params}}``; see docs/pipeline.md."""
    sinks: list[str] | None = None
    """Sink names that get this route's output; absent: every sink."""


class PipelineSection(_Model):
    """Settings of the pipeline itself (``edgeway.pipeline``)."""

    default_sinks: list[str] | None = None
    """Sinks for readings (or metrics) no route takes; absent: every sink;
    ``[]``: keep them in the outbox unrouted."""
    tick_interval: Duration = Field(default=0.5, gt=0)
    """How often windows and held rate-limited readings are checked for
    closing. 0.5 s: a window closes at most half a second after its time."""
    stats_interval: Duration = Field(default=5.0, gt=0)
    """How often ``data_dir/stats.json`` (read by ``edgeway stats``) is rewritten."""


from edgeway.rules.config import RuleConfig, check_rules  # noqa: E402  (see edgeway/rules/__init__.py)


class Config(_Model):
    """The whole configuration file: one section per key (all optional)."""

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    """This gateway's identity and where it keeps its data."""
    log: LogSection = Field(default_factory=LogSection)
    """Log level and format."""
    mqtt: MqttSection = Field(default_factory=MqttSection)
    """The embedded MQTT broker devices connect to (docs/protocols/mqtt-broker.md, docs/security.md)."""
    outbox: OutboxSection = Field(default_factory=OutboxSection)
    """The durable store-and-forward queue between the pipeline and the sinks (docs/outbox.md)."""
    sinks: list[SinkConfig] = Field(default_factory=list)
    """Where readings go: one entry per cloud endpoint; each type's options are in the tables below (docs/sinks/)."""
    receipts: ReceiptsSection = Field(default_factory=ReceiptsSection)
    """Tell devices when the cloud has their readings (MQTT receipt messages)."""
    commands: CommandsSection = Field(default_factory=CommandsSection)
    """Commands to devices: the durable queue and its limits (docs/commands.md)."""
    models: ModelsSection = Field(default_factory=ModelsSection)
    """Edge ML: the model registry, inference budgets and rollback (docs/models.md)."""
    twins: TwinsSection = Field(default_factory=TwinsSection)
    """Device twins: desired/reported documents with versions (docs/twins.md)."""
    firmware: FirmwareSection = Field(default_factory=FirmwareSection)
    """Firmware images and update campaigns (docs/firmware.md)."""
    fleet: FleetSection = Field(default_factory=FleetSection)
    """Signed configurations pushed from the cloud through the command downlink (docs/fleet.md)."""
    alarms: AlarmsSection = Field(default_factory=AlarmsSection)
    """Alarms: latching, confirmation, shelving limits, health figures (docs/alarms.md)."""
    devices: DevicesSection = Field(default_factory=DevicesSection)
    """The device registry and device status (docs/devices.md)."""
    admin: AdminSection | None = None
    """The local admin API: health, status, metrics (docs/admin-api.md). Absent: off."""
    coap: CoapSection | None = None
    """The CoAP listener (docs/protocols/coap.md). Absent: off."""
    modbus: list[ModbusDeviceConfig] = Field(default_factory=list)
    """Modbus TCP/RTU devices polled by the gateway (docs/protocols/modbus.md)."""
    opcua: list[OpcUaServerConfig] = Field(default_factory=list)
    """OPC-UA servers subscribed to (docs/protocols/opcua.md)."""
    serial: list[SerialPortConfig] = Field(default_factory=list)
    """Serial line devices read line by line (docs/protocols/serial.md)."""
    ble: BleSection | None = None
    """BTHome Bluetooth LE advertisements (docs/protocols/ble.md). Absent: off."""
    http_ingest: HttpIngestSection | None = None
    """The HTTP ingest listener (docs/protocols/http.md). Absent: off."""
    mqtt_client: list[MqttClientConfig] = Field(default_factory=list)
    """External MQTT brokers the gateway subscribes to (docs/protocols/mqtt-client.md)."""
    routes: list[RouteConfig] = Field(default_factory=list)
    """Edge processing: which readings go where, through which steps (docs/pipeline.md)."""
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    """Settings of the pipeline itself (docs/pipeline.md)."""
    rules: Annotated[list[RuleConfig], AfterValidator(check_rules)] = Field(default_factory=list)
    """Local decisions: conditions over readings and the actions they take (docs/rules.md)."""
    input_limits: InputLimitsSection = Field(default_factory=InputLimitsSection)
    """What one device message may turn into, for every adapter (docs/limits.md)."""

    @model_validator(mode="after")
    def _resolve_input_limits(self) -> Self:
        # Each adapter gets the whole set: the top level with its own keys on top.
        top = self.input_limits
        sections: list[Any] = [self.mqtt, self.http_ingest, self.coap]
        sections += [*self.mqtt_client, *self.serial, *self.opcua]
        for section in sections:
            if section is not None:
                own = section.input_limits
                section.input_limits = top if own is None else own.over(top)
        return self


# --------------------------------------------------------------------------
# loading with file/line/key errors


@dataclass(slots=True, frozen=True)
class ConfigIssue:
    """One problem in a configuration file."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """Raised when a configuration is invalid; carries every issue found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Walk the composed YAML node tree along ``loc``; return the 1-based line
    of the deepest node reached (the key itself when the key exists)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == part:
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        else:
            return line
    return line


def unknown_key(name: object, known: Iterable[str]) -> str:
    """``unknown key 'listn', did you mean 'listen'?``: the message for a key
    no model has, with the nearest known key when one is close (difflib)."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"unknown key {str(name)!r}{hint}"


def _types_at(tp: Any, part: int | str) -> list[Any]:
    """The types that ``part`` (a key or an index) of a value of type ``tp`` may have."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _types_at(args[0], part)
    if origin in (typing.Union, types.UnionType):
        return [t for a in args for t in _types_at(a, part)]
    if origin in (list, tuple) and isinstance(part, int) and args:
        return [args[0]]
    if origin is dict and isinstance(part, str) and len(args) == 2:
        return [args[1]]
    if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
        field = tp.model_fields.get(part)
        return [field.annotation] if field is not None else []
    return []


def known_keys(loc: tuple[int | str, ...], root: type[BaseModel] | None = None) -> list[str]:
    """The keys the schema allows in the mapping at ``loc`` (empty if it is
    not a section, e.g. a free-form ``options`` mapping)."""
    current: list[Any] = [Config if root is None else root]
    for part in loc:
        current = [t for tp in current for t in _types_at(tp, part)]
    keys: set[str] = set()
    for tp in current:
        for model in _models(tp):
            keys.update(model.model_fields)
    return sorted(keys)


def _models(tp: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _models(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _models(a)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return []


def _keys_beside(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed next to the unknown one at ``loc``: from the schema,
    or, inside a route step (``routes[0].steps[1].window.sise``), from that
    step type's parameter model."""
    keys = known_keys(loc[:-1])
    if keys or "steps" not in loc:
        return keys
    at = loc.index("steps") + 2  # routes, i, steps, j, <type>, ...
    if at < len(loc) - 1 and isinstance(loc[at], str):
        from edgeway.pipeline.registry import step_types

        step = step_types().get(str(loc[at]))
        if step is not None:
            return known_keys(loc[at + 1 : -1], root=step.Params)
    return []


def _clean_message(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        loc = tuple(err.get("loc", ()))
        return unknown_key(loc[-1], _keys_beside(loc)) if loc else "unknown key"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "missing":
        return "required key is missing"
    got = err.get("input")
    if (
        kind != "model_type"
        and "got" not in msg
        and not isinstance(got, dict | list)
        and got is not None
    ):
        return f"{msg} (got {got!r})"
    return msg


@dataclass(slots=True, frozen=True)
class KeyLines:
    """Where the keys of one parsed configuration are: file name and the
    composed YAML tree, so later checks report ``file:line: key: message``."""

    filename: str
    root: yaml.Node | None = None

    def line(self, loc: tuple[int | str, ...]) -> int | None:
        """The 1-based line of ``loc`` (a key path), or None without a file."""
        return _line_of(self.root, loc)

    def issue(
        self, loc: tuple[int | str, ...], message: str, key: str | None = None
    ) -> ConfigIssue:
        """A :class:`ConfigIssue` for ``loc``; ``key`` overrides the shown key path."""
        return ConfigIssue(
            self.filename, self.line(loc), _key_path(loc) if key is None else key, message
        )


def _duplicate_keys(
    node: yaml.Node | None, loc: tuple[int | str, ...], lines: KeyLines
) -> list[ConfigIssue]:
    """Keys given twice in one mapping: YAML keeps the last silently, so a
    setting someone believes in is ignored. Reported at the second one."""
    out: list[ConfigIssue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                line = k.start_mark.line + 1
                if k.value in first:
                    out.append(
                        ConfigIssue(
                            lines.filename,
                            line,
                            _key_path((*loc, k.value)),
                            f"key {k.value!r} given twice (first on line {first[k.value]}); "
                            "YAML would keep only this one",
                        )
                    )
                else:
                    first[k.value] = line
                out += _duplicate_keys(v, (*loc, k.value), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, (*loc, i), lines)
    return out


def locate_key(filename: str, loc: tuple[int | str, ...]) -> int | None:
    """The line of ``loc`` (a key path) in a YAML file, or None if unknown."""
    try:
        root = yaml.compose(Path(filename).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError, ValueError):
        return None
    return _line_of(root, loc) if root is not None else None


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Parse and validate YAML text; raise :class:`ConfigError` on any problem."""
    return parse_config_lines(text, filename)[0]


def parse_config_lines(
    text: str, filename: str = "<config>", environ: Mapping[str, str] | None = None
) -> tuple[Config, KeyLines]:
    """:func:`parse_config`, also returning where each key is (for later checks).

    ``${VAR}`` references in values are expanded from ``environ`` (default:
    the process environment; see :mod:`edgeway.config_env`)."""
    from edgeway.config_env import construct, expand_tree

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        unset = expand_tree(root, environ)
        if unset:
            raise ConfigError(
                [
                    ConfigIssue(filename, n.start_mark.line + 1, _key_path(loc), m)
                    for loc, n, m in unset
                ]
            )
        data = construct(root) if root is not None else {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigIssue(filename, line, "", f"YAML syntax error: {e.problem or e}")]
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError([ConfigIssue(filename, None, "", f"YAML error: {e}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                ConfigIssue(
                    filename, 1, "", f"expected a mapping of sections, got {type(data).__name__}"
                )
            ]
        )
    lines = KeyLines(filename, root)
    issues = _duplicate_keys(root, (), lines)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        issues += [lines.issue(tuple(err["loc"]), _clean_message(dict(err))) for err in e.errors()]
        raise ConfigError(sorted(issues, key=lambda i: i.line or 0)) from None
    if issues:
        raise ConfigError(issues)
    return config, lines


def load_config(path: Path | str | None) -> Config:
    """Load a configuration file; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigIssue(str(p), None, "", f"cannot read: {e.strerror}")]) from None
    return parse_config(text, str(p))


# --------------------------------------------------------------------------
# command-line overrides


def apply_overrides(
    config: Config,
    *,
    data_dir: Path | None = None,
    mqtt_listen: Sequence[str] = (),
    sinks: Sequence[str] = (),
    log_level: str | None = None,
    log_format: str | None = None,
    gateway_id: str | None = None,
    coap_listen: str | None = None,
    http_listen: str | None = None,
    admin_listen: str | None = None,
) -> Config:
    """Apply command-line overrides to a loaded configuration.

    ``--mqtt-listen`` replaces the configured listeners with plain TCP ones;
    anonymous clients are allowed on a loopback address when the config file
    defines no users, never on another address. ``--sink URL`` adds a sink
    named ``sink1``, ``sink2``, ... after the configured ones. ``--coap-listen``
    and ``--http-listen`` turn those listeners on at the given address.
    """
    cfg = config.model_copy(deep=True)
    if data_dir is not None:
        cfg.gateway.data_dir = data_dir
    if gateway_id:
        cfg.gateway.id = gateway_id
    if mqtt_listen:
        listeners = []
        for bind in mqtt_listen:
            host, _ = parse_host_port(bind)
            listeners.append(
                ListenerConfig(bind=bind, allow_anonymous=is_loopback(host) and not cfg.mqtt.users)
            )
        cfg.mqtt.listeners = listeners
    taken = {s.name for s in cfg.sinks}
    n = 0
    for url in sinks:
        n += 1
        while f"sink{n}" in taken:
            n += 1
        cfg.sinks.append(SinkConfig(name=f"sink{n}", url=url))
        taken.add(f"sink{n}")
    if coap_listen:
        parse_host_port(coap_listen)
        if cfg.coap is None:
            cfg.coap = CoapSection(listen=coap_listen, input_limits=cfg.input_limits)
        else:
            cfg.coap.listen = coap_listen
            cfg.coap.enabled = True
    if http_listen:
        parse_host_port(http_listen)
        if cfg.http_ingest is None:
            # Same rule as --mqtt-listen: anonymous on loopback only.
            host, _ = parse_host_port(http_listen)
            cfg.http_ingest = HttpIngestSection(
                listen=http_listen,
                allow_anonymous=is_loopback(host),
                input_limits=cfg.input_limits,  # as the file's own sections get them
            )
        else:
            cfg.http_ingest.listen = http_listen
            cfg.http_ingest.enabled = True
    if admin_listen:
        # Keep the section's other keys (auth, allowed_hosts) and check them
        # again against the new address: auth none stays loopback-only.
        base = cfg.admin.model_dump() if cfg.admin is not None else {}
        cfg.admin = AdminSection.model_validate({**base, "listen": admin_listen, "enabled": True})
    if log_level:
        cfg.log.level = log_level  # type: ignore[assignment]
    if log_format:
        cfg.log.format = log_format  # type: ignore[assignment]
    return cfg


__all__ = [
    "AclRule",
    "AdminSection",
    "BleDevice",
    "BleSection",
    "CoapSection",
    "CommandsMqttSection",
    "CommandsSection",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Duration",
    "GatewaySection",
    "HttpIngestSection",
    "InputLimitsSection",
    "KeyLines",
    "ListenerConfig",
    "LogSection",
    "ModbusDataType",
    "ModbusDeviceConfig",
    "ModbusFunction",
    "ModbusGroup",
    "ModbusPoint",
    "MqttClientConfig",
    "MqttClientSubscription",
    "MqttClientTls",
    "MqttEventLog",
    "MqttLimits",
    "MqttSection",
    "MqttUser",
    "OpcUaMethod",
    "OpcUaNode",
    "OpcUaSecurity",
    "OpcUaServerConfig",
    "OutboxSection",
    "PipelineSection",
    "ReceiptsSection",
    "RouteConfig",
    "RouteMatch",
    "SerialCsv",
    "SerialPortConfig",
    "SinkConfig",
    "Size",
    "TlsConfig",
    "_Model",
    "_check_codec",
    "_is_ip",
    "apply_overrides",
    "input_limits",
    "is_loopback",
    "known_keys",
    "load_config",
    "locate_key",
    "parse_config",
    "parse_config_lines",
    "parse_host_port",
    "unknown_key",
]
