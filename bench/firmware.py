"""Firmware delivery benchmark: bytes/s to 100 devices at once over HTTP and
over MQTT chunks, and the gateway's RSS idle vs during (issue 16, section 3:
flat, within 20 MB of idle).

Usage::

    .venv/bin/python bench/firmware.py [--devices 100] [--image-mb 4] [--chunk 16384]
                                       [--transports http,mqtt] [--rounds 1] [--warmup]

One ``edgeway run`` child (bench/gateway_child.py) with the embedded broker,
the HTTP ingest (downloads) and the admin API. This process runs the devices:
:class:`edgeway.sim.firmware.FirmwareFleet`, one gmqtt MQTT 5 connection per
device, all in one event loop; each device takes the ``firmware.update``
command of one campaign (all devices in one wave, all started in the
engine's first tick), downloads the signed image, hashes it and reports.
HTTP: one GET per device (aiohttp, the gateway answers with sendfile). MQTT:
one ``--chunk`` request at a time per device, each answered by one PUBLISH.

Measured per transport: the time from the campaign's creation until every
device has the whole image (command delivery included), the bytes delivered
per second over that time, and the gateway's RSS sampled every 0.1 s: before
the devices connect, idle with them connected, and the peak during the
downloads. The devices share the machine's two cores with the gateway (and
with whatever else runs): the figure is a lower bound of what the gateway
serves. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gateway_child import GatewayChild, cpu_seconds, free_port  # noqa: E402

CONFIG = """
gateway: {{id: bench-fw, data_dir: "{data}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{mqtt}", allow_anonymous: true}}]
http_ingest: {{listen: "127.0.0.1:{http}", allow_anonymous: true, commands_allow_anonymous: true}}
admin: {{listen: "127.0.0.1:{admin}", auth: none}}
firmware:
  keys: {{bench: "{key}"}}
  download_base: "http://127.0.0.1:{http}"
log: {{level: warning}}
"""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def sample(pid: int, into: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        into.append(rss_mb(pid))
        await asyncio.sleep(0.1)


async def one_transport(
    gw: GatewayChild, ports: dict[str, int], key: object, args: argparse.Namespace,
    transport: str, version: str, image_mb: float,
) -> dict[str, float]:  # fmt: skip
    import httpx

    from edgeway.firmware.service import signed_message
    from edgeway.sim.devices import make_devices
    from edgeway.sim.firmware import FirmwareFleet, make_agents, running

    image = os.urandom(int(image_mb * 1024 * 1024))
    digest = hashlib.sha256(image).digest()
    signature = base64.b64encode(key.sign(signed_message("pump-ctl", version, digest))).decode()  # type: ignore[attr-defined]
    ids = [f"{transport}-{i:04d}" for i in range(args.devices)]
    agents = make_agents({"all": ids})
    devices = make_devices(len(ids), prefix="x", seed=1)
    for dev, name in zip(devices, ids, strict=True):
        dev.device_id = name
    fleet = FirmwareFleet(
        devices, "127.0.0.1", ports["mqtt"], agents=agents, transport=transport,  # type: ignore[arg-type]
        chunk=args.chunk,
    )  # fmt: skip
    before = rss_mb(gw.pid)
    idle: list[float] = []
    during: list[float] = []
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['admin']}", timeout=120) as http,
        running(fleet),
    ):
        r = await http.put(
            f"/api/firmware/images?hardware=pump-ctl&version={version}",
            content=image,
            headers={"X-Image-SHA256": digest.hex(), "X-Image-Signature": signature},
        )
        r.raise_for_status()
        image_id = r.json()["image"]["id"]
        await asyncio.wait_for(fleet.all_connected.wait(), 60)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(gw.pid, idle, stop))
        await asyncio.sleep(2.0)
        stop.set()
        await sampler
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(gw.pid, during, stop))
        cpu0 = cpu_seconds(gw.pid)
        t0 = time.monotonic()
        r = await http.post(
            "/api/firmware/campaigns",
            json={"image": image_id, "groups": {"all": ids}, "canary_share": 0,
                  "pace": 100_000, "max_in_flight": args.devices},
        )  # fmt: skip
        r.raise_for_status()
        async with asyncio.timeout(600):
            while any(a.downloads == 0 and a.result == 0 for a in agents.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(gw.pid) - cpu0
        stop.set()
        await sampler
    ok = sum(a.downloads == 1 and a.version == version for a in agents.values())
    delivered = sum(a.received for a in agents.values())
    return {
        "devices": args.devices,
        "ok": ok,
        "image_mb": len(image) / 1e6,
        "seconds": elapsed,
        "mb_per_s": delivered / elapsed / 1e6,
        "gateway_cpu_s": cpu,
        "rss_before": before,
        "rss_idle": max(idle),
        "rss_peak": max(during),
        "rss_mean": sum(during) / len(during),
    }


async def main(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()
    ports = {"mqtt": free_port(), "http": free_port(), "admin": free_port()}
    with tempfile.TemporaryDirectory(prefix="bench-fw-") as tmp:
        work = Path(tmp)
        text = CONFIG.format(data=work / "data", key=public, **ports)
        with GatewayChild(work, text, ports["admin"]) as gw:
            print(f"load average {os.getloadavg()[0]:.1f}; {args.devices} devices, "
                  f"image {args.image_mb} MiB, MQTT chunk {args.chunk} B")  # fmt: skip
            if args.warmup:
                for transport in args.transports.split(","):
                    f = await one_transport(
                        gw, ports, key, args, transport, f"w-{transport}", 0.0625
                    )
                    print(f"warm-up {transport}: RSS idle {f['rss_idle']:.1f} MB, "
                          f"peak {f['rss_peak']:.1f} MB ({f['rss_peak'] - f['rss_idle']:+.1f} MB)")  # fmt: skip
            for rnd in range(args.rounds):
                for i, transport in enumerate(args.transports.split(",")):
                    version = f"{transport}.{rnd}.{i}"
                    f = await one_transport(gw, ports, key, args, transport, version, args.image_mb)
                    print(
                        f"{transport:4s}: {f['ok']}/{f['devices']} devices x {f['image_mb']:.1f} MB "
                        f"in {f['seconds']:.2f} s = {f['mb_per_s']:.1f} MB/s "
                        f"({f['mb_per_s'] * 8:.0f} Mbit/s); gateway CPU {f['gateway_cpu_s']:.1f} s; "
                        f"RSS before {f['rss_before']:.1f} MB, idle {f['rss_idle']:.1f} MB, "
                        f"during mean {f['rss_mean']:.1f} / peak {f['rss_peak']:.1f} MB "
                        f"(peak - idle {f['rss_peak'] - f['rss_idle']:+.1f} MB)"
                    )
            print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--image-mb", type=float, default=4.0)
    p.add_argument("--chunk", type=int, default=16384, help="bytes per MQTT chunk request")
    p.add_argument("--transports", default="http,mqtt")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--warmup", action="store_true",
        help="one campaign per transport with a 64 KiB image first (the gateway's one-time "
        "growth: worker threads, their malloc arenas, code paths run the first time)",
    )  # fmt: skip
    asyncio.run(main(p.parse_args()))
