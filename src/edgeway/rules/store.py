"""``DATA_DIR/rules.db``: rule state, transitions and their actions.

What is kept, and why it is enough for "a SIGKILL neither loses nor repeats a
transition":

- ``rule_state``: per (rule, device) whether it is active, since when the
  condition towards the other state holds (a ``for:`` in progress), the
  transition count and the cooldown's end. Times are on the rule clock.
- ``transitions`` and ``actions``: a transition is stored with the new state
  and its actions in one transaction, before any action is carried out.
  After a kill the state says the transition happened (it is not made
  again) and the actions not marked done are carried out at the next start
  (carried out, not lost; a command keeps its idempotency key, so the
  command queue does not queue it twice).
- ``clock``: the rule clock and the wall clock at the last commit, from which
  the clock resumes (:class:`~edgeway.outbox.ageclock.AgeClock`): a ``for:``
  deadline fires at its time after a restart, counting the downtime, while a
  wall-clock jump within a run changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from edgeway.outbox.ageclock import AgeClock
from edgeway.rules.engine import RuleOutput, RuleState
from edgeway.rules.outputs import Action, SendCommand, action_from_json, action_to_json
from edgeway.storage.sqlite import Database, StorageError

log = logging.getLogger(__name__)

DB_NAME = "rules.db"
HISTORY_KEEP = 7 * 86400.0
"""Seconds finished transitions are kept (``edgeway`` reads them for
debugging; the sinks have the records)."""

SCHEMA_V1 = """
CREATE TABLE rule_state(
    rule TEXT NOT NULL,
    device_id TEXT NOT NULL,
    active INTEGER NOT NULL,
    since REAL,
    seq INTEGER NOT NULL,
    cooldown_until REAL NOT NULL,
    PRIMARY KEY (rule, device_id)
) WITHOUT ROWID;
CREATE TABLE transitions(
    id INTEGER PRIMARY KEY,
    rule TEXT NOT NULL,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    doc BLOB NOT NULL,
    UNIQUE (rule, device_id, seq)
);
CREATE TABLE actions(
    id INTEGER PRIMARY KEY,
    transition INTEGER NOT NULL REFERENCES transitions(id) ON DELETE CASCADE,
    doc BLOB NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX actions_waiting ON actions(done) WHERE done = 0;
CREATE TABLE clock(id INTEGER PRIMARY KEY CHECK (id = 1), clock REAL NOT NULL, wall REAL NOT NULL);
"""


@dataclass(slots=True, frozen=True)
class StoredAction:
    """An action as stored: its row id (to mark it done) and what it asks."""

    id: int
    transition_id: str
    action: Action
    replay: bool = False
    """Taken back at start: it may have been carried out before the kill."""


@dataclass(slots=True)
class Loaded:
    """What the store held at start."""

    states: list[tuple[str, str, RuleState]]
    waiting: list[StoredAction]
    clock: float | None
    wall: float | None
    next_ids: tuple[int, int] = (1, 1)
    """The next transition's and action's row id."""


MARK_DELAY = 1.0
"""Seconds an action's "done" mark may wait for the next transition's commit
before it is committed alone. A mark is not on any path (a mark lost to a
kill only means the action is taken up again at the start, with the same
command id and key: not queued twice), and committing one alone would put a
commit ahead of the next transition's, which a command is waiting for."""


@dataclass(slots=True)
class _Piece:
    """One :meth:`RuleStore.write`: its rows and the future of its actions."""

    states: list[tuple[Any, ...]]
    transitions: list[tuple[Any, ...]]
    actions: list[tuple[Any, ...]]
    stored: list[StoredAction]
    clock: tuple[float, float]
    future: asyncio.Future[list[StoredAction]]
    then: Callable[[list[StoredAction] | BaseException], None] | None


@dataclass(slots=True)
class _Batch:
    """What the next commit of ``rules.db`` stores: every write and mark made
    while the commit before it was in progress, in a few ``executemany``
    calls (each SQLite call hands the GIL over and back: with a busy event
    loop that costs up to a switch interval, so the calls per commit are
    kept to a handful, however many writes ride in it)."""

    pieces: list[_Piece] = field(default_factory=list)
    marks: list[tuple[str | None, int]] = field(default_factory=list)
    mark_futures: list[asyncio.Future[None]] = field(default_factory=list)
    taken: bool = False
    """The writer thread began it: what comes now goes into the next batch."""


class RuleStore:
    """The rules' durable state; one :class:`Database` (writer thread), whose
    commits each carry one :class:`_Batch`."""

    def __init__(self, data_dir: Path, durability: Literal["fsync", "os"] = "fsync") -> None:
        self.db = Database(
            Path(data_dir) / DB_NAME, migrations=[SCHEMA_V1], durability=durability, name="rules"
        )
        self.clock: AgeClock | None = None
        self._lock = threading.Lock()
        self._batch: _Batch | None = None
        """The batch not yet taken by the writer thread (None: none queued)."""
        self._marks: list[tuple[str | None, int]] = []
        self._mark_futures: list[asyncio.Future[None]] = []
        self._mark_timer: asyncio.TimerHandle | None = None
        self._next_transition = 1
        self._next_action = 1

    async def open(self) -> Loaded:
        await self.db.open()
        loaded = await self.db.read(_load)
        self._next_transition, self._next_action = loaded.next_ids
        self.clock, _ = AgeClock.resume(loaded.clock, loaded.wall, math.inf)
        return loaded

    async def close(self) -> None:
        self.flush_marks()
        await self.db.close()

    def write(
        self,
        out: RuleOutput,
        then: Callable[[list[StoredAction] | BaseException], None] | None = None,
    ) -> asyncio.Future[list[StoredAction]]:
        """Store ``out`` (states, transitions, actions, the clock) in the next
        commit; the future gives the actions to carry out. ``then`` is called
        with them (or the exception) in the callback that learns of the
        commit, a turn of the event loop before the future's callbacks."""
        assert self.clock is not None
        states = [
            (rule, dev, int(s.active), s.since, s.seq, s.cooldown_until)
            for rule, dev, s in out.states
        ]
        rows: list[tuple[Any, ...]] = []
        action_rows: list[tuple[Any, ...]] = []
        stored: list[StoredAction] = []
        for t in out.transitions:
            # Row ids given here, not by SQLite: the whole batch is a few
            # executemany calls, and the actions' ids are known before the commit.
            tid = self._next_transition
            self._next_transition += 1
            rows.append((tid, t.rule, t.device_id, t.seq, t.state, t.at, orjson.dumps(t.to_json())))
            for a in t.actions:
                a = _with_command_id(a)
                aid = self._next_action
                self._next_action += 1
                action_rows.append((aid, tid, orjson.dumps(action_to_json(a))))
                stored.append(StoredAction(aid, t.id, a))
        fut: asyncio.Future[list[StoredAction]] = asyncio.get_running_loop().create_future()
        piece = _Piece(
            states, rows, action_rows, stored, (self.clock.now(), self.clock.wall()), fut, then
        )
        with self._lock:
            batch = self._open_batch()
            batch.pieces.append(piece)
            self._take_marks(batch)
        return fut

    def mark_done(self, action_id: int, error: str | None) -> asyncio.Future[None]:
        """The action was carried out (``error``: it failed for good). The
        mark rides in the next commit, or is committed within
        :data:`MARK_DELAY` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._marks.append((error, action_id))
            self._mark_futures.append(fut)
            if self._batch is not None:
                self._take_marks(self._batch)
                return fut
        if self._mark_timer is None:
            self._mark_timer = loop.call_later(MARK_DELAY, self.flush_marks)
        return fut

    def flush_marks(self) -> None:
        """Commit the waiting "done" marks now (at close, and :data:`MARK_DELAY`
        after the first of them)."""
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        with self._lock:
            if not self._marks:
                return
            self._take_marks(self._open_batch())

    def _take_marks(self, batch: _Batch) -> None:
        # Under self._lock.
        if self._marks:
            batch.marks.extend(self._marks)
            batch.mark_futures.extend(self._mark_futures)
            self._marks, self._mark_futures = [], []

    def _open_batch(self) -> _Batch:
        """The batch the next commit carries (queued for the writer when new).
        Under self._lock."""
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            self.db.write_then(
                functools.partial(self._commit, batch), functools.partial(_committed, batch)
            )
        return batch

    def _commit(self, batch: _Batch, conn: sqlite3.Connection) -> None:
        """On the writer thread: the batch's rows, in order."""
        with self._lock:
            batch.taken = True
            if self._batch is batch:
                self._batch = None
        pieces = batch.pieces
        if pieces:
            conn.executemany(_UPSERT_STATE, [row for p in pieces for row in p.states])
            rows = [row for p in pieces for row in p.transitions]
            if rows:
                conn.executemany(_INSERT_TRANSITION, rows)
                conn.executemany(_INSERT_ACTION, [row for p in pieces for row in p.actions])
            now, wall = pieces[-1].clock
            _save_clock(conn, now, wall)
        if batch.marks:
            conn.executemany("UPDATE actions SET done = 1, error = ? WHERE id = ?", batch.marks)

    def checkpoint_clock(self) -> asyncio.Future[None]:
        """Store the clock (at close: the next start resumes from here)."""
        assert self.clock is not None
        now, wall = self.clock.now(), self.clock.wall()
        return self.db.write(lambda conn: _save_clock(conn, now, wall))

    def transitions(self, limit: int = 1000) -> asyncio.Future[list[dict[str, Any]]]:
        """The latest transitions, newest first (tests, debugging)."""

        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT doc FROM transitions ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
            return [orjson.loads(r[0]) for r in rows]

        return self.db.read(run)


_UPSERT_STATE = (
    "INSERT INTO rule_state(rule, device_id, active, since, seq, cooldown_until) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rule, device_id) DO UPDATE SET "
    "active = excluded.active, since = excluded.since, seq = excluded.seq, "
    "cooldown_until = excluded.cooldown_until"
)
_INSERT_TRANSITION = (
    "INSERT INTO transitions(id, rule, device_id, seq, state, at, doc) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ACTION = "INSERT INTO actions(id, transition, doc) VALUES (?, ?, ?)"


def _committed(batch: _Batch, ok: bool, value: Any) -> None:
    """On the loop: every write and mark of ``batch`` is on disk (or none is)."""
    e: BaseException | None = None
    if not ok:
        e = value if isinstance(value, BaseException) else StorageError(str(value))
    for p in batch.pieces:
        if p.then is not None:
            try:
                p.then(p.stored if e is None else e)
            except Exception:
                log.exception("rules: handling a stored transition failed")
        if p.future.done():
            continue
        if e is None:
            p.future.set_result(p.stored)
        else:
            p.future.set_exception(e)
    for f in batch.mark_futures:
        if f.done():
            continue
        if e is None:
            f.set_result(None)
        else:
            f.set_exception(e)


def last_firings(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Each rule's latest ``set`` transition kept: ``{rule: {device_id, at}}``
    (the rules page of the HMI)."""
    rows = conn.execute(
        "SELECT t.rule, t.device_id, t.at FROM transitions t JOIN "
        "(SELECT MAX(id) AS id FROM transitions WHERE state = 'set' GROUP BY rule) m "
        "ON t.id = m.id"
    ).fetchall()
    return {rule: {"device_id": device_id, "at": at} for rule, device_id, at in rows}


def _with_command_id(a: Action) -> Action:
    """A command gets its id when journaled: carried out again after a kill,
    it reaches the device with the same id (edgeway.rules.actions)."""
    if isinstance(a, SendCommand) and a.command_id is None:
        return dataclasses.replace(a, command_id=uuid.uuid4().hex)
    return a


def _save_clock(conn: sqlite3.Connection, now: float, wall: float) -> None:
    conn.execute(
        "INSERT INTO clock(id, clock, wall) VALUES (1, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET clock = excluded.clock, wall = excluded.wall",
        (now, wall),
    )


def load_states(conn: sqlite3.Connection) -> list[tuple[str, str, RuleState]]:
    """Every stored (rule, device, state)."""
    return [
        (rule, dev, RuleState(bool(active), since, seq, cooldown))
        for rule, dev, active, since, seq, cooldown in conn.execute(
            "SELECT rule, device_id, active, since, seq, cooldown_until FROM rule_state"
        )
    ]


def _load(conn: sqlite3.Connection) -> Loaded:
    states = load_states(conn)
    waiting = []
    for aid, doc, rule, dev, seq in conn.execute(
        "SELECT a.id, a.doc, t.rule, t.device_id, t.seq FROM actions a "
        "JOIN transitions t ON t.id = a.transition WHERE a.done = 0 ORDER BY a.id"
    ):
        waiting.append(
            StoredAction(
                aid, f"{rule}:{dev}:{seq}", action_from_json(orjson.loads(doc)), replay=True
            )
        )
    row = conn.execute("SELECT clock, wall FROM clock WHERE id = 1").fetchone()
    (tid,) = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM transitions").fetchone()
    (aid,) = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM actions").fetchone()
    return Loaded(states, waiting, row[0] if row else None, row[1] if row else None, (tid, aid))


def purge_history(conn: sqlite3.Connection, before_wall: float) -> int:
    """Delete transitions older than ``before_wall`` whose actions are all done."""
    cur = conn.execute(
        "DELETE FROM transitions WHERE at < ? AND NOT EXISTS "
        "(SELECT 1 FROM actions a WHERE a.transition = transitions.id AND a.done = 0)",
        (before_wall,),
    )
    return cur.rowcount
