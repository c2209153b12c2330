"""The durable outbox: every accepted reading on disk until its sinks confirm it.

Configuration (the ``outbox:`` section; every key is optional)::

    outbox:
      durability: fsync        # fsync: survives power loss; os: survives a process crash
      max_bytes: 2GiB          # retention limit on stored record bytes (absent: no limit)
      max_age: 7d              # drop records older than this (absent: keep forever)
      max_age_downtime: 0      # how much of a stop counts towards max_age (edgeway.outbox.ageclock)
      when_full: drop_oldest   # or reject_new (backpressure to devices)
      drain: ordered           # or live_first (fresh readings share the link with a backlog)
      commit_interval: 0       # extra wait to gather a bigger group commit (0: none)
      forward_early: true      # a caught-up sink gets a reading before its commit ends
      disk_reserve: 8MiB       # released on a full disk so confirmations commit (0: none)

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
- Records are stored in *chunks*: one row per run of consecutive records
  with the same sinks and priority in one group commit (at most
  ``CHUNK_MAX`` records), holding each record as the exact JSON object the
  sinks send (``{"id": ..., "device_id": ..., "ts": ..., "metrics": {...}}``),
  one per line. The loop numbers each reading as it is submitted (the
  writer stores it under that number); the id is ``gateway_id:sequence``, or a hash of the device
  message for a reading whose origin carries a message key
  (:mod:`edgeway.record_ids`). A row per reading cost ~3 us of SQLite work
  to insert and ~7 us to read and confirm (bench/outbox_bench.py); per chunk that cost is shared
  by up to 256 records, and a sink that sends JSON (HTTP, MQTT, NATS, AMQP,
  file) sends the stored text as it is, without serializing again.
- Routing is a per-chunk bitmask ``pending``: bit *i* set = sink *i* still has
  to confirm records of the chunk. A sink's persisted ``cursor`` says "every
  record at or below it is done for this sink"; a chunk's bit is cleared when
  the cursor passes its last record (or when the chunk was read and confirmed
  whole, ahead of the cursor: priority and live-first reads), and the chunk
  is deleted when no bit is left. The price is a limit of 62 sinks per outbox.
- Each sink reads with its own cursor from a pool of reader threads with their
  own connections, so a slow or down sink never blocks another sink or the
  writer. A batch may end inside a chunk; the next read starts after it.
- The newest committed chunks stay in memory (the *tail*); a sink that keeps
  up reads them from there, on the loop, without a query or a reader-thread
  round trip. A sink that has read every record numbered so far is handed
  new readings at submit, before their commit (``forward_early``,
  :meth:`Outbox._forward`); its confirmation waits for that commit, and a
  stored ``seq_lease`` keeps a number seen that way from being given to
  another reading after a crash (:data:`SEQ_LEASE`). A caught-up sink's confirmation rides with the next commit of
  new readings (at most :data:`CONFIRM_LINGER` later).
- Counters per sink (accepted, delivered, dropped per reason, rejected) live in
  the ``sinks`` table and are updated in the same transaction as the rows they
  count, so ``accepted = delivered + pending + dropped`` holds after any crash.
- A full disk: a reserve file is released so that confirmations still commit,
  readings are refused until there is room again (:mod:`edgeway.outbox.reserve`).
- Nothing at open is proportional to the backlog: the sequence, byte total and
  counters are stored, not recomputed (start-up with millions of pending rows
  takes milliseconds plus SQLite's WAL recovery).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import itertools
import logging
import operator
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import orjson

from edgeway.ingest import IngestStatus
from edgeway.outbox.ageclock import AgeClock
from edgeway.outbox.config import OutboxSection
from edgeway.outbox.reserve import DiskReserve
from edgeway.outbox.stats import OutboxSinkStats, OutboxStats
from edgeway.ratelimit_log import RateLimitedLog
from edgeway.reading import Reading
from edgeway.record_ids import keyed_record_id
from edgeway.runtime.component import HEALTHY, Health, finish_closing
from edgeway.sinks.base import Record, known_records, record_json_obj, stored_records
from edgeway.storage.sqlite import (
    MetaVersion,
    Migration,
    acquire_lock,
    add_column,
    check_version,
    connect,
    migrate,
    release_lock,
    split_statements,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""1: one ``records`` row per reading (migrated to chunks at open); 2: chunks.
Kept as the ``schema_version`` row of ``meta`` (:data:`VERSION`), as before the
shared storage helper ran the migrations."""

VERSION = MetaVersion("meta", "schema_version")
"""Where the outbox keeps its schema version (a ``meta`` row, not the helper's
default ``schema_version`` table: files written before keep their format)."""

MAX_SINKS = 62
"""Sinks per outbox: one bit each in the row's ``pending`` INTEGER (SQLite
integers are signed 64-bit; we keep the sign bit and one spare clear)."""

RECORD_OVERHEAD = 16
"""Bytes added to each record's size for ``max_bytes`` accounting: its share of
the chunk row (header, columns, line break). A record's size is its stored JSON
text without the digits of its sequence number, so that equal readings count
equal bytes whatever their place in the queue (see :func:`record_text`)."""

CHUNK_MAX = 256
"""Records per chunk row at most. Larger chunks gained nothing measurable;
smaller ones keep the retention and live-first granularity fine."""

SCAN_WINDOW = 250_000
"""Most sequence numbers one read scans for chunks of one sink. A sink that is
routed few records must not walk a million records of another sink's backlog
in a single query (that would hold a reader thread for a long time); it walks
them in windows instead and reports ``more``."""

CONFIRM_LINGER = 0.01
"""Seconds a confirmation of a caught-up sink may wait for the next group
commit of new readings instead of committing on its own. Under a steady load
(1,000 readings/s: a commit every millisecond or so) it always rides along,
which saves a transaction and a writer round trip per sink batch; an idle
gateway commits it after this delay. 10 ms measured the same CPU at 1,000
readings/s as 50 ms (alternating W2 runs) and keeps counters and receipts
close to real time. Nothing waits on it meanwhile: the sink
has already sent the batch and goes on; a crash in between only means the
batch is sent again with the same record ids. Anything that does wait on a
confirmation (the sink's next read ahead of its cursor, close) commits it at
once (:meth:`Outbox.expedite`)."""

SEQ_LEASE = 65_536
"""Sequence numbers the loop may hand out, and forward early, beyond the
last committed one. Each commit stores ``seq_lease`` (its next sequence
number plus this, renewed when half is used) in the same transaction; after
a crash the outbox starts numbering there, so an id a cloud saw on a
reading forwarded early but never committed is never given to another
reading (a cloud that drops duplicates by id would drop that one). A clean
close stores the exact next number: only a crash leaves a gap."""

EARLY_MAX_RECORDS = 4096
EARLY_MAX_BYTES = 1024 * 1024
"""Records forwarded early that a sink has not read yet, at most (and bytes
of their text): past either, the sink is behind and reads from the tail."""

TAIL_MAX_CHUNKS = 1024
TAIL_MAX_BYTES = 8 * 1024 * 1024
"""The newest committed chunks kept in memory (at most this many, and bytes of
record text), so that a sink that keeps up reads them without a query and
without a reader-thread round trip (~90 us of CPU on this machine, more than
the query itself): at 1,000 readings/s each reading is its own batch. 8 MiB
(from 1 MiB): in a burst (bench/end_to_end.py W1, 100,000 records as fast as
100 devices send them) the sink falls up to ~50,000 records (~6 MB of text)
behind the newest while ingest runs; with 1 MiB it read those back through a
reader thread (1.2-1.3 us of CPU per record on that thread, and twice the GIL
handoffs: 18,750 futex calls per 100,000 records against 9,609)."""

_FIRST = operator.itemgetter(0)
"""A tail entry's first sequence number (the tail's bisect key)."""

AGE_GAP_LOG = 60.0
"""A wall-clock gap at start that differs from what is counted towards ages
by more than this many seconds is logged (a clock correction or a long stop)."""

AGE_CHECK_INTERVAL = 1.0
"""Seconds between ``max_age`` sweeps. Age limits are coarse by nature (hours,
days); one cheap indexed query per second is negligible."""

DROP_LOG_INTERVAL = 10.0
"""Seconds between drop log lines per (sink, reason): a full outbox drops on
every commit and must not flood the log."""

DROP_STEP_CHUNKS = 64
"""Chunks examined per step when dropping the oldest records to fit
``max_bytes`` or ``max_age``; bounds the memory of one step."""

SPACE_CHECK_INTERVAL = 1.0
"""Seconds between attempts to give space back and restore the disk reserve
while the disk is full (a checkpoint, a few incremental vacuum steps and a
``statvfs``): a full disk recovers within about this after sinks drained."""

VACUUM_STEP_BUDGET = 0.05
"""Seconds of incremental vacuum per space check at most, so that giving
space back never holds the writer (and the commits behind it) for long."""

ERROR_LOG_INTERVAL = 60.0
"""Seconds between log lines of a repeating commit failure (a full disk fails
every commit): one line and a count, not a traceback per commit."""

DROPS_AHEAD_MAX = 256
"""Ranges of dropped records remembered per sink above its cursor (see
``_Writer.drops_ahead``). Drops go oldest first, so consecutive drops for one
reason merge into one range and a sink needs a handful; past this the newest
ranges merge, which can only blur the reason of records far above the cursor
(a sink's batches in flight are the lowest)."""

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
CREATE TABLE IF NOT EXISTS chunks(
    seq_first INTEGER PRIMARY KEY,
    seq_last INTEGER NOT NULL,
    pending INTEGER NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    data BLOB NOT NULL,
    msg_ids BLOB
);
CREATE INDEX IF NOT EXISTS chunks_priority ON chunks(seq_first) WHERE priority > 0;
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

_CHUNK_COLS = "seq_first, seq_last, pending, size, priority, data"


def record_text(r: Reading, record_id: str) -> bytes:
    """The JSON object a record is stored (and sent) as: exactly what
    ``orjson.dumps(Record.to_json_obj())`` gives for it."""
    return orjson.dumps(
        record_json_obj(record_id, r.device_id, r.ts, r.metrics, r.tags, r.priority)
    )


def _record_obj(r: Reading, record_id: str) -> dict[str, Any]:
    """:func:`record_text`'s object; the usual reading (no tags, no priority)
    skips ``record_json_obj`` (this runs once per reading, with the GIL)."""
    if r.tags or r.priority:
        return record_json_obj(record_id, r.device_id, r.ts, r.metrics, r.tags, r.priority)
    return {"id": record_id, "device_id": r.device_id, "ts": r.ts, "metrics": r.metrics}


def text_from_columns(
    record_id: str, device_id: str, ts: float, metrics: bytes, tags: bytes | None, priority: int
) -> bytes:
    """A record's stored text from the columns of a schema-1 row or a dead letter."""
    return orjson.dumps(
        record_json_obj(
            record_id,
            device_id,
            ts,
            orjson.loads(metrics),
            orjson.loads(tags) if tags else None,
            priority,
        )
    )


def stored_size(r: Reading, gateway_id: str) -> int:
    """Bytes one reading counts for ``max_bytes`` (its text without the sequence
    digits, plus :data:`RECORD_OVERHEAD`)."""
    return len(record_text(r, gateway_id + ":")) + RECORD_OVERHEAD


def record_size(text: bytes, seq: int) -> int:
    """Bytes the stored ``text`` of record ``seq`` counts for ``max_bytes``."""
    return len(text) - len(str(seq)) + RECORD_OVERHEAD


def record_ids(epochs: Sequence[tuple[int, str]]) -> Callable[[int], str]:
    """seq -> record id, for the gateway ids in ``epochs`` ((from_seq, id), ascending)."""
    starts = [e[0] for e in epochs]

    def record_id(seq: int) -> str:
        i = max(bisect.bisect_right(starts, seq) - 1, 0)
        return f"{epochs[i][1] if epochs else '?'}:{seq}"

    return record_id


INSERT_CHUNK = (
    "INSERT INTO chunks(seq_first, seq_last, pending, created, size, priority, data, msg_ids) "
    "VALUES (?,?,?,?,?,?,?,?)"
)


class ChunkBuilder:
    """Chunk rows from records added in sequence order: the group commit, the
    schema-1 migration and the dead-letter replay all store records this way.

    Records join the open chunk while they follow it with the same sinks and
    priority and it holds fewer than ``chunk_max``; otherwise a new one opens.
    """

    __slots__ = ("_chunks", "chunk_max")

    def __init__(self, chunk_max: int = CHUNK_MAX) -> None:
        self.chunk_max = chunk_max
        # [seq_first, seq_last, pending, created, size, priority, texts, msg_ids or None,
        #  device ids or None (not known for every record)]
        self._chunks: list[list[Any]] = []

    def add(
        self,
        first: int,
        texts: Sequence[bytes],
        sizes: Sequence[int],
        msg_ids: Sequence[str | None] | None,
        pending: int,
        priority: int,
        created: float,
        devices: Sequence[str] | None = None,
    ) -> None:
        """Records ``first``, ``first + 1``, ... with these texts, sizes and
        device message ids (None: none has one), all for the same sinks;
        ``devices``: their device ids, when their record ids are the
        outbox's own (see :meth:`rows`)."""
        i, n = 0, len(texts)
        chunk_max = self.chunk_max
        chunks = self._chunks
        cur = chunks[-1] if chunks else None
        while i < n:
            seq = first + i
            if (
                cur is None
                or cur[1] + 1 != seq
                or cur[2] != pending
                or cur[5] != priority
                or len(cur[6]) >= chunk_max
            ):
                cur = [seq, seq - 1, pending, created, 0, priority, [], None, []]
                chunks.append(cur)
            take = min(n - i, chunk_max - len(cur[6]))
            had = len(cur[6])
            cur[6].extend(texts[i : i + take])
            cur[1] += take
            cur[4] += sum(sizes[i : i + take])
            if msg_ids is not None:
                if cur[7] is None:
                    cur[7] = [None] * had
                cur[7].extend(msg_ids[i : i + take])
            elif cur[7] is not None:
                cur[7].extend([None] * take)
            if cur[8] is not None:
                if devices is None:
                    cur[8] = None
                else:
                    cur[8].extend(devices[i : i + take])
            i += take

    def rows(
        self, *, keep_open: bool = False, devices: dict[int, list[str]] | None = None
    ) -> list[tuple[Any, ...]]:
        """The chunks as ``chunks`` rows (for :data:`INSERT_CHUNK`), taken out
        of the builder; ``keep_open`` keeps the last one to go on filling.
        ``devices`` gets, by first sequence number, the device ids of each
        chunk whose every record came with one (the in-memory tail keeps them:
        :func:`edgeway.sinks.base.known_records`)."""
        done = self._chunks[:-1] if keep_open else self._chunks
        self._chunks = self._chunks[-1:] if keep_open and self._chunks else []
        dumps = orjson.dumps
        if devices is not None:
            for c in done:
                if c[8] is not None:
                    devices[c[0]] = c[8]
        return [
            (first, last, pending, created, size, prio, b"\n".join(texts),
             dumps(msgs) if msgs is not None and any(m is not None for m in msgs) else None)
            for first, last, pending, created, size, prio, texts, msgs, _devices in done
        ]  # fmt: skip


def _parse_texts(texts: Sequence[bytes]) -> list[dict[str, Any]]:
    """Record texts to dicts in one orjson call (JSON objects joined by commas
    are an array's elements)."""
    return orjson.loads(b"[" + b",".join(texts) + b"]")  # type: ignore[no-any-return]


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
    chunks: list[int] = field(default_factory=list)
    """First sequence numbers of the chunks read whole ahead of the cursor
    (priority and live-first reads); confirming the batch clears the sink's
    bit on them."""
    early: int = 0
    """The highest sequence number of records forwarded before their group
    commit ended (0: none); the batch is confirmed once that commit ended."""

    def __len__(self) -> int:
        return len(self.records)


@dataclass(slots=True)
class _Submit:
    readings: Sequence[Reading]
    """A list when shared by several submits (they extend it)."""
    mask: int
    fut: asyncio.Future[IngestStatus]
    runs: list[tuple[int, int]]
    """(index in ``readings``, sequence number) where a run of consecutive
    sequence numbers starts (the loop numbers readings as they come)."""
    texts: dict[int, bytes] | None = None
    """Stored texts made on the loop, by index in ``readings`` (readings
    forwarded early: :meth:`Outbox._forward`)."""


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
    cursor: int
    chunks: list[int]
    records: list[Record]
    error: str
    fut: asyncio.Future[None]
    generation: int = 0
    merged: list[asyncio.Future[None]] = field(default_factory=list)
    """Futures of the confirmations merged into this one (:meth:`Outbox._add_op`)."""


@dataclass(slots=True)
class _Replay:
    """Dead letters to queue again (:meth:`Outbox.replay_dead_letters`)."""

    sink: str | None
    ids: list[int] | None
    fut: asyncio.Future[int]
    count: int = 0
    first_seq: int = 0
    """The first of the :data:`~edgeway.outbox.deadletter.REPLAY_MAX`
    sequence numbers the loop set aside for this replay."""


@dataclass(slots=True)
class _Job:
    submits: list[_Submit]
    ops: list[_Op]
    want_receipts: bool
    rejected: dict[int, int] = field(default_factory=dict)
    """Readings refused before they reached the outbox, by sink mask (counted)."""
    replays: list[_Replay] = field(default_factory=list)
    next_seq: int = 0
    """The loop's next sequence number when the job was made: every number
    below it is used by this job or an earlier one."""


@dataclass(slots=True)
class _JobResult:
    statuses: list[IngestStatus] = field(default_factory=list)
    confirmed: list[Confirmed] = field(default_factory=list)
    new_rows: dict[str, int] = field(default_factory=dict)
    high_seq: int = 0
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    total_bytes: int = 0
    error: BaseException | None = None
    chunks: list[tuple[Any, ...]] = field(default_factory=list)
    """The chunk rows this commit inserted (:data:`INSERT_CHUNK` order)."""
    chunk_devices: dict[int, list[str]] = field(default_factory=dict)
    """By first sequence number, the device ids of the inserted chunks whose
    records have ids of the form ``id_prefix + seq`` (all new readings
    without a message key)."""
    id_prefix: str = ""
    dropped: bool = False
    """Retention dropped or trimmed rows in this commit."""
    disk_full: bool = False
    """The writer refuses new readings for lack of disk space (after this job)."""
    oldest: dict[str, float | None] = field(default_factory=dict)
    """Each sink's oldest pending record's ``created`` after this job."""
    lease: int = 0
    """Sequence numbers below this are never given again, even after a crash
    (see :data:`SEQ_LEASE`)."""


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
    priority_commits: int = 0
    """Commits that added priority rows for this sink (see :meth:`Outbox.priority_mark`)."""
    before_read: tuple[int, int, int | None, int, int] | None = None
    """(pos, prio_pos, live_start, live_pos, rewinds) before the last read:
    where :meth:`Outbox.give_back` puts the reads back."""
    early_records: list[Record] = field(default_factory=list)
    """Records forwarded early, not read yet (above ``pos``, in order)."""
    early_bytes: int = 0


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _counter_dict(row: Sequence[int]) -> dict[str, int]:
    return dict(zip(_COUNTER_FIELDS, row, strict=True))


def is_disk_full(e: BaseException) -> bool:
    """True for SQLite's "database or disk is full" (``SQLITE_FULL``)."""
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL


JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes of WAL kept after a checkpoint, so a long backlog does not leave a
huge WAL file behind."""


def _connect(path: Path, durability: Literal["fsync", "os"]) -> sqlite3.Connection:
    # incremental_vacuum: pages emptied by confirmations can be given back to
    # the filesystem, which a full disk needs to recover (edgeway.outbox.reserve);
    # only a new file gets it, older ones keep freed pages for new readings.
    return connect(
        path,
        durability,
        busy_timeout=30.0,
        foreign_keys=False,
        incremental_vacuum=True,
        journal_size_limit=JOURNAL_SIZE_LIMIT,
    )


class _Writer:
    """State and SQL owned by the writer thread (never touched from the loop)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        cfg: OutboxSection,
        bits: dict[str, int],
        counters: dict[str, list[int]],
        cursors: dict[str, int],
        next_seq: int,
        total_bytes: int,
        unrouted: int,
        epochs: list[tuple[int, str]],
        chunk_max: int,
        reserve: DiskReserve,
        disk_full: bool,
        clock: AgeClock,
    ) -> None:
        self.conn = conn
        self.clock = clock
        """``created`` and ``max_age`` run on it, not on the wall clock."""
        self.cfg = cfg
        self.bits = bits
        self.counters = counters
        self.cursors = cursors
        """Each sink's committed cursor (what the ``sinks`` table says)."""
        self.next_seq = next_seq
        self.lease = next_seq
        """The ``seq_lease`` stored by the last commit (see :data:`SEQ_LEASE`)."""
        self.total_bytes = total_bytes
        self.unrouted = unrouted
        self.id_prefix = epochs[-1][1] + ":"
        """Record ids of new readings: this gateway id, a colon, the sequence."""
        self.chunk_max = chunk_max
        self.last_age_check = 0.0
        self.drops_unlogged: dict[tuple[str, str], int] = {}
        self.drops_ahead: dict[str, list[list[int]]] = {name: [] for name in bits}
        """Per sink, ``[first, last, counter index]`` ranges of records retention
        dropped above its cursor. A record dropped while its batch was in
        flight may still be confirmed by the sink: it then counts as delivered,
        not dropped (see ``_redeem_drops``)."""
        self.last_drop_log: dict[tuple[str, str], float] = {}
        self.commits = 0
        self.dropped = False
        """Retention dropped or trimmed rows in the current job."""
        self.reserve = reserve
        self.disk_full = disk_full
        """A commit failed for lack of disk space and there is not yet room
        again: new readings are refused, confirmations still commit."""
        self.last_space_check = 0.0
        self.incremental_vacuum = conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        self.errors = RateLimitedLog(log, ERROR_LOG_INTERVAL)
        self.oldest: dict[str, float | None] = {}
        """Each sink's oldest pending record's ``created`` (age clock; None:
        nothing pending), kept up to date by :meth:`_refresh_oldest`."""
        self._refresh_oldest(bits)

    def _refresh_oldest(self, names: Iterable[str]) -> None:
        """Find each sink's oldest pending chunk: an index range scan from its
        cursor (a chunk holds at most ``chunk_max`` records, so the chunk that
        holds ``cursor + 1`` starts above ``cursor - chunk_max``), stopping at
        the first chunk that holds one of the sink's records."""
        for name in names:
            row = self.conn.execute(
                "SELECT created FROM chunks WHERE seq_first > ? AND seq_last > ? "
                "AND pending & ? ORDER BY seq_first LIMIT 1",
                (self.cursors[name] - self.chunk_max, self.cursors[name], self.bits[name]),
            ).fetchone()
            self.oldest[name] = row[0] if row else None

    # -- the group commit ---------------------------------------------------

    def run_job(self, job: _Job) -> _JobResult:
        """Apply one group commit. On a full disk, release the reserve, refuse
        the job's readings and commit the rest (confirmations, dead letters,
        retention) in the space freed; raises if even that does not fit."""
        try:
            res = self._run_once(job)
        except sqlite3.Error as e:
            if not is_disk_full(e):
                raise
            was_full = self.disk_full
            self.disk_full = True
            freed = self.reserve.release()
            self.errors.log(
                logging.WARNING,
                "disk_full",
                "outbox: disk full (%s); %s; new readings are refused until there is room",
                e,
                f"released the {self.reserve.size}-byte reserve" if freed else "no reserve left",
                extra={"fields": {"path": str(self.reserve.path.parent)}},
            )
            if was_full and not freed:
                # Already refusing readings: make room in the WAL, once.
                self._checkpoint()
            res = self._run_once(job)
        if self.disk_full:
            self._recover_space()
        res.disk_full = self.disk_full
        return res

    def _checkpoint(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _recover_space(self) -> None:
        """While the disk is full, at most every :data:`SPACE_CHECK_INTERVAL`:
        move the WAL into the database, give emptied pages back to the
        filesystem, and accept readings again once the reserve is back."""
        now = time.monotonic()
        if now - self.last_space_check < SPACE_CHECK_INTERVAL:
            return
        self.last_space_check = now
        conn = self.conn
        self._checkpoint()
        if self.incremental_vacuum:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            # Each step's moved pages go through the WAL: a quarter of the
            # reserve per step leaves room for them.
            step = max(self.reserve.size // 4 // page, 64)
            deadline = now + VACUUM_STEP_BUDGET
            try:
                while conn.execute("PRAGMA freelist_count").fetchone()[0] > 0:
                    # Each call frees one page per step of the statement: fetchall
                    # runs it to the end (its own transaction).
                    conn.execute(f"PRAGMA incremental_vacuum({step})").fetchall()
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    if time.monotonic() >= deadline:
                        break
            except sqlite3.Error as e:
                self.errors.log(logging.WARNING, "vacuum", "outbox: cannot give space back: %s", e)
        if self.reserve.restore(drained=self.total_bytes == 0):
            self.disk_full = False
            held = self.errors.reset("disk_full")
            log.warning(
                "outbox: disk space is back (%d MiB free); accepting readings again%s",
                self.reserve.free_bytes() // (1024 * 1024),
                f" ({held} more disk-full failures since the last line)" if held else "",
            )

    def _run_once(self, job: _Job) -> _JobResult:
        res = _JobResult()
        conn = self.conn
        saved = (
            self.next_seq,
            self.total_bytes,
            self.unrouted,
            [list(c) for c in self.counters.values()],
            dict(self.drops_unlogged),
            dict(self.cursors),
            {k: [list(r) for r in v] for k, v in self.drops_ahead.items() if v},
            self.lease,
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
            now = self.clock.now()
            for op in job.ops:
                self._apply_op(op, res, job.want_receipts)
            for mask, n in job.rejected.items():
                self._count_rejected(mask, n)
            self._insert(job.submits, now, res)
            for rp in job.replays:
                self._replay(rp, now, res)
            # The loop numbered the job's readings (and set numbers aside for
            # its replays): numbers of refused readings are not used again.
            self.next_seq = max(self.next_seq, job.next_seq)
            if self.next_seq + SEQ_LEASE // 2 > self.lease:
                self.lease = self.next_seq + SEQ_LEASE
            self.dropped = False
            self._enforce_limits(now)
            res.dropped = self.dropped
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', ?), "
                "('total_bytes', ?), ('unrouted', ?), ('age_clock', ?), ('age_wall', ?), "
                "('seq_lease', ?)",
                (
                    self.next_seq,
                    self.total_bytes,
                    self.unrouted,
                    now,
                    self.clock.wall(),
                    self.lease,
                ),
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
            self.cursors = saved[5]
            self.drops_ahead = {name: saved[6].get(name, []) for name in self.bits}
            self.lease = saved[7]
            raise
        finally:
            if relax:
                conn.execute("PRAGMA synchronous=FULL")
        # A sink's oldest pending record moves only when that sink confirms or
        # dead-letters records, when retention drops some, or when it had
        # nothing pending and gets some (another sink's confirmation clears
        # only that sink's bit).
        if res.dropped or job.replays:
            self._refresh_oldest(self.bits)
        else:
            self._refresh_oldest(
                {op.sink for op in job.ops}
                | {n for n in res.new_rows if self.oldest.get(n) is None}
            )
        res.oldest = dict(self.oldest)
        self.commits += 1
        res.high_seq = self.next_seq - 1
        res.lease = self.lease
        res.total_bytes = self.total_bytes
        res.counters = {name: _counter_dict(c) for name, c in self.counters.items()}
        self._log_drops()
        return res

    def _insert(self, submits: list[_Submit], now: float, res: _JobResult) -> None:
        """Turn the job's readings into record texts and chunk rows.

        Chunks are runs of consecutive records with the same sinks and
        priority, in submission order, so a sink reads each device's records
        in the order they came (at most ``chunk_max`` records each). The loop
        numbered the readings (:meth:`Outbox.submit`) and made the texts of
        those it forwarded early; the rest are made here."""
        if self.disk_full:
            for sub in submits:
                res.statuses.append(IngestStatus.REJECTED_FULL)
                self._count_rejected(sub.mask, len(sub.readings))
            return
        cfg = self.cfg
        limit = cfg.max_bytes if cfg.when_full == "reject_new" else None
        total = self.total_bytes
        dumps = orjson.dumps
        prefix = self.id_prefix
        builder = ChunkBuilder(self.chunk_max)
        per_mask: dict[int, int] = {}
        for sub in submits:
            mask = sub.mask
            readings = sub.readings
            made = sub.texts
            n = len(readings)
            texts: list[bytes] = []
            sizes: list[int] = []
            # (start index, priority, first seq) where the priority or the numbering changes
            runs: list[tuple[int, int, int]] = []
            msgs: list[str | None] | None = None
            devs: list[str] | None = []
            last_prio = -1
            bounds = sub.runs
            k = 0
            next_run = bounds[0][0]
            seq = 0
            # This loop runs once per reading on the hot path, with the GIL:
            # the usual reading (no tags, no priority) skips record_json_obj.
            for i, r in enumerate(readings):
                prio = r.priority
                if i == next_run:
                    seq = bounds[k][1]
                    k += 1
                    next_run = bounds[k][0] if k < len(bounds) else n
                    runs.append((i, prio, seq))
                    last_prio = prio
                elif prio != last_prio:
                    runs.append((i, prio, seq))
                    last_prio = prio
                sid = str(seq)
                key = r.origin.key
                if key is not None:
                    devs = None
                text = made.get(i) if made is not None else None
                if text is None:
                    rid = prefix + sid if key is None else keyed_record_id(r, key)
                    text = dumps(_record_obj(r, rid))
                msg_id = r.origin.message_id
                if msg_id is not None and msgs is None:
                    msgs = [None] * len(texts)
                if msgs is not None:
                    msgs.append(msg_id)
                texts.append(text)
                sizes.append(len(text) - len(sid) + RECORD_OVERHEAD)  # record_size, inlined
                if devs is not None:
                    devs.append(r.device_id)
                seq += 1
            nbytes = sum(sizes)
            if limit is not None and total + nbytes > limit:
                res.statuses.append(IngestStatus.REJECTED_FULL)
                self._count_rejected(mask, n)
                continue
            res.statuses.append(IngestStatus.ACCEPTED)
            total += nbytes
            per_mask[mask] = per_mask.get(mask, 0) + n
            if len(runs) == 1:
                builder.add(runs[0][2], texts, sizes, msgs, mask, runs[0][1], now, devs)
                continue
            runs.append((n, -1, 0))
            for (start, prio, first), (end, _, _) in itertools.pairwise(runs):
                builder.add(
                    first,
                    texts[start:end],
                    sizes[start:end],
                    msgs[start:end] if msgs is not None else None,
                    mask,
                    prio,
                    now,
                    devs[start:end] if devs is not None else None,
                )
        if not per_mask:
            return
        # In sequence order (the tail's order): readings for other sinks that
        # came between two for these make chunks of their own, numbered between.
        res.chunks = sorted(builder.rows(devices=res.chunk_devices), key=_FIRST)
        res.id_prefix = prefix
        self.conn.executemany(INSERT_CHUNK, res.chunks)
        self.total_bytes = total
        for mask, n in per_mask.items():
            if mask == 0:
                self.unrouted += n
                continue
            for name, bit in self.bits.items():
                if mask & bit:
                    self.counters[name][0] += n
                    res.new_rows[name] = res.new_rows.get(name, 0) + n

    def _replay(self, rp: _Replay, now: float, res: _JobResult) -> None:
        """Dead letters back at the end of their sinks' queues, in this commit
        (see :mod:`edgeway.outbox.deadletter`), counted as accepted again."""
        from edgeway.outbox.deadletter import REPLAY_MAX, requeue  # it imports this module

        out = requeue(self.conn, rp.sink, rp.ids, self.bits, rp.first_seq, now, REPLAY_MAX)
        if not out.done:
            return
        self.conn.executemany(INSERT_CHUNK, out.chunk_rows)
        self.conn.executemany("DELETE FROM deadletter WHERE id = ?", [(i,) for i in out.done])
        res.chunks.extend(out.chunk_rows)
        self.total_bytes += sum(r[4] for r in out.chunk_rows)
        for name, n in out.accepted.items():
            self.counters[name][0] += n
            res.new_rows[name] = res.new_rows.get(name, 0) + n
        rp.count = len(out.done)

    def _count_rejected(self, mask: int, n: int) -> None:
        """``n`` readings for the sinks in ``mask`` were refused (outbox or disk full)."""
        for name, bit in self.bits.items():
            if mask & bit:
                self.counters[name][5] += n

    def _apply_op(self, op: _Op, res: _JobResult, want_receipts: bool) -> None:
        """A sink confirmed (or refused for good) a batch: the records after its
        old cursor up to ``op.cursor``, plus the chunks read whole ahead of it."""
        conn = self.conn
        bit = self.bits[op.sink]
        old = self.cursors[op.sink]
        new = max(op.cursor, old)
        counted = 0
        ranges: list[tuple[int, int]] = []  # still-pending records of the batch
        done: list[int] = []  # chunks this sink is now finished with
        in_order: set[int] = set()  # chunks counted in the ordered range
        if new > old:
            for first, last in conn.execute(
                "SELECT seq_first, seq_last FROM chunks WHERE seq_first > ? AND seq_first <= ? "
                "AND seq_last > ? AND (pending & ?) != 0",
                (old - CHUNK_MAX, new, old, bit),
            ):
                lo, hi = max(first, old + 1), min(last, new)
                if hi >= lo:
                    counted += hi - lo + 1
                    ranges.append((lo, hi))
                    in_order.add(first)
                if last <= new:
                    done.append(first)
        if op.chunks:
            for first, last in conn.execute(
                "SELECT seq_first, seq_last FROM chunks WHERE seq_first IN "
                "(SELECT value FROM json_each(?)) AND (pending & ?) != 0",
                (orjson.dumps(op.chunks).decode(), bit),
            ):
                if first in in_order:
                    # A priority chunk read whole that the ordered read then
                    # passed in the same batch: counted once.
                    continue
                counted += last - first + 1
                ranges.append((first, last))
                done.append(first)
        if done:
            ids = orjson.dumps(done).decode()
            deleted = conn.execute(
                "DELETE FROM chunks WHERE seq_first IN (SELECT value FROM json_each(?)) "
                "AND pending = ? RETURNING seq_first, size, "
                + ("data, msg_ids" if want_receipts and op.kind == "confirm" else "NULL, NULL"),
                (ids, bit),
            ).fetchall()
            conn.execute(
                "UPDATE chunks SET pending = pending & ~? WHERE seq_first IN "
                "(SELECT value FROM json_each(?)) AND (pending & ?) != 0",
                (bit, ids, bit),
            )
            self.total_bytes -= sum(row[1] for row in deleted)
            if want_receipts and op.kind == "confirm":
                for first, _size, data, msg_blob in deleted:
                    docs = _parse_texts(data.split(b"\n"))
                    msgs = orjson.loads(msg_blob) if msg_blob else None
                    res.confirmed.extend(
                        Confirmed(d["device_id"], first + i, d["id"], msgs[i] if msgs else None)
                        for i, d in enumerate(docs)
                    )
        counters = self.counters[op.sink]
        if op.kind == "confirm":
            counters[1] += counted
            if counted < len(op.records) and self.drops_ahead[op.sink]:
                self._redeem_drops(op.sink, op.records, ranges)
        else:
            counters[4] += counted
            self._note_drop(op.sink, "dead_letter", counted)
            if counted:
                self._dead_letter(op, ranges)
        self.cursors[op.sink] = new
        conn.execute("UPDATE sinks SET cursor=? WHERE name=?", (new, op.sink))
        ahead = self.drops_ahead[op.sink]
        if ahead and ahead[0][1] <= new:
            # Ranges the cursor passed: their records can no longer be confirmed.
            self.drops_ahead[op.sink] = [r for r in ahead if r[1] > new]

    def _redeem_drops(
        self, sink: str, records: Sequence[Record], ranges: list[tuple[int, int]]
    ) -> None:
        """``records`` were confirmed by ``sink``; those no longer stored were
        dropped by retention while their batch was in flight (and counted as
        dropped then): the sink delivered them, so they count as delivered."""
        ranges = sorted(ranges)
        starts = [lo for lo, _ in ranges]
        ahead = self.drops_ahead[sink]
        counters = self.counters[sink]
        for r in records:
            seq = r.seq
            i = bisect.bisect_right(starts, seq) - 1
            if i >= 0 and seq <= ranges[i][1]:
                continue  # still stored: counted as delivered above
            for lo, hi, idx in ahead:
                if lo <= seq <= hi:
                    counters[idx] -= 1
                    counters[1] += 1
                    # Not in the next "dropped" log line either, if not logged yet.
                    key = (sink, "max_bytes" if idx == 2 else "max_age")
                    if self.drops_unlogged.get(key, 0) > 0:
                        self.drops_unlogged[key] -= 1
                    break

    def _dead_letter(self, op: _Op, ranges: list[tuple[int, int]]) -> None:
        ranges.sort()
        starts = [lo for lo, _ in ranges]
        at = time.time()
        rows = []
        for r in op.records:
            i = bisect.bisect_right(starts, r.seq) - 1
            if i < 0 or r.seq > ranges[i][1]:
                continue  # dropped by retention meanwhile (counted there)
            text = r.to_json_bytes()
            rows.append(
                (op.sink, r.seq, at, op.error, at, len(text) + RECORD_OVERHEAD, r.priority,
                 r.device_id, r.ts, orjson.dumps(r.metrics),
                 orjson.dumps(r.tags) if r.tags else None, None, r.id)
            )  # fmt: skip
        self.conn.executemany(
            "INSERT INTO deadletter(sink, seq, at, error, created, size, priority, device_id, "
            "ts, metrics, tags, msg_id, record_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )

    # -- retention --------------------------------------------------------

    def _enforce_limits(self, now: float) -> None:
        cfg = self.cfg
        conn = self.conn
        if cfg.max_bytes is not None and cfg.when_full == "drop_oldest":
            while self.total_bytes > cfg.max_bytes:
                excess = self.total_bytes - cfg.max_bytes
                rows = conn.execute(
                    "SELECT seq_first, seq_last, pending, size FROM chunks ORDER BY seq_first "
                    "LIMIT ?",
                    (DROP_STEP_CHUNKS,),
                ).fetchall()
                if not rows:
                    break
                for first, last, pending, size in rows:
                    if excess <= 0:
                        break
                    if size <= excess:
                        self._drop_chunk(first, last, pending, size, "max_bytes")
                        excess -= size
                    else:
                        excess -= self._trim(first, last, pending, size, excess)
        if cfg.max_age is not None and now - self.last_age_check >= AGE_CHECK_INTERVAL:
            self.last_age_check = now
            cutoff = now - cfg.max_age
            # created grows with seq (both follow commit order), so the old
            # chunks are the lowest: walk from the start.
            while True:
                rows = conn.execute(
                    "SELECT seq_first, seq_last, pending, size, created FROM chunks "
                    "ORDER BY seq_first LIMIT ?",
                    (DROP_STEP_CHUNKS,),
                ).fetchall()
                old = [row for row in rows if row[4] < cutoff]
                for first, last, pending, size, _created in old:
                    self._drop_chunk(first, last, pending, size, "max_age")
                if len(old) < len(rows) or not rows:
                    break

    def _trim(self, first: int, last: int, pending: int, size: int, excess: int) -> int:
        """Drop the oldest records of one chunk, at least ``excess`` bytes
        (the whole chunk if that is what it takes); returns the bytes freed."""
        data, msg_blob = self.conn.execute(
            "SELECT data, msg_ids FROM chunks WHERE seq_first = ?", (first,)
        ).fetchone()
        texts = data.split(b"\n")
        k = freed = 0
        while freed < excess and k < len(texts):
            freed += record_size(texts[k], first + k)
            k += 1
        if k == len(texts):  # the whole chunk has to go after all
            self._drop_chunk(first, last, pending, size, "max_bytes")
            return size
        msgs = orjson.loads(msg_blob)[k:] if msg_blob else None
        self.conn.execute(
            "UPDATE chunks SET seq_first = ?, size = ?, data = ?, msg_ids = ? WHERE seq_first = ?",
            (
                first + k,
                size - freed,
                b"\n".join(texts[k:]),
                orjson.dumps(msgs) if msgs and any(m is not None for m in msgs) else None,
                first,
            ),
        )
        self._count_drop(first, first + k - 1, pending, "max_bytes")
        self.total_bytes -= freed
        self.dropped = True
        return freed

    def _drop_chunk(self, first: int, last: int, pending: int, size: int, reason: str) -> None:
        self.conn.execute("DELETE FROM chunks WHERE seq_first = ?", (first,))
        self._count_drop(first, last, pending, reason)
        self.total_bytes -= size
        self.dropped = True

    def _count_drop(self, first: int, last: int, pending: int, reason: str) -> None:
        """Count records ``first..last`` of a chunk with ``pending`` as dropped
        for every sink that had not confirmed them (its cursor is below)."""
        if pending == 0:
            self.unrouted -= last - first + 1
            return
        idx = 2 if reason == "max_bytes" else 3
        for name, bit in self.bits.items():
            if pending & bit:
                cursor = self.cursors[name]
                n = last - max(first - 1, cursor) if last > cursor else 0
                if n:
                    self.counters[name][idx] += n
                    self._note_drop(name, reason, n)
                    self._remember_drop(name, last - n + 1, last, idx)

    def _remember_drop(self, sink: str, first: int, last: int, idx: int) -> None:
        """Note records ``first..last`` dropped for ``sink`` (counter ``idx``),
        in case they were in flight (see :attr:`drops_ahead`)."""
        ahead = self.drops_ahead[sink]
        if ahead:
            prev = ahead[-1]
            if (prev[2] == idx and prev[1] < first) or len(ahead) >= DROPS_AHEAD_MAX:
                prev[1] = max(prev[1], last)
                return
        ahead.append([first, last, idx])

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
                if not n:  # every one delivered after all (see _redeem_drops)
                    continue
                self.last_drop_log[key] = now
                sink, reason = key
                log.warning(
                    "outbox dropped %d records for sink %s (%s)",
                    n,
                    sink,
                    reason,
                    extra={"fields": {"sink": sink, "reason": reason, "records": n}},
                )


_Known = tuple[str, list[str]]
"""A tail chunk's record id prefix and device ids (its ids are the prefix and
the sequence number): enough to build its records without parsing them."""


class _Taken:
    """Records taken into one batch: texts, sequence numbers, priorities, bytes.

    ``scan`` is the ordered read; the reader threads run it over query rows
    and the loop over the in-memory tail (:data:`TAIL_MAX_CHUNKS`), so both
    build the same batch from the same chunks."""

    __slots__ = (
        "devices", "max_bytes", "nbytes", "prefix", "prios", "seqs", "taken", "texts", "whole",
    )  # fmt: skip

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.texts: list[bytes] = []
        self.seqs: list[int] = []
        self.prios: list[int] = []
        self.nbytes = 0
        self.whole: list[int] = []
        """First seqs of the chunks taken whole ahead of the cursor."""
        self.taken: set[int] = set()
        self.devices: list[str] | None = []
        """The records' device ids while every chunk taken came with them
        (tail entries, :data:`_Known`), else None."""
        self.prefix: str | None = None
        """Their record ids' prefix (ids are ``prefix + str(seq)``)."""

    def _know(self, known: _Known | None) -> list[str] | None:
        """The device list to extend for a chunk with ``known``, or None
        (and from then on for this batch) if its records cannot be built
        from it."""
        devices = self.devices
        if devices is None:
            return None
        if known is None or (self.prefix is not None and known[0] != self.prefix):
            self.devices = None
            return None
        self.prefix = known[0]
        return devices

    def add_chunk(
        self, first: int, last: int, size: int, prio: int, data: bytes, known: _Known | None = None
    ) -> None:
        self.texts.extend(data.split(b"\n"))
        self.seqs.extend(range(first, last + 1))
        self.prios.extend([prio] * (last - first + 1))
        self.nbytes += size
        devices = self._know(known)
        if devices is not None:
            assert known is not None
            devices.extend(known[1])

    def take_whole(self, row: Sequence[Any], room: int) -> bool:
        """Take a chunk whole (read ahead of the cursor) if it fits in ``room``
        records and the byte budget (or nothing is taken yet)."""
        first, last, _pending, size, prio, data = row
        if self.texts and (last - first + 1 > room or self.nbytes + size > self.max_bytes):
            return False
        self.add_chunk(first, last, size, prio, data)
        self.whole.append(first)
        self.taken.add(first)
        return True

    def scan(
        self, rows: Iterable[Sequence[Any]], after: int, upper: int, bounded: int, want: int
    ) -> tuple[int, bool]:
        """Take up to ``want`` records of ``rows`` (this sink's chunks in
        ``(after, bounded]``, in order; a chunk may be taken in part) within
        the byte budget; the new position and whether records may remain
        below ``upper``."""
        texts = self.texts
        goal = len(texts) + want
        max_bytes = self.max_bytes
        new = after
        for first, last, _pending, size, prio, data, *extra in rows:
            if first in self.taken:
                new = last
                continue
            known = extra[0] if extra else None
            start = max(first, after + 1)
            room = goal - len(texts)
            if start == first and last - first + 1 <= room and self.nbytes + size <= max_bytes:
                self.add_chunk(first, last, size, prio, data, known)
                new = last
                if len(texts) >= goal:
                    return new, new < upper
                continue
            # Part of a chunk: record by record within the budgets.
            part = data.split(b"\n")[start - first :]
            seq = start
            for t in part:
                rsize = record_size(t, seq)
                if len(texts) >= goal or (texts and self.nbytes + rsize > max_bytes):
                    return seq - 1, True
                devices = self._know(known)
                if devices is not None:
                    assert known is not None
                    devices.append(known[1][seq - first])
                texts.append(t)
                self.seqs.append(seq)
                self.prios.append(prio)
                self.nbytes += rsize
                seq += 1
            new = last
            if len(texts) >= goal:
                return new, new < upper
        if self.nbytes >= max_bytes and texts:
            return new, new < upper
        return bounded, bounded < upper  # the whole window was scanned


class Outbox:
    """The durable store-and-forward queue; implements :class:`edgeway.ingest.Ingest`.

    ``submit`` is called on the event loop; SQLite work happens on one writer
    thread and a small reader pool. See the module docstring for the design.
    """

    tail_reads = True
    """Serve ordered reads from the in-memory tail when it can (tests turn it
    off to compare with the reader threads' queries)."""

    def __init__(
        self,
        path: Path,
        *,
        gateway_id: str,
        config: OutboxSection,
        sink_names: Sequence[str],
        chunk_max: int = CHUNK_MAX,
        wall_clock: Callable[[], float] = time.time,
        monotonic_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``chunk_max``: records per chunk at most (at most :data:`CHUNK_MAX`);
        the gateway passes the smallest ``max_records`` of its sinks, so that a
        chunk read whole (priority, live first) never exceeds a sink's batch.
        ``wall_clock`` and ``monotonic_clock`` drive the age clock (see
        :mod:`edgeway.outbox.ageclock`; tests pass their own)."""
        self._wall_clock = wall_clock
        self._monotonic_clock = monotonic_clock
        if len(set(sink_names)) != len(sink_names):
            raise ValueError(f"duplicate sink names: {list(sink_names)}")
        if not 1 <= chunk_max <= CHUNK_MAX:
            raise ValueError(f"chunk_max must be within 1..{CHUNK_MAX}")
        self.chunk_max = chunk_max
        self.path = Path(path)
        self.gateway_id = gateway_id
        self.config = config
        self.sink_names = list(sink_names)
        self.retired: dict[str, dict[str, int]] = {}
        """Counters of sinks no longer configured with records still pending."""
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
        self._tail: list[list[Any]] = []
        """Newest chunks, in sequence order: [seq_first, seq_last, pending,
        size, priority, data]."""
        self._tail_bytes = 0
        self._tail_prio = 0
        """Priority chunks in the tail (none, the usual: reads need not look for them)."""
        self._tail_lo = 1
        """Every chunk from this seq up to the high seq is in the tail."""
        self._ops: list[_Op] = []
        self._ops_urgent = False
        """Some op in ``_ops`` must not wait for the next readings' commit."""
        self._linger: asyncio.TimerHandle | None = None
        self._committing = False
        self._scheduled = False
        self._closed = True
        self._idle = asyncio.Event()
        self._reads: dict[str, _ReadState] = {}
        self._all_mask = 0
        self._high_seq = 0
        self._total_bytes = 0
        self._counters: dict[str, dict[str, int]] = {}
        self._oldest: dict[str, float | None] = {}
        self._age_clock: AgeClock | None = None
        self._replays: list[_Replay] = []
        self._listeners: list[Callable[[Sequence[Confirmed]], None]] = []
        self._readers: ThreadPoolExecutor | None = None
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_local = threading.local()
        self._reader_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._age_timer: asyncio.TimerHandle | None = None
        self._age_due = False
        """A timer asks for a commit with nothing in it (retention, space check)."""
        self.reserve = DiskReserve(
            self.path.with_name(self.path.name + ".reserve"), config.disk_reserve
        )
        self._disk_full = False
        self._space_timer: asyncio.TimerHandle | None = None
        self._rejected: dict[int, int] = {}
        """Readings refused up front (:meth:`count_rejected`) since the last commit, by mask."""
        self._rejected_timer: asyncio.TimerHandle | None = None
        self._commit_waiters: list[asyncio.Future[None]] = []
        self._next_seq = 1
        """The next sequence number to give a reading (the loop numbers them)."""
        self._lease = 0
        """Numbers below this may be forwarded early (:data:`SEQ_LEASE`)."""
        self._id_prefix = ""
        self._early_mask = 0
        """Bits of the sinks that have read every record numbered so far: new
        ones are forwarded to them as they are submitted (:meth:`_forward`)."""
        self._after_commit: list[tuple[int, Callable[[], object]]] = []
        """(record seq, call): what waits for the group commit holding that
        record to end (:meth:`wait_committed`; confirmations of batches
        forwarded early, held until their rows exist)."""
        self._deferred_urgent = False
        """Someone waits on a held confirmation: it does not linger (:meth:`expedite`)."""
        self._loop_errors = RateLimitedLog(log, ERROR_LOG_INTERVAL)
        """Repeated errors on the loop side (the writer thread has its own)."""
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
        self._high_seq = writer.next_seq - 1
        self._next_seq = writer.next_seq
        self._lease = writer.lease
        self._id_prefix = writer.id_prefix
        self._tail_lo = writer.next_seq
        self._total_bytes = writer.total_bytes
        self._counters = {n: _counter_dict(writer.counters[n]) for n in self.sink_names}
        self._oldest = dict(writer.oldest)
        self._age_clock = writer.clock
        self._idle.set()
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="outbox-read")
        self._thread = threading.Thread(target=self._writer_main, name="outbox-writer", daemon=True)
        self._thread.start()
        self._closed = False
        if self.config.max_age is not None:
            self._age_timer = self._loop.call_later(AGE_CHECK_INTERVAL, self._age_tick)
        self._set_disk_full(writer.disk_full)

    def _open_sync(self) -> _Writer:
        try:
            return self._open_once()
        except sqlite3.Error as e:
            # A full disk refuses even the start-up transaction: give the
            # reserve back and try again (then start refusing readings).
            if not (is_disk_full(e) and self.reserve.release()):
                raise
            log.warning("outbox: disk full at start (%s); released the reserve", e)
            return self._open_once()

    def _open_once(self) -> _Writer:
        t0 = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path, self.config.durability)
        try:
            migrate(conn, MIGRATIONS, f"{self.path}: outbox", version=VERSION)
            conn.execute("BEGIN IMMEDIATE")
            # Tables and columns added within schema 2 (idempotent, as before
            # versions were checked by the helper).
            _create_schema(conn)
            add_column(conn, "deadletter", "record_id", "TEXT")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            epochs = conn.execute(
                "SELECT from_seq, gateway_id FROM epochs ORDER BY from_seq"
            ).fetchall()
            total_bytes = int(meta.get("total_bytes", 0))
            # The last chunk is one rowid-index probe; it guards against a next_seq
            # that lags the rows (it never should, both change in one transaction).
            row = conn.execute(
                "SELECT seq_last, created FROM chunks ORDER BY seq_first DESC LIMIT 1"
            ).fetchone()
            max_seq = row[0] if row else 0
            # The age clock resumes from the last commit (before it was stored:
            # from the newest chunk's time, a wall-clock time then).
            stored_age = meta.get("age_clock", row[1] if row else None)
            clock, resumed = AgeClock.resume(
                None if stored_age is None else float(stored_age),
                float(meta["age_wall"]) if "age_wall" in meta else None,
                self.config.max_age_downtime,
                monotonic=self._monotonic_clock,
                wall=self._wall_clock,
            )
            if abs(resumed.wall_gap - resumed.credited) > AGE_GAP_LOG:
                log.info(
                    "outbox: the wall clock moved %+.0f s since the last commit; %.0f s of "
                    "it count towards max_age (max_age_downtime)",
                    resumed.wall_gap,
                    resumed.credited,
                )
            (max_dl,) = conn.execute("SELECT max(seq) FROM deadletter").fetchone()
            # After a crash, numbers up to the lease may be on readings that
            # were forwarded early and never committed (SEQ_LEASE).
            next_seq = max(
                int(meta.get("next_seq", 1)),
                int(meta.get("seq_lease", 0)),
                max_seq + 1,
                (max_dl or 0) + 1,
            )
            unrouted = int(meta.get("unrouted", 0))
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
                conn.execute("UPDATE chunks SET pending = ? WHERE pending = 0", (new_mask,))
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
                    "the retention limits drop them, or 'edgeway outbox purge SINK'",
                    orphans,
                )
            self.retired = {n: _counter_dict(known[n][3:]) for n in orphans}
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?), "
                "('next_seq', ?), ('total_bytes', ?), ('unrouted', ?)",
                (SCHEMA_VERSION, next_seq, total_bytes, unrouted),
            )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
            raise
        disk_full = not self.reserve.restore(drained=total_bytes == 0)
        if disk_full:
            log.warning(
                "outbox: %d MiB free in %s, not enough for the %d MiB disk reserve and new "
                "readings: refusing readings until there is room",
                self.reserve.free_bytes() // (1024 * 1024),
                self.path.parent,
                self.config.disk_reserve // (1024 * 1024),
            )
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
        return _Writer(
            conn,
            self.config,
            bits,
            counters,
            cursors,
            next_seq,
            total_bytes,
            unrouted,
            epochs,
            self.chunk_max,
            self.reserve,
            disk_full,
            clock,
        )

    async def close(self) -> None:
        """Commit what is pending, checkpoint the WAL and close the database."""
        if self._closed:
            return
        self._closed = True
        if self._age_timer is not None:
            self._age_timer.cancel()
        if self._space_timer is not None:
            self._space_timer.cancel()
        if self._rejected_timer is not None:
            self._rejected_timer.cancel()
        self._ops_urgent = True
        self._age_due = bool(self._rejected)
        while self._committing or self._submits or self._ops or self._age_due:
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
            mask = self._mask(sinks)
            if mask == 0:  # routed to no sink: nothing to keep
                fut = loop.create_future()
                fut.set_result(IngestStatus.ACCEPTED)
                return fut
        first = self._next_seq
        self._next_seq = first + len(readings)
        if self._share_futures:
            # Nothing can refuse one submit and accept another: every submit
            # for these sinks in this commit shares one future and one entry
            # (a future and an object per device message were ~1 us of the
            # ~25 us a telemetry message costs).
            shared = self._shared.get(mask)
            if shared is None:
                shared = _Submit([], mask, _SharedFuture(loop=loop), [(0, first)])
                self._shared[mask] = shared
                self._submits.append(shared)
                self._request_commit()
            held = cast(list[Reading], shared.readings)
            base = len(held)
            start, seq = shared.runs[-1]
            if seq + base - start != first:  # readings for other sinks came between
                shared.runs.append((base, first))
            held.extend(readings)
            if self._early_mask & mask:
                self._forward(shared, base, readings, first, mask)
            return shared.fut
        fut = loop.create_future()
        sub = _Submit(readings, mask, fut, [(0, first)])
        self._submits.append(sub)
        if self._early_mask & mask:
            self._forward(sub, 0, readings, first, mask)
        self._request_commit()
        return fut

    def _forward(
        self, sub: _Submit, base: int, readings: Sequence[Reading], first: int, mask: int
    ) -> None:
        """Give ``readings`` (numbered from ``first``, at ``base`` in ``sub``)
        to the sinks in ``mask`` that have read every record numbered so far,
        now, while their group commit is still to come: a caught-up sink
        sends them without waiting for the commit (:attr:`OutboxSection.forward_early`).
        Their texts are made here, once, and stored as they were sent."""
        if (
            first + len(readings) > self._lease
            or self.is_saturated()
            or any(r.priority for r in readings)
        ):
            # Priority readings are read ahead by the query; a reading that
            # may be refused (a full outbox) must not leave first.
            self._end_early(mask)
            return
        texts = sub.texts
        if texts is None:
            texts = sub.texts = {}
        prefix = self._id_prefix
        dumps = orjson.dumps
        seqs = range(first, first + len(readings))
        made: list[bytes] = []
        keyed = False
        for i, (seq, r) in enumerate(zip(seqs, readings, strict=True)):
            key = r.origin.key
            if key is None:
                rid = prefix + str(seq)
            else:
                rid = keyed_record_id(r, key)
                keyed = True
            text = dumps(_record_obj(r, rid))
            texts[base + i] = text
            made.append(text)
        prios = [0] * len(made)
        records = (
            stored_records(seqs, prios, made)
            if keyed
            else known_records(seqs, prios, made, [r.device_id for r in readings], prefix)
        )
        nbytes = sum(len(t) for t in made)
        for st in self._reads.values():
            if not mask & st.bit & self._early_mask:
                continue
            if (
                len(st.early_records) + len(records) > EARLY_MAX_RECORDS
                or st.early_bytes + nbytes > EARLY_MAX_BYTES
            ):
                self._end_early(st.bit)  # behind: it reads these from the tail
                continue
            st.early_records.extend(records)
            st.early_bytes += nbytes
            st.unread += len(records)
            st.event.set()

    def _end_early(self, mask: int, *, drop: bool = False) -> None:
        """The sinks in ``mask`` read new records from the tail again (after
        the early ones they hold, or, with ``drop``, instead of them: those
        are read again from the tail once committed)."""
        if not self._early_mask & mask and not drop:
            return
        if drop:
            for st in self._reads.values():
                if mask & st.bit:
                    st.early_records.clear()
                    st.early_bytes = 0
        self._early_mask &= ~mask

    def is_saturated(self) -> bool:
        """True while new readings would be refused: the disk is full, or
        ``reject_new`` is within 1% of ``max_bytes``."""
        # Asked once per device message: the threshold is computed once.
        limit = self._saturation_limit
        return self._disk_full or (limit is not None and self._total_bytes >= limit)

    def count_rejected(self, n: int, sinks: Sequence[str] | None = None) -> None:
        """Count ``n`` readings for ``sinks`` (None: every sink) that were refused
        because :meth:`is_saturated` was true, before they were submitted (the
        pipeline and adapters refuse up front). They join the sinks'
        ``rejected_full`` counters with the next commit (at most
        :data:`CONFIRM_LINGER` from now)."""
        if n <= 0 or self._closed:
            return
        mask = self._all_mask if sinks is None else self._mask(sinks)
        if not mask:
            return
        self._rejected[mask] = self._rejected.get(mask, 0) + n
        if self._rejected_timer is None and not (self._committing or self._scheduled):
            assert self._loop is not None
            # Not a commit per refusal: refusals come fast while saturated.
            self._rejected_timer = self._loop.call_later(CONFIRM_LINGER, self._flush_rejected)

    def _flush_rejected(self) -> None:
        self._rejected_timer = None
        if self._rejected:
            self._age_due = True
            self._request_commit()

    def _mask(self, sinks: Sequence[str]) -> int:
        mask = 0
        for name in sinks:
            st = self._reads.get(name)
            if st is None:
                raise ValueError(f"unknown sink {name!r}")
            mask |= st.bit
        return mask

    @property
    def disk_full(self) -> bool:
        """New readings are refused for lack of disk space (see :mod:`edgeway.outbox.reserve`)."""
        return self._disk_full

    def retired_counters(self) -> dict[str, dict[str, int]]:
        """Sinks no longer configured that still have records pending, with
        their counters as of this open (``pending`` included): readings that
        stay stored until purged on purpose or dropped by retention."""
        return {name: dataclasses.asdict(c) for name, c in self.stats().retired.items()}

    def status(self) -> dict[str, dict[str, float]]:
        """:meth:`counters` with each sink's ``oldest_pending_s`` (``/api/status``)."""
        ages = self.oldest_pending_ages()
        return {n: {**c, "oldest_pending_s": ages.get(n, 0.0)} for n, c in self.counters().items()}

    def counters(self) -> dict[str, dict[str, int]]:
        """Per sink: accepted, delivered, pending, dropped, dropped_<reason>, rejected_full
        (:class:`~edgeway.outbox.stats.OutboxSinkStats` as a dict)."""
        return {name: dataclasses.asdict(c) for name, c in self.stats().sinks.items()}

    # ---------------------------------------------------------- as a component

    @property
    def name(self) -> str:
        return "outbox"

    async def start(self) -> None:
        """:meth:`open`: the database, its lock and the writer thread."""
        await self.open()

    async def stop(self, grace: float) -> None:
        """:meth:`close`. Not abandoned after ``grace`` seconds: closing commits
        what devices were told is stored, so a slow close is only warned about."""
        await finish_closing(self.close(), "outbox", grace)

    def health(self) -> Health:
        """Unhealthy while the disk is full: devices are refused until there is room."""
        if self._disk_full:
            return Health.failing("outbox: the disk is full, new readings are refused")
        return HEALTHY

    def stats(self) -> OutboxStats:
        """Per sink, as of the last commit (``accepted == delivered + pending + dropped``)."""
        return OutboxStats(
            sinks={n: OutboxSinkStats.from_counts(c) for n, c in self._counters.items()},
            retired={n: OutboxSinkStats.from_counts(c) for n, c in self.retired.items()},
            oldest_pending_age=self.oldest_pending_ages(),
        )

    def oldest_pending_ages(self) -> dict[str, float]:
        """Per sink: seconds since its oldest record not yet confirmed was
        stored (0: nothing pending), on the outbox's age clock, as of the last
        commit (an index lookup per sink in the commits that move it)."""
        clock = self._age_clock
        if clock is None:
            return {}
        now = clock.now()
        return {
            n: 0.0 if created is None else round(max(0.0, now - created), 3)
            for n, created in self._oldest.items()
            if n in self._counters
        }

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
        if self._committing or not (self._submits or self._ops or self._age_due or self._replays):
            return
        self._age_due = False
        if self._replays:
            from edgeway.outbox.deadletter import REPLAY_MAX  # it imports this module

            for rp in self._replays:
                rp.first_seq = self._next_seq
                self._next_seq += REPLAY_MAX
            # Replayed records are numbered below readings still to come:
            # early sinks must read them from the tail, in order.
            self._end_early(self._early_mask)
        job = _Job(
            self._submits,
            self._ops,
            bool(self._listeners),
            self._rejected,
            self._replays,
            self._next_seq,
        )
        self._replays = []
        self._rejected = {}
        if self._rejected_timer is not None:
            self._rejected_timer.cancel()
            self._rejected_timer = None
        self._submits = []
        self._shared = {}
        self._ops = []
        self._ops_urgent = False
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
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

    def _space_tick(self) -> None:
        """While the disk is full: a commit every :data:`SPACE_CHECK_INTERVAL`,
        so the writer checks for room even when nothing else commits."""
        assert self._loop is not None
        self._space_timer = None
        if self._closed or not self._disk_full:
            return
        self._age_due = True
        self._request_commit()
        self._space_timer = self._loop.call_later(SPACE_CHECK_INTERVAL, self._space_tick)

    def _set_disk_full(self, full: bool) -> None:
        self._disk_full = full
        if full and self._space_timer is None and not self._closed:
            assert self._loop is not None
            self._space_timer = self._loop.call_later(SPACE_CHECK_INTERVAL, self._space_tick)

    def _writer_main(self) -> None:
        writer = self._writer
        loop = self._loop
        assert writer is not None and loop is not None
        stopped = False
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    stopped = True
                    break
                try:
                    res = writer.run_job(job)
                    if writer.errors.active("commit"):
                        held = writer.errors.reset("commit")
                        log.warning("outbox commits succeed again (%d failures not logged)", held)
                except BaseException as e:  # reported to every waiter, then go on
                    writer.errors.log(
                        logging.ERROR, "commit", "outbox commit failed: %s", e, exc_info=e
                    )
                    res = _JobResult(error=e, disk_full=writer.disk_full)
                loop.call_soon_threadsafe(self._commit_done, job, res)
        finally:
            with contextlib.suppress(sqlite3.Error):
                if stopped:
                    # A clean stop (close() waited for every commit): every
                    # number given out was committed or refused, so the next
                    # start numbers on from here, without the lease's gap.
                    writer.conn.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('seq_lease', ?)",
                        (writer.next_seq,),
                    )
                writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            writer.conn.close()

    def _commit_done(self, job: _Job, res: _JobResult) -> None:
        self._committing = False
        if res.disk_full != self._disk_full:
            self._set_disk_full(res.disk_full)
        if res.error is not None:
            err = res.error
            # The job's numbers are used up (nothing is stored under them):
            # reads pass over them, and what waits on their commit goes on.
            self._high_seq = max(self._high_seq, job.next_seq - 1)
            if job.submits:
                # Records forwarded early and not read yet are read from the
                # tail if their commit comes (these were refused).
                self._end_early(self._all_mask, drop=True)
            for mask, n in job.rejected.items():  # counted with the next commit
                self._rejected[mask] = self._rejected.get(mask, 0) + n
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
                self._end_early(st.bit, drop=True)
                # The rewound rows are unread again: wake a caught-up runner
                # that waits for new rows (none may come while ingest is refused).
                st.unread += 1
                st.event.set()
                for fut in (op.fut, *op.merged):
                    if not fut.done():
                        fut.set_exception(RuntimeError(f"outbox commit failed: {err}"))
            for rp in job.replays:
                if not rp.fut.done():
                    rp.fut.set_exception(RuntimeError(f"outbox commit failed: {err}"))
        else:
            self.commits += 1
            if res.dropped:
                # Retention dropped records, maybe some forwarded early and not
                # read yet: those are read from the tail instead (without them).
                self._end_early(self._all_mask, drop=True)
            self._tail_add(job, res)
            self._high_seq = res.high_seq
            self._lease = res.lease
            self._total_bytes = res.total_bytes
            self._counters = {n: res.counters[n] for n in self.sink_names}
            self._oldest = res.oldest
            for sub, status in zip(job.submits, res.statuses, strict=True):
                if not sub.fut.done():
                    sub.fut.set_result(status)
                if sub.texts is not None and status is not IngestStatus.ACCEPTED:
                    # Refused (a full disk, reject_new), some forwarded early:
                    # those not read yet are not sent; the sinks read the tail.
                    self._end_early(self._all_mask, drop=True)
            for op in job.ops:
                self._reads[op.sink].cursor = op.cursor
                for fut in (op.fut, *op.merged):
                    if not fut.done():
                        fut.set_result(None)
            for rp in job.replays:
                if not rp.fut.done():
                    rp.fut.set_result(rp.count)
            for name, n in res.new_rows.items():
                st = self._reads[name]
                if st.pos >= res.high_seq:
                    continue  # all read already (forwarded early)
                st.unread += n
                st.event.set()
            if res.confirmed:
                for cb in self._listeners:
                    try:
                        cb(res.confirmed)
                    except Exception as e:
                        self._loop_errors.log(
                            logging.ERROR,
                            "listener",
                            "confirmed-listener failed: %s",
                            e,
                            exc_info=e,
                        )
        if self._commit_waiters:
            waiters, self._commit_waiters = self._commit_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)
        if self._after_commit:
            high = self._high_seq
            due = [then for seq, then in self._after_commit if seq <= high]
            self._after_commit = [(seq, then) for seq, then in self._after_commit if seq > high]
            for then in due:
                then()
            if not self._after_commit:
                self._deferred_urgent = False
        if self._submits or self._ops_urgent or self._replays:
            self._start_commit()
        elif self._ops:
            self._linger_ops()
        elif (
            self._rejected
            and res.error is None  # after a failure: with the next commit, not in a loop
            and self._rejected_timer is None
            and not self._closed
        ):
            assert self._loop is not None
            self._rejected_timer = self._loop.call_later(CONFIRM_LINGER, self._flush_rejected)
        if not self._committing:
            self._idle.set()

    # -- sink side --------------------------------------------------------

    async def read_batch(self, sink: str, max_records: int, max_bytes: int) -> Batch:
        """Read the next batch for ``sink``: priority rows first, then (under
        ``live_first`` during a catch-up) fresh rows sharing the batch with the
        backlog, else rows in sequence (per-device) order."""
        st = self._reads[sink]
        assert self._loop is not None and self._readers is not None
        if st.early_records:
            return self._read_early(st, sink, max_records, max_bytes)
        high = self._high_seq
        st.unread = 0
        st.event.clear()
        if st.pos >= high and st.live_start is None:
            # Nothing committed past what this sink read (maybe early).
            st.before_read = None
            self._may_forward(st)
            return Batch(sink, [], 0, st.pos, False, False, st.rewinds)
        st.before_read = (st.pos, st.prio_pos, st.live_start, st.live_pos, st.rewinds)
        live = False
        if self.config.drain == "live_first":
            if st.live_start is None and high - st.pos > 2 * max_records:
                st.live_start = high
                st.live_pos = high
                log.info("sink %s: catching up %d records, live first", sink, high - st.pos)
            live = st.live_start is not None
        if not live and self.tail_reads:
            batch = self._read_tail(st, sink, high, max_records, max_bytes)
            if batch is not None:
                if not batch.more:
                    self._may_forward(st)
                return batch
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
        records, nbytes, pos, prio_pos, live_pos, more, whole = await self._loop.run_in_executor(
            self._readers, self._read_sync, *args
        )
        if st.rewinds != rewinds:  # a confirmation failed meanwhile: read again
            return Batch(sink, [], 0, st.cursor, False, True, st.rewinds)
        st.pos = pos
        st.prio_pos = prio_pos
        out_of_order = bool(whole)
        if live:
            st.live_pos = live_pos
            out_of_order = True
            assert st.live_start is not None
            if pos >= st.live_start:
                st.live_start = None
        if not more and not out_of_order:
            self._may_forward(st)
        return Batch(sink, records, nbytes, pos, out_of_order, more, rewinds, whole)

    def _may_forward(self, st: _ReadState) -> None:
        """After a read that left nothing unread: if the sink has now read
        every record numbered so far (nothing is waiting for a commit), new
        readings are forwarded to it as they come (:meth:`_forward`)."""
        if (
            not self._early_mask & st.bit
            and self.config.forward_early
            and st.pos >= self._next_seq - 1
            and st.live_start is None
            and st.prio_pos <= st.pos
        ):
            self._early_mask |= st.bit

    def _read_early(self, st: _ReadState, sink: str, max_records: int, max_bytes: int) -> Batch:
        """The next records forwarded early (:meth:`_forward`), in order."""
        held = st.early_records
        take = nbytes = 0
        for r in held:
            size = len(r.json or b"")
            if take >= max_records or (take and nbytes + size > max_bytes):
                break
            take += 1
            nbytes += size
        records = held[:take]
        del held[:take]
        st.early_bytes -= nbytes
        st.pos = records[-1].seq
        st.unread = 0
        st.event.clear()
        st.before_read = None  # not given back: later records may follow it early
        # More: forwarded records left, or committed ones this sink has not
        # read (the sink went back to the tail for a priority reading).
        more = bool(held) or self._high_seq > st.pos
        return Batch(sink, records, nbytes, st.pos, False, more, st.rewinds, early=st.pos)

    def priority_mark(self, sink: str) -> int:
        """A number that grows each time priority rows for ``sink`` are
        committed: a runner holding a batch read ahead compares it with the
        mark taken before that read, to know whether to :meth:`give_back`."""
        return self._reads[sink].priority_commits

    def give_back(self, batch: Batch) -> bool:
        """Put the reads of ``sink`` back to where they were before ``batch``,
        its latest read, which was not sent: the next read starts there again
        (priority rows first). False (nothing changed) if ``batch`` is not the
        latest read or a rewind came since."""
        st = self._reads[batch.sink]
        before = st.before_read
        if (
            before is None
            or before[4] != st.rewinds  # a rewind since: the reads start afresh anyway
            or batch.generation != st.rewinds
            or batch.cursor != st.pos
        ):
            return False
        st.pos, st.prio_pos, st.live_start, st.live_pos, _ = before
        st.before_read = None
        return True

    def _read_tail(
        self, st: _ReadState, sink: str, high: int, max_records: int, max_bytes: int
    ) -> Batch | None:
        """The ordered read from the in-memory tail, on the loop: None unless
        the tail holds every chunk after the sink's position and no priority
        chunk is among them or was read ahead of it (the reader threads'
        query handles those)."""
        pos = st.pos
        if pos + 1 < self._tail_lo or st.prio_pos > pos or high - pos > SCAN_WINDOW:
            return None
        bit = st.bit
        i = max(bisect.bisect_right(self._tail, pos, key=_FIRST) - 1, 0)
        rows: Iterable[list[Any]]
        if self._tail_prio:
            rows = [e for e in itertools.islice(self._tail, i, None) if e[1] > pos and e[2] & bit]
            if any(e[4] for e in rows):
                return None
        else:
            # Only as far as the batch goes: a sink far behind in a large
            # tail must not walk all of it for every batch.
            rows = (e for e in itertools.islice(self._tail, i, None) if e[1] > pos and e[2] & bit)
        acc = _Taken(max_bytes)
        pos, more = acc.scan(rows, pos, high, high, max_records)
        st.pos = pos
        if not acc.texts:
            records = []
        elif acc.devices is not None and acc.prefix is not None:
            records = known_records(acc.seqs, acc.prios, acc.texts, acc.devices, acc.prefix)
        else:
            records = stored_records(acc.seqs, acc.prios, acc.texts)
        return Batch(sink, records, acc.nbytes, pos, False, more, st.rewinds)

    def _tail_add(self, job: _Job, res: _JobResult) -> None:
        """Keep the chunks a commit inserted in the tail (see :data:`TAIL_MAX_CHUNKS`)."""
        tail = self._tail
        if res.dropped:
            # Retention changed rows, possibly in the tail: start it afresh.
            tail.clear()
            self._tail_bytes = 0
            self._tail_prio = 0
            self._tail_lo = res.high_seq + 1
            return
        for op in job.ops:
            if op.chunks:  # chunks confirmed whole ahead of the cursor
                clear = ~self._reads[op.sink].bit
                for first in op.chunks:
                    i = bisect.bisect_left(tail, first, key=_FIRST)
                    if i < len(tail) and tail[i][0] == first:
                        tail[i][2] &= clear
        prio_mask = 0
        known = res.chunk_devices
        prefix = res.id_prefix
        for first, last, pending, _created, size, prio, data, _msgs in res.chunks:
            devices = known.get(first)
            tail.append(
                [
                    first,
                    last,
                    pending,
                    size,
                    prio,
                    data,
                    None if devices is None else (prefix, devices),
                ]
            )
            self._tail_bytes += len(data)
            if prio:
                prio_mask |= pending
                self._tail_prio += 1
        if prio_mask:
            for st in self._reads.values():
                if prio_mask & st.bit:
                    st.priority_commits += 1
        # Let the oldest go until both limits hold.
        k, nbytes = 0, self._tail_bytes
        while k < len(tail) and (len(tail) - k > TAIL_MAX_CHUNKS or nbytes > TAIL_MAX_BYTES):
            nbytes -= len(tail[k][5])
            if tail[k][4]:
                self._tail_prio -= 1
            k += 1
        if k:
            self._tail_lo = tail[k - 1][1] + 1
            del tail[:k]
            self._tail_bytes = nbytes

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
    ) -> tuple[list[Record], int, int, int, int, bool, list[int]]:
        conn = self._reader()
        acc = _Taken(max_bytes)
        more = False
        conn.execute("BEGIN")  # one snapshot for the three queries
        try:
            # 1. priority chunks ahead of the ordered position (partial index)
            lo = max(pos, prio_pos)
            if lo < high:
                rows = conn.execute(
                    f"SELECT {_CHUNK_COLS} FROM chunks INDEXED BY chunks_priority "
                    "WHERE priority > 0 AND seq_first > ? AND seq_first <= ? "
                    "AND (pending & ?) != 0 ORDER BY seq_first",
                    (lo, high, bit),
                )
                for row in rows:
                    if len(acc.texts) >= max_records or not acc.take_whole(
                        row, max_records - len(acc.texts)
                    ):
                        more = True
                        break
                    prio_pos = row[1]
                rows.close()
            # 2. under live_first, fresh chunks take up to half of the batch
            if live and live_start is not None and len(acc.texts) < max_records and live_pos < high:
                half = max((max_records - len(acc.texts)) // 2, 1)
                goal = len(acc.texts) + half
                rows = conn.execute(
                    f"SELECT {_CHUNK_COLS} FROM chunks WHERE seq_first > ? AND seq_first <= ? "
                    "AND (pending & ?) != 0 ORDER BY seq_first",
                    (live_pos, high, bit),
                )
                for row in rows:
                    if row[0] in acc.taken:
                        live_pos = row[1]
                        continue
                    if len(acc.texts) >= goal or not acc.take_whole(row, goal - len(acc.texts)):
                        more = True
                        break
                    live_pos = row[1]
                else:
                    live_pos = high
                rows.close()
            # 3. the ordered backlog (under live_first: up to where the catch-up began)
            upper = live_start if (live and live_start is not None) else high
            if pos < upper:
                if len(acc.texts) < max_records and not (acc.texts and acc.nbytes >= max_bytes):
                    bounded = min(upper, pos + SCAN_WINDOW)
                    rows = conn.execute(
                        f"SELECT {_CHUNK_COLS} FROM chunks WHERE seq_first > ? "
                        "AND seq_first <= ? AND seq_last > ? AND (pending & ?) != 0 "
                        "ORDER BY seq_first",
                        (pos - CHUNK_MAX, bounded, pos, bit),
                    )
                    try:
                        pos, rest = acc.scan(
                            rows, pos, upper, bounded, max_records - len(acc.texts)
                        )
                    finally:
                        rows.close()
                    more = more or rest
                else:
                    more = True
        finally:
            conn.execute("COMMIT")
        if not acc.texts:
            return [], 0, pos, prio_pos, live_pos, more, acc.whole
        records = stored_records(acc.seqs, acc.prios, acc.texts)
        return records, acc.nbytes, pos, prio_pos, live_pos, more, acc.whole

    async def refresh_batch(self, batch: Batch) -> Batch:
        """``batch`` without the records that retention dropped since it was read.

        A runner calls this before retrying a batch, so that a record dropped
        (and counted as dropped) while its sink was down is not delivered after
        all. Without retention limits nothing can be dropped: no query.
        """
        cfg = self.config
        # A sink that retries is not caught up: it reads what comes next from
        # the tail, not from records forwarded early and held meanwhile.
        self._end_early(self._reads[batch.sink].bit, drop=True)
        # Forwarded early: what is kept is known once its commit ended.
        await self.wait_committed(batch.early)
        if not batch.records or (
            cfg.max_age is None and (cfg.max_bytes is None or cfg.when_full != "drop_oldest")
        ):
            return batch
        assert self._loop is not None and self._readers is not None
        bit = self._reads[batch.sink].bit
        lo = min(r.seq for r in batch.records)
        hi = max(r.seq for r in batch.records)

        def still_pending() -> list[tuple[int, int]]:
            return (
                self._reader()
                .execute(
                    "SELECT seq_first, seq_last FROM chunks WHERE seq_first > ? AND seq_first <= ? "
                    "AND seq_last >= ? AND (pending & ?) != 0 ORDER BY seq_first",
                    (lo - CHUNK_MAX, hi, lo, bit),
                )
                .fetchall()
            )

        ranges = await self._loop.run_in_executor(self._readers, still_pending)
        starts = [first for first, _ in ranges]

        def kept(seq: int) -> bool:
            i = bisect.bisect_right(starts, seq) - 1
            return i >= 0 and seq <= ranges[i][1]

        records = [r for r in batch.records if kept(r.seq)]
        if len(records) == len(batch.records):
            return batch
        kept_bytes = batch.nbytes * len(records) // len(batch.records)
        firsts = set(starts)
        return Batch(
            batch.sink,
            records,
            kept_bytes,
            batch.cursor,
            batch.out_of_order,
            batch.more,
            batch.generation,
            [c for c in batch.chunks if c in firsts],
            batch.early,
        )

    async def wait_committed(self, seq: int) -> None:
        """Wait until the group commit holding record ``seq`` ended
        (committed, or failed: then nothing is stored under it)."""
        if seq <= self._high_seq:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._after_commit.append((seq, functools.partial(_resolve, fut)))
        await fut

    def confirm(self, batch: Batch, *, linger: bool = False) -> asyncio.Future[None]:
        """The sink confirmed ``batch``: clear its bit, delete rows no sink still
        needs, persist the cursor. Joins the next group commit; with ``linger``
        (the sink is caught up), that may be up to :data:`CONFIRM_LINGER` away."""
        return self._queue_op("confirm", batch, "", linger)

    def dead_letter(self, batch: Batch, error: str) -> asyncio.Future[None]:
        """The sink refused ``batch`` for good: copy it to the dead-letter table,
        count it as dropped (``dead_letter``) for that sink and move on."""
        return self._queue_op("dead_letter", batch, error, False)

    def replay_dead_letters(
        self, *, sink: str | None = None, ids: Sequence[int] | None = None
    ) -> asyncio.Future[int]:
        """Queue dead letters again while the gateway runs (all of ``sink``'s,
        or those in ``ids``; at most :data:`~edgeway.outbox.deadletter.REPLAY_MAX`
        per call, oldest first): in the next group commit, with their record
        ids, counted as accepted again. Resolves to how many."""
        assert self._loop is not None
        fut: asyncio.Future[int] = self._loop.create_future()
        if self._closed:
            fut.set_exception(RuntimeError("outbox is closed"))
            return fut
        self._replays.append(_Replay(sink, list(ids) if ids else None, fut))
        self._request_commit()
        return fut

    def expedite(self) -> None:
        """Commit the queued confirmations now (someone waits on one)."""
        if self._after_commit:
            self._deferred_urgent = True
        if not self._ops or self._ops_urgent:
            return
        self._ops_urgent = True
        if not self._committing:
            self._request_commit()

    def _linger_ops(self) -> None:
        if self._linger is None:
            assert self._loop is not None
            self._linger = self._loop.call_later(CONFIRM_LINGER, self._linger_done)

    def _linger_done(self) -> None:
        self._linger = None
        self.expedite()

    def _queue_op(self, kind: str, batch: Batch, error: str, linger: bool) -> asyncio.Future[None]:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._closed:
            fut.set_exception(RuntimeError("outbox is closed"))
            return fut
        if batch.early > self._high_seq:
            # Its records' commit has not ended yet: the confirmation (which
            # reads their rows) waits for it.
            self._after_commit.append(
                (batch.early, functools.partial(self._held_op, kind, batch, error, linger, fut))
            )
            return fut
        return self._add_op(kind, batch, error, linger, fut)

    def _held_op(
        self, kind: str, batch: Batch, error: str, linger: bool, fut: asyncio.Future[None]
    ) -> None:
        """A confirmation held for its records' commit, queued now it ended."""
        if not fut.done():
            self._add_op(kind, batch, error, linger and not self._deferred_urgent, fut)

    def _add_op(
        self, kind: str, batch: Batch, error: str, linger: bool, fut: asyncio.Future[None]
    ) -> asyncio.Future[None]:
        if batch.generation != self._reads[batch.sink].rewinds:
            # Read before a failed confirmation rewound this sink: its rows are
            # read and sent again, and confirmed then.
            fut.set_result(None)
            return fut
        last = self._ops[-1] if self._ops else None
        if (
            kind == "confirm"
            and last is not None
            and last.kind == "confirm"
            and last.sink == batch.sink
            and last.generation == batch.generation
            and not last.chunks
            and not batch.chunks
            and batch.cursor >= last.cursor
        ):
            # The next batch of the same sink in order (many small ones when
            # it keeps up): one cursor move covers both, one set of
            # statements in the commit instead of one per batch.
            last.cursor = batch.cursor
            if not last.merged:
                last.records = list(last.records)  # it was the batch's own list
            last.records.extend(batch.records)
            last.merged.append(fut)
        else:
            self._ops.append(
                _Op(
                    kind,
                    batch.sink,
                    batch.cursor,
                    batch.chunks,
                    # The records (a reference, not a copy): a confirmation needs
                    # their seqs if retention dropped some while they were sent.
                    batch.records,
                    error,
                    fut,
                    batch.generation,
                )
            )
        if not linger:
            self._ops_urgent = True
            self._request_commit()
        elif not (self._committing or self._scheduled):
            self._linger_ops()  # else the commit under way or due takes it
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


def _create_schema(conn: sqlite3.Connection) -> None:
    """Schema 2's tables (``IF NOT EXISTS``), inside the caller's transaction."""
    for statement in split_statements(_SCHEMA):
        conn.execute(statement)


def _to_chunks(conn: sqlite3.Connection) -> None:
    """Migration to schema 2: the chunk tables; a schema-1 file's ``records``
    moved into them and its stored bytes recounted."""
    _create_schema(conn)
    if conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
    ).fetchone():
        epochs = conn.execute(
            "SELECT from_seq, gateway_id FROM epochs ORDER BY from_seq"
        ).fetchall()
        total = _migrate_v1(conn, epochs)
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('total_bytes', ?)", (total,))


MIGRATIONS: list[Migration] = [_create_schema, _to_chunks]
"""Schema versions (see :data:`SCHEMA_VERSION`): a new file gets schema 2's
tables at once (the first migration) and finds nothing to move (the second);
a schema-1 file gets the second only. Each runs in its own transaction with
its version bump (:func:`edgeway.storage.sqlite.migrate`)."""


def check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a file written by a newer edgeway (offline commands that open
    the outbox without running its migrations: dead letters, purge)."""
    check_version(conn, len(MIGRATIONS), f"{path}: outbox", VERSION)


def _migrate_v1(conn: sqlite3.Connection, epochs: list[tuple[int, str]]) -> int:
    """Schema 1 -> 2 (inside the migration's transaction): every ``records`` row becomes
    a record of a chunk, with its sequence, record id, sinks and priority; the
    ``records`` table is dropped. Returns the stored bytes, recounted.

    One pass in sequence order, 10,000 rows at a time; done once, at the first
    start of an edgeway with chunks (about a second per million rows here)."""
    record_id = record_ids(epochs)
    builder = ChunkBuilder()
    after = 0
    moved = 0
    while True:
        batch = conn.execute(
            "SELECT seq, pending, created, priority, device_id, ts, metrics, tags, msg_id "
            "FROM records WHERE seq > ? ORDER BY seq LIMIT 10000",
            (after,),
        ).fetchall()
        if not batch:
            break
        for seq, pending, created, prio, device_id, ts, metrics, tags, msg_id in batch:
            text = text_from_columns(record_id(seq), device_id, ts, metrics, tags, prio)
            builder.add(seq, [text], [record_size(text, seq)], [msg_id], pending, prio, created)
        after = batch[-1][0]
        moved += len(batch)
        conn.executemany(INSERT_CHUNK, builder.rows(keep_open=True))
    conn.executemany(INSERT_CHUNK, builder.rows())
    conn.execute("DROP TABLE records")
    (total,) = conn.execute("SELECT coalesce(sum(size), 0) FROM chunks").fetchone()
    log.info("outbox: moved %d stored records to schema 2 (chunks)", moved)
    return int(total)
