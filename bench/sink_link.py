"""The MQTT sink over a link with a round trip: one connection against ``auto``.

Not a test. Usage::

    .venv/bin/python bench/sink_link.py [--rtt-ms 10,50] [--batches 3]

A Mosquitto at its package defaults except ``set_tcp_nodelay true``
(Receive Maximum 20 for MQTT 5 clients; Nagle off because the proxy below is
its TCP peer, and the proxy's delayed ACKs would add 40 ms that a gateway's
prompt ACKs do not), reached through a proxy in this process that holds
every chunk for half the round trip in each direction. The sink runs under
uvloop, as in ``edgeway run``, and sends 2,000-record batches after two
warm-up batches (which also open ``auto``'s extra connections). With a window
of 20 per connection the rate is about 20 per round trip per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import Mosquitto

from edgeway.config import SinkConfig
from edgeway.sinks.base import Record, create_sink

BATCH = 2000


def batch(k: int) -> list[Record]:
    out = []
    for i in range(k * BATCH, (k + 1) * BATCH):
        r = Record(id=f"link:{i}", seq=i, device_id=f"dev-{i % 100}", ts=time.time(),
                   metrics={"temp": 21.5, "on": True})  # fmt: skip
        r.json = orjson.dumps(r.to_json_obj())
        out.append(r)
    return out


async def delayed_pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await r.read(65536):
            loop.call_later(delay, w.write, data)  # same delay for all: order kept
    w.close()


async def measure(broker_port: int, rtt: float, connections: str, batches: int) -> float:
    tasks: set[asyncio.Task[None]] = set()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", broker_port)
        for pipe in (delayed_pipe(r, uw, rtt / 2), delayed_pipe(ur, w, rtt / 2)):
            task = asyncio.ensure_future(pipe)
            tasks.add(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    options = {} if connections == "auto" else {"connections": int(connections)}
    sink = create_sink(
        SinkConfig(name="link", url=f"mqtt://127.0.0.1:{port}", options=options), "gw"
    )
    try:
        await sink.send_batch(batch(0))
        await sink.send_batch(batch(1))
        t0 = time.perf_counter()
        for k in range(2, 2 + batches):
            await sink.send_batch(batch(k))
        return BATCH * batches / (time.perf_counter() - t0)
    finally:
        await sink.close()
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt-ms", default="10,50", help="round trips to try (ms, comma-separated)")
    ap.add_argument("--batches", type=int, default=3, help="measured 2,000-record batches")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        broker = Mosquitto(Path(d), extra="set_tcp_nodelay true\n", tuned=False)
        try:
            for rtt_ms in (float(x) for x in args.rtt_ms.split(",")):
                rates = {
                    c: uvloop.run(measure(broker.port, rtt_ms / 1000, c, args.batches))
                    for c in ("1", "auto")
                }
                print(f"round trip {rtt_ms:g} ms: one connection {rates['1']:,.0f} records/s, "
                      f"auto {rates['auto']:,.0f} ({rates['auto'] / rates['1']:.1f}x)")  # fmt: skip
        finally:
            broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
