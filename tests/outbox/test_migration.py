"""An outbox written by edgeway with schema 1 (a row per reading) opens, is
migrated to chunks, and delivers exactly what the old code would have.

``data/outbox_v1.db`` was written by the schema-1 outbox (commit 1c60c83): two
sinks, 500 readings under two gateway ids (an epoch change at seq 301), tags,
device message ids, priority readings, part of each sink confirmed (sink ``a``
also out of order, by priority), ten records dead-lettered for ``b``, some
readings routed to ``b`` only. ``data/outbox_v1_expected.json`` holds the
counters and what that same code then drained for each sink.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from edgeway.config import OutboxSection
from edgeway.outbox import Outbox, list_dead_letters, replay_dead_letters
from edgeway.outbox import store as store_mod
from outbox_db import pending_for, stored_records

DATA = Path(__file__).parent / "data"


def by_device(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        out.setdefault(r["device_id"], []).append(r["id"])
    return out


async def drain(ob: Outbox, sink: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(1000):
        b = await ob.read_batch(sink, 37, 1 << 20)
        if not b.records and not b.more:
            return out
        out += [orjson.loads(r.to_json_bytes()) for r in b.records]
        await ob.confirm(b)
    raise AssertionError("drain did not finish")


async def test_schema_1_outbox_is_migrated_and_drains_as_before(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    shutil.copy(DATA / "outbox_v1.db", db)
    expected = orjson.loads((DATA / "outbox_v1_expected.json").read_bytes())
    ob = Outbox(db, gateway_id="gw-new", config=OutboxSection(), sink_names=["a", "b"])
    await ob.open()
    try:
        assert ob.counters() == expected["counters"]
        with sqlite3.connect(db) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            (version,) = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
        assert "records" not in tables and int(version) == store_mod.SCHEMA_VERSION
        on_disk = stored_records(db)  # also checks every chunk's size sum
        assert len({r.seq for r in on_disk}) == len(on_disk)
        assert ob.stored_bytes == sum(r.size for r in on_disk)
        for name in ("a", "b"):
            assert pending_for(db, name) == expected["counters"][name]["pending"]
        # Ids keep their epoch; device message ids survive the move.
        ids = {r.seq: r.doc["id"] for r in on_disk}
        assert ids[min(ids)].startswith("gw-old:") and ids[max(ids)] == "gw-new:500"
        assert any(r.msg_id is not None for r in on_disk)
        got = {name: await drain(ob, name) for name in ("a", "b")}
        for name in ("a", "b"):
            want = expected[name]
            assert sorted(orjson.dumps(r) for r in got[name]) == sorted(
                orjson.dumps(r) for r in want
            ), name
            assert by_device(got[name]) == by_device(want), name
        after = ob.counters()
        for name in ("a", "b"):
            assert after[name] == expected["after"][name]
            c = after[name]
            assert c["accepted"] == c["delivered"] + c["pending"] + c["dropped"]
        assert stored_records(db) == [] and ob.stored_bytes == 0
    finally:
        await ob.close()
    # The dead letters written by schema 1 are listed and replayed with their ids.
    letters = list_dead_letters(db)
    assert len(letters) == 10 and all(d.sink == "b" for d in letters)
    assert letters[0].record_id.startswith("gw-old:")
    assert replay_dead_letters(db) == 10
    ob = Outbox(db, gateway_id="gw-new", config=OutboxSection(), sink_names=["a", "b"])
    await ob.open()
    try:
        again = await drain(ob, "b")
        assert [r["id"] for r in again] == [d.record_id for d in letters]
        assert await drain(ob, "a") == []
    finally:
        await ob.close()
