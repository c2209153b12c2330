"""A flood of confirmable CoAP requests: what duplicate detection costs the gateway.

Runs ``edgeway run`` with the CoAP listener (this tree's code, and with
``--reference SRC`` also another tree's, one after the other in the same
sitting) and sends it N confirmable telemetry POSTs from P UDP sockets
(P source ports on A loopback addresses, 127.0.0.2 and on), one request in flight per socket, a new
message id per request (every one is a request the listener must remember
for 247 s). A request unanswered for 5 s is sent again (same message id: a
duplicate). Prints per run: requests/s, the gateway's RSS idle, at the end of
the flood and its peak, CPU seconds per 1,000 requests, and, for this tree,
the duplicate cache's figures from ``/api/status``.

Usage::

    bench/coap_flood.py [--requests 50000] [--ports 100] [--addresses 1]
                        [--reference /work/main/src] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from coap_device_data import RssPeak, rss_mb  # noqa: E402
from gateway_child import GatewayChild, cpu_seconds, free_port  # noqa: E402

from coap_datagrams import con_post  # noqa: E402

RETRY_AFTER = 5.0
"""Seconds before an unanswered request is sent again (a lost datagram under load)."""


def flood(port: int, sockets: int, addresses: int, requests: int) -> dict[str, Any]:
    """Send ``requests`` confirmable POSTs over ``sockets`` sockets (bound to
    ``addresses`` loopback addresses in turn), one in flight each; return the
    elapsed time, answers by code and retransmissions."""
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(sockets):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((f"127.0.{(i % addresses) // 250}.{2 + (i % addresses) % 250}", 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    sent = retransmitted = 0
    codes: dict[str, int] = {}
    pending: dict[socket.socket, tuple[bytes, float]] = {}

    def send_next(s: socket.socket) -> None:
        nonlocal sent
        datagram = con_post(sent & 0xFFFF, f"flood-{sent % 1000}", b'{"v": 1}')
        sent += 1
        s.send(datagram)
        pending[s] = (datagram, time.monotonic())

    t0 = time.perf_counter()
    try:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
            if sent < requests:
                send_next(s)
        while pending:
            for key, _ in sel.select(timeout=0.5):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    answer = s.recv(2048)
                except ConnectionRefusedError:
                    continue
                if answer[0] >> 4 & 3 == 0:
                    # A separate response (confirmable, after an empty ACK): acknowledge it.
                    s.send(bytes([0x60, 0]) + answer[2:4])
                elif s not in pending or answer[2:4] != pending[s][0][2:4]:
                    continue  # a late answer to a retransmission
                elif answer[1] == 0:
                    continue  # an empty ACK: the response follows on its own
                if s not in pending:
                    continue
                code = f"{answer[1] >> 5}.{answer[1] & 31:02d}"
                codes[code] = codes.get(code, 0) + 1
                del pending[s]
                if sent < requests:
                    send_next(s)
            now = time.monotonic()
            for s, (datagram, at) in list(pending.items()):
                if now - at > RETRY_AFTER:
                    s.send(datagram)
                    pending[s] = (datagram, now)
                    retransmitted += 1
    finally:
        for s in socks:
            sel.unregister(s)
            s.close()
    return {
        "elapsed_s": round(time.perf_counter() - t0, 2),
        "answers": codes,
        "retransmitted": retransmitted,
    }


def run(src: Path, args: argparse.Namespace) -> dict[str, Any]:
    coap_port, admin_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = f"""
gateway: {{id: bench-coap-flood, data_dir: "{work / "data"}"}}
mqtt: {{enabled: false}}
admin: {{listen: "127.0.0.1:{admin_port}", auth: none}}
coap:
  listen: "127.0.0.1:{coap_port}"
  probe_interval: 0
"""
        with GatewayChild(work, config, admin_port, src=src) as gw:
            time.sleep(1.0)
            idle = rss_mb(gw.pid)
            cpu0 = cpu_seconds(gw.pid)
            with RssPeak(gw.pid) as peak:
                out = flood(coap_port, args.ports, args.addresses, args.requests)
            cpu = cpu_seconds(gw.pid) - cpu0
            after = rss_mb(gw.pid)
            url = f"http://127.0.0.1:{admin_port}/api/status"
            with urllib.request.urlopen(url, timeout=30) as r:
                status = json.loads(r.read())
    coap = status.get("adapters", {}).get("coap:coap", {})
    return {
        "src": str(src),
        "requests": args.requests,
        "ports": args.ports,
        "addresses": args.addresses,
        **out,
        "requests_per_s": round(args.requests / out["elapsed_s"]),
        "rss_idle_mb": round(idle, 1),
        "rss_after_mb": round(after, 1),
        "rss_peak_mb": round(peak.peak, 1),
        "rss_growth_mb": round(after - idle, 1),
        "cpu_s_per_1000": round(cpu / args.requests * 1000, 3),
        "duplicate_cache": coap.get("duplicate_cache"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--ports", type=int, default=100)
    p.add_argument(
        "--addresses", type=int, default=1, help="loopback source addresses (127.0.0.2, ...)"
    )
    p.add_argument("--reference", type=Path, help="another tree's src/ to compare with")
    p.add_argument("--repeat", type=int, default=1, help="runs per tree, in alternating order")
    args = p.parse_args()
    trees = [ROOT / "src"] if args.reference is None else [args.reference, ROOT / "src"]
    load = os.getloadavg()
    runs = []
    for k in range(args.repeat):
        # Alternate the order, so that a load that changes during the sitting
        # does not always favour the same tree.
        for src in trees if k % 2 == 0 else trees[::-1]:
            runs.append(run(src, args))
    summary = {
        str(src): {
            key: statistics.median(r[key] for r in runs if r["src"] == str(src))
            for key in ("requests_per_s", "cpu_s_per_1000", "rss_growth_mb")
        }
        for src in trees
    }
    out = {"loadavg_start": load, "loadavg_end": os.getloadavg(), "medians": summary, "runs": runs}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
