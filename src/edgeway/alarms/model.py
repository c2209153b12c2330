"""The alarm state machine, after OPC UA Part 9 and ISA-18.2, without I/O.

One :class:`Alarm` is the state of one condition: a ``(source, type)`` pair
such as ``("boiler-1", "high_temperature")``. Its states are orthogonal, as in
OPC UA Part 9:

* **active** / inactive: the condition is (or is held, see *latched*) in alarm.
* **acknowledged** / unacknowledged: an operator has seen this occurrence.
* **confirmed** / unconfirmed: an operator has confirmed it was dealt with
  (only after acknowledging, as in Part 9).
* **latched**: a latching alarm (ISA-18.2) whose condition returned to normal
  stays active until an operator *resets* it.
* **shelved** (timed, or one-shot until the alarm next goes inactive),
  **suppressed** (by design, e.g. a unit that is shut down) and **out of
  service** (removed for maintenance): hidden from the operator's list and the
  flood figures, still journaled and still sent to the sinks with their flags.

An *occurrence* starts when an alarm goes active from normal (a new ``id``)
and ends when it is inactive and acknowledged (and confirmed, when
``require_confirm``): the alarm is then *normal*, and is forgotten unless it
is shelved, suppressed or out of service. At most one occurrence per
(source, type) exists at a time: a raise of an active alarm updates it.

:func:`apply` is the whole machine: the current state (None: normal and
forgotten) and an :class:`Event` in, the next state and the list of
transitions out, or :class:`AlarmError` for an illegal transition (ack of an
acknowledged alarm, confirm before ack, unshelve of an alarm that is not
shelved, ...). The service adds locking, the journal and the timers.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

SEVERITY_MIN = 1
SEVERITY_MAX = 1000
"""OPC UA's severity range (Part 9, ``Severity``: 1 lowest, 1000 highest)."""


class Band(enum.IntEnum):
    """Named severity bands (OPC UA Part 9 table of severity ranges); the
    value is the outbox priority an alarm of the band gets (1 to 5)."""

    LOW = 1
    MEDIUM_LOW = 2
    MEDIUM = 3
    MEDIUM_HIGH = 4
    HIGH = 5

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def lowest(self) -> int:
        """The lowest severity of the band (used when a band name is given)."""
        return (self.value - 1) * 200 + 1


def band(severity: int) -> Band:
    """The band of a severity 1-1000: 1-200 low ... 801-1000 high."""
    return Band(min(max((severity - 1) // 200 + 1, 1), 5))


def parse_severity(value: Any) -> int:
    """A severity from a number 1-1000 or a band name (``high`` = 801);
    ValueError otherwise."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        try:
            return Band[value.strip().upper().replace("-", "_")].lowest
        except KeyError:
            names = ", ".join(b.label for b in Band)
            raise ValueError(f"severity must be 1-1000 or one of {names}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"severity must be an integer 1-1000, got {value!r}")
    n = int(value)
    if not SEVERITY_MIN <= n <= SEVERITY_MAX:
        raise ValueError(f"severity must be 1-1000, got {n}")
    return n


SOURCE_MAX = 256
"""Longest source (a device id elsewhere: 256 there too)."""
TYPE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""Alarm types: one path segment of the API, a metric label, a log field."""
TEXT_MAX = 1024
"""Longest message or comment kept: a sentence, not a document."""
BY_MAX = 128
"""Longest ``by`` (a user, ``rule:NAME``, ``system``)."""


class AlarmError(Exception):
    """A request the alarm model or service refuses. ``code`` is stable for
    API clients: ``invalid``, ``not_found``, ``illegal`` (a transition the
    current state does not allow), ``full``, ``disabled``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_key(source: str, type: str) -> None:
    """Refuse a source or type that cannot be an API path segment or a label."""
    if not isinstance(source, str) or not 0 < len(source) <= SOURCE_MAX:
        raise AlarmError("invalid", f"source must be 1-{SOURCE_MAX} characters")
    if "/" in source or not source.isprintable():
        raise AlarmError("invalid", "source cannot contain '/' or control characters")
    if not isinstance(type, str) or not TYPE_RE.match(type):
        raise AlarmError("invalid", "alarm type must be 1-64 of A-Z a-z 0-9 _ . : -")


def check_text(value: str, name: str, limit: int = TEXT_MAX) -> str:
    if not isinstance(value, str):
        raise AlarmError("invalid", f"{name} must be a string")
    if len(value) > limit:
        raise AlarmError("invalid", f"{name} is longer than {limit} characters")
    return value


@dataclass(slots=True, frozen=True)
class Shelving:
    """How an alarm is shelved: ``timed`` until ``until`` (wall-clock
    seconds), or ``one_shot`` until it next goes inactive."""

    kind: Literal["timed", "one_shot"]
    until: float | None
    by: str
    comment: str = ""


@dataclass(slots=True, frozen=True)
class Alarm:
    """The state of one (source, type) condition; see the module docstring.
    Immutable: a transition makes a new one (``dataclasses.replace``)."""

    source: str
    type: str
    id: str
    """This occurrence's id ("" while normal: shelved/suppressed only)."""
    severity: int = SEVERITY_MIN
    message: str = ""
    active: bool = False
    acked: bool = True
    confirmed: bool = True
    latching: bool = False
    latched: bool = False
    shelving: Shelving | None = None
    suppressed: bool = False
    out_of_service: bool = False
    values: dict[str, Any] = field(default_factory=dict)
    raised_at: float | None = None
    """When this occurrence went active (first time)."""
    active_since: float | None = None
    """When it last went active (standing alarms are measured from here)."""
    cleared_at: float | None = None
    acked_at: float | None = None
    acked_by: str | None = None
    confirmed_at: float | None = None
    updated_at: float = 0.0
    count: int = 0
    """Times this occurrence went active (a chattering alarm counts up)."""
    seq: int = 0
    """Number of its last transition in the journal."""

    @property
    def shelved(self) -> bool:
        return self.shelving is not None

    @property
    def hidden(self) -> bool:
        """Not shown to operators (and not counted in flood figures)."""
        return self.shelving is not None or self.suppressed or self.out_of_service

    @property
    def normal(self) -> bool:
        """No open occurrence: inactive, acknowledged and confirmed."""
        return not self.active and self.acked and self.confirmed

    @property
    def forgettable(self) -> bool:
        """Normal with nothing an operator set on it: nothing to keep."""
        return self.normal and not self.hidden

    @property
    def band(self) -> Band:
        return band(self.severity)

    def to_json(self) -> dict[str, Any]:
        """The alarm as the API, the CLI, the journal and the sinks show it."""
        sh = self.shelving
        return {
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "severity": self.severity,
            "band": self.band.label,
            "message": self.message,
            "active": self.active,
            "acked": self.acked,
            "confirmed": self.confirmed,
            "latching": self.latching,
            "latched": self.latched,
            "shelved": None
            if sh is None
            else {"kind": sh.kind, "until": sh.until, "by": sh.by, "comment": sh.comment},
            "suppressed": self.suppressed,
            "out_of_service": self.out_of_service,
            "values": self.values,
            "raised_at": self.raised_at,
            "active_since": self.active_since,
            "cleared_at": self.cleared_at,
            "acked_at": self.acked_at,
            "acked_by": self.acked_by,
            "confirmed_at": self.confirmed_at,
            "updated_at": self.updated_at,
            "count": self.count,
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Alarm:
        """Back from :meth:`to_json` (the journal)."""
        sh = doc.get("shelved")
        return cls(
            source=doc["source"],
            type=doc["type"],
            id=doc["id"],
            severity=doc["severity"],
            message=doc["message"],
            active=doc["active"],
            acked=doc["acked"],
            confirmed=doc["confirmed"],
            latching=doc["latching"],
            latched=doc["latched"],
            shelving=None
            if sh is None
            else Shelving(sh["kind"], sh["until"], sh["by"], sh["comment"]),
            suppressed=doc["suppressed"],
            out_of_service=doc["out_of_service"],
            values=doc["values"],
            raised_at=doc["raised_at"],
            active_since=doc["active_since"],
            cleared_at=doc["cleared_at"],
            acked_at=doc["acked_at"],
            acked_by=doc["acked_by"],
            confirmed_at=doc["confirmed_at"],
            updated_at=doc["updated_at"],
            count=doc["count"],
            seq=doc["seq"],
        )


class Action(enum.StrEnum):
    """What happened to an alarm: the kind of an :class:`Event` and of a
    journaled transition."""

    RAISE = "raise"
    CLEAR = "clear"
    ACK = "ack"
    CONFIRM = "confirm"
    RESET = "reset"
    SHELVE = "shelve"
    UNSHELVE = "unshelve"
    SUPPRESS = "suppress"
    UNSUPPRESS = "unsuppress"
    OUT_OF_SERVICE = "out_of_service"
    IN_SERVICE = "in_service"
    SEVERITY = "severity"
    """A raise of an active alarm with another severity or message."""
    COMMENT = "comment"
    """A note on a kept alarm (OPC UA's AddComment): journaled, no state change."""


SIMPLE_ACTIONS = (
    Action.ACK,
    Action.CONFIRM,
    Action.RESET,
    Action.UNSHELVE,
    Action.SUPPRESS,
    Action.UNSUPPRESS,
    Action.OUT_OF_SERVICE,
    Action.IN_SERVICE,
)
"""Operator actions with nothing but who and why (``AlarmService.act``);
raise, clear and shelve carry more and have methods of their own."""


@dataclass(slots=True, frozen=True)
class Event:
    """One request to the machine. ``severity``/``message``/``values`` are for
    RAISE; ``shelve_kind``/``until`` for SHELVE; ``comment`` for any."""

    action: Action
    by: str
    at: float
    comment: str = ""
    severity: int = SEVERITY_MIN
    message: str = ""
    values: dict[str, Any] | None = None
    shelve_kind: Literal["timed", "one_shot"] = "timed"
    until: float | None = None


@dataclass(slots=True, frozen=True)
class Transition:
    """One change the machine made: what, by whom, and the state after it."""

    action: Action
    by: str
    at: float
    comment: str
    alarm: Alarm
    activated: bool = False
    """It made the alarm go active (a new annunciation: health figures)."""


@dataclass(slots=True, frozen=True)
class Options:
    """Per-type settings the machine needs (from the ``alarms:`` section)."""

    latching: bool = False
    require_confirm: bool = False


def _illegal(alarm: Alarm | None, what: str) -> AlarmError:
    if alarm is None:
        return AlarmError("not_found", f"cannot {what}: no such alarm (it is normal)")
    where = "normal" if alarm.normal else describe(alarm)
    name = f"{alarm.source}/{alarm.type}"
    return AlarmError("illegal", f"cannot {what}: {name} is {where}")


def describe(alarm: Alarm) -> str:
    """A short human state: ``active, unacknowledged, shelved``."""
    parts = ["active" if alarm.active else "inactive"]
    if alarm.latched:
        parts.append("latched")
    parts.append("acknowledged" if alarm.acked else "unacknowledged")
    if not alarm.confirmed:
        parts.append("unconfirmed")
    if alarm.shelving is not None:
        parts.append("shelved" if alarm.shelving.kind == "timed" else "shelved (one-shot)")
    if alarm.suppressed:
        parts.append("suppressed")
    if alarm.out_of_service:
        parts.append("out of service")
    return ", ".join(parts)


def apply(
    current: Alarm | None,
    source: str,
    type: str,
    event: Event,
    options: Options,
    new_id: Callable[[], str],
) -> tuple[Alarm | None, list[Transition]]:
    """The state after ``event`` (None: normal, nothing to keep) and the
    transitions it made ([]: nothing changed, e.g. a raise of an alarm
    already active with the same severity). Raises AlarmError("illegal")
    for a transition the state does not allow. ``new_id()`` makes the id of
    a new occurrence (called only then: a UUID costs a system call)."""
    a = current if current is not None else Alarm(source, type, "")
    e = event
    out: list[Transition] = []
    replace = dataclasses.replace

    def note(state: Alarm, action: Action, *, activated: bool = False) -> Alarm:
        state = replace(state, updated_at=e.at)
        out.append(Transition(action, e.by, e.at, e.comment, state, activated))
        return state

    match e.action:
        case Action.RAISE:
            values = dict(e.values or {})
            if a.active and not a.latched:
                if a.severity == e.severity and a.message == e.message:
                    return current, []  # the same alarm again: nothing changes
                a = note(
                    replace(a, severity=e.severity, message=e.message, values=values),
                    Action.SEVERITY,
                )
            elif a.active:  # latched: the condition is back before the reset
                a = note(
                    replace(
                        a, latched=False, severity=e.severity, message=e.message, values=values
                    ),
                    Action.RAISE,
                )
            else:
                new = a.normal or not a.id
                a = replace(
                    a,
                    id=new_id() if new else a.id,
                    active=True,
                    acked=False,
                    confirmed=not options.require_confirm,
                    latching=options.latching,
                    severity=e.severity,
                    message=e.message,
                    values=values,
                    raised_at=e.at if new else a.raised_at,
                    active_since=e.at,
                    cleared_at=None,
                    acked_at=None if new else a.acked_at,
                    acked_by=None if new else a.acked_by,
                    confirmed_at=None,
                    count=1 if new else a.count + 1,
                )
                a = note(a, Action.RAISE, activated=True)
        case Action.CLEAR:
            if not a.active or a.latched:
                return current, []  # already normal (or held for a reset): nothing changes
            if a.latching:
                a = note(replace(a, latched=True, cleared_at=e.at), Action.CLEAR)
            else:
                a = _inactive(note(replace(a, active=False, cleared_at=e.at), Action.CLEAR), note)
        case Action.RESET:
            if not a.latched:
                raise _illegal(current, "reset (only a latched alarm is reset)")
            a = _inactive(note(replace(a, active=False, latched=False), Action.RESET), note)
        case Action.ACK:
            if current is None or a.acked:
                raise _illegal(current, "acknowledge")
            a = note(replace(a, acked=True, acked_at=e.at, acked_by=e.by), Action.ACK)
        case Action.CONFIRM:
            if current is None or a.confirmed or not a.acked:
                raise _illegal(current, "confirm (needs an acknowledged, unconfirmed alarm)")
            a = note(replace(a, confirmed=True, confirmed_at=e.at), Action.CONFIRM)
        case Action.SHELVE:
            if e.shelve_kind == "one_shot" and not a.active:
                raise _illegal(current, "shelve one-shot (only an active alarm)")
            a = note(
                replace(a, shelving=Shelving(e.shelve_kind, e.until, e.by, e.comment)),
                Action.SHELVE,
            )
        case Action.UNSHELVE:
            if a.shelving is None:
                raise _illegal(current, "unshelve")
            a = note(replace(a, shelving=None), Action.UNSHELVE)
        case Action.SUPPRESS | Action.UNSUPPRESS:
            on = e.action is Action.SUPPRESS
            if a.suppressed == on:
                raise _illegal(current, e.action.value)
            a = note(replace(a, suppressed=on), e.action)
        case Action.OUT_OF_SERVICE | Action.IN_SERVICE:
            on = e.action is Action.OUT_OF_SERVICE
            if a.out_of_service == on:
                raise _illegal(current, "take out of service" if on else "return to service")
            a = note(replace(a, out_of_service=on), e.action)
        case Action.SEVERITY:
            raise AlarmError("invalid", "severity changes come with a raise")
        case Action.COMMENT:
            if current is None:
                raise _illegal(current, "comment (only a kept alarm)")
            if not e.comment.strip():
                raise AlarmError("invalid", "a comment needs its text (comment)")
            a = note(a, Action.COMMENT)
    return (None if a.forgettable else a), out


def _inactive(a: Alarm, note: Any) -> Alarm:
    """After the alarm went inactive: a one-shot shelving ends with it."""
    if a.shelving is not None and a.shelving.kind == "one_shot":
        a = note(dataclasses.replace(a, shelving=None), Action.UNSHELVE)
    return a


def legal_actions(alarm: Alarm | None) -> set[Action]:
    """The operator actions the state allows (for the API's listing and the
    state-machine test's oracle)."""
    a = alarm if alarm is not None else Alarm("", "", "")
    out = {Action.SHELVE}
    if alarm is not None:
        out.add(Action.COMMENT)
    if alarm is not None and not a.acked:
        out.add(Action.ACK)
    if alarm is not None and a.acked and not a.confirmed:
        out.add(Action.CONFIRM)
    if a.latched:
        out.add(Action.RESET)
    if a.active and not a.latched:
        out.add(Action.CLEAR)
    if a.shelving is not None:
        out.add(Action.UNSHELVE)
    out.add(Action.UNSUPPRESS if a.suppressed else Action.SUPPRESS)
    out.add(Action.IN_SERVICE if a.out_of_service else Action.OUT_OF_SERVICE)
    return out
