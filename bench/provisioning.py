"""Benchmark: devices enrolling with a provisioning key, over HTTP and MQTT.

Usage::

    .venv/bin/python bench/provisioning.py [--devices 300] [--concurrency 16] [--json FILE]

Makes a provisioning key (no rate limit to speak of: 10,000 a minute) in a
fresh data directory, starts ``edgeway run`` on it (MQTT listener refusing
anonymous clients, HTTP ingest, the registry on), then enrols ``--devices``
devices with ``POST /provision`` (aiohttp) and as many over MQTT (gmqtt, one
provisioning connection per device: CONNECT as ``$provision:ID``, SUBSCRIBE,
request, answer, DISCONNECT), ``--concurrency`` at a time, each asking for an
MQTT credential; then every MQTT-enrolled device connects with the
credential it received (a raw CONNECT; CONNACK 0 counted). Printed:
enrolments per second, latency percentiles per protocol, the gateway's CPU
seconds, and how many enrolled devices the registry lists.

What an enrolment costs the gateway: an HMAC check of the key, a registry
insert and a credential insert (each a committed SQLite write; ``fsync``
durability), an audit entry, and the answer. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from auth_storm import connect_packet  # noqa: E402
from gateway_child import GatewayChild, cpu_seconds, free_port  # noqa: E402

from edgeway.devices.provisioning import ProvisioningKeys  # noqa: E402
from edgeway.sim.enrol import _over_http, _over_mqtt  # noqa: E402

CONFIG = """
gateway: {{id: bench-prov, data_dir: "{data}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{port}"}}]
  acl:
    - {{device: "*", topic: "devices/{{device_id}}/#"}}
http_ingest: {{listen: "127.0.0.1:{http}"}}
admin: {{listen: "127.0.0.1:{admin}"}}
log: {{level: warning}}
"""


def _registered(admin: int) -> int:
    url = f"http://127.0.0.1:{admin}/api/devices?group=bench&limit=1"
    with urllib.request.urlopen(url, timeout=10) as r:
        return int(json.loads(r.read())["total"])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def enrol(
    via: str, ids: list[str], key: str, port: int, concurrency: int
) -> tuple[float, list[float], dict[str, str], int]:
    """Enrol ``ids``; (seconds, latencies, credentials, refusals)."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    creds: dict[str, str] = {}
    refused = 0
    async with aiohttp.ClientSession() as session:

        async def one(device_id: str) -> None:
            nonlocal refused
            async with gate:
                t = time.perf_counter()
                if via == "http":
                    doc = await _over_http(
                        session, f"http://127.0.0.1:{port}", key, device_id, "mqtt"
                    )
                else:
                    doc = await _over_mqtt("127.0.0.1", port, key, device_id, "mqtt")
                latencies.append(time.perf_counter() - t)
            if "credentials" in doc:
                creds[device_id] = doc["credentials"]["mqtt"]
            else:
                refused += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(d) for d in ids))
        return time.perf_counter() - t0, latencies, creds, refused


async def connect_all(port: int, creds: dict[str, str]) -> int:
    """CONNECT every device with its own credential; how many got CONNACK 0."""

    async def one(device_id: str, secret: str) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(connect_packet(device_id, device_id, secret))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readexactly(4), 10)
            return ack[3] == 0
        finally:
            writer.close()

    gate = asyncio.Semaphore(64)

    async def gated(d: str, s: str) -> bool:
        async with gate:
            return await one(d, s)

    return sum(await asyncio.gather(*(gated(d, s) for d, s in creds.items())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=300, help="per protocol")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-prov-"))
    try:
        return asyncio.run(_run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _run(args: argparse.Namespace, work: Path) -> int:
    data = work / "data"
    keys = ProvisioningKeys.open(data)
    key = "bench:" + keys.add("bench", groups=["bench"], rate_per_minute=10_000)
    keys.close()
    port, http, admin = free_port(), free_port(), free_port()
    cfg = CONFIG.format(data=data, port=port, http=http, admin=admin)
    out: dict[str, Any] = {"devices_per_protocol": args.devices, "concurrency": args.concurrency}
    with GatewayChild(work, cfg, admin) as gw:
        for via, target in (("http", http), ("mqtt", port)):
            ids = [f"{via}-{i:05d}" for i in range(args.devices)]
            cpu0 = cpu_seconds(gw.pid)
            secs, lat, creds, refused = await enrol(via, ids, key, target, args.concurrency)
            cpu = cpu_seconds(gw.pid) - cpu0
            row = {
                "seconds": round(secs, 2),
                "per_second": round(len(creds) / secs, 1),
                "p50_ms": round(pct(lat, 0.5) * 1000, 1),
                "p99_ms": round(pct(lat, 0.99) * 1000, 1),
                "refused": refused,
                "gateway_cpu_s": round(cpu, 2),
                "gateway_cpu_ms_per_enrolment": round(cpu * 1000 / max(1, len(creds)), 2),
            }
            if via == "mqtt":
                row["connected_with_own_credentials"] = await connect_all(port, creds)
            out[via] = row
            print(f"{via:5} {len(creds)} enrolled in {secs:.2f} s: {row['per_second']}/s, "
                  f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, refused {refused}, "
                  f"gateway CPU {row['gateway_cpu_ms_per_enrolment']} ms each"
                  + (f", {row['connected_with_own_credentials']} connected with their own "
                     "credentials" if via == "mqtt" else ""))  # fmt: skip
        await asyncio.sleep(2.5)  # the registry's status flush
        out["registered"] = await asyncio.to_thread(_registered, admin)
        print(f"registry: {out['registered']} devices in group bench")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
