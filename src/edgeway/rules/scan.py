"""One generated function that tells which of a device's rules need work.

At 1,000 readings/s with 100 rules per device, evaluating every rule's
condition through its closures (:mod:`edgeway.pipeline.expr`) cost about
half a core (1.2-2 us per rule: five to eight Python calls each), and a
busy event loop is what a rule's command waits behind. Yet for nearly every
(rule, reading) the answer is "nothing changes": the rule is idle for the
device and its ``when`` does not hold.

A :class:`Scanner` answers that for all the rules a device matches in one
function call: every metric value and window function the rules read is
computed once (25 rules over ``avg(t, 10s)`` read the average once), each
usual condition (comparisons of a metric or a window function with a
number, joined by ``and`` / ``or``) is tested inline, and only the rules
that are not idle, whose ``when`` holds, or whose shape or values it does
not decide are handed to the engine's state machine, which evaluates them
in full as before. So the outcome is the engine's, and the scan only skips
work that would have changed nothing.

The function is Python source generated from the *checked* syntax tree of
each condition (:func:`edgeway.rules.condition.compile_condition`). The
source holds only names this module makes up (``x0``, ``K3``) and fixed
operators from the table below: metric names, rule names and numbers from
the configuration are never written into it; they reach the function as
values in its namespace. Nothing of a configuration is passed to ``eval``.

Building one costs 0.1-0.2 ms per rule (``compile``), so it is done a
slice at a time (:data:`BUILD_SLICE`): the first readings of a new rule
set take the full path while its scanner is built, one slice per batch
of readings the engine observes.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edgeway.rules.condition import WINDOW_FUNCS, Samples, Scope

if TYPE_CHECKING:
    from edgeway.rules.engine import CompiledRule

ScanFn = Callable[[Scope, list[Any]], list[int]]
"""One slice's scan: (the device's scope, the terms computed so far in this
call) -> indices of the rules that need the state machine."""

BUILD_SLICE = 16
"""Rules per generated function: compiling one costs 1-3 ms, and the engine
builds at most one per call (a batch of readings), so building never holds
the event loop longer than that."""

MAX_SCANNED_RULES = 20_000
"""Rule slots over all cached scanners (about 800 bytes each); past this,
new rule sets take the full path (counted in ``scan_refused``)."""

_CMP: dict[type[ast.cmpop], str] = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
}


class _Unknown:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


class _Undecided:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDECIDED"


UNKNOWN = _Unknown()
"""A value that is missing: a metric not sent yet, an empty window."""
UNDECIDED = _Undecided()
"""A value that is not a plain number (a bool, a string): the engine decides."""
_EMPTY = Samples(1.0)


def _number(node: ast.expr) -> float | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _number(node.operand)
        if inner is None:
            return None
        return -inner if isinstance(node.op, ast.USub) else inner
    if (
        isinstance(node, ast.Constant)
        and not isinstance(node.value, bool)
        and isinstance(node.value, int | float)
    ):
        return float(node.value)
    return None


class _Gen:
    """Source lines and the namespace of one slice being generated.

    ``shared``: the term table of the whole scanner (term -> its place in the
    list the slices fill in order at each call): a term an earlier slice
    computes is read from that list, not computed again, so a value or window
    is read once per reading however many slices use it."""

    def __init__(self, shared: dict[tuple[Any, ...], int] | None = None) -> None:
        self.ns: dict[str, Any] = {"UNKNOWN": UNKNOWN, "UNDECIDED": UNDECIDED, "EMPTY": _EMPTY}
        self.terms: dict[tuple[Any, ...], str] = {}
        self.shared: dict[tuple[Any, ...], int] = {} if shared is None else shared
        self.head: list[str] = []
        self.body: list[str] = []

    def _known(self, key: tuple[Any, ...]) -> str | None:
        """This slice's variable for ``key`` if it has one or an earlier slice
        computed it (then read from ``T``); None if it is new."""
        var = self.terms.get(key)
        if var is None and key in self.shared:
            var = self.terms[key] = f"x{len(self.terms)}"
            self.head.append(f"    {var} = T[{self.shared[key]}]")
        return var

    def _computed(self, key: tuple[Any, ...], var: str) -> None:
        """``var`` (just computed in the head) is the term ``key``: into ``T``."""
        self.shared[key] = len(self.shared)
        self.head.append(f"    append({var})")

    def const(self, value: object) -> str:
        name = f"K{len(self.ns)}"
        self.ns[name] = value
        return name

    def term(self, node: ast.expr) -> str | None:
        """The variable holding a metric's value or a window function of
        one (a float, UNKNOWN or UNDECIDED), computed once at the top."""
        if isinstance(node, ast.Name):
            key: tuple[Any, ...] = ("m", node.id)
            var = self._known(key)
            if var is None:
                var = self.terms[key] = f"x{len(self.terms)}"
                k = self.const(node.id)
                self.head += [
                    f"    {var} = get({k}, UNKNOWN)",
                    f"    c = {var}.__class__",
                    "    if c is float:",
                    "        pass",
                    "    elif c is int:",
                    f"        {var} = float({var})",
                    f"    elif {var} is not UNKNOWN:",
                    f"        {var} = UNDECIDED",
                ]
                self._computed(key, var)
            return var
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in WINDOW_FUNCS
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Name)
            and (span := _number(node.args[1])) is not None
        ):
            func_name, metric = node.func.id, node.args[0].id
            key = ("w", func_name, metric, span)
            var = self._known(key)
            if var is None:
                var = self.terms[key] = f"x{len(self.terms)}"
                func, needs_value = WINDOW_FUNCS[func_name]
                k, f = self.const((metric, span)), self.const(func)
                empty = "UNKNOWN" if needs_value else f"{f}(EMPTY)"
                self.head += [
                    f"    w = windows.get({k})",
                    "    if w is None or not w.evict(now):",
                    f"        {var} = {empty}",
                    "    else:",
                    f"        {var} = {f}(w)",
                ]
                self._computed(key, var)
            return var
        return None

    def comparison(self, node: ast.expr) -> str | None:
        """An expression giving True, False, UNKNOWN or UNDECIDED."""
        if not isinstance(node, ast.Compare) or len(node.ops) != 1:
            return None
        op = _CMP[type(node.ops[0])]
        left, right = node.left, node.comparators[0]
        if (c := _number(right)) is not None and (var := self.term(left)) is not None:
            return f"({var} {op} {self.const(c)} if {var}.__class__ is float else {var})"
        if (c := _number(left)) is not None and (var := self.term(right)) is not None:
            return f"({self.const(c)} {op} {var} if {var}.__class__ is float else {var})"
        return None

    def check(self, node: ast.expr) -> list[str] | None:
        """Lines that leave in ``h`` True, False, UNKNOWN or UNDECIDED, as
        far as ``evaluate`` would go (``and`` / ``or`` stop where it stops)."""
        one = self.comparison(node)
        if one is not None:
            return [f"h = {one}"]
        if not isinstance(node, ast.BoolOp):
            return None
        parts = [self.comparison(v) for v in node.values]
        if any(p is None for p in parts):
            return None
        go_on = "True" if isinstance(node.op, ast.And) else "False"
        lines: list[str] = []
        for depth, part in enumerate(parts):
            pad = "    " * depth
            if depth:
                lines.append(f"{'    ' * (depth - 1)}if h is {go_on}:")
            lines.append(f"{pad}h = {part}")
        return lines

    def rule(self, index: int, rule: CompiledRule) -> None:
        tree = rule.when.tree
        check = self.check(tree) if rule.schedule is None and tree is not None else None
        if check is None:
            self.body.append(f"    out({index})")  # the engine decides every time
            return
        name = self.const(rule.name)
        self.body += [
            f"    st = state({name})",
            "    if st is not None and (st.active or st.since is not None):",
            f"        out({index})",
            "    else:",
            *(f"        {line}" for line in check),
            "        if h is True or h is UNDECIDED:",
            f"            out({index})",
        ]

    def build(self) -> ScanFn:
        src = "\n".join(
            [
                "def scan(scope, T):",
                "    get, windows, now = scope.get, scope.windows, scope.now",
                "    state = scope.rule_states.get",
                "    append = T.append",
                "    found = []",
                "    out = found.append",
                *self.head,
                *self.body,
                "    return found",
            ]
        )
        code = compile(src, "<edgeway rules scan>", "exec")
        exec(code, self.ns)
        fn: ScanFn = self.ns["scan"]
        return fn


def build_scan(
    rules: Sequence[CompiledRule],
    offset: int = 0,
    shared: dict[tuple[Any, ...], int] | None = None,
) -> ScanFn:
    """A scanner over ``rules``; the indices it returns count from ``offset``;
    ``shared``: the term table of the slices before it (see :class:`_Gen`)."""
    gen = _Gen(shared)
    for i, rule in enumerate(rules):
        gen.rule(offset + i, rule)
    return gen.build()


class Scanner:
    """The scanners of one rule set, built a slice per loop turn."""

    __slots__ = ("parts", "ready", "rules", "terms")

    def __init__(self, rules: tuple[CompiledRule, ...]) -> None:
        self.rules = rules
        self.parts: list[ScanFn] = []
        self.ready = False
        self.terms: dict[tuple[Any, ...], int] = {}
        """The terms of all slices, in the order the slices compute them."""

    def build_next(self) -> bool:
        """Build the next slice; True when all are built."""
        start = len(self.parts) * BUILD_SLICE
        if start < len(self.rules):
            self.parts.append(
                build_scan(self.rules[start : start + BUILD_SLICE], start, self.terms)
            )
        self.ready = len(self.parts) * BUILD_SLICE >= len(self.rules)
        return self.ready

    def __call__(self, scope: Scope) -> list[int]:
        """The rules (indices into :attr:`rules`) that need the state machine
        for the device of ``scope``: not idle there, or whose ``when`` holds
        or is not decided by the scan."""
        parts = self.parts
        terms: list[Any] = []
        if len(parts) == 1:
            return parts[0](scope, terms)
        found: list[int] = []
        for part in parts:
            found += part(scope, terms)
        return found
