"""Run every benchmark in bench/ the same way and write one report.

Usage::

    .venv/bin/python bench/run_all.py            # the full suite (~20-30 min; quiet machine)
    .venv/bin/python bench/run_all.py --quick    # < 2 minutes, while developing
    .venv/bin/python bench/run_all.py --only end_to_end,outbox --runs 5

Conventions, the same for every benchmark:

- each benchmark script runs as its own process (nothing shared between them),
  ``--runs`` times (full: 3, quick: 1); every figure in the report is the
  **median** of those runs, with the spread (min-max) next to it;
- each figure that has a **reference measured in the same run** (Mosquitto for
  the broker, a raw SQLite append loop for the outbox, the in-memory ingest
  for the adapters, the load generator against a bare Mosquitto for the end to
  end path) gets the ratio figure/reference, computed per run and then the
  median taken, so a machine that got busier between runs moves both;
- CPU-seconds per unit of work are reported next to rates: on a shared
  machine they are steadier than a rate;
- the load average before and after each benchmark is recorded; treat
  differences under 20% as noise (MEASUREMENTS.md).

The report goes to ``bench/results/YYYY-MM-DD.md`` (``YYYY-MM-DD-quick.md``
with ``--quick``, so a quick run never replaces a full one). Figures are
printed, never asserted: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
QUICK_TIMEOUT = 30.0
"""Seconds one benchmark may take in --quick mode before it is stopped (and
reported as failed): the whole quick suite must stay under 2 minutes."""


@dataclass(slots=True)
class Fig:
    """One figure of one run, with its same-run reference when there is one."""

    bench: str
    name: str
    unit: str
    value: float | None
    ref_name: str = ""
    ref_value: float | None = None
    higher_is_better: bool = True


@dataclass(slots=True)
class Bench:
    """How to run one benchmark script and read its figures."""

    name: str
    script: str
    args: Callable[[bool, Path], list[str]]
    """(quick, json_path) -> command-line arguments."""
    extract: Callable[[dict[str, Any]], list[Fig]]
    what: str
    timeout: float = 1800.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- extractors


def _codec(doc: dict[str, Any]) -> list[Fig]:
    r = doc["results"]
    out = []
    for level in ("3.1.1", "5.0"):
        base = r.get(f"MQTT {level}: decode PUBLISH qos1 (64 KiB chunks) msg/s")
        shared = r.get(
            f"MQTT {level}: decode PUBLISH qos1 (64 KiB chunks, share_empty_properties) msg/s"
        )
        out.append(Fig("codec", f"MQTT {level} decode QoS 1 PUBLISH (64 KiB reads)", "msg/s", base))
        out.append(
            Fig(
                "codec",
                f"MQTT {level} decode, share_empty_properties",
                "msg/s",
                shared,
                "plain decode",
                base,
            )
        )
        out.append(
            Fig(
                "codec",
                f"MQTT {level} encode PUBACK",
                "/s",
                r.get(f"MQTT {level}: encode_puback /s"),
            )
        )
    return out


def _broker(doc: dict[str, Any]) -> list[Fig]:
    out = []
    for f in doc["figures"]:
        v = f["values"]
        higher = not any(w in f["metric"] for w in ("CPU", "RSS", "time"))
        out.append(
            Fig(
                "mqtt_broker",
                f"{f['load']}: {f['metric']}",
                f["unit"],
                v.get("edgeway"),
                "Mosquitto",
                v.get("mosquitto"),
                higher,
            )
        )
    return out


def _outbox(doc: dict[str, Any]) -> list[Fig]:
    a, raw = (
        doc["append"],
        doc.get("raw_executemany_same_commit_size"),
    )
    out = [
        Fig(
            "outbox",
            "append with group commit (fsync)",
            "rows/s",
            a.get("rows_per_s"),
            "raw SQLite executemany, same commit size",
            (raw or {}).get("rows_per_s"),
        ),
        Fig(
            "outbox",
            "append CPU per 1,000 rows",
            "CPU-s",
            a.get("cpu_s_per_1000"),
            higher_is_better=False,
        ),
    ]
    for key, label in (
        ("drain_read_confirm", "drain (read + confirm, no network)"),
        ("drain_http", "drain through the HTTP sink"),
    ):
        d = doc.get(key)
        if d:
            out.append(Fig("outbox", label, "rows/s", d.get("rows_per_s")))
    return out


def _ingest_http(doc: dict[str, Any]) -> list[Fig]:
    by = {r["ingest"]: r for r in doc["results"]}
    mem, ob = by.get("memory", {}), by.get("outbox", {})
    return [
        Fig(
            "ingest_http",
            "HTTP POST -> outbox (fsync), 200s",
            "req/s",
            ob.get("requests_per_s"),
            "in-memory ingest",
            mem.get("requests_per_s"),
        ),
        Fig(
            "ingest_http",
            "server CPU per 1,000 requests (outbox)",
            "CPU-s",
            ob.get("server_cpu_s_per_1000"),
            "in-memory ingest",
            mem.get("server_cpu_s_per_1000"),
            False,
        ),
        Fig("ingest_http", "latency p99 (outbox)", "ms", ob.get("p99_ms"), higher_is_better=False),
    ]


def _ingest_protocols(doc: dict[str, Any]) -> list[Fig]:
    coap = {
        r["ingest"]: r
        for r in doc["results"]
        if "requests_per_s" in r and "registers_per_s" not in r
    }
    modbus = {r["ingest"]: r for r in doc["results"] if "registers_per_s" in r}
    out = []
    if coap:
        m, o = coap.get("memory", {}), coap.get("outbox", {})
        out.append(
            Fig(
                "ingest_protocols",
                "CoAP POST -> outbox, 2.04s",
                "req/s",
                o.get("requests_per_s"),
                "in-memory ingest",
                m.get("requests_per_s"),
            )
        )
    if modbus:
        m, o = modbus.get("memory", {}), modbus.get("outbox", {})
        out.append(
            Fig(
                "ingest_protocols",
                "Modbus TCP poll -> outbox",
                "registers/s",
                o.get("registers_per_s"),
                "in-memory ingest",
                m.get("registers_per_s"),
            )
        )
    return out


def _sinks(doc: dict[str, Any]) -> list[Fig]:
    out = []
    for f in doc["figures"]:
        out.append(Fig("sinks", f"{f['sink']}", "records/s", f["records_per_s"]))
        out.append(
            Fig(
                "sinks",
                f"{f['sink']} CPU per 1,000",
                "CPU-s",
                f["cpu_s_per_1k"],
                higher_is_better=False,
            )
        )
    return out


_E2E_CASES = {
    "http": "HTTP sink (aiohttp)",
    "mqtt": "MQTT sink (Mosquitto)",
    "mqtt311": "MQTT sink 3.1.1 (Mosquitto)",
    "mqtt-default": "MQTT sink (Mosquitto at its defaults)",
    "mqtt311-default": "MQTT sink 3.1.1 (Mosquitto at its defaults)",
    "client": "client mode, MQTT sink",
    "client-default": "client mode, MQTT sink (Mosquittos at their defaults)",
    "client311-default": "client mode, MQTT sink 3.1.1 (Mosquittos at their defaults)",
}
"""bench/end_to_end.py's cases (its ``CASES``) and their labels in the report."""


def _e2e(doc: dict[str, Any]) -> list[Fig]:
    c = doc["cold"]
    out = [
        Fig(
            "end_to_end",
            "cold start to ready (`edgeway run`, until /healthz 200)",
            "ms",
            c["cold_start_ms"],
            higher_is_better=False,
        ),
        Fig("end_to_end", "idle RSS, no devices", "MB", c["idle_rss_mb"], higher_is_better=False),
    ]
    ref = doc.get("reference_w1_per_s")
    for sink, label in _E2E_CASES.items():
        r = doc.get(sink)
        if not r:
            continue
        w1, w2 = r["w1"], r["w2"]
        bridge = doc.get("mosquitto_bridge_default" if "default" in sink else "mosquitto_bridge")
        if bridge and "w1_fixed" in r:
            out.append(
                Fig(
                    "end_to_end",
                    f"{label}: W1 fixed, end to end",
                    "records/s",
                    r["w1_fixed"]["per_s"],
                    "Mosquitto bridge, same broker configuration",
                    bridge["per_s"],
                )
            )
        out += [
            Fig(
                "end_to_end",
                f"{label}: W1 sustained delivered",
                "records/s",
                w1["delivered_per_s"],
                "load generator -> bare Mosquitto",
                ref,
            ),
            Fig(
                "end_to_end",
                f"{label}: W1 stored (acknowledged)",
                "records/s",
                w1["acked_per_s"],
                "load generator -> bare Mosquitto",
                ref,
            ),
            Fig(
                "end_to_end",
                f"{label}: W1 CPU per 1,000 records",
                "CPU-s",
                w1["cpu_s_per_1k"],
                higher_is_better=False,
            ),
            Fig(
                "end_to_end",
                f"{label}: W1 peak RSS",
                "MB",
                w1["peak_rss_mb"],
                higher_is_better=False,
            ),
            Fig(
                "end_to_end",
                f"{label}: W2 latency p50 at 1,000 records/s",
                "ms",
                w2["p50_ms"],
                higher_is_better=False,
            ),
            Fig(
                "end_to_end", f"{label}: W2 latency p99", "ms", w2["p99_ms"], higher_is_better=False
            ),
            Fig(
                "end_to_end", f"{label}: W2 latency max", "ms", w2["max_ms"], higher_is_better=False
            ),
            Fig(
                "end_to_end",
                f"{label}: W2 CPU per 1,000 records",
                "CPU-s",
                w2["cpu_s_per_1k"],
                higher_is_better=False,
            ),
        ]
        if "drain" in r:
            out.append(
                Fig(
                    "end_to_end",
                    f"{label}: drain rate after an outage",
                    "records/s",
                    r["drain"]["drain_per_s"],
                )
            )
    return out


def _bandwidth(doc: dict[str, Any]) -> list[Fig]:
    # bench/bandwidth.py (the pipeline's bench) is not written yet; read a
    # generic {"figures": [{"name", "unit", "value", "reference"?, "reference_value"?}]}.
    return [
        Fig(
            "bandwidth",
            f["name"],
            f.get("unit", ""),
            f.get("value"),
            f.get("reference", ""),
            f.get("reference_value"),
            f.get("higher_is_better", True),
        )
        for f in doc.get("figures", [])
    ]


BENCHES = [
    Bench(
        "codec",
        "codec_bench.py",
        lambda q, j: [
            "--count",
            "2000" if q else "10000",
            "--repeat",
            "3" if q else "20",
            "--out",
            str(j),
        ],
        _codec,
        "MQTT codec hot paths (process CPU time, best of repeats)",
    ),
    Bench(
        "outbox",
        "outbox_bench.py",
        lambda q, j: ["--rows", "20000" if q else "200000", "--out", str(j)],
        _outbox,
        "outbox append (group commit, fsync) vs a raw SQLite loop; drain",
    ),
    Bench(
        "ingest_http",
        "ingest_http.py",
        lambda q, j: ["--requests", "2000" if q else "20000", "--out", str(j)],
        _ingest_http,
        "HTTP ingest, readings on disk before the 200",
    ),
    Bench(
        "ingest_protocols",
        "ingest_protocols.py",
        lambda q, j: [
            "--coap-requests",
            "1000" if q else "10000",
            "--modbus-seconds",
            "1" if q else "5",
            "--out",
            str(j),
        ],
        _ingest_protocols,
        "CoAP listener and Modbus poller into the outbox",
    ),
    Bench(
        "sinks",
        "sinks_bench.py",
        lambda q, j: [
            "--seconds",
            "0.5" if q else "3",
            *(["--only", "mqtt,nats"] if q else []),
            "--json",
            str(j),
        ],
        _sinks,
        "records/s per sink, confirmed by the remote side",
    ),
    Bench(
        "mqtt_broker",
        "mqtt_broker.py",
        lambda q, j: (
            (["--quick", "--only", "idle", "--idle-clients", "10000"] if q else [])
            + ["--no-write", "--json", str(j)]
        ),
        _broker,
        "embedded broker vs Mosquitto (quick: 10,000 idle clients only)",
    ),
    Bench(
        "bandwidth",
        "bandwidth.py",
        lambda q, j: [
            *(["--sensors", "20", "--seconds", "600", "--cost-readings", "20000"] if q else []),
            "--out",
            str(j.with_suffix(".txt")),
            "--json",
            str(j),
        ],
        _bandwidth,
        "pipeline bandwidth savings (lands with the pipeline)",
    ),
    Bench(
        "end_to_end",
        "end_to_end.py",
        lambda q, j: [*(["--quick"] if q else []), "--json", str(j)],
        _e2e,
        "devices -> edgeway -> sink -> receiver (quick: HTTP sink only)",
    ),
]


# ---------------------------------------------------------------- machine


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> list[str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    versions = []
    for pkg in (
        "aiohttp",
        "uvloop",
        "orjson",
        "pydantic",
        "gmqtt",
        "aiocoap",
        "pymodbus",
        "asyncua",
    ):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    mosq = _run(["/usr/sbin/mosquitto", "-h"]).splitlines()
    return [
        f"machine: {os.cpu_count()} CPUs ({cpu}), {mem:,} MiB RAM, {platform.platform()}",
        f"python: {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{mosq[0] if mosq else 'mosquitto: not found'}",
        f"edgeway: {_run(['git', '-C', str(ROOT), 'log', '-1', '--format=%h %s'])}",
        f"libraries: {', '.join(versions)}",
    ]


# ---------------------------------------------------------------- running


@dataclass(slots=True)
class Outcome:
    bench: Bench
    runs: list[list[Fig]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    load: list[tuple[float, float]] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None


def run_bench(b: Bench, quick: bool, runs: int, tmp: Path) -> Outcome:
    out = Outcome(b)
    script = BENCH / b.script
    if not script.exists():
        out.skipped = f"bench/{b.script} does not exist yet"
        print(f"== {b.name}: skipped ({out.skipped})", flush=True)
        return out
    for i in range(runs):
        j = tmp / f"{b.name}-{i}.json"
        cmd = [PY, str(script), *b.args(quick, j)]
        print(f"== {b.name} run {i + 1}/{runs}: {' '.join(cmd[1:])}", flush=True)
        la0, t0 = os.getloadavg()[0], time.monotonic()
        limit = QUICK_TIMEOUT if quick else b.timeout
        # Own session: on a timeout the whole group goes (load generators,
        # servers the script started), not only the script.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            out.error = f"timed out after {limit:.0f} s"
            print(f"   FAILED: {out.error}", flush=True)
            break
        p = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        out.seconds.append(time.monotonic() - t0)
        out.load.append((la0, os.getloadavg()[0]))
        for line in p.stdout.splitlines()[-40:]:
            print(f"   {line}")
        if p.returncode != 0 or not j.exists():
            out.error = f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"
            print(f"   FAILED: {out.error}", flush=True)
            break
        try:
            out.runs.append(b.extract(json.loads(j.read_text())))
        except (KeyError, TypeError, ValueError) as e:
            out.error = f"unreadable results: {type(e).__name__}: {e}"
            break
    return out


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(v: float | None) -> str:
    if v is None or v != v:  # None or NaN
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 0.1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def table(outcomes: list[Outcome]) -> list[str]:
    rows = [
        "| benchmark | figure | median | spread | reference (same run) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        if not o.runs:
            continue
        names = [f.name for f in o.runs[0]]
        for idx, name in enumerate(names):
            figs = [r[idx] for r in o.runs if idx < len(r) and r[idx].name == name]
            vals = [f.value for f in figs if f.value is not None and f.value == f.value]
            refs = [f.ref_value for f in figs if f.ref_value]
            ratios = [f.value / f.ref_value for f in figs if f.value is not None and f.ref_value]
            f0 = figs[0]
            med = _median(vals)
            spread = f"{fmt(min(vals))}-{fmt(max(vals))}" if len(vals) > 1 else ""
            ref = f"{f0.ref_name}: {fmt(_median(refs))}" if f0.ref_name and refs else ""
            ratio = ""
            if ratios:
                better = "higher" if f0.higher_is_better else "lower"
                ratio = f"{_median(ratios):.2f}x ({better} is better)"
            rows.append(
                f"| {o.bench.name} | {name} ({f0.unit}) | {fmt(med)} | {spread} | {ref} | {ratio} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short settings, one run each (< 2 min)")
    ap.add_argument("--runs", type=int, help="runs per benchmark (default 3, quick 1)")
    ap.add_argument(
        "--only", help="comma-separated benchmark names: " + ",".join(b.name for b in BENCHES)
    )
    ap.add_argument("--out", type=Path, help="report path (default bench/results/DATE[-quick].md)")
    args = ap.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    header = [
        f"date: {dt.datetime.now().isoformat(timespec='seconds')}",
        *machine(),
        f"mode: {'quick' if args.quick else 'full'}, {runs} run(s) per benchmark, "
        f"load average at start {os.getloadavg()[0]:.1f}",
    ]
    for line in header:
        print(line)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeway-runall-") as tmp:
        outcomes = [run_bench(b, args.quick, runs, Path(tmp)) for b in chosen]
    took = time.monotonic() - t0
    rows = table(outcomes)
    print()
    print("\n".join(rows))
    day = dt.date.today().isoformat()
    path = args.out or RESULTS / f"{day}{'-quick' if args.quick else ''}.md"
    text = [
        "# edgeway benchmarks",
        "",
        *[f"- {h}" for h in header],
        f"- total time: {took:.0f} s",
        "",
    ]
    text += [
        "## Figures",
        "",
        "Median of the runs; spread is min-max over the runs; the ratio is "
        "taken per run against the reference measured in that same run, then the median.",
        "",
    ]
    text += [*rows, ""]
    text += ["## Benchmarks", ""]
    for o in outcomes:
        b = o.bench
        status = (
            f"skipped: {o.skipped}"
            if o.skipped
            else f"FAILED: {o.error}"
            if o.error
            else f"{len(o.runs)} run(s), {sum(o.seconds):.0f} s"
        )
        loads = ", ".join(f"{a:.1f}->{z:.1f}" for a, z in o.load)
        text.append(
            f"- **{b.name}** (`bench/{b.script} {' '.join(b.args(args.quick, Path('OUT.json')))}`): "
            f"{b.what}. {status}. Load average before->after: {loads or 'n/a'}."
        )
    text += [
        "",
        "See docs/benchmarks.md for what each figure means. Command: "
        f"`.venv/bin/python bench/run_all.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    print(
        f"\nwritten {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} in {took:.0f} s"
    )
    return 0 if not any(o.error for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
