"""Dead letters: batches a sink refused for good, kept for inspection and replay.

Usage (``edgeway deadletter ...`` with the gateway's ``--config``/``--data-dir``)::

    edgeway deadletter list [--sink NAME] [--limit N] [--json]
    edgeway deadletter replay [ID ...] [--sink NAME]     # gateway must be stopped
    edgeway deadletter purge (ID ... | --all) [--sink NAME]

``replay`` puts the records back in the outbox for their sink, at the end of
its queue, with their original record id (so a cloud that did get them drops
the duplicates), and counts them as accepted again; the next start sends
them. It and ``purge`` take the outbox lock: they refuse
to run while a gateway has the outbox open, because the running gateway keeps
its counters and cursors in memory. A running gateway replays through its own
outbox instead (:meth:`edgeway.outbox.store.Outbox.replay_dead_letters`, the
admin API's ``POST /api/deadletters/replay`` and the HMI's sinks page).
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgeway.outbox.store import (
    INSERT_CHUNK,
    ChunkBuilder,
    check_schema,
    record_ids,
    record_size,
    text_from_columns,
)
from edgeway.storage.sqlite import acquire_lock, release_lock

DB_NAME = "outbox.db"


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """One dead-lettered record."""

    id: int
    sink: str
    record_id: str
    seq: int
    device_id: str
    ts: float
    at: float
    """When it was dead-lettered (Unix seconds)."""
    error: str
    metrics: dict[str, Any]

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sink": self.sink,
            "record_id": self.record_id,
            "seq": self.seq,
            "device_id": self.device_id,
            "ts": self.ts,
            "at": self.at,
            "error": self.error,
            "metrics": self.metrics,
        }


def _open(db_path: Path) -> sqlite3.Connection:
    if not db_path.exists():
        raise FileNotFoundError(f"no outbox at {db_path}")
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=30.0)
    try:
        check_schema(conn, db_path)
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def open_locked(db_path: Path) -> Iterator[sqlite3.Connection]:
    """The outbox opened by an offline command that writes to it, with its lock
    held: ``RuntimeError`` while a gateway has it open, because the running
    gateway keeps its counters and cursors in memory."""
    fd = acquire_lock(db_path)
    try:
        conn = _open(db_path)
        try:
            yield conn
        finally:
            conn.close()
    finally:
        release_lock(fd)


def _id_of(conn: sqlite3.Connection) -> Callable[[int], str]:
    return record_ids(
        conn.execute("SELECT from_seq, gateway_id FROM epochs ORDER BY from_seq").fetchall()
    )


def _where(sink: str | None, ids: Sequence[int] | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if sink is not None:
        clauses.append("sink = ?")
        params.append(sink)
    if ids:
        clauses.append(f"id IN ({','.join('?' * len(ids))})")
        params.extend(ids)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def list_dead_letters(
    db_path: Path, *, sink: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters (of ``sink``, or of all sinks)."""
    conn = _open(db_path)
    try:
        record_id = _id_of(conn)
        where, params = _where(sink, None)
        rid = "record_id" if _has_record_id(conn) else "NULL"
        rows = conn.execute(
            f"SELECT id, sink, seq, device_id, ts, at, error, metrics, {rid} FROM deadletter"
            f"{where} ORDER BY id LIMIT ?",
            (*params, limit),
        ).fetchall()
    finally:
        conn.close()
    return [
        DeadLetter(
            r[0], r[1], r[8] or record_id(r[2]), r[2], r[3], r[4], r[5], r[6], orjson.loads(r[7])
        )
        for r in rows
    ]


def _has_record_id(conn: sqlite3.Connection) -> bool:
    """Dead letters written since schema 2 keep their record id (a replayed
    record's sequence differs from the one in its id)."""
    return any(row[1] == "record_id" for row in conn.execute("PRAGMA table_info(deadletter)"))


def replay_dead_letters(
    db_path: Path, *, sink: str | None = None, ids: Sequence[int] | None = None
) -> int:
    """Put dead letters back in the outbox for their sink; returns how many.

    Raises ``RuntimeError`` while a gateway has the outbox open.
    """
    with open_locked(db_path) as conn:
        return _replay(conn, sink, ids)


REPLAY_MAX = 10_000
"""Dead letters one replay takes at most (the running gateway's is one
commit: bounded work; the HMI says how many are left)."""


@dataclass(slots=True)
class Requeued:
    """Dead letters turned back into chunk rows (not yet written)."""

    chunk_rows: list[tuple[Any, ...]]
    accepted: dict[str, int]
    """Records per sink."""
    done: list[int]
    """The dead letters' ids (to delete)."""
    next_seq: int


def requeue(
    conn: sqlite3.Connection,
    sink: str | None,
    ids: Sequence[int] | None,
    bits: dict[str, int],
    next_seq: int,
    now: float,
    limit: int | None = None,
) -> Requeued:
    """The chosen dead letters (oldest first, at most ``limit``) as new
    chunks at the end of the queue from ``next_seq``, each for its sink only,
    keeping its record id (a cloud that did get it drops the duplicate).
    Dead letters of sinks not in ``bits`` stay."""
    record_id = _id_of(conn)
    rid = "record_id" if _has_record_id(conn) else "NULL"
    where, params = _where(sink, ids)
    rows = conn.execute(
        f"SELECT id, sink, seq, priority, device_id, ts, metrics, tags, msg_id, {rid} "
        f"FROM deadletter{where} ORDER BY id" + (" LIMIT ?" if limit is not None else ""),
        [*params, limit] if limit is not None else params,
    ).fetchall()
    builder = ChunkBuilder()
    seq = next_seq
    accepted: dict[str, int] = {}
    done: list[int] = []
    for dl_id, name, old_seq, prio, dev, ts, metrics, tags, msg_id, rec_id in rows:
        if name not in bits:
            continue
        text = text_from_columns(rec_id or record_id(old_seq), dev, ts, metrics, tags, prio)
        builder.add(seq, [text], [record_size(text, seq)], [msg_id], bits[name], prio, now)
        seq += 1
        accepted[name] = accepted.get(name, 0) + 1
        done.append(dl_id)
    return Requeued(builder.rows(), accepted, done, seq)


def _replay(conn: sqlite3.Connection, sink: str | None, ids: Sequence[int] | None) -> int:
    if not conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chunks'"
    ).fetchone():
        raise RuntimeError("the outbox is from an older edgeway: start edgeway once, then replay")
    conn.execute("BEGIN IMMEDIATE")
    try:
        bits = {name: bit for name, bit in conn.execute("SELECT name, bit FROM sinks")}
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        # The outbox's age clock where it stopped (see edgeway.outbox.ageclock),
        # so that a wrong wall clock does not make these look ancient.
        now = float(meta.get("age_clock", time.time()))
        # After a crash, numbers up to the lease may be on readings forwarded
        # early (edgeway.outbox.store.SEQ_LEASE): start above them.
        first = max(int(meta.get("next_seq", 1)), int(meta.get("seq_lease", 0)))
        out = requeue(conn, sink, ids, bits, first, now)
        conn.executemany(INSERT_CHUNK, out.chunk_rows)
        conn.executemany(
            "UPDATE sinks SET accepted = accepted + ? WHERE name = ?",
            [(n, name) for name, n in out.accepted.items()],
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', ?), ('total_bytes', ?)",
            (out.next_seq, int(meta.get("total_bytes", 0)) + sum(r[4] for r in out.chunk_rows)),
        )
        conn.executemany("DELETE FROM deadletter WHERE id = ?", [(i,) for i in out.done])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return sum(out.accepted.values())


def purge_dead_letters(
    db_path: Path, *, sink: str | None = None, ids: Sequence[int] | None = None
) -> int:
    """Delete dead letters for good; returns how many. They stay counted as
    ``dropped_dead_letter``. Raises ``RuntimeError`` while a gateway runs."""
    with open_locked(db_path) as conn:
        where, params = _where(sink, ids)
        return conn.execute(f"DELETE FROM deadletter{where}", params).rowcount


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeway deadletter", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True, metavar="list|replay|purge")
    ls = sub.add_parser("list", help="show dead letters, oldest first")
    ls.add_argument("--sink")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    rp = sub.add_parser("replay", help="queue dead letters again (all, or the IDs given)")
    rp.add_argument("ids", nargs="*", type=int, metavar="ID")
    rp.add_argument("--sink")
    pg = sub.add_parser("purge", help="delete dead letters for good")
    pg.add_argument("ids", nargs="*", type=int, metavar="ID")
    pg.add_argument("--sink")
    pg.add_argument("--all", action="store_true", help="purge every dead letter (of --sink)")
    return p


def deadletter_main(argv: list[str], data_dir: Path) -> int:
    """``edgeway deadletter list|replay|purge``; returns the exit code."""
    args = _parser().parse_args(argv)
    db_path = Path(data_dir) / DB_NAME
    try:
        if args.action == "list":
            letters = list_dead_letters(db_path, sink=args.sink, limit=args.limit)
            for d in letters:
                if args.json:
                    print(orjson.dumps(d.to_json_obj()).decode())
                else:
                    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.at))
                    print(f"{d.id}\t{d.sink}\t{d.record_id}\t{d.device_id}\t{at}\t{d.error}")
            if not args.json:
                print(f"{len(letters)} dead letter(s)", file=sys.stderr)
            return 0
        if args.action == "replay":
            n = replay_dead_letters(db_path, sink=args.sink, ids=args.ids or None)
            print(f"replayed {n} record(s); they are sent at the next start")
            return 0
        if not args.ids and not args.all:
            print("error: purge needs IDs or --all", file=sys.stderr)
            return 2
        n = purge_dead_letters(db_path, sink=args.sink, ids=args.ids or None)
        print(f"purged {n} dead letter(s)")
        return 0
    except (FileNotFoundError, RuntimeError, sqlite3.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
