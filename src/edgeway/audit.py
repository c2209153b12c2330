"""The audit log: every administrative change, who made it, when, from where.

Append-only, in SQLite (``DATA_DIR/audit.db``): triggers refuse UPDATE and
DELETE, so neither a bug nor a compromised admin token can rewrite history
through edgeway (someone with the file can, which docs/security.md says).

The admin API records every request that may change something (any method
but GET/HEAD/OPTIONS that passed authentication: commands, configuration
apply and rollback, and whatever route comes next) with its answer's status,
before the answer leaves; the CLI records what it changes offline
(``edgeway credentials``, ``edgeway tokens``, ``edgeway ca``)::

    audit = AuditLog(data_dir)
    await audit.open()
    await audit.record("token:3f2a9c1b7d0e (ops)", "POST /api/commands", source="10.0.0.7",
                       status=201, detail={"device": "boiler-1"})
    entries = await audit.entries(limit=50)

    record_offline(data_dir, who="alice (cli)", action="credentials issue",
                   target="boiler-1", detail={"kind": "mqtt"})

Read it with ``edgeway audit`` (through the admin API) or ``GET /api/audit``.
Secrets never go in: callers pass what was changed, never the value.
"""

from __future__ import annotations

import getpass
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgeway.storage.sqlite import Database, connect, migrate

__all__ = ["DB_NAME", "AuditEntry", "AuditLog", "cli_actor", "read_offline", "record_offline"]

DB_NAME = "audit.db"
FIELD_MAX = 512
"""Characters kept of each text field (an action, a target, a source): a
client-chosen path cannot make one entry megabytes long."""
DETAIL_MAX = 4096
"""Bytes of the JSON detail kept; longer is replaced by a note saying so."""
LIST_MAX = 1000
"""Entries one read returns at most (page with ``before``)."""

_SCHEMA_V1 = """
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    status INTEGER,
    detail TEXT
);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
MIGRATIONS = [_SCHEMA_V1]


@dataclass(slots=True, frozen=True)
class AuditEntry:
    id: int
    at: float
    who: str
    source: str
    action: str
    target: str
    status: int | None
    detail: Any

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "who": self.who,
            "source": self.source,
            "action": self.action,
            "target": self.target,
            "status": self.status,
            "detail": self.detail,
            "reason": self.detail.get("reason") if isinstance(self.detail, dict) else None,
        }


def _clip(text: str) -> str:
    return text if len(text) <= FIELD_MAX else text[: FIELD_MAX - 1] + "…"


def _detail(detail: Mapping[str, Any] | None) -> str | None:
    if detail is None:
        return None
    data = orjson.dumps(dict(detail), default=str)
    if len(data) > DETAIL_MAX:
        data = orjson.dumps({"truncated": True, "bytes": len(data)})
    return data.decode()


def _insert(
    conn: sqlite3.Connection,
    who: str,
    action: str,
    target: str,
    source: str,
    status: int | None,
    detail: Mapping[str, Any] | None,
) -> int:
    cur = conn.execute(
        "INSERT INTO audit(at, who, source, action, target, status, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (time.time(), _clip(who), _clip(source), _clip(action), _clip(target), status,
         _detail(detail)),
    )  # fmt: skip
    return int(cur.lastrowid or 0)


def _select(
    conn: sqlite3.Connection, limit: int, before: int | None, action: str | None
) -> list[AuditEntry]:
    sql = "SELECT id, at, who, source, action, target, status, detail FROM audit"
    where: list[str] = []
    args: list[object] = []
    if before is not None:
        where.append("id < ?")
        args.append(before)
    if action:
        where.append("action LIKE ? ESCAPE '\\'")
        escaped = action.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args.append(escaped + "%")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(max(1, min(limit, LIST_MAX)))
    return [
        AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], orjson.loads(r[7]) if r[7] else None)
        for r in conn.execute(sql, args)
    ]


class AuditLog:
    """The running gateway's audit log (the storage helper's writer thread:
    a record returns once committed)."""

    def __init__(self, data_dir: Path) -> None:
        self._db = Database(data_dir / DB_NAME, migrations=MIGRATIONS, name=DB_NAME)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def record(
        self,
        who: str,
        action: str,
        *,
        target: str = "",
        source: str = "",
        status: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one entry; returns its id once it is on disk."""
        return await self._db.write(
            lambda conn: _insert(conn, who, action, target, source, status, detail)
        )

    async def entries(
        self, *, limit: int = 100, before: int | None = None, action: str | None = None
    ) -> list[AuditEntry]:
        """Newest first; ``before`` pages back; ``action`` is a prefix filter."""
        return await self._db.read(lambda conn: _select(conn, limit, before, action))


def _offline(data_dir: Path) -> sqlite3.Connection:
    data_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(data_dir / DB_NAME)
    try:
        migrate(conn, MIGRATIONS, str(data_dir / DB_NAME))
    except BaseException:
        conn.close()
        raise
    return conn


def cli_actor() -> str:
    """Who runs this CLI command: the OS user (the CLI has no other identity)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user} (cli)"


def record_offline(
    data_dir: Path,
    *,
    who: str,
    action: str,
    target: str = "",
    source: str = "local",
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Append one entry from a CLI process (committed when this returns)."""
    conn = _offline(data_dir)
    try:
        return _insert(conn, who, action, target, source, None, detail)
    finally:
        conn.close()


def read_offline(data_dir: Path, *, limit: int = 100) -> list[AuditEntry]:
    conn = _offline(data_dir)
    try:
        return _select(conn, limit, None, None)
    finally:
        conn.close()
