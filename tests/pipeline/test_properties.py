"""Property tests for the invariants the issue names."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeway.pipeline.registry import StepContext, build_step
from edgeway.reading import Origin, Reading

# Physically meaningful magnitudes: sensor values, not 1e308 (where even a
# correct mean overflows the float range while summing).
values = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


def step(spec: dict[str, object]) -> object:
    return build_step(spec, StepContext(route="p", step_id="p/0:x"))


@settings(max_examples=300, deadline=None)
@given(
    series=st.lists(values, min_size=1, max_size=60),
    absolute=st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)),
    percent=st.one_of(st.none(), st.floats(min_value=0, max_value=50)),
)
def test_deadband_never_passes_a_change_smaller_than_its_band(
    series: list[float], absolute: float | None, percent: float | None
) -> None:
    if absolute is None and percent is None:
        absolute = 1.0
    s = step({"deadband": {"absolute": absolute, "percent": percent}})
    last_sent: float | None = None
    for i, v in enumerate(series):
        out = s.apply([Reading("d", float(i), {"x": v}, Origin("t"))], 0.0)  # type: ignore[attr-defined]
        band = max(absolute or 0.0, (percent or 0.0) / 100 * abs(last_sent or 0.0))
        if out:
            assert out[0].metrics == {"x": v}
            if last_sent is not None:
                assert abs(v - last_sent) >= band or (band == 0 and v != last_sent)
            last_sent = v
        else:
            # Dropped: the cloud's view (last sent) is within the band.
            assert last_sent is not None
            assert abs(v - last_sent) < band or v == last_sent


@settings(max_examples=300, deadline=None)
@given(
    readings=st.lists(
        st.tuples(st.floats(min_value=0, max_value=99.999), values), min_size=1, max_size=80
    )
)
def test_a_mean_window_outputs_the_mean_of_its_inputs(readings: list[tuple[float, float]]) -> None:
    # A grace longer than the span: arrival order is free, nothing is late.
    s = step({"window": {"size": 10, "aggregates": ["mean", "count"], "grace": 1000}})
    for ts, v in readings:  # arbitrary arrival order; no window closes before the tick
        out = s.apply([Reading("d", 1000.0 + ts, {"x": v}, Origin("t"))], 0.0)  # type: ignore[attr-defined]
        assert out == []
    emitted = s.tick(1e9)  # type: ignore[attr-defined]
    by_window: dict[int, list[float]] = {}
    for ts, v in readings:
        by_window.setdefault(int((1000.0 + ts) // 10), []).append(v)
    assert len(emitted) == len(by_window)
    for r in emitted:
        inputs = by_window[int(r.metrics["window_start"]) // 10]
        assert r.metrics["x_count"] == len(inputs)
        expected = math.fsum(inputs) / len(inputs)
        assert math.isclose(r.metrics["x_mean"], expected, rel_tol=1e-12, abs_tol=1e-6)


@settings(max_examples=200, deadline=None)
@given(series=st.lists(st.one_of(st.sampled_from(["a", "b"]), st.integers(0, 3)), max_size=40))
def test_on_change_passes_exactly_the_changes(series: list[object]) -> None:
    s = step({"on_change": {}})
    sent = []
    for i, v in enumerate(series):
        out = s.apply([Reading("d", float(i), {"x": v}, Origin("t"))], 0.0)  # type: ignore[attr-defined]
        sent.extend(r.metrics["x"] for r in out)
    expected = [
        v
        for i, v in enumerate(series)
        if i == 0 or (v != series[i - 1] or type(v) is not type(series[i - 1]))
    ]
    assert sent == expected
