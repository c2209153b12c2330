"""The AMQP sink against the local RabbitMQ (guest/guest), through a TCP proxy for outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

aio_pika = pytest.importorskip("aio_pika")

from edgeway.config import SinkConfig  # noqa: E402
from edgeway.sinks.amqp import AmqpSink  # noqa: E402
from edgeway.sinks.base import Record, RetryableSinkError, create_sink  # noqa: E402

RABBIT = ("127.0.0.1", 5672)
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
TIMEOUT = 10.0
"""Bound for any wait on the local broker."""


def records(n: int, start: int = 0, devices: int = 3) -> list[Record]:
    return [
        Record(
            id=f"gw1:{i}",
            seq=i,
            device_id=f"dev{i % devices}",
            ts=1_700_000_000.0 + i,
            metrics={"temp": 20.0 + i / 10, "ok": True},
        )
        for i in range(start, start + n)
    ]


def make_sink(url: str, **options: Any) -> AmqpSink:
    sink = create_sink(SinkConfig(name="rabbit", url=url, options=options), "gw1")
    assert isinstance(sink, AmqpSink)
    return sink


class Topology:
    """A unique exchange and a queue bound to ``edgeway.#`` on it; deleted afterwards."""

    def __init__(self, channel: Any, exchange: str, queue: Any) -> None:
        self.channel, self.exchange, self.queue = channel, exchange, queue

    async def get_all(self, n: int) -> list[Any]:
        out: list[Any] = []
        async with asyncio.timeout(TIMEOUT):
            while len(out) < n:
                msg = await self.queue.get(no_ack=True, fail=False)
                if msg is None:
                    await asyncio.sleep(0.01)  # basic.get has no push notification
                    continue
                out.append(msg)
        assert await self.queue.get(no_ack=True, fail=False) is None, "extra messages"
        return out


@pytest.fixture
async def topology() -> AsyncIterator[Topology]:
    conn = await aio_pika.connect(RABBIT_URL)
    channel = await conn.channel()
    name = f"t-{uuid.uuid4().hex[:12]}"
    exchange = await channel.declare_exchange(name, "topic", durable=True)
    queue = await channel.declare_queue(name, durable=True)
    await queue.bind(exchange, "edgeway.#")
    try:
        yield Topology(channel, name, queue)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await conn.close()


async def test_every_record_confirmed_and_delivered(topology: Topology) -> None:
    sink = make_sink(RABBIT_URL, exchange=topology.exchange)
    batches = [records(500), records(20, 500)]
    try:
        await sink.start()
        for b in batches:
            await sink.send_batch(b)
    finally:
        await sink.close()
    sent = [r for b in batches for r in b]
    got = await topology.get_all(len(sent))
    for m, r in zip(got, sent, strict=True):
        assert m.routing_key == f"edgeway.gw1.{r.device_id}"
        assert m.message_id == r.id
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert m.content_type == "application/json"
        assert m.headers["gateway_id"] == "gw1"
        assert m.timestamp.timestamp() == int(r.ts)
        assert json.loads(m.body) == r.to_json_obj()


async def test_unroutable_message_fails_the_batch(topology: Topology) -> None:
    sink = make_sink(RABBIT_URL, exchange=topology.exchange, routing_key="nowhere.{device_id}")
    try:
        with pytest.raises(RetryableSinkError, match="not confirmed"):
            await sink.send_batch(records(5))
        assert sink.state.connected  # the broker answered: the connection stays
        # The connection stays usable for the next (routable) attempt.
        sink.options.routing_key = "edgeway.{device_id}"
        sink._keys.clear()
        await sink.send_batch(records(5))
    finally:
        await sink.close()
    assert len(await topology.get_all(5)) == 5


async def test_missing_exchange_without_declare_is_retryable(topology: Topology) -> None:
    sink = make_sink(RABBIT_URL, exchange=f"missing-{uuid.uuid4().hex}", declare_exchange=False)
    try:
        for _ in range(2):  # the channel is closed by the broker; the next call reconnects
            with pytest.raises(RetryableSinkError):
                await sink.send_batch(records(3))
    finally:
        await sink.close()


class Proxy:
    """A TCP proxy to RabbitMQ on a fixed local port that the test can take down and up."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*RABBIT)
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.writers -= {writer, up_writer}


async def test_broker_unreachable_then_back(topology: Topology) -> None:
    proxy = Proxy()
    await proxy.start()
    sink = make_sink(
        f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
        exchange=topology.exchange,
        connect_timeout=3,
    )
    try:
        await sink.send_batch(records(50))
        assert sink.state.connected
        await proxy.stop()
        for _ in range(3):
            with pytest.raises(RetryableSinkError):
                await sink.send_batch(records(50, 50))
        assert not sink.state.connected
        await proxy.start()
        await sink.send_batch(records(50, 50))
        assert sink.state.connected
    finally:
        await sink.close()
        if proxy.server is not None:
            await proxy.stop()
    got = await topology.get_all(100)
    assert [m.message_id for m in got] == [f"gw1:{i}" for i in range(100)]


@pytest.mark.parametrize(
    ("options", "url", "key"),
    [
        ({"colour": "red"}, "amqp://h", "options.colour"),
        ({"routing_key": "x.{nope}"}, "amqp://h", "options.routing_key"),
        ({"exchange_type": "nope"}, "amqp://h", "options.exchange_type"),
        ({"ca": "/x/ca.pem"}, "amqp://h", "options.ca"),
        ({"ca": "/nonexistent/ca.pem"}, "amqps://h", "options.ca"),
        ({}, "amqp://h:99999", "url"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], url: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        AmqpSink(SinkConfig(name="c", url=url, options=options), "gw1")
