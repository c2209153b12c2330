"""Long backlogs: memory while the outbox fills, drain after an outage, restart.

Usage::

    .venv/bin/python bench/backlog.py [--outage 600] [--fill 5000000] [--json FILE]

Two runs of ``edgeway run`` (durability fsync, embedded MQTT broker, the HTTP
sink to the bundled cloud receiver), each on free loopback ports:

- **outage**: 100 simulated devices publish at 1,000 records/s (QoS 1) while the
  receiver refuses every request for ``--outage`` seconds; then it comes back
  while the devices go on. Reported: the backlog, the drain rate (records
  delivered from the first delivery after the outage until the backlog is
  gone, divided by that time; the sink's retry back-off before the first
  delivery is reported apart) and its ratio to the ingest rate, RSS before
  and after.
- **fill**: the W1 load (100 connections, QoS 1, as fast as they go) with the
  receiver down until ``--fill`` records are pending; RSS is sampled all along
  (the issue asks for it to stay within 20 MB from empty to 5 million).
  Then the gateway is killed with SIGKILL and started again: the time until
  it answers /healthz with the backlog pending, and the first delivery.

``--outage 0`` or ``--fill 0`` skips that run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from end_to_end import (
    Edgeway,
    HttpReceiver,
    LoopThread,
    _fleet_child,
    proc_rss_mb,
    w1_jobs,
)
from loadgen import LoadGen


def pending(gw: Edgeway) -> int:
    return int(gw.sink_counters().get("pending", 0))


def outage_run(work: Path, lt: LoopThread, seconds: float, say: Any) -> dict[str, Any]:
    recv = HttpReceiver(lt)
    gw = Edgeway(work, recv.url)
    warm = 8.0
    child = mp.get_context("spawn").Process(
        target=_fleet_child, args=(gw.port, 100, 10.0, warm + seconds + 600)
    )
    child.start()
    try:
        deadline = time.monotonic() + 60
        while recv.count() < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(warm)
        rss0 = proc_rss_mb(gw.pid)
        a0 = gw.sink_counters().get("accepted", 0)
        recv.down()
        t_down = time.monotonic()
        next_say = t_down + 60
        while time.monotonic() - t_down < seconds:
            time.sleep(0.5)
            if time.monotonic() >= next_say:
                say(f"  outage: {time.monotonic() - t_down:.0f} s, {pending(gw):,} pending")
                next_say += 60
        a1 = gw.sink_counters().get("accepted", 0)
        ingest_rate = (a1 - a0) / (time.monotonic() - t_down)
        backlog = pending(gw)
        base = recv.count()
        recv.up()
        t_up = time.monotonic()
        while recv.count() == base and time.monotonic() - t_up < 120:
            time.sleep(0.005)
        t_first = time.monotonic()
        c_first = gw.sink_counters().get("delivered", 0)
        while pending(gw) > 2000 and time.monotonic() - t_first < 1200:
            time.sleep(0.05)
        t_done = time.monotonic()
        c_done = gw.sink_counters().get("delivered", 0)
        rss1 = proc_rss_mb(gw.pid)
    finally:
        child.terminate()
        child.join(10)
        gw.close()
        recv.close()
    drain = (c_done - c_first) / (t_done - t_first)
    return {
        "outage_s": seconds,
        "ingest_per_s": round(ingest_rate, 1),
        "backlog": backlog,
        "first_delivery_after_s": round(t_first - t_up, 2),
        "drain_s": round(t_done - t_first, 2),
        "drain_per_s": round(drain),
        "drain_vs_ingest": round(drain / ingest_rate, 1),
        "rss_before_mb": round(rss0, 1),
        "rss_after_mb": round(rss1, 1),
    }


def fill_run(work: Path, lt: LoopThread, target: int, say: Any) -> dict[str, Any]:
    recv = HttpReceiver(lt)
    gw = Edgeway(work, recv.url)
    recv.down()
    samples: list[tuple[int, float]] = [(0, proc_rss_mb(gw.pid))]
    gen = LoadGen(w1_jobs(gw.port, 2))
    t0 = time.monotonic()
    try:
        gen.start(timeout=60)
        gen.go()
        next_say = 1_000_000
        while True:
            time.sleep(0.5)
            n = pending(gw)
            samples.append((n, proc_rss_mb(gw.pid)))
            if n >= next_say:
                say(f"  fill: {n:,} pending, RSS {samples[-1][1]:.1f} MB")
                next_say += 1_000_000
            if n >= target or time.monotonic() - t0 > 1800:
                break
            gen.check()
    finally:
        gen.stop()
    fill_s = time.monotonic() - t0
    n = pending(gw)
    data_dir = gw.data_dir
    db_mb = sum(f.stat().st_size for f in data_dir.glob("outbox.db*")) / 1e6
    # A crash with the backlog pending, then a start on the same data.
    os.kill(gw.pid, signal.SIGKILL)
    gw.proc.wait()
    t1 = time.monotonic()
    gw2 = Edgeway(work, recv.url, data_dir)
    restart_s = time.monotonic() - t1
    try:
        after = pending(gw2)
        recv.up()
        base = recv.count()
        t2 = time.monotonic()
        while recv.count() == base and time.monotonic() - t2 < 60:
            time.sleep(0.005)
        first_s = time.monotonic() - t2
        c0, t3 = recv.count(), time.monotonic()
        time.sleep(10)
        drain = (recv.count() - c0) / (time.monotonic() - t3)
        rss_restart = proc_rss_mb(gw2.pid)
    finally:
        gw2.close()
        recv.close()
    rss = [r for _, r in samples]
    return {
        "pending": n,
        "fill_s": round(fill_s, 1),
        "db_mb": round(db_mb),
        "rss_empty_mb": round(samples[0][1], 1),
        "rss_min_mb": round(min(rss), 1),
        "rss_max_mb": round(max(rss), 1),
        "rss_spread_mb": round(max(rss) - min(rss), 1),
        "rss_by_million": {
            f"{m}M": round(next((r for k, r in samples if k >= m * 1_000_000), rss[-1]), 1)
            for m in range(0, n // 1_000_000 + 1)
        },
        "restart_after_sigkill_s": round(restart_s, 2),
        "pending_after_restart": after,
        "first_delivery_s": round(first_s, 2),
        "drain_per_s_first_10s": round(drain),
        "rss_after_restart_mb": round(rss_restart, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage", type=float, default=600.0, help="seconds the sink is down")
    ap.add_argument("--fill", type=int, default=5_000_000, help="records pending to reach")
    ap.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    out: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    lt = LoopThread()
    with tempfile.TemporaryDirectory(prefix="edgeway-backlog-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        if args.fill:
            out["fill"] = fill_run(work, lt, args.fill, print)
            print("fill:", json.dumps(out["fill"]))
        if args.outage:
            out["outage"] = outage_run(work, lt, args.outage, print)
            print("outage:", json.dumps(out["outage"]))
    lt.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
