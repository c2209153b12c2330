"""The alarm state machine (edgeway.alarms.model) against an independent
reference written from ISA-18.2 and OPC UA Part 9, driven by hypothesis's
RuleBasedStateMachine: every reachable state, every event, legal or not."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgeway.alarms.model import (
    SIMPLE_ACTIONS,
    Action,
    Alarm,
    AlarmError,
    Band,
    Event,
    Options,
    apply,
    band,
    legal_actions,
    parse_severity,
)


@dataclass
class Ref:
    """The reference: plain flags, rules as the standards state them."""

    active: bool = False
    latched: bool = False
    acked: bool = True
    confirmed: bool = True
    shelved: str | None = None  # "timed" | "one_shot"
    suppressed: bool = False
    oos: bool = False
    occurrence: int = 0

    @property
    def normal(self) -> bool:
        return not self.active and self.acked and self.confirmed

    @property
    def kept(self) -> bool:
        return not self.normal or self.shelved is not None or self.suppressed or self.oos


OPERATOR = list(SIMPLE_ACTIONS)


class AlarmMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.alarm: Alarm | None = None
        self.ref = Ref()
        self.options = Options()
        self.t = 0.0
        self.ids = 0
        self.last_id = ""

    def _event(self, action: Action, **kw: object) -> Event:
        self.t += 1.0
        return Event(action, "op", self.t, **kw)  # type: ignore[arg-type]

    def _apply(self, event: Event) -> tuple[bool, int]:
        """Apply to the model; (refused, transitions made)."""
        self.ids += 1
        try:
            nxt, trans = apply(self.alarm, "s", "t", event, self.options, lambda: f"id{self.ids}")
        except AlarmError as e:
            assert e.code in ("illegal", "not_found"), e.code
            assert str(e)  # says why
            return True, 0
        for tr in trans:
            assert tr.by == "op" and tr.at == self.t
        if trans:
            assert trans[-1].alarm.updated_at == self.t
        if nxt is not None:
            assert nxt == trans[-1].alarm if trans else nxt == self.alarm
        self.alarm = nxt
        return False, len(trans)

    @rule(
        latching=st.booleans(),
        confirm=st.booleans(),
    )
    @precondition(lambda self: self.alarm is None)
    def configure(self, latching: bool, confirm: bool) -> None:
        # Type options apply from the next occurrence on; change them only
        # while the alarm is normal and forgotten, as a reload would.
        self.options = Options(latching=latching, require_confirm=confirm)

    @rule(severity=st.integers(1, 1000), message=st.sampled_from(["hot", "very hot"]))
    def raise_(self, severity: int, message: str) -> None:
        r = self.ref
        before = self.alarm
        refused, n = self._apply(self._event(Action.RAISE, severity=severity, message=message))
        assert not refused
        a = self.alarm
        assert a is not None and a.active and not a.latched
        assert a.severity == severity and a.message == message
        if r.active and not r.latched:
            same = before is not None and before.severity == severity and before.message == message
            assert n == (0 if same else 1)
            assert a.id == self.last_id
        elif r.active:  # latched: back before the reset
            assert n == 1 and a.id == self.last_id
        else:
            assert n == 1 and not a.acked
            if r.normal:
                assert a.id != self.last_id and a.count == 1
                r.occurrence += 1
            else:
                assert a.id == self.last_id and before is not None and a.count == before.count + 1
            r.acked = False
            r.confirmed = not self.options.require_confirm
        r.active, r.latched = True, False
        self.last_id = a.id

    @rule()
    def clear(self) -> None:
        r = self.ref
        refused, n = self._apply(self._event(Action.CLEAR))
        assert not refused
        if not r.active or r.latched:
            assert n == 0
            return
        if self.alarm is not None and self.alarm.latching:
            r.latched = True
            assert n == 1
        else:
            r.active = False
            if r.shelved == "one_shot":
                r.shelved = None
                assert n == 2  # clear, then the one-shot shelving ends
            else:
                assert n == 1

    @rule(action=st.sampled_from(OPERATOR))
    def operator(self, action: Action) -> None:
        r = self.ref
        exists = r.kept
        legal = {
            Action.ACK: exists and not r.acked,
            Action.CONFIRM: exists and r.acked and not r.confirmed,
            Action.RESET: r.latched,
            Action.UNSHELVE: r.shelved is not None,
            Action.SUPPRESS: not r.suppressed,
            Action.UNSUPPRESS: r.suppressed,
            Action.OUT_OF_SERVICE: not r.oos,
            Action.IN_SERVICE: r.oos,
        }[action]
        assert (action in legal_actions(self.alarm)) == legal, (action, r)
        refused, n = self._apply(self._event(action, comment="why"))
        assert refused == (not legal), (action, r, self.alarm)
        if refused:
            return
        match action:
            case Action.ACK:
                r.acked = True
                assert self.alarm is None or self.alarm.acked_by == "op"
            case Action.CONFIRM:
                r.confirmed = True
            case Action.RESET:
                r.active = r.latched = False
                if r.shelved == "one_shot":
                    r.shelved = None
                    assert n == 2
            case Action.UNSHELVE:
                r.shelved = None
            case Action.SUPPRESS | Action.UNSUPPRESS:
                r.suppressed = action is Action.SUPPRESS
            case Action.OUT_OF_SERVICE | Action.IN_SERVICE:
                r.oos = action is Action.OUT_OF_SERVICE

    @rule(one_shot=st.booleans())
    def shelve(self, one_shot: bool) -> None:
        r = self.ref
        kind = "one_shot" if one_shot else "timed"
        until = None if one_shot else self.t + 100
        refused, n = self._apply(self._event(Action.SHELVE, shelve_kind=kind, until=until))
        assert refused == (one_shot and not r.active)
        if not refused:
            assert n == 1
            r.shelved = kind
            assert self.alarm is not None and self.alarm.shelving is not None
            assert self.alarm.shelving.until == until

    @invariant()
    def agrees_with_the_reference(self) -> None:
        r, a = self.ref, self.alarm
        if not r.kept:
            assert a is None, a
            return
        assert a is not None
        assert (a.active, a.latched, a.acked, a.confirmed) == (
            r.active,
            r.latched,
            r.acked,
            r.confirmed,
        )
        assert (a.shelving.kind if a.shelving else None) == r.shelved
        assert (a.suppressed, a.out_of_service) == (r.suppressed, r.oos)
        assert not a.latched or (a.active and a.latching)
        assert a.hidden == (r.shelved is not None or r.suppressed or r.oos)


AlarmMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=40, deadline=None)
test_alarm_state_machine = AlarmMachine.TestCase


def test_illegal_transitions_say_why() -> None:
    opts = Options()
    a, _ = apply(
        None, "boiler-1", "hot", Event(Action.RAISE, "rule:r", 1.0, severity=500), opts, lambda: "x"
    )
    a, _ = apply(a, "boiler-1", "hot", Event(Action.ACK, "ann", 2.0), opts, lambda: "y")
    with pytest.raises(AlarmError) as e:
        apply(a, "boiler-1", "hot", Event(Action.ACK, "bob", 3.0), opts, lambda: "z")
    assert e.value.code == "illegal"
    assert str(e.value) == "cannot acknowledge: boiler-1/hot is active, acknowledged"
    with pytest.raises(AlarmError) as e:
        apply(None, "boiler-1", "hot", Event(Action.ACK, "bob", 3.0), opts, lambda: "z")
    assert e.value.code == "not_found"


def test_severity_bands_and_names() -> None:
    assert [band(s) for s in (1, 200, 201, 600, 601, 800, 801, 1000)] == [
        Band.LOW,
        Band.LOW,
        Band.MEDIUM_LOW,
        Band.MEDIUM,
        Band.MEDIUM_HIGH,
        Band.MEDIUM_HIGH,
        Band.HIGH,
        Band.HIGH,
    ]
    assert parse_severity("high") == 801 and parse_severity("medium-low") == 201
    assert parse_severity(" 700") == 700
    for bad in (0, 1001, "urgent", True, 2.5):
        with pytest.raises(ValueError):
            parse_severity(bad)
