"""Bandwidth benchmark: what a 10 s mean window plus a 0.5 % deadband saves, and what it costs.

Usage::

    .venv/bin/python bench/bandwidth.py [--sensors 100] [--seconds 3600]
        [--out bench/results/bandwidth.txt]

1. **Reduction.** ``--sensors`` simulated temperature sensors send one reading
   per second (a slow daily-like swing of +-2 degC around 20 degC, a random
   walk, and 0.05 degC of noise) for ``--seconds`` of simulated time, through
   a real :class:`Pipeline` (route: ``window {size: 10s, aggregates: [mean]}``
   then ``deadband {percent: 0.5}``) into a real outbox (``durability: os``).
   Raw = every input reading as the JSON record a sink would send (id,
   device_id, ts, metrics); sent = the records the outbox holds, serialised
   the same way. The cloud's view is checked: at every window end, for every
   sensor, the last value the cloud got differs from that window's true mean
   by less than the deadband (0.5 % of the value sent).
2. **Cost.** CPU microseconds per reading per step: each step type alone on
   batches of 100 readings (``Step.apply``), and the whole pipeline
   (``Pipeline.submit``, one reading per submit as the MQTT path does, with
   route matching, byte counting and the state journal), measured with
   ``time.process_time`` (all threads) over at least 100,000 readings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from edgeway.config import OutboxSection, parse_config
from edgeway.ingest import IngestStatus
from edgeway.outbox import Outbox
from edgeway.pipeline import Pipeline
from edgeway.pipeline.registry import StepContext, build_step
from edgeway.reading import Origin, Reading

T0 = 1_700_000_000.0
ROUTE = """
sinks: [{name: cloud, url: "file:///dev/null"}]
routes:
  - name: sensors
    steps:
      - window: {size: 10s, aggregates: [mean], grace: 2s}
      - deadband: {percent: 0.5}
    sinks: [cloud]
"""


def signal(rng: random.Random, n: int, seconds: int) -> list[list[float]]:
    """Per sensor, one value per second."""
    out = []
    for s in range(n):
        phase = rng.random() * 2 * math.pi
        walk = 0.0
        series = []
        for t in range(seconds):
            walk += rng.gauss(0, 0.002)
            v = 20.0 + 2.0 * math.sin(2 * math.pi * t / 7200 + phase) + walk
            series.append(round(v + rng.gauss(0, 0.05), 3))
        out.append(series)
        del s
    return out


def record_bytes(device_id: str, ts: float, metrics: dict[str, Any], seq: int) -> int:
    return len(
        orjson.dumps({"id": f"gw-1:{seq}", "device_id": device_id, "ts": ts, "metrics": metrics})
    )


async def reduction(n_sensors: int, seconds: int) -> dict[str, Any]:
    rng = random.Random(7)
    values = signal(rng, n_sensors, seconds)
    devices = [f"sensor-{i:04d}" for i in range(n_sensors)]
    cfg = parse_config(ROUTE)
    with tempfile.TemporaryDirectory() as d:
        data_dir = Path(d)
        outbox = Outbox(
            data_dir / "outbox.db",
            gateway_id="gw-1",
            config=OutboxSection(durability="os"),
            sink_names=["cloud"],
        )
        await outbox.open()
        now = [T0]
        pipeline = Pipeline(
            cfg.routes,
            cfg.pipeline,
            outbox=outbox,
            data_dir=data_dir,
            durability="os",
            clock=lambda: now[0],
            timers=False,
        )
        await pipeline.open()
        raw_records = raw_bytes = 0
        seq = 0
        futs: list[asyncio.Future[IngestStatus]] = []
        for t in range(seconds):
            ts = T0 + t
            now[0] = ts + 0.05  # arrives 50 ms after it was measured
            batch = []
            for i, dev in enumerate(devices):
                m = {"temperature": values[i][t]}
                seq += 1
                raw_records += 1
                raw_bytes += record_bytes(dev, ts, m, seq)
                batch.append(Reading(dev, ts, m, Origin("mqtt", f"devices/{dev}/telemetry")))
            futs.append(pipeline.submit(batch))
            pipeline.tick(now[0])
            if len(futs) >= 50:
                await asyncio.gather(*futs)
                futs.clear()
        await asyncio.gather(*futs)
        pipeline.tick(T0 + seconds + 60)
        if pipeline._inflight:
            await asyncio.wait(set(pipeline._inflight))
        sent: list[Any] = []
        while True:
            b = await outbox.read_batch("cloud", 50_000, 1 << 30)
            sent.extend(b.records)
            if not b.records:
                break
        stats = pipeline.report()
        await pipeline.close()
        await outbox.close()
    sent_bytes = sum(len(orjson.dumps(r.to_json_obj())) for r in sent)

    # The cloud's view: at each window end, the last value received per sensor.
    true_means: dict[tuple[str, int], float] = {}
    for i, dev in enumerate(devices):
        for w in range(seconds // 10):
            chunk = values[i][w * 10 : w * 10 + 10]
            true_means[(dev, w)] = math.fsum(chunk) / len(chunk)
    got: dict[str, list[tuple[int, float]]] = {}
    for r in sent:
        w = int((r.metrics["window_start"] - T0) // 10)
        got.setdefault(r.device_id, []).append((w, float(r.metrics["temperature_mean"])))
    worst_rel = 0.0
    worst_abs = 0.0
    violations = 0
    for dev in devices:
        points = sorted(got.get(dev, []))
        j = 0
        current: float | None = None
        for w in range(seconds // 10):
            while j < len(points) and points[j][0] <= w:
                current = points[j][1]
                j += 1
            assert current is not None, "first window never sent"
            err = abs(true_means[(dev, w)] - current)
            worst_abs = max(worst_abs, err)
            rel = err / abs(current)
            worst_rel = max(worst_rel, rel)
            if rel >= 0.005:
                violations += 1
    return {
        "sensors": n_sensors,
        "seconds": seconds,
        "raw_records": raw_records,
        "raw_bytes": raw_bytes,
        "window_records": stats["routes"][0]["steps"][0]["out"]["readings"],
        "sent_records": len(sent),
        "sent_bytes": sent_bytes,
        "record_reduction": 1 - len(sent) / raw_records,
        "byte_reduction": 1 - sent_bytes / raw_bytes,
        "cloud_view_worst_relative_error": worst_rel,
        "cloud_view_worst_abs_error_degC": worst_abs,
        "cloud_view_violations": violations,
        "stats_estimate_received_bytes": stats["received"]["bytes"],
        "stats_estimate_sent_bytes": stats["sent"]["bytes"],
    }


STEP_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("map (rename + tag)", {"map": {"rename": {"temperature": "t"}, "tags": {"site": "a"}}}),
    (
        "validate (type + range)",
        {
            "validate": {
                "types": {"temperature": "number"},
                "ranges": {"temperature": {"min": -40, "max": 125}},
            }
        },
    ),
    ("transform (scale)", {"transform": {"temperature": {"scale": 1.8, "offset": 32}}}),
    (
        "transform (degC->degF pint)",
        {"transform": {"temperature": {"from_unit": "degC", "to_unit": "degF"}}},
    ),
    ("transform (expr)", {"transform": {"f": {"expr": "temperature * 1.8 + 32"}}}),
    ("deadband 0.5 %", {"deadband": {"percent": 0.5}}),
    ("on_change", {"on_change": {}}),
    ("rate_limit 10 s", {"rate_limit": {"interval": 10}}),
    ("dedup (values)", {"dedup": {}}),
    ("window 10 s mean", {"window": {"size": 10, "aggregates": ["mean"]}}),
    (
        "window 10 s mean,min,max,p95",
        {"window": {"size": 10, "aggregates": ["mean", "min", "max", "p95"]}},
    ),
]


def step_costs(n_readings: int) -> list[tuple[str, float]]:
    """CPU us per reading for each step alone, batches of 100 (no journal)."""
    rng = random.Random(1)
    n_dev = 100
    batches = []
    for t in range(n_readings // n_dev):
        batches.append(
            [
                Reading(
                    f"s{i}",
                    T0 + t,
                    {"temperature": round(20 + rng.gauss(0, 0.5), 2)},
                    Origin("mqtt"),
                )
                for i in range(n_dev)
            ]
        )
    out = []
    for label, spec in STEP_SPECS:
        step = build_step(spec, StepContext(route="b", step_id="b/0:x"))
        best = math.inf
        for _ in range(3):
            step = build_step(spec, StepContext(route="b", step_id="b/0:x"))
            c0 = time.process_time()
            for i, b in enumerate(batches):
                step.apply(b, T0 + i)
                if hasattr(step, "tick") and i % 10 == 0:
                    step.tick(T0 + i)
                    if hasattr(step, "take_releases"):
                        step.take_releases()
            best = min(best, time.process_time() - c0)
        out.append((label, best / (len(batches) * n_dev) * 1e6))
    return out


class NullOutbox:
    """Accepts at once: isolates the pipeline's own cost from the outbox's."""

    sink_names = ["cloud"]

    def submit(
        self, readings: Sequence[Reading], sinks: Sequence[str] | None = None
    ) -> asyncio.Future[IngestStatus]:
        fut: asyncio.Future[IngestStatus] = asyncio.get_running_loop().create_future()
        fut.set_result(IngestStatus.ACCEPTED)
        return fut

    def is_saturated(self) -> bool:
        return False


async def pipeline_cost(
    n_readings: int, route: str, durability: str, journal: bool = True
) -> float:
    """CPU us per reading for ``Pipeline.submit`` of single readings (all threads).

    ``journal=False`` detaches the state store from the holding steps, to
    tell the pipeline's own cost from the journal's."""
    cfg = parse_config(route)
    rng = random.Random(2)
    with tempfile.TemporaryDirectory() as d:
        now = [T0]
        p = Pipeline(
            cfg.routes,
            cfg.pipeline,
            outbox=NullOutbox(),
            data_dir=d,
            durability=durability,  # type: ignore[arg-type]
            clock=lambda: now[0],
            timers=False,
        )
        await p.open()
        if not journal:
            for route_ in p.routes:
                for _, step in route_.holding:
                    step.ctx.journal = None
        readings = [
            Reading(
                f"s{i % 100}",
                T0 + i // 100,
                {"temperature": round(20 + rng.gauss(0, 0.5), 2)},
                Origin("mqtt", f"devices/s{i % 100}/telemetry"),
            )
            for i in range(n_readings)
        ]
        c0 = time.process_time()
        futs = []
        for i, r in enumerate(readings):
            futs.append(p.submit([r]))
            if i % 100 == 99:
                now[0] = r.ts
                p.tick(r.ts)
                # As many devices waiting for their acknowledgement at once.
                await asyncio.gather(*futs)
                futs.clear()
        await asyncio.gather(*futs)
        cpu = time.process_time() - c0
        await p.close()
    return cpu / n_readings * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sensors", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=3600)
    ap.add_argument("--cost-readings", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=Path("bench/results/bandwidth.txt"))
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here (run_all.py)")
    args = ap.parse_args()
    figures: list[dict[str, object]] = []

    lines = [
        f"# bench/bandwidth.py, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
        f"Python {platform.python_version()}, {platform.machine()}",
        "",
    ]
    red = await reduction(args.sensors, args.seconds)
    lines += [
        f"## Reduction: {red['sensors']} sensors at 1 Hz for {red['seconds']} s "
        "(window 10 s mean, then deadband 0.5 %)",
        f"raw:   {red['raw_records']:>9,} records {red['raw_bytes']:>12,} bytes (JSON records at 1 Hz)",
        f"sent:  {red['sent_records']:>9,} records {red['sent_bytes']:>12,} bytes "
        f"({red['window_records']:,} windows before the deadband)",
        f"reduction: {red['record_reduction'] * 100:.2f} % of records, "
        f"{red['byte_reduction'] * 100:.2f} % of bytes (goal >= 90 % of bytes)",
        f"cloud view vs true 10 s means: worst {red['cloud_view_worst_relative_error'] * 100:.4f} % "
        f"({red['cloud_view_worst_abs_error_degC']:.4f} degC), windows outside 0.5 %: "
        f"{red['cloud_view_violations']}",
        f"edgeway stats' estimate: received {red['stats_estimate_received_bytes']:,} bytes, "
        f"sent {red['stats_estimate_sent_bytes']:,} bytes",
        "",
        f"## CPU per reading per step (each step alone, batches of 100, best of 3, "
        f"{args.cost_readings:,} readings)",
    ]
    for label, us in step_costs(args.cost_readings):
        lines.append(f"{label:<32} {us:6.2f} us")
    lines.append("")
    lines.append(
        "## Whole pipeline, one reading per submit (route matching, byte counting, "
        "futures, state journal; outbox replaced by an instant one; all threads)"
    )
    empty = "sinks: [{name: cloud, url: 'file:///dev/null'}]\n"
    for label, route, dur, journal in [
        ("no routes (pass-through)", empty, "os", True),
        ("window + deadband, no journal (not durable)", ROUTE, "os", False),
        ("window + deadband, journal synchronous=NORMAL", ROUTE, "os", True),
        ("window + deadband, journal synchronous=FULL (fsync)", ROUTE, "fsync", True),
    ]:
        us = await pipeline_cost(min(args.cost_readings, 100_000), route, dur, journal)
        lines.append(f"{label:<52} {us:6.2f} us per reading")
        figures.append(
            {"name": f"pipeline CPU per reading, {label}", "unit": "us", "value": us,
             "higher_is_better": False}
        )  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json is not None:
        figures[:0] = [
            {"name": "bytes saved by window 10 s mean + deadband 0.5 %", "unit": "%",
             "value": red["byte_reduction"] * 100},
            {"name": "records saved", "unit": "%", "value": red["record_reduction"] * 100},
            {"name": "cloud-view windows outside the deadband", "unit": "count",
             "value": red["cloud_view_violations"], "higher_is_better": False},
        ]  # fmt: skip
        args.json.write_text(json.dumps({"figures": figures}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if red["byte_reduction"] < 0.9 or red["cloud_view_violations"]:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
