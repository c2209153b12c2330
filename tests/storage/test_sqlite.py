"""The shared SQLite helper: group commit, savepoints, migrations with a
version slot, refusal of a newer schema, the data-directory lock, and the
write-behind mode the broker uses."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edgeway.config import OutboxSection
from edgeway.outbox import Outbox, list_dead_letters
from edgeway.storage.sqlite import (
    Database,
    MetaVersion,
    StorageError,
    acquire_lock,
    add_column,
    connect,
    migrate,
    release_lock,
)

V1 = "CREATE TABLE IF NOT EXISTS t(k TEXT PRIMARY KEY, v INTEGER NOT NULL);"


def _add_note(conn: sqlite3.Connection) -> None:
    add_column(conn, "t", "note", "TEXT")


async def test_writes_of_one_burst_share_one_commit_and_a_failing_one_rolls_back_alone(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "a.db", migrations=[V1])
    await db.open()
    try:
        before = db.commits

        def put(k: str) -> asyncio.Future[None]:
            return db.write(lambda c: c.execute("INSERT INTO t VALUES (?, 1)", (k,)) and None)

        def bad(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO t VALUES ('bad', 1)")
            raise ValueError("refused")

        futs = [put(f"k{i}") for i in range(50)]
        failing = db.write(bad)
        futs += [put(f"m{i}") for i in range(50)]
        await asyncio.gather(*futs)
        with pytest.raises(ValueError, match="refused"):
            await failing
        # The thread may have taken the first write alone before the rest
        # were queued: at most two transactions for 101 writes.
        assert db.commits - before <= 2
        n = await db.read(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0])
        assert n == 100
        assert (
            await db.read(lambda c: c.execute("SELECT 1 FROM t WHERE k='bad'").fetchone()) is None
        )
    finally:
        await db.close()


async def test_migrations_apply_once_and_a_newer_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    db = Database(path, migrations=[V1])
    await db.open()
    await db.write(lambda c: c.execute("INSERT INTO t VALUES ('a', 1)") and None)
    await db.close()

    db = Database(path, migrations=[V1, _add_note])
    await db.open()
    await db.write(lambda c: c.execute("INSERT INTO t VALUES ('b', 2, 'x')") and None)
    await db.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        assert conn.execute("SELECT k, note FROM t ORDER BY k").fetchall() == [
            ("a", None),
            ("b", "x"),
        ]

    # An older edgeway (one migration) must not guess at a version-2 file.
    old = Database(path, migrations=[V1], name="things")
    with pytest.raises(StorageError, match="things: schema version 2 is newer"):
        await old.open()


def test_a_migration_that_fails_leaves_the_version_where_it_was(tmp_path: Path) -> None:
    path = tmp_path / "f.db"

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half(x)")
        raise RuntimeError("migration bug")

    conn = connect(path)
    try:
        with pytest.raises(RuntimeError, match="migration bug"):
            migrate(conn, [V1, broken], "f")
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        assert conn.execute("SELECT name FROM sqlite_master WHERE name='half'").fetchone() is None
        assert migrate(conn, [V1, _add_note], "f") == 2
    finally:
        conn.close()


def test_a_version_kept_in_a_meta_row(tmp_path: Path) -> None:
    meta = "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;"
    conn = connect(tmp_path / "meta.db")
    try:
        slot = MetaVersion("meta", "schema_version")
        assert slot.read(conn) is None  # no table yet
        assert migrate(conn, [meta, V1], "meta", version=slot) == 2
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (2,)
        assert (
            conn.execute("SELECT name FROM sqlite_master WHERE name='schema_version'").fetchone()
            is None
        )
        conn.execute("UPDATE meta SET value = 3 WHERE key = 'schema_version'")
        with pytest.raises(StorageError, match="schema version 3 is newer than this edgeway knows"):
            migrate(conn, [meta, V1], "meta", version=slot)
    finally:
        conn.close()


def test_connect_pragmas(tmp_path: Path) -> None:
    conn = connect(tmp_path / "p.db", "os", incremental_vacuum=True, journal_size_limit=4096)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # INCREMENTAL
        assert conn.execute("PRAGMA journal_size_limit").fetchone() == (4096,)
    finally:
        conn.close()
    conn = connect(tmp_path / "q.db")
    try:
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    finally:
        conn.close()


def test_the_lock_refuses_a_second_holder_until_released(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    fd = acquire_lock(path)
    try:
        with pytest.raises(StorageError, match="in use by another edgeway process"):
            acquire_lock(path)
    finally:
        release_lock(fd)
    release_lock(acquire_lock(path))


def test_write_behind_without_a_loop(tmp_path: Path) -> None:
    """The broker's mode: open and close without a loop, posts nobody awaits,
    a barrier before reading; a failing post is rolled back alone."""
    path = tmp_path / "wb.db"
    db = Database(path, migrations=[V1], durability="os", checkpoint_on_close=True)
    db.open_sync()
    db.post(lambda c: c.execute("INSERT INTO t VALUES ('a', 1)"))
    db.post(lambda c: c.execute("INSERT INTO t VALUES ('a', 2)"))  # duplicate key: fails
    db.post(lambda c: c.execute("INSERT INTO t VALUES ('b', 3)"))
    db.wait_sync()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [("a", 1), ("b", 3)]
    with pytest.raises(StorageError, match="not open on an event loop"):
        db.write(lambda c: None)
    db.close_sync()
    assert not (tmp_path / "wb.db-wal").exists() or (tmp_path / "wb.db-wal").stat().st_size == 0
    with pytest.raises(StorageError, match="not open"):
        db.post(lambda c: None)


async def test_outbox_from_a_newer_edgeway_is_refused_by_the_gateway_and_offline_commands(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    ob = Outbox(path, gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    await ob.open()
    await ob.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = 3 WHERE key = 'schema_version'")
    ob = Outbox(path, gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    with pytest.raises(StorageError, match="outbox: schema version 3 is newer"):
        await ob.open()
    with pytest.raises(StorageError, match="schema version 3 is newer"):
        list_dead_letters(path)
    # The refused open released the lock.
    release_lock(acquire_lock(path))
