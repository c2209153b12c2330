"""The ``anomaly`` step with ``detector: hst`` (river's HalfSpaceTrees)."""

from __future__ import annotations

import random
import sys
import tracemalloc

import pytest

from edgeway.ml.hst import model_bytes
from edgeway.ml.zscore import AnomalyStep
from edgeway.pipeline.registry import StepContext, parse_step_spec
from edgeway.reading import MetricValue, Origin, Reading
from edgeway.sim.signals import MachineSignal


def step(**params: object) -> AnomalyStep:
    spec = {"metrics": ["vibration"], "detector": "hst", **params}
    cls, p = parse_step_spec({"anomaly": spec})
    assert cls is AnomalyStep
    return AnomalyStep(p, StepContext(route="r", step_id="r/0:anomaly"))  # type: ignore[arg-type]


def rd(device: str, ts: float, metrics: dict[str, MetricValue]) -> Reading:
    return Reading(device, ts, metrics, Origin("mqtt"))


def test_finds_a_developing_bearing_fault_in_the_vibration_and_not_healthy_machines() -> None:
    """The simulator's machines, one reading per 10 s for 3 h: a bearing fault
    that develops over 10 minutes from the first hour is flagged on each
    faulty machine before it is 70 % of the way to failure (most within 15 %);
    healthy machines, load steps and all, are flagged in under 1 % of their
    readings."""
    rng = random.Random(3)
    s = step(warmup=100, hst={"window": 250, "height": 4})
    first_flag: list[float] = []
    false_flags = healthy = 0
    for i in range(20):
        faulty = i < 10
        m = MachineSignal.random(rng, fault=False)
        if faulty:
            m.fault_start, m.fault_duration = 3600.0, 600.0
        flagged_at = None
        for k in range(0, 3 * 3600, 10):
            t = float(k)
            sample = m.sample(t)
            if not sample["running"]:
                continue  # a stopped machine is not judged (the route's filter)
            out = s.apply([rd(f"m{i}", t, sample)], t)[0]
            flag = out.metrics.get("anomaly") is True
            if faulty and flag and t > 3600 and flagged_at is None:
                flagged_at = t
            if not faulty and "anomaly" in out.metrics:
                healthy += 1
                false_flags += flag
        if faulty:
            assert flagged_at is not None, f"machine {i}: fault never flagged"
            first_flag.append(m.fault_severity(flagged_at))
    assert max(first_flag) < 0.7, first_flag
    assert sorted(first_flag)[len(first_flag) // 2] < 0.15, first_flag
    assert healthy > 5000 and false_flags / healthy < 0.01, (false_flags, healthy)


def test_scores_only_after_warmup_and_one_window() -> None:
    s = step(warmup=20, hst={"window": 30})
    rng = random.Random(1)
    out = [
        s.apply([rd("m", float(i), {"vibration": 2.0 + rng.gauss(0, 0.1)})], i)[0]
        for i in range(60)
    ]
    assert all("anomaly_score" not in r.metrics for r in out[:50])
    assert all(0.0 <= float(r.metrics["anomaly_score"]) <= 1.0 for r in out[50:])  # type: ignore[arg-type]
    spike = s.apply([rd("m", 61.0, {"vibration": 3.5})], 61)[0]
    assert spike.metrics["anomaly"] is True and spike.metrics["vibration"] == 3.5


def test_known_limits_skip_the_warmup() -> None:
    s = step(warmup=1000, hst={"window": 10, "limits": {"vibration": [0, 10]}})
    out = [s.apply([rd("m", float(i), {"vibration": 2.0})], i)[0] for i in range(11)]
    assert "anomaly_score" not in out[9].metrics and "anomaly_score" in out[10].metrics


def test_a_reading_without_every_feature_passes_unscored() -> None:
    s = step(metrics=["vibration", "current"], warmup=2, hst={"window": 10})
    s.apply([rd("m", 0.0, {"vibration": 1.0, "current": 5.0})], 0)
    r = rd("m", 1.0, {"vibration": 1.0})
    assert s.apply([r], 1) == [r]
    assert s._hst is not None and s._hst.unscored == 1


def test_memory_is_bounded_by_devices() -> None:
    """1,000 devices through a step that keeps 20 models: 20 models stay, and
    the heap they hold is under the bound the configuration is checked with."""
    s = step(warmup=2, hst={"window": 10, "max_devices": 20, "trees": 10, "height": 6})
    rng = random.Random(2)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for k in range(30):
        for d in range(1000):
            s.apply([rd(f"d{d}", float(k), {"vibration": rng.uniform(0, 5)})], k)
    s.apply([rd(f"d{d}", 99.0, {"vibration": 1.0}) for d in range(980, 1000)], 99)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert s._hst is not None and len(s._hst.devices) == 20
    assert all(d.model is not None for d in s._hst.devices.values())
    assert held < 20 * model_bytes(10, 6), held


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="MiB"):
        parse_step_spec(
            {
                "anomaly": {
                    "metrics": ["x"],
                    "detector": "hst",
                    "hst": {"max_devices": 100_000, "height": 6, "trees": 10},
                }
            }
        )
    with pytest.raises(ValueError, match="nodes"):
        parse_step_spec(
            {"anomaly": {"metrics": ["x"], "detector": "hst", "hst": {"height": 7, "trees": 25}}}
        )
    with pytest.raises(ValueError, match="between 0 and 1"):
        parse_step_spec({"anomaly": {"metrics": ["x"], "detector": "hst", "threshold": 4}})
    with pytest.raises(ValueError, match="low < high"):
        parse_step_spec(
            {"anomaly": {"metrics": ["x"], "detector": "hst", "hst": {"limits": {"x": [3, 1]}}}}
        )
    with pytest.raises(ValueError):
        parse_step_spec({"anomaly": {"metrics": ["x"], "detector": "hst", "hst": {"height": 8}}})


def test_without_river_the_step_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "river", None)
    monkeypatch.setitem(sys.modules, "river.anomaly", None)
    with pytest.raises(ValueError, match=r"edgeway\[ml\]"):
        step()
    with pytest.raises(ValueError, match=r"edgeway\[ml\]"):  # at configuration time
        parse_step_spec({"anomaly": {"metrics": ["x"], "detector": "hst"}})
    parse_step_spec({"anomaly": {"metrics": ["x"]}})  # the z-score needs nothing
