"""Rule conditions: the pipeline's safe expression language, plus logic,
duration literals and window functions.

Examples::

    temperature > 80
    temperature > 80 and humidity < 30
    avg(temperature, 60s) > 80          # mean over the last minute
    count(door_open, 10m) >= 3          # samples in the last ten minutes
    delta(energy, 1h) > 50              # last minus first within the hour
    not (min_over(pressure, 30s) > 2)
    temperature > desired(setpoint) + 5 # the device twin's desired state

Names are the device's last values (this reading's metrics on top of what
it sent before); ``desired(key)`` and ``reported(key)`` read the device
twin's top-level keys (numbers and booleans). A condition that names a metric the device has not sent is
*unknown*: it neither sets nor clears a rule. Windows hold what arrived
during this run (they refill after a restart; rule *state* is durable).

Nothing is passed to ``eval``: :func:`edgeway.pipeline.expr.compile_expr`
builds closures from a checked syntax tree.
"""

from __future__ import annotations

import ast
import math
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from edgeway.pipeline.expr import (
    CallBuilder,
    Evaluator,
    ExprError,
    MissingMetric,
    compile_expr,
)
from edgeway.reading import MetricValue

if TYPE_CHECKING:
    from edgeway.rules.engine import RuleState

MAX_WINDOW = 86_400.0
"""Longest window (1 day): windows live in memory, one sample per reading."""
MAX_SAMPLES = 512
"""Samples kept per device and windowed metric. A device sending faster than
this per window has its window cover the latest MAX_SAMPLES samples: memory
per device stays bounded whatever it sends (512 samples, about 40 KB)."""

RESUM_EVERY = 10_000
"""Adds after which a window's running sum is recomputed from its samples."""

_DURATION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(ms|s|m|h|d)\b")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

WindowKey = tuple[str, float]


class Samples:
    """One device's values of one metric over one window length: (clock
    time, value), with a running sum, so ``avg``/``sum``/``count``/``delta``
    cost O(1) per evaluation (amortised) however many samples it holds."""

    __slots__ = ("adds", "items", "span", "total")

    def __init__(self, span: float) -> None:
        self.span = span
        self.items: deque[tuple[float, float]] = deque()
        self.total = 0.0
        self.adds = 0

    def add(self, t: float, value: float) -> None:
        items = self.items
        if len(items) >= MAX_SAMPLES:
            self.total -= items.popleft()[1]
        items.append((t, value))
        self.total += value
        self.adds += 1
        if self.adds >= RESUM_EVERY:
            # Float rounding of adding and subtracting accumulates: start afresh.
            self.adds = 0
            self.total = math.fsum(v for _, v in items)

    def evict(self, now: float) -> deque[tuple[float, float]]:
        """Drop samples older than the window; the rest."""
        items = self.items
        edge = now - self.span
        dropped = False
        while items and items[0][0] < edge:
            self.total -= items.popleft()[1]
            dropped = True
        if not items:
            self.total = 0.0
        elif dropped and not math.isfinite(self.total):
            # An infinite sample left (inf - inf is nan): the sum of what is left.
            self.total = (
                math.fsum(v for _, v in items) if _finite(items) else sum(v for _, v in items)
            )
        return items


class TwinValues:
    """A device's twin as the rules see it: each section's document and version."""

    __slots__ = ("desired", "desired_version", "reported", "reported_version")

    def __init__(self) -> None:
        self.desired: dict[str, object] = {}
        self.reported: dict[str, object] = {}
        self.desired_version = -1
        self.reported_version = -1

    def update(self, section: str, doc: dict[str, object], version: int) -> None:
        """Take ``doc`` unless an equal or newer version is already here (a
        change notified while the start-up load read an older copy)."""
        if section == "desired" and version > self.desired_version:
            self.desired, self.desired_version = doc, version
        elif section == "reported" and version > self.reported_version:
            self.reported, self.reported_version = doc, version


class Scope(dict[str, MetricValue]):
    """A device's last values, with its windows, its twin and the time of evaluation."""

    __slots__ = ("now", "rule_states", "twin", "windows")

    def __init__(self) -> None:
        super().__init__()
        self.windows: dict[WindowKey, Samples] = {}
        self.twin: TwinValues | None = None
        self.now = 0.0
        self.rule_states: dict[str, RuleState] = {}
        """Rule name -> this device's state of it (the engine's own
        ``RuleState`` objects, as in its ``states``), for the scan."""


def _finite(items: deque[tuple[float, float]]) -> bool:
    return all(math.isfinite(v) for _, v in items)


def _avg(w: Samples) -> float:
    return w.total / len(w.items)


def _delta(w: Samples) -> float:
    return w.items[-1][1] - w.items[0][1]


_WINDOW_FUNCS: dict[str, tuple[Callable[[Samples], float], bool]] = {
    # name: (function of the window, needs at least one value)
    "avg": (_avg, True),
    "sum": (lambda w: w.total, False),
    "count": (lambda w: float(len(w.items)), False),
    "delta": (_delta, True),
    "min_over": (lambda w: min(v for _, v in w.items), True),
    "max_over": (lambda w: max(v for _, v in w.items), True),
}


WINDOW_FUNCS = _WINDOW_FUNCS


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
    twin: bool = False
    """It reads the device twin (``desired(key)``, ``reported(key)``)."""
    tree: ast.expr | None = None
    """The checked syntax tree (durations in seconds), for
    :mod:`edgeway.rules.scan`."""


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
        key = (metric, seconds)
        windows.add(key)
        empty = Samples(seconds)

        def evaluate(m: Mapping[str, MetricValue]) -> float:
            scope = cast(Scope, m)
            w = scope.windows.get(key)
            if w is None:
                w = empty
            else:
                w.evict(scope.now)
            if needs_value and not w.items:
                raise MissingMetric(metric)
            return func(w)

        return evaluate

    return build


def _twin_call(section: str, used: list[bool]) -> CallBuilder:
    def build(args: list[ast.expr], names: set[str]) -> Evaluator:
        if len(args) != 1 or not isinstance(args[0], ast.Name):
            raise ExprError(f"{section}() takes a key of the twin: {section}(setpoint)")
        key = args[0].id
        used.append(True)

        def evaluate(m: Mapping[str, MetricValue]) -> float:
            twin = cast(Scope, m).twin
            doc = (
                None if twin is None else (twin.desired if section == "desired" else twin.reported)
            )
            v = None if doc is None else doc.get(key)
            if isinstance(v, int | float):  # bool is an int: True counts as 1.0
                return float(v)
            if v is None:
                raise MissingMetric(f"{section}({key})")
            raise TypeError(f"twin value {section}({key}) is not a number")

        return evaluate

    return build


def durations_to_seconds(text: str) -> str:
    """``60s`` -> ``60.0`` (a duration literal is not Python syntax)."""
    return _DURATION.sub(lambda m: repr(float(m.group(1)) * _UNITS[m.group(2)]), text)


def compile_condition(text: str) -> Condition:
    """Check and compile ``text``; raises :class:`ExprError` (a ValueError)."""
    windows: set[WindowKey] = set()
    twin: list[bool] = []
    calls = {name: _window_call(name, windows) for name in _WINDOW_FUNCS}
    calls["desired"] = _twin_call("desired", twin)
    calls["reported"] = _twin_call("reported", twin)
    source = durations_to_seconds(text)
    fn, names = compile_expr(source, calls=calls, logic=True)
    tree = ast.parse(source, mode="eval").body
    return Condition(text, fn, names, frozenset(windows), bool(twin), tree)
