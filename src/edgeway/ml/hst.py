"""Half-space trees (river's ``HalfSpaceTrees``) per device, for the ``anomaly`` step.

Example::

    - anomaly:
        detector: hst
        metrics: [vibration, bearing_temp]   # the features (one model per device)
        warmup: 100          # readings that set the features' limits
        threshold: 0.9       # score (0..1) at or above this flags an anomaly
        hst: {trees: 10, height: 6, window: 250, max_devices: 100}

Half-space trees (Tan, Ting and Liu, 2011) split the feature space at random
into nested boxes and count how much of a reference window falls into each
box: a reading that lands in boxes the recent past rarely visited scores
high. Unlike the z-score it looks at the features together (a vibration
normal at high load is not normal at low load) and needs no trained model.

How edgeway uses it:

- One model per device over the reading's watched metrics (at most
  ``hst.max_features``, fixed by the device's first reading: a reading
  without all of them is passed on unscored).
- Trees need each feature's range. ``hst.limits`` gives it
  (``{vibration: [0, 20]}``); a feature without one gets it from its first
  ``warmup`` values, widened by half the range seen on each side (a value
  beyond the range still lands in an outer box: it scores high, as it
  should). Then the model learns one ``window`` before it judges: the first
  score comes after ``warmup + window`` readings of a device.
- Every reading is scored, then learned (river's ``score_one`` then
  ``learn_one``); ``anomaly_score`` is the score (0..1, higher is stranger),
  ``anomaly`` whether it reached ``threshold``.

Cost and limits (measured, docs/models.md): with the defaults (10 trees of
height 4) a model takes about 75 KB, a reading (score and learn) 0.01-0.05 ms
and the model's build at its first sample about 1 ms on this project's 2-core
test machine, so it runs on the event loop; :data:`NODES_MAX` keeps every
allowed configuration's build and window sweep to a few milliseconds. Memory
grows as ``trees x 2^(height+1)`` nodes per device; the configuration is
refused when ``max_devices`` models could exceed :data:`MEMORY_MAX`, and the
least recently seen device's model is dropped first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from pydantic import Field, model_validator

from edgeway.extras import OptionalLibrary
from edgeway.pipeline.registry import StepParams

RIVER = OptionalLibrary("river", "river", "ml")

NODE_BYTES = 250
"""Python heap per tree node of river's HalfSpaceTrees (measured with
tracemalloc: 196-228 bytes; rounded up)."""
MODEL_OVERHEAD = 48 * 1024
"""Heap of one model besides its nodes (the model object, its trees' lists,
the limits; measured: 36 KB for 10 trees)."""
MEMORY_MAX = 256 * 1024 * 1024
"""Bound on all of one step's models (``max_devices`` full models): a gateway
runs on a small box beside the broker and the outbox."""
NODES_MAX = 1300
"""Nodes of one model at most (10 trees of height 6, or 20 of height 5). The
step runs on the event loop, and river builds a model's trees at its first
sample and sweeps every node at each window's end: 0.9 ms for 10 trees of
height 4, 2.9 ms for height 6 and 15.6 ms for 25 trees of height 7, measured
on the 2-core test machine under load. Past this, a call could hold the loop
for more than a few milliseconds."""
MARGIN = 2.0
"""A feature's learned range is widened by this share of itself on each side."""


class HstParams(StepParams):
    trees: int = Field(default=10, ge=1, le=25)
    height: int = Field(default=4, ge=1, le=7)
    """Depth of each tree; memory doubles with each level."""
    window: int = Field(default=250, ge=10, le=10_000)
    """Readings per reference window (per device)."""
    max_devices: int = Field(default=100, ge=1, le=100_000)
    max_features: int = Field(default=8, ge=1, le=32)
    limits: dict[str, tuple[float, float]] = Field(default_factory=dict)
    """Known feature ranges (metric -> [low, high]); others learned in the warm-up."""
    seed: int = 42

    @model_validator(mode="after")
    def _bounded(self) -> HstParams:
        for name, (lo, hi) in self.limits.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"limits.{name}: need finite low < high, got [{lo}, {hi}]")
        nodes = self.trees * ((1 << (self.height + 1)) - 1)
        if nodes > NODES_MAX:
            raise ValueError(
                f"{self.trees} trees of height {self.height} have {nodes} nodes (at most "
                f"{NODES_MAX}: building or sweeping more would hold the event loop for "
                "milliseconds): fewer trees or levels"
            )
        need = model_bytes(self.trees, self.height) * self.max_devices
        if need > MEMORY_MAX:
            raise ValueError(
                f"{self.max_devices} models of {self.trees} trees of height {self.height} "
                f"could take {need / 2**20:.0f} MiB (at most {MEMORY_MAX // 2**20} MiB): "
                "fewer devices, trees or levels"
            )
        return self


def model_bytes(trees: int, height: int) -> int:
    """Upper bound of one model's memory (see :data:`NODE_BYTES`)."""
    return trees * ((1 << (height + 1)) - 1) * NODE_BYTES + MODEL_OVERHEAD


class _Device:
    __slots__ = ("features", "hi", "learned", "lo", "model", "seen")

    def __init__(self, features: tuple[str, ...]) -> None:
        self.features = features
        self.lo = [math.inf] * len(features)
        self.hi = [-math.inf] * len(features)
        self.seen = 0
        self.learned = 0
        self.model: Any = None


class HalfSpaceDetector:
    """The per-device models of one ``anomaly`` step (``detector: hst``)."""

    def __init__(self, params: HstParams, warmup: int) -> None:
        try:
            from river.anomaly import HalfSpaceTrees
        except ImportError as e:
            raise ValueError(f"detector hst: {RIVER.missing()}") from e
        self._cls = HalfSpaceTrees
        self.params = params
        self.warmup = warmup
        self.devices: OrderedDict[str, _Device] = OrderedDict()
        self.unscored = 0
        """Readings passed on without a score (a feature missing)."""

    def score(self, device_id: str, values: dict[str, float]) -> float | None:
        """Score ``values`` (the reading's watched metrics) against the
        device's model, then learn them; None while the model warms up."""
        dev = self._device(device_id, values)
        try:
            x = [values[f] for f in dev.features]
        except KeyError:
            self.unscored += 1
            return None
        if dev.model is None and all(f in self.params.limits for f in dev.features):
            dev.model = self._build(dev)  # every range known: no warm-up
        if dev.model is None:
            dev.seen += 1
            for i, v in enumerate(x):
                dev.lo[i] = min(dev.lo[i], v)
                dev.hi[i] = max(dev.hi[i], v)
            if dev.seen >= self.warmup:
                dev.model = self._build(dev)
            return None
        sample = dict(zip(dev.features, x, strict=True))
        score: float | None = None
        if dev.learned >= self.params.window:
            score = float(dev.model.score_one(sample))
        else:
            dev.learned += 1
        dev.model.learn_one(sample)
        return score

    def _device(self, device_id: str, values: dict[str, float]) -> _Device:
        devices = self.devices
        dev = devices.get(device_id)
        if dev is None:
            features = tuple(sorted(values)[: self.params.max_features])
            dev = devices[device_id] = _Device(features)
            if len(devices) > self.params.max_devices:
                devices.popitem(last=False)
        else:
            devices.move_to_end(device_id)
        return dev

    def _build(self, dev: _Device) -> Any:
        p = self.params
        limits: dict[Hashable, tuple[float, float]] = {}
        for name, lo, hi in zip(dev.features, dev.lo, dev.hi, strict=True):
            known = p.limits.get(name)
            if known is not None:
                limits[name] = known
                continue
            pad = max((hi - lo) * MARGIN, abs(hi) * 0.05, 1e-6)
            limits[name] = (lo - pad, hi + pad)
        return self._cls(
            n_trees=p.trees, height=p.height, window_size=p.window, limits=limits, seed=p.seed
        )
