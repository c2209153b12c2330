"""``transform``: scale and offset, unit conversion, arithmetic between metrics.

Example::

    - transform:
        pressure: {scale: 0.01}                       # Pa -> hPa: value * 0.01
        temperature: {from_unit: degF, to_unit: degC}  # via pint
        level: {scale: 0.5, offset: -10, round: 2}
        dew_point: {expr: "temperature - (100 - humidity) / 5", round: 1}

Each key is a metric; the operations run in the order written, each on the
result of the ones before, so ``dew_point`` above sees the temperature in
degC. For one key: ``value * scale + offset``, then the unit conversion, then
``round`` (decimals). ``expr`` computes the metric from others of the same
reading instead (see :mod:`edgeway.pipeline.expr`: numbers, metric names,
``+ - * / ** %``, comparisons, ``abs min max round sqrt``; never ``eval``).
A conversion sets the tag ``unit:<metric>`` to ``to_unit``. A metric that is
missing or not a number is left alone; an expression that fails for one
reading (missing operand, division by zero) leaves that metric unset and is
counted as an error.

Unit conversions are resolved with pint when the configuration loads: affine
conversions (all but logarithmic units) become one multiply-add per value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from pydantic import RootModel, model_validator

from edgeway.pipeline.expr import Evaluator, MissingMetric, compile_expr
from edgeway.pipeline.registry import Step, StepContext, StepParams, register_step
from edgeway.reading import MetricValue, Reading


@functools.cache
def unit_registry() -> Any:
    """pint's registry, built once (it takes a few hundred ms) and never changed."""
    import pint

    return pint.UnitRegistry()


def unit_converter(src: str, dst: str) -> Callable[[float], float]:
    """A function converting a value from unit ``src`` to ``dst``; raises ValueError."""
    import pint

    ureg = unit_registry()
    try:
        q_src = ureg.Quantity(1.0, src)
        q_src.to(dst)
    except (pint.errors.PintError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"cannot convert {src!r} to {dst!r}: {e}") from None

    def slow(v: float) -> float:
        return float(ureg.Quantity(v, src).to(dst).magnitude)

    b = slow(0.0)
    a = slow(1.0) - b
    for probe in (2.0, -7.5, 1234.5):
        if not math.isclose(slow(probe), a * probe + b, rel_tol=1e-9, abs_tol=1e-12):
            return slow  # not affine (e.g. decibels): ask pint every time
    return lambda v: v * a + b


class TransformOp(StepParams):
    scale: float | None = None
    offset: float | None = None
    from_unit: str | None = None
    to_unit: str | None = None
    expr: str | None = None
    round: int | None = None

    @model_validator(mode="after")
    def _check(self) -> TransformOp:
        if (self.from_unit is None) != (self.to_unit is None):
            raise ValueError("from_unit and to_unit go together")
        if self.from_unit is not None and self.to_unit is not None:
            unit_converter(self.from_unit, self.to_unit)
        if self.expr is not None:
            if self.scale is not None or self.offset is not None or self.from_unit is not None:
                raise ValueError("expr computes the metric: scale, offset and units do not apply")
            compile_expr(self.expr)
        if (
            self.expr is None
            and self.scale is None
            and self.offset is None
            and self.from_unit is None
            and self.round is None
        ):
            raise ValueError("give scale, offset, from_unit/to_unit, expr or round")
        return self


class TransformParams(RootModel[dict[str, TransformOp]]):
    pass


class _Op:
    __slots__ = ("convert", "evaluator", "metric", "ndigits", "offset", "scale", "unit")

    def __init__(self, metric: str, op: TransformOp) -> None:
        self.metric = metric
        self.scale = op.scale if op.scale is not None else 1.0
        self.offset = op.offset if op.offset is not None else 0.0
        self.convert = (
            unit_converter(op.from_unit, op.to_unit)
            if op.from_unit is not None and op.to_unit is not None
            else None
        )
        self.unit = op.to_unit
        self.evaluator: Evaluator | None = compile_expr(op.expr)[0] if op.expr else None
        self.ndigits = op.round


@register_step
class TransformStep(Step):
    """Scale/offset, unit conversion and computed metrics."""

    type_name = "transform"
    Params = TransformParams

    def __init__(self, params: TransformParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.ops = [_Op(m, op) for m, op in params.root.items()]
        self.unit_tags = {f"unit:{o.metric}": o.unit for o in self.ops if o.unit}

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        out: list[Reading] = []
        for r in readings:
            metrics: dict[str, MetricValue] = dict(r.metrics)
            for op in self.ops:
                v: Any
                if op.evaluator is not None:
                    try:
                        v = op.evaluator(metrics)
                    except (MissingMetric, ArithmeticError, TypeError, ValueError):
                        self.ctx.errors += 1
                        continue
                else:
                    v = metrics.get(op.metric)
                    if v is None or isinstance(v, bool | str):
                        continue
                    if op.scale != 1.0 or op.offset != 0.0:
                        v = v * op.scale + op.offset
                    if op.convert is not None:
                        v = op.convert(v)
                if op.ndigits is not None and not isinstance(v, bool):
                    v = round(v, op.ndigits)
                metrics[op.metric] = v
            tags = {**r.tags, **self.unit_tags} if self.unit_tags else r.tags
            out.append(Reading(r.device_id, r.ts, metrics, r.origin, tags, r.priority))
        return out
