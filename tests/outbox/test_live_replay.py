"""Dead letters replayed while the gateway runs, through its own outbox (the
admin API's ``POST /api/deadletters/replay``): same record ids, counted as
accepted again, sent by the running sink, the conservation check holding."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner, list_dead_letters
from edgeway.reading import Origin, Reading
from edgeway.sinks.base import PermanentSinkError, Record, Sink
from outbox_db import pending_for


class RefuseFirst(Sink):
    """Refuses its first batch for good, takes every other one."""

    schemes = ()

    def __init__(self) -> None:
        super().__init__(SinkConfig(name="a", url="test://"), "gw")
        self.max_batch_records = 10
        self.max_wait = 0.0
        self.calls = 0
        self.records: list[Record] = []

    async def send_batch(self, records: Sequence[Record]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise PermanentSinkError("HTTP 400 bad")
        self.records.extend(records)


async def wait_for(cond: object, ob: Outbox) -> None:
    async with asyncio.timeout(10):
        while not cond():  # type: ignore[operator]
            await ob.wait_for_commit()


async def test_dead_letters_replayed_while_running(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db", gateway_id="gw", config=OutboxSection(),
                sink_names=["a", "b"])  # fmt: skip
    await ob.open()
    sink = RefuseFirst()
    task = asyncio.create_task(SinkRunner(ob, sink).run())
    try:
        readings = [
            Reading("d", 1_700_000_000.0 + i, {"i": i}, origin=Origin("t")) for i in range(30)
        ]
        await ob.submit(readings, ["a"])
        await wait_for(lambda: ob.counters()["a"]["pending"] == 0, ob)
        letters = list_dead_letters(ob.path)
        assert [d.record_id for d in letters] == [f"gw:{i}" for i in range(1, 11)]
        # Two chosen ones first, then the rest of sink a's.
        assert await ob.replay_dead_letters(ids=[letters[3].id, letters[5].id]) == 2
        assert await ob.replay_dead_letters(sink="b") == 0  # none of b's
        assert await ob.replay_dead_letters(sink="a") == 8
        assert await ob.replay_dead_letters() == 0
        await wait_for(lambda: len(sink.records) == 30, ob)
        await wait_for(lambda: ob.counters()["a"]["pending"] == 0, ob)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    c = ob.counters()["a"]
    assert c["accepted"] == 40 and c["delivered"] == 30 and c["dropped_dead_letter"] == 10
    assert c["accepted"] == c["delivered"] + c["pending"] + c["dropped"]
    assert pending_for(ob.path, "a") == 0
    assert list_dead_letters(ob.path) == []
    replayed = [r.id for r in sink.records[20:]]
    assert replayed == ["gw:4", "gw:6", "gw:1", "gw:2", "gw:3", "gw:5", "gw:7", "gw:8", "gw:9",
                        "gw:10"]  # fmt: skip
    await ob.close()
