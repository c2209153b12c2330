"""Benchmark: edgeway's embedded MQTT broker against Mosquitto, same load, one run.

Not a test. Usage::

    .venv/bin/python bench/mqtt_broker.py            # ~25 s per load and broker
    .venv/bin/python bench/mqtt_broker.py --quick    # ~10 s per load and broker
    .venv/bin/python bench/mqtt_broker.py --only qos1 --quick

Loads (each against a freshly started ``edgeway run`` and a freshly started
``/usr/sbin/mosquitto``, both on free loopback ports):

- ``qos0``/``qos1``: 100 publishers as fast as they can (QoS 1 with a window of
  ``--window`` messages in flight per connection; QoS 0 in batches closed by a
  PINGREQ, see ``loadgen.py``); messages/s and the broker's CPU-seconds per
  10,000 messages (utime+stime from ``/proc/PID/stat`` around the window).
  ``qos0``/``qos1`` publish to ``devices/bench-N/telemetry`` with a small JSON
  payload, so on edgeway every message is telemetry: decoded, turned into a
  reading and stored in the outbox (fsync) before the PUBACK, while Mosquitto,
  with no subscriber, only acknowledges. ``qos0-plain``/``qos1-plain`` send the
  same to ``bench/plain/N`` (no subscriber, not telemetry): the broker alone.
- ``fanout``: 1 publisher (QoS 0) to 50 subscribers of one topic (QoS 0);
  delivered messages/s counted at the subscribers.
- ``idle``: 10,000 connected idle clients; the broker's RSS.

Results are printed with the ratio edgeway/Mosquitto and written to
``bench/results/mqtt_broker-DATE.md``. The machine may be shared: the load
average before and after each measurement is recorded next to the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Job, LoadGen, LoadGenError, split

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MOSQUITTO = "/usr/sbin/mosquitto"
PY_SPY = str(Path(sys.executable).parent / "py-spy")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TELEMETRY_PAYLOAD = b'{"temp": 21.5, "hum": 40.2, "on": true}'

LOADS = ["qos0", "qos1", "qos0-plain", "qos1-plain", "fanout", "idle"]
IDLE_CLIENTS = 10_000
NOFILE_WANTED = 2 * IDLE_CLIENTS + 1000
"""Both the broker and the load generator hold one fd per idle client (the
generator's spread over its worker processes), plus some slack."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu(pid: int) -> float:
    """utime+stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def loadavg() -> float:
    return os.getloadavg()[0]


class Broker:
    """A broker process on a free loopback port, started fresh for each load."""

    def __init__(self, name: str, workdir: Path, nodelay: bool = False) -> None:
        self.name = name
        self.nodelay = nodelay
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{name}.log"

    def start(self) -> None:
        self.port = free_port()
        if self.name == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "max_connections -1\n"
                "max_queued_messages 1000000\n"
                "persistence false\n" + ("set_tcp_nodelay true\n" if self.nodelay else "")
                # Off by default (Mosquitto's default, and the brief's config).
                # On, it changed nothing at 100 connections here (QoS 1
                # 31-34k vs 35-36k msg/s) and raised Mosquitto's CPU per
                # message (one segment per PUBACK or delivery).
            )
            args = [MOSQUITTO, "-c", str(conf)]
        else:
            data = self.workdir / "edgeway-data"
            shutil.rmtree(data, ignore_errors=True)
            args = [sys.executable, "-m", "edgeway", "run", "--data-dir", str(data)]
            args += ["--mqtt-listen", f"127.0.0.1:{self.port}", "--log-level", "warning"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not open port {self.port}")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass(slots=True)
class Figure:
    """One measured figure for both brokers."""

    load: str
    metric: str
    unit: str
    higher_is_better: bool
    values: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def ratio(self) -> float | None:
        e, m = self.values.get("edgeway"), self.values.get("mosquitto")
        if e is None or m is None or m == 0:
            return None
        return e / m


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


@dataclass(slots=True)
class Settings:
    warmup: float
    measure: float
    procs: int
    window: int
    batch: int
    publishers: int
    subscribers: int
    idle: int
    profile: Path | None
    """Where to write py-spy profiles of edgeway (None: no profiling)."""


@dataclass(slots=True)
class Rate:
    """What one rate measurement found."""

    per_s: float
    broker_cpu_10k: float
    """Broker CPU-seconds per 10,000 counted messages."""
    loadgen_cpu_10k: float
    """Load generator CPU-seconds per 10,000 counted messages (to show it was
    not the bottleneck: it should be well below the broker's)."""
    note: str
    other_per_s: float = 0.0
    """Rate of the other roles' count (fan-out: messages published)."""


def measure_rate(
    broker: Broker,
    gen: LoadGen,
    s: Settings,
    roles: tuple[str, ...],
    other: tuple[str, ...] = (),
    profile: Path | None = None,
) -> Rate:
    """Run ``gen`` against ``broker``; count ``roles`` over the window. With
    ``profile``, py-spy samples the broker during the window."""
    gen.start(timeout=60)
    la0 = loadavg()
    gen.go()
    time.sleep(s.warmup)
    gen.check()
    spy: subprocess.Popen[bytes] | None = None
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            [
                PY_SPY,
                "record",
                "-p",
                str(broker.pid),
                "-d",
                str(int(s.measure)),
                "-r",
                "100",
                "--nonblocking",
                "--threads",
                "--format",
                "raw",
                "-o",
                str(profile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def sample() -> tuple[int, int, float, float, float]:
        gcpu = sum(proc_cpu(p.pid) for p in gen.procs if p.pid is not None)
        return gen.total(roles), gen.total(other), proc_cpu(broker.pid), gcpu, time.monotonic()

    n0, o0, c0, g0, t0 = sample()
    time.sleep(s.measure)
    n1, o1, c1, g1, t1 = sample()
    gen.check()
    if spy is not None:
        try:
            spy.wait(s.measure + 10)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    n = n1 - n0
    if n <= 0:
        raise LoadGenError(f"nothing counted in {t1 - t0:.1f} s")
    return Rate(
        n / (t1 - t0),
        (c1 - c0) / n * 10_000,
        (g1 - g0) / n * 10_000,
        f"load avg {la0:.1f}->{loadavg():.1f}",
        (o1 - o0) / (t1 - t0),
    )


def run_publishers(
    broker: Broker, s: Settings, qos: int, telemetry: bool, profile: Path | None = None
) -> Rate:
    role = "pub1" if qos else "pub0"
    topic = "devices/bench-{n}/telemetry" if telemetry else "bench/plain/{n}"
    jobs = [
        Job(
            role,
            "127.0.0.1",
            broker.port,
            conns=c,
            client_prefix=f"p{qos}-{i}",
            topic=topic,
            payload=TELEMETRY_PAYLOAD,
            window=s.window if qos else 4,
            batch=s.batch,
            first_n=i * 100_000,
        )
        for i, c in enumerate(split(s.publishers, s.procs))
    ]
    gen = LoadGen(jobs)
    try:
        return measure_rate(broker, gen, s, (role,), (), profile)
    finally:
        gen.stop()


def run_fanout(broker: Broker, s: Settings, profile: Path | None = None) -> Rate:
    topic = "bench/fanout"
    jobs = [
        Job(
            "sub",
            "127.0.0.1",
            broker.port,
            conns=c,
            client_prefix=f"s{i}",
            topic=topic,
            payload=TELEMETRY_PAYLOAD,
            first_n=i * 100_000,
        )
        for i, c in enumerate(split(s.subscribers, max(1, s.procs - 1)))
    ]
    # The publisher only has to keep the broker busy; what counts is what
    # reaches the subscribers. 4 batches of 50 in flight: 200 messages, i.e.
    # 10,000 deliveries queued at most per PINGRESP round trip.
    jobs.append(
        Job(
            "pub0",
            "127.0.0.1",
            broker.port,
            conns=1,
            client_prefix="fan-pub",
            topic=topic,
            payload=TELEMETRY_PAYLOAD,
            window=2,
            batch=20,
        )
    )
    gen = LoadGen(jobs)
    try:
        return measure_rate(broker, gen, s, ("sub",), ("pub0",), profile)
    finally:
        gen.stop()


def run_idle(broker: Broker, s: Settings) -> tuple[float, float, float]:
    """(RSS MB with the idle clients, KB per client, seconds to connect them)."""
    time.sleep(0.5)  # let start-up allocations settle before the baseline
    rss0 = proc_rss(broker.pid)
    jobs = [
        Job(
            "idle", "127.0.0.1", broker.port, conns=c, client_prefix=f"idle{i}", first_n=i * 100_000
        )
        for i, c in enumerate(split(s.idle, s.procs))
    ]
    gen = LoadGen(jobs)
    try:
        took = gen.start(timeout=180)
        time.sleep(1.0)  # let the broker finish per-connection set-up
        gen.check()
        rss1 = proc_rss(broker.pid)
    finally:
        gen.stop()
    return rss1 / 1e6, (rss1 - rss0) / s.idle / 1024, took


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """The functions with the most samples in a py-spy raw profile, by own
    time and including callees (percent of all samples of all threads)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return [f"(no profile written to {path})"]
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return ["(empty profile)"]
    out = [f"{total} samples; own time:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in sorted(own.items(), key=lambda x: -x[1])[:top]]
    out.append("including callees:")
    skip = (
        *("<module>", "_run_module_as_main", "_run_code", "Runner.run", "Thread.", "main ("),
        *("cmd_run", "_run_async"),
    )
    ranked = [
        (f, n) for f, n in sorted(incl.items(), key=lambda x: -x[1]) if not f.startswith(skip)
    ]
    out += [f"  {n / total:6.1%}  {f}" for f, n in ranked[:top]]
    return out


def goal_lines(figs: dict[tuple[str, str], Figure], s: Settings) -> list[str]:
    """The issue's goals, checked against this run's figures."""
    out = []
    checks = [
        (
            f"{s.publishers} publishers QoS 1, telemetry",
            "messages/s",
            "QoS 1 ingest >= 1.0x Mosquitto",
            1.0,
        ),
        (
            f"{s.publishers} publishers QoS 1, plain topics",
            "messages/s",
            "QoS 1, broker only (no telemetry) >= 1.0x Mosquitto",
            1.0,
        ),
        (f"fan-out 1 -> {s.subscribers}", "delivered messages/s", "fan-out >= 0.5x Mosquitto", 0.5),
    ]
    for load, metric, goal, want in checks:
        f = figs.get((load, metric))
        r = f.ratio() if f else None
        if r is not None:
            out.append(f"- {goal}: {r:.2f}x, {'met' if r >= want else 'NOT met'}")
    f = figs.get((f"{s.idle:,} idle clients", "broker RSS"))
    rss = f.values.get("edgeway") if f else None
    if rss is not None:
        scaled = f" (only {s.idle:,} clients in this run)" if s.idle != IDLE_CLIENTS else ""
        out.append(
            f"- {s.idle:,} idle clients in <= 150 MB RSS: {rss:.0f} MB{scaled}, "
            f"{'met' if rss <= 150 else 'NOT met'}"
        )
    return out


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def mosquitto_version() -> str:
    try:
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~10 s per load and broker")
    ap.add_argument("--only", action="append", choices=LOADS)
    ap.add_argument("--brokers", default="mosquitto,edgeway")
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--window", type=int, default=16, help="QoS 1 messages in flight per client")
    ap.add_argument("--batch", type=int, default=100, help="QoS 0 publishes per PINGREQ")
    ap.add_argument("--idle-clients", type=int, default=IDLE_CLIENTS)
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record edgeway with py-spy during each rate measurement; write DIR/LOAD.txt "
        "(collapsed stacks) and add the top functions to the results",
    )
    ap.add_argument(
        "--mosquitto-nodelay", action="store_true", help="set_tcp_nodelay true for Mosquitto"
    )
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here (run_all.py)")
    args = ap.parse_args(argv)

    s = Settings(
        warmup=2.0 if args.quick else 5.0,
        measure=8.0 if args.quick else 20.0,
        procs=args.procs,
        window=args.window,
        batch=args.batch,
        publishers=100,
        subscribers=50,
        idle=args.idle_clients,
        profile=args.profile,
    )
    loads = args.only or LOADS
    brokers = args.brokers.split(",")
    nofile = raise_nofile()
    if nofile < s.idle + 100 and "idle" in loads:
        print(f"RLIMIT_NOFILE is {nofile}: fewer idle clients than asked", file=sys.stderr)
        s.idle = max(100, nofile // 2 - 500)

    header = [
        f"date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"commit: {git_commit()}",
        f"machine: {os.cpu_count()} CPUs, load average at start {loadavg():.1f}",
        f"mosquitto: {mosquitto_version()}",
        f"settings: warm-up {s.warmup:.0f} s, measure {s.measure:.0f} s, {s.procs} load processes, "
        f"QoS 1 window {s.window}/client (refilled at half), "
        f"QoS 0 batch {s.batch} + PINGREQ (4 batches in flight), "
        f"Mosquitto set_tcp_nodelay {'true' if args.mosquitto_nodelay else 'false (default)'}, "
        f"payload {len(TELEMETRY_PAYLOAD)} B JSON",
    ]
    for line in header:
        print(line)
    figures: list[Figure] = []
    fig_by_key: dict[tuple[str, str], Figure] = {}

    def fig(load: str, metric: str, unit: str, higher: bool) -> Figure:
        key = (load, metric)
        if key not in fig_by_key:
            fig_by_key[key] = Figure(load, metric, unit, higher)
            figures.append(fig_by_key[key])
        return fig_by_key[key]

    errors: list[str] = []
    profiles: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgeway-bench-", dir="/var/tmp") as tmp:
        for load in loads:
            for name in brokers:
                broker = Broker(name, Path(tmp), args.mosquitto_nodelay)
                label = {
                    "qos0": f"{s.publishers} publishers QoS 0, telemetry",
                    "qos1": f"{s.publishers} publishers QoS 1, telemetry",
                    "qos0-plain": f"{s.publishers} publishers QoS 0, plain topics",
                    "qos1-plain": f"{s.publishers} publishers QoS 1, plain topics",
                    "fanout": f"fan-out 1 -> {s.subscribers}",
                    "idle": f"{s.idle:,} idle clients",
                }[load]
                profile = (
                    s.profile / f"{load}.txt"
                    if s.profile is not None and name == "edgeway" and load != "idle"
                    else None
                )
                print(f"-- {label}: {name} ...", flush=True)
                try:
                    broker.start()
                    if load.startswith("qos"):
                        qos = 1 if load.startswith("qos1") else 0
                        r = run_publishers(broker, s, qos, not load.endswith("plain"), profile)
                        f = fig(label, "messages/s", "msg/s", True)
                        f.values[name] = r.per_s
                        f.notes[name] = (
                            f"{r.note}; load generator {r.loadgen_cpu_10k:.3f} CPU-s/10k"
                        )
                        fig(label, "broker CPU-s per 10k msgs", "CPU-s", False).values[name] = (
                            r.broker_cpu_10k
                        )
                        print(
                            f"   {r.per_s:,.0f} msg/s, {r.broker_cpu_10k:.3f} CPU-s/10k "
                            f"({f.notes[name]})"
                        )
                    elif load == "fanout":
                        r = run_fanout(broker, s, profile)
                        f = fig(label, "delivered messages/s", "msg/s", True)
                        f.values[name] = r.per_s
                        expected = r.other_per_s * s.subscribers
                        f.notes[name] = (
                            f"{r.note}; load generator {r.loadgen_cpu_10k:.3f} CPU-s/10k; "
                            f"{r.other_per_s:,.0f} published/s, delivered "
                            f"{r.per_s / expected if expected else 0:.0%} of published x {s.subscribers}"
                        )
                        fig(label, "broker CPU-s per 10k deliveries", "CPU-s", False).values[
                            name
                        ] = r.broker_cpu_10k
                        print(
                            f"   {r.per_s:,.0f} deliveries/s, {r.broker_cpu_10k:.3f} CPU-s/10k "
                            f"({f.notes[name]})"
                        )
                    else:
                        rss, per_client, took = run_idle(broker, s)
                        fig(label, "broker RSS", "MB", False).values[name] = rss
                        fig(label, "RSS per client", "KB", False).values[name] = per_client
                        fig(label, "time to connect all", "s", False).values[name] = took
                        print(
                            f"   RSS {rss:.1f} MB ({per_client:.1f} KB/client), connected in {took:.1f} s"
                        )
                except (RuntimeError, LoadGenError, OSError) as e:
                    msg = f"{label} / {name}: {e}"
                    errors.append(msg)
                    print(f"   FAILED: {e}", flush=True)
                    if broker.proc is not None and broker.proc.poll() is not None:
                        print(f"   broker output: {broker.tail()}")
                finally:
                    broker.stop()
                if profile is not None and profile.exists():
                    summary = summarize_profile(profile)
                    print("\n".join("   " + line for line in summary))
                    profiles += [f"{label} (edgeway, {profile}):", "", "```", *summary, "```", ""]

    print()
    rows = [
        "| load | metric | edgeway | Mosquitto | edgeway/Mosquitto |",
        "|---|---|---|---|---|",
    ]
    print(f"{'load':28} {'metric':34} {'edgeway':>12} {'mosquitto':>12} {'ratio':>7}")
    for f in figures:
        ratio = f.ratio()
        rs = "n/a" if ratio is None else f"{ratio:.2f}x"
        ev, mv = fmt(f.values.get("edgeway")), fmt(f.values.get("mosquitto"))
        print(f"{f.load:28} {f.metric + ' (' + f.unit + ')':34} {ev:>12} {mv:>12} {rs:>7}")
        rows.append(f"| {f.load} | {f.metric} ({f.unit}) | {ev} | {mv} | {rs} |")
    notes = [
        f"- {f.load}, {name}: {note}" for f in figures for name, note in sorted(f.notes.items())
    ]
    if errors:
        print("\nerrors:")
        for err in errors:
            print(f"  {err}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "figures": [
                        {"load": f.load, "metric": f.metric, "unit": f.unit, "values": f.values}
                        for f in figures
                    ],
                    "errors": errors,
                }
            )
        )

    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        day = dt.date.today().isoformat()
        out = RESULTS / f"mqtt_broker-{day}.md"
        if out.exists():
            out = RESULTS / f"mqtt_broker-{day}-{dt.datetime.now():%H%M%S}.md"
        text = ["# MQTT broker benchmark: edgeway vs Mosquitto", ""]
        text += [f"- {h}" for h in header]
        text += ["", *rows, ""]
        goals = goal_lines(fig_by_key, s)
        if goals:
            text += ["Goals (issue 2, section 5):", "", *goals, ""]
        if notes:
            text += ["Conditions per measurement:", "", *notes, ""]
        if errors:
            text += ["Failures:", "", *[f"- {err}" for err in errors], ""]
        if profiles:
            text += [
                "py-spy profiles of edgeway (sampled during the window, so those rates are "
                "somewhat lower than unprofiled ones):",
                "",
                *profiles,
            ]
        text += [
            "Ratios: for rates higher is better for edgeway; for CPU-s and RSS lower is better.",
            "Command: `.venv/bin/python bench/mqtt_broker.py "
            + " ".join(sys.argv[1:] if argv is None else argv)
            + "`",
            "",
        ]
        out.write_text("\n".join(text))
        print(f"\nwritten: {out.relative_to(ROOT)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
