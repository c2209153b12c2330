"""Ingest rates of the CoAP listener and the Modbus poller, readings safe in the ingest.

Run: .venv/bin/python bench/ingest_protocols.py [--coap-requests 10000] [--concurrency 32]
         [--modbus-seconds 5] [--ingest memory|outbox|both]
         [--out bench/results/ingest_protocols.json]

CoAP: ``CoapAdapter`` on a free loopback UDP port in this process; the load
generator (aiocoap client, ``--concurrency`` workers each with one confirmable
POST of a ~100-byte JSON reading in flight) in a child process, so the two do
not share a core. A request counts when it is answered 2.04, i.e. after the
ingest future resolved. Reported: requests/s, server CPU-seconds per 1,000
requests (this process, all threads, including the outbox writer), client
latency p50/p99.

Modbus: a pymodbus TCP server (``SimDevice``, 500 holding registers) in a child
process; ``ModbusAdapter`` in this process polls 4 groups of 125 uint16
registers (one read request each, the protocol maximum) with interval 0 for
``--modbus-seconds``. Reported: registers/s, requests/s, readings/s and
CPU-seconds per 1,000 registers. This is one request in flight (Modbus TCP
devices are usually served one request at a time), so it measures latency
per round trip as much as CPU.

With ``outbox`` the ingest is the real :class:`edgeway.outbox.Outbox`
(SQLite WAL, group commit, ``durability: fsync``) in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

PAYLOAD = b'{"ts":1732262400123,"temperature":21.37,"humidity":48.2,"battery":3.71,"ok":true}'


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


# ---------------------------------------------------------------- CoAP


def _coap_client(port: int, requests: int, concurrency: int, out: Any) -> None:
    async def main() -> dict[str, Any]:
        import aiocoap

        ctx = await aiocoap.Context.create_client_context()
        latencies: list[float] = []
        errors = 0
        per_worker = requests // concurrency

        async def worker(w: int) -> None:
            nonlocal errors
            uri = f"coap://127.0.0.1:{port}/devices/bench-{w}/telemetry"
            for _ in range(per_worker):
                msg = aiocoap.Message(
                    code=aiocoap.POST, uri=uri, payload=PAYLOAD, content_format=50
                )
                t0 = time.perf_counter()
                r = await ctx.request(msg).response
                latencies.append(time.perf_counter() - t0)
                if r.code != aiocoap.CHANGED:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
        await ctx.shutdown()
        return {
            "requests": per_worker * concurrency,
            "errors": errors,
            "elapsed_s": elapsed,
            "p50_ms": _pct(latencies, 0.5) * 1000,
            "p99_ms": _pct(latencies, 0.99) * 1000,
        }

    out.put(asyncio.run(main()))


@contextlib.asynccontextmanager
async def _ingest(kind: str) -> AsyncIterator[Any]:
    if kind == "memory":
        from edgeway.ingest import MemoryIngest

        yield MemoryIngest()
        return
    from edgeway.config import OutboxSection
    from edgeway.outbox import Outbox

    with tempfile.TemporaryDirectory() as d:
        outbox = Outbox(
            Path(d) / "outbox.db", gateway_id="bench", config=OutboxSection(), sink_names=["bench"]
        )
        await outbox.open()
        try:
            yield outbox
        finally:
            await outbox.close()


async def bench_coap(kind: str, requests: int, concurrency: int) -> dict[str, Any]:
    from edgeway.config import CoapSection
    from edgeway.south.coap import CoapAdapter

    async with _ingest(kind) as ingest:
        adapter = CoapAdapter(CoapSection(listen="127.0.0.1:0"), ingest=ingest)
        task = asyncio.create_task(adapter.run())
        await adapter.ready.wait()
        assert adapter.port is not None
        q: Any = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(
            target=_coap_client, args=(adapter.port, requests, concurrency, q)
        )
        cpu0 = _cpu()
        proc.start()
        try:
            result: dict[str, Any] = await asyncio.to_thread(q.get, True, 600)
        finally:
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
        cpu = _cpu() - cpu0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    result.update(
        protocol="coap",
        ingest=kind,
        concurrency=concurrency,
        requests_per_s=result["requests"] / result["elapsed_s"],
        server_cpu_s_per_1000=cpu / result["requests"] * 1000,
        readings=adapter.state.readings,
    )
    return result


# ---------------------------------------------------------------- Modbus

REGISTERS = 500


def _modbus_server(port: int, ready: Any) -> None:
    async def main() -> None:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        device = SimDevice(
            id=1,
            simdata=(
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, values=list(range(REGISTERS)), datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
            ),
        )
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bench_modbus(kind: str, seconds: float) -> dict[str, Any]:
    from edgeway.config import ModbusDeviceConfig
    from edgeway.south.modbus import ModbusAdapter

    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_modbus_server, args=(port, ready), daemon=True)
    server.start()
    try:
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError("modbus server did not start")
        groups = [
            {
                "interval": 0,
                "points": [
                    {"metric": f"r{a}", "address": a} for a in range(g * 125, (g + 1) * 125)
                ],
            }
            for g in range(REGISTERS // 125)
        ]
        cfg = ModbusDeviceConfig.model_validate(
            {
                "name": "bench",
                "device_id": "bench",
                "host": "127.0.0.1",
                "port": port,
                "groups": groups,
            }
        )
        async with _ingest(kind) as ingest:
            adapter = ModbusAdapter(cfg, ingest=ingest)
            task = asyncio.create_task(adapter.run())
            await adapter.ready.wait()
            await asyncio.sleep(0.5)  # warm-up
            regs0, polls0, cpu0, t0 = (
                adapter.registers_read,
                adapter.polls,
                _cpu(),
                time.perf_counter(),
            )
            await asyncio.sleep(seconds)
            regs, polls = adapter.registers_read - regs0, adapter.polls - polls0
            cpu, elapsed = _cpu() - cpu0, time.perf_counter() - t0
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            errors = adapter.state.errors
    finally:
        server.kill()
        server.join(10)
    return {
        "protocol": "modbus_tcp",
        "ingest": kind,
        "elapsed_s": elapsed,
        "registers": regs,
        "registers_per_s": regs / elapsed,
        "requests_per_s": polls / elapsed,
        "readings_per_s": polls / elapsed,
        "cpu_s_per_1000_registers": cpu / regs * 1000 if regs else None,
        "errors": errors,
    }


async def run_part(part: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if part == "coap":
        return await bench_coap(kind, args.coap_requests, args.concurrency)
    return await bench_modbus(kind, args.modbus_seconds)


def _summary(r: dict[str, Any]) -> str:
    if r["protocol"] == "coap":
        return (
            f"coap   {r['ingest']:6}  {r['requests_per_s']:8.0f} req/s  "
            f"{r['server_cpu_s_per_1000']:.3f} CPU-s/1000  p50 {r['p50_ms']:.1f} ms  "
            f"p99 {r['p99_ms']:.1f} ms  errors {r['errors']}"
        )
    return (
        f"modbus {r['ingest']:6}  {r['registers_per_s']:8.0f} registers/s  "
        f"{r['requests_per_s']:.0f} req/s  {r['cpu_s_per_1000_registers']:.4f} CPU-s/1000 registers  "
        f"errors {r['errors']}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--coap-requests", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--modbus-seconds", type=float, default=5.0)
    p.add_argument("--ingest", choices=["memory", "outbox", "both"], default="both")
    p.add_argument("--protocols", default="coap,modbus")
    p.add_argument("--out", type=Path, default=Path("bench/results/ingest_protocols.json"))
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        # One measurement in a fresh interpreter: no state (threads, sockets,
        # child processes) left over from another measurement.
        print(json.dumps(asyncio.run(run_part(args.part, args.ingest, args))))
        return 0
    kinds = ["memory", "outbox"] if args.ingest == "both" else [args.ingest]
    results = []
    for kind in kinds:
        for part in args.protocols.split(","):
            cmd = [sys.executable, __file__, "--part", part, "--ingest", kind]
            cmd += [
                "--coap-requests",
                str(args.coap_requests),
                "--concurrency",
                str(args.concurrency),
            ]
            cmd += ["--modbus-seconds", str(args.modbus_seconds)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                print(f"{part} {kind}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(_summary(r), flush=True)
            results.append(r)
    report = {
        "benchmark": "ingest_protocols",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1m": os.getloadavg()[0],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
