"""The generated scan (edgeway.rules.scan) changes nothing the engine decides.

Two engines get the same random rules, readings and timer ticks: one scans
(idle rules whose ``when`` does not hold are skipped), the other evaluates
every rule in full. Every output (state rows, transitions with their values
and actions) must be the same, step by step. The rules mix what the scan
decides inline (comparisons of metrics and window functions with numbers,
``and`` / ``or``) with what it hands back (arithmetic, ``not``, two metrics
compared, schedules), and the values mix numbers with booleans, strings and
missing metrics, so every branch of the generated code is taken.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeway.reading import Origin, Reading
from edgeway.rules.config import RuleConfig
from edgeway.rules.engine import RuleEngine, RuleOutput
from edgeway.rules.scan import build_scan

METRICS = ("a", "b", "c")
FUNCS = ("avg", "sum", "count", "delta", "min_over", "max_over")
OPS = ("<", "<=", ">", ">=", "==", "!=")

numbers = st.sampled_from([-5, -1, 0, 0.5, 1, 2, 3, 5, 10, 2.5, -0.5])
terms = st.one_of(
    st.sampled_from(METRICS),
    st.builds(
        lambda f, m, s: f"{f}({m}, {s}s)",
        st.sampled_from(FUNCS),
        st.sampled_from(METRICS),
        st.sampled_from([1, 3]),
    ),
)
comparisons = st.one_of(
    st.builds(lambda t, o, n: f"{t} {o} {n}", terms, st.sampled_from(OPS), numbers),
    st.builds(lambda n, o, t: f"{n} {o} {t}", numbers, st.sampled_from(OPS), terms),
)
scanned_shapes = st.one_of(
    comparisons,
    st.builds(lambda a, b: f"{a} and {b}", comparisons, comparisons),
    st.builds(lambda a, b: f"{a} or {b}", comparisons, comparisons),
    st.builds(lambda a, b, c: f"{a} and {b} and {c}", comparisons, comparisons, comparisons),
    st.builds(lambda a, b, c: f"{a} or {b} or {c}", comparisons, comparisons, comparisons),
)
other_shapes = st.one_of(
    st.builds(lambda m, n: f"{m} + 1 > {n}", st.sampled_from(METRICS), numbers),
    st.builds(lambda c: f"not ({c})", comparisons),
    st.just("a > b"),
    st.builds(lambda a, b: f"({a} or {b}) and a > 0", comparisons, comparisons),
)
conditions = st.one_of(scanned_shapes, scanned_shapes, scanned_shapes, other_shapes)


@st.composite
def rule_sets(draw: Any) -> list[RuleConfig]:
    n = draw(st.integers(min_value=8, max_value=40))
    out = []
    for i in range(n):
        spec: dict[str, Any] = {
            "name": f"r{i}",
            "when": draw(conditions),
            "for": draw(st.sampled_from([0, 0, 1, 2.5])),
            "cooldown": draw(st.sampled_from([0, 0, 3])),
        }
        if draw(st.booleans()):
            spec["clear"] = draw(conditions)
            spec["clear_for"] = draw(st.sampled_from([0, 1]))
        if i % 7 == 6:  # a few with a schedule: the scan hands them back
            spec["schedule"] = [{"days": ["mon", "tue", "wed"], "from": "08:00", "to": "18:00"}]
        out.append(RuleConfig.model_validate(spec))
    return out


values = st.one_of(
    numbers,
    st.floats(min_value=-20, max_value=20, allow_nan=False),
    st.booleans(),
    st.just("on"),
    st.just(math.inf),
)
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("reading"),
            st.sampled_from([0.0, 0.2, 0.5, 1.0, 2.0]),
            st.sampled_from(["d1", "d2"]),
            st.dictionaries(st.sampled_from(METRICS), values, min_size=1, max_size=3),
        ),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 3.0]), st.just(""), st.just({})),
        # The stored states taken back: by the running engine (a failed
        # write's resync) or by a new one (a restart: values and windows gone).
        st.tuples(st.sampled_from(["resync", "restart"]), st.just(0.0), st.just(""), st.just({})),
    ),
    min_size=1,
    max_size=60,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.w = 1_765_000_000.0  # a Saturday 05:46 UTC: schedules say no until moved

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.w


def dump(out: RuleOutput) -> bytes:
    return orjson.dumps(
        {
            "states": [
                (r, d, s.active, s.since, s.seq, s.cooldown_until) for r, d, s in out.states
            ],
            "transitions": [
                {**t.to_json(), "actions": [repr(a) for a in t.actions]} for t in out.transitions
            ],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rule_sets(), steps=steps)
def test_the_scan_changes_no_outcome(rules: list[RuleConfig], steps: list[Any]) -> None:
    clock = Clock()
    scanned = RuleEngine(rules, clock=clock.now, wall=clock.wall)
    full = RuleEngine(rules, clock=clock.now, wall=clock.wall, scan=False)
    for kind, dt, device, metrics in steps:
        clock.t += dt
        clock.w += dt * 3600  # hours pass on the wall clock: schedules open and close
        if kind == "tick":
            a, b = scanned.due(), full.due()
        elif kind in ("resync", "restart"):
            stored = [(r, d, dataclasses.replace(st)) for (r, d), st in full.states.items()]
            if kind == "restart":
                scanned = RuleEngine(rules, clock=clock.now, wall=clock.wall)
                full = RuleEngine(rules, clock=clock.now, wall=clock.wall, scan=False)
                scanned.restore_all([(r, d, dataclasses.replace(st)) for r, d, st in stored])
                full.restore_all(stored)
            else:
                scanned.reset_states([(r, d, dataclasses.replace(st)) for r, d, st in stored])
                full.reset_states(stored)
            continue
        else:
            r = Reading(device, 0.0, dict(metrics), Origin("mqtt", f"devices/{device}/telemetry"))
            a, b = scanned.observe([r]), full.observe([r])
        assert dump(a) == dump(b)
    assert scanned.stats.transitions == full.stats.transitions


def test_the_scan_is_used_and_skips_idle_rules() -> None:
    """Not only equal: the scan is built and takes the idle rules off the path."""
    rules = [RuleConfig.model_validate({"name": f"r{i}", "when": f"t > {i}"}) for i in range(40)]
    clock = Clock()
    engine = RuleEngine(rules, clock=clock.now, wall=clock.wall)
    r = Reading("d1", 0.0, {"t": -1.0}, Origin("mqtt", "devices/d1/telemetry"))
    for _ in range(5):  # the scanner is built a slice per call
        engine.observe([r])
    scanner = engine.front.cache[("d1", "mqtt", "devices/d1/telemetry")][1]
    assert scanner is not None and scanner.ready
    assert scanner(engine.front.scopes["d1"]) == []
    engine.front.scopes["d1"]["t"] = 2.5  # rules r0, r1, r2 hold
    assert scanner(engine.front.scopes["d1"]) == [0, 1, 2]


def test_the_generated_source_holds_no_configuration_text() -> None:
    """Metric and rule names from the configuration reach the scan as values,
    never as source text (a name cannot inject code)."""
    rules = [
        RuleConfig.model_validate({"name": f"q{i}", "when": f"{name} > 1"})
        for i, name in enumerate(["temperature", "t2", *["t"] * 8])
    ]
    from edgeway.rules.engine import CompiledRule

    compiled = [CompiledRule(r) for r in rules]
    # Rule names are checked by the configuration; the scan must not rely on it.
    compiled[0].name = "r'); import os #"
    fn = build_scan(compiled)
    code = fn.__code__
    texts = [c for c in code.co_consts if isinstance(c, str)] + list(code.co_names)
    assert not any("temperature" in c or "import os" in c for c in texts)
    assert "temperature" in fn.__globals__.values()
    assert "r'); import os #" in fn.__globals__.values()


def test_a_window_that_held_an_infinite_value_reads_the_same_on_both_paths() -> None:
    """Found by the test above (CI, 2026-12-07): the scan reads a window at
    every reading, full evaluation only when a condition reaches it, and the
    running sum dropped an infinite sample at different moments (inf - inf
    is nan, which then stuck). Old samples now leave before a new one comes
    in, and a non-finite sum is summed afresh."""
    rules = [RuleConfig.model_validate({"name": f"r{i}", "when": "a < -5"}) for i in range(7)] + [
        RuleConfig.model_validate({"name": "r7", "when": "a < -1 and -5 < avg(c, 1s)"})
    ]
    clock = Clock()
    scanned = RuleEngine(rules, clock=clock.now, wall=clock.wall)
    full = RuleEngine(rules, clock=clock.now, wall=clock.wall, scan=False)
    steps = [
        (0.0, {"a": -5}),
        (0.0, {"a": "on", "b": "on", "c": math.inf}),
        (2.0, {"a": "on"}),
        (0.0, {"a": -5, "c": -1}),
    ]
    outs = []
    for dt, metrics in steps:
        clock.t += dt
        r = Reading("d1", 0.0, dict(metrics), Origin("mqtt", "devices/d1/telemetry"))
        a, b = scanned.observe([r]), full.observe([r])
        assert dump(a) == dump(b)
        outs.append(a)
    assert [t.rule for t in outs[-1].transitions] == ["r7"]  # avg(c) = -1 once inf left


def test_a_state_restored_at_start_is_seen_by_the_scan() -> None:
    """A rule active when the gateway stopped is active after the restart,
    and the scan (which reads each device's rule states) must know it, even
    though the device's values, windows and scope are new: its clearing
    reading is evaluated, not skipped as an idle rule's."""
    rules = [
        RuleConfig.model_validate({"name": f"r{i}", "when": f"t > {i + 1}"}) for i in range(12)
    ]
    clock = Clock()
    before = RuleEngine(rules, clock=clock.now, wall=clock.wall, scan=False)
    before.observe([Reading("d1", 0.0, {"t": 1.5}, Origin("mqtt", "devices/d1/telemetry"))])
    assert before.states[("r0", "d1")].active
    stored = [(r, d, dataclasses.replace(s)) for (r, d), s in before.states.items()]
    engines = []
    for scan in (True, False):
        e = RuleEngine(rules, clock=clock.now, wall=clock.wall, scan=scan)
        e.restore_all([(r, d, dataclasses.replace(s)) for r, d, s in stored])
        engines.append(e)
    r = Reading("d1", 0.0, {"t": 1.5}, Origin("mqtt", "devices/d1/telemetry"))
    for _ in range(3):  # the scanner is built a slice per call
        clock.t += 0.1
        assert [dump(e.observe([r])) for e in engines] == [dump(RuleOutput())] * 2
    assert engines[0].front.cache[("d1", "mqtt", "devices/d1/telemetry")][1] is not None
    clock.t += 0.1
    clear = Reading("d1", 0.0, {"t": 0.0}, Origin("mqtt", "devices/d1/telemetry"))
    a, b = (e.observe([clear]) for e in engines)
    assert [t.state for t in b.transitions] == ["clear"]
    assert dump(a) == dump(b)
