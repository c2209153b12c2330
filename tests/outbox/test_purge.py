"""`edgeway outbox purge SINK`: a removed sink's pending readings dropped on purpose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeway.config import OutboxSection
from edgeway.outbox import Outbox
from edgeway.outbox.purge import purge_sink
from edgeway.reading import Origin, Reading

SRC = str(Path(__file__).resolve().parents[2] / "src")


def readings(n: int) -> list[Reading]:
    return [Reading("d1", 1_700_000_000.0 + i, {"v": i}, Origin("test")) for i in range(n)]


async def opened(path: Path, sinks: list[str]) -> Outbox:
    ob = Outbox(path, gateway_id="gw", config=OutboxSection(durability="os"), sink_names=sinks)
    await ob.open()
    return ob


async def test_purge_drops_a_removed_sinks_pending_readings(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    ob = await opened(db, ["a", "b"])
    await ob.submit(readings(10))
    batch = await ob.read_batch("a", 100, 1 << 20)
    assert len(batch) == 10
    await ob.confirm(batch)
    assert ob.stored_bytes > 0  # b has not confirmed
    await ob.close()

    # b removed from the configuration: its readings stay, counted.
    ob = await opened(db, ["a"])
    assert ob.retired_counters()["b"]["pending"] == 10
    with pytest.raises(RuntimeError):
        purge_sink(db, "b")  # the gateway (this outbox) holds the lock
    await ob.close()

    with pytest.raises(ValueError):
        purge_sink(db, "a", {"a"})
    with pytest.raises(LookupError):
        purge_sink(db, "nope")
    r = purge_sink(db, "b", {"a"})
    assert (r.pending, r.chunks_deleted) == (10, 1) and r.bytes_freed > 0

    ob = await opened(db, ["a"])
    try:
        assert ob.retired_counters() == {}
        assert ob.stored_bytes == 0
        assert ob.counters()["a"]["delivered"] == 10
        # A sink added later under the same name starts afresh.
    finally:
        await ob.close()


async def test_purge_keeps_chunks_other_sinks_still_need(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    ob = await opened(db, ["a", "b"])
    await ob.submit(readings(5))
    await ob.close()
    r = purge_sink(db, "b", {"a"})
    assert r.pending == 5 and r.chunks_deleted == 0
    ob = await opened(db, ["a"])
    try:
        batch = await ob.read_batch("a", 100, 1 << 20)
        assert [rec.metrics["v"] for rec in batch.records] == [0, 1, 2, 3, 4]
    finally:
        await ob.close()


def test_cli_purge(tmp_path: Path) -> None:
    import asyncio

    db = tmp_path / "outbox.db"

    async def fill() -> None:
        ob = await opened(db, ["a", "gone"])
        await ob.submit(readings(3))
        await ob.close()

    asyncio.run(fill())
    cfg = tmp_path / "e.yaml"
    cfg.write_text(
        f'gateway: {{data_dir: "{tmp_path}"}}\nsinks: [{{name: a, url: "file://{tmp_path}/out"}}]\n'
    )
    run = [sys.executable, "-m", "edgeway", "outbox", "purge"]
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    r = subprocess.run([*run, "a", "--config", str(cfg)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "still configured" in r.stderr
    r = subprocess.run(
        [*run, "gone", "--config", str(cfg)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "3 pending record(s) dropped" in r.stdout
