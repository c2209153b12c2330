"""Test harness: an in-process broker on a loopback port and a raw MQTT client.

The raw client speaks through the project's codec over asyncio streams, which
lets tests send exactly the packets (and properties) a case needs and see
exactly what the broker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgeway.config import ListenerConfig, MqttSection
from edgeway.devices.auth import AllowAll, Authenticator, Authoriser
from edgeway.ingest import Ingest, IngestStatus, MemoryIngest
from edgeway.reading import Reading
from edgeway.south.mqtt.broker import Broker
from edgeway.south.mqtt.clock import BrokerClock
from edgeway.south.mqtt.codec import MqttReader, encode
from edgeway.south.mqtt.packets import (
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    Will,
)

P = TypeVar("P")
WAIT = 5.0
"""Seconds a test waits for an expected packet before failing."""


@dataclass
class RunningBroker:
    broker: Broker
    port: int
    server: asyncio.Server


@contextlib.asynccontextmanager
async def running_broker(
    data_dir: Path,
    *,
    config: MqttSection | None = None,
    ingest: Ingest | None = None,
    authenticator: Authenticator | None = None,
    authoriser: Authoriser | None = None,
    clock: BrokerClock | None = None,
) -> AsyncIterator[RunningBroker]:
    """Start a broker on 127.0.0.1:0; stop it (and its server) on exit."""
    allow = AllowAll()
    broker = Broker(
        config or MqttSection(),
        ingest=ingest or MemoryIngest(),
        authenticator=authenticator or allow,
        authoriser=authoriser or allow,
        data_dir=data_dir,
        gateway_id="test-gw",
        clock=clock,
    )
    await broker.start()
    listener = ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(broker.protocol_factory(listener), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield RunningBroker(broker, port, server)
    finally:
        server.close()
        await broker.stop()
        await server.wait_closed()


class MemoryTransport(asyncio.Transport):
    """Collects what the broker writes; records close/pause calls."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.paused = False
        self.eof = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default


class HandIngest:
    """An ingest whose futures the test resolves by hand."""

    batchable = True

    def __init__(self) -> None:
        self.submitted: list[tuple[list[Reading], asyncio.Future[IngestStatus]]] = []
        self.saturated = False

    def submit(self, readings: Sequence[Reading]) -> asyncio.Future[IngestStatus]:
        fut: asyncio.Future[IngestStatus] = asyncio.get_running_loop().create_future()
        self.submitted.append((list(readings), fut))
        return fut

    def is_saturated(self) -> bool:
        return self.saturated

    def resolve(self, index: int, status: IngestStatus = IngestStatus.ACCEPTED) -> None:
        self.submitted[index][1].set_result(status)


class RawClient:
    """A minimal MQTT client on the project's codec."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, level: int):
        self.r = reader
        self.w = writer
        self.level = level
        self.decoder = MqttReader(protocol_level=level)
        self.inbox: list[Packet] = []
        self.next_pid = 1

    @classmethod
    async def connect(
        cls,
        port: int,
        client_id: str = "",
        *,
        level: int = 5,
        clean: bool = True,
        keepalive: int = 60,
        properties: Properties | None = None,
        will: Will | None = None,
        username: str | None = None,
        password: bytes | None = None,
        expect_ok: bool = True,
    ) -> tuple[RawClient, ConnAck]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer, level)
        c.send(
            Connect(
                level,
                client_id,
                clean,
                keepalive,
                username,
                password,
                will,
                properties or Properties(),
            )
        )
        ack = await c.expect(ConnAck)
        if expect_ok:
            assert ack.reason_code == 0, ack
        return c, ack

    def send(self, packet: Packet) -> None:
        self.w.write(encode(packet, self.level))

    def send_raw(self, data: bytes) -> None:
        self.w.write(data)

    def pid(self) -> int:
        p = self.next_pid
        self.next_pid += 1
        return p

    async def recv(self, wait: float = WAIT) -> Packet:
        """The next packet; raises TimeoutError, or EOFError when the broker closed."""
        async with asyncio.timeout(wait):
            while not self.inbox:
                data = await self.r.read(65536)
                if not data:
                    raise EOFError("connection closed by broker")
                self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    async def expect(self, kind: type[P], wait: float = WAIT) -> P:
        p = await self.recv(wait)
        assert isinstance(p, kind), f"expected {kind.__name__}, got {p!r}"
        return p

    async def nothing(self, wait: float = 0.3) -> None:
        """Assert that no packet arrives within ``wait`` seconds."""
        with contextlib.suppress(TimeoutError):
            p = await self.recv(wait)
            raise AssertionError(f"unexpected packet {p!r}")

    async def closed(self, wait: float = WAIT) -> list[Packet]:
        """Read until the broker closes the connection; return what came before."""
        got: list[Packet] = []
        async with asyncio.timeout(wait):
            while True:
                try:
                    got.append(await self.recv(wait))
                except EOFError:
                    return got

    async def subscribe(
        self, *subs: Subscription | str, qos: int = 0, properties: Properties | None = None
    ) -> SubAck:
        items = [s if isinstance(s, Subscription) else Subscription(s, qos) for s in subs]
        self.send(Subscribe(self.pid(), items, properties or Properties()))
        return await self.expect(SubAck)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> Any:
        """Publish and complete the QoS flow; returns the PUBACK / PUBCOMP (or None)."""
        pid = self.pid() if qos else None
        self.send(Publish(topic, payload, qos, retain, False, pid, properties or Properties()))
        if qos == 1:
            return await self.expect(PubAck)
        if qos == 2:
            rec = await self.expect(PubRec)
            if rec.reason_code >= 0x80:
                return rec
            self.send(PubRel(rec.packet_id))
            return await self.expect(PubComp)
        return None

    async def receive_publish(self, wait: float = WAIT, ack: bool = True) -> Publish:
        """The next PUBLISH, acknowledged (QoS 1 PUBACK; QoS 2 PUBREC/PUBREL/PUBCOMP)."""
        p = await self.expect(Publish, wait)
        if ack and p.qos == 1:
            assert p.packet_id is not None
            self.send(PubAck(p.packet_id))
        elif ack and p.qos == 2:
            assert p.packet_id is not None
            self.send(PubRec(p.packet_id))
            rel = await self.expect(PubRel, wait)
            self.send(PubComp(rel.packet_id))
        return p

    async def disconnect(self, reason: int = 0, properties: Properties | None = None) -> None:
        self.send(Disconnect(reason, properties or Properties()))
        await self.close()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (an abrupt failure)."""
        transport = self.w.transport
        transport.abort()

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(Exception):
            await self.w.wait_closed()


async def wait_until(predicate: Any, wait: float = WAIT, step: float = 0.02) -> None:
    """Poll broker state that has no event of its own (bounded by ``wait``)."""
    async with asyncio.timeout(wait):
        while not predicate():  # noqa: ASYNC110 - no event exists for this state
            await asyncio.sleep(step)
