"""Golden tests of the rule engine, one per feature, on a fake clock.

Each test feeds readings at chosen times and checks the exact transitions
(rule, device, seq, set/clear) the engine makes, and when.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pydantic import ValidationError

from edgeway.config import parse_config
from edgeway.reading import Origin, Reading
from edgeway.rules.config import RuleConfig
from edgeway.rules.engine import RuleEngine, RuleState
from edgeway.rules.outputs import AlarmChange, Publish, RecordEvent, SendCommand


class Clock:
    def __init__(self, t: float = 1000.0, wall: float = 1_765_000_000.0) -> None:
        self.t = t
        self.w = wall

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.w

    def advance(self, s: float) -> None:
        self.t += s
        self.w += s


def rule(**kw: Any) -> RuleConfig:
    kw.setdefault("name", "r")
    return RuleConfig.model_validate(kw)


def engine(*rules: RuleConfig, clock: Clock | None = None) -> tuple[RuleEngine, Clock]:
    c = clock or Clock()
    return RuleEngine(list(rules), clock=c.now, wall=c.wall), c


def reading(device: str = "d1", **metrics: Any) -> Reading:
    return Reading(device, 0.0, metrics, Origin("mqtt", f"devices/{device}/telemetry"))


def feed(e: RuleEngine, device: str = "d1", **metrics: Any) -> list[tuple[str, str, int]]:
    out = e.observe([reading(device, **metrics)])
    return [(t.device_id, t.state, t.seq) for t in out.transitions]


def tick(e: RuleEngine) -> list[tuple[str, str, int]]:
    return [(t.device_id, t.state, t.seq) for t in e.due().transitions]


def test_plain_condition_sets_and_clears() -> None:
    e, _ = engine(rule(when="temperature > 80"))
    assert feed(e, temperature=70) == []
    assert feed(e, temperature=81) == [("d1", "set", 1)]
    assert feed(e, temperature=90) == []  # already set: no repeat
    assert feed(e, temperature=79) == [("d1", "clear", 2)]
    assert feed(e, temperature=79) == []


def test_unknown_metric_changes_nothing() -> None:
    e, _ = engine(rule(when="temperature > 80 and humidity < 30"))
    assert feed(e, temperature=90) == []  # humidity never seen: unknown
    assert feed(e, humidity=20) == [("d1", "set", 1)]  # last values combine
    assert feed(e, other=1) == []  # a reading without the rule's metrics is skipped


def test_for_duration_sets_only_after_holding_and_fires_on_timer() -> None:
    e, c = engine(rule(when="temperature > 80", **{"for": "30s"}))
    assert feed(e, temperature=90) == []
    assert e.next_deadline() == pytest.approx(c.t + 30)
    c.advance(29.9)
    assert tick(e) == []
    c.advance(0.1)
    assert tick(e) == [("d1", "set", 1)]  # no new reading needed


def test_for_duration_restarts_when_condition_breaks() -> None:
    e, c = engine(rule(when="temperature > 80", **{"for": "30s"}))
    feed(e, temperature=90)
    c.advance(20)
    assert feed(e, temperature=70) == []  # broke: the duration is over
    c.advance(20)
    assert tick(e) == []
    feed(e, temperature=90)
    c.advance(29)
    assert tick(e) == []
    c.advance(1)
    assert tick(e) == [("d1", "set", 1)]


def test_hysteresis_separate_clear_condition() -> None:
    e, _ = engine(rule(when="temperature > 80", clear="temperature < 70"))
    assert feed(e, temperature=85) == [("d1", "set", 1)]
    assert feed(e, temperature=75) == []  # between: stays set
    assert feed(e, temperature=81) == []
    assert feed(e, temperature=69) == [("d1", "clear", 2)]
    assert feed(e, temperature=75) == []  # between: stays clear
    assert feed(e, temperature=81) == [("d1", "set", 3)]


def test_clear_for_duration() -> None:
    e, c = engine(rule(when="t > 80", clear="t < 70", clear_for="10s"))
    feed(e, t=90)
    assert feed(e, t=60) == []
    c.advance(10)
    assert tick(e) == [("d1", "clear", 2)]


def test_cooldown_delays_the_next_set() -> None:
    e, c = engine(rule(when="t > 80", cooldown="60s"))
    assert feed(e, t=90) == [("d1", "set", 1)]
    assert feed(e, t=10) == [("d1", "clear", 2)]
    c.advance(10)
    assert feed(e, t=90) == []  # cooling down: pending until 60 s after the set
    c.advance(49)
    assert tick(e) == []
    c.advance(1)
    assert tick(e) == [("d1", "set", 3)]


def test_cooldown_pending_set_dropped_if_condition_breaks() -> None:
    e, c = engine(rule(when="t > 80", cooldown="60s"))
    feed(e, t=90)
    feed(e, t=10)
    c.advance(10)
    feed(e, t=90)
    c.advance(10)
    feed(e, t=10)
    c.advance(60)
    assert tick(e) == []


def test_window_avg() -> None:
    e, c = engine(rule(when="avg(t, 60s) > 80"))
    assert feed(e, t=100) == [("d1", "set", 1)]
    c.advance(30)
    assert feed(e, t=40) == [("d1", "clear", 2)]  # avg 70
    c.advance(31)  # the 100 left the window: avg 40 then with 120 -> 80, not > 80
    assert feed(e, t=120) == []
    assert feed(e, t=121) == [("d1", "set", 3)]  # (40 + 120 + 121) / 3 > 80


def test_window_count_and_delta() -> None:
    e, c = engine(
        rule(name="opens", when="count(door, 10m) >= 3"),
        rule(name="energy", when="delta(kwh, 1h) > 50"),
    )
    assert feed(e, door=1) == []
    c.advance(60)
    assert feed(e, door=1) == []
    c.advance(60)
    assert feed(e, door=1) == [("d1", "set", 1)]
    c.advance(601)  # all three left the window
    assert feed(e, door=1) == [("d1", "clear", 2)]
    assert feed(e, kwh=1000) == []
    c.advance(1800)
    assert feed(e, kwh=1049) == []
    assert feed(e, kwh=1051) == [("d1", "set", 1)]


def test_window_functions_and_durations_checked_at_load() -> None:
    for bad, why in [
        ("avg(t) > 1", "takes a metric name and a duration"),
        ("avg(t, 0s) > 1", "above 0"),
        ("avg(t, 2d) > 1", "at most 1d"),
        ("open('x')", "only the functions"),
        ("t.__class__", "not allowed"),
        ("avg(t + 1, 5s) > 1", "takes a metric name"),
    ]:
        with pytest.raises(ValidationError, match=why):
            rule(when=bad)


def test_schedule_gates_set_only() -> None:
    # 2026-12-07 is a Monday.
    monday_9 = dt.datetime(2026, 12, 7, 9, 0, tzinfo=dt.UTC).timestamp()
    c = Clock(wall=monday_9)
    sched = [{"days": ["mon"], "from": "08:00", "to": "10:00"}]
    e, _ = engine(rule(when="t > 80", schedule=sched, timezone="UTC"), clock=c)
    assert feed(e, t=90) == [("d1", "set", 1)]
    c.advance(3600)  # 10:00: outside
    assert feed(e, t=10) == [("d1", "clear", 2)]  # clearing is not gated
    assert feed(e, t=90) == []  # outside: no set
    c.advance(7 * 86400 - 3600)  # next Monday 09:00
    assert feed(e, t=90) == [("d1", "set", 3)]


def test_schedule_past_midnight() -> None:
    from edgeway.rules.config import ScheduleWindow
    from edgeway.rules.engine import Schedule

    s = Schedule(
        [ScheduleWindow.model_validate({"days": ["fri"], "from": "22:00", "to": "06:00"})], "UTC"
    )
    at = lambda d, h: dt.datetime(2026, 12, d, h, 30, tzinfo=dt.UTC).timestamp()  # noqa: E731
    assert s.allows(at(11, 23))  # Friday night
    assert s.allows(at(12, 5))  # Saturday early morning
    assert not s.allows(at(12, 7))
    assert not s.allows(at(11, 21))
    assert not s.allows(at(10, 23))  # Thursday


def test_restored_pending_duration_fires_at_its_deadline_not_restarted() -> None:
    c = Clock()
    r = rule(when="t > 80", **{"for": "30s"})
    e, _ = engine(r, clock=c)
    out = e.observe([reading(t=90)])
    ((_, _, saved),) = out.states
    c.advance(20)  # the process dies here; a new engine takes the state back
    e2, _ = engine(r, clock=c)
    e2.restore_all([("r", "d1", saved)])
    assert e2.next_deadline() == pytest.approx(c.t + 10)
    c.advance(10)
    assert tick(e2) == [("d1", "set", 1)]  # windows are empty: last known result stands


def test_restored_active_state_is_not_set_again() -> None:
    e, _ = engine(rule(when="t > 80"))
    e.restore_all([("r", "d1", RuleState(active=True, seq=7))])
    assert feed(e, t=90) == []
    assert feed(e, t=10) == [("d1", "clear", 8)]


def test_match_limits_devices() -> None:
    e, _ = engine(rule(when="t > 80", match={"devices": ["boiler-*"]}))
    assert feed(e, "pump-1", t=90) == []
    assert feed(e, "boiler-1", t=90) == [("boiler-1", "set", 1)]


def test_actions_are_typed_outputs_with_stable_ids() -> None:
    e, _ = engine(
        rule(
            name="hot",
            when="t > 80",
            on_set=[
                {"command": {"name": "fan", "params": {"speed": 100}}},
                {"alarm": {"type": "overheat", "severity": 700, "message": "{device_id} hot"}},
                {"publish": {"topic": "alerts/{device_id}/{rule}"}},
                {"event": {}},
            ],
            on_clear=[{"alarm": {"type": "overheat"}}],
        )
    )
    tr = e.observe([reading(t=90)]).transitions[0]
    cmd, alarm, pub, ev = tr.actions
    assert cmd == SendCommand("d1", "fan", {"speed": 100}, None, "rule:hot:hot:d1:1", "rule:hot")
    assert isinstance(alarm, AlarmChange) and alarm.do == "raise" and alarm.message == "d1 hot"
    assert (
        isinstance(pub, Publish) and pub.topic == "alerts/d1/hot" and '"state":"set"' in pub.payload
    )
    assert (
        isinstance(ev, RecordEvent)
        and ev.metrics["state"] == "set"
        and ev.transition_id == "hot:d1:1"
    )
    (clear,) = e.observe([reading(t=10)]).transitions[0].actions
    assert isinstance(clear, AlarmChange) and clear.do == "clear"


def test_config_errors_name_the_rule_key() -> None:
    from edgeway.config import ConfigError

    text = "rules:\n  - name: a\n    when: 'x >'\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.yaml")
    (issue,) = err.value.issues
    assert issue.key == "rules[0].when" and issue.line == 3
    with pytest.raises(ConfigError, match="defined twice"):
        parse_config("rules:\n  - {name: a, when: 'x > 1'}\n  - {name: a, when: 'x > 2'}\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_config("rules:\n  - {name: a, when: 'x > 1', on_set: [{}]}\n")


def test_condition_fast_paths_agree_with_the_general_comparison() -> None:
    """One comparison and two-part and/or have closures of their own; they
    must give what the general (chained) comparison and all()/any() give."""
    import itertools

    from edgeway.pipeline.expr import compile_expr

    values = [-1.5, 0.0, 2.0, 80.0, 80.5]
    for op in ["<", "<=", ">", ">=", "==", "!="]:
        fast, _ = compile_expr(f"a {op} 80", logic=True)
        fast_names, _ = compile_expr(f"a {op} b", logic=True)
        chained, _ = compile_expr(f"a {op} b < 1000", logic=True)  # two ops: the loop
        for a, b in itertools.product(values, values):
            m = {"a": a, "b": b}
            assert fast(m) == eval(f"a {op} 80", {}, m)  # Python itself: the reference
            assert fast_names(m) == eval(f"a {op} b", {}, m)
            assert chained(m) == eval(f"a {op} b < 1000", {}, m)
    for text in [
        "a > 1 and b > 1",
        "a > 1 or b > 1",
        "a > 1 and b > 1 and a < 50",
        "a > 1 or b > 1 or a < -1",
    ]:
        fn, _ = compile_expr(text, logic=True)
        for a, b in itertools.product(values, values):
            assert fn({"a": a, "b": b}) == eval(text, {}, {"a": a, "b": b})


def test_rules_named_by_a_step_are_evaluated_there_not_at_the_front() -> None:
    c = Clock()
    e = RuleEngine(
        [rule(name="front", when="t > 80"), rule(name="later", when="f > 176")],
        clock=c.now,
        wall=c.wall,
        stepped={"r/1:rules": ["later"]},
    )
    front = e.observe([reading(t=90, f=200)])
    assert [t.rule for t in front.transitions] == ["front"]
    at_step = e.observe([reading(t=90, f=200)], step="r/1:rules")
    assert [t.rule for t in at_step.transitions] == ["later"]
    assert not e.observe([reading(t=90)], step="other/0:rules")  # an unknown step: nothing


def test_rule_step_names_are_checked() -> None:
    from edgeway.validate import validate

    text = """
rules:
  - {name: a, when: "t > 1"}
routes:
  - name: r
    steps:
      - rules: {names: [a]}
      - rules: {names: [a, nope]}
"""
    issues = validate(text, filename="f.yaml")
    assert [(i.key, i.line) for i in issues] == [
        ("routes[0].steps[1].rules.names", 8),
        ("routes[0].steps[1].rules.names", 8),
    ]
    assert "named by two steps" in issues[0].message and "no rule named 'nope'" in issues[1].message


def test_conditions_read_the_device_twin() -> None:
    e, _ = engine(rule(name="over", when="temperature > desired(setpoint) + 5"))
    assert feed(e, temperature=30) == []  # no twin yet: unknown
    e.set_twin("d1", "desired", {"setpoint": 20}, 1)
    assert feed(e, temperature=26) == [("d1", "set", 1)]
    e.set_twin("d1", "desired", {"setpoint": 25}, 2)
    assert feed(e, temperature=26) == [("d1", "clear", 2)]
    e.set_twin("d1", "desired", {"setpoint": 0}, 1)  # an older version: ignored
    assert feed(e, temperature=26) == []


def test_a_rule_on_the_twin_only_is_evaluated_at_every_reading() -> None:
    e, _ = engine(rule(name="fw", when="reported(firmware) < 3"))
    e.set_twin("d1", "reported", {"firmware": 2}, 1)
    assert feed(e, anything=1) == [("d1", "set", 1)]
    with pytest.raises(ValidationError, match="takes a key of the twin"):
        rule(when="desired(1) > 0")
