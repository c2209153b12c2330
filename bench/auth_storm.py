"""Benchmark: 10,000 registered devices reconnecting at once after a restart.

Usage::

    .venv/bin/python bench/auth_storm.py [--devices 10000] [--procs 2] [--json FILE]

Provisions ``--devices`` devices with MQTT secrets in a fresh data directory
(``CredentialStore.issue_many``: the gateway's HMAC-SHA256 keyed hashes),
starts ``edgeway run`` on it (a listener that refuses anonymous clients, the
per-device ACL ``devices/{device_id}/#``), waits until it is healthy (the
"restart"), then every device connects at the same moment: ``--procs``
client processes each open their share of raw TCP connections all at once
and send CONNECT with the device's id and secret, and the time until the
last CONNACK 0 is what the issue asks about (goal: all authenticated within
10 s on this 2-core machine). Also printed: connect latency percentiles,
refusals, and the gateway's CPU seconds for the storm.

Not a test. Figures go to stdout (and ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from edgeway.devices.credentials import CredentialStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_child import GatewayChild, cpu_seconds, free_port  # noqa: E402

CONFIG = """
gateway: {{id: bench-auth, data_dir: "{data}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{port}"}}]
  acl:
    - {{device: "*", topic: "devices/{{device_id}}/#"}}
admin: {{listen: "127.0.0.1:{admin}"}}
log: {{level: warning}}
"""


def _utf8(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    body = _utf8(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 600)
    body += _utf8(client_id.encode()) + _utf8(username.encode()) + _utf8(password.encode())
    n = len(body)
    rl = bytearray()
    while True:
        byte, n = n % 128, n // 128
        rl.append(byte | (0x80 if n else 0))
        if not n:
            break
    return b"\x10" + bytes(rl) + body


class _Storm:
    """One client process's connections: each records its CONNACK, then
    stays connected until every device of every process is in. Raw
    ``asyncio.Protocol`` connections (uvloop when installed), as in
    ``loadgen.py``: the client must cost less than the gateway it measures."""

    def __init__(self, n: int, t0: float) -> None:
        self.results: list[tuple[float, int]] = []
        self.n = n
        self.t0 = t0
        self.all_in = asyncio.Event()
        self.transports: list[asyncio.BaseTransport] = []

    def record(self, code: int) -> None:
        self.results.append((time.monotonic() - self.t0, code))
        if len(self.results) == self.n:
            self.all_in.set()

    async def one(self, port: int, packet: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: _Device(self, packet), "127.0.0.1", port
            )
        except OSError:
            self.record(-1)
            return
        self.transports.append(transport)


class _Device(asyncio.Protocol):
    def __init__(self, storm: _Storm, packet: bytes) -> None:
        self.storm = storm
        self.packet = packet
        self.got = b""
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.packet)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.got += data
        if len(self.got) >= 4:
            self.done = True
            self.storm.record(self.got[3])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self.done = True
            self.storm.record(-2)


def _client(port: int, creds: list[tuple[str, str]], start_at: float, out: Any, done: Any) -> None:
    async def run() -> list[tuple[float, int]]:
        packets = [connect_packet(f"c-{d}", d, s) for d, s in creds]
        # Every client process starts the storm at the same wall-clock moment.
        await asyncio.sleep(max(0.0, start_at - time.time()))
        storm = _Storm(len(packets), time.monotonic())
        tasks = [asyncio.create_task(storm.one(port, p)) for p in packets]
        await storm.all_in.wait()
        out.put(None)  # this process has all its CONNACKs
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        await asyncio.gather(*tasks)
        for t in storm.transports:
            t.close()
        return storm.results

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(run()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="auth-storm-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    data = work / "data"
    t = time.monotonic()
    store = CredentialStore.open(data)
    creds = list(store.issue_many([f"dev-{i:05d}" for i in range(args.devices)], "mqtt").items())
    store.close()
    provision_s = time.monotonic() - t
    port, admin = free_port(), free_port()
    with GatewayChild(work, CONFIG.format(data=data, port=port, admin=admin), admin) as gw:
        start_s = gw.start_s
        ctx = mp.get_context("spawn")
        out: Any = ctx.Queue()
        done = ctx.Event()
        start_at = time.time() + 2.0
        shares = [creds[i :: args.procs] for i in range(args.procs)]
        procs = [
            ctx.Process(target=_client, args=(port, share, start_at, out, done)) for share in shares
        ]
        for p in procs:
            p.start()
        cpu0 = cpu_seconds(gw.pid)
        for _ in procs:
            assert out.get(timeout=120) is None
        cpu1 = cpu_seconds(gw.pid)
        done.set()
        results: list[tuple[float, int]] = []
        for _ in procs:
            results.extend(out.get(timeout=120))
        for p in procs:
            p.join(30)
    ok = sorted(t for t, code in results if code == 0)
    refused = sum(1 for _, code in results if code > 0)
    failed = sum(1 for _, code in results if code < 0)

    def pct(q: float) -> float:
        return ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")

    figures = {
        "devices": args.devices,
        "provision_s": round(provision_s, 2),
        "gateway_start_s": round(start_s, 2),
        "authenticated": len(ok),
        "refused": refused,
        "failed": failed,
        "all_in_s": round(ok[-1], 3) if ok else None,
        "p50_s": round(pct(0.5), 3),
        "p99_s": round(pct(0.99), 3),
        "gateway_cpu_s": round(cpu1 - cpu0, 2),
        "loadavg": os.getloadavg()[0],
    }
    print(
        f"{args.devices} devices (HMAC-SHA256 secrets, per-device ACL), provisioned in "
        f"{provision_s:.2f} s; gateway healthy {start_s:.2f} s after start"
    )
    print(
        f"reconnect storm: {len(ok)} authenticated, {refused} refused, {failed} failed; "
        f"all in {figures['all_in_s']} s (goal: 10 s); CONNACK p50 {figures['p50_s']} s, "
        f"p99 {figures['p99_s']} s; gateway CPU {figures['gateway_cpu_s']} s; "
        f"load average {figures['loadavg']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if len(ok) == args.devices else 1


if __name__ == "__main__":
    sys.exit(main())
