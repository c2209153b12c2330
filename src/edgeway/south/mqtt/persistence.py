"""Broker state on disk: retained messages and persistent sessions (SQLite, WAL).

Configuration: the file is ``{gateway.data_dir}/broker.db``::

    gateway: {data_dir: ./edgeway-data}

What is written when, and why:

- Retained messages, persistent sessions (their row) and their subscriptions
  are written *behind* by one transaction at the end of the event-loop
  iteration that changed them (:meth:`BrokerStore.later` + :meth:`flush`).
  They change at a low rate, so this is write-through in practice, while a
  burst of retained publishes in one socket read still costs one commit.
- Queued and in-flight messages of persistent sessions change per message;
  writing each would cost a commit per message on the hot path. Like
  Mosquitto's ``autosave_interval`` they are saved for sessions that changed
  every :data:`AUTOSAVE_INTERVAL` seconds and on an orderly stop. A crash
  (kill -9) can lose up to that much queued broker-to-device traffic; it
  cannot lose telemetry, whose acknowledgement waits for the outbox.

All writes run on the writer thread of the shared SQLite helper
(:class:`edgeway.storage.sqlite.Database`, write-behind: :meth:`~Database.post`),
in order; the event loop only queues statements and snapshots (a full rewrite
of 10,000 queued messages costs the loop ~0.1 ms instead of ~0.3 s of SQLite
work). The helper also opens the file with its pragmas and runs the
migrations (version in ``schema_version``; a file made before versions were
kept gets every migration, each written to find what is already there).

``synchronous=NORMAL`` in WAL mode: a commit survives a process crash; a
power cut may lose the last commits of broker state, never outbox data
(the outbox has its own database and durability setting).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from edgeway.south.mqtt.clock import BootTime, ClockStamp
from edgeway.south.mqtt.packets import Properties
from edgeway.south.mqtt.retained import Message
from edgeway.south.mqtt.session import Delivery, Inflight, Session
from edgeway.south.mqtt.topics import SubEntry
from edgeway.storage.sqlite import Database, Migration, add_column

log = logging.getLogger(__name__)

AUTOSAVE_INTERVAL = 5.0
"""Seconds between saves of changed sessions' queued/in-flight messages: the
most broker-to-device traffic a crash may lose, against a commit per message."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS retained(
    topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    properties BLOB, expires_at REAL);
CREATE TABLE IF NOT EXISTS sessions(
    client_id TEXT PRIMARY KEY, protocol_level INTEGER NOT NULL,
    expiry_interval INTEGER NOT NULL, disconnected_at REAL, in_qos2 BLOB, owner TEXT);
CREATE TABLE IF NOT EXISTS clock(
    id INTEGER PRIMARY KEY CHECK (id = 1), clock REAL NOT NULL, wall REAL NOT NULL,
    boot_id TEXT, since_boot REAL);
CREATE TABLE IF NOT EXISTS subscriptions(
    client_id TEXT NOT NULL, topic_filter TEXT NOT NULL, qos INTEGER NOT NULL,
    no_local INTEGER NOT NULL, retain_as_published INTEGER NOT NULL,
    retain_handling INTEGER NOT NULL, subscription_id INTEGER,
    PRIMARY KEY(client_id, topic_filter));
CREATE TABLE IF NOT EXISTS messages(
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, packet_id INTEGER,
    released INTEGER NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
    sub_ids BLOB, topic TEXT NOT NULL, payload BLOB NOT NULL, msg_qos INTEGER NOT NULL,
    msg_retain INTEGER NOT NULL,
    properties BLOB, expires_at REAL, sender TEXT,
    PRIMARY KEY(client_id, seq));
"""


def _add_owner(conn: sqlite3.Connection) -> None:
    add_column(conn, "sessions", "owner", "TEXT")


MIGRATIONS: list[Migration] = [_SCHEMA, _add_owner]
"""1: the tables (``IF NOT EXISTS``); 2: ``sessions.owner`` (NULL in rows
made before it; already there in files made by the first schema's later
versions, which added it at every open)."""

_Statement = (
    tuple[str, tuple[Any, ...] | list[tuple[Any, ...]]]
    | Callable[[], list[tuple[str, list[tuple[Any, ...]]]]]
)
"""A statement with its parameters (a list: executemany), or a function the
writer thread calls to build statements from a snapshot."""

_PROP_FIELDS = [f.name for f in fields(Properties)]
_BYTES_FIELDS = {"correlation_data", "authentication_data"}


def properties_to_blob(props: Properties | None) -> bytes | None:
    """Serialise the set properties of a message (None when there are none)."""
    if props is None:
        return None
    out: dict[str, Any] = {}
    for name in _PROP_FIELDS:
        v = getattr(props, name)
        if v is None or (isinstance(v, list) and not v):
            continue
        out[name] = v.hex() if name in _BYTES_FIELDS else v
    return orjson.dumps(out) if out else None


def properties_from_blob(blob: bytes | None) -> Properties | None:
    if not blob:
        return None
    data: dict[str, Any] = orjson.loads(blob)
    for name in _BYTES_FIELDS:
        if name in data:
            data[name] = bytes.fromhex(data[name])
    if "user_properties" in data:
        data["user_properties"] = [(k, v) for k, v in data["user_properties"]]
    return Properties(**data)


def _message_row(
    cid: str, seq: int, pid: int | None, released: bool, d: Delivery
) -> tuple[Any, ...]:
    m = d.msg
    props = m.properties
    return (
        cid,
        seq,
        pid,
        released,
        d.qos,
        d.retain,
        orjson.dumps(d.sub_ids) if d.sub_ids else None,
        m.topic,
        m.payload,
        m.qos,
        m.retain,
        properties_to_blob(props) if props is not None else None,
        m.expires_at,
        m.sender,
    )


@dataclass(slots=True)
class LoadedState:
    """What :meth:`BrokerStore.load` read back."""

    retained: list[Message]
    sessions: list[Session]
    clock: ClockStamp | None = None
    """The broker clock when last saved (None: a database from before it);
    sessions' ``disconnected_at`` are on that clock."""


class BrokerStore:
    """The broker's SQLite database; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = Database(path, migrations=MIGRATIONS, durability="os", name="broker state")
        self._db.open_sync()
        self._pending: list[_Statement] = []

    # ------------------------------------------------------------------ load

    def load(self) -> LoadedState:
        """Read retained messages and persistent sessions (after pending writes)."""
        return self._db.call_sync(_load)

    # ----------------------------------------------------------- write-behind

    def later(self, sql: str, params: tuple[Any, ...] | list[tuple[Any, ...]]) -> None:
        """Queue a statement for the next :meth:`flush` (a list of tuples: executemany)."""
        self._pending.append((sql, params))

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def flush(self) -> None:
        """Hand the queued statements to the writer thread (one write, in the
        next group transaction; a failure is logged and rolled back)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._db.post(lambda conn: _run(conn, pending))

    def wait(self) -> None:
        """Block until the writer thread has run everything handed to it."""
        self._db.wait_sync()

    def retained_changed(self, changes: dict[str, Message | None]) -> None:
        for topic, msg in changes.items():
            if msg is None:
                self.later("DELETE FROM retained WHERE topic=?", (topic,))
            else:
                self.later(
                    "INSERT OR REPLACE INTO retained VALUES (?,?,?,?,?)",
                    (
                        topic,
                        msg.payload,
                        msg.qos,
                        properties_to_blob(msg.properties),
                        msg.expires_at,
                    ),
                )

    def session_saved(self, s: Session) -> None:
        """Write the session row (not its messages)."""
        self.later(
            "INSERT OR REPLACE INTO sessions"
            " (client_id, protocol_level, expiry_interval, disconnected_at, in_qos2, owner)"
            " VALUES (?,?,?,?,?,?)",
            (
                s.client_id,
                s.protocol_level,
                s.expiry_interval,
                s.disconnected_at,
                orjson.dumps(sorted(s.in_qos2)) if s.in_qos2 else None,
                s.owner,
            ),
        )
        s.persisted = True

    def clock_saved(self, stamp: ClockStamp) -> None:
        """Write the broker clock (see ``clock.py``), for the next start."""
        boot = stamp.boot
        self.later(
            "INSERT OR REPLACE INTO clock VALUES (1,?,?,?,?)",
            (
                stamp.clock,
                stamp.wall,
                boot.boot_id if boot is not None else None,
                boot.since_boot if boot is not None else None,
            ),
        )

    def session_deleted(self, client_id: str) -> None:
        self.later("DELETE FROM sessions WHERE client_id=?", (client_id,))
        self.later("DELETE FROM subscriptions WHERE client_id=?", (client_id,))
        self.later("DELETE FROM messages WHERE client_id=?", (client_id,))

    def subscription_saved(self, client_id: str, e: SubEntry) -> None:
        self.later(
            "INSERT OR REPLACE INTO subscriptions VALUES (?,?,?,?,?,?,?)",
            (
                client_id,
                e.topic_filter,
                e.qos,
                int(e.no_local),
                int(e.retain_as_published),
                e.retain_handling,
                e.subscription_id,
            ),
        )

    def subscription_deleted(self, client_id: str, topic_filter: str) -> None:
        self.later(
            "DELETE FROM subscriptions WHERE client_id=? AND topic_filter=?",
            (client_id, topic_filter),
        )

    def messages_saved(self, sessions: Iterable[Session]) -> int:
        """Rewrite queued and in-flight messages of ``sessions``.

        The loop only snapshots (list copies, ~0.1 ms per 10,000 messages);
        rows are built and written by the writer thread, so a large offline
        backlog does not stall the event loop. Returns messages snapshotted.
        """
        snapshots: list[
            tuple[str, list[tuple[int, bool, Delivery]], list[Delivery], bytes | None]
        ] = []
        count = 0
        for s in sessions:
            inflight = [(i.packet_id, i.released, i.delivery) for i in s.inflight.values()]
            queue = list(s.queue)
            count += len(inflight) + len(queue)
            ids = orjson.dumps(sorted(s.in_qos2)) if s.in_qos2 else None
            snapshots.append((s.client_id, inflight, queue, ids))
            s.dirty = False

        def statements() -> list[tuple[str, list[tuple[Any, ...]]]]:
            deletes: list[tuple[Any, ...]] = []
            updates: list[tuple[Any, ...]] = []
            rows: list[tuple[Any, ...]] = []
            for cid, inflight, queue, ids in snapshots:
                deletes.append((cid,))
                updates.append((ids, cid))
                seq = 0
                for pid, released, d in inflight:
                    rows.append(_message_row(cid, seq, pid, released, d))
                    seq += 1
                for d in queue:
                    rows.append(_message_row(cid, seq, None, False, d))
                    seq += 1
            return [
                ("DELETE FROM messages WHERE client_id=?", deletes),
                ("UPDATE sessions SET in_qos2=? WHERE client_id=?", updates),
                ("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows),
            ]

        self._pending.append(statements)
        self.flush()
        return count

    def close(self) -> None:
        """Write what is pending, wait for the writer, close the database."""
        try:
            self.flush()
        finally:
            self._db.close_sync()


def _run(db: sqlite3.Connection, pending: list[_Statement]) -> None:
    for item in pending:
        if callable(item):
            for sql, rows in item():
                db.executemany(sql, rows)
            continue
        sql, params = item
        if isinstance(params, list):
            db.executemany(sql, params)
        else:
            db.execute(sql, params)


def _load(db: sqlite3.Connection) -> LoadedState:
    retained = [
        Message(topic, bytes(payload), qos, True, properties_from_blob(props), exp)
        for topic, payload, qos, props, exp in db.execute(
            "SELECT topic, payload, qos, properties, expires_at FROM retained"
        )
    ]
    sessions: dict[str, Session] = {}
    for cid, level, expiry, disc, in_qos2, owner in db.execute(
        "SELECT client_id, protocol_level, expiry_interval, disconnected_at, in_qos2, owner"
        " FROM sessions"
    ):
        s = Session(cid, level, expiry)
        s.owner = owner
        s.disconnected_at = disc
        if in_qos2:
            s.in_qos2 = set(orjson.loads(in_qos2))
        s.persisted = True
        sessions[cid] = s
    for cid, filt, qos, nl, rap, rh, sid in db.execute(
        "SELECT client_id, topic_filter, qos, no_local, retain_as_published,"
        " retain_handling, subscription_id FROM subscriptions"
    ):
        owner = sessions.get(cid)
        if owner is not None:
            owner.subscriptions[filt] = SubEntry(filt, qos, bool(nl), bool(rap), rh, sid)
    for row in db.execute(
        "SELECT client_id, packet_id, released, qos, retain, sub_ids, topic, payload,"
        " msg_qos, msg_retain, properties, expires_at, sender FROM messages"
        " ORDER BY client_id, seq"
    ):
        (
            cid,
            pid,
            released,
            qos,
            retain,
            sub_ids,
            topic,
            payload,
            mqos,
            mret,
            props,
            exp,
            sender,
        ) = row
        owner = sessions.get(cid)
        if owner is None:
            continue
        msg = Message(
            topic, bytes(payload), mqos, bool(mret), properties_from_blob(props), exp, sender
        )
        d = Delivery(msg, qos, bool(retain), tuple(orjson.loads(sub_ids)) if sub_ids else ())
        if pid is not None:
            owner.inflight[pid] = Inflight(pid, d, bool(released))
        else:
            owner.enqueue(d, len(owner.queue) + 1)  # no byte limit: loads what was saved
    for s in sessions.values():
        s.dirty = False
    clock: ClockStamp | None = None
    for value, wall, boot_id, since_boot in db.execute(
        "SELECT clock, wall, boot_id, since_boot FROM clock"
    ):
        boot = BootTime(boot_id, since_boot) if boot_id is not None else None
        clock = ClockStamp(value, wall, boot)
    return LoadedState(retained, list(sessions.values()), clock)
