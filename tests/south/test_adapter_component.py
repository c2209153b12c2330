"""A south adapter as a component on its own: start() runs it in a task the
adapter owns, health() follows its listener, stats() are typed, stop() ends
it within the grace period (a real HTTP client checks the port both ways)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from ingest_doubles import RecordingIngest, wait_until

from edgeway.config import HttpIngestSection
from edgeway.runtime.component import Component, metric_samples
from edgeway.south.base import AdapterStats, SouthAdapter
from edgeway.south.http import HttpIngestAdapter


async def test_start_health_stats_and_stop(tmp_path: Path) -> None:
    ingest = RecordingIngest()
    adapter = HttpIngestAdapter(
        HttpIngestSection(listen="127.0.0.1:0", allow_anonymous=True),
        ingest=ingest,
        gateway_id="gw",
        data_dir=tmp_path,
    )
    assert isinstance(adapter, Component)
    await adapter.start()
    async with asyncio.timeout(10):
        await adapter.ready.wait()
    url = f"http://127.0.0.1:{adapter.port}/devices/d1/telemetry"
    async with httpx.AsyncClient() as client:
        r = await client.post(url, json={"t": 1.5})
        assert r.status_code in (200, 202), r.text
        assert adapter.health().ok
        stats = adapter.stats()
        assert isinstance(stats, AdapterStats) and stats.readings == 1
        samples = {s.spec.name: s.value for s in metric_samples(stats)}
        assert samples["adapter_readings"] == 1.0 and samples["adapter_connected"] == 1.0
        await adapter.stop(2.0)
        try:
            await client.post(url, json={"t": 2.5}, timeout=2)
        except httpx.ConnectError:
            pass  # stopped: nothing listens any more
        else:
            raise AssertionError("the adapter still answers after stop()")


class _FailsAtOnce(SouthAdapter):
    section = "test_fails"

    async def run(self) -> None:
        raise OSError("no such device")


async def test_a_failure_before_ready_is_recorded_not_raised_when_started_alone(
    tmp_path: Path,
) -> None:
    adapter = _FailsAtOnce(None, ingest=RecordingIngest(), gateway_id="gw", data_dir=tmp_path)
    await adapter.start()
    await wait_until(lambda: adapter.state.errors > 0, within=5)
    assert adapter.state.last_error == "OSError: no such device"
    assert not adapter.ready.is_set()
    await adapter.stop(1.0)
