"""``model``: feed readings to an ONNX model and emit its outputs as metrics.

Example::

    - window: {size: 60s, aggregates: [mean, max]}
    - model:
        name: pump-health                  # a model in the registry (edgeway models ...)
        features: [vibration_mean, vibration_max, current_mean, bearing_temp_mean]
        outputs:
          failure_probability: {output: probabilities, column: 1}

For each reading that carries every feature as a number, one row of features
(in the order given, as float32) goes to the model; readings go on unchanged
at once. The model runs on the inference thread (see
:mod:`edgeway.ml.manager`), and its outputs come back as a reading of their
own for the same device and time, with the configured metric names and the tag
``model`` = ``name@version``: the steps after this one (rules, an ``anomaly``
step) and the sinks see them like any reading. A 2-D output picks its
``column``; without ``column`` a one-value output is used as is.

When the inference queue is full or no version of the model is active, rows
are not scored and are counted (``models.dropped``, the step's ``unscored``);
telemetry is never held back for a model. Model outputs are derived data and
are not journaled: rows queued at a crash are not scored after the restart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from edgeway.pipeline.registry import HoldingStep, StepContext, StepParams, register_step
from edgeway.reading import MetricValue, Origin, Reading

if TYPE_CHECKING:
    from edgeway.ml.manager import ModelManager, Outputs

MAX_READY = 100_000
"""Scored readings waiting for the next tick, at most (then the oldest go)."""


class OutputSpec(StepParams):
    output: str
    column: int | None = Field(default=None, ge=0)


class ModelParams(StepParams):
    name: str = Field(min_length=1, max_length=64)
    features: list[str] = Field(min_length=1, max_length=1024)
    outputs: dict[str, OutputSpec] = Field(min_length=1)


@dataclass(slots=True)
class _Pending:
    device_id: str
    ts: float
    tags: Mapping[str, str]


@register_step
class ModelStep(HoldingStep):
    """Scores readings with a registered ONNX model, off the event loop."""

    type_name = "model"
    Params = ModelParams

    def __init__(self, params: ModelParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.params: ModelParams = params
        self._ready: list[Reading] = []
        self.unscored = 0
        self.scored = 0
        self._origin = Origin("model", f"{ctx.route}/{params.name}")

    def _manager(self) -> ModelManager | None:
        got = self.ctx.services.get("models")
        return got

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        features = self.params.features
        rows: list[list[float]] = []
        meta: list[_Pending] = []
        for r in readings:
            m = r.metrics
            row: list[float] = []
            for f in features:
                v = m.get(f)
                if v is None or isinstance(v, bool | str):
                    break
                row.append(float(v))
            else:
                rows.append(row)
                meta.append(_Pending(r.device_id, r.ts, r.tags))
        if rows:
            self._submit(rows, meta)
        return readings

    def _submit(self, rows: list[list[float]], meta: list[_Pending]) -> None:
        from edgeway.ml.manager import Job

        mgr = self._manager()
        if mgr is None or not mgr.knows(self.params.name):
            self.unscored += len(rows)
            return

        def deliver(results: list[tuple[str, Outputs | None]]) -> None:
            self._deliver(meta, results)

        job = Job(self.params.name, [p.device_id for p in meta], rows, deliver)
        if not mgr.submit(job):
            self.unscored += len(rows)

    def _deliver(self, meta: list[_Pending], results: list[tuple[str, Outputs | None]]) -> None:
        name = self.params.name
        specs = self.params.outputs
        for p, (version, out) in zip(meta, results, strict=True):
            if out is None:
                self.unscored += 1
                continue
            metrics: dict[str, MetricValue] = {}
            for metric, spec in specs.items():
                value = _pick(out, spec)
                if value is not None:
                    metrics[metric] = value
            if not metrics:
                self.unscored += 1
                continue
            self.scored += 1
            tags = {**p.tags, "model": f"{name}@{version}"}
            self._ready.append(Reading(p.device_id, p.ts, metrics, self._origin, tags))
        if len(self._ready) > MAX_READY:
            drop = len(self._ready) - MAX_READY
            del self._ready[:drop]
            self.unscored += drop
        if self._ready and self.ctx.wake is not None:
            self.ctx.wake()

    def tick(self, now: float) -> list[Reading]:
        out, self._ready = self._ready, []
        return out

    def restore(self, key: str, reading: Reading, journal_id: int) -> None:
        # Nothing is journaled (outputs are derived data, see the docstring).
        return

    def restore_mark(self, key: str, before: float) -> None:
        return


def _pick(out: Outputs, spec: OutputSpec) -> float | None:
    rows = out.get(spec.output)
    if not rows:
        return None
    row = rows[0]
    if spec.column is None:
        if len(row) != 1:
            return None
        value = row[0]
    else:
        if spec.column >= len(row):
            return None
        value = row[spec.column]
    return value if math.isfinite(value) else None
