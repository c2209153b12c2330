"""Command path benchmark: enqueue rate with fsync, and the round trip to a
real MQTT device at a steady rate.

Usage::

    .venv/bin/python bench/commands.py [--enqueue 20000] [--concurrency 500]
        [--rate 100] [--seconds 20] [--out bench/results/commands-DATE.json]

- enqueue: ``--enqueue`` commands for 100 devices (nobody connected, so they
  stay queued) submitted by ``--concurrency`` concurrent callers; each
  ``submit`` returns once its command is committed (``durability: fsync``).
  Reports commands/s, commits (group commit: commands per commit) and the
  process CPU-seconds per 1,000 commands.
- round trip: a gateway on embedded defaults in this process; a paho-mqtt
  device in a separate process subscribes to its command topic and answers
  each command on the result topic (MQTT 5, correlation data). Commands are
  submitted at ``--rate`` per second for ``--seconds``; the latency is from
  the submit call to the command's SUCCEEDED state being committed (queued on
  disk, SENT on disk, PUBLISH, PUBACK, result, SUCCEEDED on disk). Reports
  p50/p99/max in ms. The goal (issue 14) is p99 <= 10 ms at 100 commands/s.

Figures are printed, never asserted; the machine's speed varies several-fold,
so compare runs of the same sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from edgeway.commands.model import CommandState
from edgeway.commands.service import CommandService
from edgeway.config import CommandsSection, parse_config
from edgeway.gateway import Gateway

DEVICE = textwrap.dedent(
    """
    import sys, orjson
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    port, device = int(sys.argv[1]), sys.argv[2]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, *a: cl.subscribe(f"devices/{device}/commands/+", qos=1)
    c.on_subscribe = lambda *a: print("ready", flush=True)

    def on_message(cl, _u, msg):
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData
        cl.publish(msg.properties.ResponseTopic, b'{"status":"ok"}', qos=1, properties=props)

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_forever()
    """
)


def cpu() -> float:
    t = os.times()
    return t.user + t.system


async def bench_enqueue(n: int, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        svc = CommandService(Path(d), CommandsSection(max_per_device=1_000_000))
        await svc.open()
        counter = iter(range(n))

        async def caller() -> None:
            for i in counter:
                await svc.submit(f"dev-{i % 100}", "set", {"value": i})

        c0, t0 = cpu(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall, used = time.perf_counter() - t0, cpu() - c0
        commits = svc.db.commits
        await svc.close()
    return {
        "commands": n,
        "concurrency": concurrency,
        "commands_per_s": round(n / wall),
        "commits": commits,
        "commands_per_commit": round(n / max(commits, 1), 1),
        "cpu_s_per_1k": round(used / n * 1000, 4),
    }


async def bench_round_trip(rate: float, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        cfg = parse_config(
            f"""
gateway: {{id: bench, data_dir: "{d}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
""",
            "bench.yaml",
        )
        gw = Gateway(cfg)
        task = asyncio.create_task(gw.run())
        await asyncio.wait_for(gw.ready.wait(), 20)
        port = gw.listeners[0].bound[1]
        dev = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DEVICE, str(port), "bench-dev", stdout=subprocess.PIPE
        )
        try:
            assert dev.stdout is not None
            line = await asyncio.wait_for(dev.stdout.readline(), 20)
            assert line.strip() == b"ready", line
            svc = gw.commands
            assert svc is not None
            await asyncio.sleep(0.3)
            latencies: list[float] = []
            states: dict[str, int] = {}

            async def one() -> None:
                t0 = time.perf_counter()
                cmd, _ = await svc.submit("bench-dev", "ping", {})
                done = await svc.wait(cmd.id, 10)
                states[done.state.value] = states.get(done.state.value, 0) + 1
                if done.state is CommandState.SUCCEEDED:
                    latencies.append((time.perf_counter() - t0) * 1000)

            total = int(rate * seconds)
            loop = asyncio.get_running_loop()
            start = loop.time()
            pending = set()
            c0 = cpu()
            for i in range(total):
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.add(asyncio.create_task(one()))
            await asyncio.gather(*pending)
            used = cpu() - c0
        finally:
            dev.terminate()
            await asyncio.wait_for(dev.wait(), 5)
            gw.request_stop()
            await asyncio.wait_for(task, 20)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [0.0] * 99
    return {
        "rate": rate,
        "commands": total,
        "states": states,
        "p50_ms": round(q[49], 2),
        "p99_ms": round(q[98], 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "gateway_cpu_s_per_1k": round(used / total * 1000, 3),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--enqueue", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    enqueue = await bench_enqueue(args.enqueue, args.concurrency)
    print("enqueue (fsync):", json.dumps(enqueue))
    rt = await bench_round_trip(args.rate, args.seconds)
    print("round trip over MQTT:", json.dumps(rt))
    result = {"date": dt.datetime.now(dt.UTC).isoformat(), "enqueue": enqueue, "round_trip": rt}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
