"""Device registry benchmark: 100,000 devices, listing with filters and
paging, status flushes, memory.

Usage::

    .venv/bin/python bench/registry.py [--devices 100000] [--online 0.3] [--runs 30]

- import: ``--devices`` devices (types, 3 tags, 1 of 20 groups each) through
  ``DeviceRegistry.add_many`` (the CSV import's path: validation in a thread,
  one transaction). Reports devices/s.
- lookups: 10,000 of them looked up at once with a cold cache, as a
  reconnect storm's CONNECTs do (``DeviceRegistry.flags``).
- status: ``--online`` of them marked online through ``record_status``
  batches of 10,000 (what a presence flush writes). Reports updates/s.
- listing: a gateway on embedded defaults in this process, its admin API on
  loopback; ``GET /api/devices?status=offline&limit=100`` (first page, a
  page deep in the list via ``after``, with a group and a tag filter), timed
  from the request to the parsed answer, ``--runs`` each: p50/p99 ms. Then
  ``edgeway devices list --status offline`` as a subprocess, wall time
  (Python start-up and imports included). The goal (issue 15) is < 200 ms.
- hot path: what the registry adds to each reading a device submits
  (``DeviceIngest`` in front of an in-memory ingest, batches of 64 readings
  from 1,000 devices, as the broker submits them), ns per reading.
- memory: the gateway process's RSS before and after paging through every
  offline device 1,000 at a time (nothing keeps records: it should not grow
  with the registry).

Figures are printed, never asserted; compare runs of the same sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from edgeway.config import parse_config
from edgeway.devices.registry import DeviceRegistry, StatusUpdate
from edgeway.gateway import Gateway

SRC = str(Path(__file__).resolve().parents[1] / "src")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def populate(data_dir: Path, n: int) -> dict[str, float]:
    reg = DeviceRegistry(data_dir / "devices.db", durability="fsync")
    await reg.open()
    rows: list[tuple[int, dict[str, Any]]] = [
        (
            i + 2,
            {
                "id": f"dev-{i:06d}",
                "type": ("meter", "valve", "pump", "sensor")[i % 4],
                "tags": [f"site=s{i % 7}", f"floor={i % 5}", "fleet"],
                "groups": [f"g{i % 20}"],
            },
        )
        for i in range(n)
    ]
    t0 = time.perf_counter()
    report = await reg.add_many(rows)
    t_import = time.perf_counter() - t0
    assert len(report.created) == n, report.refused[:3]
    await reg.close()
    # A connect storm's lookups (the registry's check at each CONNECT), cold.
    reg = DeviceRegistry(data_dir / "devices.db", durability="fsync")
    await reg.open()
    ids = [f"dev-{i:06d}" for i in range(min(n, 10_000))]
    t0 = time.perf_counter()
    found = await asyncio.gather(*(reg.flags(d) for d in ids))
    t_lookups = time.perf_counter() - t0
    assert all(found)
    await reg.close()
    return {"import_s": t_import, "import_per_s": n / t_import, "lookups_s": t_lookups}


async def mark_online(reg: DeviceRegistry, n: int, online: float) -> None:
    """What presence flushes write when devices connect: batches of 10,000
    (after the gateway started: a start marks everybody offline)."""
    now = time.time()
    ids = [f"dev-{i:06d}" for i in range(n) if (i * 7919) % 1000 < online * 1000]
    t0 = time.perf_counter()
    for k in range(0, len(ids), 10_000):
        await reg.record_status(
            [
                StatusUpdate(d, last_seen=now, online=True, connected=True, protocols={"mqtt"})
                for d in ids[k : k + 10_000]
            ]
        )
    dt = time.perf_counter() - t0
    print(
        f"status: {len(ids)} devices marked online in batches of 10,000: "
        f"{len(ids) / dt:.0f} updates/s ({dt * 1000 / max(1, len(ids) // 10_000):.0f} ms a batch)"
    )


async def timed_get(client: httpx.AsyncClient, url: str, runs: int) -> tuple[float, float, Any]:
    times = []
    doc: Any = None
    for _ in range(runs):
        t0 = time.perf_counter()
        r = await client.get(url)
        doc = r.json()
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.99) - 1)], doc


async def listing(data_dir: Path, runs: int, n: int, online: float) -> None:
    cfg = parse_config(
        f"""
gateway: {{id: bench-registry, data_dir: "{data_dir}"}}
mqtt: {{listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]}}
admin: {{listen: "127.0.0.1:0"}}
""",
        "bench.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 30)
    assert gw.admin is not None and gw.admin.bound is not None
    base = f"http://127.0.0.1:{gw.admin.bound[1]}"
    try:
        assert gw.devices is not None
        await mark_online(gw.devices.registry, n, online)
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            rss0 = rss_mb()
            p50, p99, doc = await timed_get(client, "/api/devices?status=offline&limit=100", runs)
            total = doc["total"]
            print(
                f"list --status offline (first page of 100, {total} match): "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
            )
            deep = "dev-080000"
            p50, p99, _ = await timed_get(
                client, f"/api/devices?status=offline&limit=100&after={deep}", runs
            )
            print(f"list --status offline --after {deep}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            p50, p99, doc = await timed_get(
                client, "/api/devices?status=offline&group=g7&limit=100", runs
            )
            print(
                f"list --status offline --group g7 ({doc['total']} match): "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
            )
            p50, p99, doc = await timed_get(
                client, "/api/devices?tag=site%3Ds3&type=pump&limit=100", runs
            )
            print(
                f"list --tag site=s3 --type pump ({doc['total']} match): "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
            )
            p50, p99, doc = await timed_get(client, "/api/devices?status=online&limit=1000", runs)
            print(f"list --status online --limit 1000: p50 {p50:.1f} ms, p99 {p99:.1f} ms")

            # Every offline device, page by page: memory must not follow.
            t0 = time.perf_counter()
            after = None
            seen = 0
            while True:
                url = "/api/devices?status=offline&limit=1000" + (
                    f"&after={after}" if after else ""
                )
                doc = (await client.get(url)).json()
                seen += len(doc["devices"])
                after = doc["next_after"]
                if after is None:
                    break
            walk = time.perf_counter() - t0
            print(
                f"paged through {seen} offline devices in {walk:.2f} s; "
                f"gateway RSS {rss0:.0f} MB before, {rss_mb():.0f} MB after"
            )

            # The CLI, as a technician runs it (process start-up included).
            env = {**os.environ, "PYTHONPATH": SRC}
            cli_times = []
            for _ in range(5):
                t0 = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "edgeway",
                    "devices",
                    "list",
                    "--status",
                    "offline",
                    "--admin",
                    base,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                )
                await proc.wait()
                cli_times.append((time.perf_counter() - t0) * 1000)
                assert proc.returncode == 0
            python_start = []
            version = []
            for _ in range(5):
                t0 = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
                await proc.wait()
                python_start.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "edgeway",
                    "version",
                    stdout=subprocess.DEVNULL,
                    env=env,
                )
                await proc.wait()
                version.append((time.perf_counter() - t0) * 1000)
            print(
                f"edgeway devices list --status offline (CLI process, 5 runs): "
                f"median {statistics.median(cli_times):.0f} ms "
                f"('edgeway version', the CLI's own start-up: {statistics.median(version):.0f} ms; "
                f"bare 'python -c pass': {statistics.median(python_start):.0f} ms)"
            )
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 30)


async def hot_path(data_dir: Path) -> None:
    from edgeway.devices.presence import DeviceIngest, DevicePresence
    from edgeway.ingest import MemoryIngest
    from edgeway.reading import Origin, Reading

    reg = DeviceRegistry(data_dir / "hot.db", durability="os")
    await reg.open()
    presence = DevicePresence(reg)
    origin = Origin("mqtt", "devices/x/telemetry")
    batches = [
        [Reading(f"dev-{(i * 64 + j) % 1000}", 1.0, {"t": 1.0}, origin) for j in range(64)]
        for i in range(2000)
    ]
    plain, gated = MemoryIngest(), MemoryIngest()
    wrapped = DeviceIngest(gated, presence, reg)
    for name, ingest, sink in (("plain", plain, plain), ("with the registry", wrapped, gated)):
        best = float("inf")
        for _ in range(5):
            sink.readings.clear()
            t0 = time.perf_counter()
            for b in batches:
                ingest.submit(b)
            best = min(best, time.perf_counter() - t0)
        print(f"ingest submit, {name}: {best / (2000 * 64) * 1e9:.0f} ns per reading")
    await presence.flush()
    await reg.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--online", type=float, default=0.3)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        await hot_path(data_dir)
        fig = await populate(data_dir, args.devices)
        size = (data_dir / "devices.db").stat().st_size / 1e6
        print(
            f"import {args.devices} devices: {fig['import_s']:.1f} s "
            f"({fig['import_per_s']:.0f}/s); devices.db {size:.0f} MB"
        )
        print(f"10,000 CONNECT-time lookups at once (cold cache): {fig['lookups_s']:.2f} s")
        await listing(data_dir, args.runs, args.devices, args.online)


if __name__ == "__main__":
    asyncio.run(main())
