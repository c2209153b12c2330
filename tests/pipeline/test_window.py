"""Window step: alignment, sliding, grace and late data, timer closing, several devices."""

from __future__ import annotations

import pytest
from pipeline_harness import MakeHarness, rd

ROUTE = """
routes:
  - name: w
    steps:
      - window: {{size: {size}, hop: {hop}, aggregates: [{aggs}], grace: {grace}, late: {late}}}
    sinks: [cloud]
"""


def cfg(
    size: str = "10s", hop: str = "null", aggs: str = "mean", grace: str = "2s", late: str = "drop"
) -> str:
    return ROUTE.format(size=size, hop=hop, aggs=aggs, grace=grace, late=late)


async def test_windows_align_to_wall_clock_boundaries(harness: MakeHarness) -> None:
    h = await harness(cfg(size="1m", grace="0s", aggs="count, first, last"))
    # 1700000017 is 17 s past a minute boundary (1700000000 = 13:33:20 UTC; 1699999980 is :00).
    for ts in (1700000017.0, 1700000039.5, 1700000040.0):
        await h.send(rd("d", ts, {"v": ts}))
    # ts 1700000040 is the first second of the next minute: [1700000040, 1700000100).
    await h.tick(1700000040.0)
    (r,) = await h.take()
    assert (r.metrics["window_start"], r.metrics["window_end"]) == (1699999980, 1700000040)
    assert r.ts == 1700000040.0
    assert r.metrics["v_count"] == 2
    assert r.metrics["v_first"] == 1700000017.0 and r.metrics["v_last"] == 1700000039.5


async def test_sliding_windows_each_reading_in_size_over_hop_windows(harness: MakeHarness) -> None:
    h = await harness(cfg(size="10s", hop="5s", grace="0s", aggs="sum, count"))
    for ts, v in [(0.0, 1), (4.0, 2), (7.0, 4), (12.0, 8)]:
        await h.send(rd("d", ts, {"v": v}), now=ts)
    await h.tick(30.0)
    got = [
        (r.metrics["window_start"], r.metrics["window_end"], r.metrics["v_sum"])
        for r in await h.take()
    ]
    # Windows [-5,5) [0,10) [5,15) [10,20): closed in order.
    assert got == [(-5, 5, 3.0), (0, 10, 7.0), (5, 15, 12.0), (10, 20, 8.0)]


async def test_reading_time_closes_a_window_without_the_timer(harness: MakeHarness) -> None:
    h = await harness(cfg(grace="2s"))
    await h.send(rd("d", 1.0, {"v": 1.0}))
    await h.send(rd("d", 11.0, {"v": 5.0}))
    assert await h.take() == []  # 11 < 10 + grace
    await h.send(rd("d", 12.0, {"v": 7.0}))
    assert [(r.metrics["window_start"], r.metrics["v_mean"]) for r in await h.take()] == [(0, 1.0)]


async def test_timer_closes_windows_of_silent_devices_only(harness: MakeHarness) -> None:
    h = await harness(cfg(grace="2s"))
    await h.send(rd("quiet", 5.0, {"v": 1.0}), now=5.0)
    # "lagging": its clock is 5 s behind the gateway's, it keeps sending.
    await h.send(rd("lagging", 5.0, {"v": 2.0}), now=10.0)
    await h.send(rd("lagging", 6.0, {"v": 4.0}), now=11.0)
    await h.tick(12.0)  # quiet: idle for 7 s -> closes; lagging sent 1 s ago -> waits
    assert [r.device_id for r in await h.take()] == ["quiet"]
    await h.send(rd("lagging", 7.0, {"v": 6.0}), now=12.5)  # still in its window
    await h.tick(14.0)  # lagging idle 1.5 s < grace
    assert await h.take() == []
    await h.tick(14.5)
    (r,) = await h.take()
    assert (r.device_id, r.metrics["v_mean"]) == ("lagging", 4.0)


async def test_late_reading_within_grace_counts_after_grace_dropped(harness: MakeHarness) -> None:
    h = await harness(cfg(grace="2s"))
    await h.send(rd("d", 9.0, {"v": 1.0}), now=9.0)
    await h.send(rd("d", 9.5, {"v": 3.0}), now=11.5)  # late but within grace: counts
    await h.tick(14.0)
    (r,) = await h.take()
    assert r.metrics["v_mean"] == 2.0
    assert await h.send(rd("d", 9.9, {"v": 100.0}), now=14.1) is not None
    await h.tick(30.0)
    assert await h.take() == []
    assert h.stats()["routes"][0]["steps"][0]["dropped"] == {"late": 1}


async def test_late_forward_passes_the_reading_on(harness: MakeHarness) -> None:
    h = await harness(cfg(grace="0s", late="forward"))
    await h.send(rd("d", 1.0, {"v": 1.0}))
    await h.tick(11.0)
    assert len(await h.take()) == 1
    await h.send(rd("d", 2.0, {"v": 9.0}), now=12.0)
    assert [(r.ts, r.metrics) for r in await h.take()] == [(2.0, {"v": 9.0})]


async def test_aggregates_golden(harness: MakeHarness) -> None:
    h = await harness(
        cfg(grace="0s", aggs="mean, min, max, sum, count, first, last, stddev, p50, p100")
    )
    values = [4.0, 2.0, 9.0, 5.0]
    for i, v in enumerate(values):
        await h.send(rd("d", 20.0 + i, {"v": v, "state": f"s{i}"}))
    await h.tick(31.0)
    (r,) = await h.take()
    assert r.metrics == {
        "v_mean": 5.0,
        "v_min": 2.0,
        "v_max": 9.0,
        "v_sum": 20.0,
        "v_count": 4,
        "v_first": 4.0,
        "v_last": 5.0,
        "v_stddev": pytest.approx(2.943920288775949),  # statistics.stdev
        "v_p50": 4.5,
        "v_p100": 9.0,
        "state_count": 4,
        "state_first": "s0",
        "state_last": "s3",
        "window_start": 20,
        "window_end": 30,
    }


async def test_devices_and_metrics_are_separate(harness: MakeHarness) -> None:
    h = await harness(cfg(grace="0s", aggs="mean, count"))
    await h.send(rd("a", 1.0, {"x": 1.0}), rd("b", 1.0, {"x": 10.0}))
    await h.send(rd("a", 2.0, {"x": 3.0, "y": 7.0}))
    await h.tick(10.0)
    got = {r.device_id: r.metrics for r in await h.take()}
    assert got["a"] == {
        "x_mean": 2.0,
        "x_count": 2,
        "y_mean": 7.0,
        "y_count": 1,
        "window_start": 0,
        "window_end": 10,
    }
    assert got["b"]["x_mean"] == 10.0


async def test_window_output_carries_last_tags(harness: MakeHarness) -> None:
    h = await harness(cfg(grace="0s"))
    await h.send(rd("d", 1.0, {"v": 1.0}, tags={"fw": "1"}))
    await h.send(rd("d", 2.0, {"v": 1.0}, tags={"fw": "2"}))
    await h.tick(10.0)
    (r,) = await h.take()
    assert r.tags == {"fw": "2"}


def test_bad_window_parameters_are_refused() -> None:
    from edgeway.config import ConfigError, parse_config

    for bad, message in [
        ("{size: 10s, hop: 20s, aggregates: [mean]}", "hop"),
        ("{size: 10s, aggregates: [median]}", "unknown aggregate"),
        ("{size: 10s, aggregates: [mean, max], names: '{metric}'}", "{agg}"),
        ("{size: 0, aggregates: [mean]}", "greater than 0"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config(f"routes:\n  - name: r\n    steps:\n      - window: {bad}\n", "c.yaml")
        assert message in str(e.value), str(e.value)
        assert str(e.value).startswith("c.yaml:4: routes[0].steps[0].window")


async def test_a_reading_from_the_future_does_not_make_later_ones_late(
    harness: MakeHarness,
) -> None:
    """A device's clock jumps half an hour ahead for one reading (within the
    input limits' plausible range): its next, correctly stamped readings
    still count in their window, and the future one gets its own window."""
    h = await harness(cfg(grace="2s"))
    await h.send(rd("d", 100.0, {"v": 1.0}), now=100.0)
    await h.send(rd("d", 1900.0, {"v": 50.0}), now=101.0)  # 30 min ahead of the clock
    assert await h.send(rd("d", 102.0, {"v": 3.0}), now=102.0) is not None
    await h.send(rd("d", 111.0, {"v": 5.0}), now=111.0)
    await h.tick(113.0)
    assert [(r.metrics["window_start"], r.metrics["v_mean"]) for r in await h.take()] == [
        (100, 2.0)
    ]
    assert h.stats()["routes"][0]["steps"][0].get("dropped", {}) == {}
    await h.tick(1912.0)  # the gateway's clock reaches the future reading's window
    got = [(r.metrics["window_start"], r.metrics["v_mean"]) for r in await h.take()]
    assert got == [(110, 5.0), (1900, 50.0)]
