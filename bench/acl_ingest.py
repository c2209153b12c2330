"""Benchmark: broker QoS 1 telemetry ingest, 10,000 devices, per-device ACL vs none.

Usage::

    .venv/bin/python bench/acl_ingest.py [--devices 10000] [--seconds 8] [--rounds 2]

10,000 devices provisioned in the credential store (HMAC secrets), each its
own MQTT connection authenticated by its secret, publishing QoS 1 telemetry
to ``devices/dev-N/telemetry`` (window ``--window`` in flight each) to
``edgeway run`` (embedded broker, outbox with fsync, no sink). Two
configurations, alternated ``--rounds`` times so that the shared machine's
load falls on both alike:

- ``acl``: the per-device rule ``{device: "*", topic: "devices/{device_id}/#"}``;
- ``none``: no rules (every authenticated device may publish anywhere).

Reported per run: messages/s over the window and the gateway's CPU seconds
per 10,000 messages; then the medians and the ratio acl/none (goal: within
10%). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_child import GatewayChild, cpu_seconds, free_port  # noqa: E402
from loadgen import Job, LoadGen, split  # noqa: E402

from edgeway.devices.credentials import CredentialStore  # noqa: E402

CONFIG = """
gateway: {{id: bench-acl, data_dir: "{data}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{port}"}}]
  # 10,000 connections set up at once on a shared 2-core machine: a client
  # may take longer than the default 10 s to send its CONNECT.
  limits: {{connect_timeout: 60s}}
{acl}
admin: {{listen: "127.0.0.1:{admin}"}}
log: {{level: warning}}
"""
ACL = '  acl:\n    - {device: "*", topic: "devices/{device_id}/#"}\n'


def _jobs(args: argparse.Namespace, port: int, creds: dict[int, tuple[str, str]]) -> list[Job]:
    """One QoS 1 publisher job per load-generator process, each device its own
    connection with its own credentials."""
    jobs = []
    first = 0
    for i, n in enumerate(split(args.devices, args.procs)):
        jobs.append(
            Job("pub1", "127.0.0.1", port, conns=n, client_prefix=f"c{i}",
                topic="devices/dev-{n}/telemetry", payload=b'{"t": 21.5, "rh": 40}',
                window=args.window, first_n=first, connect_concurrency=500,
                credentials={k: creds[k] for k in range(first, first + n)})
        )  # fmt: skip
        first += n
    return jobs


def one_run(work: Path, creds: dict[int, tuple[str, str]], acl: bool, args: argparse.Namespace,
            template: Path) -> dict[str, float]:  # fmt: skip
    data = work / f"data-{'acl' if acl else 'none'}-{time.monotonic_ns()}"
    shutil.copytree(template, data)  # the same provisioned store for every run
    port, admin = free_port(), free_port()
    config = CONFIG.format(data=data, port=port, admin=admin, acl=ACL if acl else "")
    gen: LoadGen | None = None
    try:
        with GatewayChild(work, config, admin) as gw:
            try:
                gen = LoadGen(_jobs(args, port, creds))
                try:
                    gen.start(timeout=180)
                except Exception:
                    print(gw.log_tail(), file=sys.stderr)
                    raise
                gen.go()
                time.sleep(args.warmup)
                n0, c0, t0 = gen.total(), cpu_seconds(gw.pid), time.monotonic()
                time.sleep(args.seconds)
                n1, c1, t1 = gen.total(), cpu_seconds(gw.pid), time.monotonic()
                gen.check()
            finally:
                if gen is not None:
                    gen.stop()
    finally:
        shutil.rmtree(data, ignore_errors=True)
    msgs = n1 - n0
    return {
        "msgs_per_s": msgs / (t1 - t0),
        "cpu_s_per_10k": (c1 - c0) / msgs * 10_000 if msgs else float("nan"),
        "loadavg": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window", type=int, default=2, help="QoS 1 messages in flight per device")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="acl-ingest-"))
    try:
        template = work / "template"
        store = CredentialStore.open(template)
        issued = store.issue_many([f"dev-{n}" for n in range(args.devices)], "mqtt")
        store.close()
        creds = {n: (f"dev-{n}", issued[f"dev-{n}"]) for n in range(args.devices)}
        runs: dict[str, list[dict[str, float]]] = {"acl": [], "none": []}
        for _ in range(args.rounds):
            for name in ("acl", "none"):
                r = one_run(work, creds, name == "acl", args, template)
                runs[name].append(r)
                print(
                    f"{name:4}: {r['msgs_per_s']:8.0f} msg/s, gateway "
                    f"{r['cpu_s_per_10k']:.3f} CPU-s per 10k messages (load {r['loadavg']:.1f})",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r["msgs_per_s"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_s_per_10k"] for r in v) for k, v in runs.items()}
    ratio = med["acl"] / med["none"]
    print(
        f"{args.devices} devices, QoS 1, window {args.window}: median acl {med['acl']:.0f} msg/s, "
        f"none {med['none']:.0f} msg/s, acl/none {ratio:.3f} (goal >= 0.90); CPU-s per 10k: "
        f"acl {cpu['acl']:.3f}, none {cpu['none']:.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": med, "cpu": cpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
