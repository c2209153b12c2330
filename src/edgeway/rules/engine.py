"""The rule engine: conditions, durations, hysteresis, cooldown, schedules.

No I/O: :meth:`RuleEngine.observe` takes a reading, :meth:`RuleEngine.due`
the timers, and both return a :class:`RuleOutput` (state rows to store and
transitions with their typed actions). :class:`edgeway.rules.stage.RuleStage`
stores the output in ``rules.db`` and then carries the actions out, so every
feature is a few lines of test with a fake clock.

Per rule and device the state is a small machine::

    idle --when holds--> pending --held `for`, cooldown over--> SET (active)
      ^                     |                                     |
      +---when fails--------+                                     |
      +---------- CLEAR <---held `clear_for`-- clearing <--clear holds

Times are on the rule clock (:class:`edgeway.outbox.ageclock.AgeClock`:
monotonic within a run, resumed from the store at start), so a wall-clock
correction neither fires nor stretches a ``for:``; schedules read the wall
clock. A condition that is *unknown* (a metric not seen yet) changes nothing;
at a timer, the last known result stands (a restart empties the windows, and
a duration in progress must still end on time).
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo

import orjson

from edgeway.pipeline.expr import MissingMetric
from edgeway.pipeline.routes import RouteMatcher, compile_globs
from edgeway.reading import MetricValue, Reading
from edgeway.rules.condition import (
    Condition,
    Samples,
    Scope,
    TwinValues,
    WindowKey,
    compile_condition,
)
from edgeway.rules.config import ActionConfig, RuleConfig, ScheduleWindow
from edgeway.rules.outputs import (
    Action,
    AlarmChange,
    CallWebhook,
    Publish,
    RecordEvent,
    SendCommand,
    SetTwinDesired,
)
from edgeway.rules.scan import MAX_SCANNED_RULES, Scanner

log = logging.getLogger(__name__)

MAX_DEVICES = 100_000
"""Devices the engine keeps last values and windows for. A site has at most
tens of thousands; past this, readings of new devices are not evaluated
(counted in ``devices_refused``), so a flood of invented device ids cannot
grow memory without bound."""
MATCH_CACHE_MAX = 100_000
"""Entries of the (device, adapter, address) -> rules cache (cleared when full)."""
SCAN_MIN_RULES = 8
"""A device's rules are scanned (:mod:`edgeway.rules.scan`) from this many;
below, the full path costs little."""
VALUES_IN_TRANSITION = 32
"""Metric values copied into a transition's record: the ones its rule reads,
at most this many (a record must stay small)."""

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Schedule:
    """The time windows a rule may set in (wall clock, a time zone)."""

    __slots__ = ("windows", "zone")

    def __init__(self, windows: Sequence[ScheduleWindow], zone: str | None) -> None:
        self.zone = ZoneInfo(zone) if zone else None
        self.windows = [
            (frozenset(_DAYS.index(d) for d in w.days), _minutes(w.from_), _minutes(w.to))
            for w in windows
        ]

    def allows(self, wall: float) -> bool:
        t = dt.datetime.fromtimestamp(wall, self.zone)
        day, minute = t.weekday(), t.hour * 60 + t.minute
        for days, start, end in self.windows:
            if start <= end:
                if day in days and start <= minute < end:
                    return True
            # Past midnight: the evening part on a listed day, the morning
            # part on the day after one.
            elif (day in days and minute >= start) or ((day - 1) % 7 in days and minute < end):
                return True
        return False


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


@dataclass(slots=True)
class RuleState:
    """One rule's state for one device (what ``rules.db`` keeps)."""

    active: bool = False
    since: float | None = None
    """Rule-clock time the condition towards the other state began to hold
    (None: it does not hold)."""
    seq: int = 0
    """Transitions so far: the next one is ``seq + 1`` (its stable id)."""
    cooldown_until: float = 0.0

    @property
    def idle(self) -> bool:
        return not self.active and self.since is None and self.seq == 0


@dataclass(slots=True, frozen=True)
class Transition:
    """A rule set or cleared for a device, with what it asks for."""

    rule: str
    device_id: str
    seq: int
    state: Literal["set", "clear"]
    at: float
    """Wall clock."""
    values: dict[str, MetricValue]
    actions: tuple[Action, ...]

    @property
    def id(self) -> str:
        return f"{self.rule}:{self.device_id}:{self.seq}"

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "rule": self.rule,
            "device_id": self.device_id,
            "seq": self.seq,
            "state": self.state,
            "at": self.at,
            "values": self.values,
        }


@dataclass(slots=True)
class RuleOutput:
    """State rows to store and transitions to store and carry out."""

    states: list[tuple[str, str, RuleState]] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.states or self.transitions)


class CompiledRule:
    """A rule ready to evaluate."""

    __slots__ = (
        "clear",
        "clear_for",
        "config",
        "cooldown",
        "dynamic",
        "for_",
        "matcher",
        "metrics",
        "name",
        "names",
        "on_clear",
        "on_set",
        "schedule",
        "twin",
        "when",
        "windows",
    )

    def __init__(self, cfg: RuleConfig) -> None:
        self.config = cfg
        self.name = cfg.name
        self.matcher = RouteMatcher(cfg.match)
        self.dynamic = bool(cfg.match.tags or cfg.match.device_types)
        """Matching depends on each reading's tags, not only on where it came from."""
        self.metrics = compile_globs(cfg.match.metrics) if cfg.match.metrics else None
        self.when: Condition = compile_condition(cfg.when)
        self.clear: Condition | None = compile_condition(cfg.clear) if cfg.clear else None
        self.names = self.when.names | (self.clear.names if self.clear else frozenset())
        self.twin = self.when.twin or (self.clear is not None and self.clear.twin)
        self.windows = self.when.windows | (self.clear.windows if self.clear else frozenset())
        self.for_ = cfg.for_
        self.clear_for = cfg.clear_for
        self.cooldown = cfg.cooldown
        self.schedule = Schedule(cfg.schedule, cfg.timezone) if cfg.schedule else None
        self.on_set = cfg.on_set
        self.on_clear = cfg.on_clear

    def static_match(self, r: Reading) -> bool:
        m = self.matcher
        return (
            (m.devices is None or m.devices(r.device_id))
            and (m.adapters is None or r.origin.adapter in m.adapters)
            and (m.topics is None or m.topics.match(r.origin.address) is not None)
        )

    def set_holds(self, scope: Scope, wall: float) -> bool | None:
        """``when`` now (None: unknown); False outside the schedule."""
        if self.schedule is not None and not self.schedule.allows(wall):
            return False
        return _truth(self.when, scope)

    def clear_holds(self, scope: Scope) -> bool | None:
        if self.clear is not None:
            return _truth(self.clear, scope)
        v = _truth(self.when, scope)
        return None if v is None else not v


def _truth(cond: Condition, scope: Scope) -> bool | None:
    try:
        return bool(cond.evaluate(scope))
    except (MissingMetric, TypeError, ArithmeticError, ValueError):
        # A metric not seen yet, a string in arithmetic, a division by zero:
        # nothing is known, nothing changes.
        return None


@dataclass(slots=True)
class EngineStats:
    """Counters of the rule engine (``/api/status`` under ``rules``)."""

    rules: int = 0
    readings: int = 0
    evaluations: int = 0
    transitions: int = 0
    pending: int = 0
    """(rule, device) pairs in a ``for:`` or ``clear_for:`` duration now."""
    active: int = 0
    devices: int = 0
    devices_refused: int = 0
    scan_refused: int = 0
    """Rule sets left without a scanner (MAX_SCANNED_RULES reached): their
    devices' readings take the full path."""


class _Group:
    """Rules evaluated at one point of the pipeline (the front, or one route's
    ``rules`` step), with the devices' values and windows as seen there."""

    __slots__ = (
        "building",
        "cache",
        "dynamic",
        "scan",
        "scanned",
        "scanners",
        "scopes",
        "static",
        "stats",
        "windowed",
    )

    def __init__(self, rules: Sequence[CompiledRule], stats: EngineStats, scan: bool) -> None:
        self.scan = scan
        self.static = [r for r in rules if not r.dynamic]
        self.dynamic = [r for r in rules if r.dynamic]
        self.stats = stats
        self.cache: dict[tuple[str, str, str], tuple[tuple[CompiledRule, ...], Scanner | None]] = {}
        """(device, adapter, address) -> the static rules it matches, and their scanner."""
        self.scanners: dict[tuple[CompiledRule, ...], Scanner] = {}
        """One per distinct rule set (devices matching the same rules share it)."""
        self.scanned = 0
        """Rule slots in :attr:`scanners` (bounded by MAX_SCANNED_RULES)."""
        self.building: list[Scanner] = []
        self.scopes: dict[str, Scope] = {}
        self.windowed: dict[str, list[WindowKey]] = {}
        """Metric -> the windows (metric, seconds) these rules read of it."""
        for r in rules:
            for key in r.windows:
                keys = self.windowed.setdefault(key[0], [])
                if key not in keys:
                    keys.append(key)

    def rules_for(self, r: Reading) -> tuple[Sequence[CompiledRule], Scanner | None]:
        """The rules ``r`` concerns, and the scanner of the leading
        ``len(scanner.rules)`` of them when it is built."""
        key = (r.device_id, r.origin.adapter, r.origin.address)
        entry = self.cache.get(key)
        if entry is None:
            if len(self.cache) >= MATCH_CACHE_MAX:
                self.cache.clear()
            hit = tuple(x for x in self.static if x.static_match(r))
            entry = self.cache[key] = (hit, self._scanner(hit))
        hit, scanner = entry
        if scanner is not None and not scanner.ready:
            scanner = None
        if not self.dynamic:
            return hit, scanner
        return [*hit, *(x for x in self.dynamic if x.matcher.matches(r))], scanner

    def _scanner(self, rules: tuple[CompiledRule, ...]) -> Scanner | None:
        if not self.scan or len(rules) < SCAN_MIN_RULES:
            return None
        scanner = self.scanners.get(rules)
        if scanner is None:
            if self.scanned + len(rules) > MAX_SCANNED_RULES:
                self.stats.scan_refused += 1
                return None
            scanner = self.scanners[rules] = Scanner(rules)
            self.scanned += len(rules)
            self.building.append(scanner)
        return scanner

    def build_step(self) -> None:
        """Build one slice of a scanner waiting to be built."""
        if self.building and self.building[0].build_next():
            self.building.pop(0)


class RuleEngine:
    """Every configured rule over every device; see the module docstring.

    Rules named by a route's ``rules`` step (``stepped``: step id -> rule
    names) are evaluated there, on the readings that reach that step; the
    others at the front, on readings as devices sent them.
    """

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        max_devices: int = MAX_DEVICES,
        stepped: Mapping[str, Sequence[str]] | None = None,
        scan: bool = True,
    ) -> None:
        """``scan``: skip idle rules whose ``when`` does not hold with a
        generated scan (:mod:`edgeway.rules.scan`); False evaluates every
        rule in full (the reference the scan is tested against)."""
        self.rules = {r.name: CompiledRule(r) for r in rules if r.enabled}
        self.clock = clock
        self.wall = wall
        self.max_devices = max_devices
        self.states: dict[tuple[str, str], RuleState] = {}
        self.stats = EngineStats(rules=len(self.rules))
        stepped = stepped or {}
        claimed = {n for names in stepped.values() for n in names}
        self.front = _Group(
            [r for r in self.rules.values() if r.name not in claimed], self.stats, scan
        )
        self.steps = {
            sid: _Group([self.rules[n] for n in names if n in self.rules], self.stats, scan)
            for sid, names in stepped.items()
        }
        self._group_of: dict[str, _Group] = {}
        for group in self._groups():
            for r in (*group.static, *group.dynamic):
                self._group_of[r.name] = group
        self._devices = 0
        self._timers: list[tuple[float, str, str]] = []
        self.uses_twin = any(r.twin for r in self.rules.values())
        """Some rule reads the device twin: keep the twins (``set_twin``)."""
        self.twins: dict[str, TwinValues] = {}

    # ------------------------------------------------------------ state

    def _groups(self) -> tuple[_Group, ...]:
        return (self.front, *self.steps.values())

    def reset_states(self, states: Iterable[tuple[str, str, RuleState]]) -> None:
        """Forget every state and timer and take ``states`` (the stored ones) back."""
        self.states.clear()
        self._timers.clear()
        for group in self._groups():
            for scope in group.scopes.values():
                scope.rule_states.clear()
        self.restore_all(states)

    def restore_all(self, states: Iterable[tuple[str, str, RuleState]]) -> None:
        """Take back stored states (at start); rules no longer configured are ignored."""
        for rule, device_id, state in states:
            r = self.rules.get(rule)
            if r is None:
                continue
            self.states[(rule, device_id)] = state
            scope = self._group_of[rule].scopes.get(device_id)
            if scope is not None:
                scope.rule_states[rule] = state
            if state.since is not None:
                self._arm(r, device_id, state)
        self.stats.pending = sum(1 for s in self.states.values() if s.since is not None)
        self.stats.active = sum(1 for s in self.states.values() if s.active)

    # ------------------------------------------------------------ readings

    def _scope(self, group: _Group, device_id: str) -> Scope | None:
        scope = group.scopes.get(device_id)
        if scope is None:
            if self._devices >= self.max_devices:
                self.stats.devices_refused += 1
                return None
            scope = group.scopes[device_id] = Scope()
            states = self.states
            for rule in itertools.chain(group.static, group.dynamic):
                st = states.get((rule.name, device_id))
                if st is not None:  # restored at start
                    scope.rule_states[rule.name] = st
            if self.uses_twin:
                scope.twin = self._twin(device_id)
            self._devices += 1
            self.stats.devices = self._devices
        return scope

    def _twin(self, device_id: str) -> TwinValues:
        twin = self.twins.get(device_id)
        if twin is None:
            twin = self.twins[device_id] = TwinValues()
        return twin

    def set_twin(self, device_id: str, section: str, doc: dict[str, object], version: int) -> None:
        """A device twin's section is now ``doc`` at ``version`` (the twin
        service's change listener, and its stored twins at start). Rules read
        it at the device's next reading; a twin change alone evaluates nothing."""
        if not self.uses_twin:
            return
        if device_id not in self.twins and len(self.twins) >= self.max_devices:
            return
        self._twin(device_id).update(section, doc, version)

    def observe(
        self, readings: Sequence[Reading], out: RuleOutput | None = None, step: str | None = None
    ) -> RuleOutput:
        """Evaluate the rules these readings concern: the front's, or those
        of the route step ``step``."""
        out = RuleOutput() if out is None else out
        group = self.front if step is None else self.steps.get(step)
        if group is None or not (group.static or group.dynamic):
            return out
        t, wall = self.clock(), self.wall()
        windowed = group.windowed
        group.build_step()
        for r in readings:
            self.stats.readings += 1
            rules, scanner = group.rules_for(r)
            if not rules:
                continue
            scope = self._scope(group, r.device_id)
            if scope is None:
                continue
            metrics = r.metrics
            scope.update(metrics)
            scope.now = t
            if windowed:
                for name, value in metrics.items():
                    keys = windowed.get(name)
                    if keys is None or isinstance(value, str):
                        continue
                    v = float(value)
                    for key in keys:
                        samples = scope.windows.get(key)
                        if samples is None:
                            samples = scope.windows[key] = Samples(key[1])
                        # Old samples out before the new one in: the running
                        # sum then sees the same steps in the same order
                        # whenever a condition reads the window (or the scan
                        # does), so every reader gets the same value.
                        samples.evict(t)
                        samples.add(t, v)
            device_id = r.device_id
            if scanner is not None:
                # Only the rules that are not idle, or whose `when` holds or is
                # not decided by the scan, go through the state machine; for the
                # others nothing would change (edgeway.rules.scan).
                n = len(scanner.rules)
                self.stats.evaluations += n
                todo: Iterable[CompiledRule] = [rules[i] for i in scanner(scope)]
                rest: Sequence[CompiledRule] = rules[n:]
            else:
                todo, rest = (), rules
            for rule in itertools.chain(todo, rest):
                if rule.names and rule.names.isdisjoint(metrics):
                    continue  # (a rule naming no metric, only the twin: every reading)
                if rule.metrics is not None and not any(rule.metrics(k) for k in metrics):
                    continue
                self._evaluate(rule, device_id, scope, t, wall, out, timer=False)
        return out

    # ------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """Rule-clock time of the earliest armed timer."""
        return self._timers[0][0] if self._timers else None

    def due(self, out: RuleOutput | None = None) -> RuleOutput:
        """Fire the timers whose time came (durations ending, cooldowns over)."""
        out = RuleOutput() if out is None else out
        t, wall = self.clock(), self.wall()
        timers = self._timers
        while timers and timers[0][0] <= t:
            _, name, device_id = heapq.heappop(timers)
            rule = self.rules.get(name)
            st = self.states.get((name, device_id))
            if rule is None or st is None or st.since is None:
                continue  # a stale timer: the state moved on
            if self._deadline(rule, st) > t:
                continue  # re-armed later (a later timer entry exists)
            scope = self._group_of[name].scopes.get(device_id)
            if scope is None:
                scope = Scope()
                scope.twin = self.twins.get(device_id)
            scope.now = t
            self._evaluate(rule, device_id, scope, t, wall, out, timer=True)
        return out

    def _deadline(self, rule: CompiledRule, st: RuleState) -> float:
        assert st.since is not None
        if st.active:
            return st.since + rule.clear_for
        return max(st.since + rule.for_, st.cooldown_until)

    def _arm(self, rule: CompiledRule, device_id: str, st: RuleState) -> None:
        heapq.heappush(self._timers, (self._deadline(rule, st), rule.name, device_id))

    # ------------------------------------------------------------ the machine

    def _evaluate(
        self,
        rule: CompiledRule,
        device_id: str,
        scope: Scope,
        t: float,
        wall: float,
        out: RuleOutput,
        *,
        timer: bool,
    ) -> None:
        self.stats.evaluations += 1
        key = (rule.name, device_id)
        st = self.states.get(key)
        active = st is not None and st.active
        holds = rule.clear_holds(scope) if active else rule.set_holds(scope, wall)
        if holds is None:
            if not timer or st is None:
                return
            holds = st.since is not None  # the last known result stands
        if not holds:
            if st is not None and st.since is not None:
                st.since = None
                self.stats.pending -= 1
                out.states.append((rule.name, device_id, _copy(st)))
            return
        if st is None:
            st = self.states[key] = scope.rule_states[rule.name] = RuleState()
        changed = False
        if st.since is None:
            st.since = t
            self.stats.pending += 1
            changed = True
        if t < self._deadline(rule, st):
            if changed:
                self._arm(rule, device_id, st)
                out.states.append((rule.name, device_id, _copy(st)))
            return
        # The transition.
        st.since = None
        self.stats.pending -= 1
        st.seq += 1
        st.active = not active
        if st.active:
            st.cooldown_until = t + rule.cooldown
            self.stats.active += 1
        else:
            self.stats.active -= 1
        self.stats.transitions += 1
        state: Literal["set", "clear"] = "set" if st.active else "clear"
        values = {k: scope[k] for k in sorted(rule.names)[:VALUES_IN_TRANSITION] if k in scope}
        tr = Transition(rule.name, device_id, st.seq, state, wall, values, ())
        actions = tuple(
            _resolve(a, rule, tr, st.active) for a in (rule.on_set if st.active else rule.on_clear)
        )
        tr = Transition(rule.name, device_id, st.seq, state, wall, values, actions)
        out.states.append((rule.name, device_id, _copy(st)))
        out.transitions.append(tr)


def _copy(st: RuleState) -> RuleState:
    return RuleState(st.active, st.since, st.seq, st.cooldown_until)


def _fill(text: str, tr: Transition) -> str:
    return (
        text.replace("{device_id}", tr.device_id)
        .replace("{rule}", tr.rule)
        .replace("{state}", tr.state)
    )


def _resolve(a: ActionConfig, rule: CompiledRule, tr: Transition, setting: bool) -> Action:
    """The typed output an action of ``rule`` asks for at transition ``tr``."""
    by = f"rule:{rule.name}"
    if a.command is not None:
        c = a.command
        return SendCommand(_fill(c.device, tr), c.name, dict(c.params), c.ttl, f"{by}:{tr.id}", by)
    if a.publish is not None:
        p = a.publish
        payload = _fill(p.payload, tr) if p.payload is not None else _json(tr)
        return Publish(_fill(p.topic, tr), payload, p.qos, p.retain)
    if a.webhook is not None:
        w = a.webhook
        return CallWebhook(w.url, _json(tr), w.timeout, w.retries, dict(w.headers), tr.id)
    if a.alarm is not None:
        al = a.alarm
        do = al.do or ("raise" if setting else "clear")
        return AlarmChange(
            do, tr.device_id, al.type, al.severity, _fill(al.message, tr), by, dict(tr.values)
        )
    if a.event is not None:
        metrics: dict[str, MetricValue] = {"rule": tr.rule, "state": tr.state, "seq": tr.seq}
        for k, v in tr.values.items():
            metrics.setdefault(k, v)
        return RecordEvent(tr.device_id, tr.at, metrics, tr.id, tr.rule)
    assert a.twin is not None
    return SetTwinDesired(tr.device_id, dict(a.twin.desired), by)


def _json(tr: Transition) -> str:
    return orjson.dumps(tr.to_json()).decode()
