"""Files written before the pipeline state and the broker's persistence ran on
the shared SQLite helper (no ``schema_version`` table) open with what they
held, get their version, and a newer file is refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from edgeway.pipeline.state import StateStore
from edgeway.south.mqtt.persistence import BrokerStore
from edgeway.storage.sqlite import StorageError

# The pipeline state's schema as the hand-made store created it (commit 9fdd314).
OLD_PIPELINE = """
CREATE TABLE journal(id INTEGER PRIMARY KEY, step TEXT NOT NULL, key TEXT NOT NULL,
    ts REAL NOT NULL, data BLOB NOT NULL);
CREATE TABLE marks(step TEXT NOT NULL, key TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY(step, key)) WITHOUT ROWID;
"""

# The broker's first schema: sessions without ``owner`` (added later at open).
OLD_BROKER = """
CREATE TABLE retained(topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    properties BLOB, expires_at REAL);
CREATE TABLE sessions(client_id TEXT PRIMARY KEY, protocol_level INTEGER NOT NULL,
    expiry_interval INTEGER NOT NULL, disconnected_at REAL, in_qos2 BLOB);
CREATE TABLE subscriptions(client_id TEXT NOT NULL, topic_filter TEXT NOT NULL,
    qos INTEGER NOT NULL, no_local INTEGER NOT NULL, retain_as_published INTEGER NOT NULL,
    retain_handling INTEGER NOT NULL, subscription_id INTEGER,
    PRIMARY KEY(client_id, topic_filter));
"""


def _version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])


async def test_old_pipeline_state_file_restores_its_journal(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_PIPELINE)
        data = orjson.dumps(["dev1", {"t": 21.5}, None, "mqtt", "t/dev1", 0])
        conn.execute("INSERT INTO journal VALUES (7, 'w', 'dev1', 100.0, ?)", (data,))
        conn.execute("INSERT INTO marks VALUES ('w', 'dev1', 90.0)")
    store = StateStore(path, "os")
    restored = await store.open()
    try:
        (key, reading, jid), *rest = restored["w"].entries
        assert (key, jid, rest) == ("dev1", 7, [])
        assert reading.device_id == "dev1" and reading.metrics == {"t": 21.5}
        assert restored["w"].marks == {"dev1": 90.0}
        assert store.rows == 1
        # New ids continue after the old ones; the append is committed.
        assert store.journal("w").append("dev1", reading) == 8
        fut = store.commit_future()
        assert fut is not None
        await fut
        assert store.rows == 2
    finally:
        await store.close()
    assert _version(path) == 1
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 5")
    with pytest.raises(StorageError, match="pipeline state: schema version 5 is newer"):
        await StateStore(path, "os").open()


def test_old_broker_file_gets_the_owner_column_and_keeps_its_sessions(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_BROKER)
        conn.execute("INSERT INTO retained VALUES ('a/b', x'6869', 1, NULL, NULL)")
        conn.execute("INSERT INTO sessions VALUES ('dev1', 5, 3600, 10.0, NULL)")
        conn.execute("INSERT INTO subscriptions VALUES ('dev1', 'cmd/#', 1, 0, 0, 0, NULL)")
    store = BrokerStore(path)
    try:
        state = store.load()
    finally:
        store.close()
    assert [(m.topic, m.payload) for m in state.retained] == [("a/b", b"hi")]
    (s,) = state.sessions
    assert (s.client_id, s.owner, list(s.subscriptions)) == ("dev1", None, ["cmd/#"])
    assert _version(path) == 2
    with sqlite3.connect(path) as conn:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
        assert "owner" in cols
        conn.execute("UPDATE schema_version SET version = 3")
    with pytest.raises(StorageError, match="broker state: schema version 3 is newer"):
        BrokerStore(path)


def test_old_tokens_file_keeps_its_tokens_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    from edgeway.admin.tokens import Role, TokenStore, TokenStoreError

    path = tmp_path / "tokens.db"
    store = TokenStore(path)
    try:
        record, secret = store.create("ops", Role.parse("viewer"))
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE schema_version")  # as the hand-made store left it
    store = TokenStore(path)
    try:
        assert [t.id for t in store.list()] == [record.id]
        assert store.verify(secret) is not None
    finally:
        store.close()
    assert _version(path) == 1
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 2")
    with pytest.raises(TokenStoreError, match="tokens: schema version 2 is newer"):
        TokenStore(path)
