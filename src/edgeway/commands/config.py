"""The command queue's configuration section (``commands:``; docs/commands.md)."""

from __future__ import annotations

from pydantic import Field, field_validator

from edgeway.config_types import (
    Duration,
    Size,
    _Model,
)


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
