"""The alarm service: one alarm per (source, type), journaled, timed.

Configuration (defaults shown; see docs/alarms.md)::

    alarms:
      max_alarms: 10000        # alarms kept at once
      max_shelve: 8h           # longest timed shelving
      standing_after: 24h      # active longer than this: a standing alarm
      flood_threshold: 10      # more alarms than this in 10 minutes: a flood
      defaults: {latching: false, require_confirm: false}
      types:
        high_temperature: {latching: true}

Rules (``raise_alarm``/``clear_alarm``), the admin API and the CLI all come
here. What it promises:

* **One alarm per (source, type)**, however many callers race: every change
  of a key runs under that key's lock, from reading the state to storing the
  new one, so there is no read-then-write window (ThingsBoard #5652 raised
  duplicates from two messages milliseconds apart). A raise of an alarm
  already active is a no-op (or a ``severity`` transition when the severity or
  message changed).
* **Journaled before reported**: every transition is committed to
  ``DATA_DIR/alarms.db`` (the current state and the transition, one
  transaction) before the caller's await returns, before it is logged, and
  before it is handed to the sinks. The state is rebuilt from the journal at
  start; timed shelvings resume from their stored (wall-clock) deadlines and
  one that ended while the gateway was down ends at start.
* **Sinks, ahead of telemetry**: each transition goes to the outbox as a
  record tagged ``record_type: alarm`` in the priority lane (priority 1-5 by
  severity band). A transition is marked sent once the outbox has it on disk;
  one that was not (a crash in between) is sent again at start; every record
  carries ``alarm_id`` and ``transition`` (its number in the journal), so the
  cloud can drop a duplicate.
* **Timers**: a timed shelving ends by itself within a few milliseconds of its
  deadline (the timer sleeps until the next one, at most 1 s at a time).
* Illegal transitions (ack of an acknowledged alarm, ...) raise
  :class:`~edgeway.alarms.model.AlarmError` with code ``illegal`` and say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import logging
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from edgeway.alarms.health import AlarmHealth, HealthFigures
from edgeway.alarms.model import (
    BY_MAX,
    SIMPLE_ACTIONS,
    Action,
    Alarm,
    AlarmError,
    Event,
    Options,
    Transition,
    apply,
    check_key,
    check_text,
)
from edgeway.ingest import IngestStatus
from edgeway.reading import Origin, Reading
from edgeway.storage.sqlite import Database

if TYPE_CHECKING:
    from edgeway.config import AlarmsSection

log = logging.getLogger(__name__)

TIMER_MAX_SLEEP = 1.0
"""Longest the timer sleeps: bounds the error of a shelving's end after the
wall clock jumps, and how stale the flood state may get."""
PURGE_EVERY = 300.0
"""Seconds between purges of transitions past ``alarms.history``."""
HISTORY_MAX = 1000
"""Most transitions one history read returns (about 1 KB each as JSON)."""
VALUES_MAX_BYTES = 4096
"""Largest JSON of the ``values`` a raise carries (the readings behind it)."""
RESEND_MAX = 10_000
"""Transitions waiting to be stored for the sinks kept in memory for retries
(and taken back per start); beyond it the oldest wait for the next start in
the journal (marked unsent), so an outbox that refuses for long costs no
unbounded memory."""

SCHEMA_V1 = """
CREATE TABLE alarms(
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (source, type)
) WITHOUT ROWID;
CREATE TABLE transitions(
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    alarm_id TEXT NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    action TEXT NOT NULL,
    by TEXT NOT NULL,
    comment TEXT NOT NULL,
    activated INTEGER NOT NULL,
    emitted INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE INDEX transitions_key ON transitions(source, type, seq);
CREATE INDEX transitions_unsent ON transitions(seq) WHERE emitted = 0;
CREATE INDEX transitions_activated ON transitions(at) WHERE activated = 1;
"""

Numbered = list[tuple[int, Transition]]
"""Transitions with their journal sequence numbers."""
Records = list["TransitionRecord"]
# (Aliases: inside AlarmService the name ``list`` is its method.)

ListState = Literal["shown", "all", "active", "unacked", "shelved", "suppressed", "out_of_service"]
LIST_STATES: tuple[str, ...] = ListState.__args__  # type: ignore[attr-defined]


@dataclass(slots=True)
class AlarmStats:
    """Counters and gauges of the alarm service (admin API, metrics)."""

    transitions: int = 0
    annunciated: int = 0
    """Alarms gone active while not hidden (what the health figures count)."""
    refused_full: int = 0
    refused_illegal: int = 0
    refused_invalid: int = 0
    alarms: int = 0
    """Alarms kept now (any state but normal)."""
    active: int = 0
    unacked: int = 0
    shelved: int = 0
    suppressed: int = 0
    out_of_service: int = 0


@dataclass(slots=True)
class TransitionRecord:
    """One journaled transition, as ``history`` lists it."""

    seq: int
    at: float
    alarm_id: str
    action: str
    by: str
    comment: str
    state: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _KeyLock:
    """A lock for one (source, type) and the number of callers holding or
    waiting for it, so it can be dropped when nobody needs it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class AlarmService:
    """The alarms of one gateway; see the module docstring."""

    def __init__(
        self,
        data_dir: Path,
        config: AlarmsSection,
        *,
        emit: Callable[[Sequence[Reading]], Any] | None = None,
        durability: Literal["fsync", "os"] = "fsync",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.db = Database(
            data_dir / "alarms.db", migrations=[SCHEMA_V1], durability=durability, name="alarms"
        )
        self.stats = AlarmStats()
        self.health = AlarmHealth(config.flood_threshold)
        self._emit = emit
        self._clock = clock
        self._alarms: dict[tuple[str, str], Alarm] = {}
        self._locks: dict[tuple[str, str], _KeyLock] = {}
        self._deadlines: list[tuple[float, str, str]] = []
        self._next_seq = 1
        self._sent: list[int] = []
        """Transitions the outbox has on disk, to mark in the journal."""
        self._unsent: deque[tuple[int, Transition]] = deque(maxlen=RESEND_MAX)
        """Transitions the outbox did not take (not open yet, full, failing):
        offered again at every timer turn."""
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_purge = 0.0
        self._closed = False
        self._listeners: list[Callable[[Transition], None]] = []

    # --------------------------------------------------------------- lifetime

    async def open(self) -> None:
        """Open the journal, take back every alarm and what the sinks did not
        get yet (offered at the timer's first turn), start the timer."""
        await self.db.open()
        now = self._clock()

        def load(
            conn: sqlite3.Connection,
        ) -> tuple[int, list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM transitions").fetchone()[0]
            states = conn.execute("SELECT state FROM alarms").fetchall()
            unsent = conn.execute(
                "SELECT seq, action, by, comment, at, state FROM transitions "
                "WHERE emitted = 0 ORDER BY seq LIMIT ?",
                (RESEND_MAX,),
            ).fetchall()
            recent = conn.execute(
                "SELECT at, source, type FROM transitions "
                "WHERE activated = 1 AND at > ? ORDER BY seq",
                (now - 24 * 3600.0,),
            ).fetchall()
            return int(top), states, unsent, recent

        top, states, unsent, recent = await self.db.read(load)
        self._next_seq = top + 1
        for (state,) in states:
            alarm = Alarm.from_json(orjson.loads(state))
            self._alarms[(alarm.source, alarm.type)] = alarm
            self._schedule(alarm)
            self._tally(alarm, 1)
        for at, source, type_ in recent:
            self.health.annunciated(source, type_, at)
        for seq, action, by, comment, at, state in unsent:
            alarm = Alarm.from_json(orjson.loads(state))
            # Offered at the timer's first turn: the outbox may open after us.
            self._unsent.append((seq, Transition(Action(action), by, at, comment, alarm)))
        self._timer = asyncio.create_task(self._timer_loop(), name="alarms:timer")
        if states or unsent:
            log.info(
                "alarms: %d taken back from the journal, %d transitions sent again",
                len(states),
                len(unsent),
            )

    async def close(self) -> None:
        """Stop the timer; finish transitions in progress; close the journal."""
        self._closed = True
        if self._timer is not None:
            # Woken, it sees _closed and returns; cancelled only if it does not
            # (a cancellation racing wait_for's own timeout can be lost on 3.11).
            self._wake.set()
            done, _ = await asyncio.wait({self._timer}, timeout=TIMER_MAX_SLEEP)
            if not done:
                self._timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._timer
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_sent()
        await self.db.close()

    # ---------------------------------------------------------------- callers

    async def raise_alarm(
        self,
        source: str,
        type: str,
        *,
        severity: int,
        message: str,
        by: str,
        values: dict[str, Any] | None = None,
    ) -> Alarm:
        """The alarm (source, type) is active: a new one, or the one already
        active (with ``severity``/``message`` updated if they changed)."""
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 1000:
            self.stats.refused_invalid += 1
            raise AlarmError("invalid", f"severity must be an integer 1-1000, got {severity!r}")
        check_text(message, "message")
        if values is not None:
            if not isinstance(values, dict):
                raise AlarmError("invalid", "values must be a JSON object")
            try:
                size = len(orjson.dumps(values))
            except TypeError as e:
                raise AlarmError("invalid", f"values are not JSON: {e}") from None
            if size > VALUES_MAX_BYTES:
                raise AlarmError("invalid", f"values are larger than {VALUES_MAX_BYTES} bytes")
        event = Event(
            Action.RAISE, by, self._clock(), severity=severity, message=message, values=values
        )
        alarm, _ = await self._change(source, type, event)
        assert alarm is not None
        return alarm

    async def clear_alarm(
        self, source: str, type: str, *, by: str, message: str = ""
    ) -> Alarm | None:
        """The condition of (source, type) returned to normal. Returns the
        alarm after it (a latching one stays active, latched, until reset),
        or None when there was no such alarm."""
        kept, last = await self._change(
            source, type, Event(Action.CLEAR, by, self._clock(), message)
        )
        return kept if kept is not None else last

    async def ack(self, source: str, type: str, *, by: str, comment: str = "") -> Alarm:
        """Acknowledge the alarm's occurrence (illegal when acknowledged)."""
        return await self._operator(source, type, Action.ACK, by, comment)

    async def confirm(self, source: str, type: str, *, by: str, comment: str = "") -> Alarm:
        """Confirm an acknowledged occurrence (types with ``require_confirm``)."""
        return await self._operator(source, type, Action.CONFIRM, by, comment)

    async def reset(self, source: str, type: str, *, by: str, comment: str = "") -> Alarm:
        """Reset a latched alarm (its condition cleared): it goes inactive."""
        return await self._operator(source, type, Action.RESET, by, comment)

    async def shelve(
        self,
        source: str,
        type: str,
        *,
        by: str,
        comment: str = "",
        duration: float | None = None,
        one_shot: bool = False,
    ) -> Alarm:
        """Shelve for ``duration`` seconds (at most ``alarms.max_shelve``), or
        ``one_shot`` until the alarm next goes inactive (an active alarm only).
        Shelving a shelved alarm replaces its shelving."""
        if one_shot == (duration is not None):
            raise AlarmError("invalid", "shelve needs either a duration or one-shot")
        until: float | None = None
        now = self._clock()
        if duration is not None:
            if not 0 < duration <= self.config.max_shelve:
                raise AlarmError(
                    "invalid",
                    f"shelving time must be above 0 and at most alarms.max_shelve "
                    f"({self.config.max_shelve:g} s)",
                )
            until = now + duration
        kind: Literal["timed", "one_shot"] = "one_shot" if one_shot else "timed"
        event = Event(Action.SHELVE, by, now, comment, shelve_kind=kind, until=until)
        return await self._operator_event(source, type, event)

    async def unshelve(self, source: str, type: str, *, by: str, comment: str = "") -> Alarm:
        return await self._operator(source, type, Action.UNSHELVE, by, comment)

    async def suppress(self, source: str, type: str, *, by: str, comment: str = "") -> Alarm:
        """Suppressed by design (a unit shut down): hidden, still journaled."""
        return await self._operator(source, type, Action.SUPPRESS, by, comment)

    async def unsuppress(self, source: str, type: str, *, by: str, comment: str = "") -> Alarm:
        return await self._operator(source, type, Action.UNSUPPRESS, by, comment)

    async def remove_from_service(
        self, source: str, type: str, *, by: str, comment: str = ""
    ) -> Alarm:
        """Out of service (maintenance): hidden, still journaled."""
        return await self._operator(source, type, Action.OUT_OF_SERVICE, by, comment)

    async def return_to_service(
        self, source: str, type: str, *, by: str, comment: str = ""
    ) -> Alarm:
        return await self._operator(source, type, Action.IN_SERVICE, by, comment)

    async def act(
        self, action: Action, source: str, type: str, *, by: str, comment: str = ""
    ) -> Alarm | None:
        """An operator action by name (the API); shelve has its own method."""
        if action is Action.CLEAR:
            return await self.clear_alarm(source, type, by=by, message=comment)
        if action not in SIMPLE_ACTIONS and action is not Action.COMMENT:
            raise AlarmError("invalid", f"{action.value} is not a simple operator action")
        return await self._operator(source, type, action, by, comment)

    def add_listener(self, fn: Callable[[Transition], None]) -> None:
        """Call ``fn`` with every transition once it is journaled (the HMI's
        live view, tests waiting for a timer). It must not block."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Transition], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def get(self, source: str, type: str) -> Alarm | None:
        """The alarm (source, type) now, or None when it is normal."""
        return self._alarms.get((source, type))

    def list(
        self, *, state: str = "shown", source: str | None = None, limit: int = 1000
    ) -> list[Alarm]:
        """Alarms, most severe first, then most recent. ``state``: ``shown``
        (what an operator sees: not shelved, suppressed or out of service),
        ``all``, ``active``, ``unacked``, ``shelved``, ``suppressed``,
        ``out_of_service``."""
        test = _FILTERS.get(state)
        if test is None:
            raise AlarmError("invalid", f"state must be one of {', '.join(LIST_STATES)}")
        found = [
            a for a in self._alarms.values() if test(a) and (source is None or a.source == source)
        ]
        found.sort(key=lambda a: (-a.severity, -(a.active_since or 0.0), a.source, a.type))
        return found[: max(limit, 0)]

    async def history(self, source: str, type: str, limit: int = 100) -> Records:
        """The latest transitions of (source, type), newest first."""
        check_key(source, type)
        limit = min(max(limit, 1), HISTORY_MAX)
        rows = await self.db.read(
            lambda conn: conn.execute(
                "SELECT seq, at, alarm_id, action, by, comment, state FROM transitions "
                "WHERE source = ? AND type = ? ORDER BY seq DESC LIMIT ?",
                (source, type, limit),
            ).fetchall()
        )
        return [
            TransitionRecord(seq, at, aid, action, by, comment, orjson.loads(state))
            for seq, at, aid, action, by, comment, state in rows
        ]

    def figures(self) -> HealthFigures:
        """The alarm-system health figures now."""
        return self.health.figures(self._clock(), self._alarms.values(), self.config.standing_after)

    def status(self) -> dict[str, Any]:
        """Counters and health figures (``/api/status``, ``/metrics``)."""
        return {**dataclasses.asdict(self.stats), "health": dataclasses.asdict(self.figures())}

    # ------------------------------------------------------------ transitions

    async def _operator(
        self, source: str, type: str, action: Action, by: str, comment: str
    ) -> Alarm:
        return await self._operator_event(source, type, Event(action, by, self._clock(), comment))

    async def _operator_event(self, source: str, type: str, event: Event) -> Alarm:
        kept, last = await self._change(source, type, event)
        # Normal again (an ack of an inactive alarm): its last state.
        alarm = kept if kept is not None else last
        assert alarm is not None  # an operator action on nothing is refused
        return alarm

    async def _change(
        self,
        source: str,
        type: str,
        event: Event,
        only_if: Callable[[Alarm | None], bool] | None = None,
    ) -> tuple[Alarm | None, Alarm | None]:
        """Apply ``event`` to (source, type) under the key's lock; returns the
        alarm kept after it (None: normal, forgotten) and its last state.
        ``only_if``: a test of the state, under the lock; false: no change."""
        if self._closed:
            raise AlarmError("disabled", "the alarm service is stopped")
        try:
            check_key(source, type)
            check_text(event.by, "by", BY_MAX)
            check_text(event.comment, "comment")
            if not event.by:
                raise AlarmError("invalid", "by (who asked) is required")
        except AlarmError:
            self.stats.refused_invalid += 1
            raise
        # Shielded: once the change started it finishes (journal, memory,
        # sinks) even if the caller is cancelled, so the two never disagree.
        return await asyncio.shield(self._start_change((source, type), event, only_if))

    def _start_change(
        self,
        key: tuple[str, str],
        event: Event,
        only_if: Callable[[Alarm | None], bool] | None = None,
    ) -> asyncio.Task[tuple[Alarm | None, Alarm | None]]:
        """The change as a task the service owns (close() waits for it)."""
        task = asyncio.get_running_loop().create_task(self._locked_change(key, event, only_if))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _locked_change(
        self,
        key: tuple[str, str],
        event: Event,
        only_if: Callable[[Alarm | None], bool] | None,
    ) -> tuple[Alarm | None, Alarm | None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                current = self._alarms.get(key)
                if only_if is not None and not only_if(current):
                    return current, current
                # Stamped under the lock, so a key's journal is in time order.
                return await self._apply(key, dataclasses.replace(event, at=self._clock()))
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[key]

    async def _apply(self, key: tuple[str, str], event: Event) -> tuple[Alarm | None, Alarm | None]:
        current = self._alarms.get(key)
        options = self._options(key[1])
        try:
            new, transitions = apply(current, key[0], key[1], event, options, _new_id)
        except AlarmError:
            self.stats.refused_illegal += 1
            raise
        if current is None and new is not None and len(self._alarms) >= self.config.max_alarms:
            # A raise, or a shelve/suppress of an alarm not kept yet: either
            # would take memory beyond the bound.
            self.stats.refused_full += 1
            raise AlarmError(
                "full",
                f"{len(self._alarms)} alarms are kept (alarms.max_alarms): "
                f"{event.action.value} of {key[0]}/{key[1]} refused",
            )
        if not transitions:
            return current, current
        numbered: list[tuple[int, Transition]] = []
        for t in transitions:
            seq = self._next_seq
            self._next_seq += 1
            numbered.append(
                (seq, dataclasses.replace(t, alarm=dataclasses.replace(t.alarm, seq=seq)))
            )
        final = numbered[-1][1].alarm
        kept = None if new is None else final
        await self.db.write(lambda conn: _journal(conn, key, kept, numbered))
        # Committed: now it may be known.
        self._tally(current, -1)
        if kept is None:
            self._alarms.pop(key, None)
        else:
            self._alarms[key] = kept
            self._schedule(kept)
        self._tally(kept, 1)
        for _, t in numbered:
            self.stats.transitions += 1
            if t.activated and not t.alarm.hidden:
                self.stats.annunciated += 1
                self.health.annunciated(key[0], key[1], t.at)
            _log_transition(t)
            for fn in self._listeners:
                try:
                    fn(t)
                except Exception:
                    log.exception("alarm listener failed")
        self._emit_transitions(numbered)
        return kept, final

    def _options(self, type: str) -> Options:
        cfg = self.config.types.get(type, self.config.defaults)
        return Options(latching=cfg.latching, require_confirm=cfg.require_confirm)

    def _tally(self, alarm: Alarm | None, sign: int) -> None:
        """Add (1) or take away (-1) an alarm's part of the state gauges."""
        if alarm is None:
            return
        s = self.stats
        s.alarms += sign
        s.active += sign * alarm.active
        s.unacked += sign * (not alarm.acked)
        s.shelved += sign * (alarm.shelving is not None)
        s.suppressed += sign * alarm.suppressed
        s.out_of_service += sign * alarm.out_of_service

    # ------------------------------------------------------------------ sinks

    def _emit_transitions(self, numbered: Numbered) -> None:
        if self._emit is None:
            self._sent.extend(seq for seq, _ in numbered)
            return
        readings = [_record(seq, t) for seq, t in numbered]
        try:
            fut = self._emit(readings)
        except Exception as e:
            self._not_stored(numbered, str(e) or type(e).__name__)
            return
        if isinstance(fut, asyncio.Future):
            fut.add_done_callback(lambda f: self._stored(f, numbered))
        else:
            self._sent.extend(seq for seq, _ in numbered)

    def _stored(self, fut: asyncio.Future[Any], numbered: Numbered) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self._not_stored(numbered, "cancelled" if fut.cancelled() else str(fut.exception()))
        elif fut.result() in (None, IngestStatus.ACCEPTED):
            self._sent.extend(seq for seq, _ in numbered)
            self._wake.set()
        else:
            self._not_stored(numbered, f"the outbox answered {fut.result()}")

    def _not_stored(self, numbered: Numbered, why: str) -> None:
        """Keep for a retry at the next timer turn (they stay unsent in the
        journal, so a restart offers them again too)."""
        if not self._unsent:  # one line per outage, not per transition
            log.warning("alarm records not stored for the sinks yet (%s); retrying", why)
        self._unsent.extend(numbered)

    def _offer_unsent(self) -> None:
        if self._unsent and self._emit is not None:
            pending = list(self._unsent)
            self._unsent.clear()
            self._emit_transitions(pending)

    async def _flush_sent(self) -> None:
        if not self._sent:
            return
        seqs, self._sent = self._sent, []

        def mark(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE transitions SET emitted = 1 WHERE seq = ?", [(s,) for s in seqs]
            )

        try:
            await self.db.write(mark)
        except Exception as e:  # sent again at start: a duplicate, never a loss
            log.warning("alarm records not marked sent: %s", e)

    # ----------------------------------------------------------------- timers

    def _schedule(self, alarm: Alarm) -> None:
        sh = alarm.shelving
        if sh is not None and sh.until is not None:
            heapq.heappush(self._deadlines, (sh.until, alarm.source, alarm.type))
            self._wake.set()

    async def _timer_loop(self) -> None:
        while not self._closed:
            now = self._clock()
            wait = TIMER_MAX_SLEEP
            if self._deadlines:
                wait = min(max(self._deadlines[0][0] - now, 0.0), wait)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            if self._closed:
                return
            try:
                self._expire(self._clock())
                self.health.tick(self._clock())
                self._offer_unsent()
                await self._flush_sent()
                now = self._clock()
                if now - self._last_purge >= PURGE_EVERY:
                    self._last_purge = now
                    await self._purge(now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alarm timer failed")
                await asyncio.sleep(TIMER_MAX_SLEEP)

    def _expire(self, now: float) -> None:
        """End the timed shelvings whose deadline passed."""
        deadlines = self._deadlines
        due: list[tuple[str, str, float]] = []
        while deadlines and deadlines[0][0] <= now:
            until, source, type_ = heapq.heappop(deadlines)
            alarm = self._alarms.get((source, type_))
            sh = None if alarm is None else alarm.shelving
            if sh is None or sh.until != until:
                continue  # unshelved or shelved again meanwhile
            due.append((source, type_, until))
        for source, type_, until in due:
            # Not awaited: the timer goes on to the next deadline while these
            # commit (with fsync a commit can take 100 ms on a busy disk).
            task = self._start_change(
                (source, type_),
                Event(Action.UNSHELVE, "system", now, "shelving time ended"),
                functools.partial(_shelved_until, until=until),
            )
            task.add_done_callback(functools.partial(self._expired, source, type_, until))

    def _expired(self, source: str, type_: str, until: float, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        e = task.exception()
        if e is not None and not isinstance(e, AlarmError):
            log.error("alarm %s/%s: shelving not ended: %s", source, type_, e)
            heapq.heappush(self._deadlines, (until, source, type_))  # the next turn

    async def _purge(self, now: float) -> None:
        cutoff = now - self.config.history
        keep = self.config.max_history

        def purge(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM transitions WHERE at < ? AND emitted = 1", (cutoff,))
            count = conn.execute("SELECT COUNT(*) FROM transitions").fetchone()[0]
            if count > keep:
                conn.execute(
                    "DELETE FROM transitions WHERE seq IN "
                    "(SELECT seq FROM transitions ORDER BY seq LIMIT ?)",
                    (count - keep,),
                )

        await self.db.write(purge)


_FILTERS: dict[str, Callable[[Alarm], bool]] = {
    "shown": lambda a: not a.hidden and not a.normal,
    "all": lambda a: True,
    "active": lambda a: a.active,
    "unacked": lambda a: not a.acked,
    "shelved": lambda a: a.shelving is not None,
    "suppressed": lambda a: a.suppressed,
    "out_of_service": lambda a: a.out_of_service,
}


def _shelved_until(alarm: Alarm | None, *, until: float) -> bool:
    """Still shelved with this deadline (not unshelved or shelved again)."""
    return alarm is not None and alarm.shelving is not None and alarm.shelving.until == until


def _new_id() -> str:
    return uuid.uuid4().hex


def _journal(
    conn: sqlite3.Connection,
    key: tuple[str, str],
    kept: Alarm | None,
    numbered: list[tuple[int, Transition]],
) -> None:
    conn.executemany(
        "INSERT INTO transitions(seq, at, alarm_id, source, type, action, by, comment, "
        "activated, emitted, state) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
        [
            (
                seq,
                t.at,
                t.alarm.id,
                key[0],
                key[1],
                t.action.value,
                t.by,
                t.comment,
                int(t.activated and not t.alarm.hidden),
                orjson.dumps(t.alarm.to_json()),
            )
            for seq, t in numbered
        ],
    )
    if kept is None:
        conn.execute("DELETE FROM alarms WHERE source = ? AND type = ?", key)
    else:
        conn.execute(
            "INSERT OR REPLACE INTO alarms(source, type, state) VALUES (?,?,?)",
            (key[0], key[1], orjson.dumps(kept.to_json())),
        )


def _record(seq: int, t: Transition) -> Reading:
    """The record a transition becomes for the sinks (priority lane)."""
    a = t.alarm
    metrics: dict[str, Any] = {
        "alarm_id": a.id,
        "alarm_type": a.type,
        "event": t.action.value,
        "transition": seq,
        "severity": a.severity,
        "band": a.band.label,
        "message": a.message,
        "active": a.active,
        "acked": a.acked,
        "confirmed": a.confirmed,
        "latched": a.latched,
        "shelved": a.shelving is not None,
        "suppressed": a.suppressed,
        "out_of_service": a.out_of_service,
        "by": t.by,
        "comment": t.comment,
        "count": a.count,
    }
    if a.values:
        metrics["values"] = orjson.dumps(a.values).decode()
    return Reading(
        a.source,
        t.at,
        metrics,
        Origin("alarms", a.type, message_id=f"{a.id}:{seq}"),
        {"record_type": "alarm"},
        priority=a.band.value,
    )


def _log_transition(t: Transition) -> None:
    a = t.alarm
    log.info(
        "alarm %s/%s %s by %s",
        a.source,
        a.type,
        t.action.value,
        t.by,
        extra={
            "fields": {
                "alarm_id": a.id,
                "severity": a.severity,
                "active": a.active,
                "acked": a.acked,
                "comment": t.comment,
            }
        },
    )


__all__ = ["AlarmError", "AlarmService", "AlarmStats", "TransitionRecord"]
