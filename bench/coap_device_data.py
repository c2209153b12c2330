"""CoAP twins and firmware downloads: what a fleet of CoAP devices costs the gateway.

Runs ``edgeway run`` (this tree's code) with the CoAP listener and the admin
API, and in this process N devices, each an aiocoap client context (its own
UDP endpoint) with its own CoAP token:

1. **firmware**: every device is targeted by one campaign and downloads the
   same image at once, block by block (1 KiB Block2 blocks, one request in
   flight per device, as a constrained device does), resuming nothing:
   bytes/s and blocks/s over all devices, the gateway's CPU seconds per MiB
   served, and its RSS idle against its peak during the downloads (the goal
   of the firmware part: flat, within 20 MB of idle);
2. **twins**: every device observes its desired document; desired patches go
   through the admin API one at a time, each to a random device: the time
   from sending the PATCH to that device's notification (p50/p99; the patch
   is fsynced before it is answered and notified).

Usage::

    bench/coap_device_data.py [--devices 50] [--image-kib 512] [--patches 200]

Prints one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_child import GatewayChild, cpu_seconds, free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssPeak:
    """The peak RSS of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def download(ctx: Any, url: str) -> tuple[bytes, int]:
    """The whole image, block by block; (bytes, blocks)."""
    from aiocoap import Code, Message
    from aiocoap.optiontypes import BlockOption

    data, number, more = bytearray(), 0, True
    while more:
        msg = Message(code=Code.GET, uri=url, block2=BlockOption.BlockwiseTuple(number, False, 6))
        r = await asyncio.wait_for(ctx.request(msg, handle_blockwise=False).response, 60)
        if r.code != Code.CONTENT:
            raise SystemExit(f"block {number}: {r.code} {r.payload[:200]!r}")
        data += r.payload
        more, number = r.opt.block2.more, number + 1
    return bytes(data), number


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiocoap
    import httpx
    from aiocoap import Code, Message

    from edgeway.devices.credentials import CredentialStore

    work = Path(tempfile.mkdtemp(prefix="coap-device-data-"))
    data_dir = work / "data"
    devices = [f"cd-{i:04}" for i in range(args.devices)]
    store = CredentialStore.open(data_dir)
    tokens = {d: store.issue(d, "coap") for d in devices}
    store.close()
    coap_port, admin_port = free_port(), free_port()
    config = f"""
gateway: {{id: bench-coap, data_dir: "{data_dir}"}}
mqtt: {{enabled: false}}
admin: {{listen: "127.0.0.1:{admin_port}", auth: none}}
coap:
  listen: "127.0.0.1:{coap_port}"
  probe_interval: 0
  allow_anonymous: false
  max_observations_per_address: {args.devices + 10}
  max_observations: {args.devices + 10}
firmware: {{require_signature: false}}
"""
    image = os.urandom(args.image_kib * 1024)
    out: dict[str, Any] = {
        "devices": args.devices,
        "image_bytes": len(image),
        "loadavg_start": os.getloadavg(),
    }
    contexts = [await aiocoap.Context.create_client_context() for _ in devices]
    try:
        with GatewayChild(work, config, admin_port) as gw:
            api = f"http://127.0.0.1:{admin_port}/api"
            async with httpx.AsyncClient(timeout=60) as http:
                r = await http.put(
                    f"{api}/firmware/images",
                    params={"hardware": "bench-board", "version": "9.9"},
                    content=image,
                )
                r.raise_for_status()
                image_id = r.json()["image"]["id"]
                r = await http.post(
                    f"{api}/firmware/campaigns",
                    json={"image": image_id, "groups": {"all": devices}, "canary_share": 0,
                          "pace": 0.001},
                )  # fmt: skip
                r.raise_for_status()
                await asyncio.sleep(1.0)
                out["rss_idle_mb"] = round(rss_mb(gw.pid), 1)

                # 1. Firmware: every device downloads the image at once.
                def url(d: str) -> str:
                    return (
                        f"coap://127.0.0.1:{coap_port}/devices/{d}/firmware/{image_id}"
                        f"?token={tokens[d]}"
                    )

                cpu0, t0 = cpu_seconds(gw.pid), time.perf_counter()
                with RssPeak(gw.pid) as peak:
                    results = await asyncio.gather(
                        *(download(ctx, url(d)) for ctx, d in zip(contexts, devices, strict=True))
                    )
                elapsed, cpu = time.perf_counter() - t0, cpu_seconds(gw.pid) - cpu0
                want = hashlib.sha256(image).hexdigest()
                assert all(hashlib.sha256(b).hexdigest() == want for b, _ in results)
                total = sum(len(b) for b, _ in results)
                blocks = sum(n for _, n in results)
                out["firmware"] = {
                    "seconds": round(elapsed, 2),
                    "bytes_per_s": round(total / elapsed),
                    "blocks_per_s": round(blocks / elapsed),
                    "per_device_bytes_per_s": round(len(image) / elapsed),
                    "gateway_cpu_s_per_mib": round(cpu / (total / 2**20), 3),
                    "rss_peak_mb": round(peak.peak, 1),
                    "rss_over_idle_mb": round(peak.peak - out["rss_idle_mb"], 1),
                }

                # 2. Twins: every device observes its desired document.
                queues: dict[str, asyncio.Queue[tuple[float, bytes]]] = {}
                readers = []
                for ctx, d in zip(contexts, devices, strict=True):
                    uri = f"coap://127.0.0.1:{coap_port}/devices/{d}/twin/desired?token={tokens[d]}"
                    req = ctx.request(Message(code=Code.GET, uri=uri, observe=0))
                    first = await asyncio.wait_for(req.response, 60)
                    assert first.code == Code.CONTENT and first.opt.observe is not None
                    q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
                    queues[d] = q

                    async def read(req: Any = req, q: Any = q) -> None:
                        async for n in req.observation:
                            q.put_nowait((time.perf_counter(), n.payload))

                    readers.append(asyncio.create_task(read()))
                rng = random.Random(7)
                latencies = []
                cpu0, t0 = cpu_seconds(gw.pid), time.perf_counter()
                for i in range(args.patches):
                    d = rng.choice(devices)
                    sent = time.perf_counter()
                    r = await http.patch(f"{api}/devices/{d}/twin/desired", json={"n": i})
                    r.raise_for_status()
                    got, payload = await asyncio.wait_for(queues[d].get(), 30)
                    assert json.loads(payload)["n"] == i
                    latencies.append((got - sent) * 1000)
                elapsed, cpu = time.perf_counter() - t0, cpu_seconds(gw.pid) - cpu0
                for t in readers:
                    t.cancel()
                out["twins"] = {
                    "observers": len(devices),
                    "patches": args.patches,
                    "patch_to_notification_ms_p50": round(statistics.median(latencies), 2),
                    "patch_to_notification_ms_p99": round(quantile(latencies, 0.99), 2),
                    "gateway_cpu_ms_per_patch": round(cpu / args.patches * 1000, 2),
                    "elapsed_s": round(elapsed, 2),
                }
                out["rss_end_mb"] = round(rss_mb(gw.pid), 1)
    finally:
        for ctx in contexts:
            await ctx.shutdown()
    out["loadavg_end"] = os.getloadavg()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--image-kib", type=int, default=512)
    p.add_argument("--patches", type=int, default=200)
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
