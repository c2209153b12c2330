"""Micro-benchmark: CPU per telemetry PUBLISH in the broker's ingest path, in-process.

Not a test. Drives ``MqttConnection.data_received`` directly (no sockets, no
load generator, no other process competing for the CPU) with reads of
``--per-read`` QoS 1 PUBLISHes of the end-to-end benchmark's payload, into an
ingest that accepts at once; so the figure is parse + decode + batch +
PUBACK only, the part of a record's cost the broker owns. Usage::

    .venv/bin/python bench/ingest_micro.py [--per-read 15] [--level 4] [--seconds 3] [--ts]

``--ts`` adds the current time as ``ts`` to the payload (a device that stamps
its readings: the input limits then check the time and every metric).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeway.config import ListenerConfig, MqttSection
from edgeway.devices.auth import AllowAll
from edgeway.ingest import MemoryIngest
from edgeway.south.mqtt.broker import Broker
from edgeway.south.mqtt.codec import encode
from edgeway.south.mqtt.packets import Connect, Properties, Publish

PAYLOAD = b'{"temp": 21.5, "hum": 40.2, "on": true, "battery": 3.71, "rssi": -67}'


class _Transport:
    """Just enough of an asyncio transport: counts what the broker writes."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Ingest(MemoryIngest):
    def submit(self, readings: Any) -> asyncio.Future[Any]:
        self.readings.clear()  # keep memory flat over millions of readings
        return super().submit(readings)


async def run(per_read: int, level: int, seconds: float, payload: bytes) -> dict[str, float]:
    allow = AllowAll()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(
            MqttSection(), ingest=_Ingest(), authenticator=allow, authoriser=allow,
            data_dir=Path(tmp), gateway_id="bench",
        )  # fmt: skip
        await broker.start()
        conn = broker.protocol_factory(ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True))()
        t = _Transport()
        conn.connection_made(t)  # type: ignore[arg-type]
        conn.data_received(
            encode(Connect(level, "dev-1", True, 60, properties=Properties()), level)
        )
        await asyncio.sleep(0.05)  # CONNACK
        pid = 0
        reads = []
        for _ in range(64):
            pkts = []
            for _ in range(per_read):
                pid = pid % 65535 + 1
                pkts.append(
                    encode(
                        Publish("devices/bench-1/telemetry", payload, 1, False, False, pid), level
                    )
                )
            reads.append(b"".join(pkts))
        total, rounds = 0, []
        for _ in range(max(1, int(seconds / 0.5))):
            # Rounds of 0.5 s: this machine's speed varies from moment to
            # moment, the fastest round is the code's cost.
            n = 0
            cpu0, t0 = time.process_time(), time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                for data in reads:
                    conn.data_received(data)
                n += 64 * per_read
            rounds.append((time.process_time() - cpu0) / n * 1e6)
            total += n
        assert broker.stats().readings_in == total
        await broker.stop()
    rounds.sort()
    return {"publishes": total, "us_min": rounds[0], "us_median": rounds[len(rounds) // 2]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-read", type=int, default=15, help="PUBLISHes per read (W1: ~15)")
    ap.add_argument("--level", type=int, default=4, choices=(4, 5))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--ts", action="store_true", help="payload carries its own timestamp")
    a = ap.parse_args(argv)
    payload = PAYLOAD[:-1] + b', "ts": %.3f}' % time.time() if a.ts else PAYLOAD
    r = asyncio.run(run(a.per_read, a.level, a.seconds, payload))
    print(f"MQTT {a.level}, {a.per_read} PUBLISHes per read: {r['us_min']:.2f} us CPU per "
          f"telemetry PUBLISH (fastest 0.5 s round; median {r['us_median']:.2f}; "
          f"{r['publishes']:,} in all)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
