"""The CoAP listener's bounded duplicate detection (edgeway.south.coap_dedup):
the cache alone, then raw datagrams and aiocoap's client against the listener."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiocoap")

from aiocoap import Code, Message
from coap_devices import (
    aiocoap_client,  # noqa: F401  (the client fixture)
    device_gateway,
)
from ingest_doubles import RecordingIngest, wait_until
from test_coap import coap_server, url

from coap_datagrams import con_post, parse
from edgeway.ingest import IngestStatus
from edgeway.runtime.component import metric_samples
from edgeway.south.coap_dedup import ADDRESS_BYTES, ENTRY_BYTES, DuplicateCache, Seen

V4 = "::ffff:10.0.0.1"


def cache(**caps: int) -> DuplicateCache:
    limits = {"max_entries": 1000, "max_bytes": 1 << 20, "max_per_address": 1000} | caps
    return DuplicateCache(lifetime=247.0, **limits)


# ---------------------------------------------------------------- the cache alone


def test_a_duplicate_gets_the_answer_once_there_is_one() -> None:
    c = cache()
    assert c.arrived(V4, 5000, 7, 0.0) is Seen.NEW
    assert c.arrived(V4, 5000, 7, 1.0) is Seen.PENDING  # being processed: dropped
    c.answered(V4, 5000, 7, b"\x62\x44\x00\x07ab")
    assert c.arrived(V4, 5000, 7, 2.0) == b"\x62\x44\x00\x07ab"
    c.answered(V4, 5000, 7, b"other")  # the first answer stays
    assert c.arrived(V4, 5000, 7, 3.0) == b"\x62\x44\x00\x07ab"
    # another port, another message id, another address: new requests
    assert c.arrived(V4, 5001, 7, 3.0) is Seen.NEW
    assert c.arrived(V4, 5000, 8, 3.0) is Seen.NEW
    assert c.arrived("::ffff:10.0.0.2", 5000, 7, 3.0) is Seen.NEW
    assert c.stats().duplicates == 3
    c.answered(V4, 6000, 1, b"never asked")  # not remembered: ignored
    assert len(c) == 4


def test_entries_expire_after_their_lifetime_without_counting_as_evicted() -> None:
    c = cache()
    c.arrived(V4, 1, 1, 0.0)
    c.arrived(V4, 1, 2, 100.0)
    assert c.arrived(V4, 1, 1, 246.9) is Seen.PENDING
    assert c.arrived(V4, 1, 1, 247.0) is Seen.NEW  # expired, so new (and remembered again)
    assert len(c) == 2  # mid 2 (100 s) and mid 1 again
    assert c.arrived(V4, 1, 2, 347.0) is Seen.NEW
    assert c.stats().evicted == {"entries": 0, "bytes": 0, "per_address": 0}


def test_not_remembered_on_request() -> None:
    c = cache()
    assert c.arrived(V4, 1, 1, 0.0, remember=False) is Seen.NEW
    assert c.arrived(V4, 1, 1, 0.0, remember=False) is Seen.NEW
    assert len(c) == 0 and c.bytes == 0


def test_the_entry_cap_forgets_the_oldest() -> None:
    c = cache(max_entries=3)
    for mid in range(5):
        c.arrived(V4, 1, mid, float(mid))
    assert len(c) == 3
    assert c.stats().evicted["entries"] == 2
    assert c.arrived(V4, 1, 4, 9.0) is Seen.PENDING  # the newest are kept
    assert c.arrived(V4, 1, 0, 9.0) is Seen.NEW  # forgotten early: a new request


def test_the_byte_cap_counts_entries_answers_and_senders() -> None:
    answer = b"x" * 1000
    c = cache(max_bytes=10 * 1024)
    sent = 0
    for mid in range(40):
        c.arrived(V4, 1, mid, 0.0)
        c.answered(V4, 1, mid, answer)
        sent += 1
        assert c.bytes <= 10 * 1024
    per_entry = ENTRY_BYTES + len(answer) + 33  # a bytes object's header
    assert len(c) == (10 * 1024 - ADDRESS_BYTES) // per_entry
    assert c.stats().evicted["bytes"] == sent - len(c)
    assert c.bytes == ADDRESS_BYTES + len(c) * per_entry


def test_one_sender_at_its_share_forgets_its_own_oldest_not_others() -> None:
    c = cache(max_per_address=10, max_entries=1000)
    c.arrived("::ffff:10.0.0.9", 1, 1, 0.0)
    for mid in range(500):
        c.arrived(V4, 2000 + mid, mid, 1.0)  # one address, many ports
    assert c.arrived("::ffff:10.0.0.9", 1, 1, 2.0) is Seen.PENDING
    assert len(c) == 11
    assert c.stats().evicted == {"entries": 0, "bytes": 0, "per_address": 490}
    # the address's newest are the ones kept
    assert c.arrived(V4, 2499, 499, 2.0) is Seen.PENDING
    assert c.arrived(V4, 2000, 0, 2.0) is Seen.NEW


def test_an_ipv6_sender_is_its_64() -> None:
    c = cache(max_per_address=4)
    for i in range(20):
        c.arrived(f"2001:db8:1:2::{i + 1:x}", 5683, i, 0.0)  # one /64, many addresses
    c.arrived("2001:db8:1:3::1", 5683, 1, 0.0)  # another /64
    assert len(c) == 5
    assert c.stats().evicted["per_address"] == 16
    assert c.arrived("2001:db8:1:3::1", 5683, 1, 1.0) is Seen.PENDING
    # link-local addresses with a scope, and text that is no address, are keys too
    assert c.arrived("fe80::1%eth0", 1, 1, 1.0) is Seen.NEW
    assert c.arrived("fe80::1%eth0", 1, 1, 1.0) is Seen.PENDING
    assert c.arrived("not-an-address", 1, 1, 1.0) is Seen.NEW


@pytest.mark.parametrize("senders", [1, 20_000])
def test_the_accounting_is_not_below_what_is_allocated(senders: int) -> None:
    n = 20_000
    hosts = [f"::ffff:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(senders)]
    answers = [bytes(12) for _ in range(n)]  # a piggybacked 2.04 with a 8-byte token
    c = DuplicateCache(lifetime=247.0, max_entries=n, max_bytes=1 << 30, max_per_address=n)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            host = hosts[i % senders]
            c.arrived(host, 1024 + i % 60000, i & 0xFFFF, 0.0)
            c.answered(host, 1024 + i % 60000, i & 0xFFFF, answers[i])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The answers were allocated before: what they hold is added by hand.
    held += sum(33 + len(a) for a in answers)
    assert held <= c.bytes, (held, c.bytes)
    assert c.bytes <= 1.6 * held  # and not wildly above it either


# ---------------------------------------------------------------- against the listener


@contextlib.contextmanager
def udp_clients(n: int, host: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """``n`` non-blocking UDP sockets (``n`` source ports) on ``host``."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((host, 0))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


async def exchange(s: socket.socket, port: int, datagram: bytes, within: float = 10.0) -> bytes:
    """Send ``datagram`` to the listener and return the answer."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(s, datagram, ("127.0.0.1", port))
    async with asyncio.timeout(within):
        return await loop.sock_recv(s, 2048)


class CountingIngest:
    """Accepts every batch and keeps only how many readings came (no memory per reading)."""

    batchable = True

    def __init__(self) -> None:
        self.readings = 0

    def submit(self, readings: Any) -> asyncio.Future[IngestStatus]:
        self.readings += len(readings)
        fut: asyncio.Future[IngestStatus] = asyncio.get_running_loop().create_future()
        fut.set_result(IngestStatus.ACCEPTED)
        return fut

    def is_saturated(self) -> bool:
        return False


async def test_a_retransmitted_request_gets_the_same_answer_and_is_not_processed_twice() -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest) as adapter:
        assert adapter.port is not None
        with udp_clients(1) as (s,):
            request = con_post(0x4242, "twice", b'{"v": 1}')
            first = await exchange(s, adapter.port, request)
            again = await exchange(s, adapter.port, request)
            # A new message id is a new request.
            other = await exchange(s, adapter.port, con_post(0x4243, "twice", b'{"v": 2}'))
        assert again == first
        mtype, code, mid, _, _ = parse(first)
        assert (mtype, code, mid) == (2, Code.CHANGED, 0x4242)  # a piggybacked 2.04
        assert parse(other)[1:3] == (Code.CHANGED, 0x4243)
        assert [r.metrics for r in ingest.readings] == [{"v": 1}, {"v": 2}]
        assert adapter.responses["2.04"] == 2
        stats = adapter.stats().duplicate_cache
        assert stats is not None and stats.duplicates == 1 and stats.entries == 2


async def test_a_retransmission_reaches_the_sink_once(tmp_path: Path) -> None:
    """Through a whole gateway: the retransmitted POST is answered, and the
    file sink gets one record."""
    config = f"""
gateway: {{id: gw-dedup, data_dir: "{{data}}"}}
mqtt: {{enabled: false}}
coap: {{listen: "127.0.0.1:0", probe_interval: 0}}
sinks:
  - {{name: files, url: "file://{tmp_path / "out"}"}}
"""
    async with device_gateway(tmp_path, (), config) as env:
        port = env.adapter.port
        assert port is not None and env.gw.outbox is not None
        outbox = env.gw.outbox
        with udp_clients(1) as (s,):
            request = con_post(0x0101, "once", b'{"v": 1}')
            first = await exchange(s, port, request)
            await wait_until(lambda: outbox.counters()["files"]["delivered"] == 1)
            assert await exchange(s, port, request) == first
            # A marker behind the duplicate: once it is delivered, so would the duplicate be.
            await exchange(s, port, con_post(0x0102, "marker", b'{"v": 2}'))
            await wait_until(lambda: outbox.counters()["files"]["delivered"] == 2)
        counts = outbox.counters()["files"]
        assert (counts["accepted"], counts["delivered"]) == (2, 2)
        assert parse(first)[1] == Code.CHANGED


async def test_a_retransmission_while_the_answer_is_pending_is_dropped() -> None:
    ingest = RecordingIngest(auto=False)
    async with coap_server(ingest) as adapter:
        assert adapter.port is not None
        loop = asyncio.get_running_loop()
        with udp_clients(1) as (s,):
            request = con_post(7, "slow", b'{"v": 1}')
            await loop.sock_sendto(s, request, ("127.0.0.1", adapter.port))
            await ingest.wait_pending(1)
            await loop.sock_sendto(s, request, ("127.0.0.1", adapter.port))
            await wait_until(lambda: adapter.duplicates.duplicates == 1)
            ingest.pending[0].set_result(IngestStatus.ACCEPTED)
            answers = []
            async with asyncio.timeout(10):
                while not any(parse(a)[1] == Code.CHANGED for a in answers):
                    answers.append(await loop.sock_recv(s, 2048))
        assert len(ingest.batches) == 1


async def test_a_retransmission_after_its_entry_was_forgotten_is_a_new_request() -> None:
    ingest = CountingIngest()
    async with coap_server(ingest, dedup_max_entries=50) as adapter:
        assert adapter.port is not None
        with udp_clients(1) as (s,):
            early = con_post(1, "d", b'{"v": 1}')
            await exchange(s, adapter.port, early)
            for mid in range(2, 62):
                await exchange(s, adapter.port, con_post(mid, "d", b'{"v": 1}'))
            assert ingest.readings == 61
            answer = await exchange(s, adapter.port, early)
        assert parse(answer)[1:3] == (Code.CHANGED, 1)
        assert ingest.readings == 62  # at least once: processed again
        stats = adapter.stats().duplicate_cache
        assert stats is not None and stats.evicted["entries"] == 12 and stats.entries == 50
        metrics = {
            (m.spec.name, m.labels): m.value for m in metric_samples(adapter.stats(), (("a", "c"),))
        }
        assert metrics["coap_duplicate_cache_evictions", (("a", "c"), ("cap", "entries"))] == 12
        assert metrics["coap_duplicate_cache_entries", (("a", "c"),)] == 50


async def test_one_flooding_address_does_not_push_out_another_addresses_requests() -> None:
    ingest = CountingIngest()
    async with coap_server(ingest, dedup_max_entries=300, dedup_max_per_address=100) as adapter:
        assert adapter.port is not None
        with udp_clients(1, "127.0.0.2") as (quiet,), udp_clients(20) as flood:
            request = con_post(9, "quiet", b'{"v": 1}')
            first = await exchange(quiet, adapter.port, request)
            for mid in range(25):
                for s in flood:
                    await exchange(s, adapter.port, con_post(mid, "noisy", b'{"v": 1}'))
            assert await exchange(quiet, adapter.port, request) == first
        assert ingest.readings == 1 + 500
        stats = adapter.stats().duplicate_cache
        assert stats is not None and stats.evicted["per_address"] == 400
        assert stats.evicted["entries"] == 0


async def flood(port: int, socks: list[socket.socket], rounds: int, first_mid: int = 0) -> int:
    """One confirmable POST per socket per round, each round's answers read
    before the next (so no socket buffer overflows); returns the 2.04s."""
    loop = asyncio.get_running_loop()
    changed = 0
    for r in range(rounds):
        mid = (first_mid + r) & 0xFFFF
        for s in socks:
            await loop.sock_sendto(s, con_post(mid, "flood", b'{"v": 1}'), ("127.0.0.1", port))
        async with asyncio.timeout(30):
            for s in socks:
                changed += parse(await loop.sock_recv(s, 2048))[1] == Code.CHANGED
    return changed


async def test_a_flood_of_confirmable_requests_keeps_memory_within_the_cap(client: Any) -> None:
    """20,000 confirmable requests from 100 source ports: aiocoap kept about
    2.7 KB per request for 247 s (54 MB here); the cache holds its 1 MiB."""
    ingest = CountingIngest()
    cap = 1 << 20
    async with coap_server(
        ingest, dedup_max_bytes=cap, dedup_max_entries=100_000, dedup_max_per_address=100_000
    ) as adapter:
        assert adapter.port is not None
        with udp_clients(100) as socks:
            await flood(adapter.port, socks, 5)  # warm up: first allocations of every kind
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                # The listener serves a well-behaved client during the flood...
                served = asyncio.ensure_future(
                    client.request(
                        Message(
                            code=Code.POST,
                            uri=url(adapter, "devices/good/telemetry"),
                            payload=b'{"v": 2}',
                        )
                    ).response
                )
                changed = await flood(adapter.port, socks, 200, first_mid=5)
                async with asyncio.timeout(30):
                    assert (await served).code == Code.CHANGED
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
        assert changed == 20_000
        stats = adapter.stats().duplicate_cache
        assert stats is not None
        assert stats.bytes <= cap
        assert stats.evicted["bytes"] > 10_000
        assert grown < cap + 1.5 * (1 << 20), grown
        # ... and after it.
        r = await client.request(
            Message(code=Code.POST, uri=url(adapter, "devices/good/telemetry"), payload=b'{"v": 3}')
        ).response
        assert r.code == Code.CHANGED
    assert ingest.readings == 500 + 20_000 + 2  # the flood and the good client twice
