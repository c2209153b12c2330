"""A fast MQTT 3.1.1 load generator for broker benchmarks (not a client library).

Used by ``bench/mqtt_broker.py``. It must not be the bottleneck, so:

- several worker processes (``multiprocessing``), each an asyncio loop (uvloop
  when installed) driving many raw TCP connections through ``asyncio.Protocol``;
- packets are encoded once, before the run; sending is slicing a prepared
  buffer;
- QoS 1 publishers keep a window of ``window`` messages in flight per
  connection and refill it from ``data_received``: the acknowledgements are
  counted by length (every PUBACK is 4 bytes), never parsed one by one;
- QoS 0 publishers send batches of ``batch`` PUBLISH followed by a PINGREQ and
  keep ``window`` batches in flight. A broker handles a connection's packets
  in order, so a PINGRESP means the batch before it was processed: this
  measures what the broker took in, not what the kernel buffered;
- subscribers receive one topic with one payload at QoS 0, so every delivered
  PUBLISH has the same length: counting is ``len(data) // packet_length``,
  with the packet-type byte checked at each packet boundary (a C-speed slice).

Each worker publishes its count to a shared array every few milliseconds; the
parent samples it at the start and end of the measurement window.

Example::

    gen = LoadGen([Job("pub1", "127.0.0.1", 1883, conns=50, client_prefix="a",
                       topic="devices/a{n}/telemetry", payload=b'{"t":1}', window=16)])
    gen.start()            # connect everything, wait for CONNACKs
    gen.go()               # start sending
    n0 = gen.total(); time.sleep(5); n1 = gen.total()
    gen.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import multiprocessing.synchronize
import os
import queue
import socket
import struct
import time
import traceback
from dataclasses import dataclass
from typing import Any

# --------------------------------------------------------------------------
# MQTT 3.1.1 packets, hand-encoded

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
CONNACK_OK = b"\x20\x02\x00\x00"
PUBACK_TYPE = 0x40
PINGRESP_TYPE = 0xD0
PUBLISH_QOS0_TYPE = 0x30


def varint(n: int) -> bytes:
    """MQTT remaining length encoding."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect_packet(
    client_id: str,
    keepalive: int = 600,
    clean: bool = True,
    credentials: tuple[str, str] | None = None,
) -> bytes:
    flags = (0x02 if clean else 0) | (0xC0 if credentials else 0)
    body = utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body += utf8(client_id)
    if credentials:
        body += utf8(credentials[0]) + utf8(credentials[1])
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int = 0, pid: int = 0) -> bytes:
    body = utf8(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + varint(len(body)) + body


def subscribe_packet(pid: int, topic_filter: str, qos: int = 0) -> bytes:
    body = struct.pack("!H", pid) + utf8(topic_filter) + bytes([qos])
    return b"\x82" + varint(len(body)) + body


# --------------------------------------------------------------------------
# jobs and workers

PID_CYCLE = 1024
"""Packet ids cycle through 1..PID_CYCLE on a QoS 1 connection. Must exceed
the window (ids in flight must be distinct); small so that the prepared buffer
per connection stays ~100 KB (100 connections: ~10 MB)."""

FLUSH_INTERVAL = 0.01
"""How often a worker publishes its count to the parent (s). Counts lag by at
most this much; over a multi-second window the lag cancels out."""


@dataclass(frozen=True, slots=True)
class Job:
    """What one worker process does.

    ``role``: ``pub0`` (QoS 0 publishers), ``pub1`` (QoS 1 publishers),
    ``sub`` (QoS 0 subscribers to ``topic``), ``idle`` (connect and wait).
    ``topic`` may contain ``{n}``, replaced by a global connection number.
    """

    role: str
    host: str
    port: int
    conns: int
    client_prefix: str
    topic: str = "bench/t"
    payload: bytes = b"x"
    window: int = 16
    """pub1: messages in flight per connection; pub0: batches in flight."""
    batch: int = 100
    """pub0: PUBLISH packets per PINGREQ."""
    first_n: int = 0
    """Number of this job's first connection (for unique client ids/topics)."""
    connect_concurrency: int = 100
    """Connections being set up at once. Above the server's listen backlog
    (asyncio default 100, Mosquitto 100) SYNs are dropped and retried after
    1 s, which would make connect times meaningless."""
    keepalive: int = 600
    limit: int = 0
    """pub1: messages each connection publishes in all (0: no limit). With a
    limit the run is a fixed amount of work (W1 of MEASUREMENTS.md: 100,000
    records as fast as possible), and ``total()`` reaches conns * limit."""
    credentials: dict[int, tuple[str, str]] | None = None
    """User name and password per connection number (None: anonymous)."""
    refill_half: bool = True
    """pub1: refill the window when half of it is acknowledged (fewer, larger
    writes: 0.03 instead of 0.15 load-generator CPU-s per 10k messages, which
    keeps the generator far below the brokers) instead of after every read
    that brought acks. Caveat: against a server that leaves Nagle on
    (Mosquitto's default) a *single* connection stalls on delayed ACKs (356
    msg/s); with 100 connections it made no difference here (Mosquitto 34.8k
    half-refill vs 36.0k per-ack refill vs 32.3k with ``quickack``)."""
    quickack: bool = False
    """Set TCP_QUICKACK after every read, so that our ACKs never wait for the
    delayed-ACK timer (a server that leaves Nagle on would otherwise hold its
    next PUBACKs until that timer fires)."""


class _Shared:
    """Arrays shared with the workers (one slot per job)."""

    def __init__(self, n: int) -> None:
        self.count = mp.RawArray("q", n)
        self.ready = mp.RawArray("q", n)
        self.go = mp.Event()
        self.stop = mp.Event()
        self.errors: mp.Queue[str] = mp.Queue()


class _Conn(asyncio.Protocol):
    """One MQTT connection of a worker; counts into ``worker.count``."""

    def __init__(self, worker: _Worker, n: int) -> None:
        job = worker.job
        self.worker = worker
        self.job = job
        self.role = job.role
        self.client_id = f"{job.client_prefix}-{n}"
        self.credentials = job.credentials.get(n) if job.credentials else None
        self.topic = job.topic.replace("{n}", str(n))
        self.transport: asyncio.Transport | None = None
        self.handshake = bytearray()
        self.need = 4 + (5 if self.role == "sub" else 0)  # CONNACK (+ SUBACK)
        self.ready = asyncio.get_running_loop().create_future()
        self.partial = 0  # bytes of an unfinished packet at the end of the stream
        self.closing = False
        self.quickack: socket.socket | None = None
        if self.role == "pub1":
            one = publish_packet(self.topic, job.payload, 1, 1)
            self.plen = len(one)
            self.buf = b"".join(
                publish_packet(self.topic, job.payload, 1, (i % PID_CYCLE) + 1)
                for i in range(2 * PID_CYCLE)
            )
            self.pos = 0
            self.outstanding = 0
            self.left = job.limit if job.limit > 0 else -1  # -1: no limit
            self.refill_at = job.window // 2 if job.refill_half else job.window - 1
            self.unit = 4  # PUBACK
            self.type_byte = PUBACK_TYPE
        elif self.role == "pub0":
            self.chunk = publish_packet(self.topic, job.payload, 0) * job.batch + PINGREQ
            self.unit = 2  # PINGRESP
            self.type_byte = PINGRESP_TYPE
        elif self.role == "sub":
            self.unit = len(publish_packet(self.topic, job.payload, 0))
            self.type_byte = PUBLISH_QOS0_TYPE

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: Any = transport  # uvloop's transport is not an asyncio.Transport subclass
        self.transport = tr
        sock = tr.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.quickack = sock if self.job.quickack and sock is not None else None
        tr.write(connect_packet(self.client_id, self.job.keepalive, credentials=self.credentials))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.client_id}: closed during setup"))
        elif not self.closing and not self.worker.stopping:
            self.worker.error(f"{self.client_id}: connection lost ({exc})")

    def data_received(self, data: bytes) -> None:
        if self.quickack is not None:
            self.quickack.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if self.need:
            self.handshake += data
            if len(self.handshake) < self.need:
                return
            head = bytes(self.handshake[: self.need])
            data = bytes(self.handshake[self.need :])
            self.need = 0
            self.handshake = bytearray()
            if head[:4] != CONNACK_OK:
                self.ready.set_exception(ConnectionError(f"{self.client_id}: CONNACK {head.hex()}"))
                return
            if self.role == "sub" and (head[4] != 0x90 or head[8] >= 0x80):
                self.ready.set_exception(
                    ConnectionError(f"{self.client_id}: SUBACK {head[4:].hex()}")
                )
                return
            self.ready.set_result(None)
            if not data:
                return
        if self.role == "idle":
            self.worker.error(f"{self.client_id}: unexpected data {data[:16].hex()}")
            return
        unit = self.unit
        first = (unit - self.partial) % unit  # offset of the first packet boundary
        total = self.partial + len(data)
        n = total // unit
        self.partial = total % unit
        boundaries = data[first::unit]
        if boundaries.strip(bytes([self.type_byte])):
            self.worker.error(
                f"{self.client_id}: unexpected packet in stream (role {self.role}): "
                f"{data[first : first + 16].hex()}"
            )
            return
        if self.role == "pub1":
            self.worker.count += n
            self.outstanding -= n
            # Refill at half the window, not on every ack: fewer, larger
            # writes on both sides (a client with a send window does the same).
            if self.outstanding <= self.refill_at and self.left != 0:
                more = self.job.window - self.outstanding
                if self.left > 0:
                    more = min(more, self.left)
                self.outstanding += more
                self.send_pub1(more)
        elif self.role == "pub0":
            self.worker.count += n * self.job.batch
            self.send_pub0(n)
        else:
            self.worker.count += n

    # sending
    def start_subscription(self) -> None:
        assert self.transport is not None
        self.transport.write(subscribe_packet(1, self.topic, 0))

    def send_pub1(self, n: int) -> None:
        if self.worker.stopping or self.transport is None:
            return
        if self.left >= 0:
            n = min(n, self.left)
            self.left -= n
        while n > 0:
            k = min(n, PID_CYCLE)
            start = self.pos * self.plen
            self.transport.write(self.buf[start : start + k * self.plen])
            self.pos = (self.pos + k) % PID_CYCLE
            n -= k

    def send_pub0(self, n: int) -> None:
        if self.worker.stopping or self.transport is None:
            return
        self.transport.write(self.chunk * n)

    def begin(self) -> None:
        if self.role == "pub1":
            first = self.job.window if self.left < 0 else min(self.job.window, self.left)
            self.outstanding = first
            self.send_pub1(first)
        elif self.role == "pub0":
            self.send_pub0(self.job.window)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(DISCONNECT)
            self.transport.close()


class _Worker:
    def __init__(self, job: Job, slot: int, shared: _Shared) -> None:
        self.job = job
        self.slot = slot
        self.shared = shared
        self.count = 0
        self.stopping = False
        self.failed = False

    def error(self, message: str) -> None:
        if not self.failed:
            self.failed = True
            self.shared.errors.put(f"job {self.slot} ({self.job.role}): {message}")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        job = self.job
        sem = asyncio.Semaphore(job.connect_concurrency)
        conns: list[_Conn] = []

        async def open_one(n: int) -> None:
            async with sem:
                _, proto = await loop.create_connection(lambda: _Conn(self, n), job.host, job.port)
                assert isinstance(proto, _Conn)
                conns.append(proto)
                if job.role == "sub":
                    # SUBSCRIBE after CONNACK arrives; need covers both acks.
                    proto.start_subscription()
                await proto.ready
                self.shared.ready[self.slot] += 1

        try:
            await asyncio.gather(*(open_one(job.first_n + i) for i in range(job.conns)))
        except Exception as e:
            self.error(f"setup failed: {e!r}")
            for c in conns:
                c.close()
            return

        async def flush() -> None:
            while True:
                self.shared.count[self.slot] = self.count
                await asyncio.sleep(FLUSH_INTERVAL)

        flusher = asyncio.ensure_future(flush())
        await loop.run_in_executor(None, self.shared.go.wait)
        for c in conns:
            c.begin()
        await loop.run_in_executor(None, self.shared.stop.wait)
        self.stopping = True
        flusher.cancel()
        self.shared.count[self.slot] = self.count
        for c in conns:
            c.close()
        await asyncio.sleep(0.05)  # let the DISCONNECTs go out


def _worker_main(job: Job, slot: int, shared: _Shared) -> None:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(_Worker(job, slot, shared).run())
    except Exception:
        shared.errors.put(f"job {slot}: {traceback.format_exc()}")


class LoadGenError(RuntimeError):
    """A worker reported a failure (refused connection, unexpected packet, ...)."""


class LoadGen:
    """Runs a list of :class:`Job` in one process each."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.shared = _Shared(len(jobs))
        self.procs: list[mp.Process] = []

    def start(self, timeout: float = 60.0) -> float:
        """Start the workers and wait until every connection is set up.
        Returns the seconds that took."""
        t0 = time.monotonic()
        for slot, job in enumerate(self.jobs):
            p = mp.Process(target=_worker_main, args=(job, slot, self.shared), daemon=True)
            p.start()
            self.procs.append(p)
        want = sum(j.conns for j in self.jobs)
        deadline = t0 + timeout
        while sum(self.shared.ready) < want:
            self.check()
            if time.monotonic() > deadline:
                raise LoadGenError(f"only {sum(self.shared.ready)} of {want} connections set up")
            time.sleep(0.01)
        return time.monotonic() - t0

    def go(self) -> None:
        self.shared.go.set()

    def total(self, roles: tuple[str, ...] | None = None) -> int:
        """Sum of the workers' counts (optionally only of some roles)."""
        return sum(
            self.shared.count[i]
            for i, j in enumerate(self.jobs)
            if roles is None or j.role in roles
        )

    def check(self) -> None:
        """Raise if a worker reported an error."""
        try:
            msg = self.shared.errors.get_nowait()
        except queue.Empty:
            return
        raise LoadGenError(msg)

    def stop(self) -> None:
        self.shared.go.set()
        self.shared.stop.set()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


def split(total: int, parts: int) -> list[int]:
    """``total`` connections over ``parts`` workers, as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


if __name__ == "__main__":  # a quick self-check against a broker: loadgen.py HOST PORT
    import sys

    host, port = sys.argv[1], int(sys.argv[2])
    procs = int(os.environ.get("PROCS", "2"))
    jobs = [
        Job(
            "pub1",
            host,
            port,
            conns=c,
            client_prefix=f"lg{i}",
            topic="bench/{n}",
            payload=b"x" * 32,
            first_n=i * 1000,
        )
        for i, c in enumerate(split(100, procs))
    ]
    gen = LoadGen(jobs)
    print("setup", gen.start())
    gen.go()
    time.sleep(1)
    a = gen.total()
    time.sleep(5)
    b = gen.total()
    gen.check()
    gen.stop()
    print(f"{(b - a) / 5:.0f} QoS 1 msg/s")
