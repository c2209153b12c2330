"""The device registry: which devices exist, what they are, and how they are.

Records live in ``DATA_DIR/devices.db`` on the shared storage helper
(:class:`~edgeway.storage.sqlite.Database`: one writer thread, group commit,
migrations)::

    registry = DeviceRegistry(data_dir / "devices.db")
    await registry.open()
    await registry.add({"id": "boiler-1", "type": "boiler", "groups": ["site-a"]})
    page = await registry.list(DeviceFilter(status="offline"), limit=100)
    registry.on_change(lambda device_id, change: cache.forget(device_id))
    await registry.disable("boiler-1")

What a record holds: id, name, type, tags, groups, protocols seen,
credential *references* (names of credentials kept elsewhere, never a
secret), whether it is registered and enabled, online or offline with last
seen / last connect / last disconnect and its reason, the firmware version it
reported, free-form metadata, created and updated times.

Devices that talk to the gateway without being registered get a record too,
with ``registered = 0`` (status ``unregistered``), so a technician sees them;
registering one (:meth:`DeviceRegistry.add`) keeps what was seen. Their
number is capped (``max_unregistered``): ids on the wire are the sender's
choice, and a flood of made-up ids must not fill the disk.

Status is written in batches by :mod:`edgeway.devices.presence`
(:meth:`DeviceRegistry.record_status`): one statement per device per flush,
never one transaction per reading.

Scale: listing is keyset-paged on the primary key (``after`` = the last id
seen), and every filter has an index (status is a generated column with its
own index; tags and groups are side tables keyed by value), so listing page
after page of 100,000 devices costs the same as the first page (see
bench/registry.py). Nothing here holds records in memory beyond
:data:`FLAGS_CACHE_MAX` small (registered, enabled) pairs.

``on_change(callback)`` tells other parts (credential and ACL caches, the
broker) at once, after the change is on disk: ``callback(device_id, change)``
with ``change`` one of :data:`CHANGES`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from edgeway.storage.sqlite import Database, StorageError, connect

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_NAME = "devices.db"

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
"""What a device id may be: one MQTT topic level and one URL path segment
without escaping (no ``/ + #``, no spaces or control characters), at most 128
characters (the longest id of the cloud registries we forward to is 128)."""
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=@/-]{0,63}$")
"""A tag or group name: short, printable, no spaces, no commas (CSV lists)."""
MAX_LABELS = 32
"""Tags (and groups) per device: enough to classify, small enough that a
record stays well under a kilobyte of labels."""
MAX_NAME = 200
MAX_TYPE = 64
MAX_FIRMWARE = 64
MAX_CREDENTIALS = 16
MAX_CREDENTIAL_REF = 200
MAX_METADATA_BYTES = 4096
"""Free-form metadata per device, as JSON: a few dozen fields. Bounded so that
100,000 records stay a few hundred megabytes at worst."""
MAX_ERROR = 300
"""Last error text kept per device (a poll failure's message)."""
LOOKUP_CHUNK = 500
"""Ids per ``IN (...)`` query of a batch of lookups: far below SQLite's limit
on bound parameters (32,766), each query a few milliseconds."""
LIST_LIMIT_MAX = 1000
"""Largest page: one page is built in memory and sent as one JSON document."""
FLAGS_CACHE_MAX = 10_000
"""(registered, enabled) pairs kept for the connect and request checks: at
most ~1 MB, enough for a connect storm of 10,000 devices to hit the disk once
each. Invalidated by every change."""

STATUSES = ("online", "offline", "disabled", "unregistered")
CHANGES = ("added", "updated", "disabled", "enabled", "removed")
DISCONNECT_REASONS = ("clean", "keepalive", "will", "error", "revoked", "taken_over", "shutdown")
"""Why a device went offline: a clean DISCONNECT, keep-alive expiry, a
connection lost with its will sent, an error (connection lost, protocol error,
a poll that failed), revoked by an operator, its client id taken by a new
connection, the gateway shutting down."""

EDITABLE = ("name", "type", "tags", "groups", "credentials", "firmware", "metadata")
"""Fields an operator sets (add, update, import); the rest is observed."""

_SCHEMA_V1 = """
CREATE TABLE devices(
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    type TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    groups_ TEXT NOT NULL DEFAULT '[]',
    credentials TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    firmware TEXT,
    registered INTEGER NOT NULL DEFAULT 1,
    enabled INTEGER NOT NULL DEFAULT 1,
    online INTEGER NOT NULL DEFAULT 0,
    connected INTEGER NOT NULL DEFAULT 0,
    protocols TEXT NOT NULL DEFAULT '',
    last_seen REAL,
    last_connect REAL,
    last_disconnect REAL,
    disconnect_reason TEXT,
    last_error TEXT,
    last_error_at REAL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status TEXT GENERATED ALWAYS AS (
        CASE WHEN registered = 0 THEN 'unregistered'
             WHEN enabled = 0 THEN 'disabled'
             WHEN online = 1 THEN 'online'
             ELSE 'offline' END) VIRTUAL
) WITHOUT ROWID;
CREATE INDEX devices_status ON devices(status, id);
CREATE INDEX devices_type ON devices(type, id);
CREATE INDEX devices_idle ON devices(online, connected, last_seen);
CREATE TABLE device_tags(
    tag TEXT NOT NULL,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    PRIMARY KEY(tag, device_id)
) WITHOUT ROWID;
CREATE INDEX device_tags_device ON device_tags(device_id);
CREATE TABLE device_groups(
    grp TEXT NOT NULL,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    PRIMARY KEY(grp, device_id)
) WITHOUT ROWID;
CREATE INDEX device_groups_device ON device_groups(device_id);
"""

_SCHEMA_V2 = """
CREATE TABLE device_counts(status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO device_counts(status, n)
    VALUES ('online', 0), ('offline', 0), ('disabled', 0), ('unregistered', 0);
UPDATE device_counts SET n = (SELECT count(*) FROM devices WHERE devices.status = device_counts.status);
CREATE TRIGGER devices_count_insert AFTER INSERT ON devices BEGIN
    UPDATE device_counts SET n = n + 1 WHERE status = NEW.status;
END;
CREATE TRIGGER devices_count_delete AFTER DELETE ON devices BEGIN
    UPDATE device_counts SET n = n - 1 WHERE status = OLD.status;
END;
CREATE TRIGGER devices_count_update AFTER UPDATE OF registered, enabled, online ON devices
WHEN OLD.status IS NOT NEW.status BEGIN
    UPDATE device_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE device_counts SET n = n + 1 WHERE status = NEW.status;
END;
"""
"""Devices per status, kept by triggers: ``list --status offline`` answers its
total without counting 70,000 index entries (10 ms on an idle machine, over
100 ms on a busy one); a status change costs two one-row updates."""

_COLS = (
    "id, name, type, tags, groups_, credentials, metadata, firmware, registered, enabled, "
    "online, connected, protocols, last_seen, last_connect, last_disconnect, "
    "disconnect_reason, last_error, last_error_at, created, updated, status"
)


class DeviceError(Exception):
    """A registry request refused; ``code`` is ``invalid``, ``not_found`` or
    ``exists``; ``field`` names the field at fault, when there is one."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field


@dataclass(slots=True, frozen=True)
class Device:
    """One registry record, as read."""

    id: str
    name: str
    type: str
    tags: tuple[str, ...]
    groups: tuple[str, ...]
    credentials: tuple[str, ...]
    metadata: dict[str, Any]
    firmware: str | None
    registered: bool
    enabled: bool
    online: bool
    protocols: tuple[str, ...]
    last_seen: float | None
    last_connect: float | None
    last_disconnect: float | None
    disconnect_reason: str | None
    last_error: str | None
    last_error_at: float | None
    created: float
    updated: float
    status: str

    def to_json(self) -> dict[str, Any]:
        """The API's and the CLI's shape (lists, not tuples)."""
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "status": self.status,
            "online": self.online,
            "enabled": self.enabled,
            "registered": self.registered,
            "tags": list(self.tags),
            "groups": list(self.groups),
            "protocols": list(self.protocols),
            "credentials": list(self.credentials),
            "firmware": self.firmware,
            "metadata": self.metadata,
            "last_seen": self.last_seen,
            "last_connect": self.last_connect,
            "last_disconnect": self.last_disconnect,
            "disconnect_reason": self.disconnect_reason,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "created": self.created,
            "updated": self.updated,
        }


@dataclass(slots=True, frozen=True)
class DeviceFilter:
    """What a listing selects; every given field must match (AND)."""

    status: str | None = None
    type: str | None = None
    tag: str | None = None
    group: str | None = None
    protocol: str | None = None
    prefix: str | None = None
    """Ids starting with this (a range on the primary key)."""

    def check(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise DeviceError("invalid", f"must be one of {', '.join(STATUSES)}", "status")


@dataclass(slots=True, frozen=True)
class DevicePage:
    devices: list[Device]
    next_after: str | None
    """Pass as ``after`` for the next page; None: this was the last."""
    total: int | None
    """Devices matching the filter, all pages: counted for the first page only
    (``after`` None): a status alone is read from counts kept by triggers;
    other filters count their matches, which a client paging through needs once."""


@dataclass(slots=True)
class StatusUpdate:
    """What :mod:`edgeway.devices.presence` learned about one device since its
    last flush; None fields are left as they are."""

    device_id: str
    last_seen: float | None = None
    protocols: set[str] = field(default_factory=set)
    online: bool | None = None
    connected: bool | None = None
    last_connect: float | None = None
    last_disconnect: float | None = None
    disconnect_reason: str | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    firmware: str | None = None


@dataclass(slots=True)
class ImportReport:
    """What a bulk import did: ids created, and rows refused with why."""

    created: list[str] = field(default_factory=list)
    refused: list[tuple[int, str, str]] = field(default_factory=list)
    """(row number, id as given, reason)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "created": len(self.created),
            "refused": len(self.refused),
            "created_ids": self.created,
            "refused_rows": [{"row": n, "id": i, "reason": r} for n, i, r in self.refused],
        }


@dataclass(slots=True, frozen=True)
class DeviceFlags:
    """The two facts the connect and request checks need."""

    registered: bool
    enabled: bool


ChangeListener = Callable[[str, str], None]


# ------------------------------------------------------------------ validation


def printable(text: str) -> str:
    """``text`` with anything a terminal could take for a control sequence
    replaced by ``?`` (an error message a peer may have written)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def check_device_id(value: object) -> str:
    if not isinstance(value, str) or not DEVICE_ID.fullmatch(value):
        raise DeviceError(
            "invalid",
            "1 to 128 characters: letters, digits and _ . : @ - (not first), no spaces or / + #",
            "id",
        )
    return value


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise DeviceError("invalid", "must be a string", name)
    if len(value) > limit or not value.isprintable():
        raise DeviceError("invalid", f"at most {limit} printable characters", name)
    return value


def _labels(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        raise DeviceError("invalid", "must be a list of names", name)
    if len(value) > MAX_LABELS:
        raise DeviceError("invalid", f"at most {MAX_LABELS}", name)
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or not LABEL.fullmatch(v):
            raise DeviceError(
                "invalid", f"{str(v)[:70]!r}: 1 to 64 characters, no spaces or commas", name
            )
        if v not in out:
            out.append(v)
    return tuple(sorted(out))


def _credentials(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or len(value) > MAX_CREDENTIALS:
        raise DeviceError(
            "invalid", f"a list of at most {MAX_CREDENTIALS} references", "credentials"
        )
    return tuple(_text(v, "credentials", MAX_CREDENTIAL_REF) for v in value)


def _metadata(value: object) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = orjson.loads(value) if value.strip() else {}
        except orjson.JSONDecodeError:
            raise DeviceError("invalid", "not a JSON object", "metadata") from None
    if not isinstance(value, dict):
        raise DeviceError("invalid", "must be a JSON object", "metadata")
    if len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        raise DeviceError("invalid", f"at most {MAX_METADATA_BYTES} bytes as JSON", "metadata")
    return value


def parse_fields(body: Mapping[str, Any], *, partial: bool) -> dict[str, Any]:
    """The editable fields of ``body``, checked and normalised (an API body,
    a CSV row). Unknown keys are refused, so a typo is not silently dropped."""
    unknown = set(body) - {*EDITABLE, "id"}
    if unknown:
        raise DeviceError("invalid", f"unknown fields: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "id":
            continue
        if value is None and key in ("firmware",):
            out[key] = None
        elif key == "name":
            out[key] = _text(value, key, MAX_NAME)
        elif key == "type":
            out[key] = _text(value, key, MAX_TYPE)
        elif key == "firmware":
            out[key] = _text(value, key, MAX_FIRMWARE) or None
        elif key in ("tags", "groups"):
            out[key] = _labels(value, key)
        elif key == "credentials":
            out[key] = _credentials(value)
        elif key == "metadata":
            out[key] = _metadata(value)
    if not partial:
        out.setdefault("name", "")
        out.setdefault("type", "")
    return out


# ------------------------------------------------------------------ rows


def _row_device(row: Sequence[Any]) -> Device:
    return Device(
        id=row[0],
        name=row[1],
        type=row[2],
        tags=tuple(orjson.loads(row[3])),
        groups=tuple(orjson.loads(row[4])),
        credentials=tuple(orjson.loads(row[5])),
        metadata=orjson.loads(row[6]),
        firmware=row[7],
        registered=bool(row[8]),
        enabled=bool(row[9]),
        online=bool(row[10]),
        protocols=tuple(p for p in row[12].split(",") if p),
        last_seen=row[13],
        last_connect=row[14],
        last_disconnect=row[15],
        disconnect_reason=row[16],
        last_error=row[17],
        last_error_at=row[18],
        created=row[19],
        updated=row[20],
        status=row[21],
    )


def _get(conn: sqlite3.Connection, device_id: str) -> Device | None:
    row = conn.execute(f"SELECT {_COLS} FROM devices WHERE id = ?", (device_id,)).fetchone()
    return _row_device(row) if row is not None else None


def _set_labels(
    conn: sqlite3.Connection, table: str, col: str, device_id: str, labels: Iterable[str]
) -> None:
    conn.execute(f"DELETE FROM {table} WHERE device_id = ?", (device_id,))
    conn.executemany(
        f"INSERT INTO {table}({col}, device_id) VALUES (?, ?)", [(v, device_id) for v in labels]
    )


def _write_fields(
    conn: sqlite3.Connection, device_id: str, fields: Mapping[str, Any], now: float
) -> None:
    sets: list[str] = []
    args: list[Any] = []
    for key, value in fields.items():
        if key in ("tags", "groups", "credentials"):
            sets.append(("groups_" if key == "groups" else key) + " = ?")
            args.append(orjson.dumps(list(value)).decode())
        elif key == "metadata":
            sets.append("metadata = ?")
            args.append(orjson.dumps(value).decode())
        else:
            sets.append(f"{key} = ?")
            args.append(value)
    sets.append("updated = ?")
    args.append(now)
    conn.execute(f"UPDATE devices SET {', '.join(sets)} WHERE id = ?", (*args, device_id))
    if "tags" in fields:
        _set_labels(conn, "device_tags", "tag", device_id, fields["tags"])
    if "groups" in fields:
        _set_labels(conn, "device_groups", "grp", device_id, fields["groups"])


def _insert(
    conn: sqlite3.Connection, device_id: str, fields: Mapping[str, Any], now: float
) -> bool:
    """Register ``device_id``: a new record, or an unregistered one made
    registered (keeping what was seen). False when it is registered already."""
    row = conn.execute("SELECT registered FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row is not None and row[0]:
        return False
    if row is None:
        conn.execute(
            "INSERT INTO devices(id, created, updated) VALUES (?, ?, ?)", (device_id, now, now)
        )
    else:
        conn.execute(
            "UPDATE devices SET registered = 1, created = ? WHERE id = ?", (now, device_id)
        )
    _write_fields(conn, device_id, fields, now)
    return True


_FILTER_SQL = {
    "status": "d.status = ?",
    "type": "d.type = ?",
    "tag": "d.id IN (SELECT device_id FROM device_tags WHERE tag = ?)",
    "group": "d.id IN (SELECT device_id FROM device_groups WHERE grp = ?)",
}
"""Filters that are one equality each, on an index (status, type) or a side
table keyed by the value (tags, groups)."""


def _where(f: DeviceFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for name, sql in _FILTER_SQL.items():
        value = getattr(f, name)
        if value is not None:
            clauses.append(sql)
            args.append(value)
    if f.protocol is not None:
        clauses.append("(',' || d.protocols || ',') LIKE ?")
        args.append(f"%,{f.protocol.replace('%', '').replace('_', '')},%")
    if f.prefix:
        # A range on the primary key (LIKE would scan: it is case-insensitive).
        clauses.append("d.id >= ? AND d.id < ?")
        args += [f.prefix, f.prefix + "\U0010ffff"]
    return " AND ".join(clauses) or "1", args


def _count(c: sqlite3.Connection, f: DeviceFilter, where: str, args: list[Any]) -> int:
    """Devices matching ``f``: from the per-status counts when the filter is
    the status alone (or nothing), else counted."""
    others = (f.type, f.tag, f.group, f.protocol, f.prefix)
    if not any(others):
        if f.status is None:
            row = c.execute("SELECT coalesce(sum(n), 0) FROM device_counts").fetchone()
        else:
            row = c.execute("SELECT n FROM device_counts WHERE status = ?", (f.status,)).fetchone()
        return int(row[0]) if row is not None else 0
    return int(c.execute(f"SELECT count(*) FROM devices d WHERE {where}", args).fetchone()[0])


def _merge_protocols(old: str, new: set[str]) -> str:
    have = {p for p in old.split(",") if p}
    if new <= have:
        return old
    return ",".join(sorted(have | new))


def _validate_rows(
    rows: Sequence[tuple[int, Mapping[str, Any]]],
) -> tuple[ImportReport, list[tuple[int, str, dict[str, Any]]]]:
    report = ImportReport()
    valid: list[tuple[int, str, dict[str, Any]]] = []
    seen: set[str] = set()
    for n, body in rows:
        raw_id = str(body.get("id", ""))[:140]
        try:
            device_id = check_device_id(body.get("id"))
            fields = parse_fields(body, partial=False)
        except DeviceError as e:
            report.refused.append((n, raw_id, str(e)))
            continue
        if device_id in seen:
            report.refused.append((n, raw_id, "id: given twice in this import"))
            continue
        seen.add(device_id)
        valid.append((n, device_id, fields))
    return report, valid


# ------------------------------------------------------------------ the registry


class DeviceRegistry:
    """The device records; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        durability: Literal["fsync", "os"] = "fsync",
        max_unregistered: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = Database(
            path, migrations=[_SCHEMA_V1, _SCHEMA_V2], durability=durability, name=DB_NAME
        )
        self.max_unregistered = max_unregistered
        self.clock = clock
        self._listeners: list[ChangeListener] = []
        self._flags: OrderedDict[str, DeviceFlags | None] = OrderedDict()
        self._lookups: dict[str, asyncio.Future[DeviceFlags | None]] = {}
        """Flags lookups waiting for this loop turn's query."""
        self._lookup_tasks: set[asyncio.Task[None]] = set()
        self._generation = 0
        """Changes so far: a lookup that a change overtook is not cached."""
        self._reader: sqlite3.Connection | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self.unregistered = 0
        """Unregistered records now (kept below ``max_unregistered``)."""
        self.unregistered_refused = 0
        """Devices seen that got no record because the cap was reached."""

    async def open(self) -> None:
        await self.db.open()
        self.unregistered = await self.db.read(
            lambda c: int(
                c.execute("SELECT count(*) FROM devices WHERE registered = 0").fetchone()[0]
            )
        )

        self._reader = connect(self.db.path, self.db.durability)
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="devices-read")

    async def close(self) -> None:
        for task in list(self._lookup_tasks):
            task.cancel()
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
            self._read_pool = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        await self.db.close()

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the read connection's own thread. WAL lets it read
        while the writer thread holds a long transaction (a flush of 10,000
        statuses, an import of 100,000 rows), so a CONNECT's lookup and a
        listing never wait for them; it sees every write whose future has
        resolved (committed before the read began)."""
        reader, pool = self._reader, self._read_pool
        if reader is None or pool is None:
            raise StorageError(f"{DB_NAME} is not open")
        return asyncio.get_running_loop().run_in_executor(pool, fn, reader)

    # ------------------------------------------------------------ listeners

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call ``callback(device_id, change)`` after every change is on disk
        (``change`` in :data:`CHANGES`); returns a function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _changed(self, device_id: str, change: str) -> None:
        self._generation += 1
        self._flags.pop(device_id, None)
        for cb in list(self._listeners):
            try:
                cb(device_id, change)
            except Exception:
                log.exception("device change listener failed for %s (%s)", device_id, change)

    # ------------------------------------------------------------ reads

    async def get(self, device_id: str) -> Device | None:
        return await self._read(lambda c: _get(c, device_id))

    async def flags(self, device_id: str) -> DeviceFlags | None:
        """(registered, enabled) of ``device_id``, None for no record: from a
        small cache (:data:`FLAGS_CACHE_MAX`) kept exact by every change."""
        cache = self._flags
        if device_id in cache:
            cache.move_to_end(device_id)
            return cache[device_id]
        fut = self._lookups.get(device_id)
        if fut is None:
            # Lookups asked in one loop turn go in one query (a connect
            # storm: 10,000 CONNECTs cost a few dozen queries, not 10,000).
            fut = asyncio.get_running_loop().create_future()
            self._lookups[device_id] = fut
            if len(self._lookups) == 1:
                asyncio.get_running_loop().call_soon(self._look_up)
        # Shielded: a caller that gives up does not cancel the others' answer.
        return await asyncio.shield(fut)

    def _look_up(self) -> None:
        batch, self._lookups = self._lookups, {}
        task = asyncio.get_running_loop().create_task(self._look_up_batch(batch))
        self._lookup_tasks.add(task)
        task.add_done_callback(self._lookup_tasks.discard)

    async def _look_up_batch(self, batch: dict[str, asyncio.Future[DeviceFlags | None]]) -> None:
        ids = list(batch)

        def read(c: sqlite3.Connection) -> dict[str, DeviceFlags]:
            found: dict[str, DeviceFlags] = {}
            for k in range(0, len(ids), LOOKUP_CHUNK):
                chunk = ids[k : k + LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT id, registered, enabled FROM devices WHERE id IN ({marks})"
                for device_id, registered, enabled in c.execute(sql, chunk):
                    found[device_id] = DeviceFlags(bool(registered), bool(enabled))
            return found

        generation = self._generation
        try:
            found = await self._read(read)
        except BaseException as e:
            for fut in batch.values():
                if fut.done():
                    continue
                if isinstance(e, asyncio.CancelledError):
                    fut.cancel()  # closing: nobody is left to answer
                else:
                    fut.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        # A change that landed meanwhile may postdate this answer: not cached.
        keep = generation == self._generation
        cache = self._flags
        for device_id, fut in batch.items():
            value = found.get(device_id)
            if keep:
                cache[device_id] = value
            if not fut.done():
                fut.set_result(value)
        while len(cache) > FLAGS_CACHE_MAX:
            cache.popitem(last=False)

    async def list(
        self, filters: DeviceFilter = DeviceFilter(), *, limit: int = 100, after: str | None = None
    ) -> DevicePage:
        """One page of devices in id order; ``after`` is the last id of the
        previous page (keyset paging: every page costs the same)."""
        filters.check()
        limit = max(1, min(int(limit), LIST_LIMIT_MAX))
        where, args = _where(filters)
        page_where, page_args = where, list(args)
        if after is not None:
            page_where += " AND d.id > ?"
            page_args.append(after)

        def read(c: sqlite3.Connection) -> DevicePage:
            cols = ", ".join("d." + col.strip() for col in _COLS.split(","))
            rows = c.execute(
                f"SELECT {cols} FROM devices d WHERE {page_where} ORDER BY d.id LIMIT ?",
                (*page_args, limit + 1),
            ).fetchall()
            total = None
            if after is None:
                total = _count(c, filters, where, args)
            devices = [_row_device(r) for r in rows[:limit]]
            more = len(rows) > limit
            return DevicePage(devices, devices[-1].id if more else None, total)

        return await self._read(read)

    # ------------------------------------------------------------ changes

    async def add(self, body: Mapping[str, Any]) -> Device:
        """Register a device (``body``: id plus :data:`EDITABLE` fields).
        DeviceError ``exists`` when it is registered already."""
        device_id = check_device_id(body.get("id"))
        fields = parse_fields(body, partial=False)
        now = self.clock()

        def write(c: sqlite3.Connection) -> tuple[Device | None, bool]:
            was_unregistered = c.execute(
                "SELECT 1 FROM devices WHERE id = ? AND registered = 0", (device_id,)
            ).fetchone()
            if not _insert(c, device_id, fields, now):
                return None, False
            return _get(c, device_id), was_unregistered is not None

        device, was_unregistered = await self.db.write(write)
        if device is None:
            raise DeviceError("exists", f"device {device_id!r} is registered already", "id")
        if was_unregistered:
            self.unregistered -= 1
        self._changed(device_id, "added")
        return device

    async def update(self, device_id: str, body: Mapping[str, Any]) -> Device:
        """Change the given :data:`EDITABLE` fields of a registered device."""
        if "id" in body and body["id"] != device_id:
            raise DeviceError("invalid", "the id cannot be changed", "id")
        fields = parse_fields(body, partial=True)
        return await self._change(device_id, fields, "updated")

    async def disable(self, device_id: str) -> Device:
        """Refuse the device from now on (its connections and cached
        decisions go, through the change listeners)."""
        return await self._change(device_id, {"enabled": 0}, "disabled")

    async def enable(self, device_id: str) -> Device:
        return await self._change(device_id, {"enabled": 1}, "enabled")

    async def _change(self, device_id: str, fields: Mapping[str, Any], change: str) -> Device:
        now = self.clock()

        def write(c: sqlite3.Connection) -> Device | None:
            row = c.execute("SELECT registered FROM devices WHERE id = ?", (device_id,)).fetchone()
            if row is None or not row[0]:
                return None
            _write_fields(c, device_id, fields, now)
            return _get(c, device_id)

        device = await self.db.write(write)
        if device is None:
            raise DeviceError("not_found", f"no registered device {device_id!r}")
        self._changed(device_id, change)
        return device

    async def remove(self, device_id: str) -> None:
        """Delete the record (registered or not)."""

        def write(c: sqlite3.Connection) -> int | None:
            row = c.execute("SELECT registered FROM devices WHERE id = ?", (device_id,)).fetchone()
            if row is None:
                return None
            c.execute("DELETE FROM devices WHERE id = ?", (device_id,))
            return int(row[0])

        registered = await self.db.write(write)
        if registered is None:
            raise DeviceError("not_found", f"no device {device_id!r}")
        if not registered:
            self.unregistered -= 1
        self._changed(device_id, "removed")

    async def add_many(self, rows: Sequence[tuple[int, Mapping[str, Any]]]) -> ImportReport:
        """Register many devices in one transaction (a CSV import): ``rows``
        are (row number, fields); a row that does not validate or names a
        registered device is refused with its reason, the others are created."""
        # Validation in a thread: 100,000 rows take about a second of CPU.
        report, valid = await asyncio.to_thread(_validate_rows, rows)
        now = self.clock()

        def write(c: sqlite3.Connection) -> tuple[list[str], list[tuple[int, str, str]], int]:
            created: list[str] = []
            refused: list[tuple[int, str, str]] = []
            was_unregistered = 0
            for n, device_id, fields in valid:
                unreg = c.execute(
                    "SELECT 1 FROM devices WHERE id = ? AND registered = 0", (device_id,)
                ).fetchone()
                if _insert(c, device_id, fields, now):
                    created.append(device_id)
                    was_unregistered += unreg is not None
                else:
                    refused.append((n, device_id, "id: registered already"))
            return created, refused, was_unregistered

        created, refused, was_unregistered = await self.db.write(write)
        self.unregistered -= was_unregistered
        report.created = created
        report.refused = sorted(report.refused + refused)
        for i, device_id in enumerate(created):
            self._changed(device_id, "added")
            if i % 1000 == 999:
                await asyncio.sleep(0)  # 100,000 listeners' calls: let the loop breathe
        return report

    # ------------------------------------------------------------ status

    async def record_status(self, updates: Sequence[StatusUpdate]) -> int:
        """Apply what presence learned (one flush): one statement per device;
        a device with no record gets an unregistered one while there is room
        (:attr:`max_unregistered`). Returns the records written."""
        if not updates:
            return 0
        room = self.max_unregistered - self.unregistered

        def write(c: sqlite3.Connection) -> tuple[int, int, int]:
            written = created = refused = 0
            for u in updates:
                row = c.execute(
                    "SELECT protocols FROM devices WHERE id = ?", (u.device_id,)
                ).fetchone()
                if row is None:
                    if created >= room or not DEVICE_ID.fullmatch(u.device_id):
                        refused += 1
                        continue
                    now = u.last_seen or u.last_connect or u.last_error_at or self.clock()
                    c.execute(
                        "INSERT INTO devices(id, registered, created, updated) VALUES (?, 0, ?, ?)",
                        (u.device_id, now, now),
                    )
                    created += 1
                    old = ""
                else:
                    old = row[0]
                c.execute(
                    "UPDATE devices SET "
                    "last_seen = coalesce(?, last_seen), "
                    "protocols = ?, "
                    "online = coalesce(?, online), "
                    "connected = coalesce(?, connected), "
                    "last_connect = coalesce(?, last_connect), "
                    "last_disconnect = coalesce(?, last_disconnect), "
                    "disconnect_reason = coalesce(?, disconnect_reason), "
                    "last_error = coalesce(?, last_error), "
                    "last_error_at = coalesce(?, last_error_at), "
                    "firmware = coalesce(?, firmware) "
                    "WHERE id = ?",
                    (
                        u.last_seen,
                        _merge_protocols(old, u.protocols),
                        None if u.online is None else int(u.online),
                        None if u.connected is None else int(u.connected),
                        u.last_connect,
                        u.last_disconnect,
                        u.disconnect_reason,
                        None if u.last_error is None else printable(u.last_error[:MAX_ERROR]),
                        u.last_error_at,
                        u.firmware,
                        u.device_id,
                    ),
                )
                written += 1
            return written, created, refused

        written, created, refused = await self.db.write(write)
        self.unregistered += created
        self.unregistered_refused += refused
        return written

    async def mark_idle(self, seen_before: float) -> int:
        """Devices without a connection (HTTP, CoAP, pollers) not seen since
        ``seen_before`` go offline. Returns how many did."""

        def write(c: sqlite3.Connection) -> int:
            cur = c.execute(
                "UPDATE devices SET online = 0 "
                "WHERE online = 1 AND connected = 0 AND last_seen < ?",
                (seen_before,),
            )
            return int(cur.rowcount)

        return await self.db.write(write)

    async def mark_all_offline(self, reason: str) -> int:
        """At start-up: nobody is connected yet, whatever the file says
        (the previous run may have ended with a kill -9)."""
        now = self.clock()

        def write(c: sqlite3.Connection) -> int:
            cur = c.execute(
                "UPDATE devices SET online = 0, connected = 0, last_disconnect = ?, "
                "disconnect_reason = ? WHERE online = 1 OR connected = 1",
                (now, reason),
            )
            return int(cur.rowcount)

        return await self.db.write(write)

    async def counts(self) -> dict[str, int]:
        """Devices per status (the admin status page)."""

        def read(c: sqlite3.Connection) -> dict[str, int]:
            out = dict.fromkeys(STATUSES, 0)
            for status, n in c.execute("SELECT status, n FROM device_counts"):
                out[status] = int(n)
            return out

        return await self._read(read)
