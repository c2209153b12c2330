"""Rules benchmark: 1,000 rules at 1,000 readings/s, memory per rule, and
reading -> command latency.

Usage::

    .venv/bin/python bench/rules.py [--rules 1000] [--devices 10] [--rate 1000]
        [--seconds 20] [--json OUT.json]

- **memory per rule** (in this process): a :class:`RuleStage` with
  ``--rules`` rules (a mix of plain thresholds, hysteresis, ``for:``
  durations and window functions: ``avg``, ``count``, ``delta``) over
  ``--devices`` devices, fed until every window is full; Python heap
  (tracemalloc) after, minus before, divided by the rules. The goal
  (issue 17) is at most 100 KB per rule.
- **load and latency** (``edgeway run`` as a child process, fsync durability,
  the same rules): ``--devices`` paho-mqtt devices in this process publish
  ``--rate`` readings/s in all, QoS 1. Every 50th reading of a device crosses
  the threshold of its trigger rule, whose ``on_set`` and ``on_clear`` send a
  command back to that device; the next reading clears it. Latency = the
  command arriving at the device minus the publish of the reading that fired
  it (reading in, rule state committed, command committed, PUBLISH out): a
  bound on "reading -> command sent". Reported: p50/p99/max, the readings/s
  the gateway acknowledged, its CPU share, and its RSS.

- ``--stagger``: device n's trigger fires n * 50 / devices rounds after
  dev-0's (default: every device's in the same round, a burst of
  transitions). ``--nagle``: the devices keep paho's default (Nagle on);
  by default they set TCP_NODELAY.

Each reading of a device is evaluated by the ``--rules / --devices`` rules
that match it (100 with the defaults). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import multiprocessing as mp
import operator
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TRIGGER_EVERY = 50
"""A device's every 50th reading fires its trigger rule (and the next clears it)."""


def rules_yaml(n: int, devices: int) -> str:
    """``n`` rules over ``devices`` devices: one trigger rule per device (with
    commands), the rest never fire but are evaluated on every reading."""
    out = ["rules:"]
    for i in range(n):
        dev = f"dev-{i % devices}"
        if i < devices:
            out.append(
                f"  - name: trigger-{i}\n    match: {{devices: [{dev}]}}\n"
                f'    when: "t > 50"\n'
                f"    on_set: [{{command: {{name: fan, params: {{speed: 100}}}}}}]\n"
                f"    on_clear: [{{command: {{name: fan, params: {{speed: 0}}}}}}]"
            )
            continue
        kind = i % 4
        when = [
            f"t > {1000 + i}",
            f"avg(t, 10s) > {1000 + i}",
            f"count(t, 10s) > {100000 + i} or delta(t, 10s) > {1000 + i}",
            f"t > {1000 + i} and t < {2000 + i}",
        ][kind]
        extra = ["    for: 5s", f'    clear: "t < {900 + i}"', "    cooldown: 1m", ""][kind]
        out.append(
            f'  - name: r{i}\n    match: {{devices: [{dev}]}}\n    when: "{when}"\n{extra}'.rstrip()
        )
    return "\n".join(out) + "\n"


async def memory_per_rule(n: int, devices: int) -> dict[str, Any]:
    from edgeway.config import parse_config
    from edgeway.reading import Origin, Reading
    from edgeway.rules.stage import RuleStage
    from edgeway.rules.targets import ActionTargets

    text = rules_yaml(n, devices)
    cfg = parse_config(text)
    with tempfile.TemporaryDirectory() as tmp:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        stage = RuleStage(cfg.rules, Path(tmp), targets=ActionTargets(), durability="os")
        await stage.open()
        stage.start_actions()
        origin = Origin("mqtt", "x")
        t0 = time.perf_counter()
        fed = 0
        # 600 readings per device: the 10 s windows hold what arrives in 10 s.
        for k in range(600):
            batch = [
                Reading(f"dev-{d}", time.time(), {"t": 20.0 + (k % 7)}, origin)
                for d in range(devices)
            ]
            fut = stage.observe(batch)
            if fut is not None:
                await fut
            fed += len(batch)
        elapsed = time.perf_counter() - t0
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert stage.engine is not None
        evals = stage.engine.stats.evaluations
        await stage.close()
    per_rule = (after - before) / n
    return {
        "rules": n,
        "devices": devices,
        "heap_bytes": after - before,
        "bytes_per_rule": round(per_rule),
        "readings": fed,
        "evaluations": evals,
        "us_per_evaluation": round(elapsed / evals * 1e6, 2),
        "note": "in-process engine under tracemalloc (slower than without it)",
    }


def engine_cost(n: int, devices: int, readings: int = 20_000) -> dict[str, Any]:
    """CPU time of the rule engine alone per reading (``--rules / --devices``
    rules each), with the generated scan and with every rule evaluated in
    full; best of 3 passes after the windows are full."""
    import inspect

    import yaml

    from edgeway.reading import Origin, Reading
    from edgeway.rules.config import RuleConfig
    from edgeway.rules.engine import RuleEngine

    cfgs = [RuleConfig.model_validate(r) for r in yaml.safe_load(rules_yaml(n, devices))["rules"]]
    origins = [Origin("mqtt", f"devices/dev-{d}/telemetry") for d in range(devices)]
    batch = [
        [Reading(f"dev-{d}", 0.0, {"t": 20.0 + (k % 7) * 0.1}, origins[d]) for d in range(devices)]
        for k in range(readings // devices)
    ]
    out: dict[str, Any] = {}
    modes = [("scan", True), ("full", False)]
    if "scan" not in inspect.signature(RuleEngine).parameters:
        modes = [("full", True)]  # code from before the scan (a baseline run)
    for label, scan in modes:
        clock = [1000.0]
        kw = {"scan": scan} if len(modes) == 2 else {}
        now = functools.partial(operator.getitem, clock, 0)
        engine = RuleEngine(cfgs, clock=now, wall=now, **kw)
        for b in batch[:1000]:  # 10 s of readings: the windows are full
            clock[0] += 0.01
            engine.observe(b)
        best = math.inf
        for _ in range(3):
            t0 = time.process_time()
            for b in batch:
                clock[0] += 0.01
                engine.observe(b)
            best = min(best, time.process_time() - t0)
        out[f"{label}_us_per_reading"] = round(best / readings * 1e6, 1)
    return out


class Devices:
    """Paho devices: publish telemetry, record commands' arrival."""

    def __init__(
        self,
        port: int,
        names: list[str],
        nodelay: bool = True,
        offsets: dict[str, int] | None = None,
    ) -> None:
        import socket

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.names = names
        self.offsets = offsets or dict.fromkeys(names, 0)
        self.clients = []
        self.fired: dict[str, list[tuple[float, int]]] = {d: [] for d in names}
        self.arrived: dict[str, list[tuple[float, int]]] = {d: [] for d in names}
        self.acked = 0
        self.events: list[tuple[str, float, int, float]] = []
        self.lock = threading.Lock()
        for dev in names:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev)
            c.max_inflight_messages_set(1000)
            c.max_queued_messages_set(0)
            c.on_message = lambda _c, _u, msg, dev=dev: self._command(dev, msg)
            c.on_publish = lambda *_a: self._ack()
            c.connect("127.0.0.1", port)
            if nodelay:
                # paho leaves Nagle on: a reading written right after the
                # PUBACK of a command waits for the gateway's delayed ACK
                # (40 ms on Linux). A device that wants low latency turns it off.
                c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.subscribe(f"devices/{dev}/commands/+", qos=1)
            c.loop_start()
            self.clients.append(c)

    def _ack(self) -> None:
        with self.lock:
            self.acked += 1

    def _command(self, dev: str, msg: Any) -> None:
        doc = orjson.loads(msg.payload)
        self.arrived[dev].append((time.perf_counter(), doc["params"]["speed"]))

    def run(self, rate: float, seconds: float, start: float) -> None:
        """Publish ``rate`` readings/s in all from ``start`` (perf_counter)."""
        interval = len(self.clients) / rate
        k = 0
        end = start + seconds
        while True:
            due = start + k * interval
            if due >= end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            for dev, c in zip(self.names, self.clients, strict=True):
                # --stagger: device n fires n * 50 / devices rounds later than dev-0.
                r = k - self.offsets[dev]
                hot = r >= 0 and r % TRIGGER_EVERY == TRIGGER_EVERY - 1
                was_hot = r % TRIGGER_EVERY == 0 and r > 0
                t = time.perf_counter()
                payload = orjson.dumps({"t": 60.0 if hot else 20.0})
                c.publish(f"devices/{dev}/telemetry", payload, qos=1)
                if hot:
                    self.fired[dev].append((t, 100))
                elif was_hot:
                    self.fired[dev].append((t, 0))
            k += 1

    def stop(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()

    def latencies(self) -> list[float]:
        out = []
        for dev, fired in self.fired.items():
            arrived = list(self.arrived[dev])
            for t, speed in fired:
                hit = next((a for a in arrived if a[0] >= t and a[1] == speed), None)
                if hit is not None:
                    arrived.remove(hit)
                    out.append(hit[0] - t)
                    self.events.append((dev, t, speed, hit[0] - t))
        return out


def _worker(
    port: int,
    names: list[str],
    rate: float,
    seconds: float,
    start: float,
    out: Any,
    nodelay: bool = True,
    offsets: dict[str, int] | None = None,
) -> None:
    """One load process (perf_counter is CLOCK_MONOTONIC: comparable across processes)."""
    fleet = Devices(port, names, nodelay, offsets)
    fleet.run(rate, seconds, start)
    time.sleep(1.5)
    fleet.stop()
    fired = sum(len(v) for v in fleet.fired.values())
    lat = fleet.latencies()
    if os.environ.get("RULES_BENCH_DUMP"):
        with open(os.environ["RULES_BENCH_DUMP"] + f".{os.getpid()}", "w") as f:
            json.dump(fleet.events, f)
    out.put((fleet.acked, fired, lat))


def load_and_latency(
    n: int,
    devices: int,
    rate: float,
    seconds: float,
    durability: str = "fsync",
    procs: int = 2,
    nodelay: bool = True,
    stagger: bool = False,
) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from edgeway_process import free_port, wait_listening

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "edgeway.yaml"
        cfg.write_text(
            f'mqtt:\n  listeners: [{{bind: "127.0.0.1:{port}", allow_anonymous: true}}]\n'
            f"outbox: {{durability: {durability}}}\n" + rules_yaml(n, devices)
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeway",
                "run",
                "--config",
                str(cfg),
                "--data-dir",
                str(Path(tmp) / "data"),
                "--log-level",
                "warning",
            ],
            env=env,
        )
        try:
            assert wait_listening(proc, port, 30), "gateway did not start"
            ps = psutil.Process(proc.pid)
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            names = [f"dev-{d}" for d in range(devices)]
            groups = [names[i::procs] for i in range(procs)]
            offsets = {
                d: i * TRIGGER_EVERY // devices if stagger else 0 for i, d in enumerate(names)
            }
            start = time.perf_counter() + 3.0  # workers connected by then
            workers = [
                ctx.Process(
                    target=_worker,
                    args=(
                        port,
                        g,
                        rate * len(g) / devices,
                        seconds,
                        start,
                        results,
                        nodelay,
                        {d: offsets[d] for d in g},
                    ),
                )
                for g in groups
            ]
            for w in workers:
                w.start()
            time.sleep(max(0.0, start - time.perf_counter()))
            cpu0 = ps.cpu_times()
            t0 = time.perf_counter()
            got = [results.get(timeout=seconds + 60) for _ in workers]
            wall = time.perf_counter() - t0 - 1.5
            cpu1 = ps.cpu_times()
            rss = ps.memory_info().rss
            for w in workers:
                w.join(10)
            acked = sum(a for a, _, _ in got)
            fired = sum(f for _, f, _ in got)
            lat = sorted(x for _, _, ls in got for x in ls)
        finally:
            proc.terminate()
            proc.wait(30)
        inside = sent_after_transition(Path(tmp) / "data")
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {
        "rules": n,
        "devices": devices,
        "rate_asked": rate,
        "durability": durability,
        "load_processes": procs,
        "device_tcp_nodelay": nodelay,
        "staggered": stagger,
        "readings_acked_per_s": round(acked / wall),
        "gateway_cpu_share": round(cpu / wall, 3),
        "gateway_rss_mb": round(rss / 1e6, 1),
        "commands_expected": fired,
        "commands_arrived": len(lat),
        "in_gateway_ms": _quantiles(inside),
        "latency_ms": {
            "p50": round(q[49] * 1000, 2),
            "p99": round(q[98] * 1000, 2),
            "max": round(lat[-1] * 1000, 2) if lat else None,
        },
    }


def sent_after_transition(data: Path) -> list[float]:
    """Seconds from each transition (its rule evaluated: the reading's arrival)
    to its command marked SENT (handed to the device's transport), from the
    gateway's own records: ``rules.db`` and the command records in the outbox."""
    sys.path.insert(0, str(ROOT / "tests"))
    import sqlite3

    from outbox_db import stored_records

    with sqlite3.connect(data / "rules.db") as conn:
        at = {
            f"rule:{rule}:{rule}:{dev}:{seq}": t
            for rule, dev, seq, t in conn.execute(
                "SELECT rule, device_id, seq, at FROM transitions"
            )
        }
    out = []
    for rec in stored_records(data / "outbox.db"):
        m = rec.doc.get("metrics", {})
        key = m.get("request_id")
        if m.get("state") == "sent" and key in at:
            out.append(rec.doc["ts"] - at[key])
    return out


def _quantiles(xs: list[float]) -> dict[str, Any]:
    if len(xs) < 2:
        return {"n": len(xs)}
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100)
    return {
        "n": len(xs),
        "p50": round(q[49] * 1000, 2),
        "p99": round(q[98] * 1000, 2),
        "max": round(xs[-1] * 1000, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--durability",
        choices=["fsync", "os"],
        default="fsync",
        help="outbox.durability (also the rules' and the command queue's)",
    )
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    ap.add_argument(
        "--nagle",
        action="store_true",
        help="leave Nagle's algorithm on in the devices' sockets (paho's default; "
        "before the broker's quick ACKs it added a 40 ms delayed ACK to some commands)",
    )
    ap.add_argument(
        "--stagger",
        action="store_true",
        help="spread the devices' trigger rounds (default: all fire in the same round)",
    )
    args = ap.parse_args()
    out: dict[str, Any] = {}
    out["engine"] = engine_cost(args.rules, args.devices)
    print(json.dumps(out["engine"]), flush=True)
    if not args.skip_memory:
        out["memory"] = asyncio.run(memory_per_rule(args.rules, args.devices))
        print(json.dumps(out["memory"], indent=2), flush=True)
    out["load"] = load_and_latency(
        args.rules,
        args.devices,
        args.rate,
        args.seconds,
        args.durability,
        args.procs,
        not args.nagle,
        args.stagger,
    )
    print(json.dumps(out["load"], indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
