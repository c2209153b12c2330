"""``deadband``: send a metric only when it moved by at least its band.

Example::

    - deadband:
        percent: 0.5           # band: 0.5 % of the last value sent
        metrics: ["*"]         # globs of metrics it covers (default: all)
        per_metric:
          humidity: {absolute: 2.0}
        max_silence: 5m        # send the current value anyway after 5 min without sending

Per device and metric the step remembers the last value it let through. A
numeric value passes when ``|value - last| >= band``, where the band is
``absolute``, or ``percent`` of ``|last|``, or (both given) the larger of the
two; so a change smaller than the band never passes, and the cloud's last
value is always within the band of the true one. A percent band around 0 is
0: any change passes. Strings and booleans pass when they differ. NaN passes
when the last value was not NaN. The first value of a device always passes.

``max_silence`` is measured in reading time: the first reading at least that
long after the last one sent passes whatever its value, so the cloud can tell
"unchanged" from "silent". It is not a timer: a device that stops sending
stops being heard, which is the point.

Only the covered metrics that passed are sent; the reading is dropped when
none passed. Metrics it does not cover (and ``window_start``/``window_end``,
always) ride along with the ones that pass. A reading without covered
metrics passes unchanged.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from edgeway.config_types import Duration
from edgeway.pipeline.registry import (
    NAME_CACHE_LIMIT,
    Step,
    StepContext,
    StepParams,
    register_step,
)
from edgeway.pipeline.routes import compile_globs
from edgeway.reading import MetricValue, Reading

CONTEXT_METRICS = frozenset({"window_start", "window_end"})
"""Metrics that describe an aggregate rather than measure something."""


class Band(StepParams):
    absolute: float | None = Field(default=None, ge=0)
    percent: float | None = Field(default=None, ge=0)


class DeadbandParams(StepParams):
    absolute: float | None = Field(default=None, ge=0)
    percent: float | None = Field(default=None, ge=0)
    metrics: list[str] = Field(default_factory=lambda: ["*"])
    per_metric: dict[str, Band] = Field(default_factory=dict)
    max_silence: Duration | None = None

    @model_validator(mode="after")
    def _check(self) -> DeadbandParams:
        if self.absolute is None and self.percent is None and not self.per_metric:
            raise ValueError("give absolute, percent or per_metric")
        for name, band in self.per_metric.items():
            if band.absolute is None and band.percent is None:
                raise ValueError(f"per_metric.{name}: give absolute or percent")
        return self


class _Memory:
    __slots__ = ("ts", "value")

    def __init__(self, value: MetricValue, ts: float) -> None:
        self.value = value
        self.ts = ts


@register_step
class DeadbandStep(Step):
    """Per device and metric: pass a value only when it moved by its band."""

    type_name = "deadband"
    Params = DeadbandParams
    exact = False
    """True for ``on_change``: numbers pass when they differ at all."""

    def __init__(self, params: DeadbandParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.covers = compile_globs(params.metrics)
        self.max_silence = params.max_silence
        default = (params.absolute or 0.0, (params.percent or 0.0) / 100.0)
        self.default_band = default
        self.bands = {
            m: (b.absolute or 0.0, (b.percent or 0.0) / 100.0) for m, b in params.per_metric.items()
        }
        self.memory: dict[str, dict[str, _Memory]] = {}
        self._covered: dict[str, bool] = {}

    def _is_covered(self, name: str) -> bool:
        c = self._covered.get(name)
        if c is None:
            c = name not in CONTEXT_METRICS and (name in self.bands or self.covers(name))
            if len(self._covered) >= NAME_CACHE_LIMIT:
                self._covered.clear()
            self._covered[name] = c
        return c

    def _changed(self, name: str, v: MetricValue, last: MetricValue) -> bool:
        if isinstance(v, str | bool) or isinstance(last, str | bool) or self.exact:
            return bool(v != last) and not (v != v and last != last)
        if v != v or last != last:  # NaN: a change unless both are NaN
            return not (v != v and last != last)
        absolute, fraction = self.bands.get(name, self.default_band)
        band = max(absolute, fraction * abs(last))
        if band == 0.0:
            return v != last
        return abs(v - last) >= band

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        out: list[Reading] = []
        silence = self.max_silence
        for r in readings:
            mem = self.memory.get(r.device_id)
            if mem is None:
                mem = self.memory[r.device_id] = {}
            ts = r.ts
            passed: dict[str, MetricValue] | None = None
            any_covered = False
            dropped = False
            for name, v in r.metrics.items():
                if not self._is_covered(name):
                    continue
                any_covered = True
                m = mem.get(name)
                if (
                    m is None
                    or (silence is not None and ts - m.ts >= silence)
                    or self._changed(name, v, m.value)
                ):
                    if m is None:
                        mem[name] = _Memory(v, ts)
                    else:
                        m.value = v
                        m.ts = ts
                    if passed is None:
                        passed = {}
                    passed[name] = v
                else:
                    dropped = True
            if not any_covered:
                out.append(r)
            elif passed is not None:
                if not dropped:
                    out.append(r)
                else:
                    metrics = {
                        k: v for k, v in r.metrics.items() if k in passed or not self._is_covered(k)
                    }
                    out.append(Reading(r.device_id, r.ts, metrics, r.origin, r.tags, r.priority))
        return out

    def forget(self, device_id: str) -> None:
        self.memory.pop(device_id, None)
