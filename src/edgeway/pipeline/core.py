"""The pipeline: routes and steps between the south adapters and the outbox.

Configuration (``routes:`` and ``pipeline:``; see docs/pipeline.md)::

    routes:
      - name: climate
        match: {devices: ["room-*"], metrics: [temperature, humidity]}
        steps:
          - validate: {ranges: {temperature: {min: -40, max: 85}}}
          - window: {size: 10s, aggregates: [mean]}
          - deadband: {percent: 0.5}
        sinks: [cloud]
    pipeline:
      default_sinks: [cloud]     # readings no route takes (absent: every sink)
      tick_interval: 0.5s
      stats_interval: 5s

:class:`Pipeline` implements :class:`edgeway.ingest.Ingest` in front of the
outbox. ``submit`` runs the matching routes' steps synchronously on the loop
and hands what comes out to ``Outbox.submit(readings, sinks)``; readings a
holding step (window, rate limit) absorbed are journaled in the
:class:`~edgeway.pipeline.state.StateStore`. The returned future resolves
when both the outbox commit and the state commit are done, so a device is
acknowledged only when nothing of what it sent can be lost.

Lifecycle (the gateway owns it)::

    outbox = Outbox(...); await outbox.open()
    pipeline = Pipeline(cfg.routes, cfg.pipeline, outbox=outbox,
                        data_dir=cfg.gateway.data_dir, durability=cfg.outbox.durability)
    await pipeline.open()      # restores held readings, starts the timers
    ... adapters and the broker get ``ingest=pipeline`` ...
    await pipeline.close()     # after the adapters stopped, before outbox.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from edgeway.ingest import IngestStatus
from edgeway.pipeline.config import PipelineSection, RouteConfig
from edgeway.pipeline.figures import PipelineStats, RouteStats, SinkFlowStats
from edgeway.pipeline.registry import HoldingStep, Release, Step, StepContext, build_step
from edgeway.pipeline.routes import RouteMatcher
from edgeway.pipeline.state import StateStore
from edgeway.reading import MetricValue, Reading
from edgeway.runtime.component import HEALTHY, Health, finish_closing

if TYPE_CHECKING:
    from edgeway.rules.stage import RuleStage

log = logging.getLogger(__name__)

RECORD_ENVELOPE = 67
"""Bytes a record's JSON adds around its device id and metrics, as sinks send
it: ``{"id":"gw-1:123456","device_id":"","ts":1700000000.123,"metrics":}``.
Counting the envelope makes the figures comparable with what reaches the
cloud; it is an estimate (ids and timestamps vary by a few bytes)."""

TAGS_ENVELOPE = 8
"""Bytes of ``,"tags":`` when a record has tags."""

UNSIZED_MAX = 256
"""Pass-through readings whose bytes are counted later, together, at most
(:meth:`Pipeline._size_pending`). Small enough that they are still in the
CPU's cache when counted: inside `edgeway run` during W1, 4,096 cost 0.45 us
a reading and 256 cost 0.18 (32: 0.22, one JSON encoding per few readings);
bench/results/w1-cpu-2026-12-07b.md."""
STATS_FILE = "stats.json"

FAILURE_LOG_INTERVAL = 10.0
"""Seconds between log lines for a failing route: a step that raises on every
reading must not flood the log (the count is in the stats)."""


_dumps = orjson.dumps


def reading_size(r: Reading) -> int:
    """About the bytes of ``r`` as one JSON record sent to the cloud."""
    n = len(orjson.dumps(r.metrics)) + len(r.device_id) + RECORD_ENVELOPE
    if r.tags:
        n += len(orjson.dumps(r.tags)) + TAGS_ENVELOPE
    return n


def readings_size(readings: Sequence[Reading]) -> int:
    """``sum(map(reading_size, readings))``, exactly, with one JSON encoding
    for all the metrics (a batch of one read's telemetry is the usual call)."""
    n = len(readings)
    if not n:
        return 0
    # "[m1,m2,...]" is the metrics texts, n - 1 commas and two brackets.
    total = len(_dumps([r.metrics for r in readings])) - n - 1
    total += sum([len(r.device_id) for r in readings]) + n * RECORD_ENVELOPE
    tags = [r.tags for r in readings if r.tags]
    if tags:
        total += len(_dumps(tags)) - len(tags) - 1 + len(tags) * TAGS_ENVELOPE
    return total


class OutboxIngest(Protocol):
    """What the pipeline needs of :class:`edgeway.outbox.Outbox`."""

    sink_names: list[str]

    def submit(
        self, readings: Sequence[Reading], sinks: Sequence[str] | None = None
    ) -> asyncio.Future[IngestStatus]: ...

    def is_saturated(self) -> bool: ...

    def count_rejected(self, n: int, sinks: Sequence[str] | None = None) -> None: ...


@dataclass(slots=True)
class Flow:
    """Readings and bytes through one point."""

    readings: int = 0
    bytes: int = 0

    def add(self, readings: int, nbytes: int) -> None:
        self.readings += readings
        self.bytes += nbytes


@dataclass(slots=True)
class _StepSlot:
    step: Step
    ctx: StepContext
    inp: Flow = field(default_factory=Flow)
    out: Flow = field(default_factory=Flow)


@dataclass(slots=True)
class _Route:
    name: str
    matcher: RouteMatcher
    sinks: tuple[str, ...] | None
    slots: list[_StepSlot]
    received: Flow = field(default_factory=Flow)
    sent: Flow = field(default_factory=Flow)
    pending: list[Reading] = field(default_factory=list)
    holding: list[tuple[int, HoldingStep]] = field(default_factory=list)
    failures: int = 0
    """Readings refused because a step raised (a bug; logged)."""
    forgets: bool = False
    """A step remembers devices (``forget`` matters if the outbox refuses)."""


class _Memo:
    """Sizes of the readings of one submit, by object: a filter step passes the
    same objects on, whose size is then not computed again. The entry keeps
    its reading alive, so no other object of this submit can reuse its id."""

    __slots__ = ("sizes",)

    def __init__(self) -> None:
        self.sizes: dict[int, tuple[Reading, int]] = {}

    def total(self, readings: Sequence[Reading]) -> int:
        sizes = self.sizes
        n = 0
        for r in readings:
            hit = sizes.get(id(r))
            if hit is None:
                s = reading_size(r)
                sizes[id(r)] = (r, s)
            else:
                s = hit[1]
            n += s
        return n


class Pipeline:
    """Routes and steps in front of the outbox; implements :class:`edgeway.ingest.Ingest`."""

    def __init__(
        self,
        routes: Sequence[RouteConfig],
        config: PipelineSection | None = None,
        *,
        outbox: OutboxIngest,
        data_dir: Path | str,
        durability: Literal["fsync", "os"] = "fsync",
        clock: Callable[[], float] = time.time,
        timers: bool = True,
        services: Mapping[str, Any] | None = None,
        rules: RuleStage | None = None,
    ) -> None:
        """Build every route's steps (raises ``ValueError`` for a bad route).

        ``clock`` is the wall clock windows close by (tests pass a fake one);
        ``timers=False`` leaves ticking to the caller (:meth:`tick`);
        ``rules`` observes every accepted reading before the routes (its
        state commit joins the acknowledgement; see edgeway.rules.stage).
        """
        self.rules = rules
        if rules is not None:
            # The ``rules`` route step evaluates its rules in this stage.
            services = {**(services or {}), "rules": rules}
        self.config = config if config is not None else PipelineSection()
        self.outbox = outbox
        self.data_dir = Path(data_dir)
        self.clock = clock
        self.timers = timers
        known = set(outbox.sink_names)
        names: set[str] = set()

        def check_sinks(where: str, sinks: Sequence[str] | None) -> tuple[str, ...] | None:
            if sinks is None:
                return None
            unknown = [s for s in sinks if s not in known]
            if unknown:
                raise ValueError(f"{where}: unknown sinks {unknown}; configured: {sorted(known)}")
            return tuple(sinks)

        self.routes: list[_Route] = []
        for rc in routes:
            if rc.name in names:
                raise ValueError(f"route {rc.name!r} is defined twice")
            names.add(rc.name)
            slots = []
            for i, spec in enumerate(rc.steps):
                ((type_name, _),) = spec.items()
                ctx = StepContext(
                    route=rc.name,
                    step_id=f"{rc.name}/{i}:{type_name}",
                    services=services or {},
                    wake=self.request_tick,
                )
                step = build_step(spec, ctx)
                quarantine = getattr(step.params, "quarantine", None)
                if quarantine is not None:
                    check_sinks(f"route {rc.name} step {i} quarantine", [quarantine])
                slots.append(_StepSlot(step, ctx))
            route = _Route(
                rc.name,
                RouteMatcher(rc.match),
                check_sinks(f"route {rc.name}", rc.sinks),
                slots,
            )
            route.holding = [
                (i, s.step) for i, s in enumerate(slots) if isinstance(s.step, HoldingStep)
            ]
            route.forgets = any(type(s.step).forget is not Step.forget for s in slots)
            self.routes.append(route)
        self.default_sinks = check_sinks("pipeline.default_sinks", self.config.default_sinks)
        self.state = StateStore(self.data_dir / "pipeline.db", durability)
        self.received = Flow()
        self.default = Flow()
        self.sent_by_sinks: dict[tuple[str, ...] | None, Flow] = {}
        self._default_flow = self.sent_by_sinks[self.default_sinks] = Flow()
        self._unsized: list[Sequence[Reading]] = []
        """Pass-through batches counted in readings, not yet in bytes."""
        self._unsized_n = 0
        self.rejected_full = 0
        self.failed_commits = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stats_handle: asyncio.TimerHandle | None = None
        self._inflight: set[asyncio.Future[IngestStatus]] = set()
        self._retry: list[tuple[_Route, list[Reading], list[tuple[str, list[Release]]]]] = []
        self._stats_writing = False
        self._wake_pending = False
        self._last_failure_log = -FAILURE_LOG_INTERVAL
        self.started = time.time()

    # -- lifetime -----------------------------------------------------------

    async def open(self) -> None:
        """Open the state store, give held readings back to their steps, start the timers."""
        self._loop = asyncio.get_running_loop()
        restored = await self.state.open()
        if self.rules is not None:
            try:
                await self.rules.open()
            except BaseException:
                await self.state.close()
                raise
        self._closed = False
        used: set[str] = set()
        for route in self.routes:
            for _, step in route.holding:
                sid = step.ctx.step_id
                step.ctx.journal = self.state.journal(sid)
                got = restored.get(sid)
                if got is None:
                    continue
                used.add(sid)
                for key, before in got.marks.items():
                    step.restore_mark(key, before)
                for key, reading, jid in got.entries:
                    step.restore(key, reading, jid)
                if got.entries:
                    log.info(
                        "restored %d held readings for %s",
                        len(got.entries),
                        sid,
                        extra={"fields": {"step": sid, "readings": len(got.entries)}},
                    )
        orphans = {sid: len(r.entries) for sid, r in restored.items() if sid not in used}
        orphans = {sid: n for sid, n in orphans.items() if n}
        if orphans:
            log.warning(
                "pipeline state holds readings of steps no longer configured: %s; they stay "
                "in %s until those steps return",
                orphans,
                self.state.path,
            )
        # Windows whose time passed while the gateway was down close now.
        self.tick()
        if self.timers:
            self._tick_handle = self._loop.call_later(self.config.tick_interval, self._on_tick)
            self._stats_handle = self._loop.call_later(self.config.stats_interval, self._on_stats)

    async def close(self) -> None:
        """Stop the timers, wait for emissions in flight, write stats, close the store.

        Open windows are not flushed: they are journaled and continue after the
        next start. Call after the adapters stopped and before ``outbox.close()``.
        """
        if self._closed:
            return
        self._closed = True
        for h in (self._tick_handle, self._stats_handle):
            if h is not None:
                h.cancel()
        if self._inflight:
            await asyncio.wait(list(self._inflight))
        if self.rules is not None:
            await self.rules.close()
        await self.state.close()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._write_stats, self.report())

    def request_tick(self) -> None:
        """Tick at the loop's next turn (once, however many steps ask)."""
        if self._closed or self._loop is None or self._wake_pending:
            return
        self._wake_pending = True
        self._loop.call_soon(self._woken)

    def _woken(self) -> None:
        self._wake_pending = False
        try:
            self.tick()
        except Exception:
            log.exception("pipeline tick failed")

    def _on_tick(self) -> None:
        if self._closed:
            return
        try:
            self.tick()
        except Exception:
            log.exception("pipeline tick failed")
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(self.config.tick_interval, self._on_tick)

    def _on_stats(self) -> None:
        if self._closed:
            return
        assert self._loop is not None
        if not self._stats_writing:
            self._stats_writing = True
            job = self._loop.run_in_executor(None, self._write_stats, self.report())
            job.add_done_callback(self._stats_written)
        self._stats_handle = self._loop.call_later(self.config.stats_interval, self._on_stats)

    def _stats_written(self, job: asyncio.Future[None]) -> None:
        self._stats_writing = False
        if not job.cancelled() and job.exception() is not None:
            log.warning("cannot write %s: %s", self.data_dir / STATS_FILE, job.exception())

    # -- ingest ---------------------------------------------------------------

    def is_saturated(self) -> bool:
        return self.outbox.is_saturated()

    def _count_refused(self, readings: Sequence[Reading]) -> None:
        """Count readings refused up front in their sinks' ``rejected_full``:
        per sink their routes lead to (matching only; no step runs, so a
        reading a step would have filtered counts too), as ``accepted`` would
        have counted them; readings no route takes (or only in part) for the
        default sinks."""
        if not self.routes:
            self.outbox.count_rejected(len(readings), self.default_sinks)
            return
        per_sinks: dict[tuple[str, ...] | None, int] = {}
        for r in readings:
            # As submit routes them: whole, or some metrics (the rest to the default).
            taken = whole = False
            claimed: set[str] = set()
            for route in self.routes:
                m = route.matcher
                if not m.matches(r):
                    continue
                pred = m.metrics
                if pred is None:
                    whole = True
                else:
                    sub = {k for k in r.metrics if pred(k)}
                    if not sub:
                        continue
                    claimed |= sub
                taken = True
                per_sinks[route.sinks] = per_sinks.get(route.sinks, 0) + 1
            if not taken or (not whole and len(claimed) < len(r.metrics)):
                per_sinks[self.default_sinks] = per_sinks.get(self.default_sinks, 0) + 1
        for sinks, n in per_sinks.items():
            self.outbox.count_rejected(n, sinks)

    @property
    def batchable(self) -> bool:
        """Without routes every reading is accepted alike (see :meth:`submit`);
        with routes a submit whose readings all fail validation is answered
        REJECTED_INVALID, so each device message must be submitted alone."""
        return not self.routes

    def submit(self, readings: Sequence[Reading]) -> asyncio.Future[IngestStatus]:
        """Run the rules and the routes on ``readings``; the future resolves
        when all is safe (outbox, window state and rule state committed)."""
        fut = self._submit_routes(readings)
        rules = self.rules
        if rules is None:
            return fut
        if fut.done() and (
            fut.exception() is not None or fut.result() is IngestStatus.REJECTED_FULL
        ):
            return fut  # refused before any step (the device sends again)
        rfut = rules.observe(readings)
        if rfut is None:
            return fut
        return self._join([fut, rfut], IngestStatus.ACCEPTED, [], [], readings, None)

    def _submit_routes(self, readings: Sequence[Reading]) -> asyncio.Future[IngestStatus]:
        loop = self._loop
        if loop is None:
            raise RuntimeError("pipeline is not open")
        if self._closed:
            fut: asyncio.Future[IngestStatus] = loop.create_future()
            fut.set_exception(RuntimeError("pipeline is closed"))
            return fut
        if self.outbox.is_saturated():
            # Refuse before any step remembers or absorbs these readings: the
            # device will send them again.
            self.rejected_full += len(readings)
            self._count_refused(readings)
            fut = loop.create_future()
            fut.set_result(IngestStatus.REJECTED_FULL)
            return fut
        if not self.routes:
            # Pass-through: count and hand over, no futures of our own
            # (Flow.add inlined: this runs once per read's telemetry batch).
            # Bytes are counted later, for many batches at once (one JSON
            # encoding per UNSIZED_MAX readings).
            n = len(readings)
            for flow in (self.received, self.default, self._default_flow):
                flow.readings += n
            self._unsized.append(readings)
            self._unsized_n += n
            if self._unsized_n >= UNSIZED_MAX:
                self._size_pending()
            return self.outbox.submit(readings, self.default_sinks)
        now = self.clock()
        memo = _Memo()
        self.received.add(len(readings), memo.total(readings))
        routes = self.routes
        default: list[Reading] = []
        active: list[_Route] = []
        pairs = 0
        for r in readings:
            taken = False
            claimed: set[str] | None = None
            claimed_all = False
            for route in routes:
                m = route.matcher
                if not m.matches(r):
                    continue
                if m.metrics is None:
                    claimed_all = taken = True
                    part = r
                else:
                    pred = m.metrics
                    sub = {k: v for k, v in r.metrics.items() if pred(k)}
                    if not sub:
                        continue
                    taken = True
                    if len(sub) == len(r.metrics):
                        claimed_all = True
                        part = r
                    else:
                        if claimed is None:
                            claimed = set()
                        claimed.update(sub)
                        part = Reading(r.device_id, r.ts, sub, r.origin, r.tags, r.priority)
                if not route.pending:
                    active.append(route)
                route.pending.append(part)
                pairs += 1
            if not taken:
                default.append(r)
            elif not claimed_all and claimed is not None:
                rest: dict[str, MetricValue] = {
                    k: v for k, v in r.metrics.items() if k not in claimed
                }
                if rest:
                    default.append(Reading(r.device_id, r.ts, rest, r.origin, r.tags, r.priority))

        outputs: list[tuple[tuple[str, ...] | None, list[Reading]]] = []
        releases: list[tuple[str, list[Release]]] = []
        invalid = 0
        commits: list[asyncio.Future[Any]] = []
        ops_before = self.state.ops_queued
        for route in active:
            batch = route.pending
            route.pending = []
            route.received.add(len(batch), memo.total(batch))
            try:
                out = self._run(route, 0, batch, now, memo)
            except Exception as e:
                # A step bug or an input no step foresaw must not take the
                # adapter down: these readings are refused for this route,
                # counted and logged, like invalid ones.
                out = []
                self._step_failed(route, e, len(batch))
                invalid += len(batch)
            if out:
                route.sent.add(len(out), memo.total(out))
                outputs.append((route.sinks, out))
            for slot in route.slots:
                ctx = slot.ctx
                if ctx.commits:
                    commits.extend(ctx.commits)
                    ctx.commits.clear()
                if ctx.invalid:
                    invalid += ctx.invalid
                    ctx.invalid = 0
                if ctx.quarantine:
                    q = ctx.quarantine
                    ctx.quarantine = []
                    outputs.append(((slot.step.params.quarantine,), q))
            for _, step in route.holding:
                rel = step.take_releases()
                if rel:
                    releases.append((step.ctx.step_id, rel))
        if default:
            self.default.add(len(default), memo.total(default))
            outputs.append((self.default_sinks, default))
        ok = (
            IngestStatus.REJECTED_INVALID
            if invalid and invalid == pairs and not default
            else IngestStatus.ACCEPTED
        )
        futs = self._store(outputs, memo)
        futs.extend(commits)
        if (
            len(futs) == 1
            and not releases
            and ok is IngestStatus.ACCEPTED
            and self.state.ops_queued == ops_before
        ):
            # The outbox's own future says it all: nothing to release; step
            # memory to undo only if the outbox refuses.
            if any(route.forgets for route in active):
                futs[0].add_done_callback(lambda f: self._forget_if_refused(f, active, readings))
            return futs[0]
        if self.state.ops_queued != ops_before:
            sfut = self.state.commit_future()
            if sfut is not None:
                if not futs and not releases and ok is IngestStatus.ACCEPTED:
                    # Only absorbed: the state commit's shared future is the answer.
                    return sfut
                futs.append(sfut)
        if not futs and not releases:
            fut = loop.create_future()
            fut.set_result(ok)
            return fut
        return self._join(futs, ok, releases, active, readings, None)

    def _forget_if_refused(
        self, fut: asyncio.Future[Any], routes: list[_Route], readings: Sequence[Reading]
    ) -> None:
        if (
            fut.cancelled()
            or fut.exception() is not None
            or fut.result() is not IngestStatus.ACCEPTED
        ):
            self._forget(routes, readings)

    def _forget(self, routes: list[_Route], readings: Sequence[Reading]) -> None:
        """Steps must not take the device's resend for a repeat of what was refused."""
        devices = {r.device_id for r in readings}
        for route in routes:
            for slot in route.slots:
                for d in devices:
                    slot.step.forget(d)

    def _step_failed(self, route: _Route, e: Exception, n: int) -> None:
        route.failures += n
        t = time.monotonic()
        if t - self._last_failure_log >= FAILURE_LOG_INTERVAL:
            self._last_failure_log = t
            log.error(
                "route %s failed on %d readings: %r",
                route.name,
                n,
                e,
                exc_info=e,
                extra={"fields": {"route": route.name, "readings": n}},
            )

    def _run(
        self, route: _Route, start: int, batch: list[Reading], now: float, memo: _Memo
    ) -> list[Reading]:
        slots = route.slots
        n = len(batch)
        nbytes = memo.total(batch) if start < len(slots) else 0
        for i in range(start, len(slots)):
            if not batch:
                break
            slot = slots[i]
            slot.inp.add(n, nbytes)
            batch = slot.step.apply(batch, now)
            n = len(batch)
            nbytes = memo.total(batch)
            slot.out.add(n, nbytes)
        return batch

    def _store(
        self, outputs: list[tuple[tuple[str, ...] | None, list[Reading]]], memo: _Memo
    ) -> list[asyncio.Future[Any]]:
        futs: list[asyncio.Future[Any]] = []
        by_sinks: dict[tuple[str, ...] | None, list[Reading]] = {}
        for sinks, rs in outputs:
            prev = by_sinks.get(sinks)
            if prev is None:
                by_sinks[sinks] = rs
            else:
                prev.extend(rs)
        for sinks, rs in by_sinks.items():
            flow = self.sent_by_sinks.get(sinks)
            if flow is None:
                flow = self.sent_by_sinks[sinks] = Flow()
            flow.add(len(rs), memo.total(rs))
            futs.append(self.outbox.submit(rs, sinks))
        return futs

    def _join(
        self,
        futs: list[asyncio.Future[Any]],
        ok: IngestStatus,
        releases: list[tuple[str, list[Release]]],
        routes: list[_Route],
        readings: Sequence[Reading],
        retry: tuple[_Route, list[Reading]] | None,
    ) -> asyncio.Future[IngestStatus]:
        """One future for several commits; apply ``releases`` once all succeeded."""
        assert self._loop is not None
        outer: asyncio.Future[IngestStatus] = self._loop.create_future()
        remaining = len(futs)
        failure: list[BaseException | IngestStatus] = []

        def finish() -> None:
            if failure:
                first = failure[0]
                if routes:
                    self._forget(routes, readings)
                if retry is not None:
                    self._retry.append((retry[0], retry[1], releases))
                elif releases:
                    log.warning(
                        "windows closed but not stored (%s); the state store keeps their "
                        "readings and they are emitted again at the next start",
                        first,
                    )
                if isinstance(first, IngestStatus):
                    outer.set_result(first)
                else:
                    self.failed_commits += 1
                    outer.set_exception(first)
                return
            for step_id, rel in releases:
                self.state.release(step_id, rel)
            outer.set_result(ok)

        def one_done(f: asyncio.Future[Any]) -> None:
            nonlocal remaining
            remaining -= 1
            if f.cancelled():
                failure.append(asyncio.CancelledError())
            elif f.exception() is not None:
                failure.append(f.exception())  # type: ignore[arg-type]
            else:
                res = f.result()
                if isinstance(res, IngestStatus) and res is not IngestStatus.ACCEPTED:
                    failure.append(res)
            if remaining == 0 and not outer.done():
                finish()

        if not futs:
            finish()
            return outer
        for f in futs:
            f.add_done_callback(one_done)
        self._inflight.add(outer)
        outer.add_done_callback(self._inflight.discard)
        return outer

    # -- timers ---------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Emit what holding steps have due at ``now`` (default: the clock)."""
        if self._closed:
            return
        if now is None:
            now = self.clock()
        retry, self._retry = self._retry, []
        memo = _Memo()
        for route, rs, held_releases in retry:
            futs = self._store([(route.sinks, rs)], memo)
            self._join(futs, IngestStatus.ACCEPTED, held_releases, [], (), (route, rs))
        for route in self.routes:
            if not route.holding:
                continue
            ops_before = self.state.ops_queued
            out: list[Reading] = []
            for i, step in route.holding:
                emitted = step.tick(now)
                if not emitted:
                    continue
                slot = route.slots[i]
                slot.out.add(len(emitted), memo.total(emitted))
                out.extend(self._run(route, i + 1, emitted, now, memo))
            releases = [
                (step.ctx.step_id, rel)
                for _, step in route.holding
                if (rel := step.take_releases())
            ]
            commits: list[asyncio.Future[Any]] = []
            for slot in route.slots:
                if slot.ctx.commits:
                    commits.extend(slot.ctx.commits)
                    slot.ctx.commits.clear()
            if not out and not releases and not commits:
                continue
            if out:
                route.sent.add(len(out), memo.total(out))
            futs = self._store([(route.sinks, out)], memo) if out else []
            futs.extend(commits)
            if self.state.ops_queued != ops_before:
                sfut = self.state.commit_future()
                if sfut is not None:
                    futs.append(sfut)
            self._join(futs, IngestStatus.ACCEPTED, releases, [], (), (route, out))

    # -- figures --------------------------------------------------------------

    def _size_pending(self) -> None:
        """Count the bytes of the pass-through batches taken since the last
        call (readings are immutable once built: :class:`Reading`)."""
        unsized, self._unsized = self._unsized, []
        self._unsized_n = 0
        if not unsized:
            return
        nbytes = readings_size(list(chain.from_iterable(unsized)))
        for flow in (self.received, self.default, self._default_flow):
            flow.bytes += nbytes

    def report(self) -> dict[str, Any]:
        """Readings and bytes in and out, per route, step and sink, with the
        outbox's counters per sink: ``stats.json`` (``edgeway stats``) and the
        pipeline in ``/api/status``. The figures exported as metrics are
        :meth:`stats`."""
        self._size_pending()
        routes = []
        for route in self.routes:
            steps = []
            for slot in route.slots:
                entry: dict[str, Any] = {
                    "step": slot.ctx.step_id,
                    "in": {"readings": slot.inp.readings, "bytes": slot.inp.bytes},
                    "out": {"readings": slot.out.readings, "bytes": slot.out.bytes},
                }
                if slot.ctx.rejects:
                    entry["dropped"] = dict(slot.ctx.rejects)
                if slot.ctx.errors:
                    entry["errors"] = slot.ctx.errors
                steps.append(entry)
            routes.append(
                {
                    "name": route.name,
                    "sinks": list(route.sinks) if route.sinks is not None else None,
                    "received": {
                        "readings": route.received.readings,
                        "bytes": route.received.bytes,
                    },
                    "sent": {"readings": route.sent.readings, "bytes": route.sent.bytes},
                    "failed": route.failures,
                    "steps": steps,
                }
            )
        per_sink = {
            name: {"readings": f.readings, "bytes": f.bytes}
            for name, f in self._sent_per_sink().items()
        }
        sent = self._sent_total()
        counters_fn = getattr(self.outbox, "counters", None)
        outbox_counters = counters_fn() if callable(counters_fn) else {}
        sinks_out = {
            name: {"sent": v, "outbox": outbox_counters.get(name, {})}
            for name, v in per_sink.items()
        }
        return {
            "at": time.time(),
            "since": self.started,
            "received": {"readings": self.received.readings, "bytes": self.received.bytes},
            "sent": {"readings": sent.readings, "bytes": sent.bytes},
            "default_route": {"readings": self.default.readings, "bytes": self.default.bytes},
            "rejected_full": self.rejected_full,
            "routes": routes,
            "sinks": sinks_out,
            "state": {"journal_rows": self.state.rows, "commits": self.state.commits},
        }

    def _sent_per_sink(self) -> dict[str, Flow]:
        all_sinks = list(self.outbox.sink_names)
        per_sink = {s: Flow() for s in all_sinks}
        for sinks, flow in self.sent_by_sinks.items():
            for s in sinks if sinks is not None else all_sinks:
                if s in per_sink:
                    per_sink[s].add(flow.readings, flow.bytes)
        return per_sink

    def _sent_total(self) -> Flow:
        sent = Flow()
        for flow in self.sent_by_sinks.values():
            sent.add(flow.readings, flow.bytes)
        return sent

    # ---------------------------------------------------------- as a component

    @property
    def name(self) -> str:
        return "pipeline"

    async def start(self) -> None:
        """:meth:`open`: restore journaled windows and start the timers."""
        await self.open()

    async def stop(self, grace: float) -> None:
        """:meth:`close`; emissions in flight are waited for (they carry
        readings devices were told are stored), the wait warned about past
        ``grace`` seconds."""
        await finish_closing(self.close(), "pipeline", grace)

    def health(self) -> Health:
        """Always healthy: a step that fails is counted per route, never stops the flow."""
        return HEALTHY

    def stats(self) -> PipelineStats:
        """Readings and bytes in and out, per route and per sink."""
        self._size_pending()
        sent = self._sent_total()
        return PipelineStats(
            received_readings=self.received.readings,
            received_bytes=self.received.bytes,
            sent_readings=sent.readings,
            sent_bytes=sent.bytes,
            default_route_readings=self.default.readings,
            rejected_full=self.rejected_full,
            routes=[
                RouteStats(
                    name=route.name,
                    received_readings=route.received.readings,
                    sent_readings=route.sent.readings,
                    received_bytes=route.received.bytes,
                    sent_bytes=route.sent.bytes,
                    failed=route.failures,
                )
                for route in self.routes
            ],
            sinks={
                name: SinkFlowStats(f.readings, f.bytes)
                for name, f in self._sent_per_sink().items()
            },
        )

    def _write_stats(self, stats: dict[str, Any]) -> None:
        path = self.data_dir / STATS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(stats, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)
