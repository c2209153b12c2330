"""End to end: devices -> edgeway (MQTT, outbox on disk) -> sink -> a receiver.

Not a test. Usage::

    .venv/bin/python bench/end_to_end.py [--quick] [--sinks http,mqtt] [--json OUT.json]

What runs (everything on free loopback ports; ``edgeway run`` is a child
process started fresh for each sink; the durability is the default, fsync):

- **cold start**: ``edgeway run`` from ``Popen`` until ``/healthz`` answers 200
  (interpreter start, imports, outbox open, listeners bound), and its RSS then
  (idle, no devices).
- **throughput (W1)**: 100 MQTT connections publish ~100-byte JSON telemetry
  at QoS 1, 16 messages in flight each, as fast as the gateway acknowledges
  (``loadgen.py``, in worker processes). Reported: records/s that *reach the
  receiver* over the window (the end-to-end rate), records/s the gateway
  acknowledged (stored), the gateway's CPU-seconds per 1,000 delivered
  records and its peak RSS.
- **latency (W2)**: 100 devices (the simulator's MQTT fleet, gmqtt, in a child
  process) at 10 messages/s each = 1,000 records/s, each stamped with its
  send time; latency = arrival at the receiver minus that stamp, p50/p99/max;
  and the gateway's CPU-seconds per 1,000 records at that rate.
- **drain after an outage** (HTTP sink): the receiver refuses connections
  while ``--backlog`` records are published and stored; then it comes back
  and the time until all have arrived gives the drain rate.
- **reference, same run**: the same W1 load against a Mosquitto with no
  gateway (what the load generator and this machine can do at all).

Cases (``--sinks``, see :data:`CASES`): ``http`` posts to an aiohttp
receiver in this process (the bundled :class:`edgeway.sim.cloud.CloudReceiver`);
``mqtt`` publishes to a Mosquitto started here on a free port, counted by a
subscriber in this process; ``mqtt311`` the same over MQTT 3.1.1. With
``-default`` the Mosquitto is at the package's defaults (Receive Maximum and
in-flight window 20, Nagle on), the cloud broker most people point a gateway
at; without, tuned (``max_inflight_messages 1000``, ``set_tcp_nodelay true``).
``client...`` cases run the gateway in MQTT client mode: devices publish to
a Mosquitto (configured like the cloud one) that the gateway subscribes to,
as Node-RED would. The Mosquitto-bridge reference runs with each
configuration used.

``--hogs N`` (with ``--rounds``) runs N busy-loop processes beside the
rounds: every system then gets a share of two cores, as in the machine's
slow spells (when the bridge, which waits on its window of 20 more than it
computes, keeps its rate and a gateway that computes more per record does
not). A reproducible stand-in for those spells: with 4 the gateway's rate
fell to what the slow spells had shown (0.77-0.91x the bridge, 2026-12-07).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Job, LoadGen, split

MOSQUITTO = "/usr/sbin/mosquitto"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PAYLOAD = b'{"temp": 21.5, "hum": 40.2, "on": true, "battery": 3.71, "rssi": -67}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------- receivers


class LoopThread:
    """An asyncio loop in a thread, for the receivers (the harness itself is sync)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class HttpReceiver:
    """The bundled cloud receiver (aiohttp), counting records and latencies."""

    def __init__(self, lt: LoopThread) -> None:
        from edgeway.sim.cloud import CloudReceiver

        self.lt = lt
        self.cloud = CloudReceiver("127.0.0.1", 0)
        lt.run(self.cloud.start())
        self.url = self.cloud.url

    def count(self) -> int:
        return self.cloud.stats.unique

    def latencies(self) -> list[float]:
        return self.cloud.stats.latencies

    def reset_latencies(self) -> None:
        self.cloud.stats.latencies = []

    def down(self) -> None:
        self.lt.run(self.cloud.take_down("refuse"))

    def up(self) -> None:
        self.lt.run(self.cloud.bring_up())

    def close(self) -> None:
        self.lt.run(self.cloud.stop())


TUNED = "max_inflight_messages 1000\nset_tcp_nodelay true\n"
"""What a broker set up for a gateway has; the package's defaults are a window
of 20 (MQTT 5 Receive Maximum and outgoing in-flight) and Nagle left on."""


class Mosquitto:
    """``tuned``: with :data:`TUNED`; otherwise Mosquitto's defaults except for
    the listener and ``max_queued_messages`` (raised so that a counting
    subscriber or a gateway in client mode that falls behind is never the
    one losing messages: MEASUREMENTS.md, docs/protocols/mqtt-client.md)."""

    def __init__(self, workdir: Path, extra: str = "", tuned: bool = True) -> None:
        self.port = free_port()
        conf = workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n"
            "max_queued_messages 10000000\npersistence false\n" + (TUNED if tuned else "") + extra
        )
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_tcp(self.port, 10)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class MqttReceiver:
    """A subscriber on the sink's Mosquitto (QoS 0, ``edgeway/#``), counting
    records and their latencies.

    Raw MQTT 3.1.1 over a blocking socket in a thread rather than paho: a
    Python client that parses every PUBLISH into an object and (at QoS 1)
    answers each one tops out near the gateway's own rate on this machine, and
    the counter must never be what limits the figure. Latency stamps are read
    (JSON-decoded) only while ``timing`` is on.
    """

    def __init__(self, port: int, topic_filter: str = "edgeway/#") -> None:
        from loadgen import connect_packet, subscribe_packet

        self.n = 0
        self._lat: list[float] = []
        self.timing = False
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet("e2e-counter", 600))
        self.sock.sendall(subscribe_packet(1, topic_filter, 0))
        self._suback = threading.Event()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._suback.wait(10):
            raise RuntimeError("subscriber got no SUBACK")

    def _run(self) -> None:
        import orjson

        buf = b""
        quickack = getattr(socket, "TCP_QUICKACK", None)
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            if quickack is not None:
                # A broker with Nagle on (the default config) holds its next
                # PUBLISH until this ACK; a subscriber that never writes would
                # let the kernel delay it 40 ms. The harness must not add that.
                self.sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            now = time.time()
            buf = buf + data if buf else data
            i, end = 0, len(buf)
            while i + 2 <= end:
                # Fixed header, then the remaining length (variable byte integer).
                j, mult, length = i + 1, 1, 0
                while j < end:
                    b = buf[j]
                    length += (b & 0x7F) * mult
                    mult *= 128
                    j += 1
                    if not b & 0x80:
                        break
                else:
                    break
                if buf[j - 1] & 0x80 or j + length > end:
                    break
                kind = buf[i] >> 4
                if kind == 3:
                    tlen = (buf[j] << 8) | buf[j + 1]
                    payload = buf[j + 2 + tlen : j + length]
                    if self.timing:
                        try:
                            doc = orjson.loads(payload)
                        except orjson.JSONDecodeError:
                            doc = None
                        recs = (
                            doc
                            if isinstance(doc, list)
                            else (doc.get("records", [doc]) if isinstance(doc, dict) else [])
                        )
                        for r in recs:
                            ts = r.get("ts") if isinstance(r, dict) else None
                            if isinstance(ts, int | float):
                                self._lat.append(now - ts)
                            self.n += 1
                    elif payload[:1] == b"[" or b'"records"' in payload[:40]:
                        self.n += (
                            len(orjson.loads(payload).get("records", []))
                            if payload[:1] != b"["
                            else len(orjson.loads(payload))
                        )
                    else:
                        self.n += 1
                elif kind == 9:
                    self._suback.set()
                i = j + length
            buf = buf[i:]

    def count(self) -> int:
        return self.n

    def latencies(self) -> list[float]:
        return self._lat

    def reset_latencies(self) -> None:
        self._lat = []
        self.timing = True

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


# ---------------------------------------------------------------- the gateway


def wait_tcp(port: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port} after {limit} s")


@dataclasses.dataclass(frozen=True, slots=True)
class Case:
    """One gateway set-up the bench measures (``--sinks`` names them)."""

    sink: str
    """``http`` or ``mqtt``."""
    protocol: str = "5"
    """The MQTT sink's protocol."""
    tuned: bool = True
    """The MQTT brokers (cloud side, and device side in client mode) with
    :data:`TUNED`; otherwise at the package's defaults."""
    client_mode: bool = False
    """Devices publish to a Mosquitto that the gateway subscribes to (MQTT 5)."""
    connections: int | None = None
    """The MQTT sink's ``connections`` option (None: its default, ``auto``)."""

    def config(self, cloud_url: str, device_port: int | None) -> str:
        """The gateway's YAML configuration (sink and, in client mode, the subscription)."""
        out = f"sinks:\n  - name: cloud\n    url: {cloud_url}\n"
        if self.sink == "mqtt":
            conns = "" if self.connections is None else f", connections: {self.connections}"
            out += f'    options: {{protocol: "{self.protocol}"{conns}}}\n'
        if device_port is not None:
            out += (
                f"mqtt_client:\n  - name: devices\n    url: mqtt://127.0.0.1:{device_port}\n"
                '    subscriptions:\n      - topic: "devices/{device_id}/telemetry"\n'
            )
        return out


CASES = {
    "http": Case("http"),
    "mqtt": Case("mqtt"),
    "mqtt311": Case("mqtt", "3.1.1"),
    "mqtt-default": Case("mqtt", tuned=False),
    "mqtt-default-c1": Case("mqtt", tuned=False, connections=1),
    "mqtt-default-c2": Case("mqtt", tuned=False, connections=2),
    "mqtt-default-c4": Case("mqtt", tuned=False, connections=4),
    "mqtt-default-c8": Case("mqtt", tuned=False, connections=8),
    "mqtt-default-c16": Case("mqtt", tuned=False, connections=16),
    "mqtt311-default": Case("mqtt", "3.1.1", tuned=False),
    "client": Case("mqtt", client_mode=True),
    "client-default": Case("mqtt", tuned=False, client_mode=True),
    "client311-default": Case("mqtt", "3.1.1", tuned=False, client_mode=True),
}
"""``-default``: the brokers at Mosquitto's package defaults (the cloud broker
most people point a gateway at); ``client``: client mode, subscribing to the
devices' Mosquitto, as Node-RED does."""


class Edgeway:
    """``edgeway run`` as a child process, ready when /healthz says so.

    ``load_port`` is where devices publish: the gateway's own broker, or with
    ``config`` subscribing to another broker (client mode) that one."""

    def __init__(
        self,
        workdir: Path,
        sink: str | None,
        data_dir: Path | None = None,
        config: str | None = None,
        load_port: int | None = None,
        src: Path | None = None,
    ) -> None:
        """``data_dir``: start on that existing data (a restart); default: a fresh one.
        ``src``: run the edgeway package found there (a baseline checkout's
        ``src``) instead of the installed one."""
        self.port = free_port()
        self.load_port = load_port or self.port
        self.admin = free_port()
        data = data_dir or workdir / f"edgeway-{self.port}"
        if data_dir is None:
            shutil.rmtree(data, ignore_errors=True)
        self.data_dir = data
        args = [
            sys.executable, "-m", "edgeway", "run", "--data-dir", str(data),
            "--mqtt-listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}",
            "--gateway-id", "bench", "--log-level", "warning",
        ]  # fmt: skip
        if sink:
            args += ["--sink", sink]
        if config:
            cfg = workdir / f"edgeway-{self.port}.yaml"
            cfg.write_text(config)
            args += ["--config", str(cfg)]
        self.log = workdir / f"edgeway-{self.port}.log"
        t0 = time.monotonic()
        env = None
        if src is not None:
            env = dict(
                os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
            )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env
            )
        deadline = t0 + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgeway exited: {self.log.read_text()[-500:]}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.admin}/healthz", timeout=1
                ) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("edgeway not ready in 30 s")
            time.sleep(0.005)
        self.cold_start_ms = (time.monotonic() - t0) * 1000
        self.pid = self.proc.pid

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/api/status", timeout=30) as r:
            return dict(json.load(r))

    def sink_counters(self) -> dict[str, int]:
        return dict(next(iter(self.status()["outbox"].values()), {}))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cold_start(workdir: Path, runs: int) -> dict[str, float]:
    """Median cold start (ms) and idle RSS (MB) of ``edgeway run`` with no devices."""
    starts, rss = [], []
    for _ in range(runs):
        gw = Edgeway(workdir, None)
        try:
            starts.append(gw.cold_start_ms)
            time.sleep(0.5)  # let start-up garbage settle
            rss.append(proc_rss_mb(gw.pid))
        finally:
            gw.close()
    return {"cold_start_ms": statistics.median(starts), "idle_rss_mb": statistics.median(rss)}


# ---------------------------------------------------------------- loads


def w1_jobs(port: int, procs: int, limit: int = 0, prefix: str = "e2e") -> list[Job]:
    return [
        Job(
            "pub1", "127.0.0.1", port, conns=c, client_prefix=f"{prefix}{i}",
            topic="devices/bench-{n}/telemetry", payload=PAYLOAD, window=16, first_n=i * 100_000,
            limit=limit,
        )
        for i, c in enumerate(split(100, procs))
    ]  # fmt: skip


def fixed_run(
    gw: Edgeway | Bridge | _Target, recv: HttpReceiver | MqttReceiver, records: int, procs: int
) -> dict[str, float]:
    """W1 as MEASUREMENTS.md defines it for the peers: ``records`` records
    (100 devices, QoS 1) as fast as possible; the rate is records over the
    time from the first publish until the last record is at the receiver, and
    the CPU is the gateway's over that same time. Ingest and delivery share
    the gateway's CPU here, so this is the rate it sustains end to end."""
    per_conn = records // 100
    gen = LoadGen(w1_jobs(gw.load_port, procs, per_conn, prefix="fix"))
    base = recv.count()
    target = base + per_conn * 100
    try:
        gen.start(timeout=60)
        cpu0, t0 = proc_cpu(gw.pid), time.monotonic()
        gen.go()
        peak = 0.0
        acked_at = None
        deadline = t0 + 300
        while recv.count() < target and time.monotonic() < deadline:
            time.sleep(0.005)
            if acked_at is None and gen.total() >= per_conn * 100:
                acked_at = time.monotonic()
            peak = max(peak, proc_rss_mb(gw.pid))
        t1, cpu1 = time.monotonic(), proc_cpu(gw.pid)
        gen.check()
    finally:
        gen.stop()
    n = recv.count() - base
    return {
        "records": float(n),
        "per_s": n / (t1 - t0),
        "acked_in_s": (acked_at or t1) - t0,
        "seconds": t1 - t0,
        "cpu_s_per_1k": (cpu1 - cpu0) / max(n, 1) * 1000,
        "peak_rss_mb": peak,
    }


def throughput(
    gw: Edgeway, recv: HttpReceiver | MqttReceiver, warmup: float, measure: float, procs: int
) -> dict[str, float]:
    gen = LoadGen(w1_jobs(gw.load_port, procs))
    try:
        gen.start(timeout=60)
        gen.go()
        time.sleep(warmup)
        gen.check()
        # Delivered = confirmed by the remote side (2xx, PUBACK): the gateway's
        # own counter, so a slow counting subscriber cannot understate it.
        c0 = gw.sink_counters().get("delivered", 0)
        a0, cpu0, t0 = gen.total(), proc_cpu(gw.pid), time.monotonic()
        peak = 0.0
        while time.monotonic() - t0 < measure:
            time.sleep(0.25)
            peak = max(peak, proc_rss_mb(gw.pid))
        c1 = gw.sink_counters().get("delivered", 0)
        a1, cpu1, t1 = gen.total(), proc_cpu(gw.pid), time.monotonic()
        gen.check()
    finally:
        gen.stop()
    delivered, stored = c1 - c0, a1 - a0
    return {
        "delivered_per_s": delivered / (t1 - t0),
        "acked_per_s": stored / (t1 - t0),
        # Each record costs its ingest and its delivery; over the window the
        # gateway did `stored` ingests and `delivered` deliveries.
        "cpu_s_per_1k": (cpu1 - cpu0) / max((stored + delivered) / 2, 1) * 1000,
        "peak_rss_mb": peak,
    }


def reference_ceiling(workdir: Path, warmup: float, measure: float, procs: int) -> float:
    """W1 against a bare Mosquitto: the harness's ceiling on this machine now."""
    mq = Mosquitto(workdir)
    gen = LoadGen(w1_jobs(mq.port, procs))
    try:
        gen.start(timeout=60)
        gen.go()
        time.sleep(warmup)
        a0, t0 = gen.total(), time.monotonic()
        time.sleep(measure)
        a1, t1 = gen.total(), time.monotonic()
    finally:
        gen.stop()
        mq.close()
    return (a1 - a0) / (t1 - t0)


class Bridge:
    """The peer to beat, on this machine now: devices -> Mosquitto with a QoS 1
    bridge -> a second Mosquitto, and a counting subscriber on the second, as
    MEASUREMENTS.md measured it (29,500 records/s at 0.016 CPU-s per 1,000
    there). Neither Mosquitto stores anything on disk; the CPU measured is the
    bridging Mosquitto's (``pid``), where devices publish (``load_port``)."""

    def __init__(self, workdir: Path, tuned: bool = True) -> None:
        self.cloud = Mosquitto(workdir, tuned=tuned)
        self.edge = Mosquitto(
            workdir,
            tuned=tuned,
            extra=f"connection cloud\naddress 127.0.0.1:{self.cloud.port}\ntopic devices/# out 1\n"
            "cleansession true\nbridge_protocol_version mqttv311\n",
        )
        self.recv = MqttReceiver(self.cloud.port, "devices/#")
        self.load_port = self.edge.port
        self.pid = self.edge.proc.pid
        time.sleep(1.0)  # the bridge connects on its own schedule

    def close(self) -> None:
        self.recv.close()
        self.edge.close()
        self.cloud.close()


def mosquitto_bridge(
    workdir: Path,
    records: int,
    procs: int,
    tuned: bool = True,
    w2: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The same fixed W1 through a :class:`Bridge` (started for this run); with
    ``w2`` (warm-up, measured seconds) also W2 through it, for the latency to
    compare with."""
    bridge = Bridge(workdir, tuned)
    try:
        out: dict[str, Any] = fixed_run(bridge, bridge.recv, records, procs)
        if w2 is not None:
            out["w2"] = latency(bridge, bridge.recv, *w2)
    finally:
        bridge.close()
    return out


def _fleet_child(port: int, devices: int, rate: float, seconds: float) -> None:
    """Child process: the simulator's MQTT fleet at a steady rate."""
    from edgeway.sim.devices import make_devices
    from edgeway.sim.runner import MqttFleet

    async def main() -> None:
        devs = make_devices(devices, prefix="lat", seed=1, rate=rate, bursts_per_hour=0.0)
        fleet = MqttFleet(devs, "127.0.0.1", port, qos=1)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await fleet.run(stop, drain=0.0)

    asyncio.run(main())


def latency(
    gw: Edgeway | Bridge | _Target,
    recv: HttpReceiver | MqttReceiver,
    warmup: float,
    measure: float,
) -> dict[str, float]:
    child = mp.get_context("spawn").Process(
        target=_fleet_child, args=(gw.load_port, 100, 10.0, warmup + measure + 1.0)
    )
    child.start()
    try:
        # The child needs a few seconds to import and connect 100 devices.
        c = recv.count()
        deadline = time.monotonic() + 60
        while recv.count() < c + 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(warmup)
        recv.reset_latencies()
        c0, cpu0, t0 = recv.count(), proc_cpu(gw.pid), time.monotonic()
        time.sleep(measure)
        c1, cpu1, t1 = recv.count(), proc_cpu(gw.pid), time.monotonic()
        lat = [x * 1000 for x in recv.latencies()]
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.terminate()
            child.join()
    n = c1 - c0
    return {
        "rate_per_s": n / (t1 - t0),
        "p50_ms": pct(lat, 0.50),
        "p99_ms": pct(lat, 0.99),
        "max_ms": max(lat) if lat else float("nan"),
        "cpu_s_per_1k": (cpu1 - cpu0) / max(n, 1) * 1000,
        "rss_mb": proc_rss_mb(gw.pid),
    }


class _Target:
    """What :func:`latency` measures against: a port to publish to, a pid to time."""

    def __init__(self, port: int, pid: int) -> None:
        self.load_port = port
        self.pid = pid


NODE_RED_FLOW = [
    {"id": "relay", "type": "tab", "label": "relay"},
    {"id": "devices", "type": "mqtt-broker", "broker": "127.0.0.1", "port": "{devices}",
     "clientid": "nr-in", "protocolVersion": "4", "keepalive": "60", "cleansession": True,
     "autoConnect": True},
    {"id": "cloud", "type": "mqtt-broker", "broker": "127.0.0.1", "port": "{cloud}",
     "clientid": "nr-out", "protocolVersion": "4", "keepalive": "60", "cleansession": True,
     "autoConnect": True},
    {"id": "in", "type": "mqtt in", "z": "relay", "topic": "devices/+/telemetry", "qos": "1",
     "datatype": "buffer", "broker": "devices", "wires": [["out"]]},
    {"id": "out", "type": "mqtt out", "z": "relay", "topic": "", "qos": "1", "retain": "false",
     "broker": "cloud", "wires": []},
]  # fmt: skip
"""Node-RED as MEASUREMENTS.md ran it: MQTT in (QoS 1) wired to MQTT out (QoS 1)."""


def node_red(
    workdir: Path, red_js: Path, args: argparse.Namespace, tuned: bool, warm: float, meas: float
) -> dict[str, Any]:
    """The same fixed W1 and W2 through Node-RED (``--node-red``, not installed by
    the project: ``npm install node-red`` somewhere and give its red.js). Devices
    publish to a Mosquitto that Node-RED subscribes to; it publishes to a second
    one, as edgeway's client mode does. The CPU is Node-RED's."""
    devices, cloud = Mosquitto(workdir, tuned=tuned), Mosquitto(workdir, tuned=tuned)
    recv = MqttReceiver(cloud.port, "devices/#")
    user = workdir / f"node-red-{devices.port}"
    user.mkdir()
    flow = json.dumps(NODE_RED_FLOW)
    flow = flow.replace('"{devices}"', f'"{devices.port}"').replace('"{cloud}"', f'"{cloud.port}"')
    (user / "flows.json").write_text(flow)
    port = free_port()
    log_path = workdir / f"node-red-{port}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        ["node", str(red_js), "-u", str(user), "-p", str(port), "flows.json"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60  # both MQTT nodes connect on their own schedule
        while log_path.read_bytes().count(b"Connected to broker") < 2:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"node-red not connected: {log_path.read_text()[-500:]}")
            time.sleep(0.1)
        time.sleep(0.5)  # the subscription's SUBACK
        target = _Target(devices.port, proc.pid)
        fixed_run(target, recv, 20_000, args.procs)
        res: dict[str, Any] = {
            "w1_fixed": fixed_run(target, recv, args.records, args.procs),
            "w2": latency(target, recv, warm, meas),
        }
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        recv.close()
        devices.close()
        cloud.close()
    return res


def latency_floor(workdir: Path, warmup: float, measure: float) -> dict[str, float]:
    """W2 with no gateway: the fleet publishes to a Mosquitto the counting
    subscriber reads directly, so p50/p99 are the harness's own (the fleet's
    Python client, Mosquitto, the receiver) on this machine now."""
    mq = Mosquitto(workdir)
    recv = MqttReceiver(mq.port, topic_filter="devices/#")
    try:
        return latency(_Target(mq.port, mq.proc.pid), recv, warmup, measure)
    finally:
        recv.close()
        mq.close()


def drain_after_outage(
    gw: Edgeway, recv: HttpReceiver, backlog: int, procs: int
) -> dict[str, float]:
    base = recv.count()
    recv.down()
    gen = LoadGen(w1_jobs(gw.port, procs))
    try:
        gen.start(timeout=60)
        gen.go()
        while gen.total() < backlog:
            time.sleep(0.05)
    finally:
        gen.stop()
    stored = gw.sink_counters().get("accepted", 0)
    target = base + (stored - base)
    recv.up()
    t0 = time.monotonic()
    deadline = t0 + 300
    while recv.count() < target and time.monotonic() < deadline:
        time.sleep(0.02)
    took = time.monotonic() - t0
    return {"backlog": float(stored - base), "drain_per_s": (recv.count() - base) / took}


@contextlib.contextmanager
def receiver(case: Case, lt: LoopThread, workdir: Path) -> Iterator[tuple[Any, str]]:
    if case.sink == "http":
        r = HttpReceiver(lt)
        try:
            yield r, r.url
        finally:
            r.close()
    else:
        mq = Mosquitto(workdir, tuned=case.tuned)
        r2 = MqttReceiver(mq.port)
        try:
            yield r2, f"mqtt://127.0.0.1:{mq.port}"
        finally:
            r2.close()
            mq.close()


@contextlib.contextmanager
def gateway(case: Case, workdir: Path, url: str, src: Path | None = None) -> Iterator[Edgeway]:
    """``edgeway run`` for ``case``, with the devices' Mosquitto in client mode
    (``src``: see :class:`Edgeway`)."""
    devices = Mosquitto(workdir, tuned=case.tuned) if case.client_mode else None
    try:
        port = devices.port if devices else None
        gw = Edgeway(workdir, None, config=case.config(url, port), load_port=port, src=src)
        try:
            yield gw
        finally:
            gw.close()
    finally:
        if devices is not None:
            devices.close()


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    warm, meas = (1.0, 4.0) if args.quick else (3.0, 15.0)
    out: dict[str, Any] = {"quick": args.quick}
    lt = LoopThread()
    with tempfile.TemporaryDirectory(prefix="edgeway-e2e-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        out["cold"] = cold_start(work, 2 if args.quick else 5)
        say(f"cold start {out['cold']['cold_start_ms']:.0f} ms, idle RSS "
            f"{out['cold']['idle_rss_mb']:.1f} MB")  # fmt: skip
        out["reference_w1_per_s"] = reference_ceiling(work, warm, meas, args.procs)
        say(f"reference: load generator -> Mosquitto {out['reference_w1_per_s']:,.0f} msg/s")
        kinds = args.sinks.split(",")
        unknown = [k for k in kinds if k not in CASES]
        if unknown:
            raise SystemExit(f"--sinks: unknown {unknown}; known: {', '.join(CASES)}")
        for tuned in sorted({CASES[k].tuned for k in kinds if CASES[k].sink == "mqtt"} | {True}):
            key = "mosquitto_bridge" if tuned else "mosquitto_bridge_default"
            out[key] = b = mosquitto_bridge(work, args.records, args.procs, tuned, (warm, meas))
            say(f"reference: W1 through a Mosquitto bridge{'' if tuned else ' (default config)'} "
                f"{b['per_s']:,.0f} records/s, {b['cpu_s_per_1k']:.3f} CPU-s/1k (no storage); "
                f"W2 p50 {b['w2']['p50_ms']:.2f} / p99 {b['w2']['p99_ms']:.2f} ms")  # fmt: skip
        if args.node_red:
            for tuned in (False, True):
                key = "node_red" if tuned else "node_red_default"
                out[key] = nr = node_red(work, args.node_red, args, tuned, warm, meas)
                f, w2 = nr["w1_fixed"], nr["w2"]
                say(f"reference: Node-RED{'' if tuned else ' (default config)'} W1 "
                    f"{f['per_s']:,.0f} records/s, {f['cpu_s_per_1k']:.3f} CPU-s/1k; W2 p50 "
                    f"{w2['p50_ms']:.2f} / p99 {w2['p99_ms']:.2f} ms")  # fmt: skip
        out["latency_floor"] = fl = latency_floor(work, warm, meas)
        say(f"reference: W2 with no gateway (fleet -> Mosquitto -> receiver) p50 "
            f"{fl['p50_ms']:.1f} / p99 {fl['p99_ms']:.1f} / max {fl['max_ms']:.1f} ms")  # fmt: skip
        for kind in kinds:
            case = CASES[kind]
            with receiver(case, lt, work) as (recv, url), gateway(case, work, url) as gw:
                res: dict[str, Any] = {}
                fixed_run(gw, recv, 20_000, args.procs)  # warm-up: connections, caches
                res["w1_fixed"] = fixed_run(gw, recv, args.records, args.procs)
                f = res["w1_fixed"]
                say(f"{kind}: W1 {f['records']:,.0f} records in {f['seconds']:.2f} s: "
                    f"{f['per_s']:,.0f} records/s end to end (all acknowledged after "
                    f"{f['acked_in_s']:.2f} s), {f['cpu_s_per_1k']:.3f} CPU-s/1k, "
                    f"peak RSS {f['peak_rss_mb']:.0f} MB")  # fmt: skip
                res["w1"] = throughput(gw, recv, warm, meas, args.procs)
                say(f"{kind}: flat out {res['w1']['delivered_per_s']:,.0f} records/s delivered, "
                    f"{res['w1']['acked_per_s']:,.0f}/s stored, "
                    f"{res['w1']['cpu_s_per_1k']:.3f} CPU-s/1k, "
                    f"peak RSS {res['w1']['peak_rss_mb']:.0f} MB")  # fmt: skip
                # Let the W1 backlog go (out of the gateway and out of the
                # receiver's queue) before measuring latency at 1,000/s.
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    c = gw.sink_counters()
                    if not c.get("pending", 0) and recv.count() >= c.get("delivered", 0):
                        break
                    time.sleep(0.1)
                res["w2"] = latency(gw, recv, warm, meas)
                say(f"{kind}: W2 {res['w2']['rate_per_s']:,.0f} records/s, latency p50 "
                    f"{res['w2']['p50_ms']:.1f} / p99 {res['w2']['p99_ms']:.1f} / max "
                    f"{res['w2']['max_ms']:.1f} ms, {res['w2']['cpu_s_per_1k']:.3f} CPU-s/1k")  # fmt: skip
                if kind == "http":
                    res["drain"] = drain_after_outage(gw, recv, args.backlog, args.procs)
                    say(f"{kind}: drain after outage {res['drain']['drain_per_s']:,.0f} "
                        f"records/s ({res['drain']['backlog']:,.0f} backlog)")  # fmt: skip
                out[kind] = res
    lt.close()
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    """``--rounds N``: every system up at once (the Mosquitto bridge of each
    broker configuration, each case's gateway, and with ``--baseline-src`` each
    case again on that code), then N rounds of the fixed W1 and W2, one
    system after the other in an order that rotates each round. On a machine
    whose speed changes from minute to minute (other work on it), the ratio
    to the bridge measured seconds apart is what can be compared; each
    figure is given as median and range over the rounds."""
    warm, meas = (1.0, 4.0) if args.quick else (3.0, 15.0)
    kinds = args.sinks.split(",")
    unknown = [k for k in kinds if k not in CASES]
    if unknown:
        raise SystemExit(f"--sinks: unknown {unknown}; known: {', '.join(CASES)}")
    lt = LoopThread()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    try:
        return _interleaved(args, lt, kinds, warm, meas, say)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        lt.close()


def _interleaved(
    args: argparse.Namespace,
    lt: LoopThread,
    kinds: list[str],
    warm: float,
    meas: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    systems: list[tuple[str, bool, Edgeway | Bridge, HttpReceiver | MqttReceiver]] = []
    out: dict[str, Any] = {
        "quick": args.quick, "rounds": args.rounds, "hogs": args.hogs, "systems": {}
    }  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="edgeway-e2e-", dir="/var/tmp") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        for tuned in sorted({CASES[k].tuned for k in kinds}, reverse=True):
            bridge = Bridge(work, tuned)
            stack.callback(bridge.close)
            systems.append(("bridge" if tuned else "bridge-default", tuned, bridge, bridge.recv))
        versions: list[tuple[str, Path | None]] = [("", None)]
        if args.baseline_src:
            versions.append(("@baseline", args.baseline_src))
        for kind in kinds:
            for suffix, src in versions:
                case = CASES[kind]
                recv, url = stack.enter_context(receiver(case, lt, work))
                gw = stack.enter_context(gateway(case, work, url, src))
                systems.append((kind + suffix, case.tuned, gw, recv))
        for _name, _tuned, target, recv in systems:
            fixed_run(target, recv, 20_000, args.procs)  # warm-up: connections, caches
        runs: dict[str, dict[str, list[float]]] = {
            name: {"w1": [], "cpu": [], "p50": [], "p99": []} for name, *_ in systems
        }
        for i in range(args.rounds):
            k = i % len(systems)
            order = systems[k:] + systems[:k]
            for name, _tuned, target, recv in order:
                f = fixed_run(target, recv, args.records, args.procs)
                runs[name]["w1"].append(f["per_s"])
                runs[name]["cpu"].append(f["cpu_s_per_1k"])
            for name, _tuned, target, recv in order:
                w = latency(target, recv, warm, meas)
                runs[name]["p50"].append(w["p50_ms"])
                runs[name]["p99"].append(w["p99_ms"])
            say(f"round {i + 1}: " + "; ".join(
                f"{name} W1 {runs[name]['w1'][-1]:,.0f}/s p99 {runs[name]['p99'][-1]:.1f} ms"
                for name, *_ in systems))  # fmt: skip
    for name, tuned, *_ in systems:
        r = runs[name]
        ref = runs["bridge" if tuned else "bridge-default"]
        res = {key: _spread(values) for key, values in r.items()}
        res["w1_ratio"] = _spread([a / b for a, b in zip(r["w1"], ref["w1"], strict=True)])
        res["p99_minus_bridge_ms"] = _spread(
            [a - b for a, b in zip(r["p99"], ref["p99"], strict=True)]
        )
        out["systems"][name] = {**res, "runs": r}
        w1, ratio, dp = res["w1"], res["w1_ratio"], res["p99_minus_bridge_ms"]
        say(f"{name}: W1 median {w1['median']:,.0f} records/s ({w1['min']:,.0f}-{w1['max']:,.0f}), "
            f"{ratio['median']:.2f}x the bridge ({ratio['min']:.2f}-{ratio['max']:.2f}), "
            f"{res['cpu']['median']:.3f} CPU-s/1k; W2 p99 {res['p99']['median']:.1f} ms, "
            f"{dp['median']:+.1f} ms from the bridge's ({dp['min']:+.1f} to {dp['max']:+.1f})")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short windows (~40 s in all)")
    ap.add_argument(
        "--sinks",
        help=f"cases to run, of {','.join(CASES)} (default: all; --quick: http)",
    )
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--backlog", type=int, default=0, help="records stored during the outage")
    ap.add_argument("--records", type=int, default=100_000, help="records in the fixed W1 run")
    ap.add_argument("--json", type=Path, help="write the figures as JSON here")
    ap.add_argument(
        "--node-red",
        type=Path,
        help="node_modules/node-red/red.js of an installed Node-RED: run it as a reference",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="interleave: N rounds of W1 and W2 over the bridge and every case, all kept up",
    )
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="with --rounds: also run each case on the edgeway package in this directory "
        "(e.g. `git archive` of an older commit's src)",
    )
    ap.add_argument(
        "--hogs",
        type=int,
        default=0,
        help="with --rounds: N busy-loop processes beside the rounds (the machine's slow spells)",
    )
    args = ap.parse_args(argv)
    if args.hogs and not args.rounds:
        ap.error("--hogs needs --rounds")
    if not args.sinks:
        args.sinks = "http" if args.quick else ",".join(CASES)
    if not args.backlog:
        args.backlog = 20_000 if args.quick else 100_000
    out = interleaved(args) if args.rounds else run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
