"""The age of each sink's oldest unconfirmed reading (``/api/status``,
``edgeway_outbox_oldest_pending_age_seconds{sink}``, the HMI's overview)."""

from __future__ import annotations

from pathlib import Path

from edgeway.config import OutboxSection
from edgeway.outbox import Outbox
from edgeway.reading import Origin, Reading
from edgeway.runtime.component import metric_samples


def reading(i: int) -> Reading:
    return Reading("d1", 1_700_000_000.0 + i, {"i": i}, origin=Origin("test"))


def outbox(path: Path, mono: list[float], sinks: list[str]) -> Outbox:
    """An outbox whose age clock the test moves (``mono[0]``)."""
    return Outbox(
        path / "outbox.db",
        gateway_id="gw",
        config=OutboxSection(),
        sink_names=sinks,
        monotonic_clock=lambda: mono[0],
    )


async def test_oldest_pending_age_follows_confirmations_per_sink(tmp_path: Path) -> None:
    mono = [100.0]
    ob = outbox(tmp_path, mono, ["a", "b"])
    await ob.open()
    try:
        assert ob.oldest_pending_ages() == {"a": 0.0, "b": 0.0}
        await ob.submit([reading(1), reading(2)], ["a"])  # stored at t=100
        mono[0] += 30
        await ob.submit([reading(3)])  # both sinks, stored at t=130
        mono[0] += 10
        assert ob.oldest_pending_ages() == {"a": 40.0, "b": 10.0}
        batch = await ob.read_batch("a", 2, 1 << 20)  # records 1 and 2
        await ob.confirm(batch)
        assert ob.oldest_pending_ages() == {"a": 10.0, "b": 10.0}
        mono[0] += 5
        assert ob.status()["a"]["oldest_pending_s"] == 15.0
        samples = {
            dict(s.labels)["sink"]: s.value
            for s in metric_samples(ob.stats())
            if s.spec.name == "outbox_oldest_pending_age_seconds"
        }
        assert samples == {"a": 15.0, "b": 15.0}
        for sink in ("a", "b"):
            while (batch := await ob.read_batch(sink, 100, 1 << 20)).records:
                await ob.confirm(batch)
        assert ob.oldest_pending_ages() == {"a": 0.0, "b": 0.0}
    finally:
        await ob.close()


async def test_oldest_pending_is_found_again_at_open(tmp_path: Path) -> None:
    mono = [100.0]
    ob = outbox(tmp_path, mono, ["a"])
    await ob.open()
    await ob.submit([reading(i) for i in range(600)])  # three chunks of at most 256
    batch = await ob.read_batch("a", 300, 1 << 30)
    await ob.confirm(batch)  # the cursor is inside the second chunk
    await ob.close()
    again = outbox(tmp_path, mono, ["a"])
    await again.open()
    try:
        assert again.status()["a"]["pending"] == 300
        # Stored in this run's first second; the clock resumes where it stopped.
        assert 0.0 <= again.oldest_pending_ages()["a"] < 5.0
        assert again._oldest["a"] is not None
    finally:
        await again.close()
