"""The model registry and manager: uploads, signatures, hot swap, shadow,
canary, budgets and automatic rollback, restart (real onnxruntime sessions on
the small models of tests/ml/data, made by tests/ml/make_models.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeway.config import ModelsSection
from edgeway.ml.manager import Job, ModelManager, Outputs, device_bucket
from edgeway.ml.store import ModelError, ModelStore, signed_message

DATA = Path(__file__).parent / "data"


def chunks_of(path: Path, size: int = 64) -> AsyncIterator[bytes]:
    """The file in small chunks, as an upload streams it."""
    return _chunks(path.read_bytes(), size)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def make_manager(root: Path, **cfg: Any) -> ModelManager:
    config = ModelsSection(**cfg)
    keys = {}
    if "keys" in cfg:
        from edgeway.signing import load_public_key

        keys = {k: load_public_key(v) for k, v in cfg["keys"].items()}
    store = ModelStore(
        root / "models",
        max_size=config.max_size,
        keys=keys,
        require_signature=config.require_signature,
    )
    return ModelManager(store, config)


async def upload(mgr: ModelManager, version: str, model: str, **kw: Any) -> None:
    await mgr.store.add("m", version, chunks_of(DATA / f"{model}.onnx"), by="test", **kw)


async def score(
    mgr: ModelManager, devices: list[str], rows: list[list[float]]
) -> list[tuple[str, Outputs | None]]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[list[tuple[str, Outputs | None]]] = loop.create_future()
    assert mgr.submit(Job("m", devices, rows, fut.set_result))
    return await asyncio.wait_for(fut, 10)


@pytest.fixture
async def mgr(tmp_path: Path) -> AsyncIterator[ModelManager]:
    m = make_manager(tmp_path)
    await m.open()
    try:
        yield m
    finally:
        await m.close()


async def test_upload_activate_and_score(mgr: ModelManager) -> None:
    await upload(mgr, "1", "sum")
    await mgr.activate("m", "1", by="test")
    got = await score(mgr, ["a", "b"], [[1, 2, 3], [4, 5, 6]])
    assert got == [("1", {"score": [[6.0]]}), ("1", {"score": [[15.0]]})]
    st = mgr.status()["models"]["m"]
    assert st["active"] == "1" and st["active_stats"]["calls"] == 1


async def test_upload_checks_digest_size_and_name(mgr: ModelManager, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        await upload(mgr, "1", "sum", sha256="00" * 32)
    assert e.value.code == "digest_mismatch"
    good = hashlib.sha256((DATA / "sum.onnx").read_bytes()).hexdigest()
    await upload(mgr, "1", "sum", sha256=good)
    with pytest.raises(ModelError) as e:
        await upload(mgr, "1", "sum")
    assert e.value.code == "exists"
    with pytest.raises(ModelError):
        await mgr.store.add("../evil", "1", chunks_of(DATA / "sum.onnx"))
    small = make_manager(tmp_path / "small", max_size=1024)
    await small.open()
    try:
        with pytest.raises(ModelError) as e:
            await small.store.add("m", "1", chunks_of(DATA / "slow.onnx"))
        assert e.value.code == "too_large"
        assert not list((tmp_path / "small" / "models").glob("m/*"))  # no part left behind
    finally:
        await small.close()


async def test_a_model_that_does_not_load_is_never_active(mgr: ModelManager) -> None:
    async def junk() -> AsyncIterator[bytes]:
        yield b"this is not an onnx model"

    await mgr.store.add("m", "bad", junk())
    await upload(mgr, "1", "sum")
    await mgr.activate("m", "1", by="test")
    with pytest.raises(ModelError) as e:
        await mgr.activate("m", "bad", by="test")
    assert e.value.code == "load_failed"
    assert mgr.status()["models"]["m"]["active"] == "1"
    assert (await score(mgr, ["a"], [[1, 1, 1]]))[0][0] == "1"


async def test_signatures(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate()
    pub = base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()
    mgr = make_manager(tmp_path, keys={"release": pub}, require_signature=True)
    await mgr.open()
    try:
        digest = hashlib.sha256((DATA / "sum.onnx").read_bytes()).digest()
        with pytest.raises(ModelError) as e:
            await upload(mgr, "1", "sum")
        assert e.value.code == "unsigned"
        with pytest.raises(ModelError) as e:
            await upload(mgr, "1", "sum", signature=other.sign(signed_message(digest)))
        assert e.value.code == "bad_signature"
        with pytest.raises(ModelError) as e:  # a signature of the bare digest is not one
            await upload(mgr, "1", "sum", signature=key.sign(digest))
        assert e.value.code == "bad_signature"
        await upload(mgr, "1", "sum", signature=key.sign(signed_message(digest)))
        assert (await mgr.store.get("m", "1")).signed_by == "release"  # type: ignore[union-attr]
    finally:
        await mgr.close()


async def test_hot_swap_loses_nothing(mgr: ModelManager) -> None:
    await upload(mgr, "1", "sum")
    await upload(mgr, "2", "sum_scaled")
    await mgr.activate("m", "1", by="test")
    loop = asyncio.get_running_loop()
    results: list[tuple[str, Outputs | None]] = []
    done = asyncio.Event()
    jobs = 200

    def deliver(r: list[tuple[str, Outputs | None]]) -> None:
        results.extend(r)
        if len(results) == jobs:
            done.set()

    for i in range(jobs):
        assert mgr.submit(Job("m", [f"d{i}"], [[1, 2, 3]], deliver))
        if i == jobs // 2:
            await mgr.activate("m", "2", by="test")
        if i % 20 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 10)
    versions = [v for v, out in results if out is not None]
    assert len(versions) == jobs  # every row scored by one version or the other
    assert versions[-1] == "2" and versions[0] == "1"
    assert loop is asyncio.get_running_loop()
    assert mgr.status()["models"]["m"]["previous"] == "1"


async def test_shadow_candidate_is_compared_never_emitted(mgr: ModelManager) -> None:
    await upload(mgr, "1", "sum")
    await upload(mgr, "2", "sum_scaled")
    await mgr.activate("m", "1", by="test")
    await mgr.set_candidate("m", "2", "shadow", by="test")
    got = await score(mgr, [f"d{i}" for i in range(50)], [[1, 2, 3]] * 50)
    assert {v for v, _ in got} == {"1"}
    shadow = mgr.status()["models"]["m"]["shadow"]
    assert shadow["rows"] == 50
    assert shadow["max_abs_diff"] == pytest.approx(0.06, abs=1e-3)
    assert shadow["agreement"] == 0.0  # 0.06 > models.agree_within 0.05
    await mgr.promote("m", by="test")
    assert {v for v, _ in await score(mgr, ["x"], [[1, 2, 3]])} == {"2"}


async def test_canary_scores_its_share_of_devices(mgr: ModelManager) -> None:
    await upload(mgr, "1", "sum")
    await upload(mgr, "2", "sum_scaled")
    await mgr.activate("m", "1", by="test")
    await mgr.set_candidate("m", "2", "canary", share=0.25, by="test")
    devices = [f"dev-{i}" for i in range(400)]
    got = await score(mgr, devices, [[1, 2, 3]] * 400)
    by_device = {d: v for d, (v, _) in zip(devices, got, strict=True)}
    canary = {d for d, v in by_device.items() if v == "2"}
    assert canary == {d for d in devices if device_bucket(d) < 0.25}
    assert 60 <= len(canary) <= 140
    # The same devices again: a device stays on its side (stable hash).
    again = await score(mgr, devices, [[1, 2, 3]] * 400)
    assert {d for d, (v, _) in zip(devices, again, strict=True) if v == "2"} == canary


async def until(cond: Any, limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not cond():  # noqa: ASYNC110 - no event exists for this state
            await asyncio.sleep(0.01)


async def test_nan_outputs_roll_the_active_version_back(mgr: ModelManager) -> None:
    await upload(mgr, "1", "sum")
    await upload(mgr, "2", "nan")
    await mgr.activate("m", "1", by="test")
    await mgr.activate("m", "2", by="test")
    outs = [await score(mgr, ["a"], [[1, 2, 3]]) for _ in range(25)]
    assert all(o[0][1] is None for o in outs[:5])  # NaN is never emitted
    await until(lambda: mgr.status()["models"]["m"]["active"] == "1")
    assert (await score(mgr, ["a"], [[1, 2, 3]]))[0] == ("1", {"score": [[6.0]]})
    assert (await mgr.store.get("m", "2")).state == "failed"  # type: ignore[union-attr]
    events = [e["what"] for e in await mgr.store.events("m")]
    assert events[0] == "rolled_back"


async def test_a_slow_candidate_is_dropped(tmp_path: Path) -> None:
    # sum takes ~0.01 ms a call, slow ~30 ms: a 10 ms budget is far from both
    # (a loaded machine stalls a 10 us call for milliseconds now and then).
    mgr = make_manager(tmp_path, max_latency="10ms", min_calls=10)
    await mgr.open()
    try:
        await upload(mgr, "1", "sum")
        await upload(mgr, "2", "slow")
        await mgr.activate("m", "1", by="test")
        await mgr.set_candidate("m", "2", "shadow", by="test")
        for _ in range(12):
            await score(mgr, ["a"], [[1, 2, 3]])
        await until(lambda: mgr.status()["models"]["m"]["candidate"] is None)
        st = mgr.status()["models"]["m"]
        assert st["active"] == "1" and st["active_stats"]["out_of_service"] is None
        events = await mgr.store.events("m")
        assert events[0]["what"] == "candidate_failed" and "latency" in events[0]["detail"]
    finally:
        await mgr.close()


async def test_slots_survive_a_restart(tmp_path: Path) -> None:
    mgr = make_manager(tmp_path)
    await mgr.open()
    await upload(mgr, "1", "sum")
    await upload(mgr, "2", "sum_scaled")
    await mgr.activate("m", "1", by="test")
    await mgr.set_candidate("m", "2", "canary", share=0.5, by="test")
    await mgr.close()
    again = make_manager(tmp_path)
    await again.open()
    try:
        st = again.status()["models"]["m"]
        assert (st["active"], st["candidate"], st["mode"], st["share"]) == ("1", "2", "canary", 0.5)
        assert (await score(again, ["a"], [[1, 1, 1]]))[0][1] is not None
    finally:
        await again.close()


async def test_a_full_queue_refuses_and_counts(tmp_path: Path) -> None:
    mgr = make_manager(tmp_path, queue=2)
    await mgr.open()
    try:
        await upload(mgr, "1", "slow")
        await mgr.activate("m", "1", by="test")
        accepted = sum(mgr.submit(Job("m", ["a"], [[1, 2, 3]], lambda r: None)) for _ in range(50))
        assert accepted < 50
        assert mgr.dropped == 50 - accepted
    finally:
        await mgr.close()
