"""Edge ML benchmark: ONNX inference latency and memory drift, the manager's
queue round trip, and the built-in anomaly step's cost.

Usage::

    .venv/bin/python bench/ml.py [--calls 1000000] [--jobs 20000] [--readings 200000]

- inference: the shipped model (src/edgeway/ml/models/pump_health.onnx) called
  ``--calls`` times with one row, as the inference thread calls it
  (:class:`edgeway.ml.manager.Runner`, one intra-op thread). Reports p50/p99/max
  per call and the process RSS after a 10,000-call warm-up and at the end
  (issue 17's goals: p99 <= 5 ms, drift under 1 MB over 1,000,000 calls).
- round trip: ``--jobs`` one-row jobs through the ModelManager (submit on the
  event loop, inference thread, result delivered back on the loop), one at a
  time: p50/p99 of submit -> delivered.
- anomaly step: ``--readings`` readings of 3 metrics through the ``anomaly``
  step for 1,000 devices, with each detector (``zscore``, ``hst``):
  microseconds per reading; for ``hst`` also the cost of one call (one
  reading) and the memory of one model, for the default trees and the
  largest the configuration allows (``--anomaly-only``: just this part).

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODEL = ROOT / "src" / "edgeway" / "ml" / "models" / "pump_health.onnx"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 1e6


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def inference(calls: int) -> None:
    import numpy as np

    from edgeway.ml.manager import Runner

    runner = Runner("pump-health", "1", str(MODEL), window=200)
    rng = np.random.default_rng(1)
    rows = rng.normal([3.0, 60.0, 10.0], [1.0, 10.0, 2.0], size=(1000, 3)).astype(np.float32)
    for i in range(10_000):
        runner.run(rows[i % 1000 : i % 1000 + 1])
    # Memory: ``calls`` calls with nothing kept, RSS before and after.
    start_rss = rss_mb()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for i in range(calls):
        runner.run(rows[i % 1000 : i % 1000 + 1])
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    end_rss = rss_mb()
    # Latency: a tenth as many calls, each timed.
    lat = [0.0] * max(1, calls // 10)
    for i in range(len(lat)):
        a = time.perf_counter()
        runner.run(rows[i % 1000 : i % 1000 + 1])
        lat[i] = time.perf_counter() - a
    print(
        f"inference: {calls} calls in {wall:.1f} s ({calls / wall:,.0f}/s, "
        f"{cpu / calls * 1e6:.1f} CPU-us per call); per call p50 {pct(lat, 0.5) * 1000:.3f} ms, "
        f"p99 {pct(lat, 0.99) * 1000:.3f} ms, max {max(lat) * 1000:.3f} ms (over {len(lat)} timed calls)"
    )
    print(
        f"inference memory: RSS {start_rss:.1f} MB after warm-up, {end_rss:.1f} MB at the end: "
        f"drift {end_rss - start_rss:+.2f} MB over {calls} calls"
    )


async def round_trip(jobs: int) -> None:
    from edgeway.config import ModelsSection
    from edgeway.ml.manager import Job, ModelManager
    from edgeway.ml.store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelsSection()
        mgr = ModelManager(ModelStore(Path(tmp), max_size=cfg.max_size), cfg)
        await mgr.open()

        async def chunks():  # type: ignore[no-untyped-def]
            yield MODEL.read_bytes()

        await mgr.store.add("pump-health", "1", chunks())
        await mgr.activate("pump-health", "1", by="bench")
        loop = asyncio.get_running_loop()
        lat: list[float] = []
        for i in range(jobs):
            fut = loop.create_future()
            t = time.perf_counter()
            mgr.submit(Job("pump-health", [f"d{i % 100}"], [[3.0, 60.0, 10.0]], fut.set_result))
            await fut
            lat.append(time.perf_counter() - t)
        await mgr.close()
    print(
        f"round trip (loop -> inference thread -> loop), {jobs} jobs: p50 "
        f"{statistics.median(lat) * 1000:.3f} ms, p99 {pct(lat, 0.99) * 1000:.3f} ms"
    )


def anomaly(readings: int) -> None:
    from edgeway.ml.zscore import AnomalyStep
    from edgeway.pipeline.registry import StepContext, parse_step_spec
    from edgeway.reading import Origin, Reading

    rng = random.Random(1)
    origin = Origin("mqtt")
    batch = [
        Reading(
            f"d{i % 1000}",
            float(i),
            {"vibration": rng.gauss(3, 1), "bearing_temp": rng.gauss(60, 5), "current": 10.0},
            origin,
        )
        for i in range(readings)
    ]
    metrics = ["vibration", "bearing_temp", "current"]
    # hst: a short warm-up and window, so that most of the readings are scored.
    hst = {"warmup": 10, "hst": {"max_devices": 1000, "window": 20}}
    for detector, extra in (("zscore", {}), ("hst", hst)):
        spec = {"metrics": metrics, "detector": detector, **extra}
        _, p = parse_step_spec({"anomaly": spec})
        step = AnomalyStep(p, StepContext(route="r", step_id="r/0:anomaly"))  # type: ignore[arg-type]
        t = time.perf_counter()
        for i in range(0, readings, 100):
            step.apply(batch[i : i + 100], float(i))
        wall = time.perf_counter() - t
        print(
            f"anomaly step ({detector}): {readings} readings x 3 metrics, 1,000 devices: "
            f"{wall / readings * 1e6:.2f} us per reading ({readings / wall:,.0f} readings/s)"
        )
    hst_per_call(metrics, batch[: min(readings, 20_000)])


def hst_per_call(metrics: list[str], batch: list[Any]) -> None:
    """Per call (one reading of one device: score, then learn; the first call
    builds the trees) and memory per model, for the default trees and the
    largest the configuration allows (edgeway.ml.hst.NODES_MAX)."""
    import tracemalloc

    import river.anomaly  # noqa: F401  (its import is not a model's memory)

    from edgeway.ml.hst import model_bytes
    from edgeway.ml.zscore import AnomalyStep
    from edgeway.pipeline.registry import StepContext, parse_step_spec
    from edgeway.reading import Reading

    one = [Reading("d", r.ts, r.metrics, r.origin) for r in batch]
    for trees, height in ((10, 4), (10, 6), (20, 5)):
        hst = {"trees": trees, "height": height, "window": 250, "max_devices": 1}
        _, p = parse_step_spec({"anomaly": {"metrics": metrics, "detector": "hst", "hst": hst}})
        step = AnomalyStep(p, StepContext(route="r", step_id="r/0:anomaly"))  # type: ignore[arg-type]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for r in one[:400]:  # warm-up and one window: the model is built and full
            step.apply([r], r.ts)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        # The build: the first call after the warm-up (a fresh step, no tracemalloc).
        step = AnomalyStep(p, StepContext(route="r", step_id="r/0:anomaly"))  # type: ignore[arg-type]
        for r in one[:99]:
            step.apply([r], r.ts)
        t = time.perf_counter()
        step.apply([one[99]], one[99].ts)
        step.apply([one[100]], one[100].ts)
        build = time.perf_counter() - t
        for r in one[101:400]:
            step.apply([r], r.ts)
        calls = []
        for r in one[400:]:
            t = time.perf_counter()
            step.apply([r], r.ts)
            calls.append(time.perf_counter() - t)
        print(
            f"hst trees={trees} height={height}: per call p50 {pct(calls, 0.5) * 1e3:.3f} "
            f"p99 {pct(calls, 0.99) * 1e3:.3f} max {max(calls) * 1e3:.3f} ms, "
            f"build {build * 1e3:.2f} ms; "
            f"model {held / 1e3:,.0f} KB (bound {model_bytes(trees, height) / 1e3:,.0f} KB)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--readings", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="a tenth of everything")
    ap.add_argument("--anomaly-only", action="store_true", help="only the anomaly step")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.jobs, args.readings = (
            args.calls // 10,
            args.jobs // 10,
            args.readings // 10,
        )
    if not args.anomaly_only:
        inference(args.calls)
        asyncio.run(round_trip(args.jobs))
    anomaly(args.readings)


if __name__ == "__main__":
    main()
