"""The twin store: versions, conditional patches, concurrency, durability."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeway.reading import Reading
from edgeway.twins.model import TwinError, TwinLimits
from edgeway.twins.service import TwinService


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[TwinService]:
    s = TwinService(tmp_path, TwinLimits(max_bytes=2048, max_depth=4))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_patches_bump_versions_and_survive_a_restart(tmp_path: Path) -> None:
    emitted: list[Reading] = []
    s = TwinService(tmp_path, TwinLimits(), emit=emitted.extend)
    await s.open()
    t = await s.patch("pump-1", "desired", {"setpoint": 42, "mode": "auto"}, by="test")
    assert (t.desired_version, t.reported_version) == (1, 0)
    t = await s.patch("pump-1", "reported", {"setpoint": 40}, by="test")
    t = await s.patch("pump-1", "desired", {"mode": None}, by="test")
    assert t.desired == {"setpoint": 42} and t.desired_version == 2
    assert t.delta == {"setpoint": 42}
    assert set(t.desired_ts) == {"setpoint", "mode"}
    await s.close()
    again = TwinService(tmp_path, TwinLimits())
    await again.open()
    try:
        t2 = await again.get("pump-1")
        assert t2.to_json() == t.to_json()
        assert (await again.get("nobody")).desired_version == 0
    finally:
        await again.close()
    # Each change went up as a record.
    assert [(r.metrics["section"], r.metrics["version"]) for r in emitted] == [
        ("desired", 1),
        ("reported", 1),
        ("desired", 2),
    ]
    assert all(r.tags["record_type"] == "twin" and r.priority == 1 for r in emitted)


async def test_if_match_refuses_a_stale_writer(svc: TwinService) -> None:
    await svc.patch("d", "desired", {"a": 1}, by="t")
    await svc.patch("d", "desired", {"a": 2}, if_match=1, by="t")
    with pytest.raises(TwinError) as e:
        await svc.patch("d", "desired", {"a": 3}, if_match=1, by="t")
    assert e.value.code == "conflict" and e.value.extra == {"version": 2}
    assert (await svc.get("d")).desired == {"a": 2}


async def test_concurrent_patches_are_all_applied(svc: TwinService) -> None:
    twins = await asyncio.gather(
        *(svc.patch("d", "reported", {f"k{i}": i}, by="t") for i in range(200))
    )
    assert sorted(t.reported_version for t in twins) == list(range(1, 201))
    final = await svc.get("d")
    assert final.reported == {f"k{i}": i for i in range(200)}


async def test_limits_refuse_and_change_nothing(svc: TwinService) -> None:
    await svc.patch("d", "desired", {"a": 1}, by="t")
    with pytest.raises(TwinError) as e:
        await svc.patch("d", "desired", {"big": "x" * 3000}, by="t")
    assert e.value.code == "too_large"
    with pytest.raises(TwinError) as e:
        await svc.patch("d", "desired", {"a": {"b": {"c": {"d": {"e": 1}}}}}, by="t")
    assert e.value.code == "too_deep"
    t = await svc.get("d")
    assert (t.desired, t.desired_version) == ({"a": 1}, 1)
    assert svc.refused == 2


async def test_wait_change_wakes_on_a_patch(svc: TwinService) -> None:
    waiter = asyncio.create_task(svc.wait_change("d", (0, 0), 5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await svc.patch("d", "desired", {"a": 1}, by="t")
    t = await asyncio.wait_for(waiter, 2)
    assert t.desired_version == 1
    # Nothing changes: the wait ends at its time with the same twin.
    t = await svc.wait_change("d", (1, 0), 0.1)
    assert t.desired_version == 1
