"""HTTP ingest throughput: requests/s that end in a 200 (readings safe in the ingest).

Run: .venv/bin/python bench/ingest_http.py [--requests 20000] [--concurrency 32]
         [--ingest memory|outbox|both] [--out bench/results/ingest_http.json]

The gateway side (``HttpIngestAdapter`` on a free loopback port, anonymous, one
~100-byte JSON reading per request) runs in this process; the load generator
(aiohttp client, ``--concurrency`` keep-alive connections, each POSTing one
request at a time) runs in a child process so the two do not share a core.
With ``outbox`` the ingest is the real :class:`edgeway.outbox.Outbox`
(SQLite WAL, group commit, ``durability: fsync``) in a temporary directory:
every 200 means the reading is on disk. Reported: requests/s, server
CPU-seconds per 1,000 requests (this process, every thread, including the
outbox writer), and latency p50/p99 seen by the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAYLOAD = b'{"ts":1732262400123,"temperature":21.37,"humidity":48.2,"battery":3.71,"ok":true}'


def _client(port: int, requests: int, concurrency: int, out: Any) -> None:
    """Child process: fire ``requests`` POSTs over ``concurrency`` connections."""

    async def main() -> dict[str, Any]:
        import aiohttp

        latencies: list[float] = []
        errors = 0
        per_worker = requests // concurrency
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker(w: int) -> None:
                nonlocal errors
                url = f"http://127.0.0.1:{port}/devices/bench-{w}/telemetry"
                headers = {"Content-Type": "application/json"}
                for _ in range(per_worker):
                    t0 = time.perf_counter()
                    async with session.post(url, data=PAYLOAD, headers=headers) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                    latencies.append(time.perf_counter() - t0)

            # warm-up: open the connections
            await asyncio.gather(
                *(session.get(f"http://127.0.0.1:{port}/healthz") for _ in range(concurrency))
            )
            start = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            elapsed = time.perf_counter() - start
        latencies.sort()
        n = len(latencies)
        return {
            "requests": n,
            "errors": errors,
            "elapsed_s": elapsed,
            "p50_ms": latencies[n // 2] * 1000,
            "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
        }

    out.put(asyncio.run(main()))


async def _run(kind: str, requests: int, concurrency: int) -> dict[str, Any]:
    from edgeway.config import HttpIngestSection, OutboxSection
    from edgeway.ingest import Ingest, MemoryIngest
    from edgeway.south.http import HttpIngestAdapter

    tmp = tempfile.TemporaryDirectory(prefix="edgeway-bench-")
    ingest: Ingest
    outbox: Any = None
    if kind == "outbox":
        from edgeway.outbox import Outbox

        outbox = Outbox(
            Path(tmp.name) / "outbox.db",
            gateway_id="bench",
            config=OutboxSection(durability="fsync"),
            sink_names=["bench"],
        )
        await outbox.open()
        ingest = outbox
    else:
        ingest = MemoryIngest()
    adapter = HttpIngestAdapter(
        HttpIngestSection(listen="127.0.0.1:0", allow_anonymous=True, max_body_size=4096),
        ingest=ingest,
        gateway_id="bench",
        data_dir=Path(tmp.name),
    )
    task = asyncio.create_task(adapter.run())
    try:
        await asyncio.wait_for(adapter.ready.wait(), 10)
        assert adapter.port is not None
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_client, args=(adapter.port, requests, concurrency, queue))
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        proc.start()
        result: dict[str, Any] = await asyncio.to_thread(queue.get, True, 600)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.to_thread(proc.join, 30)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        result.update(
            ingest=kind,
            concurrency=concurrency,
            requests_per_s=result["requests"] / result["elapsed_s"],
            server_cpu_s_per_1000=cpu / result["requests"] * 1000,
            stored=(adapter.state.readings),
        )
        return result
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if outbox is not None:
            await outbox.close()
        tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--ingest", choices=["memory", "outbox", "both"], default="both")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ingest_http.json"))
    args = ap.parse_args()
    kinds = ["memory", "outbox"] if args.ingest == "both" else [args.ingest]
    results = []
    for kind in kinds:
        r = asyncio.run(_run(kind, args.requests, args.concurrency))
        results.append(r)
        print(
            f"{kind:7s} {r['requests_per_s']:8.0f} req/s  {r['server_cpu_s_per_1000']:.3f} CPU-s/1000  "
            f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}"
        )
    report = {
        "benchmark": "ingest_http",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": mp.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
