"""``anomaly``: a built-in detector that needs no trained model: a rolling
z-score per device and metric (``detector: zscore``, the default, below) or
half-space trees per device over the metrics together (``detector: hst``,
river's HalfSpaceTrees, see :mod:`edgeway.ml.hst`).

Example::

    - anomaly:
        metrics: [vibration, bearing_temp]   # globs of numeric metrics it watches
        half_life: 1h           # how fast the baseline follows the signal
        warmup: 100             # values per metric before it judges
        threshold: 4.0          # |z| at or above this flags an anomaly
        max_devices: 10000      # devices it keeps a baseline for (least recent forgotten)

For each watched metric the step keeps an exponentially weighted mean and
variance (West's incremental form, O(1) per value, three floats per metric)
and adds to the reading:

- ``<metric>_z``: how many standard deviations the value is from the baseline;
- ``anomaly_score``: the largest ``|z|`` of the reading's watched metrics;
- ``anomaly``: ``true`` when ``anomaly_score >= threshold``.

Before ``warmup`` values the step adds nothing (a baseline of three values
flags everything). The baseline follows the signal with the given half-life:
a fault that develops over hours must be judged against a baseline that
follows more slowly than that (``half_life`` of an hour or more), and a
signal that steps with load needs a ``threshold`` of 4 or more (the
simulator's pumps: 0.6 % of healthy values flagged at 4, with a one-hour
half-life and 300 values of warm-up; every developing fault flagged). An
anomalous value moves the baseline like any other: down-weighting it kept
the baseline from ever catching up with a legitimate step in load (flags
that never stopped). The baseline is in memory:
after a restart the detector warms up again (``warmup`` values), which is the
price of a detector that costs nothing to keep.

Memory is bounded: ``max_devices`` baselines (least recently seen dropped
first) of at most ``max_metrics`` metrics each.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

from pydantic import Field, model_validator

from edgeway.config_types import Duration
from edgeway.ml.hst import RIVER, HalfSpaceDetector, HstParams
from edgeway.pipeline.registry import (
    NAME_CACHE_LIMIT,
    Step,
    StepContext,
    StepParams,
    register_step,
)
from edgeway.pipeline.routes import compile_globs
from edgeway.reading import MetricValue, Reading

THRESHOLDS = {"zscore": 4.0, "hst": 0.9}
"""Default ``threshold`` per detector: ``|z|`` and the half-space trees' score
(0..1; 0.9 flagged 0.x % of the simulator's healthy readings, see docs/models.md)."""


class AnomalyParams(StepParams):
    metrics: list[str] = Field(min_length=1)
    detector: Literal["zscore", "hst"] = "zscore"
    half_life: Duration = 3600.0
    warmup: int = Field(default=100, ge=2, le=100_000)
    threshold: float | None = Field(default=None, gt=0)
    """Default: 4.0 for ``zscore``, 0.9 for ``hst``."""
    hst: HstParams = Field(default_factory=HstParams)
    max_devices: int = Field(default=10_000, ge=1, le=1_000_000)
    max_metrics: int = Field(default=32, ge=1, le=1_000)
    min_std: float = Field(default=1e-9, ge=0)
    """Floor of the standard deviation (a perfectly flat signal has none)."""

    @model_validator(mode="after")
    def _hst(self) -> AnomalyParams:
        if self.detector != "hst":
            return self
        if self.threshold is not None and self.threshold > 1:
            raise ValueError("threshold: the hst score is between 0 and 1")
        if not RIVER.installed():  # refused by edgeway check, not at the first reading
            raise ValueError(f"detector hst: {RIVER.missing()}")
        return self

    @property
    def flag_at(self) -> float:
        return self.threshold if self.threshold is not None else THRESHOLDS[self.detector]


class _Baseline:
    __slots__ = ("last_ts", "mean", "n", "var")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.last_ts = 0.0


@register_step
class AnomalyStep(Step):
    """Flags values far from their device's own recent baseline."""

    type_name = "anomaly"
    Params = AnomalyParams

    def __init__(self, params: AnomalyParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.params: AnomalyParams = params
        self._covered = compile_globs(params.metrics)
        self._names: dict[str, bool] = {}
        self._devices: OrderedDict[str, dict[str, _Baseline]] = OrderedDict()
        self.flagged = 0
        self._hst = (
            HalfSpaceDetector(params.hst, params.warmup) if params.detector == "hst" else None
        )

    def _watches(self, name: str) -> bool:
        hit = self._names.get(name)
        if hit is None:
            if len(self._names) >= NAME_CACHE_LIMIT:
                self._names.clear()
            hit = self._names[name] = self._covered(name) and not name.endswith("_z")
        return hit

    def _baselines(self, device_id: str) -> dict[str, _Baseline]:
        devices = self._devices
        got = devices.get(device_id)
        if got is None:
            got = devices[device_id] = {}
            if len(devices) > self.params.max_devices:
                devices.popitem(last=False)
        else:
            devices.move_to_end(device_id)
        return got

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        if self._hst is not None:
            return self._apply_hst(self._hst, readings)
        p = self.params
        out: list[Reading] = []
        for r in readings:
            base: dict[str, _Baseline] | None = None
            added: dict[str, MetricValue] = {}
            score = -1.0
            for name, value in r.metrics.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if not self._watches(name):
                    continue
                x = float(value)
                if not math.isfinite(x):
                    continue
                if base is None:
                    base = self._baselines(r.device_id)
                b = base.get(name)
                if b is None:
                    if len(base) >= p.max_metrics:
                        continue
                    b = base[name] = _Baseline()
                z = self._update(b, x, r.ts)
                if z is not None:
                    added[f"{name}_z"] = round(z, 4)
                    score = max(score, abs(z))
            if score >= 0:
                r = self._scored(r, score, added)
            out.append(r)
        return out

    def _scored(self, r: Reading, score: float, added: dict[str, MetricValue]) -> Reading:
        flagged = score >= self.params.flag_at
        self.flagged += flagged
        added["anomaly_score"] = round(score, 4)
        added["anomaly"] = flagged
        return Reading(r.device_id, r.ts, {**r.metrics, **added}, r.origin, r.tags, r.priority)

    def _apply_hst(self, hst: HalfSpaceDetector, readings: list[Reading]) -> list[Reading]:
        out: list[Reading] = []
        for r in readings:
            values: dict[str, float] = {}
            for name, value in r.metrics.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if self._watches(name) and math.isfinite(value):
                    values[name] = float(value)
            if values:
                score = hst.score(r.device_id, values)
                if score is not None:
                    r = self._scored(r, score, {})
            out.append(r)
        return out

    def _update(self, b: _Baseline, x: float, ts: float) -> float | None:
        """Judge ``x`` against the baseline, then move the baseline toward it."""
        p = self.params
        z: float | None = None
        if b.n >= p.warmup:
            std = max(math.sqrt(b.var), p.min_std)
            z = (x - b.mean) / std
        if b.n == 0:
            b.mean, b.var, b.n, b.last_ts = x, 0.0, 1, ts
            return z
        # Weight of the new value from the time since the last one: a value
        # after one half-life counts half against the whole baseline. Readings
        # come at any rate, so the decay is per second, not per value; during
        # warm-up the weight is at least 1/n (a plain running mean).
        dt = max(ts - b.last_ts, 0.0)
        alpha = 1.0 - 0.5 ** (dt / p.half_life) if p.half_life > 0 else 1.0
        alpha = max(alpha, 1.0 / (b.n + 1)) if b.n < p.warmup else alpha
        diff = x - b.mean
        incr = alpha * diff
        b.mean += incr
        b.var = (1.0 - alpha) * (b.var + diff * incr)
        b.n += 1
        b.last_ts = max(b.last_ts, ts)
        return z
