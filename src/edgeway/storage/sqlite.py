"""One SQLite database with a single writer thread and group commit.

Every durable store shares this helper instead of hand-making a connection,
pragmas, a thread and a schema check (which of it each uses: at the end)::

    db = Database(data_dir / "commands.db", migrations=[SCHEMA_V1], durability="fsync")
    await db.open()
    row_id = await db.write(lambda conn: conn.execute("INSERT ...").lastrowid)
    rows = await db.read(lambda conn: conn.execute("SELECT ...").fetchall())
    await db.close()

Writes are functions run on the writer thread. Every write queued while the
previous commit was in progress runs in the next transaction: one COMMIT (and
one fsync with ``durability: fsync``) for all of them, so a burst of 5,000
command submits costs a few commits, not 5,000. Each write runs inside a
SAVEPOINT: one that raises is rolled back alone and its future gets the
exception; the others commit. A write's future resolves only after COMMIT
returned, so "queued" means "on disk".

Reads run on the same thread, between transactions: these stores are small
and read rarely (a listing, a restart), and one thread keeps the ordering
obvious (a read after a write's future resolved sees the write).

Migrations are a list of SQL scripts (or functions of the connection); the
number applied is kept in a ``schema_version`` table, so a newer edgeway
applies only the scripts an older one did not. A database from a newer
edgeway (a version above the list) is refused, not guessed at. A store that
kept its version elsewhere before this helper existed (the outbox: a ``meta``
row) names that place with a :class:`VersionSlot`, so its files keep their
format and move between releases of the same schema both ways.

Which store uses what, and why not all of it:

* commands, models, the pipeline state, the broker's persistence: all of it
  (:func:`connect`, :func:`migrate`, the writer thread and group commit). The
  broker's write-behind is fire-and-forget (:meth:`Database.post`) and its
  API synchronous (:meth:`Database.open_sync`, :meth:`Database.call_sync`,
  :meth:`Database.close_sync`).
* the admin API's tokens: :func:`connect` and :func:`migrate` only; the CLI
  and the gateway both write that file, synchronously, the gateway with no
  busy wait.
* the outbox: :func:`connect` (with its extra pragmas), :func:`migrate` (its
  version in ``meta``), :func:`acquire_lock` (the data directory's lock, an
  ``flock`` on ``outbox.db.lock``). It keeps its own writer thread, because
  moving it here would cost its hot path: its group commit carries per-job
  state the generic one has no place for (the in-memory tail handed to the
  sinks after the commit, sink confirmations that linger for the next commit
  of readings, retention and the full-disk reserve decided inside the
  transaction, with a retry of the same job when the disk is full), and it
  costs about 3 us per record, where a closure, a future and a SAVEPOINT per
  write would add to that (``bench/results/storage-2026-12-06.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Migration = str | Callable[[sqlite3.Connection], None]

BUSY_TIMEOUT_MS = 5_000
"""How long a statement waits for a lock held by another connection (an
``edgeway`` CLI command reading the same file) before failing."""


class StorageError(RuntimeError):
    """The database cannot be opened, is from a newer edgeway, or is in use by
    another process (a ``RuntimeError``, as the outbox raised before)."""


@dataclass(slots=True)
class _Op(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T] | None
    """None: a :meth:`Database.post` (nobody waits; a failure is logged)."""
    write: bool
    done: threading.Event | None = None
    """Set when the op ran (a :meth:`Database.wait_sync` barrier)."""


def connect(
    path: Path,
    durability: Literal["fsync", "os"] = "fsync",
    *,
    busy_timeout: float = BUSY_TIMEOUT_MS / 1000,
    foreign_keys: bool = True,
    incremental_vacuum: bool = False,
    journal_size_limit: int | None = None,
) -> sqlite3.Connection:
    """A connection with the pragmas every edgeway store uses (WAL; FULL
    synchronous for ``fsync`` so a commit survives a power cut, NORMAL for
    ``os`` so it survives a process crash).

    ``incremental_vacuum``: a *new* file gets ``auto_vacuum=INCREMENTAL``, so
    pages freed later can be given back to the filesystem (the outbox needs
    it to recover from a full disk); only possible before the first table
    exists, so an older file keeps its setting. ``journal_size_limit``: bytes
    of WAL kept after a checkpoint (a long backlog must not leave a huge WAL).
    """
    # isolation_level=None: BEGIN/COMMIT are ours (one per group commit).
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
    )
    try:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        if incremental_vacuum and conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=" + ("FULL" if durability == "fsync" else "NORMAL"))
        if foreign_keys:
            conn.execute("PRAGMA foreign_keys=ON")
        if journal_size_limit is not None:
            conn.execute(f"PRAGMA journal_size_limit={int(journal_size_limit)}")
    except BaseException:
        conn.close()
        raise
    return conn


class VersionSlot(Protocol):
    """Where a database keeps the number of migrations applied to it."""

    def read(self, conn: sqlite3.Connection) -> int | None:
        """The version, or None for a database that has none yet."""
        ...

    def write(self, conn: sqlite3.Connection, version: int) -> None:
        """Store ``version`` (inside the migration's transaction)."""
        ...


class VersionTable:
    """The default slot: a one-row ``schema_version`` table."""

    def read(self, conn: sqlite3.Connection) -> int | None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else None

    def write(self, conn: sqlite3.Connection, version: int) -> None:
        if conn.execute("UPDATE schema_version SET version = ?", (version,)).rowcount == 0:
            conn.execute("INSERT INTO schema_version(version) VALUES (?)", (version,))


@dataclass(frozen=True, slots=True)
class MetaVersion:
    """A version kept as a ``(key, value)`` row of a table the migrations
    create (the outbox's ``meta``), for stores older than this helper."""

    table: str = "meta"
    key: str = "schema_version"

    def read(self, conn: sqlite3.Connection) -> int | None:
        if not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (self.table,)
        ).fetchone():
            return None
        row = conn.execute(f"SELECT value FROM {self.table} WHERE key = ?", (self.key,)).fetchone()
        return int(row[0]) if row else None

    def write(self, conn: sqlite3.Connection, version: int) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO {self.table}(key, value) VALUES (?, ?)", (self.key, version)
        )


def check_version(
    conn: sqlite3.Connection, known: int, name: str, slot: VersionSlot | None = None
) -> int:
    """The database's version (0: none yet); :class:`StorageError` if it is
    above ``known``, the number of migrations this edgeway has."""
    version = (slot or VersionTable()).read(conn) or 0
    if version > known:
        raise StorageError(
            f"{name}: schema version {version} is newer than this edgeway knows "
            f"({known}); was it written by a newer release? Upgrade edgeway, or restore "
            "the data directory's backup from before the upgrade "
            "(docs/install.md#upgrades-and-downgrades)"
        )
    return version


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration],
    name: str,
    *,
    version: VersionSlot | None = None,
) -> int:
    """Apply the migrations not yet applied, each in its own transaction with
    its version bump; returns the schema version.

    A database with no version yet (new, or made before its store used this
    helper) gets every migration, so the first ones must be written to find
    what is already there (``CREATE ... IF NOT EXISTS``, :func:`add_column`)."""
    slot = version or VersionTable()
    current = check_version(conn, len(migrations), name, slot)
    for i in range(current, len(migrations)):
        step = migrations[i]
        conn.execute("BEGIN IMMEDIATE")
        try:
            if isinstance(step, str):
                for statement in split_statements(step):
                    conn.execute(statement)
            else:
                step(conn)
            slot.write(conn, i + 1)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
    return len(migrations)


def add_column(conn: sqlite3.Connection, table: str, column: str, decl: str) -> None:
    """``ALTER TABLE table ADD COLUMN`` unless the column is there (a migration
    that must also run on files made before versions were kept)."""
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    if column not in have:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def acquire_lock(db_path: Path) -> int:
    """Take a database's exclusive lock (one process per data directory).

    The lock is an ``flock`` on ``<file>.lock`` (``outbox.db.lock``): the
    kernel drops it when the process dies, so a SIGKILL never leaves a stale
    lock behind. Raises :class:`StorageError` if another process holds it.
    """
    lock_path = db_path.with_name(db_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageError(
            f"{db_path} is in use by another edgeway process (lock {lock_path})"
        ) from None
    return fd


def release_lock(fd: int | None) -> None:
    """Release a lock taken by :func:`acquire_lock`."""
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def split_statements(script: str) -> list[str]:
    """Split a script on ';' at statement ends (sqlite3.complete_statement),
    so a migration runs inside our transaction (executescript would commit)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


class Database:
    """A SQLite file owned by one writer thread; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        migrations: Sequence[Migration],
        durability: Literal["fsync", "os"] = "fsync",
        name: str | None = None,
        version: VersionSlot | None = None,
        checkpoint_on_close: bool = False,
        wake_per_turn: bool = False,
    ) -> None:
        """``checkpoint_on_close``: fold the WAL into the file at close, so a
        store that is mostly empty between runs leaves no WAL behind."""
        self.path = path
        self.migrations = list(migrations)
        self.durability = durability
        self.name = name or path.name
        self.version = version
        self.checkpoint_on_close = checkpoint_on_close
        self.wake_per_turn = wake_per_turn
        """Writes queued from the event loop wake the writer thread once, at
        the end of the loop's turn, not each (a burst of writes made in one
        turn then costs one thread wake-up, and the thread does not take the
        GIL from the loop in the middle of the burst)."""
        self._wake_due = False
        self.commits = 0
        """Transactions committed (a write group is one)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._ops: list[_Op[Any]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    async def open(self) -> None:
        """Open (creating if needed), migrate, start the writer thread."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_conn)
        self._start_thread()

    def open_sync(self) -> None:
        """:meth:`open` for a caller without a running loop, or one that may
        block it for the open (the broker's start). Without a loop only
        :meth:`post` and :meth:`wait_sync` are usable."""
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._open_conn()
        self._start_thread()

    def _open_conn(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = connect(self.path, self.durability)
            try:
                # The path in the name: a refusal must say which file (docs/install.md).
                migrate(conn, self.migrations, f"{self.path}: {self.name}", version=self.version)
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as e:
            raise StorageError(f"{self.path}: {e}") from e
        self._conn = conn

    def _start_thread(self) -> None:
        self._closing = False
        self._thread = threading.Thread(target=self._main, name=f"db:{self.name}", daemon=True)
        self._thread.start()

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn`` in the next group transaction; the future resolves with
        its result after COMMIT (or with its exception, rolled back alone)."""
        return self._queue(fn, write=True)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the writer thread outside any transaction."""
        return self._queue(fn, write=False)

    def post(self, fn: Callable[[sqlite3.Connection], object]) -> None:
        """A write nobody waits for (write-behind): it runs in the next group
        transaction like :meth:`write`; a failure is logged and rolled back
        alone. Callable from any thread, with or without a loop."""
        self._enqueue(_Op(fn, None, True))

    def call_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer thread outside any transaction, after
        everything queued so far, and block for its result (the broker's
        synchronous load at start; a barrier)."""
        done = threading.Event()
        box: list[Any] = []

        def run(conn: sqlite3.Connection) -> None:
            try:
                box.append((True, fn(conn)))
            except Exception as e:
                box.append((False, e))

        self._enqueue(_Op(run, None, False, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        result: T = value
        return result

    def wait_sync(self) -> None:
        """Block until everything queued so far ran."""
        self.call_sync(_nothing)

    def _queue(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> asyncio.Future[T]:
        if self._loop is None:
            raise StorageError(f"{self.name} is not open on an event loop")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._enqueue(_Op(fn, fut, write))
        return fut

    def _enqueue(self, op: _Op[Any]) -> None:
        if self._thread is None or self._closing:
            raise StorageError(f"{self.name} is not open")
        loop = self._loop
        if self.wake_per_turn and loop is not None and op.done is None and _on_loop(loop):
            with self._cond:
                self._ops.append(op)
            if not self._wake_due:
                self._wake_due = True
                loop.call_soon(self._wake)
            return
        with self._cond:
            self._ops.append(op)
            self._cond.notify()

    def _wake(self) -> None:
        self._wake_due = False
        with self._cond:
            self._cond.notify()

    async def close(self) -> None:
        """Finish what is queued, stop the thread, close the file."""
        if self._thread is None:
            return
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        """:meth:`close`, blocking the caller."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        thread.join()
        self._thread = None
        conn, self._conn = self._conn, None
        if conn is not None:
            if self.checkpoint_on_close:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()

    # ------------------------------------------------------------ writer thread

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._closing:
                    self._cond.wait()
                ops, self._ops = self._ops, []
                closing = self._closing
            if ops:
                self._run(ops)
            if closing and not ops:
                return

    def _run(self, ops: list[_Op[Any]]) -> None:
        conn = self._conn
        assert conn is not None
        results: list[tuple[_Op[Any], bool, Any]] = []
        writes = [op for op in ops if op.write]
        if writes:
            try:
                conn.execute("BEGIN IMMEDIATE")
                for i, op in enumerate(writes):
                    sp = f"w{i}"
                    conn.execute(f"SAVEPOINT {sp}")
                    try:
                        value = op.fn(conn)
                    except Exception as e:
                        conn.execute(f"ROLLBACK TO {sp}")
                        conn.execute(f"RELEASE {sp}")
                        results.append((op, False, e))
                    else:
                        conn.execute(f"RELEASE {sp}")
                        results.append((op, True, value))
                conn.execute("COMMIT")
                self.commits += 1
            except sqlite3.Error as e:
                # The commit itself failed (disk full, I/O error): nothing of
                # this group is durable, so every write of it fails.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                results = [(op, False, e) for op in writes]
        for op in ops:
            if op.write:
                continue
            try:
                results.append((op, True, op.fn(conn)))
            except Exception as e:
                results.append((op, False, e))
        waited: list[tuple[_Op[Any], bool, Any]] = []
        for op, ok, value in results:
            if op.done is not None:
                op.done.set()
            if op.future is not None:
                waited.append((op, ok, value))
            elif not ok:
                log.error("%s: a write-behind failed and was rolled back: %s", self.name, value)
        if waited and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve_all, waited)


def _nothing(conn: sqlite3.Connection) -> None:
    return None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _resolve_all(results: list[tuple[_Op[Any], bool, Any]]) -> None:
    for op, ok, value in results:
        fut = op.future
        if fut is None or fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
