"""Alarm stress: many random event sequences, 16 concurrent producers each.

Usage::

    .venv/bin/python bench/alarms_stress.py [--sequences 100000] [--producers 16]
        [--events 4] [--concurrent 256] [--durability os] [--out FILE.json]

Each sequence is one (source, type) alarm driven by ``--producers`` tasks at
once, each sending ``--events`` random events (raise, clear, ack, confirm,
reset, shelve timed and one-shot, unshelve, suppress, out of service, ...;
see edgeway.sim.alarm_stress). ``--concurrent`` sequences run at a time.
Afterwards the journal is checked (edgeway.alarms.check): no duplicate
active alarm, no illegal transition, the current table equal to the last
transition of every key. Prints events/s, transitions/s, the refusals (an
illegal transition refused is expected when producers race), the checker's
verdict, and the CPU-seconds per 1,000 events. Exit 1 if the checker found a
problem. The CI-sized run is tests/alarms/test_alarm_service.py.

Then ``--latency`` raises one after another with ``durability: fsync`` (the
time until each is on disk, p50/p99) and as many shelvings of 0.5 s ending
together (how late each ends after its deadline: the goal is under 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeway.alarms.check import check_journal
from edgeway.alarms.service import AlarmService
from edgeway.config import AlarmsSection
from edgeway.sim.alarm_stress import run_sequences


async def run(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    cfg = AlarmsSection(max_alarms=1_000_000, max_history=100_000_000)
    svc = AlarmService(data, cfg, durability=args.durability)
    await svc.open()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = await run_sequences(
            svc,
            args.sequences,
            producers=args.producers,
            events=args.events,
            concurrent=args.concurrent,
            seed=args.seed,
        )
    finally:
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        commits = svc.db.commits
        transitions = svc.stats.transitions
        await svc.close()
    conn = sqlite3.connect(data / "alarms.db")
    t1 = time.perf_counter()
    report = check_journal(conn)
    check_s = time.perf_counter() - t1
    conn.close()
    return {
        "sequences": args.sequences,
        "producers": args.producers,
        "events_per_producer": args.events,
        "durability": args.durability,
        "events": result.events,
        "refused": dict(result.refused),
        "transitions": transitions,
        "commits": commits,
        "seconds": round(elapsed, 2),
        "events_per_s": round(result.events / elapsed),
        "transitions_per_s": round(transitions / elapsed),
        "cpu_s_per_1000_events": round(cpu / result.events * 1000, 4),
        "journal": {
            "keys": report.keys,
            "transitions": report.transitions,
            "occurrences": report.occurrences,
            "problems": report.problems,
            "check_seconds": round(check_s, 2),
        },
    }


async def latency(data: Path, n: int) -> dict[str, Any]:
    """``n`` raises one after another (fsync), then ``n`` shelvings of 0.5 s
    ending together: how long a raise takes to be on disk, how late a
    shelving ends after its deadline."""
    svc = AlarmService(data, AlarmsSection(max_alarms=1_000_000), durability="fsync")
    await svc.open()
    ends: dict[str, float] = {}
    try:
        took = []
        for i in range(n):
            t0 = time.perf_counter()
            await svc.raise_alarm(f"lat-{i}", "probe", severity=500, message="", by="bench")
            took.append(time.perf_counter() - t0)
        shelved = await asyncio.gather(
            *(svc.shelve(f"sh-{i}", "probe", by="bench", duration=0.5) for i in range(n))
        )
        done = asyncio.Event()

        def on(t: Any) -> None:
            if t.action.value == "unshelve":
                ends[t.alarm.source] = time.time()
                if len(ends) == n:
                    done.set()

        svc.add_listener(on)
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await svc.close()
    late = sorted(ends[a.source] - a.shelving.until for a in shelved if a.shelving)
    took.sort()
    return {
        "raises": n,
        "raise_ms_p50": round(took[n // 2] * 1000, 2),
        "raise_ms_p99": round(took[int(n * 0.99)] * 1000, 2),
        "shelvings": n,
        "shelving_end_late_ms_p50": round(late[n // 2] * 1000, 1),
        "shelving_end_late_ms_max": round(late[-1] * 1000, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=100_000)
    p.add_argument("--producers", type=int, default=16)
    p.add_argument("--events", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=256)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--durability", choices=("os", "fsync"), default="os")
    p.add_argument("--latency", type=int, default=1000, help="raises/shelvings timed (0: none)")
    p.add_argument("--dir", type=Path, help="where the journals go (default: a temporary one)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="alarms-stress-", dir=args.dir) as tmp:
        figures = asyncio.run(run(args, Path(tmp) / "stress"))
        if args.latency:
            figures["latency"] = asyncio.run(latency(Path(tmp) / "latency", args.latency))
    figures["date"] = dt.date.today().isoformat()
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["journal"]["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
