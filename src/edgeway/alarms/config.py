"""The alarms' configuration section (``alarms:``; docs/alarms.md)."""

from __future__ import annotations

from pydantic import Field

from edgeway.config_types import Duration, _Model


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
