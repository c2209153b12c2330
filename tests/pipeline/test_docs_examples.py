"""Every ``# example:`` block of docs/pipeline.md, loaded and run with the
input and output the page shows next to it (golden data per step)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pipeline_harness import MakeHarness, rd

from edgeway.ingest import IngestStatus

DOC = Path(__file__).resolve().parents[2] / "docs" / "pipeline.md"


def examples() -> dict[str, str]:
    text = DOC.read_text()
    found = dict(re.findall(r"```yaml\n# example: (\S+)\n(.*?)```", text, re.DOTALL))
    return found


def test_every_step_has_an_example() -> None:
    from edgeway.pipeline import step_types

    assert set(step_types()) <= set(examples()), "a step without a tested docs example"


async def test_routes(harness: MakeHarness) -> None:
    h = await harness(examples()["routes"])
    boiler = rd(
        "boiler-1",
        100.0,
        {"temp": 80.0, "pressure": 2.0},
        tags={"site": "plant-a", "type": "thermometer"},
        address="plant/a/boilers/1",
    )
    other_site = rd(
        "boiler-2",
        100.0,
        {"temp": 70.0},
        tags={"site": "plant-b", "type": "thermometer"},
        address="plant/b/boilers/2",
    )
    assert await h.send(boiler, other_site) is IngestStatus.ACCEPTED
    # everything-raw takes every reading whole: the archive gets both as they came.
    archived = await h.take("archive")
    assert [(r.device_id, r.metrics) for r in archived] == [
        ("boiler-1", {"temp": 80.0, "pressure": 2.0}),
        ("boiler-2", {"temp": 70.0}),
    ]
    assert await h.take("cloud") == []  # boilers' window is still open
    await h.tick(200.0)
    cloud = await h.take("cloud")
    assert [(r.device_id, r.ts, r.metrics) for r in cloud] == [
        (
            "boiler-1",
            120.0,
            {"temp_mean": 80.0, "temp_max": 80.0, "window_start": 60, "window_end": 120},
        )
    ]


async def test_map(harness: MakeHarness) -> None:
    h = await harness(examples()["map"])
    await h.send(rd("d", 1.0, {"t": 21.5, "h": 40, "debug_x": 1, "rssi": -70}))
    (r,) = await h.take()
    assert r.metrics == {"temperature": 21.5, "humidity": 40, "firmware": "2.1"}
    assert r.tags == {"site": "plant-a"}


async def test_validate(harness: MakeHarness) -> None:
    h = await harness(examples()["validate"])
    assert await h.send(rd("d", 1.0, {"temperature": 21.5})) is IngestStatus.ACCEPTED
    assert await h.send(rd("d", 2.0, {"temperature": 300})) is IngestStatus.REJECTED_INVALID
    assert await h.send(rd("d", 3.0, {"humidity": 40})) is IngestStatus.REJECTED_INVALID
    assert await h.send(rd("d", 4.0, {"temperature": "hot"})) is IngestStatus.REJECTED_INVALID
    assert await h.send(rd("d", 5.0, {"temperature": float("nan")})) is (
        IngestStatus.REJECTED_INVALID
    )
    assert [r.metrics for r in await h.take()] == [{"temperature": 21.5}]
    q = await h.take("quarantine")
    assert [(r.ts, r.tags) for r in q] == [
        (2.0, {"rejected": "range:temperature", "route": "r"}),
        (3.0, {"rejected": "missing:temperature", "route": "r"}),
        (4.0, {"rejected": "type:temperature", "route": "r"}),
        (5.0, {"rejected": "not_finite:temperature", "route": "r"}),
    ]
    (step,) = h.stats()["routes"][0]["steps"]
    assert step["dropped"] == {
        "range:temperature": 1,
        "missing:temperature": 1,
        "type:temperature": 1,
        "not_finite:temperature": 1,
    }
    # One good reading in the message: the message is accepted.
    mixed = [rd("d", 6.0, {"temperature": 1}), rd("d", 7.0, {"temperature": 999})]
    assert await h.send(*mixed) is IngestStatus.ACCEPTED


async def test_transform(harness: MakeHarness) -> None:
    h = await harness(examples()["transform"])
    await h.send(rd("d", 1.0, {"pressure": 101325, "temperature": 68, "humidity": 50}))
    (r,) = await h.take()
    assert r.metrics == {
        "pressure": 1013.25,
        "temperature": 20.0,
        "humidity": 50,
        "dew_point": 10.0,
    }
    assert r.tags == {"unit:temperature": "degC"}
    # A missing operand leaves dew_point unset and counts an error.
    await h.send(rd("d", 2.0, {"temperature": 50}))
    (r,) = await h.take()
    assert r.metrics == {"temperature": 10.0}
    assert h.stats()["routes"][0]["steps"][0]["errors"] == 1


async def test_deadband(harness: MakeHarness) -> None:
    h = await harness(examples()["deadband"])
    for ts, m in [
        (1.0, {"temperature": 20.0, "humidity": 40}),
        (2.0, {"temperature": 20.05, "humidity": 41}),
        (3.0, {"temperature": 20.2, "humidity": 41.5}),
        (4.0, {"temperature": 20.2, "humidity": 42.5}),
    ]:
        await h.send(rd("d", ts, m))
    assert [r.metrics for r in await h.take()] == [
        {"temperature": 20.0, "humidity": 40},
        {"temperature": 20.2},
        {"humidity": 42.5},
    ]
    # max_silence (5 min) in reading time: an unchanged value passes after it.
    await h.send(rd("d", 3.0 + 299, {"temperature": 20.2}))
    assert await h.take() == []
    await h.send(rd("d", 3.0 + 300, {"temperature": 20.2}))
    assert [r.metrics for r in await h.take()] == [{"temperature": 20.2}]


async def test_on_change(harness: MakeHarness) -> None:
    h = await harness(examples()["on_change"])
    for ts, v in [(1.0, "on"), (2.0, "on"), (3.0, "off")]:
        await h.send(rd("d", ts, {"state": v}))
    assert [(r.ts, r.metrics) for r in await h.take()] == [
        (1.0, {"state": "on"}),
        (3.0, {"state": "off"}),
    ]
    # max_silence (15 min) in reading time: the unchanged value is sent again after it.
    await h.send(rd("d", 3.0 + 899, {"state": "off"}))
    assert await h.take() == []
    await h.send(rd("d", 3.0 + 900, {"state": "off"}))
    assert [(r.ts, r.metrics) for r in await h.take()] == [(903.0, {"state": "off"})]


async def test_rate_limit(harness: MakeHarness) -> None:
    h = await harness(examples()["rate_limit"])
    await h.send(rd("d", 0.0, {"level": 1}))
    await h.send(rd("d", 3.0, {"level": 2}))
    await h.send(rd("d", 6.0, {"level": 3}))
    assert [(r.ts, r.metrics) for r in await h.take()] == [(0.0, {"level": 1})]
    await h.tick(9.9)
    assert await h.take() == []
    await h.tick(10.0)
    assert [(r.ts, r.metrics) for r in await h.take()] == [(6.0, {"level": 3})]
    # A value not newer than the last sent is stale.
    await h.send(rd("d", 5.0, {"level": 9}), now=11.0)
    assert await h.take() == []
    # After a quiet interval the next value passes at once.
    await h.send(rd("d", 16.0, {"level": 4}))
    assert [(r.ts, r.metrics) for r in await h.take()] == [(16.0, {"level": 4})]
    assert h.stats()["routes"][0]["steps"][0]["dropped"] == {"stale": 1}
    assert h.pipeline is not None
    await h.settle()


async def test_dedup(harness: MakeHarness) -> None:
    h = await harness(examples()["dedup"])
    await h.send(rd("d", 5.0, {"v": 1}))
    await h.send(rd("d", 5.0, {"v": 1}))
    await h.send(rd("d", 6.0, {"v": 1}))
    await h.send(rd("e", 5.0, {"v": 1}))  # another device: not a repeat
    assert [(r.device_id, r.ts) for r in await h.take()] == [("d", 5.0), ("d", 6.0), ("e", 5.0)]


async def test_window(harness: MakeHarness) -> None:
    h = await harness(examples()["window"])
    for ts, t in [(100.0, 1), (104.0, 2), (109.9, 6), (110.0, 100)]:
        await h.send(rd("d", ts, {"t": t}))
    await h.tick(111.9)  # end + grace not reached
    assert await h.take() == []
    await h.tick(112.0)
    (r,) = await h.take()
    assert r.ts == 110.0
    assert r.metrics == {
        "t_mean": 3.0,
        "t_min": 1.0,
        "t_max": 6.0,
        "t_count": 3,
        "t_p90": pytest.approx(5.2),
        "window_start": 100,
        "window_end": 110,
    }


async def test_priority(harness: MakeHarness) -> None:
    h = await harness(examples()["priority"])
    await h.send(rd("d", 1.0, {"temperature": 20}))
    await h.send(rd("d", 2.0, {"temperature": 95}))
    await h.send(rd("d", 3.0, {"temperature": 30}))
    await h.send(rd("d", 4.0, {"door": 1}, address="devices/d/alarms"))
    await h.send(rd("d", 5.0, {"humidity": 5}, address="devices/d/alarms"))
    got = [(r.ts, r.priority) for r in await h.take()]
    assert got == [(2.0, 1), (4.0, 2), (5.0, 2), (1.0, 0), (3.0, 0)]


async def test_anomaly(harness: MakeHarness) -> None:
    h = await harness(examples()["anomaly"])
    for i, v in enumerate([2.0, 2.1, 1.9, 2.0, 2.1, 2.0, 9.0]):
        await h.send(rd("d", float(i), {"vibration": v}))
    out = [r.metrics for r in await h.take()]
    assert out[:5] == [{"vibration": v} for v in [2.0, 2.1, 1.9, 2.0, 2.1]]
    assert out[5]["anomaly"] is False and out[5]["vibration"] == 2.0
    assert out[6]["anomaly"] is True and out[6]["vibration"] == 9.0
    assert out[6]["anomaly_score"] == abs(out[6]["vibration_z"])


async def test_model(harness: MakeHarness, tmp_path: Path) -> None:
    import asyncio

    import edgeway
    from edgeway.config import ModelsSection
    from edgeway.ml.manager import ModelManager
    from edgeway.ml.store import ModelStore

    shipped = Path(edgeway.__file__).parent / "ml" / "models" / "pump_health.onnx"
    cfg = ModelsSection()
    mgr = ModelManager(ModelStore(tmp_path / "models", max_size=cfg.max_size), cfg)
    await mgr.open()
    try:

        async def chunks():  # type: ignore[no-untyped-def]
            yield shipped.read_bytes()

        await mgr.store.add("pump-health", "1", chunks())
        await mgr.activate("pump-health", "1", by="test")
        h = await harness(examples()["model"], services={"models": mgr})
        reading = {"vibration": 11.0, "bearing_temp": 95.0, "current": 12.0}
        await h.send(rd("pump-1", 5.0, reading))
        await h.send(rd("pump-1", 6.0, {"vibration": 11.0}))  # lacks features: not scored
        got = await h.take()
        async with asyncio.timeout(10):
            while len(got) < 3:
                await asyncio.sleep(0.01)
                got += await h.take()
        # The scored reading comes whenever inference is done (here, maybe
        # before the second reading was sent).
        (scored,) = [r for r in got if "failure_probability" in r.metrics]
        assert [r.metrics for r in got if r is not scored] == [reading, {"vibration": 11.0}]
        assert (scored.device_id, scored.ts) == ("pump-1", 5.0)
        assert scored.metrics["failure_probability"] > 0.99
        assert scored.tags["model"] == "pump-health@1"
    finally:
        await mgr.close()


async def test_rules(harness: MakeHarness, tmp_path: Path) -> None:
    from edgeway.config import parse_config
    from edgeway.rules.stage import RuleStage, stepped_rules
    from edgeway.rules.targets import ActionTargets

    cfg = parse_config(examples()["rules"])
    stage = RuleStage(
        cfg.rules,
        tmp_path / "rules",
        targets=ActionTargets(),
        durability="os",
        stepped=stepped_rules(cfg.rules, cfg.routes),
    )
    await stage.open()
    try:
        h = await harness(examples()["rules"], services={"rules": stage})
        assert await h.send(rd("d1", 5.0, {"celsius": 85.0})) is IngestStatus.ACCEPTED
        assert [r.metrics for r in await h.take()] == [{"celsius": 85.0, "fahrenheit": 185.0}]
        # Acknowledged: the transition is on disk already.
        assert [(t["rule"], t["state"]) for t in await stage.store.transitions()] == [
            ("too-hot", "set")
        ]
        await h.send(rd("d1", 6.0, {"celsius": 20.0}))
        rows = await stage.store.transitions()
        assert [(t["rule"], t["state"], t["seq"]) for t in rows] == [
            ("too-hot", "clear", 2),
            ("too-hot", "set", 1),
        ]
    finally:
        await stage.close()
