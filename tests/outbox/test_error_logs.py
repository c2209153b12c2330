"""Repeated errors in the outbox and the sink runner: a line and a count, no storms."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner
from edgeway.outbox import store as store_mod
from edgeway.ratelimit_log import RateLimitedLog
from edgeway.reading import Reading
from edgeway.sinks.base import PermanentSinkError, Record, RetryableSinkError, Sink


class FlakySink(Sink):
    """Keeps what it is sent; the first ``failures`` sends raise."""

    schemes = ()

    def __init__(self, failures: int = 0, refuse: bool = False) -> None:
        super().__init__(SinkConfig(name="a", url="test://"), "gw")
        self.max_batch_records = 10
        self.max_wait = 0.0
        self.failures = failures
        self.refuse = refuse
        self.records: list[Record] = []

    async def send_batch(self, records: Sequence[Record]) -> None:
        if self.refuse:
            raise PermanentSinkError("HTTP 400: unknown schema")
        if self.failures:
            self.failures -= 1
            raise RetryableSinkError("connection refused")
        self.records.extend(records)


def reading(i: int) -> Reading:
    return Reading(f"d{i % 3}", 1_700_000_000.0 + i, {"i": i})


async def until(ob: Outbox, cond: Any, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not cond():
            await ob.wait_for_commit()


async def run_until_delivered(ob: Outbox, sink: FlakySink, n: int) -> None:
    runner = SinkRunner(ob, sink, backoff_initial=0.001, backoff_max=0.005)
    task = asyncio.create_task(runner.run())
    try:
        await until(ob, lambda: ob.counters()["a"]["delivered"] >= n)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_commit_failing_again_and_again_logs_one_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeway")
    real = store_mod._Writer._apply_op
    failures = 0

    def failing(self: Any, op: Any, res: Any, want: bool) -> None:
        nonlocal failures
        if failures < 8:  # the first eight confirmations cannot commit
            failures += 1
            raise sqlite3.OperationalError("disk I/O error")
        real(self, op, res, want)

    monkeypatch.setattr(store_mod._Writer, "_apply_op", failing)
    ob = Outbox(tmp_path / "o.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    await ob.open()
    try:
        await ob.submit([reading(i) for i in range(30)])
        sink = FlakySink()
        await run_until_delivered(ob, sink, 30)
    finally:
        await ob.close()
    assert failures == 8
    assert {r.seq for r in sink.records} == set(range(1, 31))
    outbox = [r for r in caplog.records if r.name.startswith("edgeway.outbox")]
    assert sum(r.exc_info is not None for r in outbox) == 1, "one traceback, the first"
    commit_lines = [r for r in outbox if r.getMessage().startswith("outbox commit failed")]
    confirm_lines = [r for r in outbox if "could not record a confirmation" in r.getMessage()]
    assert len(commit_lines) == 1 and len(confirm_lines) == 1
    # One runner keeps one confirmation in flight: eight failed commits, one logged.
    again = [r.getMessage() for r in outbox if "commits succeed again" in r.getMessage()]
    assert again == ["outbox commits succeed again (7 failures not logged)"]


async def test_a_sink_failing_again_and_again_logs_once_then_the_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeway")
    ob = Outbox(tmp_path / "o.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    await ob.open()
    try:
        await ob.submit([reading(i) for i in range(5)])
        sink = FlakySink(failures=25)
        await run_until_delivered(ob, sink, 5)
    finally:
        await ob.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeway.outbox.runner"]
    failed = [m for m in lines if "sink a failed" in m]
    assert len(failed) == 1, failed
    assert any("delivering again" in m and "(25 failed attempts)" in m for m in lines), lines


async def test_a_cloud_refusing_every_batch_logs_once_not_per_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeway")
    ob = Outbox(tmp_path / "o.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    await ob.open()
    try:
        await ob.submit([reading(i) for i in range(200)])  # 20 batches of 10
        runner = SinkRunner(ob, FlakySink(refuse=True))
        task = asyncio.create_task(runner.run())
        try:
            await until(ob, lambda: ob.counters()["a"]["dropped_dead_letter"] >= 200)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await ob.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeway.outbox.runner"]
    refused = [m for m in lines if "for good, dead-lettered" in m]
    assert len(refused) == 1, refused


def test_rate_limited_log_counts_what_it_holds_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("t.rl"), 60.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="t.rl")
    err = ValueError("boom")
    assert limited.log(logging.ERROR, "k", "failed: %s", err, exc_info=err)
    for _ in range(5):
        now[0] += 1
        assert not limited.log(logging.ERROR, "k", "failed: %s", err, exc_info=err)
    assert limited.suppressed("k") == 5
    # Another key is independent.
    assert limited.log(logging.WARNING, "other", "other")
    now[0] += 60
    assert limited.log(logging.ERROR, "k", "failed: %s", err, exc_info=err)
    recs = [r for r in caplog.records if r.name == "t.rl"]
    assert [r.getMessage() for r in recs] == [
        "failed: boom",
        "other",
        "failed: boom (5 more like this in the last 65 s)",
    ]
    assert recs[0].exc_info is not None and recs[2].exc_info is None
    assert limited.reset("k") == 0 and not limited.active("k")
    assert limited.log(logging.ERROR, "k", "failed again", exc_info=err)
    assert caplog.records[-1].exc_info is not None  # a new episode: traceback again
