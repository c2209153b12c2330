"""max_age against wall-clock jumps, with injected clocks: an NTP correction of
years (a board without a real-time clock) does not expire the backlog."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from edgeway.config import OutboxSection
from edgeway.outbox import Outbox
from edgeway.outbox.ageclock import AgeClock
from edgeway.reading import Reading

YEAR = 365 * 86400.0


class Clocks:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1000.0

    def outbox(self, path: Path, **cfg: Any) -> Outbox:
        return Outbox(
            path,
            gateway_id="gw",
            config=OutboxSection(**cfg),
            sink_names=["a", "nudge"],
            wall_clock=lambda: self.wall,
            monotonic_clock=lambda: self.mono,
        )


async def swept(ob: Outbox) -> dict[str, int]:
    """Sink a's counters after a commit that started after the clocks moved: a
    reading for the other sink makes one at once, and each commit sweeps ages
    (at most once a second of the age clock; the tests move it more)."""
    await ob.submit([Reading("nudge", 0.0, {"n": 1})], ["nudge"])
    return ob.counters()["a"]


def readings(n: int) -> list[Reading]:
    return [Reading("dev", 1_700_000_000.0 + i, {"i": i}) for i in range(n)]


async def test_a_forward_jump_of_the_wall_clock_expires_nothing(tmp_path: Path) -> None:
    clocks = Clocks()
    ob = clocks.outbox(tmp_path / "o.db", max_age=3600)
    await ob.open()
    try:
        await ob.submit(readings(10), ["a"])
        clocks.wall += 10 * YEAR  # NTP corrects the clock
        clocks.mono += 2
        c = await swept(ob)
        assert c["pending"] == 10 and c["dropped_max_age"] == 0
        clocks.wall -= 20 * YEAR  # and back the other way: nothing either
        clocks.mono += 2
        c = await swept(ob)
        assert c["pending"] == 10 and c["dropped_max_age"] == 0
        await ob.submit(readings(5), ["a"])  # stored 4 s after the first ten
        clocks.mono += 3600 - 2  # an hour after the first ten: they expire, not these
        c = await swept(ob)
        assert c["dropped_max_age"] == 10 and c["pending"] == 5
        clocks.mono += 10
        c = await swept(ob)
        assert c["dropped_max_age"] == 15 and c["pending"] == 0
    finally:
        await ob.close()


async def test_a_restart_counts_no_downtime_by_default(tmp_path: Path) -> None:
    clocks = Clocks()
    ob = clocks.outbox(tmp_path / "o.db", max_age=3600)
    await ob.open()
    await ob.submit(readings(10), ["a"])
    clocks.mono += 1800  # half an hour into the run
    await swept(ob)
    await ob.close()
    # Powered off; boots with a clock ten years on (NTP before edgeway started),
    # a new monotonic clock.
    clocks.wall += 10 * YEAR
    clocks.mono = 5.0
    ob = clocks.outbox(tmp_path / "o.db", max_age=3600)
    await ob.open()
    try:
        c = await swept(ob)
        assert c["pending"] == 10 and c["dropped_max_age"] == 0
        clocks.mono += 1700  # 58 min of runs in all: still kept
        c = await swept(ob)
        assert c["pending"] == 10
        clocks.mono += 200  # past the hour of running
        c = await swept(ob)
        assert c["dropped_max_age"] == 10 and c["pending"] == 0
    finally:
        await ob.close()


async def test_max_age_downtime_counts_a_stop_up_to_its_limit(tmp_path: Path) -> None:
    clocks = Clocks()
    ob = clocks.outbox(tmp_path / "o.db", max_age=3600)
    await ob.open()
    await ob.submit(readings(10), ["a"])
    await swept(ob)
    await ob.close()
    clocks.wall += 40 * 60  # stopped for 40 minutes, a real-time clock says
    ob = clocks.outbox(tmp_path / "o.db", max_age=3600, max_age_downtime=7200)
    await ob.open()
    try:
        c = await swept(ob)
        assert c["pending"] == 10
        clocks.mono += 21 * 60  # 40 + 21 minutes old
        c = await swept(ob)
        assert c["dropped_max_age"] == 10
    finally:
        await ob.close()


def test_the_age_clock_resumes_clamped() -> None:
    mono = [50.0]
    wall = [2000.0]

    def resume(stored: float | None, stored_wall: float | None, cap: float) -> float:
        clock, _ = AgeClock.resume(
            stored, stored_wall, cap, monotonic=lambda: mono[0], wall=lambda: wall[0]
        )
        return clock.now()

    assert resume(None, None, 0) == 2000.0  # a new outbox starts on the wall clock
    assert resume(1000.0, 1000.0, 0) == 1000.0  # downtime not counted
    assert resume(1000.0, 1000.0, 300) == 1300.0  # at most 300 s of it
    assert resume(1000.0, 1900.0, 300) == 1100.0  # the 100 s the wall clock says
    assert resume(1000.0, 9000.0, 300) == 1000.0  # the wall clock went back: nothing
    clock, _ = AgeClock.resume(1000.0, 1000.0, 0, monotonic=lambda: mono[0])
    mono[0] += 7.5
    assert clock.now() == 1007.5


async def test_the_process_wall_clock_jumping_expires_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with no injected clock: the process's own ``time.time`` jumps."""
    wall = [time.time()]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    ob = Outbox(
        tmp_path / "o.db",
        gateway_id="gw",
        config=OutboxSection(max_age=3600),
        sink_names=["a", "nudge"],
    )
    await ob.open()
    try:
        await ob.submit(readings(10), ["a"])
        wall[0] += 10 * YEAR
        c = await swept(ob)
        assert c["pending"] == 10 and c["dropped_max_age"] == 0
    finally:
        await ob.close()
