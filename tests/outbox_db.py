"""Reading an outbox database back record by record (tests only).

The outbox stores records in chunks (see edgeway.outbox.store); tests that
check what is on disk expand the chunks here rather than repeat the layout.
Also :func:`opened`, an outbox open for the length of a ``with``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgeway.config import OutboxSection
from edgeway.outbox.store import RECORD_OVERHEAD, Outbox


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    pending: int
    """The chunk's sink bits (a sink whose cursor is past ``seq`` is done with it)."""
    size: int
    priority: int
    doc: dict[str, Any]
    msg_id: str | None


def stored_records(path: Path) -> list[StoredRecord]:
    """Every record on disk, in sequence order."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT seq_first, seq_last, pending, size, priority, data, msg_ids FROM chunks "
            "ORDER BY seq_first"
        ).fetchall()
    finally:
        conn.close()
    out: list[StoredRecord] = []
    for first, last, pending, size, prio, data, msg_ids in rows:
        texts = data.split(b"\n")
        assert len(texts) == last - first + 1
        msgs = orjson.loads(msg_ids) if msg_ids else [None] * len(texts)
        sizes = [len(t) - len(str(first + i)) + RECORD_OVERHEAD for i, t in enumerate(texts)]
        assert sum(sizes) == size, "a chunk's size is the sum of its records' sizes"
        for i, t in enumerate(texts):
            out.append(StoredRecord(first + i, pending, sizes[i], prio, orjson.loads(t), msgs[i]))
    return out


def sink_cursor(path: Path, name: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT cursor FROM sinks WHERE name=?", (name,)).fetchone()[0])
    finally:
        conn.close()


def pending_for(path: Path, name: str) -> int:
    """Records on disk that sink ``name`` has still to confirm."""
    conn = sqlite3.connect(path)
    try:
        bit, cursor = conn.execute("SELECT bit, cursor FROM sinks WHERE name=?", (name,)).fetchone()
    finally:
        conn.close()
    return sum(1 for r in stored_records(path) if r.pending & bit and r.seq > cursor)


@contextlib.asynccontextmanager
async def opened(
    path: Path, sinks: tuple[str, ...] = ("a",), *, tail_reads: bool = True, **cfg: Any
) -> AsyncIterator[Outbox]:
    """An outbox at ``path`` (gateway id ``gw``) with ``sinks`` and the
    ``outbox:`` options ``cfg``, closed when the block ends."""
    ob = Outbox(path, gateway_id="gw", config=OutboxSection(**cfg), sink_names=list(sinks))
    ob.tail_reads = tail_reads
    await ob.open()
    try:
        yield ob
    finally:
        await ob.close()
