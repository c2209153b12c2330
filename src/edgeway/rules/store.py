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
import contextlib
import dataclasses
import functools
import logging
import math
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from edgeway.outbox.ageclock import AgeClock
from edgeway.rules.engine import RuleOutput, RuleState
from edgeway.rules.outputs import Action, SendCommand, action_from_json, action_json
from edgeway.storage.sqlite import Database, StorageError, connect

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
before it is committed alone. A mark is on no path (a mark lost to a kill
only means the action is taken up again at the start, with the same command
id and key: not queued twice)."""

BATCH_WAIT = 0.001
"""Seconds between commits below which writes are batched. A write made
when the last commit is older than this commits at once (its command leaves
in the call that made the transition: a lone transition waits for nothing).
Within this time of a commit, writes join a batch, committed at the end of
the turn of the event loop, or sooner by a write that finds the batch older
than this (a turn that reads a burst from many devices evaluates their
rules one device after another, a few hundred microseconds each: the first
devices' commands do not wait for the whole turn). So a storm of
transitions costs at most about one commit per millisecond of the loop
(each is 0.05 ms of SQLite plus the GIL's hand-over to another thread and
back, 0.5 ms at the median), and a quiet store adds no wait at all
(bench/results/rules-2026-12-07-commit.md)."""

WAL_CHECKPOINT_BYTES = 4 << 20
"""WAL size beyond which the sync job folds it into the database (a passive
checkpoint, on the store's thread). It is also the size the WAL file keeps
when SQLite starts it over (``journal_size_limit``), so only a file larger
than this holds more than this: a checkpoint after every commit, which the
test ``>=`` made once the file had reached it, cost 2-8 ms of the store's
thread and a database fsync per commit."""
WRITE_BUSY_TIMEOUT = 0.2
"""Seconds the loop's connection waits for the write lock (only another
program writing rules.db holds it: an edgeway command, a copy tool)."""


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
    """What one commit of ``rules.db`` stores: every write and mark made in
    one turn of the event loop."""

    pieces: list[_Piece] = field(default_factory=list)
    marks: list[tuple[str | None, int]] = field(default_factory=list)
    mark_futures: list[asyncio.Future[None]] = field(default_factory=list)
    opened: float = 0.0
    """The store's ``monotonic()`` when the batch was opened."""


class RuleStore:
    """The rules' durable state.

    Writes are committed on the event loop's own connection to ``rules.db``
    (``synchronous=NORMAL``: the commit is written to the WAL, which survives
    a kill of the process, without waiting for the disk): at once when the
    last commit is older than :data:`BATCH_WAIT`, otherwise batched with the
    writes that follow it (a burst of transitions from many devices shares a
    commit), committed at the end of the turn of the loop or once the batch
    is :data:`BATCH_WAIT` old. The transition's actions are carried out right
    after that commit, so a rule's command leaves with no thread hand-off
    and no fsync on its path: a lone transition's command leaves in the call
    that made it. Then, with ``durability: fsync``, the
    store's thread fsyncs the WAL, and only then do the futures resolve (the
    device's reading is acknowledged after it, so what a device was told is
    stored survives a power cut). Reads and WAL checkpoints run on the
    thread's own connection (:class:`Database`); nothing else writes.

    What a power cut between the commit and its fsync (about a millisecond)
    can do: the transition is lost with its command's journal while the
    command may have left; the device was not acknowledged and sends its
    reading again, the transition is made again with the same sequence
    number, and its command gets the same id (ids are derived from the
    database's salt, the rule, the device, the sequence number and the
    action's place), so a device that remembers ids runs it once.
    """

    def __init__(self, data_dir: Path, durability: Literal["fsync", "os"] = "fsync") -> None:
        self.durability = durability
        self.db = Database(
            Path(data_dir) / DB_NAME, migrations=[SCHEMA_V1], durability=durability, name="rules"
        )
        self.clock: AgeClock | None = None
        self.commits = 0
        """Commits of the loop's connection (a batch is one)."""
        self.checkpoints = 0
        """WAL checkpoints run by the sync job."""
        self._wconn: sqlite3.Connection | None = None
        self._wal_fd: int | None = None
        self._salt = 0
        self._batch: _Batch | None = None
        """The batch of this turn of the event loop (None: none yet)."""
        self.monotonic: Callable[[], float] = time.monotonic
        """The clock :data:`BATCH_WAIT` is measured on (a test holds it still)."""
        self._committed = -math.inf
        """monotonic() at the end of the last commit (:data:`BATCH_WAIT`)."""
        self._marks: list[tuple[str | None, int]] = []
        self._mark_futures: list[asyncio.Future[None]] = []
        self._mark_timer: asyncio.TimerHandle | None = None
        self._next_transition = 1
        self._next_action = 1

    async def open(self, purge_before: float | None = None) -> Loaded:
        """Open, read back what is stored, delete finished transitions older
        than ``purge_before`` (wall clock), then take the writes over."""
        await self.db.open()
        loaded = await self.db.read(_load)
        if purge_before is not None:
            await self.db.write(lambda conn: purge_history(conn, purge_before))
        self._salt = await self.db.write(_salt)
        self._next_transition, self._next_action = loaded.next_ids
        self.clock, _ = AgeClock.resume(loaded.clock, loaded.wall, math.inf)
        path = self.db.path
        try:
            conn = connect(path, "os", busy_timeout=WRITE_BUSY_TIMEOUT)
            # Checkpoints run on the store's thread (an fsync of the database
            # file must not hold the event loop); a WAL reset keeps 4 MiB.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_BYTES}")
            self._wal_fd = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        except (sqlite3.Error, OSError) as e:
            await self.db.close()
            raise StorageError(f"{path}: {e}") from e
        self._wconn = conn
        return loaded

    async def close(self) -> None:
        """Commit what is waiting (marks, the clock), then close."""
        if self._wconn is not None:
            self.flush_marks()
            if self._batch is not None:
                self._flush()
            await self._sync_now()
            self._wconn.close()
            self._wconn = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        await self.db.close()

    def write(
        self,
        out: RuleOutput,
        then: Callable[[list[StoredAction] | BaseException], None] | None = None,
    ) -> asyncio.Future[list[StoredAction]]:
        """Store ``out`` (states, transitions, actions, the clock) in this
        turn's commit. ``then`` is called with the actions to carry out (or
        the exception) right after the commit; the future resolves with them
        once the commit is durable (fsynced with ``durability: fsync``)."""
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
            for k, a in enumerate(t.actions):
                a = _with_command_id(a, self._salt, t.id, k)
                aid = self._next_action
                self._next_action += 1
                action_rows.append((aid, tid, action_json(a)))
                stored.append(StoredAction(aid, t.id, a))
        fut: asyncio.Future[list[StoredAction]] = asyncio.get_running_loop().create_future()
        piece = _Piece(
            states, rows, action_rows, stored, (self.clock.now(), self.clock.wall()), fut, then
        )
        now = self.monotonic()
        batch = self._batch
        if batch is not None and batch.pieces and now - batch.opened >= BATCH_WAIT:
            # A long turn (a burst): what waited commits now, its commands go.
            self._flush()
        # Quiet: this write is committed (and its actions carried out) now.
        quiet = self._batch is None and now - self._committed >= BATCH_WAIT
        batch = self._open_batch(at_turn_end=not quiet)
        batch.pieces.append(piece)
        self._take_marks(batch)
        if quiet:
            self._flush()
        return fut

    def mark_done(self, action_id: int, error: str | None) -> asyncio.Future[None]:
        """The action was carried out (``error``: it failed for good). The
        mark rides in the next commit, or is committed within
        :data:`MARK_DELAY` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._marks.append((error, action_id))
        self._mark_futures.append(fut)
        if self._batch is not None:
            self._take_marks(self._batch)
        elif self._mark_timer is None:
            self._mark_timer = loop.call_later(MARK_DELAY, self.flush_marks)
        return fut

    def flush_marks(self) -> None:
        """Commit the waiting "done" marks (at close, and :data:`MARK_DELAY`
        after the first of them)."""
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        if self._marks:
            self._take_marks(self._open_batch())

    def _take_marks(self, batch: _Batch) -> None:
        if self._marks:
            batch.marks.extend(self._marks)
            batch.mark_futures.extend(self._mark_futures)
            self._marks, self._mark_futures = [], []
            if self._mark_timer is not None:
                self._mark_timer.cancel()
                self._mark_timer = None

    def _open_batch(self, *, at_turn_end: bool = True) -> _Batch:
        """This turn's batch, committed at the end of the turn (or sooner:
        :data:`BATCH_WAIT`; ``at_turn_end`` False: the caller commits it)."""
        batch = self._batch
        if batch is None:
            if self._wconn is None:
                raise StorageError(f"{self.db.path}: the rule store is not open")
            batch = self._batch = _Batch(opened=self.monotonic())
            if at_turn_end:
                # At the end of this turn of the event loop: the transitions
                # of readings read in the same turn (a burst from many
                # devices) share one commit.
                asyncio.get_running_loop().call_soon(self._flush)
        return batch

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        conn = self._wconn
        if batch is None or conn is None:
            return
        try:
            _transaction(conn, functools.partial(self._commit, batch))
            self.commits += 1
        except sqlite3.Error as e:  # nothing of this batch is stored (disk full, I/O error)
            _settle(batch, e, tell=True)
            return
        finally:
            self._committed = self.monotonic()
        # Written: a kill of the process can no longer undo it. Carry the
        # transitions' actions out now, in this turn.
        for p in batch.pieces:
            if p.then is not None:
                try:
                    p.then(p.stored)
                except Exception:
                    log.exception("rules: carrying out a stored transition failed")
        if self.durability != "fsync":
            _settle(batch, None)
            return
        sync = self.db.read(self._sync)
        sync.add_done_callback(functools.partial(_synced, batch))

    def _commit(self, batch: _Batch, conn: sqlite3.Connection) -> None:
        """The batch's rows, in order."""
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

    def _sync(self, conn: sqlite3.Connection) -> None:
        """On the store's thread: the WAL on disk (what the loop committed so
        far); fold a large WAL into the database."""
        fd = self._wal_fd
        if fd is None:
            return
        os.fsync(fd)
        if os.fstat(fd).st_size > WAL_CHECKPOINT_BYTES:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.checkpoints += 1

    async def _sync_now(self) -> None:
        with contextlib.suppress(Exception):
            await self.db.read(self._sync)

    def checkpoint_clock(self) -> asyncio.Future[None]:
        """Store the clock (at close: the next start resumes from here)."""
        assert self.clock is not None
        now, wall = self.clock.now(), self.clock.wall()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            if self._wconn is None:
                raise StorageError(f"{self.db.path}: the rule store is not open")
            _transaction(self._wconn, lambda conn: _save_clock(conn, now, wall))
        except (sqlite3.Error, StorageError) as e:
            fut.set_exception(e)
        else:
            fut.set_result(None)
        return fut

    def transitions(self, limit: int = 1000) -> asyncio.Future[list[dict[str, Any]]]:
        """The latest transitions, newest first (tests, debugging)."""

        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT doc FROM transitions ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
            return [orjson.loads(r[0]) for r in rows]

        return self.db.read(run)


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], None]) -> None:
    """``fn`` in one transaction of the loop's connection, rolled back if it fails."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        fn(conn)
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _settle(batch: _Batch, e: BaseException | None, *, tell: bool = False) -> None:
    """Resolve a batch's futures; ``tell``: pass a failed commit to ``then``
    too (a failed fsync is not told: the actions already left)."""
    for p in batch.pieces:
        if e is not None and tell and p.then is not None:
            try:
                p.then(e)
            except Exception:
                log.exception("rules: handling a failed store failed")
        if not p.future.done():
            if e is None:
                p.future.set_result(p.stored)
            else:
                p.future.set_exception(e)
    for f in batch.mark_futures:
        if not f.done():
            if e is None:
                f.set_result(None)
            else:
                f.set_exception(e)


def _synced(batch: _Batch, sync: asyncio.Future[None]) -> None:
    """The WAL holding ``batch`` is fsynced (or the fsync failed: then the
    batch is not known to be durable, and its writes fail; the actions
    already left, the device is not acknowledged and sends again)."""
    e = sync.exception() if not sync.cancelled() else StorageError("rules.db: sync cancelled")
    _settle(batch, e)


def _salt(conn: sqlite3.Connection) -> int:
    """This database's salt for command ids (``PRAGMA user_version``, unused
    otherwise: set once, at random, when the file is new), so a rules.db
    made afresh does not give old ids to new commands."""
    salt = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if salt == 0:
        salt = secrets.randbelow(2**31 - 1) + 1
        conn.execute(f"PRAGMA user_version={salt}")
    return salt


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


def last_firings(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Each rule's latest ``set`` transition kept: ``{rule: {device_id, at}}``
    (the rules page of the HMI)."""
    rows = conn.execute(
        "SELECT t.rule, t.device_id, t.at FROM transitions t JOIN "
        "(SELECT MAX(id) AS id FROM transitions WHERE state = 'set' GROUP BY rule) m "
        "ON t.id = m.id"
    ).fetchall()
    return {rule: {"device_id": device_id, "at": at} for rule, device_id, at in rows}


def _with_command_id(a: Action, salt: int, transition_id: str, index: int) -> Action:
    """A command gets its id when journaled: carried out again after a kill,
    it reaches the device with the same id (edgeway.rules.actions); made
    again after a power cut lost its transition, it gets the same id too
    (derived, not random: see :class:`RuleStore`)."""
    if isinstance(a, SendCommand) and a.command_id is None:
        cid = uuid.uuid5(_ID_SPACE, f"{salt}:{transition_id}:{index}").hex
        return dataclasses.replace(a, command_id=cid)
    return a


_ID_SPACE = uuid.UUID("5b7c1e9e-3f0a-4d4e-9a53-0c2b6f1d7e21")
"""Namespace of the command ids rules derive (uuid5)."""


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
