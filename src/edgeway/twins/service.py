"""The twin store and service: durable, versioned desired/reported documents.

``DATA_DIR/twins.db`` (SQLite through :mod:`edgeway.storage.sqlite`: one
writer thread, group commit, fsync with ``outbox.durability: fsync``) holds one
row per device. A patch is applied inside the write transaction (read, merge,
check the limits, bump the version, write), so concurrent patches are
serialised and none is lost; the caller is answered once the new version is on
disk, so a patch acknowledged survives kill -9.

Optimistic concurrency: a patch may carry the version its writer read
(``If-Match`` on HTTP, ``version`` in a cloud request, ``--if-match`` on the
CLI); if the document changed since, the patch is refused with ``conflict``
and the current version, and nothing changes.

Every change is also reported upward: a record with ``tags.record_type:
twin`` (metrics ``section`` desired|reported, ``version``, ``patch`` as JSON
text, ``by``) goes to the outbox in the priority lane, so the cloud keeps a
copy of each twin without polling, and listeners (the MQTT surface, HTTP
long-polls) are told.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson

from edgeway.reading import Origin, Reading
from edgeway.storage.sqlite import Database
from edgeway.twins.model import (
    Doc,
    Twin,
    TwinError,
    TwinLimits,
    check_doc,
    check_patch,
    merge_patch,
)

log = logging.getLogger(__name__)

Section = Literal["desired", "reported"]
Listener = Callable[[Twin, Section], None]

SCHEMA_V1 = """
CREATE TABLE twins(
    device_id TEXT PRIMARY KEY,
    desired TEXT NOT NULL DEFAULT '{}',
    desired_version INTEGER NOT NULL DEFAULT 0,
    reported TEXT NOT NULL DEFAULT '{}',
    reported_version INTEGER NOT NULL DEFAULT 0,
    desired_ts TEXT NOT NULL DEFAULT '{}',
    reported_ts TEXT NOT NULL DEFAULT '{}',
    updated_at REAL NOT NULL
);
"""
_COLS = "device_id, desired, desired_version, reported, reported_version, desired_ts, reported_ts, updated_at"
PATCH_TEXT_MAX = 4096
"""A patch in the upward record is cut at this many characters (the full
document is always available with ``edgeway twin show``)."""


def _row(row: Sequence[Any]) -> Twin:
    return Twin(
        row[0],
        orjson.loads(row[1]),
        row[2],
        orjson.loads(row[3]),
        row[4],
        orjson.loads(row[5]),
        orjson.loads(row[6]),
        row[7],
    )


class TwinService:
    """Twins of every device (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path | str,
        limits: TwinLimits,
        *,
        emit: Callable[[list[Reading]], Any] | None = None,
        durability: Literal["fsync", "os"] = "fsync",
    ) -> None:
        self.limits = limits
        self.db = Database(
            Path(data_dir) / "twins.db", migrations=[SCHEMA_V1], durability=durability, name="twins"
        )
        self._emit = emit
        self._listeners: list[Listener] = []
        self._changed: dict[str, asyncio.Event] = {}
        self.patches = 0
        self.refused = 0

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        for ev in self._changed.values():
            ev.set()
        await self.db.close()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- reading ---------------------------------------------------------------

    async def get(self, device_id: str) -> Twin:
        """The twin (an empty one at version 0 for a device without one)."""
        row = await self.db.read(
            lambda c: c.execute(
                f"SELECT {_COLS} FROM twins WHERE device_id = ?", (device_id,)
            ).fetchone()
        )
        return _row(row) if row is not None else Twin(device_id)

    async def list(self, limit: int = 100, after: str = "") -> list[Twin]:
        rows = await self.db.read(
            lambda c: c.execute(
                f"SELECT {_COLS} FROM twins WHERE device_id > ? ORDER BY device_id LIMIT ?",
                (after, max(1, min(limit, 1000))),
            ).fetchall()
        )
        return [_row(r) for r in rows]

    async def wait_change(self, device_id: str, seen: tuple[int, int], wait: float) -> Twin:
        """The twin once its (desired, reported) versions differ from ``seen``,
        or as it is after ``wait`` seconds (an HTTP long-poll)."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            twin = await self.get(device_id)
            if (twin.desired_version, twin.reported_version) != seen:
                return twin
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return twin
            ev = self._changed.setdefault(device_id, asyncio.Event())
            try:
                async with asyncio.timeout(left):
                    await ev.wait()
            except TimeoutError:
                return await self.get(device_id)

    # -- writing ---------------------------------------------------------------

    async def patch(
        self,
        device_id: str,
        section: Section,
        patch: Any,
        *,
        if_match: int | None = None,
        by: str,
    ) -> Twin:
        """Merge ``patch`` into ``section`` of the device's twin; the new twin
        once it is on disk. Raises TwinError (nothing changed)."""
        try:
            check_patch(patch, self.limits)
            if not isinstance(device_id, str) or not device_id or len(device_id) > 256:
                raise TwinError("invalid", "a device id is 1-256 characters")
            now = time.time()
            limits = self.limits

            def write(conn: sqlite3.Connection) -> Twin:
                row = conn.execute(
                    f"SELECT {_COLS} FROM twins WHERE device_id = ?", (device_id,)
                ).fetchone()
                twin = _row(row) if row is not None else Twin(device_id)
                version = twin.desired_version if section == "desired" else twin.reported_version
                if if_match is not None and if_match != version:
                    raise TwinError(
                        "conflict",
                        f"{section} is at version {version}, not {if_match}",
                        version=version,
                    )
                doc: Doc = merge_patch(
                    twin.desired if section == "desired" else twin.reported, patch
                )
                raw = check_doc(doc, limits, section)
                stamps = twin.desired_ts if section == "desired" else twin.reported_ts
                for key in patch:
                    stamps[key] = now
                if section == "desired":
                    twin.desired, twin.desired_version = doc, version + 1
                else:
                    twin.reported, twin.reported_version = doc, version + 1
                twin.updated_at = now
                conn.execute(
                    f"INSERT INTO twins({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(device_id) DO UPDATE SET desired = excluded.desired, "
                    "desired_version = excluded.desired_version, reported = excluded.reported, "
                    "reported_version = excluded.reported_version, desired_ts = excluded.desired_ts, "
                    "reported_ts = excluded.reported_ts, updated_at = excluded.updated_at",
                    (
                        device_id,
                        raw if section == "desired" else orjson.dumps(twin.desired),
                        twin.desired_version,
                        raw if section == "reported" else orjson.dumps(twin.reported),
                        twin.reported_version,
                        orjson.dumps(twin.desired_ts),
                        orjson.dumps(twin.reported_ts),
                        now,
                    ),
                )
                return twin

            twin = await self.db.write(write)
        except TwinError:
            self.refused += 1
            raise
        self.patches += 1
        self._changed_now(twin, section, patch, by)
        return twin

    def _changed_now(self, twin: Twin, section: Section, patch: Doc, by: str) -> None:
        ev = self._changed.pop(twin.device_id, None)
        if ev is not None:
            ev.set()
        for listener in list(self._listeners):
            try:
                listener(twin, section)
            except Exception:
                log.exception("twin listener failed")
        if self._emit is None:
            return
        version = twin.desired_version if section == "desired" else twin.reported_version
        reading = Reading(
            twin.device_id,
            twin.updated_at,
            {
                "section": section,
                "version": version,
                "patch": orjson.dumps(patch).decode()[:PATCH_TEXT_MAX],
                "by": by[:200],
            },
            Origin("twins", section),
            {"record_type": "twin"},
            priority=1,
        )
        try:
            self._emit([reading])
        except Exception:
            log.exception("twin record for %s could not be stored", twin.device_id)
