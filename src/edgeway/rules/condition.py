"""Rule conditions: the pipeline's safe expression language, plus logic,
duration literals and window functions.

Examples::

    temperature > 80
    temperature > 80 and humidity < 30
    avg(temperature, 60s) > 80          # mean over the last minute
    count(door_open, 10m) >= 3          # samples in the last ten minutes
    delta(energy, 1h) > 50              # last minus first within the hour
    not (min_over(pressure, 30s) > 2)

Names are the device's last values (this reading's metrics on top of what
it sent before). A condition that names a metric the device has not sent is
*unknown*: it neither sets nor clears a rule. Windows hold what arrived
during this run (they refill after a restart; rule *state* is durable).

Nothing is passed to ``eval``: :func:`edgeway.pipeline.expr.compile_expr`
builds closures from a checked syntax tree.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

from edgeway.pipeline.expr import (
    CallBuilder,
    Evaluator,
    ExprError,
    MissingMetric,
    compile_expr,
)
from edgeway.reading import MetricValue

MAX_WINDOW = 86_400.0
"""Longest window (1 day): windows live in memory, one sample per reading."""
MAX_SAMPLES = 512
"""Samples kept per device and windowed metric. A device sending faster than
this per window has its window cover the latest MAX_SAMPLES samples: memory
per device stays bounded whatever it sends (512 x 2 floats, about 20 KB)."""

_DURATION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(ms|s|m|h|d)\b")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

WindowKey = tuple[str, float]


class Samples:
    """One device's recent values of one metric: (clock time, value)."""

    __slots__ = ("items", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        """The longest window any rule reads of this metric."""
        self.items: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)

    def add(self, t: float, value: float) -> None:
        items = self.items
        items.append((t, value))
        edge = t - self.span
        while items[0][0] < edge:
            items.popleft()

    def within(self, now: float, seconds: float) -> list[float]:
        edge = now - seconds
        return [v for t, v in self.items if t >= edge]


class Scope(dict[str, MetricValue]):
    """A device's last values, with its windows and the time of evaluation."""

    __slots__ = ("now", "windows")

    def __init__(self) -> None:
        super().__init__()
        self.windows: dict[str, Samples] = {}
        self.now = 0.0


def _avg(vs: list[float]) -> float:
    return sum(vs) / len(vs)


_WINDOW_FUNCS: dict[str, tuple[Callable[[list[float]], float], bool]] = {
    # name: (function over the window's values, needs at least one value)
    "avg": (_avg, True),
    "sum": (lambda vs: float(sum(vs)), False),
    "count": (lambda vs: float(len(vs)), False),
    "delta": (lambda vs: vs[-1] - vs[0], True),
    "min_over": (min, True),
    "max_over": (max, True),
}


@dataclass(slots=True, frozen=True)
class Condition:
    """A compiled condition."""

    text: str
    evaluate: Evaluator
    """Called with a :class:`Scope`; raises MissingMetric when unknown."""
    names: frozenset[str]
    """Metrics it reads (last values and windows)."""
    windows: frozenset[WindowKey]
    """(metric, seconds) of every window function it uses."""


def _window_call(name: str, windows: set[WindowKey]) -> CallBuilder:
    func, needs_value = _WINDOW_FUNCS[name]

    def build(args: list[ast.expr], names: set[str]) -> Evaluator:
        if len(args) != 2 or not isinstance(args[0], ast.Name):
            raise ExprError(
                f"{name}() takes a metric name and a duration: {name}(temperature, 60s)"
            )
        span = args[1]
        if (
            not isinstance(span, ast.Constant)
            or isinstance(span.value, bool)
            or not isinstance(span.value, int | float)
        ):
            raise ExprError(f"{name}(): the window must be a duration such as 60s or 5m")
        seconds = float(span.value)
        if not 0 < seconds <= MAX_WINDOW:
            raise ExprError(f"{name}(): the window must be above 0 and at most 1d")
        metric = args[0].id
        names.add(metric)
        windows.add((metric, seconds))

        def evaluate(m: Mapping[str, MetricValue]) -> float:
            scope = cast(Scope, m)
            samples = scope.windows.get(metric)
            vs = samples.within(scope.now, seconds) if samples is not None else []
            if needs_value and not vs:
                raise MissingMetric(metric)
            return func(vs)

        return evaluate

    return build


def durations_to_seconds(text: str) -> str:
    """``60s`` -> ``60.0`` (a duration literal is not Python syntax)."""
    return _DURATION.sub(lambda m: repr(float(m.group(1)) * _UNITS[m.group(2)]), text)


def compile_condition(text: str) -> Condition:
    """Check and compile ``text``; raises :class:`ExprError` (a ValueError)."""
    windows: set[WindowKey] = set()
    calls = {name: _window_call(name, windows) for name in _WINDOW_FUNCS}
    fn, names = compile_expr(durations_to_seconds(text), calls=calls, logic=True)
    return Condition(text, fn, names, frozenset(windows))
