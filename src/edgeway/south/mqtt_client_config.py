"""External MQTT brokers' configuration (``mqtt_client:``;
docs/protocols/mqtt-client.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from edgeway.config_types import (
    Duration,
    InputLimitsSection,
    Size,
    _check_codec,
    _Model,
)


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
    record_ids: Literal["message", "gateway"] = "message"
    """``message`` (default): when a message's payload identifies it (a device
    timestamp, a message id, or ``sequence_metric``), its readings' record ids
    are a hash of the message (connection ``name``, topic, payload) and the
    reading, the same on any gateway that receives it, so a message a broker
    redelivers to another member of a shared group reaches the cloud under
    the same id (docs/scale-out.md). A payload identifying nothing keeps
    ``gateway_id:sequence``. ``gateway``: always ``gateway_id:sequence``."""
    sequence_metric: str | None = Field(default=None, min_length=1, max_length=256)
    """A metric numbering the device's messages (a counter): when the codec finds
    it, the message identifies itself although it has no device timestamp
    (``record_ids: message``)."""
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
