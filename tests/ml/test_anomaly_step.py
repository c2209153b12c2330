"""The ``anomaly`` step: a rolling z-score per device and metric."""

from __future__ import annotations

import random

import pytest

from edgeway.ml.zscore import AnomalyParams, AnomalyStep
from edgeway.pipeline.registry import StepContext, parse_step_spec
from edgeway.reading import MetricValue, Origin, Reading
from edgeway.sim.signals import MachineSignal


def step(**params: object) -> AnomalyStep:
    cls, p = parse_step_spec({"anomaly": {"metrics": ["vibration"], **params}})
    assert cls is AnomalyStep
    return AnomalyStep(p, StepContext(route="r", step_id="r/0:anomaly"))  # type: ignore[arg-type]


def rd(device: str, ts: float, metrics: dict[str, MetricValue]) -> Reading:
    return Reading(device, ts, metrics, Origin("mqtt"))


def feed(s: AnomalyStep, device: str, values: list[float], t0: float = 0.0) -> list[Reading]:
    out: list[Reading] = []
    for i, v in enumerate(values):
        out += s.apply([rd(device, t0 + i, {"vibration": v})], t0 + i)
    return out


def test_nothing_added_during_warmup_then_scores() -> None:
    s = step(warmup=10, threshold=4.0)
    rng = random.Random(1)
    out = feed(s, "m1", [2.0 + rng.gauss(0, 0.1) for _ in range(30)])
    assert all("anomaly" not in r.metrics for r in out[:10])
    assert all("vibration_z" in r.metrics and r.metrics["anomaly"] is False for r in out[10:])
    spike = s.apply([rd("m1", 31, {"vibration": 5.0})], 31)[0]
    assert spike.metrics["anomaly"] is True
    assert float(spike.metrics["anomaly_score"]) >= 4.0  # type: ignore[arg-type]
    assert spike.metrics["vibration"] == 5.0  # the reading itself is untouched


def test_baselines_are_per_device() -> None:
    s = step(warmup=5)
    feed(s, "quiet", [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0])
    feed(s, "loud", [9.0, 9.1, 8.9, 9.0, 9.2, 8.8, 9.0])
    # 9.0 is normal for "loud" and far off for "quiet".
    assert s.apply([rd("loud", 10, {"vibration": 9.0})], 10)[0].metrics["anomaly"] is False
    assert s.apply([rd("quiet", 10, {"vibration": 9.0})], 10)[0].metrics["anomaly"] is True


def test_other_metrics_booleans_and_strings_pass_untouched() -> None:
    s = step(warmup=2)
    r = rd("m", 0, {"state": "on", "running": True, "current": 3.0})
    assert s.apply([r], 0) == [r]


def test_memory_is_bounded_by_devices_and_metrics() -> None:
    _, p = parse_step_spec(
        {"anomaly": {"metrics": ["*"], "max_devices": 100, "max_metrics": 3, "warmup": 2}}
    )
    s = AnomalyStep(p, StepContext(route="r", step_id="r/0:anomaly"))  # type: ignore[arg-type]
    for d in range(1000):
        s.apply([rd(f"d{d}", 0, {f"m{i}": float(i) for i in range(10)})], 0)
    assert len(s._devices) == 100
    assert all(len(b) <= 3 for b in s._devices.values())


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_step_spec({"anomaly": {"metrics": []}})
    with pytest.raises(ValueError):
        parse_step_spec({"anomaly": {"metrics": ["x"], "threshold": 0}})
    assert AnomalyParams(metrics=["x"]).warmup == 100


def test_finds_a_developing_bearing_fault_and_not_healthy_machines() -> None:
    """On the simulator's machines: a fault is flagged before it is half way to
    failure; healthy machines over the same hours raise (almost) nothing."""
    rng = random.Random(3)
    s = step(metrics=["vibration", "bearing_temp"], warmup=300, threshold=4.0, half_life=3600)
    first_flag: list[float] = []
    false_flags = 0
    healthy_values = 0
    for i in range(20):
        faulty = i < 10
        m = MachineSignal.random(rng, fault=False)
        if faulty:
            m.fault_start, m.fault_duration = 3600.0, 3600.0
        flagged_at = None
        for k in range(0, 3 * 3600, 10):
            t = float(k)
            sample = m.sample(t)
            if not sample["running"]:
                continue
            out = s.apply([rd(f"m{i}", t, sample)], t)[0]
            flag = out.metrics.get("anomaly") is True
            if faulty and flag and t > 3600 and flagged_at is None:
                flagged_at = t
            if not faulty and "anomaly" in out.metrics:
                healthy_values += 1
                false_flags += flag
        if faulty:
            assert flagged_at is not None, f"machine {i}: fault never flagged"
            first_flag.append(m.fault_severity(flagged_at))
    assert max(first_flag) < 0.5, first_flag
    assert false_flags / healthy_values < 0.01
