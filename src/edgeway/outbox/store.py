"""The durable outbox: every accepted reading on disk until its sinks confirm it.

Configuration (the ``outbox:`` section; every key is optional)::

    outbox:
      durability: fsync        # fsync: survives power loss; os: survives a process crash
      max_bytes: 2GiB          # retention limit on stored record bytes (absent: no limit)
      max_age: 7d              # drop records older than this (absent: keep forever)
      when_full: drop_oldest   # or reject_new (backpressure to devices)
      drain: ordered           # or live_first (fresh readings share the link with a backlog)
      commit_interval: 0       # extra wait to gather a bigger group commit (0: none)

Design, in short:

- One SQLite database in WAL mode (``data_dir/outbox.db``). One dedicated
  writer thread owns the only writing connection; every change (new readings,
  sink confirmations, dead letters, retention drops, counters) goes through it
  and is applied in one transaction per *group commit*. ``durability: fsync``
  sets ``synchronous=FULL`` (the WAL is fsynced at every commit);
  ``os`` sets ``synchronous=NORMAL``, which in WAL mode does not fsync at commit:
  the data is in the OS page cache and survives a process crash, not a power cut.
- Group commit: :meth:`Outbox.submit` appends to an in-memory list and, when no
  commit is running, schedules one for the end of the current loop iteration
  (``call_soon``, no timer). Submits made while a commit runs join the next one.
  Futures resolve after ``COMMIT`` returned, that is after the fsync.
- Routing is a per-row bitmask ``pending``: bit *i* set = sink *i* still has to
  confirm the row. One row per reading and one UPDATE (or DELETE, for the last
  sink) per confirmed batch is far cheaper than a delivery table with one row
  per (reading, sink): that would double the inserts on the hot path and need
  a second index. The price is a limit of 62 sinks per outbox.
- Each sink reads with its own cursor (``seq > cursor``, the rowid index) from a
  pool of reader threads with their own connections, so a slow or down sink
  never blocks another sink or the writer. The persisted cursor means "every
  row at or below it is done for this sink", so a restart never rescans.
- Counters per sink (accepted, delivered, dropped per reason, rejected) live in
  the ``sinks`` table and are updated in the same transaction as the rows they
  count, so ``accepted = delivered + pending + dropped`` holds after any crash.
- Nothing at open is proportional to the backlog: the sequence, byte total and
  counters are stored, not recomputed (start-up with millions of pending rows
  takes milliseconds plus SQLite's WAL recovery).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from edgeway.config import OutboxSection
from edgeway.ingest import IngestStatus
from edgeway.reading import Reading
from edgeway.sinks.base import Record

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

MAX_SINKS = 62
"""Sinks per outbox: one bit each in the row's ``pending`` INTEGER (SQLite
integers are signed 64-bit; we keep the sign bit and one spare clear)."""

ROW_OVERHEAD = 48
"""Bytes added to each record's payload size for ``max_bytes`` accounting: the
fixed columns (seq, pending, created, size, priority, ts) and SQLite's cell
header. The database file is larger still (pages, free space, WAL)."""

SCAN_WINDOW = 50_000
"""Most sequence numbers one read scans for rows of one sink. A sink that is
routed few rows must not walk a million rows of another sink's backlog in a
single query (that would hold a reader thread for a second); it walks them in
windows instead and reports ``more``."""

AGE_CHECK_INTERVAL = 1.0
"""Seconds between ``max_age`` sweeps. Age limits are coarse by nature (hours,
days); one cheap indexed query per second is negligible."""

DROP_LOG_INTERVAL = 10.0
"""Seconds between drop log lines per (sink, reason): a full outbox drops on
every commit and must not flood the log."""

MAX_RETRY_DROP_CHUNK = 2_000
"""Rows examined per step when dropping the oldest rows to fit ``max_bytes``;
bounds the memory of one step."""

READER_THREADS = 2
"""Reader connections shared by all sink runners. Two keep one long window
scan from stalling another sink; more would only fight over 2 cores."""

_COUNTER_FIELDS = (
    "accepted",
    "delivered",
    "dropped_max_bytes",
    "dropped_max_age",
    "dropped_dead_letter",
    "rejected_full",
)
_DROP_REASONS = ("max_bytes", "max_age", "dead_letter")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS epochs(from_seq INTEGER PRIMARY KEY, gateway_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sinks(
    name TEXT PRIMARY KEY,
    bit INTEGER NOT NULL UNIQUE,
    cursor INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    dropped_max_bytes INTEGER NOT NULL DEFAULT 0,
    dropped_max_age INTEGER NOT NULL DEFAULT 0,
    dropped_dead_letter INTEGER NOT NULL DEFAULT 0,
    rejected_full INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records(
    seq INTEGER PRIMARY KEY,
    pending INTEGER NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    ts REAL NOT NULL,
    metrics BLOB NOT NULL,
    tags BLOB,
    msg_id TEXT
);
CREATE INDEX IF NOT EXISTS records_priority ON records(seq) WHERE priority > 0;
CREATE TABLE IF NOT EXISTS deadletter(
    id INTEGER PRIMARY KEY,
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    error TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    ts REAL NOT NULL,
    metrics BLOB NOT NULL,
    tags BLOB,
    msg_id TEXT
);
CREATE INDEX IF NOT EXISTS deadletter_sink ON deadletter(sink, id);
"""

_SEQS = "SELECT value FROM json_each(?)"

_COLUMNS = 10
"""Values per ``records`` row in the general INSERT."""

_PLAIN_COLUMNS = 5
"""Values per row in the plain INSERT: seq, size, device_id, ts, metrics. A
plain row (priority 0, no tags, no message id, the usual telemetry) shares
``pending`` and ``created`` with its statement (``?1``, ``?2``); binding 5
values instead of 10 measured 2.3 against 4.0-4.7 us of writer CPU per row."""

_ROWS_PER_INSERT = 256
"""Rows bound by one multi-row INSERT: at most 2,560 parameters, well below
SQLite's 32,766 (3.32+); bigger chunks gained nothing measurable."""

_INSERT_SIZES = (_ROWS_PER_INSERT, 64, 16, 4, 1)
"""Chunk sizes, largest first: any batch is at most n/256 + 12 statements."""

_INSERT_COLS = (
    "INSERT INTO records(seq, pending, created, size, priority, device_id, ts, metrics, "
    "tags, msg_id) VALUES "
)

_INSERT_SQL = {
    rows: _INSERT_COLS + ",".join(["(?,?,?,?,?,?,?,?,?,?)"] * rows) for rows in _INSERT_SIZES
}

_INSERT_PLAIN_SQL = {
    rows: _INSERT_COLS
    + ",".join(
        f"(?{3 + 5 * k},?1,?2,?{4 + 5 * k},0,?{5 + 5 * k},?{6 + 5 * k},?{7 + 5 * k},NULL,NULL)"
        for k in range(rows)
    )
    for rows in _INSERT_SIZES
}


@dataclass(slots=True, frozen=True)
class Confirmed:
    """A stored reading that every sink it was routed to has confirmed (a receipt)."""

    device_id: str
    seq: int
    record_id: str
    message_id: str | None
    """The device's own message id (MQTT v5 correlation data or ``msg_id``)."""


@dataclass(slots=True)
class Batch:
    """Records read for one sink, plus what the outbox needs to confirm them."""

    sink: str
    records: list[Record]
    nbytes: int
    """Stored size of the records (about their JSON size)."""
    cursor: int
    """The sink's persisted cursor once this batch is confirmed."""
    out_of_order: bool
    """Holds priority or live rows read ahead of the cursor; the runner must let
    this batch's confirmation commit before it reads the next one."""
    more: bool
    """More rows may be waiting right now (read again without waiting)."""
    generation: int = 0
    """The sink's rewind count when read; a batch read before a rewind is not
    confirmed (it is read and sent again)."""

    def __len__(self) -> int:
        return len(self.records)


@dataclass(slots=True)
class _Submit:
    readings: Sequence[Reading]
    mask: int
    fut: asyncio.Future[IngestStatus]


class _SharedFuture(asyncio.Future[IngestStatus]):
    """The one future of every submit with the same sinks in one group commit.

    Refuses ``cancel()``: it stands for many callers, and one caller giving up
    (a task cancelled while awaiting it) must not tell the others that their
    readings failed. That caller's task is cancelled once the commit is done.
    """

    def cancel(self, msg: Any = None) -> bool:
        return False


@dataclass(slots=True)
class _Op:
    kind: str  # "confirm" | "dead_letter"
    sink: str
    seqs: list[int]
    cursor: int
    error: str
    fut: asyncio.Future[None]


@dataclass(slots=True)
class _Job:
    submits: list[_Submit]
    ops: list[_Op]
    want_receipts: bool


@dataclass(slots=True)
class _JobResult:
    statuses: list[IngestStatus] = field(default_factory=list)
    confirmed: list[Confirmed] = field(default_factory=list)
    new_rows: dict[str, int] = field(default_factory=dict)
    high_seq: int = 0
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    total_bytes: int = 0
    error: BaseException | None = None


@dataclass(slots=True)
class _ReadState:
    """A sink's read positions (loop side; only ``cursor`` is persisted)."""

    bit: int
    pos: int
    """Ordered read position: rows at or below it were read (persisted as cursor
    once their batch is confirmed)."""
    prio_pos: int
    """Priority rows at or below it were already read ahead of ``pos``."""
    live_start: int | None = None
    """In a live_first catch-up: the highest seq of the backlog."""
    live_pos: int = 0
    cursor: int = 0
    """The cursor as last committed; reads rewind here if a confirmation fails."""
    rewinds: int = 0
    """Bumped on each rewind, so a read that was running then is discarded."""
    unread: int = 0
    """Rows committed for this sink since its last read started."""
    event: asyncio.Event = field(default_factory=asyncio.Event)


def _counter_dict(row: Sequence[int]) -> dict[str, int]:
    return dict(zip(_COUNTER_FIELDS, row, strict=True))


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves (one per group commit).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    # A WAL of at most 64 MiB is kept after checkpoints, so a long backlog
    # does not leave a huge WAL file behind.
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


class _Writer:
    """State and SQL owned by the writer thread (never touched from the loop)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        cfg: OutboxSection,
        bits: dict[str, int],
        counters: dict[str, list[int]],
        next_seq: int,
        total_bytes: int,
        unrouted: int,
        epochs: list[tuple[int, str]],
    ) -> None:
        self.conn = conn
        self.cfg = cfg
        self.bits = bits
        self.counters = counters
        self.next_seq = next_seq
        self.total_bytes = total_bytes
        self.unrouted = unrouted
        self.epoch_starts = [e[0] for e in epochs]
        self.epoch_ids = [e[1] for e in epochs]
        self.last_age_check = 0.0
        self.drops_unlogged: dict[tuple[str, str], int] = {}
        self.last_drop_log: dict[tuple[str, str], float] = {}
        self.commits = 0

    def record_id(self, seq: int) -> str:
        i = bisect.bisect_right(self.epoch_starts, seq) - 1
        return f"{self.epoch_ids[max(i, 0)]}:{seq}"

    # -- the group commit ---------------------------------------------------

    def run_job(self, job: _Job) -> _JobResult:
        res = _JobResult()
        conn = self.conn
        saved = (
            self.next_seq,
            self.total_bytes,
            self.unrouted,
            [list(c) for c in self.counters.values()],
            dict(self.drops_unlogged),
        )
        # A job with no new readings only confirms, dead-letters or drops rows.
        # Losing it in a power cut means those records are sent again with the
        # same ids (at least once), never that an acknowledged reading is lost,
        # so it skips the fsync; the next commit that stores readings fsyncs
        # the WAL, and with it these frames too. At low rates this halves the
        # fsyncs (one per sink batch otherwise).
        relax = not job.submits and self.cfg.durability == "fsync"
        if relax:
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            for op in job.ops:
                self._apply_op(op, res, job.want_receipts)
            self._insert(job.submits, now, res)
            self._enforce_limits(now)
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES "
                "('next_seq', ?), ('total_bytes', ?), ('unrouted', ?)",
                (self.next_seq, self.total_bytes, self.unrouted),
            )
            conn.executemany(
                "UPDATE sinks SET accepted=?, delivered=?, dropped_max_bytes=?, dropped_max_age=?, "
                "dropped_dead_letter=?, rejected_full=? WHERE name=?",
                [(*c, name) for name, c in self.counters.items()],
            )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.next_seq, self.total_bytes, self.unrouted = saved[0], saved[1], saved[2]
            for c, old in zip(self.counters.values(), saved[3], strict=True):
                c[:] = old
            self.drops_unlogged = saved[4]
            raise
        finally:
            if relax:
                conn.execute("PRAGMA synchronous=FULL")
        self.commits += 1
        res.high_seq = self.next_seq - 1
        res.total_bytes = self.total_bytes
        res.counters = {name: _counter_dict(c) for name, c in self.counters.items()}
        self._log_drops()
        return res

    def _insert(self, submits: list[_Submit], now: float, res: _JobResult) -> None:
        cfg = self.cfg
        limit = cfg.max_bytes if cfg.when_full == "reject_new" else None
        # Flat parameter lists bound by a few multi-row INSERTs (see
        # _insert_rows), not row by row: plain rows per sink mask
        # (_PLAIN_COLUMNS values each), the others _COLUMNS values each.
        plain: dict[int, list[Any]] = {}
        general: list[Any] = []
        per_mask: dict[int, int] = {}
        seq = self.next_seq
        total = self.total_bytes
        dumps = orjson.dumps
        general_extend = general.extend
        for sub in submits:
            mask = sub.mask
            rows = plain.get(mask)
            if rows is None:
                rows = plain[mask] = []
            plain_extend = rows.extend
            first_plain = len(rows)
            first_general = len(general)
            nbytes = 0
            # This loop runs once per reading on the hot path, with the GIL.
            for r in sub.readings:
                metrics = dumps(r.metrics)
                size = len(metrics) + len(r.device_id) + ROW_OVERHEAD
                msg_id = r.origin.message_id
                if r.tags or r.priority or msg_id is not None:
                    tags_json = dumps(r.tags) if r.tags else None
                    if tags_json is not None:
                        size += len(tags_json)
                    general_extend(
                        (
                            seq,
                            mask,
                            now,
                            size,
                            r.priority,
                            r.device_id,
                            r.ts,
                            metrics,
                            tags_json,
                            msg_id,
                        )
                    )
                else:
                    plain_extend((seq, size, r.device_id, r.ts, metrics))
                nbytes += size
                seq += 1
            if limit is not None and total + nbytes > limit:
                del rows[first_plain:]
                del general[first_general:]
                seq -= len(sub.readings)
                res.statuses.append(IngestStatus.REJECTED_FULL)
                for name, bit in self.bits.items():
                    if mask & bit:
                        self.counters[name][5] += len(sub.readings)
                continue
            res.statuses.append(IngestStatus.ACCEPTED)
            total += nbytes
            per_mask[mask] = per_mask.get(mask, 0) + len(sub.readings)
        if not per_mask:
            return
        for mask, rows in plain.items():
            if rows:
                self._insert_rows(rows, _PLAIN_COLUMNS, _INSERT_PLAIN_SQL, [mask, now])
        if general:
            self._insert_rows(general, _COLUMNS, _INSERT_SQL, [])
        self.next_seq = seq
        self.total_bytes = total
        for mask, n in per_mask.items():
            if mask == 0:
                self.unrouted += n
                continue
            for name, bit in self.bits.items():
                if mask & bit:
                    self.counters[name][0] += n
                    res.new_rows[name] = res.new_rows.get(name, 0) + n

    def _insert_rows(
        self, params: list[Any], columns: int, statements: dict[int, str], shared: list[Any]
    ) -> None:
        """INSERT the rows in ``params`` (flat, ``columns`` values each), with
        ``statements`` (rows -> SQL) whose first parameters are ``shared``.

        ``executemany`` would release and re-take the GIL around every row's
        ``sqlite3_step``; while the event loop is busy each re-take waits for
        the loop to yield it, which measured 130-180 us per row instead of
        ~6. A statement of ``_ROWS_PER_INSERT`` rows hands the GIL over once
        per chunk; the rest goes in smaller fixed sizes so that the statement
        cache holds a handful of statements, not one per batch size.
        """
        conn = self.conn
        n = len(params) // columns
        i = 0
        for rows in _INSERT_SIZES:
            step = rows * columns
            sql = statements[rows]
            while n >= rows:
                conn.execute(sql, shared + params[i : i + step] if shared else params[i : i + step])
                i += step
                n -= rows

    def _apply_op(self, op: _Op, res: _JobResult, want_receipts: bool) -> None:
        conn = self.conn
        bit = self.bits[op.sink]
        seqs_json = orjson.dumps(op.seqs).decode()
        if op.kind == "dead_letter":
            conn.execute(
                "INSERT INTO deadletter(sink, seq, at, error, created, size, priority, device_id, "
                "ts, metrics, tags, msg_id) SELECT ?, seq, ?, ?, created, size, priority, "
                f"device_id, ts, metrics, tags, msg_id FROM records WHERE seq IN ({_SEQS}) "
                "AND (pending & ?) != 0",
                (op.sink, time.time(), op.error, seqs_json, bit),
            )
        deleted = conn.execute(
            f"DELETE FROM records WHERE seq IN ({_SEQS}) AND pending = ? "
            "RETURNING seq, device_id, msg_id, size",
            (seqs_json, bit),
        ).fetchall()
        updated = conn.execute(
            f"UPDATE records SET pending = pending & ~? WHERE seq IN ({_SEQS}) "
            "AND (pending & ?) != 0",
            (bit, seqs_json, bit),
        ).rowcount
        n = len(deleted) + updated
        self.total_bytes -= sum(row[3] for row in deleted)
        counters = self.counters[op.sink]
        if op.kind == "confirm":
            counters[1] += n
            if want_receipts:
                res.confirmed.extend(
                    Confirmed(row[1], row[0], self.record_id(row[0]), row[2]) for row in deleted
                )
        else:
            counters[4] += n
            self._note_drop(op.sink, "dead_letter", n)
        conn.execute("UPDATE sinks SET cursor=? WHERE name=?", (op.cursor, op.sink))

    # -- retention --------------------------------------------------------

    def _enforce_limits(self, now: float) -> None:
        cfg = self.cfg
        if cfg.max_bytes is not None and cfg.when_full == "drop_oldest":
            while self.total_bytes > cfg.max_bytes:
                excess = self.total_bytes - cfg.max_bytes
                rows = self.conn.execute(
                    "SELECT seq, size FROM records ORDER BY seq LIMIT ?", (MAX_RETRY_DROP_CHUNK,)
                ).fetchall()
                if not rows:
                    break
                freed = 0
                cut = rows[-1][0]
                for seq, size in rows:
                    freed += size
                    if freed >= excess:
                        cut = seq
                        break
                self._drop("seq <= ?", (cut,), "max_bytes")
        if cfg.max_age is not None and now - self.last_age_check >= AGE_CHECK_INTERVAL:
            self.last_age_check = now
            cutoff = now - cfg.max_age
            # created grows with seq (both follow commit order), so the old rows
            # are the lowest seqs: find the last old one by walking from the start.
            while True:
                rows = self.conn.execute(
                    "SELECT seq, created FROM records ORDER BY seq LIMIT ?",
                    (MAX_RETRY_DROP_CHUNK,),
                ).fetchall()
                old = [seq for seq, created in rows if created < cutoff]
                if not old:
                    break
                self._drop("seq <= ? AND created < ?", (old[-1], cutoff), "max_age")
                if len(old) < len(rows):
                    break

    def _drop(self, where: str, params: tuple[Any, ...], reason: str) -> None:
        deleted = self.conn.execute(
            f"DELETE FROM records WHERE {where} RETURNING pending, size", params
        ).fetchall()
        idx = 2 if reason == "max_bytes" else 3
        per_bit: dict[int, int] = {}
        for pending, size in deleted:
            self.total_bytes -= size
            if pending == 0:
                self.unrouted -= 1
            else:
                per_bit[pending] = per_bit.get(pending, 0) + 1
        for mask, n in per_bit.items():
            for name, bit in self.bits.items():
                if mask & bit:
                    self.counters[name][idx] += n
                    self._note_drop(name, reason, n)

    def _note_drop(self, sink: str, reason: str, n: int) -> None:
        if n:
            key = (sink, reason)
            self.drops_unlogged[key] = self.drops_unlogged.get(key, 0) + n

    def _log_drops(self) -> None:
        if not self.drops_unlogged:
            return
        now = time.monotonic()
        for key in list(self.drops_unlogged):
            if now - self.last_drop_log.get(key, -DROP_LOG_INTERVAL) >= DROP_LOG_INTERVAL:
                n = self.drops_unlogged.pop(key)
                self.last_drop_log[key] = now
                sink, reason = key
                log.warning(
                    "outbox dropped %d records for sink %s (%s)",
                    n,
                    sink,
                    reason,
                    extra={"fields": {"sink": sink, "reason": reason, "records": n}},
                )


class Outbox:
    """The durable store-and-forward queue; implements :class:`edgeway.ingest.Ingest`.

    ``submit`` is called on the event loop; SQLite work happens on one writer
    thread and a small reader pool. See the module docstring for the design.
    """

    def __init__(
        self,
        path: Path,
        *,
        gateway_id: str,
        config: OutboxSection,
        sink_names: Sequence[str],
    ) -> None:
        if len(set(sink_names)) != len(sink_names):
            raise ValueError(f"duplicate sink names: {list(sink_names)}")
        self.path = Path(path)
        self.gateway_id = gateway_id
        self.config = config
        self.sink_names = list(sink_names)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: _Writer | None = None
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._submits: list[_Submit] = []
        self._shared: dict[int, _Submit] = {}
        self._share_futures = config.when_full != "reject_new"
        self._saturation_limit: int | None = (
            config.max_bytes - max(config.max_bytes // 100, 1)
            if config.when_full == "reject_new" and config.max_bytes is not None
            else None
        )
        """Submits of the next commit by sink mask, when they share one future."""
        self._ops: list[_Op] = []
        self._committing = False
        self._scheduled = False
        self._closed = True
        self._idle = asyncio.Event()
        self._reads: dict[str, _ReadState] = {}
        self._all_mask = 0
        self._high_seq = 0
        self._total_bytes = 0
        self._counters: dict[str, dict[str, int]] = {}
        self._listeners: list[Callable[[Sequence[Confirmed]], None]] = []
        self._readers: ThreadPoolExecutor | None = None
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_local = threading.local()
        self._reader_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._age_timer: asyncio.TimerHandle | None = None
        self._epoch_starts: list[int] = []
        self._epoch_ids: list[str] = []
        self._age_due = False
        self._commit_waiters: list[asyncio.Future[None]] = []
        self.commits = 0
        """Group commits done since open (for tests and metrics)."""

    # -- lifetime ---------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the schema and recover the state left by the last run.

        Reads only a handful of rows (meta, sinks, epochs): fast with millions
        of pending records. Raises ``RuntimeError`` if another process has the
        outbox open.
        """
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        self._lock_fd = acquire_lock(self.path)
        try:
            writer = await asyncio.to_thread(self._open_sync)
        except BaseException:
            release_lock(self._lock_fd)
            self._lock_fd = None
            raise
        self._writer = writer
        self._epoch_starts = list(writer.epoch_starts)
        self._epoch_ids = list(writer.epoch_ids)
        self._high_seq = writer.next_seq - 1
        self._total_bytes = writer.total_bytes
        self._counters = {n: _counter_dict(writer.counters[n]) for n in self.sink_names}
        self._idle.set()
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="outbox-read")
        self._thread = threading.Thread(target=self._writer_main, name="outbox-writer", daemon=True)
        self._thread.start()
        self._closed = False
        if self.config.max_age is not None:
            self._age_timer = self._loop.call_later(AGE_CHECK_INTERVAL, self._age_tick)

    def _open_sync(self) -> _Writer:
        sync = "FULL" if self.config.durability == "fsync" else "NORMAL"
        t0 = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path, sync)
        try:
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            version = int(meta.get("schema_version", SCHEMA_VERSION))
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: outbox schema {version} is newer than this edgeway "
                    f"({SCHEMA_VERSION}); upgrade edgeway"
                )
            # max(seq) is one rowid-index probe; it guards against a next_seq
            # that lags the rows (it never should, both change in one transaction).
            (max_seq,) = conn.execute("SELECT max(seq) FROM records").fetchone()
            (max_dl,) = conn.execute("SELECT max(seq) FROM deadletter").fetchone()
            next_seq = max(int(meta.get("next_seq", 1)), (max_seq or 0) + 1, (max_dl or 0) + 1)
            total_bytes = int(meta.get("total_bytes", 0))
            unrouted = int(meta.get("unrouted", 0))
            epochs = conn.execute(
                "SELECT from_seq, gateway_id FROM epochs ORDER BY from_seq"
            ).fetchall()
            if not epochs or epochs[-1][1] != self.gateway_id:
                if epochs:
                    log.warning(
                        "gateway id changed from %s to %s: records from seq %d get the new id",
                        epochs[-1][1],
                        self.gateway_id,
                        next_seq,
                    )
                conn.execute(
                    "INSERT OR REPLACE INTO epochs VALUES (?, ?)", (next_seq, self.gateway_id)
                )
                epochs.append((next_seq, self.gateway_id))
            known = {
                row[0]: row
                for row in conn.execute(
                    f"SELECT name, bit, cursor, {', '.join(_COUNTER_FIELDS)} FROM sinks"
                )
            }
            used = {row[1] for row in known.values()}
            bits: dict[str, int] = {}
            counters: dict[str, list[int]] = {}
            cursors: dict[str, int] = {}
            new_mask = 0
            for name in self.sink_names:
                if name in known:
                    row = known[name]
                    bits[name] = row[1]
                    cursors[name] = row[2]
                    counters[name] = list(row[3:])
                    continue
                free = next((1 << i for i in range(MAX_SINKS) if (1 << i) not in used), None)
                if free is None:
                    raise RuntimeError(f"{self.path}: more than {MAX_SINKS} sinks ever configured")
                used.add(free)
                conn.execute("INSERT INTO sinks(name, bit, cursor) VALUES (?, ?, 0)", (name, free))
                bits[name] = free
                cursors[name] = 0
                counters[name] = [0] * len(_COUNTER_FIELDS)
                new_mask |= free
            if new_mask and unrouted:
                # Readings stored while no sink was configured go to the first
                # sinks added. One scan, once, when those sinks first appear.
                conn.execute("UPDATE records SET pending = ? WHERE pending = 0", (new_mask,))
                for name, bit in bits.items():
                    if new_mask & bit:
                        counters[name][0] += unrouted
                log.info("routed %d readings stored without a sink to new sinks", unrouted)
                unrouted = 0
            orphans = [
                n
                for n, row in known.items()
                if n not in bits and row[3] - row[4] - row[5] - row[6] - row[7] > 0
            ]
            if orphans:
                log.warning(
                    "sinks %s are no longer configured; their pending records stay until "
                    "the retention limits drop them",
                    orphans,
                )
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?), "
                "('next_seq', ?), ('total_bytes', ?), ('unrouted', ?)",
                (SCHEMA_VERSION, next_seq, total_bytes, unrouted),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        for name, bit in bits.items():
            c = cursors[name]
            self._reads[name] = _ReadState(bit=bit, pos=c, prio_pos=c, cursor=c)
            self._all_mask |= bit
        log.info(
            "outbox open",
            extra={
                "fields": {
                    "path": str(self.path),
                    "next_seq": next_seq,
                    "total_bytes": total_bytes,
                    "open_ms": round((time.monotonic() - t0) * 1000, 1),
                }
            },
        )
        return _Writer(conn, self.config, bits, counters, next_seq, total_bytes, unrouted, epochs)

    async def close(self) -> None:
        """Commit what is pending, checkpoint the WAL and close the database."""
        if self._closed:
            return
        self._closed = True
        if self._age_timer is not None:
            self._age_timer.cancel()
        while self._committing or self._submits or self._ops:
            if not self._committing:
                self._start_commit()
            self._idle.clear()
            await self._idle.wait()
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown, True)
        with self._reader_lock:
            for c in self._reader_conns:
                c.close()
            self._reader_conns.clear()
        release_lock(self._lock_fd)
        self._lock_fd = None

    # -- ingest -----------------------------------------------------------

    def submit(
        self, readings: Sequence[Reading], sinks: Sequence[str] | None = None
    ) -> asyncio.Future[IngestStatus]:
        """Store ``readings`` for ``sinks`` (``None``: every sink; with no sink
        configured they are kept for the first sink added; ``[]``: none, so
        nothing is stored).

        The future resolves once the group commit holding them is durable
        (``ACCEPTED``), or with ``REJECTED_FULL`` under ``when_full: reject_new``.
        Except under ``reject_new``, submits for the same sinks in one group
        commit get the same future, which cannot be cancelled (see
        :class:`_SharedFuture`).
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("outbox is not open")
        if self._closed or not readings:
            fut: asyncio.Future[IngestStatus] = loop.create_future()
            if self._closed:
                fut.set_exception(RuntimeError("outbox is closed"))
            else:
                fut.set_result(IngestStatus.ACCEPTED)
            return fut
        if sinks is None:
            mask = self._all_mask
        else:
            mask = 0
            for name in sinks:
                st = self._reads.get(name)
                if st is None:
                    raise ValueError(f"unknown sink {name!r}")
                mask |= st.bit
            if mask == 0:  # routed to no sink: nothing to keep
                fut = loop.create_future()
                fut.set_result(IngestStatus.ACCEPTED)
                return fut
        if self._share_futures:
            # Nothing can refuse one submit and accept another: every submit
            # for these sinks in this commit shares one future and one entry
            # (a future and an object per device message were ~1 us of the
            # ~25 us a telemetry message costs).
            shared = self._shared.get(mask)
            if shared is None:
                shared = _Submit([], mask, _SharedFuture(loop=loop))
                self._shared[mask] = shared
                self._submits.append(shared)
                self._request_commit()
            shared.readings.extend(readings)  # type: ignore[attr-defined]
            return shared.fut
        fut = loop.create_future()
        self._submits.append(_Submit(readings, mask, fut))
        self._request_commit()
        return fut

    def is_saturated(self) -> bool:
        """True while ``reject_new`` would refuse new readings (within 1% of ``max_bytes``)."""
        # Asked once per device message: the threshold is computed once.
        limit = self._saturation_limit
        return limit is not None and self._total_bytes >= limit

    def counters(self) -> dict[str, dict[str, int]]:
        """Per sink: accepted, delivered, pending, dropped, dropped_<reason>, rejected_full.

        As of the last commit; ``accepted == delivered + pending + dropped``
        always holds (``pending`` is derived from it and checked by the tests
        against the rows on disk).
        """
        out: dict[str, dict[str, int]] = {}
        for name, c in self._counters.items():
            dropped = c["dropped_max_bytes"] + c["dropped_max_age"] + c["dropped_dead_letter"]
            d = dict(c)
            d["dropped"] = dropped
            d["pending"] = c["accepted"] - c["delivered"] - dropped
            out[name] = d
        return out

    @property
    def stored_bytes(self) -> int:
        """Bytes of stored records as counted for ``max_bytes`` (as of the last commit)."""
        return self._total_bytes

    def add_confirmed_listener(self, cb: Callable[[Sequence[Confirmed]], None]) -> None:
        """Call ``cb`` (on the loop) with the rows whose every routed sink confirmed them."""
        self._listeners.append(cb)

    async def wait_for_commit(self) -> None:
        """Wait until the next group commit has finished (counters are then fresh)."""
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._commit_waiters.append(fut)
        await fut

    def record_id(self, seq: int) -> str:
        """The stable id of the record with sequence ``seq``."""
        i = bisect.bisect_right(self._epoch_starts, seq) - 1
        return f"{self._epoch_ids[max(i, 0)]}:{seq}"

    # -- group commit (loop side) -----------------------------------------

    def _request_commit(self) -> None:
        if self._committing or self._scheduled:
            return
        assert self._loop is not None
        self._scheduled = True
        if self.config.commit_interval > 0:
            self._loop.call_later(self.config.commit_interval, self._start_commit)
        else:
            # End of this loop iteration: every submit made in the same iteration
            # joins, and no timer adds a wait of its own.
            self._loop.call_soon(self._start_commit)

    def _start_commit(self) -> None:
        self._scheduled = False
        if self._committing or not (self._submits or self._ops or self._age_due):
            return
        self._age_due = False
        job = _Job(self._submits, self._ops, bool(self._listeners))
        self._submits = []
        self._shared = {}
        self._ops = []
        self._committing = True
        self._idle.clear()
        self._jobs.put(job)

    def _age_tick(self) -> None:
        assert self._loop is not None
        if self._closed:
            return
        self._age_due = True
        self._request_commit()
        self._age_timer = self._loop.call_later(AGE_CHECK_INTERVAL, self._age_tick)

    def _writer_main(self) -> None:
        writer = self._writer
        loop = self._loop
        assert writer is not None and loop is not None
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                try:
                    res = writer.run_job(job)
                except BaseException as e:  # reported to every waiter, then go on
                    log.exception("outbox commit failed")
                    res = _JobResult(error=e)
                loop.call_soon_threadsafe(self._commit_done, job, res)
        finally:
            with contextlib.suppress(sqlite3.Error):
                writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            writer.conn.close()

    def _commit_done(self, job: _Job, res: _JobResult) -> None:
        self._committing = False
        if res.error is not None:
            err = res.error
            for sub in job.submits:
                if not sub.fut.done():
                    sub.fut.set_exception(RuntimeError(f"outbox commit failed: {err}"))
            for op in job.ops:
                # The batch's bit is still set on disk: read it again from the
                # last committed cursor rather than skip it.
                st = self._reads[op.sink]
                st.pos = st.prio_pos = st.cursor
                st.live_start = None
                st.rewinds += 1
                if not op.fut.done():
                    op.fut.set_exception(RuntimeError(f"outbox commit failed: {err}"))
        else:
            self.commits += 1
            self._high_seq = res.high_seq
            self._total_bytes = res.total_bytes
            self._counters = {n: res.counters[n] for n in self.sink_names}
            for sub, status in zip(job.submits, res.statuses, strict=True):
                if not sub.fut.done():
                    sub.fut.set_result(status)
            for op in job.ops:
                self._reads[op.sink].cursor = op.cursor
                if not op.fut.done():
                    op.fut.set_result(None)
            for name, n in res.new_rows.items():
                st = self._reads[name]
                st.unread += n
                st.event.set()
            if res.confirmed:
                for cb in self._listeners:
                    try:
                        cb(res.confirmed)
                    except Exception:
                        log.exception("confirmed-listener failed")
        if self._commit_waiters:
            waiters, self._commit_waiters = self._commit_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)
        if self._submits or self._ops:
            self._start_commit()
        if not self._committing:
            self._idle.set()

    # -- sink side --------------------------------------------------------

    async def read_batch(self, sink: str, max_records: int, max_bytes: int) -> Batch:
        """Read the next batch for ``sink``: priority rows first, then (under
        ``live_first`` during a catch-up) fresh rows sharing the batch with the
        backlog, else rows in sequence (per-device) order."""
        st = self._reads[sink]
        assert self._loop is not None and self._readers is not None
        high = self._high_seq
        st.unread = 0
        st.event.clear()
        live = False
        if self.config.drain == "live_first":
            if st.live_start is None and high - st.pos > 2 * max_records:
                st.live_start = high
                st.live_pos = high
                log.info("sink %s: catching up %d records, live first", sink, high - st.pos)
            live = st.live_start is not None
        rewinds = st.rewinds
        args = (
            st.bit,
            st.pos,
            st.prio_pos,
            st.live_start,
            st.live_pos,
            high,
            max_records,
            max_bytes,
            live,
        )
        records, nbytes, pos, prio_pos, live_pos, more = await self._loop.run_in_executor(
            self._readers, self._read_sync, *args
        )
        if st.rewinds != rewinds:  # a confirmation failed meanwhile: read again
            return Batch(sink, [], 0, st.cursor, False, True, st.rewinds)
        st.pos = pos
        st.prio_pos = prio_pos
        out_of_order = False
        if live:
            st.live_pos = live_pos
            out_of_order = True
            assert st.live_start is not None
            if pos >= st.live_start:
                st.live_start = None
        if any(r.priority > 0 and r.seq > pos for r in records):
            out_of_order = True
        return Batch(sink, records, nbytes, pos, out_of_order, more, rewinds)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            conn.execute("PRAGMA query_only=1")
            self._reader_local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def _read_sync(
        self,
        bit: int,
        pos: int,
        prio_pos: int,
        live_start: int | None,
        live_pos: int,
        high: int,
        max_records: int,
        max_bytes: int,
        live: bool,
    ) -> tuple[list[Record], int, int, int, int, bool]:
        conn = self._reader()
        cols = "seq, size, priority, device_id, ts, metrics, tags"
        out: list[tuple[Any, ...]] = []
        nbytes = 0
        more = False
        seen: set[int] = set()

        def take(rows: list[tuple[Any, ...]]) -> tuple[int, bool]:
            """Append rows within the byte budget; (count taken, budget hit)."""
            nonlocal nbytes
            n = 0
            for row in rows:
                if out and nbytes + row[1] > max_bytes:
                    return n, True
                if row[0] in seen:
                    n += 1
                    continue
                out.append(row)
                nbytes += row[1]
                n += 1
            return n, False

        def scan(after: int, upper: int, want: int) -> tuple[int, bool]:
            """Read rows in (after, upper] in seq order; the new position and
            whether rows may remain in the range."""
            bounded = min(upper, after + SCAN_WINDOW)
            rows = conn.execute(
                f"SELECT {cols} FROM records WHERE seq > ? AND seq <= ? "
                "AND (pending & ?) != 0 ORDER BY seq LIMIT ?",
                (after, bounded, bit, want),
            ).fetchall()
            n, full = take(rows)
            if full or len(rows) == want:
                new = rows[n - 1][0] if n else after
            else:
                new = bounded  # the whole window was scanned
            return new, new < upper

        conn.execute("BEGIN")  # one snapshot for the three queries
        try:
            # 1. priority rows ahead of the ordered position (partial index)
            lo = max(pos, prio_pos)
            if lo < high:
                rows = conn.execute(
                    f"SELECT {cols} FROM records INDEXED BY records_priority WHERE priority > 0 "
                    "AND seq > ? AND seq <= ? AND (pending & ?) != 0 ORDER BY seq LIMIT ?",
                    (lo, high, bit, max_records),
                ).fetchall()
                n, full = take(rows)
                if n:
                    prio_pos = rows[n - 1][0]
                    seen.update(r[0] for r in rows[:n])
                more = more or full or len(rows) == max_records
            # 2. under live_first, fresh rows take up to half of the batch
            if live and live_start is not None and len(out) < max_records and live_pos < high:
                live_pos, rest = scan(live_pos, high, max((max_records - len(out)) // 2, 1))
                more = more or rest
            # 3. the ordered backlog (under live_first: up to where the catch-up began)
            upper = live_start if (live and live_start is not None) else high
            if pos < upper:
                if len(out) < max_records and not (out and nbytes >= max_bytes):
                    pos, rest = scan(pos, upper, max_records - len(out))
                    more = more or rest
                else:
                    more = True
        finally:
            conn.execute("COMMIT")
        return self._records(out), nbytes, pos, prio_pos, live_pos, more

    def _records(self, rows: list[tuple[Any, ...]]) -> list[Record]:
        """Rows to records (in the reader thread, off the loop)."""
        loads = orjson.loads
        last_start = self._epoch_starts[-1]
        prefix = self._epoch_ids[-1] + ":"
        record_id = self.record_id
        return [
            Record(
                prefix + str(seq) if seq >= last_start else record_id(seq),
                seq,
                device_id,
                ts,
                loads(metrics),
                loads(tags) if tags else {},
                priority,
            )
            for seq, _size, priority, device_id, ts, metrics, tags in rows
        ]

    async def refresh_batch(self, batch: Batch) -> Batch:
        """``batch`` without the records that retention dropped since it was read.

        A runner calls this before retrying a batch, so that a record dropped
        (and counted as dropped) while its sink was down is not delivered after
        all. Without retention limits nothing can be dropped: no query.
        """
        cfg = self.config
        if not batch.records or (
            cfg.max_age is None and (cfg.max_bytes is None or cfg.when_full != "drop_oldest")
        ):
            return batch
        assert self._loop is not None and self._readers is not None
        bit = self._reads[batch.sink].bit
        seqs = orjson.dumps([r.seq for r in batch.records]).decode()

        def still_pending() -> set[int]:
            rows = self._reader().execute(
                f"SELECT seq FROM records WHERE seq IN ({_SEQS}) AND (pending & ?) != 0",
                (seqs, bit),
            )
            return {row[0] for row in rows}

        keep = await self._loop.run_in_executor(self._readers, still_pending)
        if len(keep) == len(batch.records):
            return batch
        records = [r for r in batch.records if r.seq in keep]
        kept_bytes = batch.nbytes * len(records) // len(batch.records)
        return Batch(
            batch.sink,
            records,
            kept_bytes,
            batch.cursor,
            batch.out_of_order,
            batch.more,
            batch.generation,
        )

    def confirm(self, batch: Batch) -> asyncio.Future[None]:
        """The sink confirmed ``batch``: clear its bit, delete rows no sink still
        needs, persist the cursor. Joins the next group commit."""
        return self._queue_op("confirm", batch, "")

    def dead_letter(self, batch: Batch, error: str) -> asyncio.Future[None]:
        """The sink refused ``batch`` for good: copy it to the dead-letter table,
        count it as dropped (``dead_letter``) for that sink and move on."""
        return self._queue_op("dead_letter", batch, error)

    def _queue_op(self, kind: str, batch: Batch, error: str) -> asyncio.Future[None]:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._closed:
            fut.set_exception(RuntimeError("outbox is closed"))
            return fut
        if batch.generation != self._reads[batch.sink].rewinds:
            # Read before a failed confirmation rewound this sink: its rows are
            # read and sent again, and confirmed then.
            fut.set_result(None)
            return fut
        seqs = [r.seq for r in batch.records]
        self._ops.append(_Op(kind, batch.sink, seqs, batch.cursor, error, fut))
        self._request_commit()
        return fut

    async def wait_for_rows(
        self, sink: str, min_rows: int = 1, within: float | None = None
    ) -> bool:
        """Wait until ``min_rows`` rows were committed for ``sink`` since its last
        read (True), or ``within`` seconds passed (False)."""
        st = self._reads[sink]
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while st.unread < min_rows:
            st.event.clear()
            if deadline is None:
                await st.event.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await st.event.wait()
            except TimeoutError:
                return st.unread >= min_rows
        return True


def acquire_lock(db_path: Path) -> int:
    """Take the outbox's exclusive lock (one process per data directory).

    The lock is an ``flock`` on ``outbox.db.lock``: the kernel drops it when the
    process dies, so a SIGKILL never leaves a stale lock behind.
    """
    lock_path = db_path.with_name(db_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"{db_path} is in use by another edgeway process (lock {lock_path})"
        ) from None
    return fd


def release_lock(fd: int | None) -> None:
    """Release a lock taken by :func:`acquire_lock`."""
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
