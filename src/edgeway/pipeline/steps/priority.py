"""``priority``: mark alarms and events so the outbox sends them first.

Example::

    - priority: {level: 1}                          # every reading of this route
    - priority: {level: 2, when: "temperature > 90"} # only where the expression holds

A reading with a priority above 0 goes ahead of telemetry in every sink's
queue, also while a long backlog drains (docs/outbox.md, "Drain order").
Every level above 0 goes ahead alike, in arrival order; the level travels
with the record (``"priority"`` in a sink's JSON) so the cloud can tell alarm
classes apart. ``when`` is an expression
over the reading's own metrics (see :mod:`edgeway.pipeline.expr`); a reading
that lacks a metric it names, or for which it fails, keeps its priority and the
failure is counted as a step error. A step never lowers a priority an earlier
step set.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from edgeway.pipeline.expr import Evaluator, MissingMetric, compile_expr
from edgeway.pipeline.registry import Step, StepContext, StepParams, register_step
from edgeway.reading import Reading


class PriorityParams(StepParams):
    level: int = Field(default=1, ge=1, le=9)
    """The priority given. Nine levels are plenty to name alarm classes; a
    small bound keeps the value meaningful to receivers."""
    when: str | None = None
    """An expression over the reading's metrics; absent: every reading."""

    @field_validator("when")
    @classmethod
    def _check_when(cls, v: str | None) -> str | None:
        if v is not None:
            compile_expr(v)  # ExprError is a ValueError: reported with the key
        return v


@register_step
class PriorityStep(Step):
    """Raise the priority of the route's readings (all, or those matching ``when``)."""

    type_name = "priority"
    Params = PriorityParams

    def __init__(self, params: PriorityParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.level = params.level
        self.when: Evaluator | None = compile_expr(params.when)[0] if params.when else None

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        out: list[Reading] = []
        for r in readings:
            if r.priority >= self.level:
                out.append(r)
                continue
            if self.when is not None:
                try:
                    hit = bool(self.when(r.metrics))
                except (MissingMetric, ArithmeticError, TypeError, ValueError):
                    self.ctx.errors += 1
                    hit = False
                if not hit:
                    out.append(r)
                    continue
            out.append(Reading(r.device_id, r.ts, r.metrics, r.origin, r.tags, self.level))
        return out
