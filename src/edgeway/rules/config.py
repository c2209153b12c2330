"""The ``rules:`` section: rules declared in the configuration.

Example (see docs/rules.md)::

    rules:
      - name: boiler-overheat
        match: {devices: ["boiler-*"]}
        when: "avg(temperature, 60s) > 80"       # set condition
        clear: "temperature < 70"                 # hysteresis (default: not when)
        for: 30s                                  # must hold this long to set
        cooldown: 10m                             # at least this between two sets
        schedule: [{days: [mon, tue, wed, thu, fri], from: "06:00", to: "22:00"}]
        on_set:
          - command: {name: fan, params: {speed: 100}}
          - alarm: {type: overheat, severity: 700, message: "boiler too hot"}
        on_clear:
          - command: {name: fan, params: {speed: 0}}
          - alarm: {type: overheat}

Conditions are checked when the configuration loads (an unknown function or
an unsafe construct names the rule's key and line).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from edgeway.config_types import Duration, _Model
from edgeway.pipeline.config import RouteMatch

RULE_NAME_RE = r"^[A-Za-z0-9_.-]{1,64}$"
"""Rule names become part of command idempotency keys, MQTT topics and log
fields: a short token without '/', '+', '#' or spaces."""

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ALL_DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


class ScheduleWindow(_Model):
    """A time window the rule may set in: days of the week and a time range
    (``to`` before ``from`` runs past midnight)."""

    days: list[Day] = Field(default_factory=lambda: list(ALL_DAYS))
    """Days of the week (``mon`` ... ``sun``); absent: every day."""
    from_: str = Field(default="00:00", alias="from")
    """``HH:MM``, local time of ``timezone`` (the day is the day ``from`` falls on)."""
    to: str = "24:00"
    """``HH:MM``; ``24:00`` is the end of the day."""

    @field_validator("from_", "to")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"expected HH:MM (00:00 to 24:00), got {v!r}")
        return v


class CommandAction(_Model):
    """Queue a command for a device (through the command queue and the device's
    own protocol downlink)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    """The command's name (what the device receives)."""
    device: str = "{device_id}"
    """The device to command; ``{device_id}`` is the device the rule fired for."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The command's parameters (JSON values)."""
    ttl: Duration | None = Field(default=None, gt=0)
    """Time to wait for the device (default: ``commands.default_ttl``)."""


class PublishAction(_Model):
    """Publish a message on the embedded MQTT broker."""

    topic: str = Field(min_length=1, max_length=512)
    """May use ``{device_id}``, ``{rule}`` and ``{state}`` (``set``/``clear``)."""
    payload: str | None = None
    """The text to send (same placeholders); absent: the transition as JSON."""
    qos: Literal[0, 1] = 1
    """MQTT QoS of the message."""
    retain: bool = False
    """Keep it as the topic's retained message."""


class WebhookAction(_Model):
    """POST the transition as JSON to a URL (off the event loop, bounded)."""

    url: str = Field(pattern=r"^https?://", max_length=2048)
    """``http://`` or ``https://`` URL the transition is POSTed to."""
    timeout: Duration = Field(default=5.0, gt=0, le=60)
    """Per attempt."""
    retries: int = Field(default=3, ge=0, le=10)
    """Attempts after the first, with exponential backoff (0.5 s, 1 s, 2 s ...)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers (an ``authorization`` token, say)."""


class AlarmAction(_Model):
    """Raise or clear the alarm (source: the device, ``type``)."""

    type: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    """The alarm's type; with the device (its source) it names the alarm."""
    do: Literal["raise", "clear"] | None = None
    """Absent: ``raise`` in ``on_set``, ``clear`` in ``on_clear``."""
    severity: int = Field(default=500, ge=1, le=1000)
    """1 (lowest) to 1000 (OPC UA severities)."""
    message: str = Field(default="", max_length=1024)
    """May use ``{device_id}``, ``{rule}`` and ``{state}``."""


class EventAction(_Model):
    """Send a record of the transition to the sinks (through the outbox, in the
    priority lane, tagged ``record_type: rule``)."""


class TwinAction(_Model):
    """Change the device twin's desired state (a JSON merge patch: a key set
    to null is removed); the device gets it as a delta (docs/twins.md)."""

    desired: dict[str, Any] = Field(default_factory=dict)
    """Desired-state keys and values to set on the device's twin."""


class ActionConfig(_Model):
    """One action: exactly one of the keys."""

    command: CommandAction | None = None
    """Queue a command for a device (its own protocol's downlink)."""
    publish: PublishAction | None = None
    """Publish on the embedded MQTT broker."""
    webhook: WebhookAction | None = None
    """POST the transition to a URL."""
    alarm: AlarmAction | None = None
    """Raise or clear an alarm."""
    event: EventAction | None = None
    """Send a record of the transition to the sinks."""
    twin: TwinAction | None = None
    """Change the device twin's desired state (a merge patch)."""

    @model_validator(mode="after")
    def _one(self) -> Self:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            keys = ", ".join(type(self).model_fields)
            raise ValueError(f"an action is exactly one of {keys}; got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


def _check_condition(text: str) -> str:
    from edgeway.rules.condition import compile_condition

    compile_condition(text)  # raises ValueError (ExprError) naming the construct
    return text


class RuleConfig(_Model):
    """One rule: a condition over a device's readings and what to do when it
    sets and clears."""

    name: str = Field(pattern=RULE_NAME_RE)
    """Unique; its durable state is kept under this name across restarts and
    reloads (rename a rule to start it afresh)."""
    match: RouteMatch = Field(default_factory=RouteMatch)
    """Which readings the rule sees (as a route's ``match``; absent: all)."""
    when: str = Field(min_length=1)
    """The set condition (safe expression language; see docs/rules.md)."""
    clear: str | None = None
    """The clear condition (hysteresis); absent: the set condition is false."""
    for_: Duration = Field(default=0.0, alias="for")
    """How long ``when`` must hold before the rule sets."""
    clear_for: Duration = 0.0
    """How long ``clear`` must hold before the rule clears."""
    cooldown: Duration = 0.0
    """Least time between one set and the next for a device."""
    schedule: list[ScheduleWindow] | None = None
    """When the rule may set (absent: always). An active rule clears as usual."""
    timezone: str | None = None
    """IANA zone of ``schedule`` (default: the machine's local time)."""
    on_set: list[ActionConfig] = Field(default_factory=list)
    """Actions when the rule sets for a device, in order."""
    on_clear: list[ActionConfig] = Field(default_factory=list)
    """Actions when it clears, in order."""
    enabled: bool = True
    """``false`` keeps the rule (and its stored state) without evaluating it."""

    @field_validator("when", "clear")
    @classmethod
    def _condition(cls, v: str | None) -> str | None:
        return None if v is None else _check_condition(v)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    @model_validator(mode="after")
    def _alarm_actions(self) -> Self:
        for where, actions in (("on_set", self.on_set), ("on_clear", self.on_clear)):
            for a in actions:
                if a.twin is not None and not a.twin.desired:
                    raise ValueError(f"{where}: a twin action needs desired values")
        return self


def check_rules(rules: list[RuleConfig]) -> list[RuleConfig]:
    """Names given once (the config's validator; the key path names the list)."""
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise ValueError(f"rule {r.name!r} is defined twice")
        seen.add(r.name)
    return rules
