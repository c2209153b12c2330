"""Held readings survive a crash: a process acknowledged readings into an open
window (and a rate limit's held value), is SIGKILLed, and a new pipeline on the
same data directory completes the window with them. A window emitted again
after a crash carries the same window_start/window_end."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from pipeline_harness import SINKS, MakeHarness, rd

from edgeway.pipeline.state import StateStore

CONFIG = """
routes:
  - name: w
    match: {metrics: [v]}
    steps:
      - window: {size: 10s, aggregates: [mean, count, first, last], grace: 1h}
    sinks: [cloud]
  - name: rl
    match: {metrics: [level]}
    steps:
      - rate_limit: {interval: 10s}
    sinks: [archive]
"""

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from edgeway.config import parse_config
    from edgeway.outbox import Outbox
    from edgeway.pipeline import Pipeline
    from edgeway.reading import Reading, Origin

    async def main():
        data_dir = Path(sys.argv[1])
        cfg = parse_config(sys.stdin.read())
        outbox = Outbox(data_dir / "outbox.db", gateway_id="gw", config=cfg.outbox,
                        sink_names=[s.name for s in cfg.sinks])
        await outbox.open()
        p = Pipeline(cfg.routes, cfg.pipeline, outbox=outbox, data_dir=data_dir,
                     clock=lambda: 105.0, timers=False)
        await p.open()
        for i in range(5):
            st = await p.submit([Reading("d", 100.0 + i, {"v": float(i)}, Origin("mqtt"))])
            assert st.value == "accepted", st
        # level: 1 passes at once, 2 is held (acknowledged, not yet sent).
        for ts, level in ((100.0, 1), (101.0, 2)):
            st = await p.submit([Reading("d", ts, {"level": level}, Origin("mqtt"))])
            assert st.value == "accepted", st
        print("acked", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_sigkill_in_the_middle_of_a_window_loses_nothing_acknowledged(
    harness: MakeHarness, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write((SINKS + CONFIG).encode())
        proc.stdin.close()
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"acked":
            pytest.fail(f"child did not acknowledge: {(await proc.stderr.read()).decode()}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)

    h = await harness(CONFIG, data_dir=tmp_path)
    for i in range(5, 10):
        await h.send(rd("d", 100.0 + i, {"v": float(i)}), now=106.0)
    await h.tick(3800.0)
    (r,) = await h.take("cloud")
    assert r.metrics == {
        "v_mean": 4.5,
        "v_count": 10,
        "v_first": 0.0,
        "v_last": 9.0,
        "window_start": 100,
        "window_end": 110,
    }
    # The held level 2 was sent after the restart; level 1 before the kill.
    assert [(x.ts, x.metrics) for x in await h.take("archive")] == [
        (100.0, {"level": 1}),
        (101.0, {"level": 2}),
    ]
    # Released: the journal is empty once the window is safe.
    await h.settle()
    assert h.pipeline is not None
    await h.pipeline.state.close()
    assert h.pipeline.state.rows == 0


async def test_window_emitted_again_after_a_crash_has_the_same_bounds(
    harness: MakeHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The crash falls between the outbox commit of the aggregate and the
    # journal release: simulate it by not releasing in the first run.
    monkeypatch.setattr(StateStore, "release", lambda self, step_id, releases: None)
    h1 = await harness(CONFIG, data_dir=tmp_path)
    for i in range(3):
        await h1.send(rd("d", 100.0 + i, {"v": float(i)}))
    await h1.tick(4000.0)
    first = await h1.take()
    await h1.close()
    monkeypatch.undo()

    h2 = await harness(CONFIG, data_dir=tmp_path)  # restores the journaled readings
    await h2.tick(4000.0)
    again = await h2.take()
    both = first + again[len(first) :]
    assert len(both) == 2
    assert both[0].id != both[1].id
    assert [(r.device_id, r.metrics) for r in both] == [
        (
            "d",
            {
                "v_mean": 1.0,
                "v_count": 3,
                "v_first": 0.0,
                "v_last": 2.0,
                "window_start": 100,
                "window_end": 110,
            },
        )
    ] * 2
    # This time the release went through: a third start emits nothing.
    await h2.close()
    h3 = await harness(CONFIG, data_dir=tmp_path)
    await h3.tick(8000.0)
    assert len(await h3.take()) == 2  # the same two stored records, nothing new


async def test_restart_with_clean_close_continues_the_window(
    harness: MakeHarness, tmp_path: Path
) -> None:
    h1 = await harness(CONFIG, data_dir=tmp_path)
    await h1.send(rd("d", 100.0, {"v": 1.0}))
    await h1.close()
    h2 = await harness(CONFIG, data_dir=tmp_path)
    await h2.send(rd("d", 105.0, {"v": 3.0}))
    await h2.tick(5000.0)
    (r,) = await h2.take()
    assert r.metrics["v_mean"] == 2.0 and r.metrics["v_count"] == 2


@pytest.mark.parametrize("tick_first", [False, True])
async def test_a_future_reading_restored_after_restart_does_not_make_later_ones_late(
    harness: MakeHarness, tmp_path: Path, tick_first: bool
) -> None:
    """A reading stamped half an hour ahead is journaled in its own window; after
    a restart it still does not close the device's current window."""
    config = CONFIG.replace("grace: 1h", "grace: 2s")
    h1 = await harness(config, data_dir=tmp_path)
    await h1.send(rd("d", 100.0, {"v": 1.0}), now=100.0)
    await h1.send(rd("d", 1900.0, {"v": 50.0}), now=101.0)
    await h1.close()
    h2 = await harness(config, data_dir=tmp_path)
    if tick_first:
        await h2.tick(101.5)
    await h2.send(rd("d", 102.0, {"v": 3.0}), now=102.0)
    await h2.tick(113.0)
    assert [(r.metrics["window_start"], r.metrics["v_mean"]) for r in await h2.take()] == [
        (100, 2.0)
    ]
    assert h2.stats()["routes"][0]["steps"][0].get("dropped", {}) == {}


async def test_late_reading_after_restart_stays_late(harness: MakeHarness, tmp_path: Path) -> None:
    h1 = await harness(CONFIG, data_dir=tmp_path)
    await h1.send(rd("d", 100.0, {"v": 1.0}))
    await h1.tick(4000.0)
    assert len(await h1.take()) == 1
    await h1.close()
    h2 = await harness(CONFIG, data_dir=tmp_path)
    await h2.send(rd("d", 105.0, {"v": 3.0}), now=4001.0)  # window [100,110) closed before
    await h2.tick(9000.0)
    assert len(await h2.take()) == 1  # only the old record, no second window
    assert h2.stats()["routes"][0]["steps"][0]["dropped"] == {"late": 1}


async def test_aggregate_refused_by_a_full_outbox_is_offered_again(harness: MakeHarness) -> None:
    from edgeway.ingest import IngestStatus
    from edgeway.outbox import Batch

    h = await harness(
        """
outbox: {when_full: reject_new, max_bytes: 600}
routes:
  - {name: w, match: {metrics: [v]}, steps: [{window: {size: 10s, aggregates: [mean], grace: 0s}}], sinks: [cloud]}
  - {name: raw, match: {metrics: [filler]}, sinks: [cloud]}
"""
    )
    assert h.outbox is not None and h.pipeline is not None
    await h.send(rd("d", 1.0, {"v": 1.0}), rd("d", 2.0, {"v": 3.0}))
    for i in range(100):  # fill the outbox until it refuses
        if await h.send(rd("f", 1.0 + i, {"filler": i}), now=3.0) is not IngestStatus.ACCEPTED:
            break
    else:
        pytest.fail("the outbox never filled up")
    await h.tick(20.0)  # the window closes; the outbox refuses its aggregate
    stored = await h.take()
    assert all("v_mean" not in r.metrics for r in stored)
    assert len(h.pipeline._retry) == 1  # held for the next tick
    await h.outbox.confirm(Batch("cloud", stored, 0, stored[-1].seq, False, False))
    await h.tick(20.5)  # offered again, now stored
    (agg,) = await h.take()
    assert agg.metrics == {"v_mean": 2.0, "window_start": 0, "window_end": 10}
    await h.settle()
    await h.pipeline.state.close()
    assert h.pipeline.state.rows == 0  # released once stored
