"""Records/s per sink, batches of 500, against the servers on this machine.

Usage::

    .venv/bin/python bench/sinks_bench.py [--seconds 3] [--only mqtt,nats,amqp,postgres]

Each sink sends the same batch of 500 records (3 fields each, 50 devices) in
a loop for ``--seconds`` after one warm-up batch; every ``send_batch`` waits
for the remote side's confirmation (PUBACK, JetStream ack, publisher confirm,
committed INSERT), so the rate is of confirmed records. ``cpu/1k`` is this
process's CPU seconds per 1,000 records (the server's CPU is not included).

MQTT runs against a Mosquitto started here on a free port, with
``set_tcp_nodelay true`` and, in the two "defaults" rows, without (Nagle on,
as Mosquitto ships: the sink's prompt ACKs are what keeps those fast). NATS uses a fresh stream on the local nats-server, AMQP a fresh
exchange and durable queue on the local RabbitMQ, PostgreSQL a fresh table in
database ``test``; all are deleted afterwards. Nothing consumes the messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from edgeway.config import SinkConfig
from edgeway.sinks.base import Record, Sink, create_sink

BATCH = 500


def batch(start: int) -> list[Record]:
    """Records as the outbox hands them to a sink: with their stored JSON text."""
    out = []
    for i in range(start, start + BATCH):
        r = Record(
            id=f"bench:{i}",
            seq=i,
            device_id=f"dev{i % 50}",
            ts=time.time(),
            metrics={"temp": 21.5, "humidity": 40 + i % 7, "ok": True},
        )
        r.json = orjson.dumps(r.to_json_obj())
        out.append(r)
    return out


async def measure(sink: Sink, seconds: float) -> tuple[float, float]:
    """(records/s, CPU-seconds per 1,000 records) of confirmed batches.

    Only ``send_batch`` is timed: building the next batch is not the sink's
    work (the outbox hands records over with their JSON text already made)."""
    seq = 0
    await sink.send_batch(batch(seq))
    n = 0
    dt = cpu = 0.0
    while dt < seconds:
        seq += BATCH
        b = batch(seq)
        t0, c0 = time.perf_counter(), time.process_time()
        await sink.send_batch(b)
        dt += time.perf_counter() - t0
        cpu += time.process_time() - c0
        n += BATCH
    return n / dt, 1000 * cpu / n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def mosquitto(extra: str = "", nodelay: bool = True) -> Any:
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "m.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\n"
            f"set_tcp_nodelay {'true' if nodelay else 'false'}\nuser root\n{extra}\n"
        )
        proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


async def run_sink(url: str, options: dict[str, Any], seconds: float) -> tuple[float, float]:
    sink = create_sink(SinkConfig(name="bench", url=url, options=options), "gw")
    await sink.start()
    try:
        return await measure(sink, seconds)
    finally:
        await sink.close()


@contextlib.asynccontextmanager
async def nats_stream() -> AsyncIterator[str]:
    import nats

    name = f"BENCH{uuid.uuid4().hex[:8]}"
    nc = await nats.connect("nats://127.0.0.1:4222")
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(name)
        await nc.close()


@contextlib.asynccontextmanager
async def rabbit_exchange() -> AsyncIterator[str]:
    import aio_pika

    conn = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    ch = await conn.channel()
    name = f"bench-{uuid.uuid4().hex[:8]}"
    ex = await ch.declare_exchange(name, "topic", durable=True)
    q = await ch.declare_queue(name, durable=True)
    await q.bind(ex, "#")
    try:
        yield name
    finally:
        await q.delete(if_unused=False, if_empty=False)
        await ex.delete()
        await conn.close()


@contextlib.asynccontextmanager
async def pg_table() -> AsyncIterator[str]:
    import asyncpg

    name = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        yield name
    finally:
        await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
        await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--only", default="mqtt,nats,amqp,postgres")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here (run_all.py)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    s = args.seconds
    cases: list[tuple[str, Callable[[], Awaitable[tuple[float, float]]]]] = []

    if "mqtt" in only:

        def mqtt_case(
            extra: str, options: dict[str, Any], nodelay: bool = True
        ) -> Callable[[], Awaitable[Any]]:
            async def run() -> tuple[float, float]:
                with mosquitto(extra, nodelay) as port:
                    return await run_sink(f"mqtt://127.0.0.1:{port}", options, s)

            return run

        cases += [
            ("mqtt record v5 (Mosquitto default receive max 20)", mqtt_case("", {})),
            (
                "mqtt record v5 (max_inflight_messages 1000)",
                mqtt_case("max_inflight_messages 1000", {}),
            ),
            ("mqtt record v3.1.1 (window 1000)", mqtt_case("", {"protocol": "3.1.1"})),
            ("mqtt batch v5 (one message per device)", mqtt_case("", {"mode": "batch"})),
            ("mqtt record v5 (Mosquitto defaults, Nagle on)", mqtt_case("", {}, False)),
            (
                "mqtt record v3.1.1 (Mosquitto defaults, Nagle on)",
                mqtt_case("", {"protocol": "3.1.1"}, False),
            ),
        ]
    if "nats" in only:

        async def nats_case() -> tuple[float, float]:
            async with nats_stream() as stream:
                return await run_sink(
                    "nats://127.0.0.1:4222",
                    {"subject": stream + ".{device_id}", "stream": stream, "create_stream": True},
                    s,
                )

        cases.append(("nats jetstream", nats_case))
    if "amqp" in only:

        async def amqp_case() -> tuple[float, float]:
            async with rabbit_exchange() as ex:
                return await run_sink(
                    "amqp://guest:guest@127.0.0.1:5672/",
                    {"exchange": ex, "declare_exchange": False},
                    s,
                )

        cases.append(("amqp rabbitmq (persistent, durable queue)", amqp_case))
    if "postgres" in only:

        async def pg_case() -> tuple[float, float]:
            async with pg_table() as table:
                return await run_sink(
                    "postgresql://postgres@127.0.0.1:5432/test", {"table": table}, s
                )

        cases.append(("postgresql", pg_case))

    print(f"{'sink':<52} {'records/s':>10} {'cpu/1k':>8}")
    figures = []
    for name, case in cases:
        rate, cpu = await case()
        print(f"{name:<52} {rate:>10,.0f} {cpu:>8.4f}", flush=True)
        figures.append({"sink": name, "records_per_s": rate, "cpu_s_per_1k": cpu})
    if args.json is not None:
        import json

        args.json.write_text(json.dumps({"figures": figures}))


if __name__ == "__main__":
    asyncio.run(main())
