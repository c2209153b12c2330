"""Micro-benchmark: CPU per reading of ``RecentValues.record`` (the HMI's tap on
every submit) for the end-to-end benchmark's payload, 100 devices. Not a test.

Two shapes of reads: 15 readings of one device each (W1's 100 connections
with 16 messages in flight delivered 16 a read when counted inside `edgeway
run`, bench/results/w1-cpu-2026-12-07b.md), and 1 to 4 (a py-spy profile
had suggested that shape; the counts did not confirm it). Each is measured stored as it is taken (no event loop: each batch
at once, as before batches were kept, though with today's RUN_MIN; the
code before, 9829871, is in bench/results/w1-cpu-2026-12-07.md) and kept
on a running loop and stored by device every 2,500 readings (50 ms of W1 at 50,000 readings/s:
:data:`edgeway.admin.recent.FLUSH_EVERY`). Usage::

    .venv/bin/python bench/recent_micro.py
"""

from __future__ import annotations

import asyncio
import random
import time

import orjson

from edgeway.admin.recent import RecentValues
from edgeway.reading import Origin, Reading

PAYLOAD = b'{"temp": 21.5, "hum": 40.2, "on": true, "battery": 3.71, "rssi": -67}'
PER_FLUSH = 2500


def reads(sizes: list[int], count: int) -> list[list[Reading]]:
    origin = Origin("mqtt")
    rnd = random.Random(1)
    t = time.time()
    out = []
    for _ in range(count):
        dev = f"bench-{rnd.randrange(100)}"
        k = rnd.choice(sizes)
        out.append([Reading(dev, t + i * 1e-5, orjson.loads(PAYLOAD), origin) for i in range(k)])
        t += 1e-4
    return out


def at_once(batches: list[list[Reading]]) -> float:
    store = RecentValues()
    for batch in batches[:200]:
        store.record(batch)
    t0 = time.process_time()
    for batch in batches:
        store.record(batch)
    return time.process_time() - t0


async def kept(batches: list[list[Reading]]) -> float:
    store = RecentValues()
    for batch in batches[:200]:
        store.record(batch)
    store.flush()
    t0 = time.process_time()
    n = 0
    for batch in batches:
        store.record(batch)
        n += len(batch)
        if n >= PER_FLUSH:
            store.flush()
            n = 0
    store.flush()
    return time.process_time() - t0


def main() -> None:
    for name, sizes, count in (
        ("reads of 15", [15], 2000),
        ("reads of 1-4", [1, 1, 2, 3, 4], 15000),
    ):
        batches = reads(sizes, count)
        n = sum(map(len, batches))
        now = min(at_once(batches) for _ in range(5))
        later = min(asyncio.run(kept(batches)) for _ in range(5))
        print(
            f"{name}: stored as taken {now / n * 1e6:.2f} us CPU per reading, "
            f"kept and stored by device {later / n * 1e6:.2f} us"
        )


if __name__ == "__main__":
    main()
