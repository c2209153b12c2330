"""One SQLite database with a single writer thread and group commit.

The durable stores that are not the outbox (commands today; the registry,
twins, alarms and models as they come) share this helper instead of each
hand-making a connection, pragmas, a thread and a schema check::

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
edgeway (a version above the list) is refused, not guessed at.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Migration = str | Callable[[sqlite3.Connection], None]

BUSY_TIMEOUT_MS = 5_000
"""How long a statement waits for a lock held by another connection (an
``edgeway`` CLI command reading the same file) before failing."""


class StorageError(Exception):
    """The database cannot be opened or is from a newer edgeway."""


@dataclass(slots=True)
class _Op(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    write: bool


def connect(path: Path, durability: Literal["fsync", "os"] = "fsync") -> sqlite3.Connection:
    """A connection with the pragmas every edgeway store uses (WAL; FULL
    synchronous for ``fsync`` so a commit survives a power cut, NORMAL for
    ``os`` so it survives a process crash)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=" + ("FULL" if durability == "fsync" else "NORMAL"))
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration], name: str) -> int:
    """Apply the migrations not yet applied; returns the schema version."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    version = int(row[0]) if row else 0
    if version > len(migrations):
        raise StorageError(
            f"{name}: schema version {version} is newer than this edgeway knows "
            f"({len(migrations)}); was it written by a newer release?"
        )
    for i in range(version, len(migrations)):
        step = migrations[i]
        conn.execute("BEGIN IMMEDIATE")
        try:
            if isinstance(step, str):
                for statement in _statements(step):
                    conn.execute(statement)
            else:
                step(conn)
            if row is None and i == 0:
                conn.execute("INSERT INTO schema_version(version) VALUES (?)", (i + 1,))
            else:
                conn.execute("UPDATE schema_version SET version = ?", (i + 1,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        row = (i + 1,)
    return len(migrations)


def _statements(script: str) -> list[str]:
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
    ) -> None:
        self.path = path
        self.migrations = list(migrations)
        self.durability = durability
        self.name = name or path.name
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
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def _open() -> sqlite3.Connection:
            conn = connect(self.path, self.durability)
            try:
                migrate(conn, self.migrations, self.name)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            self._conn = await asyncio.to_thread(_open)
        except sqlite3.Error as e:
            raise StorageError(f"{self.path}: {e}") from e
        self._thread = threading.Thread(target=self._main, name=f"db:{self.name}", daemon=True)
        self._thread.start()

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn`` in the next group transaction; the future resolves with
        its result after COMMIT (or with its exception, rolled back alone)."""
        return self._queue(fn, write=True)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the writer thread outside any transaction."""
        return self._queue(fn, write=False)

    def _queue(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> asyncio.Future[T]:
        if self._loop is None or self._thread is None or self._closing:
            raise StorageError(f"{self.name} is not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        with self._cond:
            self._ops.append(_Op(fn, fut, write))
            self._cond.notify()
        return fut

    async def close(self) -> None:
        """Finish what is queued, stop the thread, close the file."""
        if self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

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
        assert conn is not None and self._loop is not None
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
        self._loop.call_soon_threadsafe(_resolve_all, results)


def _resolve_all(results: list[tuple[_Op[Any], bool, Any]]) -> None:
    for op, ok, value in results:
        if op.future.done():
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)
