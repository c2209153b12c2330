"""Safe arithmetic on a reading's metrics, for the ``transform`` step.

Example (in a route)::

    - transform:
        dew_point: {expr: "temperature - (100 - humidity) / 5"}
        power_kw: {expr: "round(voltage * current / 1000, 3)"}

The text is parsed with :mod:`ast` and only these nodes are accepted: numbers,
names (metric names of the reading), ``+ - * / ** %``, unary ``-``/``+``,
comparisons (``< <= > >= == !=``, chained), and calls of ``abs``, ``min``,
``max``, ``round`` and ``sqrt``. Everything else (attributes, subscripts,
strings, lambdas, comprehensions, other calls) is refused when the
configuration loads. The tree is then turned into nested closures; nothing is
ever passed to ``eval`` or ``compile``.

All arithmetic is done in floats: ``10 ** 10 ** 10`` overflows at once
instead of building a huge integer, and a division by zero is an error for
that reading only (the metric is not set, the error is counted).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from edgeway.reading import MetricValue

MAX_EXPR_LENGTH = 500
"""Characters per expression: a formula between a few metrics is short; this
bounds the parse time and the closure depth of a hostile configuration."""

MAX_NODES = 100
"""AST nodes per expression, for the same reason."""

Evaluator = Callable[[Mapping[str, MetricValue]], float | bool]

CallBuilder = Callable[[list[ast.expr], set[str]], Evaluator]
"""Builds a caller-defined function from its (unevaluated) arguments; the rules
use it for window functions, whose first argument names a metric's history
rather than its value (``avg(temperature, 60)``). It adds the names it reads
and raises :class:`ExprError` for arguments it does not accept."""


class ExprError(ValueError):
    """The expression is not allowed or does not parse."""


class MissingMetric(KeyError):
    """The reading lacks a metric the expression names."""


_BINOPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


def _round(x: float, nd: float = 0) -> float:
    return float(round(x, int(nd)))


_FUNCS: dict[str, tuple[Callable[..., float], int, int]] = {
    # name: (function, min args, max args)
    "abs": (abs, 1, 1),
    "min": (min, 2, 16),
    "max": (max, 2, 16),
    "round": (_round, 1, 2),
    "sqrt": (math.sqrt, 1, 1),
}


def _num(v: Any) -> float:
    # bool is an int: True counts as 1.0, which is what a formula over a
    # switch state expects. Strings cannot take part in arithmetic.
    if isinstance(v, int | float):
        return float(v)
    raise TypeError(f"metric value {v!r} is not a number")


def compile_expr(
    text: str, *, calls: Mapping[str, CallBuilder] | None = None, logic: bool = False
) -> tuple[Evaluator, frozenset[str]]:
    """Check ``text`` and return (evaluator, names it reads).

    ``calls`` adds functions of the caller's own (see :data:`CallBuilder`);
    ``logic`` also allows ``and``, ``or`` and ``not`` (rule conditions; a
    transform computes numbers and does not need them).
    Raises :class:`ExprError` naming the construct that is not allowed.
    """
    if len(text) > MAX_EXPR_LENGTH:
        raise ExprError(f"expression longer than {MAX_EXPR_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ExprError(f"cannot parse {text!r}: {e.msg}") from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_NODES:
        raise ExprError(f"expression has {nodes} parts, at most {MAX_NODES} allowed")
    names: set[str] = set()
    fn = _Builder(calls or {}, logic).build(tree.body, names)
    return fn, frozenset(names)


class _Builder:
    """Turns an AST into closures, with the caller's extra functions and logic."""

    __slots__ = ("calls", "logic")

    def __init__(self, calls: Mapping[str, CallBuilder], logic: bool) -> None:
        self.calls = calls
        self.logic = logic

    def build(self, node: ast.expr, names: set[str]) -> Evaluator:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            extra = self.calls.get(node.func.id)
            if extra is not None:
                if node.keywords:
                    raise ExprError("keyword arguments are not allowed")
                return extra(node.args, names)
            if self.calls and node.func.id not in _FUNCS:
                allowed = ", ".join(sorted([*_FUNCS, *self.calls]))
                raise ExprError(f"only the functions {allowed} may be called")
        if self.logic and isinstance(node, ast.BoolOp):
            parts = [self.build(v, names) for v in node.values]
            if len(parts) == 2:  # the usual case, without a generator
                p0, p1 = parts
                if isinstance(node.op, ast.And):
                    return lambda m: bool(p0(m)) and bool(p1(m))
                return lambda m: bool(p0(m)) or bool(p1(m))
            if isinstance(node.op, ast.And):
                return lambda m: all(bool(p(m)) for p in parts)
            return lambda m: any(bool(p(m)) for p in parts)
        if self.logic and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.build(node.operand, names)
            return lambda m: not inner(m)
        return _build(node, names, self.build)


def _build(
    node: ast.expr,
    names: set[str],
    sub: Callable[[ast.expr, set[str]], Evaluator] | None = None,
) -> Evaluator:
    """One node; ``sub`` builds the children (the :class:`_Builder` in use)."""
    if sub is None:
        sub = _build
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ExprError(f"only numbers are allowed as constants, got {node.value!r}")
        const = float(node.value)
        return lambda m: const
    if isinstance(node, ast.Name):
        name = node.id
        names.add(name)

        def get(m: Mapping[str, MetricValue]) -> float:
            try:
                return _num(m[name])
            except KeyError:
                raise MissingMetric(name) from None

        return get
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise ExprError(f"operator {type(node.op).__name__} is not allowed")
        left, right = sub(node.left, names), sub(node.right, names)
        return lambda m: op(left(m), right(m))
    if isinstance(node, ast.UnaryOp):
        operand = sub(node.operand, names)
        if isinstance(node.op, ast.USub):
            return lambda m: -operand(m)
        if isinstance(node.op, ast.UAdd):
            return lambda m: +operand(m)
        raise ExprError(f"unary {type(node.op).__name__} is not allowed")
    if isinstance(node, ast.Compare):
        first = sub(node.left, names)
        ops: list[Callable[[float, float], bool]] = []
        for o in node.ops:
            f = _CMPOPS.get(type(o))
            if f is None:
                raise ExprError(f"comparison {type(o).__name__} is not allowed")
            ops.append(f)
        rest = [sub(c, names) for c in node.comparators]
        if len(ops) == 1:
            # One comparison (a rule's usual ``temperature > 80``): no loop.
            f0, b0 = ops[0], rest[0]
            rnode = node.comparators[0]
            if isinstance(rnode, ast.Constant) and isinstance(rnode.value, int | float):
                c0 = float(rnode.value)
                return lambda m: f0(first(m), c0)
            return lambda m: f0(first(m), b0(m))

        def compare(m: Mapping[str, MetricValue]) -> bool:
            a = first(m)
            for f, b_fn in zip(ops, rest, strict=True):
                b = b_fn(m)
                if not f(a, b):
                    return False
                a = b
            return True

        return compare
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS:
            allowed = ", ".join(sorted(_FUNCS))
            raise ExprError(f"only the functions {allowed} may be called")
        if node.keywords:
            raise ExprError("keyword arguments are not allowed")
        func, lo, hi = _FUNCS[node.func.id]
        if not lo <= len(node.args) <= hi:
            raise ExprError(f"{node.func.id}() takes {lo} to {hi} arguments")
        args = [sub(a, names) for a in node.args]
        if len(args) == 1:
            (a0,) = args
            return lambda m: func(a0(m))
        return lambda m: func(*[a(m) for a in args])
    raise ExprError(f"{type(node).__name__} is not allowed in an expression")
