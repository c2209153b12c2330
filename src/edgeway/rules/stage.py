"""Rules as a stage of the pipeline, with a typed output.

:class:`RuleStage` sits at the front of :class:`edgeway.pipeline.Pipeline`:
every reading the pipeline accepts is observed by the rules before the
routes run (rules see readings as devices sent them). Its output is not
readings but a :class:`~edgeway.rules.engine.RuleOutput`: state changes and
transitions carrying typed actions (commands, alarms, publishes, webhooks,
event records). The stage stores that output in ``rules.db`` and the
pipeline acknowledges the device only when that commit is done too, so a
duration that began with an acknowledged reading survives a kill. After the
commit the actions are carried out (:class:`ActionRunner`).

Timers (a ``for:`` ending without a new reading, a cooldown ending) fire at
their deadline on the rule clock; after a restart they fire at the time they
were due (at once if it passed while the gateway was down).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from edgeway.pipeline.config import RouteConfig
from edgeway.reading import Reading
from edgeway.rules.actions import ActionRunner
from edgeway.rules.config import RuleConfig
from edgeway.rules.engine import RuleEngine, RuleOutput
from edgeway.rules.store import (
    HISTORY_KEEP,
    RuleStore,
    StoredAction,
    load_states,
)
from edgeway.rules.targets import ActionTargets, TwinTarget

log = logging.getLogger(__name__)

SUMMARY_SLICE = 10_000
"""Rule x device states counted per turn of the event loop by :meth:`RuleStage.rules`
(a few ms of work per slice)."""

TWIN_PAGE = 1000
"""Twins read per query at start (the twin service's largest page)."""
TIMER_SLACK = 0.002
"""Seconds added to a timer so it does not wake a hair before its deadline
(the loop's clock and the rule clock are read apart)."""


class RuleStage:
    """The rules between ingest and the routes; see the module docstring."""

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        data_dir: Path,
        *,
        targets: ActionTargets,
        durability: Literal["fsync", "os"] = "fsync",
        stepped: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.configs = list(rules)
        self.stepped = dict(stepped or {})
        """Route step id -> the rules that step evaluates (the others: the front)."""
        self.store = RuleStore(data_dir, durability)
        self.targets = targets
        self.engine: RuleEngine | None = None
        self.runner = ActionRunner(self.store, targets)
        self.failed_writes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writes: set[asyncio.Future[list[StoredAction]]] = set()
        self._resyncing: asyncio.Task[None] | None = None
        self._twin_source: TwinTarget | None = None
        self._twin_load: asyncio.Task[None] | None = None
        self._closed = True

    async def open(self) -> None:
        """Open rules.db, take back state and unfinished actions, arm the timers."""
        self._loop = asyncio.get_running_loop()
        loaded = await self.store.open(purge_before=time.time() - HISTORY_KEEP)
        clock = self.store.clock
        assert clock is not None
        self.engine = RuleEngine(
            self.configs, clock=clock.now, wall=clock.wall, stepped=self.stepped
        )
        self.engine.restore_all(loaded.states)
        self._closed = False
        if loaded.waiting:
            log.info("rules: %d actions of earlier transitions to carry out", len(loaded.waiting))
            self.runner.run(loaded.waiting)
        self._fire()  # durations that ended while the gateway was down

    def start_actions(self) -> None:
        """Carry out actions from now on (held until the gateway's command
        queue and broker exist: an action must not fail for want of them);
        follow the device twins if a rule reads them."""
        self.runner.start()
        twins = self.targets.twins
        if self.engine is not None and self.engine.uses_twin and twins is not None:
            twins.add_listener(self._twin_changed)
            self._twin_source = twins
            self._twin_load = asyncio.get_running_loop().create_task(
                self._load_twins(twins), name="rules:twins"
            )

    def _twin_changed(self, twin: Any, section: Any) -> None:
        if self.engine is not None:
            doc = twin.desired if section == "desired" else twin.reported
            version = twin.desired_version if section == "desired" else twin.reported_version
            self.engine.set_twin(twin.device_id, section, doc, version)

    async def _load_twins(self, twins: TwinTarget) -> None:
        """The stored twins, page by page (until loaded, conditions on the
        twin are unknown: they change nothing)."""
        after = ""
        try:
            while not self._closed:
                page = await twins.list(limit=TWIN_PAGE, after=after)
                for twin in page:
                    self._twin_changed(twin, "desired")
                    self._twin_changed(twin, "reported")
                if len(page) < TWIN_PAGE:
                    return
                after = page[-1].device_id
        except Exception:
            log.exception("rules: device twins not loaded; conditions on them stay unknown")

    async def close(self) -> None:
        """Stop the timers, finish stores in flight, stop the runner, close rules.db."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._writes:
            await asyncio.wait(list(self._writes))
        if self._twin_source is not None:
            self._twin_source.remove_listener(self._twin_changed)
        if self._twin_load is not None:
            self._twin_load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._twin_load
        if self._resyncing is not None:
            self._resyncing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resyncing
        await self.runner.close()
        with contextlib.suppress(Exception):
            await self.store.checkpoint_clock()
        await self.store.close()

    def status(self) -> dict[str, Any]:
        """Counters for ``/api/status``."""
        engine = self.engine
        return {
            "engine": dataclasses.asdict(engine.stats) if engine is not None else None,
            "actions": dataclasses.asdict(self.runner.stats),
            "failed_writes": self.failed_writes,
        }

    async def rules(self) -> list[dict[str, Any]]:
        """Each configured rule: its settings, how many devices it is active,
        pending or cooling down for, and its last firing (``GET /api/rules``)."""
        from edgeway.rules.store import last_firings

        engine = self.engine
        counts: dict[str, list[int]] = {}
        if engine is not None:
            now = engine.clock()
            # A snapshot walked in slices: a rule x device state table can hold
            # millions of entries, and the event loop must not wait on it whole.
            items = list(engine.states.items())
            for start in range(0, len(items), SUMMARY_SLICE):
                for (rule, _device), st in items[start : start + SUMMARY_SLICE]:
                    c = counts.setdefault(rule, [0, 0, 0])
                    c[0] += st.active
                    c[1] += st.since is not None
                    c[2] += st.cooldown_until > now
                await asyncio.sleep(0)
        fired = await self.store.db.read(last_firings) if not self._closed else {}
        out = []
        for cfg in self.configs:
            active, pending, cooling = counts.get(cfg.name, (0, 0, 0))
            state = "disabled" if not cfg.enabled else "active" if active else "idle"
            out.append(
                {
                    "name": cfg.name,
                    "enabled": cfg.enabled,
                    "state": state,
                    "when": cfg.when,
                    "clear": cfg.clear,
                    "for": cfg.for_,
                    "cooldown": cfg.cooldown,
                    "active_devices": active,
                    "pending_devices": pending,
                    "cooling_down_devices": cooling,
                    "last_fired": fired.get(cfg.name),
                    "step": next(
                        (s for s, names in self.stepped.items() if cfg.name in names), None
                    ),
                }
            )
        return out

    # ------------------------------------------------------------ observing

    def observe(
        self, readings: Sequence[Reading], step: str | None = None
    ) -> asyncio.Future[Any] | None:
        """Evaluate the front's rules (or route step ``step``'s) on
        ``readings``; a future for the state commit (None: nothing changed
        that needs storing)."""
        if self._closed or self.engine is None:
            return None
        out = self.engine.observe(readings, step=step)
        if not out:
            return None
        fut = self._store(out)
        self._rearm()
        return fut

    def _store(self, out: RuleOutput) -> asyncio.Future[list[StoredAction]]:
        fut = self.store.write(out, self._stored)
        self._writes.add(fut)
        fut.add_done_callback(self._write_done)
        return fut

    def _write_done(self, fut: asyncio.Future[list[StoredAction]]) -> None:
        self._writes.discard(fut)
        if not fut.cancelled():
            fut.exception()  # handled by _stored; a timer's write has no other reader

    def _stored(self, result: list[StoredAction] | BaseException) -> None:
        """The commit of a write is known (called in the callback that learns
        of it: a rule's command leaves a loop turn sooner)."""
        if isinstance(result, BaseException):
            e = result
            # Nothing of it is durable: the device is not acknowledged either
            # (the pipeline joins this future) and sends again.
            self.failed_writes += 1
            log.error("rules: state not stored: %s; taking the stored state back", e)
            self._resync()
            return
        if result:
            self.runner.run(result)

    def _resync(self) -> None:
        """After a failed write the engine's memory is ahead of the disk (a
        transition it made is not stored, its actions would never run): take
        the stored state back, so the transition happens again, stored, when
        the device sends again."""
        if self._closed or self._resyncing is not None:
            return

        async def run() -> None:
            try:
                loaded = await self.store.db.read(load_states)
                if self.engine is not None and not self._closed:
                    self.engine.reset_states(loaded)
                    self._timer_at = None
                    self._rearm()
            except Exception:
                log.exception("rules: stored state not read back")
            finally:
                self._resyncing = None

        self._resyncing = asyncio.get_running_loop().create_task(run(), name="rules:resync")

    # ------------------------------------------------------------ timers

    def _rearm(self) -> None:
        engine = self.engine
        if engine is None or self._closed or self._loop is None:
            return
        at = engine.next_deadline()
        if at is None or (self._timer_at is not None and self._timer_at <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        delay = max(0.0, at - engine.clock()) + TIMER_SLACK
        self._timer = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed or self.engine is None:
            return
        try:
            out = self.engine.due()
            if out:
                self._store(out)
        except Exception:
            log.exception("rules: timer failed")
        self._rearm()


def rules_stage_or_none(
    rules: Sequence[RuleConfig],
    routes: Sequence[RouteConfig],
    data_dir: Path,
    targets: ActionTargets,
    durability: Literal["fsync", "os"] = "fsync",
) -> RuleStage | None:
    """A stage for the enabled ``rules`` (None without any: the pipeline's
    path stays exactly as it is with no rule configured). Raises ValueError
    for a route's ``rules`` step naming a rule that is not configured, or a
    rule two steps name."""
    enabled = [r for r in rules if r.enabled]
    if not enabled:
        return None
    stepped = stepped_rules(rules, routes)
    return RuleStage(enabled, data_dir, targets=targets, durability=durability, stepped=stepped)


def stepped_rules(
    rules: Sequence[RuleConfig], routes: Sequence[RouteConfig]
) -> dict[str, list[str]]:
    """Route step id (``route/index:rules``) -> the rules it names; ValueError
    for the first problem :func:`rule_step_problems` finds."""
    for _, message in rule_step_problems(rules, routes):
        raise ValueError(message)
    return {
        f"{route.name}/{i}:rules": list((spec.get("rules") or {}).get("names", []))
        for route in routes
        for i, spec in enumerate(route.steps)
        if "rules" in spec
    }


def rule_step_problems(
    rules: Sequence[RuleConfig], routes: Sequence[RouteConfig]
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(key path, message) for each ``rules`` step naming a rule that is not
    configured, or one another step names already (``edgeway check``)."""
    known = {r.name for r in rules}
    where: dict[str, str] = {}
    for ri, route in enumerate(routes):
        for i, spec in enumerate(route.steps):
            if "rules" not in spec:
                continue
            sid = f"{route.name}/{i}:rules"
            loc = ("routes", ri, "steps", i, "rules", "names")
            for n in (spec.get("rules") or {}).get("names", []):
                if n not in known:
                    yield loc, f"{sid}: no rule named {n!r}; rules: {sorted(known)}"
                elif n in where:
                    yield loc, f"rule {n!r} is named by two steps: {where[n]} and {sid}"
                else:
                    where[n] = sid
