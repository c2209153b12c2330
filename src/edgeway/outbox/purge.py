"""``edgeway outbox purge SINK``: drop on purpose what a removed sink still had
pending (see docs/reload.md).

A sink removed from the configuration keeps its stored readings and counters
(``outbox_retired`` in ``/api/status``): nothing acknowledged is thrown away
by a configuration change. When those readings are really not wanted any
more, this command, run with the gateway stopped (it takes the outbox's
lock), clears the sink's routing bit from every stored chunk, deletes the
chunks no other sink still needs, and forgets the sink (its cursor and
counters). It refuses a sink that is still configured: remove it from the
configuration (and reload or restart) first, so the gateway does not route
new readings to it.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeway.outbox.deadletter import DB_NAME, open_locked


@dataclass(slots=True, frozen=True)
class PurgeResult:
    sink: str
    pending: int
    """Records the sink had pending (accepted - delivered - dropped)."""
    chunks_deleted: int
    bytes_freed: int


def purge_sink(
    db_path: Path, sink: str, configured: set[str] | frozenset[str] = frozenset()
) -> PurgeResult:
    """Forget ``sink`` and what it had pending; see the module docstring.
    Raises RuntimeError while a gateway holds the outbox, LookupError for an
    unknown sink, ValueError for a sink that is still configured."""
    if sink in configured:
        raise ValueError(
            f"sink {sink!r} is still configured: remove it from the configuration first"
        )
    if not db_path.exists():
        raise FileNotFoundError(f"no outbox at {db_path}")
    with open_locked(db_path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "SELECT bit, accepted, delivered, dropped_max_bytes, dropped_max_age, "
            "dropped_dead_letter FROM sinks WHERE name = ?",
            (sink,),
        ).fetchone()
        if row is None:
            conn.execute("ROLLBACK")
            known = [r[0] for r in conn.execute("SELECT name FROM sinks ORDER BY name")]
            raise LookupError(f"no sink {sink!r} in {db_path} (known: {known})")
        bit, accepted, delivered, d1, d2, d3 = row
        pending = accepted - delivered - d1 - d2 - d3
        deleted, freed = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM chunks WHERE pending = ?", (bit,)
        ).fetchone()
        conn.execute("DELETE FROM chunks WHERE pending = ?", (bit,))
        conn.execute("UPDATE chunks SET pending = pending & ~? WHERE pending & ? != 0", (bit, bit))
        conn.execute("DELETE FROM sinks WHERE name = ?", (sink,))
        conn.execute(
            "UPDATE meta SET value = MAX(0, CAST(value AS INTEGER) - ?) WHERE key = 'total_bytes'",
            (freed,),
        )
        conn.execute("COMMIT")
    return PurgeResult(sink, pending, deleted, freed)


def outbox_main(argv: list[str], data_dir: Path, configured: set[str]) -> int:
    """``edgeway outbox purge SINK``."""
    p = argparse.ArgumentParser(prog="edgeway outbox")
    sub = p.add_subparsers(dest="action", required=True)
    purge = sub.add_parser("purge", help="drop what a removed sink still had pending")
    purge.add_argument("sink")
    args = p.parse_args(argv)
    try:
        r = purge_sink(Path(data_dir) / DB_NAME, args.sink, configured)
    except (FileNotFoundError, RuntimeError, LookupError, ValueError, sqlite3.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"purged sink {r.sink}: {r.pending} pending record(s) dropped, "
        f"{r.chunks_deleted} chunk(s) deleted, {r.bytes_freed} bytes freed"
    )
    return 0
