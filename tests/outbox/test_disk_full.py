"""A full disk, for real: the outbox on a 20 MiB tmpfs, a real HTTP cloud.

Fill the disk with readings while the cloud is down: ingest is refused (not an
error), a restart works, and once the cloud is back every accepted reading
drains exactly once, the space comes back, and ingest resumes; the log holds a
few lines, not a traceback per failed commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from edgeway.config import OutboxSection, SinkConfig
from edgeway.ingest import IngestStatus
from edgeway.outbox import Outbox, SinkRunner
from edgeway.reading import Reading
from edgeway.sinks.base import create_sink

TMPFS_SIZE = "20m"
RESERVE = 2 * 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs (needs root; skipped otherwise), always unmounted."""
    d = tmp_path / "tmpfs"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(d)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


class Cloud:
    """An aiohttp ingest endpoint that answers 503 until ``up`` is set."""

    def __init__(self) -> None:
        self.up = False
        self.ids: list[str] = []
        self.arrived = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if not self.up:
            return web.Response(status=503, text="down")
        self.ids.extend(r["id"] for r in body["records"])
        self.arrived.set()
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/ingest", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def cloud() -> AsyncIterator[Cloud]:
    c = Cloud()
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def reading(i: int) -> Reading:
    # ~450 stored bytes: the disk fills after a few tens of thousands.
    return Reading(f"dev{i % 7}", 1_700_000_000.0 + i, {"i": i, "pad": "x" * 400})


async def until(ob: Outbox, cond: object, within: float) -> None:
    async with asyncio.timeout(within):
        while not cond():  # type: ignore[operator]
            await ob.wait_for_commit()


async def test_full_disk_refuses_then_drains_and_resumes_losing_nothing(
    tmpfs: Path, cloud: Cloud, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgeway")
    cfg = OutboxSection(disk_reserve=RESERVE)
    path = tmpfs / "outbox.db"

    def new_outbox() -> Outbox:
        return Outbox(path, gateway_id="gw", config=cfg, sink_names=["cloud"])

    ob = new_outbox()
    await ob.open()
    assert (tmpfs / "outbox.db.reserve").stat().st_size == RESERVE
    accepted: list[int] = []  # first sequence of each accepted submit, and its size
    refused = 0
    i = 0
    for _ in range(200):  # bounded: 20 MiB holds far less than 200 x 500 readings
        batch = [reading(i + k) for k in range(500)]
        status = await ob.submit(batch)  # refused, never an exception
        if status is IngestStatus.REJECTED_FULL:
            refused += len(batch)
            break
        assert status is IngestStatus.ACCEPTED
        accepted.extend(range(i, i + len(batch)))
        i += len(batch)
    assert refused, "the disk never filled up"
    assert len(accepted) > 10_000
    assert ob.is_saturated() and ob.disk_full
    # Refused again while full, without touching the disk, and counted.
    assert await ob.submit([reading(10**6)]) is IngestStatus.REJECTED_FULL
    refused += 1
    c = ob.counters()["cloud"]
    assert c["accepted"] == len(accepted) and c["rejected_full"] == refused
    assert c["pending"] == len(accepted) and c["dropped"] == 0

    # A restart on the full disk works and keeps refusing.
    await ob.close()
    ob = new_outbox()
    await ob.open()
    assert ob.disk_full and ob.counters()["cloud"]["pending"] == len(accepted)

    sink = create_sink(SinkConfig(name="cloud", url=f"http://127.0.0.1:{cloud.port}/ingest"), "gw")
    await sink.start()
    runner = SinkRunner(ob, sink, backoff_initial=0.05, backoff_max=0.2)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.sleep(0.3)  # the cloud is still down: a few refused attempts
        assert not cloud.ids
        cloud.up = True
        await until(ob, lambda: ob.counters()["cloud"]["pending"] == 0, within=60)
        c = ob.counters()["cloud"]
        assert c["delivered"] == len(accepted) and c["dropped"] == 0
        expected = {f"gw:{seq}" for seq in range(1, len(accepted) + 1)}
        assert set(cloud.ids) == expected
        assert len(cloud.ids) == len(expected), "confirmations committed: nothing sent twice"

        # The drained space goes back to the filesystem; ingest resumes.
        await until(ob, lambda: not ob.is_saturated(), within=20)
        assert (tmpfs / "outbox.db.reserve").stat().st_size == RESERVE
        more = [reading(2 * 10**6 + k) for k in range(1000)]
        assert await ob.submit(more) is IngestStatus.ACCEPTED
        await until(ob, lambda: ob.counters()["cloud"]["delivered"] == len(accepted) + 1000, 20)
        assert len(cloud.ids) == len(set(cloud.ids)) == len(accepted) + 1000
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        await ob.close()
    outbox_lines = [r for r in caplog.records if r.name.startswith("edgeway.outbox")]
    assert sum(r.exc_info is not None for r in outbox_lines) <= 1
    assert len([r for r in outbox_lines if r.levelno >= logging.WARNING]) < 20


@pytest.mark.parametrize("fallocate", ["native", "unsupported", "absent"])
def test_the_reserve_is_allocated_not_sparse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallocate: str
) -> None:
    import errno

    from edgeway.outbox.reserve import DiskReserve

    if fallocate == "unsupported":

        def refuse(fd: int, offset: int, size: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "not supported")

        monkeypatch.setattr(os, "posix_fallocate", refuse)
    elif fallocate == "absent":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    reserve = DiskReserve(tmp_path / "outbox.db.reserve", 3 * 1024 * 1024 + 5)
    assert not reserve.held
    assert reserve.restore()
    st = reserve.path.stat()
    assert st.st_size == reserve.size and st.st_blocks * 512 >= reserve.size
    assert reserve.held and reserve.release() and not reserve.path.exists()
    assert not reserve.release()  # nothing left to free
