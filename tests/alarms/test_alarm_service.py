"""The alarm service: one alarm per key under concurrent producers, the
journal (written before reported, state rebuilt at start, shelving resumed
from stored deadlines), records to the sinks, health figures, refusals."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from edgeway.alarms.check import check_journal
from edgeway.alarms.model import AlarmError, Transition
from edgeway.alarms.service import AlarmService
from edgeway.config import AlarmsSection
from edgeway.reading import Reading
from edgeway.sim.alarm_stress import run_sequences


class Sinks:
    """Stands for the outbox: keeps what it is given (or fails, on demand)."""

    def __init__(self) -> None:
        self.records: list[Reading] = []
        self.fail = False
        self.stored = asyncio.Event()

    def __call__(self, readings: Sequence[Reading]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail:
            fut.set_exception(OSError("disk full"))
        else:
            self.records.extend(readings)
            self.stored.set()
            fut.set_result(None)
        return fut


@asynccontextmanager
async def service(
    data: Path,
    emit: Callable[[Sequence[Reading]], Any] | None = None,
    clock: Callable[[], float] = time.time,
    **cfg: Any,
) -> AsyncIterator[AlarmService]:
    durability = cfg.pop("durability", "os")
    svc = AlarmService(data, AlarmsSection(**cfg), emit=emit, durability=durability, clock=clock)
    await svc.open()
    try:
        yield svc
    finally:
        await svc.close()


async def until(svc: AlarmService, done: Callable[[], bool], within: float) -> None:
    """Wait (bounded) until ``done()`` holds, checking at every transition."""
    changed = asyncio.Event()

    def listener(_t: Transition) -> None:
        changed.set()

    svc.add_listener(listener)
    try:
        async with asyncio.timeout(within):
            while not done():
                await changed.wait()
                changed.clear()
    finally:
        svc.remove_listener(listener)


def shelved(svc: AlarmService, source: str, type_: str) -> bool:
    a = svc.get(source, type_)
    return a is not None and a.shelving is not None


def journal(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(data / "alarms.db")


async def test_sixteen_concurrent_raises_make_one_alarm(tmp_path: Path) -> None:
    sinks = Sinks()
    async with service(tmp_path, sinks) as svc:
        got = await asyncio.gather(
            *(
                svc.raise_alarm("boiler-1", "overheat", severity=700, message="hot", by=f"r{i}")
                for i in range(16)
            )
        )
        assert len({a.id for a in got}) == 1
        assert svc.stats.transitions == 1 and svc.stats.active == 1
    conn = journal(tmp_path)
    assert conn.execute("SELECT COUNT(*) FROM transitions").fetchone()[0] == 1
    assert [r.metrics["event"] for r in sinks.records] == ["raise"]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_concurrent_producers_never_duplicate_or_break_the_machine(
    tmp_path: Path, seed: int
) -> None:
    """The CI-sized run of the stress test (bench/alarms_stress.py runs
    100,000 sequences): 60 keys, 16 producers each, 6 events per producer."""
    async with service(tmp_path, max_alarms=100_000, max_history=1_000_000) as svc:
        result = await run_sequences(svc, 60, producers=16, events=6, concurrent=20, seed=seed)
        kept = {(a.source, a.type): a for a in svc.list(state="all")}
    assert result.events == 60 * 16 * 6
    assert set(result.refused) <= {"illegal", "not_found"}, result.refused
    assert result.refused["illegal"] > 0  # the races did happen
    conn = journal(tmp_path)
    report = check_journal(conn)
    assert report.problems == [], report.problems
    assert report.keys == 60 and report.transitions > 60 * 5
    # The service's memory agrees with the journal's current table.
    stored = {(s, t) for s, t in conn.execute("SELECT source, type FROM alarms")}
    assert stored == set(kept)


def test_the_journal_check_catches_a_duplicate_alarm(tmp_path: Path) -> None:
    """The checker the stress test relies on fails on what it must catch."""

    async def run() -> None:
        async with service(tmp_path) as svc:
            await svc.raise_alarm("d", "t", severity=1, message="", by="x")
            await svc.clear_alarm("d", "t", by="x")

    asyncio.run(run())
    conn = journal(tmp_path)
    # Forge a second raise on top of an active alarm, as a racy service would.
    conn.execute("DELETE FROM transitions WHERE action = 'clear'")
    (seq,) = conn.execute("SELECT seq FROM transitions").fetchone()
    conn.execute(
        "INSERT INTO transitions SELECT seq + 10, at, alarm_id, source, type, action, by, "
        "comment, activated, emitted, state FROM transitions WHERE seq = ?",
        (seq,),
    )
    conn.commit()
    problems = check_journal(conn).problems
    assert any("duplicate" in p for p in problems), problems


async def test_timed_shelving_ends_by_itself_within_a_second(tmp_path: Path) -> None:
    async with service(tmp_path) as svc:
        await svc.raise_alarm("pump-2", "dry_run", severity=900, message="dry", by="rule:dry")
        a = await svc.shelve("pump-2", "dry_run", by="ann", comment="known", duration=0.4)
        assert a.shelving is not None and a.shelving.until is not None
        deadline = a.shelving.until
        assert svc.list() == [] and len(svc.list(state="shelved")) == 1
        await until(svc, lambda: not shelved(svc, "pump-2", "dry_run"), 3)
        late = time.time() - deadline
        assert late < 1.0, late
        (last, *_) = await svc.history("pump-2", "dry_run")
        assert (last.action, last.by, last.comment) == ("unshelve", "system", "shelving time ended")
        assert 0 <= last.at - deadline < 1.0
        assert [a.source for a in svc.list()] == ["pump-2"]


async def test_five_hundred_shelvings_ending_together_all_end_within_a_second(
    tmp_path: Path,
) -> None:
    async with service(tmp_path, durability="fsync") as svc:
        ends: dict[str, float] = {}

        def listener(t: Transition) -> None:
            if t.action.value == "unshelve":
                ends[t.alarm.source] = time.time()

        # Listening from the start: on a loaded machine the 500 shelvings can
        # take longer than their 0.5 s, and the first end before the last is in.
        svc.add_listener(listener)
        shelved_all = await asyncio.gather(
            *(svc.shelve(f"d{i}", "door", by="ann", duration=0.5) for i in range(500))
        )
        deadline = max(a.shelving.until for a in shelved_all)  # type: ignore[union-attr]
        await until(svc, lambda: len(ends) == 500, 5)
        assert max(ends.values()) - deadline < 1.0


async def test_one_shot_shelving_ends_when_the_alarm_clears(tmp_path: Path) -> None:
    async with service(tmp_path) as svc:
        with pytest.raises(AlarmError) as e:
            await svc.shelve("fan", "stall", by="ann", one_shot=True)
        assert e.value.code == "illegal" or e.value.code == "not_found"
        await svc.raise_alarm("fan", "stall", severity=300, message="", by="r")
        await svc.shelve("fan", "stall", by="ann", one_shot=True)
        a = await svc.clear_alarm("fan", "stall", by="r")
        assert a is not None and a.shelving is None and not a.active and not a.acked
        actions = [h.action for h in await svc.history("fan", "stall")]
        assert actions == ["unshelve", "clear", "shelve", "raise"]


async def test_state_and_shelving_deadlines_survive_a_restart(tmp_path: Path) -> None:
    async with service(tmp_path, types={"overheat": {"latching": True}}) as svc:
        await svc.raise_alarm("b1", "overheat", severity=950, message="hot", by="rule:t")
        await svc.clear_alarm("b1", "overheat", by="rule:t")  # latched
        await svc.raise_alarm("b2", "low_flow", severity=400, message="low", by="rule:f")
        await svc.ack("b2", "low_flow", by="ann", comment="on it")
        a = await svc.shelve("b2", "low_flow", by="ann", duration=1.5)
        b = await svc.shelve("b3", "door", by="ann", duration=0.2)
        before = {(x.source, x.type): x for x in svc.list(state="all")}
    assert a.shelving is not None and b.shelving is not None
    await asyncio.sleep(0.4)  # b3's shelving ends while the service is down
    t0 = time.time()
    async with service(tmp_path, types={"overheat": {"latching": True}}) as svc:
        after = {(x.source, x.type): x for x in svc.list(state="all")}
        assert after[("b1", "overheat")] == before[("b1", "overheat")]
        assert after[("b1", "overheat")].latched and after[("b1", "overheat")].active
        assert after[("b2", "low_flow")] == before[("b2", "low_flow")]
        # Expired during the downtime: ended at start, within a second.
        await until(svc, lambda: svc.get("b3", "door") is None, 1)
        # The resumed deadline is the stored one, not restarted.
        await until(svc, lambda: not shelved(svc, "b2", "low_flow"), 3)
        assert abs(time.time() - a.shelving.until) < 1.0  # type: ignore[operator]
        assert time.time() - t0 < 1.5
        await svc.reset("b1", "overheat", by="ann", comment="checked")
        assert svc.get("b1", "overheat") is not None  # still unacknowledged
        await svc.ack("b1", "overheat", by="ann")
        assert svc.get("b1", "overheat") is None
    assert check_journal(journal(tmp_path)).problems == []


async def test_records_the_outbox_did_not_take_are_sent_again_at_start(tmp_path: Path) -> None:
    sinks = Sinks()
    sinks.fail = True
    async with service(tmp_path, sinks) as svc:
        await svc.raise_alarm("s1", "leak", severity=850, message="wet", by="rule:l")
        await svc.ack("s1", "leak", by="bob", comment="bucket placed")
    assert sinks.records == []
    sinks.fail = False
    async with service(tmp_path, sinks) as svc:
        async with asyncio.timeout(5):
            while len(sinks.records) < 2:
                await sinks.stored.wait()
                sinks.stored.clear()
    got = [(r.metrics["event"], r.metrics["by"], r.metrics["comment"]) for r in sinks.records]
    assert got == [("raise", "rule:l", ""), ("ack", "bob", "bucket placed")]
    rec = sinks.records[0]
    assert rec.tags == {"record_type": "alarm"} and rec.priority == 5  # band high
    assert (rec.metrics["alarm_id"], rec.metrics["transition"]) == (svc_id(tmp_path), 1)
    # Marked sent (at close at the latest): a third start sends nothing.
    sinks.records.clear()
    async with service(tmp_path, sinks) as svc:
        await svc.raise_alarm("s2", "leak", severity=100, message="", by="rule:l")
    assert [r.device_id for r in sinks.records] == ["s2"]


async def test_records_are_offered_again_while_running(tmp_path: Path) -> None:
    """An outbox that refuses for a while (full, failing) gets the records
    again, in a second, without a restart."""
    sinks = Sinks()
    sinks.fail = True
    async with service(tmp_path, sinks) as svc:
        await svc.raise_alarm("s1", "leak", severity=850, message="wet", by="rule:l")
        assert sinks.records == []
        sinks.fail = False
        async with asyncio.timeout(3):
            await sinks.stored.wait()
        assert [r.metrics["event"] for r in sinks.records] == ["raise"]


def svc_id(data: Path) -> str:
    conn = journal(data)
    try:
        return str(conn.execute("SELECT alarm_id FROM transitions WHERE seq = 1").fetchone()[0])
    finally:
        conn.close()


async def test_refusals_name_the_problem(tmp_path: Path) -> None:
    async with service(tmp_path, max_alarms=2, max_shelve=60) as svc:
        for bad in (0, 1001, True):
            with pytest.raises(AlarmError, match="severity"):
                await svc.raise_alarm("d", "t", severity=bad, message="", by="x")
        with pytest.raises(AlarmError, match="source"):
            await svc.raise_alarm("a/b", "t", severity=1, message="", by="x")
        with pytest.raises(AlarmError, match="type"):
            await svc.raise_alarm("d", "bad type", severity=1, message="", by="x")
        with pytest.raises(AlarmError, match="by"):
            await svc.raise_alarm("d", "t", severity=1, message="", by="")
        with pytest.raises(AlarmError, match="max_shelve"):
            await svc.shelve("d", "t", by="x", duration=61)
        await svc.raise_alarm("d1", "t", severity=1, message="", by="x")
        await svc.raise_alarm("d2", "t", severity=1, message="", by="x")
        with pytest.raises(AlarmError) as e:
            await svc.raise_alarm("d3", "t", severity=1, message="", by="x")
        assert e.value.code == "full" and svc.stats.refused_full == 1
        with pytest.raises(AlarmError) as e:  # a new key by any way counts
            await svc.suppress("d3", "t", by="x")
        assert e.value.code == "full" and svc.stats.refused_full == 2
        await svc.suppress("d2", "t", by="x")  # a kept one: fine
        await svc.ack("d1", "t", by="x")
        with pytest.raises(AlarmError) as e:
            await svc.ack("d1", "t", by="y")
        assert e.value.code == "illegal" and "acknowledged" in str(e.value)
        with pytest.raises(AlarmError) as e:
            await svc.confirm("d1", "t", by="y")
        assert e.value.code == "illegal"
        assert svc.stats.refused_illegal == 2


async def test_health_figures_rate_flood_top_and_standing(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    async with service(tmp_path, clock=lambda: now[0], standing_after=3600) as svc:
        for i in range(12):
            await svc.raise_alarm(f"d{i % 3}", "chatter", severity=300, message="", by="r")
            await svc.clear_alarm(f"d{i % 3}", "chatter", by="r")
            await svc.ack(f"d{i % 3}", "chatter", by="op")
            now[0] += 10
        await svc.suppress("d9", "hidden", by="op")
        await svc.raise_alarm("d9", "hidden", severity=300, message="", by="r")  # not counted
        f = svc.figures()
        assert f.rate_10m == 12 and f.in_flood and f.floods == 1
        assert f.top == [("d0", "chatter", 4), ("d1", "chatter", 4), ("d2", "chatter", 4)]
        assert f.standing == 0
        now[0] += 3700  # the rate window has passed; d9 has stood for over an hour
        f = svc.figures()
        assert f.rate_10m == 0 and not f.in_flood
        # Flood from the 11th alarm (t=100 s) until the second one (t=10 s)
        # left the 10-minute window (t=610 s), however late it is looked at.
        assert f.flood_seconds == 510, f.flood_seconds
        assert f.standing == 1
        status = svc.status()
        assert status["health"]["standing"] == 1 and status["annunciated"] == 12
