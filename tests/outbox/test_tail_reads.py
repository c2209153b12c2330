"""Reads from the in-memory tail: the same batches as the reader threads' queries.

A sink that keeps up reads the chunks just committed from memory, on the
loop (no query, no reader-thread round trip). The differential test runs the
same random sequence of submits (two sinks, priorities, several devices),
reads with random budgets, confirmations and dead letters against two
outboxes, one reading from the tail where it can and one always querying,
under both drain orders, with and without a retention limit and with a tail
small enough to be trimmed often; every batch and every counter must match.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeway.config import OutboxSection
from edgeway.outbox import Outbox
from edgeway.outbox import store as store_mod
from edgeway.reading import Origin, Reading

SINKS = ("a", "b")
ROUTES: tuple[tuple[str, ...] | None, ...] = (None, ("a",), ("b",))


def _reading(device: int, i: int, priority: int) -> Reading:
    # Device 3's readings come keyed (MQTT client mode): their record ids are
    # hashes, so the tail cannot build them from the sequence number.
    origin = Origin("mqtt_client", key="conn-1") if device == 3 else Origin("mqtt")
    return Reading(
        f"dev-{device}", 1_700_000_000.0 + i, {"i": i, "v": i * 0.5}, origin, priority=priority
    )


submit_op = st.tuples(
    st.just("submit"),
    st.integers(0, len(ROUTES) - 1),
    st.integers(1, 40),
    st.sampled_from([0, 0, 0, 0, 3]),
    st.integers(0, 3),
)
read_op = st.tuples(
    st.just("read"),
    st.sampled_from(SINKS),
    st.integers(1, 60),
    st.sampled_from([150, 400, 2000, 1 << 20]),
    st.sampled_from(["confirm", "confirm", "confirm", "dead_letter", "none"]),
)


async def _play(
    path: Path, cfg: dict[str, Any], ops: list[tuple[Any, ...]], tail: bool
) -> tuple[list[Any], dict[str, dict[str, int]], int]:
    ob = Outbox(path, gateway_id="gw", config=OutboxSection(**cfg), sink_names=list(SINKS))
    ob.tail_reads = tail
    await ob.open()
    out: list[Any] = []
    served = 0
    unconfirmed: dict[str, bool] = dict.fromkeys(SINKS, False)
    try:
        n = 0
        for op in ops:
            if op[0] == "submit":
                _, route, count, prio, dev = op
                # Device 1 stands for a read of several devices (0 and 1 by turns).
                readings = [_reading(dev if dev != 1 else k % 2, n + k, prio) for k in range(count)]
                n += count
                out.append(("submit", await ob.submit(readings, ROUTES[route])))
                continue
            _, sink, max_records, max_bytes, then = op
            if unconfirmed[sink]:
                continue  # a runner resends an unconfirmed batch; it never reads past it
            before = ob.commits
            tail_read = ob._read_tail  # count the reads the tail served
            got: list[bool] = []

            def spy(*a: Any, _f: Any = tail_read, _got: list[bool] = got) -> Any:
                b = _f(*a)
                _got.append(b is not None)
                return b

            ob._read_tail = spy  # type: ignore[method-assign]
            b = await ob.read_batch(sink, max_records, max_bytes)
            del ob._read_tail
            served += sum(got)
            # The count that lets a read skip looking for priority chunks.
            assert ob._tail_prio == sum(1 for e in ob._tail if e[4])
            assert ob.commits == before
            out.append(
                (
                    "read",
                    sink,
                    [(r.id, r.seq, r.device_id, r.priority, r.to_json_bytes()) for r in b.records],
                    b.nbytes,
                    b.cursor,
                    b.out_of_order,
                    b.more,
                    sorted(b.chunks),
                )
            )
            if not b.records:
                continue
            if then == "confirm":
                await ob.confirm(b)
            elif then == "dead_letter":
                await ob.dead_letter(b, "refused")
            else:
                unconfirmed[sink] = True
        return out, ob.counters(), served
    finally:
        await ob.close()


@pytest.mark.parametrize(
    "cfg",
    [
        {"durability": "os"},
        {"durability": "os", "drain": "live_first"},
        {"durability": "os", "max_bytes": 6000},
    ],
    ids=["ordered", "live_first", "max_bytes"],
)
@pytest.mark.parametrize("small_tail", [False, True], ids=["tail", "small_tail"])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(st.one_of(submit_op, read_op, read_op), min_size=1, max_size=40))
def test_tail_reads_match_the_query(
    cfg: dict[str, Any],
    small_tail: bool,
    ops: list[tuple[Any, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if small_tail:
        monkeypatch.setattr(store_mod, "TAIL_MAX_CHUNKS", 3)
        monkeypatch.setattr(store_mod, "TAIL_MAX_BYTES", 1500)
    with tempfile.TemporaryDirectory() as d:
        fast = asyncio.run(_play(Path(d) / "tail.db", cfg, ops, True))
        slow = asyncio.run(_play(Path(d) / "query.db", cfg, ops, False))
    assert slow[2] == 0
    assert fast[0] == slow[0]
    assert fast[1] == slow[1]


async def test_a_caught_up_sink_reads_without_the_reader_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual low-rate case: each reading read right after its commit,
    its record built from what the tail knows (id and device id), not
    parsed from its text."""
    ob = Outbox(tmp_path / "o.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    await ob.open()
    try:

        def no_query(*_a: Any) -> Any:
            raise AssertionError("read through a reader thread")

        def no_parse(*_a: Any) -> Any:
            raise AssertionError("records cut out of their texts: the tail knows them")

        ob._read_sync = no_query  # type: ignore[method-assign]
        monkeypatch.setattr(store_mod, "stored_records", no_parse)
        for i in range(50):
            await ob.submit([_reading(i % 3, i, 0)])
            b = await ob.read_batch("a", 100, 1 << 20)
            assert [r.seq for r in b.records] == [i + 1]
            assert not b.more and not b.out_of_order
            await ob.confirm(b)
        assert ob.counters()["a"]["delivered"] == 50
        assert ob.counters()["a"]["pending"] == 0
    finally:
        await ob.close()


async def test_a_read_far_behind_walks_only_the_chunks_it_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink thousands of chunks behind the newest, all in the tail: each
    batch looks at the chunks it takes (and the next), not at every chunk up
    to the newest (that made a large tail cost more than the query)."""
    monkeypatch.setattr(store_mod, "TAIL_MAX_CHUNKS", 100_000)
    ob = Outbox(
        tmp_path / "o.db", gateway_id="gw", config=OutboxSection(durability="os"), sink_names=["a"]
    )
    await ob.open()
    try:
        for i in range(2000):  # a commit each: 2,000 chunks of 2 records
            await ob.submit([_reading(0, 2 * i, 0), _reading(0, 2 * i + 1, 0)])
        assert len(ob._tail) == 2000 and ob._tail_lo == 1

        looked = 0

        class Entry(list):  # type: ignore[type-arg]
            def __getitem__(self, i: Any) -> Any:
                nonlocal looked
                looked += 1
                return super().__getitem__(i)

        ob._tail[:] = [Entry(e) for e in ob._tail]
        seqs: list[int] = []
        for _ in range(5):
            b = await ob.read_batch("a", 10, 1 << 20)
            seqs += [r.seq for r in b.records]
            assert b.more
            await ob.confirm(b)
        assert seqs == list(range(1, 51))
        assert looked < 5 * 6 * 8  # about 6 chunks per batch, a few fields each
    finally:
        await ob.close()


async def test_tail_holds_a_bounded_amount(tmp_path: Path) -> None:
    ob = Outbox(
        tmp_path / "o.db", gateway_id="gw", config=OutboxSection(durability="os"), sink_names=["a"]
    )
    await ob.open()
    try:
        big = {"blob": "x" * 4000}
        for i in range(0, 3000, 100):
            await ob.submit([Reading("d", float(i + k), big) for k in range(100)])
        assert len(ob._tail) <= store_mod.TAIL_MAX_CHUNKS
        assert ob._tail_bytes <= store_mod.TAIL_MAX_BYTES
        assert ob._tail_lo > 1  # the oldest chunks were let go
        # The sink is far behind the tail: it reads from the database, in order.
        b = await ob.read_batch("a", 500, 1 << 30)
        assert [r.seq for r in b.records] == list(range(1, 501))
    finally:
        await ob.close()
