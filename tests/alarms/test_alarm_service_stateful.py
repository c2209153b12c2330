"""The alarm service (real journal, restarts) against the pure state machine:
hypothesis drives random actions on a few keys, with restarts of the service
in between; after every step the service's alarms equal what the machine
alone computes, and after a restart they are what they were before it."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from edgeway.alarms.model import SIMPLE_ACTIONS, Action, Alarm, AlarmError, Event, Options, apply
from edgeway.alarms.service import AlarmService
from edgeway.config import AlarmsSection

KEYS = [("d1", "overheat"), ("d1", "low_flow"), ("d2", "overheat")]
TYPES = {"overheat": {"latching": True, "require_confirm": True}}
SIMPLE = list(SIMPLE_ACTIONS)


def _comparable(a: Alarm) -> dict[str, Any]:
    doc = a.to_json()
    del doc["id"], doc["seq"]  # random ids; the journal numbers every transition
    return doc


class ServiceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="alarm-sm-"))
        self.runner = asyncio.Runner()
        self.now = 1_800_000_000.0
        self.expected: dict[tuple[str, str], Alarm] = {}
        self.svc = self._open()

    def _open(self) -> AlarmService:
        cfg = AlarmsSection(types=TYPES)
        svc = AlarmService(self.dir, cfg, durability="os", clock=lambda: self.now)
        self.runner.run(svc.open())
        return svc

    def _options(self, type_: str) -> Options:
        t = TYPES.get(type_, {})
        return Options(
            latching=t.get("latching", False), require_confirm=t.get("require_confirm", False)
        )

    def _both(self, key: tuple[str, str], event: Event, call: Any) -> None:
        """Apply ``event`` to the pure machine and ``call`` to the service:
        both refuse, or both end in the same state."""
        self.now += 1.0
        try:
            want, _ = apply(self.expected.get(key), *key, event, self._options(key[1]), lambda: "x")
        except AlarmError as e:
            want_error: str | None = e.code
        else:
            want_error = None
        try:
            self.runner.run(call)
        except AlarmError as e:
            assert e.code == want_error, (event, e)
            return
        assert want_error is None, (event, want_error)
        if want is None:
            self.expected.pop(key, None)
        else:
            self.expected[key] = want

    @rule(key=st.sampled_from(KEYS), severity=st.sampled_from([100, 500, 900]))
    def raise_(self, key: tuple[str, str], severity: int) -> None:
        e = Event(Action.RAISE, "rule:r", self.now + 1, severity=severity, message="m")
        self._both(key, e, self.svc.raise_alarm(*key, severity=severity, message="m", by="rule:r"))

    @rule(key=st.sampled_from(KEYS))
    def clear(self, key: tuple[str, str]) -> None:
        e = Event(Action.CLEAR, "rule:r", self.now + 1)
        self._both(key, e, self.svc.clear_alarm(*key, by="rule:r"))

    @rule(key=st.sampled_from(KEYS), action=st.sampled_from(SIMPLE))
    def operator(self, key: tuple[str, str], action: Action) -> None:
        e = Event(action, "ann", self.now + 1, "why")
        self._both(key, e, self.svc.act(action, *key, by="ann", comment="why"))

    @rule(key=st.sampled_from(KEYS), one_shot=st.booleans())
    def shelve(self, key: tuple[str, str], one_shot: bool) -> None:
        # Long shelvings: the timer does not run between steps (the loop is
        # idle), and the deadline must survive restarts unchanged.
        until = None if one_shot else self.now + 1 + 3600
        kind = "one_shot" if one_shot else "timed"
        e = Event(Action.SHELVE, "ann", self.now + 1, "", shelve_kind=kind, until=until)
        call = (
            self.svc.shelve(*key, by="ann", one_shot=True)
            if one_shot
            else self.svc.shelve(*key, by="ann", duration=3600)
        )
        self._both(key, e, call)

    @rule()
    def restart(self) -> None:
        before = {k: _comparable(a) for k, a in self._kept().items()}
        self.runner.run(self.svc.close())
        self.svc = self._open()
        assert {k: _comparable(a) for k, a in self._kept().items()} == before

    def _kept(self) -> dict[tuple[str, str], Alarm]:
        return {(a.source, a.type): a for a in self.svc.list(state="all")}

    @invariant()
    def service_equals_the_machine(self) -> None:
        got = {k: _comparable(a) for k, a in self._kept().items()}
        assert got == {k: _comparable(a) for k, a in self.expected.items()}
        # One open occurrence per key, and its id kept in the journal.
        for k, a in self._kept().items():
            assert self.svc.get(*k) == a

    def teardown(self) -> None:
        try:
            self.runner.run(self.svc.close())
        finally:
            self.runner.close()
            shutil.rmtree(self.dir, ignore_errors=True)


ServiceMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_service_follows_the_machine_across_restarts = ServiceMachine.TestCase
