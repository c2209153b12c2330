"""Pipeline state store: journal appends and releases with group commit.

Usage::

    .venv/bin/python bench/pipeline_state_bench.py [--rows 100000] [--burst 100]
        [--inflight 10] [--durability fsync|os]

What a windowed route does under load: every absorbed reading is appended to
the journal (``Journal.append``), a submit waits for the group commit holding
it (``commit_future``), and a closed window releases its entries. Here
``--inflight`` bursts of ``--burst`` appends are kept outstanding; every burst
whose commit resolved releases the previous burst's entries and is replaced
by a new one until ``--rows`` were appended. Reports rows/s, commits and
process CPU-seconds per 1,000 rows (loop + writer thread). Rates on a shared
machine are noisy; CPU-seconds per 1,000 rows are steadier.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, cast

from edgeway.pipeline.registry import Release
from edgeway.pipeline.state import StateStore
from edgeway.reading import Origin, Reading


async def run(rows: int, burst: int, inflight: int, durability: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp) / "pipeline.db", cast(Literal["fsync", "os"], durability))
        await store.open()
        journal = store.journal("w")
        origin = Origin("mqtt", "devices/d/telemetry")
        done = 0
        previous: list[int] = []

        async def one_burst(k: int) -> list[int]:
            ids = [
                journal.append(f"d{i % 10}", Reading(f"d{i % 10}", 1e9 + i, {"t": i}, origin))
                for i in range(k, k + burst)
            ]
            fut = store.commit_future()
            assert fut is not None
            await fut
            return ids

        t0, c0 = time.perf_counter(), time.process_time()
        pending: set[asyncio.Task[list[int]]] = set()
        started = 0
        while done < rows:
            while len(pending) < inflight and started < rows:
                pending.add(asyncio.create_task(one_burst(started)))
                started += burst
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                done += burst
                if previous:
                    store.release("w", [Release("d0", None, tuple(previous))])
                previous = task.result()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        commits = store.commits
        await store.close()
    return {
        "rows": done,
        "rows_per_s": round(done / wall),
        "cpu_s_per_1000": round(cpu / done * 1000, 4),
        "commits": commits,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--burst", type=int, default=100)
    p.add_argument("--inflight", type=int, default=10)
    p.add_argument("--durability", choices=["fsync", "os"], default="fsync")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.rows, args.burst, args.inflight, args.durability))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
