"""``validate``: required metrics, types and ranges; refuse with a reason.

Example::

    - validate:
        required: [temperature]
        types: {temperature: number, state: string}   # number, integer, bool, string
        ranges: {temperature: {min: -40, max: 125}}
        quarantine: quarantine                          # optional: a sink for refused readings

A reading failing any check is refused as a whole. The reason
(``missing:<metric>``, ``type:<metric>``, ``range:<metric>``,
``not_finite:<metric>``) is counted per route in ``edgeway stats`` and logged
(at most one line per reason every 10 s). With ``quarantine`` the refused
reading is stored for that sink, tagged ``rejected: <reason>`` and
``route: <route>``. When every reading of a device message is refused, the
device is told so (MQTT 5: PUBACK 0x99 "payload format invalid").
NaN and infinities fail a ``number`` check unless ``allow_non_finite: true``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Literal

from pydantic import Field, model_validator

from edgeway.pipeline.registry import Step, StepContext, StepParams, register_step
from edgeway.reading import Reading

log = logging.getLogger(__name__)

REJECT_LOG_INTERVAL = 10.0
"""Seconds between log lines per reason: a broken device sending every second
must not flood the log; the counters hold the exact numbers."""


class Range(StepParams):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class ValidateParams(StepParams):
    required: list[str] = Field(default_factory=list)
    types: dict[str, Literal["number", "integer", "bool", "string"]] = Field(default_factory=dict)
    ranges: dict[str, Range] = Field(default_factory=dict)
    allow_non_finite: bool = False
    quarantine: str | None = Field(default=None, min_length=1)
    """Sink name that receives refused readings (must be configured)."""


@register_step
class ValidateStep(Step):
    """Refuse readings that miss metrics, have wrong types or values out of range."""

    type_name = "validate"
    Params = ValidateParams

    def __init__(self, params: ValidateParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.required = params.required
        self.types = params.types
        self.ranges = [(m, r.min, r.max) for m, r in params.ranges.items()]
        self.finite = not params.allow_non_finite
        self.quarantine = params.quarantine
        self._last_log: dict[str, float] = {}

    def _reason(self, r: Reading) -> str | None:
        m = r.metrics
        for name in self.required:
            if name not in m:
                return f"missing:{name}"
        for name, kind in self.types.items():
            v = m.get(name)
            if v is None:
                continue
            if kind == "string":
                ok = isinstance(v, str)
            elif kind == "bool":
                ok = isinstance(v, bool)
            elif kind == "integer":
                ok = isinstance(v, int) and not isinstance(v, bool)
            else:
                ok = isinstance(v, int | float) and not isinstance(v, bool)
                if ok and self.finite and not math.isfinite(float(v)):
                    return f"not_finite:{name}"
            if not ok:
                return f"type:{name}"
        for name, lo, hi in self.ranges:
            v = m.get(name)
            if v is None or isinstance(v, str):
                continue
            if v != v:  # NaN is never in range
                return f"range:{name}"
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                return f"range:{name}"
        return None

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        out: list[Reading] = []
        for r in readings:
            reason = self._reason(r)
            if reason is None:
                out.append(r)
                continue
            self.ctx.reject(reason)
            self.ctx.invalid += 1
            if self.quarantine is not None:
                tags = {**r.tags, "rejected": reason, "route": self.ctx.route}
                self.ctx.quarantine.append(replace(r, tags=tags))
            t = time.monotonic()
            if t - self._last_log.get(reason, -REJECT_LOG_INTERVAL) >= REJECT_LOG_INTERVAL:
                self._last_log[reason] = t
                log.warning(
                    "route %s refused a reading of %s: %s",
                    self.ctx.route,
                    r.device_id,
                    reason,
                    extra={
                        "fields": {"route": self.ctx.route, "device": r.device_id, "reason": reason}
                    },
                )
        return out
