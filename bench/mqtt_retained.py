"""Benchmark: how long one SUBSCRIBE over many retained messages holds the broker's loop.

Not a test. Usage (compare two trees by pointing PYTHONPATH at each)::

    PYTHONPATH=src .venv/bin/python bench/mqtt_retained.py

An in-process broker is loaded with retained messages; a real subscriber
(``mosquitto_sub``, its own process, so decoding costs this loop nothing)
sends one SUBSCRIBE and waits for every match. Every event-loop callback is
timed; the longest one is how long every other client (and the HTTP ingest,
in a gateway) could not be served. CPU time of the loop's thread is reported
next to wall time, because the machine may be shared. Loads:

- ``wildcards``: 50,000 retained (``site/{0..49}/dev{0..999}/temp``), one
  SUBSCRIBE with 100 filters ``site/+/dev{i}/#`` (5,000 matches);
- ``everything``: 100,000 retained, one SUBSCRIBE to ``#`` (QoS 0).

The garbage collector's generations are frozen after loading, so a full
collection of the loaded messages does not land in the measured window.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeway.config import ListenerConfig, MqttSection
from edgeway.devices.auth import AllowAll
from edgeway.ingest import MemoryIngest
from edgeway.south.mqtt.broker import Broker
from edgeway.south.mqtt.retained import Message


class CallbackTimer:
    """Times every event-loop callback (wall and thread CPU) while active."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._orig: Callable[[Any], None] = asyncio.events.Handle._run

    def __enter__(self) -> CallbackTimer:
        orig = self._orig
        wall, cpu = self.wall, self.cpu

        def _run(handle: Any) -> None:
            w, c = time.perf_counter(), time.thread_time()
            orig(handle)
            wall.append(time.perf_counter() - w)
            cpu.append(time.thread_time() - c)

        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._orig  # type: ignore[method-assign]


async def run(name: str, topics: list[str], filters: list[str], expected: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        allow = AllowAll()
        broker = Broker(
            MqttSection(),
            ingest=MemoryIngest(),
            authenticator=allow,
            authoriser=allow,
            data_dir=Path(d),
            gateway_id="bench",
        )
        await broker.start()
        listener = ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(broker.protocol_factory(listener), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for t in topics:
            broker.retained.load(Message(t, b"21.5", 0, True))
        args = ["-h", "127.0.0.1", "-p", str(port), "-C", str(expected), "-W", "300"]
        for f in filters:
            args += ["-t", f]
        # Forked before the measurement (fork holds the loop); connects on "go".
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            'read go && exec mosquitto_sub "$@"',
            "sh",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        gc.collect()
        gc.freeze()
        try:
            with CallbackTimer() as timer:
                t0 = time.perf_counter()
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.wait()
                total = time.perf_counter() - t0
        finally:
            gc.unfreeze()
        assert proc.returncode == 0, f"mosquitto_sub exited {proc.returncode}"
        server.close()
        await broker.stop()
        await server.wait_closed()
    print(
        f"{name}: {len(topics)} retained, {len(filters)} filters, {expected} delivered "
        f"in {total:.2f} s; longest callback {max(timer.wall) * 1000:.1f} ms wall, "
        f"{max(timer.cpu) * 1000:.1f} ms CPU; callbacks over 10 ms: "
        f"{sum(1 for w in timer.wall if w > 0.01)}"
    )


async def main() -> None:
    sites = [f"site/{s}/dev{d}/temp" for s in range(50) for d in range(1000)]
    await run("wildcards", sites, [f"site/+/dev{i}/#" for i in range(100)], 100 * 50)
    everything = [f"d/{i % 100}/{i}" for i in range(100_000)]
    await run("everything", everything, ["#"], len(everything))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
