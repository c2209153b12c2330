"""Scale-out: several gateways in MQTT client mode on one shared subscription.

Usage::

    .venv/bin/python bench/scale_out.py                         # throughput 1, 2, 3 gateways + kills
    .venv/bin/python bench/scale_out.py --only kills --gateways 3 --rate 2000 --seconds 90 --kill-every 30
    .venv/bin/python bench/scale_out.py --only throughput --gateways 2
    .venv/bin/python bench/scale_out.py ... --json               # one JSON object per scenario

The rig, all on loopback: a Mosquitto (a broker per run, on a free port,
``max_queued_messages 0``), ``N`` ``edgeway run`` processes, each with its own
data directory and gateway id, subscribed as ``$share/edgeway/devices/+/telemetry``
(MQTT 5, persistent session, acknowledging the broker only after the outbox
commit), each sending to one HTTP server that stands in for the cloud and
records every record it gets. A paho-mqtt publisher sends QoS 1 telemetry for
100 devices, each message numbered per device and globally.

- **throughput**: bench/loadgen.py publishes as fast as the broker takes it
  (100 QoS 1 connections) through 1, 2 and 3 gateways: records/s arriving at
  the cloud over ``--throughput-seconds`` after a 5 s warm-up.
- **kills**: ``--rate`` messages/s for ``--seconds`` while one gateway (round
  robin) is killed with SIGKILL every ``--kill-every`` seconds and restarted
  ``--restart-after`` seconds later on its data directory. At the end, exact
  counts: published, acknowledged by the broker, delivered (unique), lost
  (acknowledged, never delivered), duplicates with the same record id (a sink
  batch sent again, or the broker redelivered a message a gateway had stored
  but not yet acknowledged: its payload carries the device's time, so its
  record ids are the message's, edgeway.record_ids) and with another record
  id (the same redelivery with ``--bare`` payloads, which identify nothing, so
  each gateway numbers what it stores), per-device order
  inversions (a message arriving after a later one of the same device, first
  arrivals only; on the NATS cluster, those not explained by NATS's late
  redelivery or by the broker's own order as a plain subscriber sees it are
  ``inversions_unexplained``), and the takeover time: after each kill, how long until
  messages published after it arrive again at the full rate (the largest
  latency of a message published in the second after the kill).

Figures are printed, never asserted (tests/integration/test_scale_out.py runs a
CI-sized version and asserts the invariants).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO = "/usr/sbin/mosquitto"
DEVICES = 100
DRAIN_QUIET = 45.0
"""Seconds without a new record at the cloud that end the drain: longer than
NATS's MQTT ack_wait (30 s), after which it redelivers what a killed gateway
had not acknowledged."""
DRAIN_MAX = 600.0
MAX_UNACKED = 50_000
"""Publishes not yet acknowledged by the broker, at most (packet ids wrap at 65,535)."""
REDELIVERED_AFTER = 25.0
"""An inversion whose late message arrived this long after it was published is
taken for a broker redelivery after NATS's MQTT ack_wait (30 s by default):
the message was in flight to a gateway, or on a node, that died."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_tcp(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


class Broker:
    """Mosquitto on a free port; queues without limit (its default of 1,000
    silently drops what an absent member has not taken)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
            "persistence false\nset_tcp_nodelay true\nuser root\n"
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


@dataclass
class Cloud:
    """The cloud: an aiohttp server on its own thread recording each record
    with its arrival time."""

    port: int = field(default_factory=free_port)
    records: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        from aiohttp import web

        ready = threading.Event()

        async def handle(request: web.Request) -> web.Response:
            body = orjson.loads(await request.read())
            now = time.time()
            gw = body["gateway_id"]
            for r in body["records"]:
                r["_gw"] = gw  # which gateway sent it (record ids may not say)
            with self.lock:
                self.records.extend((now, r) for r in body["records"])
            return web.Response(text="ok")

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/ingest", handle)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, name="cloud", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("cloud server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def snapshot(self) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return list(self.records)

    def count(self) -> int:
        with self.lock:
            return len(self.records)


class Gateway:
    """One ``edgeway run`` in client mode on the shared group."""

    def __init__(
        self,
        index: int,
        workdir: Path,
        broker_port: int,
        cloud_port: int,
        *,
        partition: int | None = None,
    ) -> None:
        """``partition`` None: the shared group on ``devices/+/telemetry``
        (MQTT 5); else only ``devices/p<partition>/+/telemetry`` (MQTT 3.1.1,
        for brokers without shared subscriptions)."""
        self.id = f"gw-{index}"
        self.dir = workdir / self.id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "edgeway.yaml"
        if partition is None:
            client = 'shared_group: edgeway\n    subscriptions: [{topic: "devices/{device_id}/telemetry"}]'
        else:
            client = (
                'protocol: "3.1.1"\n'
                f'    subscriptions: [{{topic: "devices/p{partition}/{{device_id}}/telemetry"}}]'
            )
        self.config.write_text(
            f"""
gateway: {{id: {self.id}, data_dir: "{self.dir / "data"}"}}
mqtt: {{enabled: false}}
mqtt_client:
  - name: site
    url: mqtt://127.0.0.1:{broker_port}
    {client}
sinks:
  - name: cloud
    url: http://127.0.0.1:{cloud_port}/ingest
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0

    def start(self) -> None:
        log = open(self.dir / f"output-{self.lives}.log", "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeway", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        self.lives += 1

    def wait_ready(self, timeout: float = 30.0) -> None:
        out = self.dir / f"output-{self.lives - 1}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.id} exited: {out.read_text()[-2000:]}")
            if b"edgeway ready" in out.read_bytes():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.id} not ready: {out.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


class Publisher:
    """paho-mqtt, QoS 1, MQTT 5: numbered messages for DEVICES devices."""

    def __init__(
        self, port: int, partitions: int = 0, protocol: int = 5, device_time: bool = True
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.partitions = partitions
        self.device_time = device_time
        self.stalled = 0.0
        """Seconds publish() waited for acknowledgements (MAX_UNACKED)."""

        self.sent: dict[int, float] = {}
        self.acked: set[int] = set()
        self.ack_order: dict[int, int] = {}
        """Message -> the rank of its PUBACK among all: the order the broker
        accepted (stored) the messages in."""
        self._acks = 0
        self._mids: dict[int, int] = {}
        self._early: dict[int, int] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="scale-out-publisher",
            protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.disconnects = 0
        """Times the broker dropped the publisher (paho reconnects and sends
        what was not acknowledged again, which a broker may store behind
        later messages)."""
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.per_device = [0] * DEVICES

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any = None, _p: Any = None) -> None:
        # Called by paho with its own lock held: never call into paho while
        # holding ours (the two would deadlock), hence the early set.
        with self._lock:
            k = self._mids.pop(mid, None)
            self._acks += 1
            if k is None:
                self._early[mid] = self._acks
            else:
                self.acked.add(k)
                self.ack_order[k] = self._acks

    def _on_disconnect(self, *_a: Any) -> None:
        self.disconnects += 1

    def publish(self, k: int) -> None:
        # MQTT packet ids wrap at 65,535: with more messages unacknowledged,
        # paho reuses ids and the mid -> k map would credit an acknowledgement
        # to the wrong message. A broker that far behind slows the publisher
        # down instead (the "published" count then falls short of rate x s).
        while True:
            with self._lock:
                if len(self._mids) < MAX_UNACKED:
                    break
            self.stalled += 0.01
            time.sleep(0.01)
        d = k % DEVICES
        n = self.per_device[d]
        self.per_device[d] = n + 1
        now = time.time()
        # With the device's time the message identifies itself: its record id
        # is the same on any gateway (edgeway.record_ids); without, each
        # gateway numbers it.
        doc = {"k": k, "n": n, "ts": now} if self.device_time else {"k": k, "n": n}
        payload = orjson.dumps(doc)
        self.sent[k] = now
        part = f"p{d % self.partitions}/" if self.partitions else ""
        info = self.client.publish(f"devices/{part}dev-{d}/telemetry", payload, qos=1)
        with self._lock:
            rank = self._early.pop(info.mid, None)
            if rank is not None:
                self.acked.add(k)
                self.ack_order[k] = rank
            else:
                self._mids[info.mid] = k

    def wait_acked(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._mids:
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self.client.on_disconnect = None  # ours is no drop
        self.client.disconnect()
        self.client.loop_stop()


class Observer:
    """A plain QoS 0 subscriber (paho-mqtt, MQTT 3.1.1) to every device's
    topic, on a node that is not killed: the order in which the broker itself
    passes each device's messages on. An inversion at the cloud that this
    subscriber saw too (the same message after a later one of its device) was
    made before any gateway got it. QoS 0, not 1: NATS keeps MQTT QoS 1
    messages in a stream with interest retention, and a second QoS 1
    subscriber that acknowledges them lets the cluster remove messages that a
    gateway's session on the killed node has not had yet (1 to 116 lost in
    5 of 6 runs with one; none in 10 without)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.inverted: set[tuple[str, int]] = set()
        """(device, n) of messages that first arrived after a later one of their device."""
        self._last: dict[str, int] = {}
        self._seen: set[tuple[str, int]] = set()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="scale-out-observer",
            protocol=mqtt.MQTTv311,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("devices/#", 0)
        if not self._subscribed.wait(30):
            raise TimeoutError("the observer's subscription was not acknowledged")

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        doc = orjson.loads(msg.payload)
        dev, n = msg.topic.split("/")[-2], int(doc["n"])
        if (dev, n) in self._seen:
            return
        self._seen.add((dev, n))
        if n < self._last.get(dev, -1):
            self.inverted.add((dev, n))
        self._last[dev] = max(n, self._last.get(dev, -1))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class NatsCluster:
    """Three nats-server nodes on loopback in one cluster, JetStream on, each
    with its MQTT listener (3.1.1; NATS keeps MQTT sessions and QoS 1
    messages in JetStream streams replicated on the three nodes)."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.dir = workdir
        self.ports = [(free_port(), free_port(), free_port()) for _ in range(nodes)]
        routes = ", ".join(f"nats-route://127.0.0.1:{c}" for _, c, _ in self.ports)
        self.confs = []
        for i, (client, cluster, mqtt) in enumerate(self.ports):
            conf = workdir / f"nats-{i}.conf"
            conf.write_text(
                f"server_name: n{i}\nlisten: 127.0.0.1:{client}\n"
                f"jetstream {{ store_dir: {workdir / f'js{i}'} }}\n"
                f"cluster {{ name: scale, listen: 127.0.0.1:{cluster}, routes: [{routes}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{mqtt} }}\n"
            )
            self.confs.append(conf)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes
        for i in range(nodes):
            self.start(i)
        for i in range(nodes):
            wait_tcp(self.mqtt_port(i), 20)
        self._wait_jetstream()

    def mqtt_port(self, i: int) -> int:
        return self.ports[i][2]

    def start(self, i: int) -> None:
        log = open(self.dir / f"nats-{i}.log", "ab")
        self.procs[i] = subprocess.Popen(
            ["nats-server", "-c", str(self.confs[i])], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def _wait_jetstream(self, timeout: float = 90.0) -> None:
        """Until a QoS 1 message goes from node 0 to a subscriber on the last
        node: the MQTT streams exist and have leaders (tens of seconds on a
        loaded machine the first time)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        got = threading.Event()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe-sub")
                sub.on_message = lambda *_a: got.set()
                sub.connect("127.0.0.1", self.mqtt_port(len(self.procs) - 1))
                sub.loop_start()
                sub.subscribe("probe/t", 1)
                time.sleep(0.5)
                pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe-pub")
                pub.connect("127.0.0.1", self.mqtt_port(0))
                pub.loop_start()
                pub.publish("probe/t", b"x", qos=1)
                ok = got.wait(3)
                for c in (pub, sub):
                    c.disconnect()
                    c.loop_stop()
                if ok:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError("the NATS cluster's MQTT did not become ready")

    def close(self) -> None:
        for i in range(len(self.procs)):
            proc = self.procs[i]
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def nats_partitioned(
    gateways: int,
    rate: int,
    seconds: float,
    kill_node_at: float,
    restart_after: float,
    device_time: bool = True,
    kill_gateway_every: float = 0.0,
) -> dict[str, Any]:
    """Three gateways on a 3-node NATS cluster, each on its own node and its
    own partition of the devices (NATS has no MQTT shared subscriptions), while
    the last node is killed with SIGKILL and restarted ``restart_after`` later
    and, with ``kill_gateway_every``, one gateway (round robin) is killed with
    SIGKILL that often and restarted a second later."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nats = NatsCluster(work)
        cloud = Cloud()
        cloud.start()
        gws = [
            Gateway(i, work, nats.mqtt_port(i % 3), cloud.port, partition=i)
            for i in range(gateways)
        ]
        try:
            for g in gws:
                g.start()
            for g in gws:
                g.wait_ready(60)
            time.sleep(1.0)
            observer = Observer(nats.mqtt_port(1))
            pub = Publisher(
                nats.mqtt_port(0), partitions=gateways, protocol=4, device_time=device_time
            )
            kill_times: list[tuple[float, str]] = []

            def node_killer() -> None:
                time.sleep(kill_node_at)
                kill_times.append((time.time(), "nats-2"))
                nats.kill(2)
                time.sleep(restart_after)
                nats.start(2)

            thread = threading.Thread(target=node_killer, daemon=True)
            thread.start()
            recs, sent, acked = _drive(
                pub, gws, cloud, rate, seconds, kill_gateway_every, 1.0, kill_times
            )
            thread.join(60)
            observer.close()
            result = _kill_figures(
                gateways,
                rate,
                seconds,
                kill_gateway_every,
                recs,
                sent,
                acked,
                kill_times,
                broker_inverted=observer.inverted,
                ack_order=pub.ack_order,
            )
            result["scenario"] = "nats_partitioned"
            result["publisher_disconnects"] = pub.disconnects
            result["device_time"] = device_time
            return result
        finally:
            for g in gws:
                with contextlib.suppress(Exception):
                    g.stop()
            nats.close()
            cloud.stop()


@dataclass
class Rig:
    workdir: Path
    gateways: int
    broker: Broker = field(init=False)
    cloud: Cloud = field(init=False)
    gws: list[Gateway] = field(init=False)

    def __enter__(self) -> Rig:
        self.broker = Broker(self.workdir)
        self.cloud = Cloud()
        self.cloud.start()
        self.gws = [
            Gateway(i, self.workdir, self.broker.port, self.cloud.port)
            for i in range(self.gateways)
        ]
        for g in self.gws:
            g.start()
        for g in self.gws:
            g.wait_ready()
        time.sleep(0.5)  # the subscriptions are in place soon after "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        for g in self.gws:
            with contextlib.suppress(Exception):
                g.stop()
        self.broker.close()
        self.cloud.stop()


def throughput(gateways: int, seconds: float, warmup: float = 5.0) -> dict[str, Any]:
    """bench/loadgen.py (100 QoS 1 connections, 16 in flight each, in a worker
    process) publishes for ``warmup + seconds``; the figure is the rate records
    arrive at the cloud over the last ``seconds``, and each gateway's share."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loadgen import Job, LoadGen

    with tempfile.TemporaryDirectory() as tmp, Rig(Path(tmp), gateways) as rig:
        gen = LoadGen(
            [
                Job(
                    "pub1",
                    "127.0.0.1",
                    rig.broker.port,
                    conns=100,
                    client_prefix="lg",
                    topic="devices/dev-{n}/telemetry",
                    payload=b'{"t": 21.5, "k": 0}',
                    window=16,
                )
            ]
        )
        gen.start()
        gen.go()
        try:
            time.sleep(warmup)
            c0, p0, t0 = rig.cloud.count(), gen.total(), time.monotonic()
            time.sleep(seconds)
            c1, p1, t1 = rig.cloud.count(), gen.total(), time.monotonic()
        finally:
            gen.stop()
        recs = rig.cloud.snapshot()
        shares = {g.id: sum(r["_gw"] == g.id for _, r in recs) for g in rig.gws}
    return {
        "scenario": "throughput",
        "gateways": gateways,
        "published_per_s": round((p1 - p0) / (t1 - t0)),
        "records_per_s": round((c1 - c0) / (t1 - t0)),
        "shares": shares,
    }


def kills(
    gateways: int,
    rate: int,
    seconds: float,
    kill_every: float,
    restart_after: float,
    device_time: bool = True,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, Rig(Path(tmp), gateways) as rig:
        pub = Publisher(rig.broker.port, device_time=device_time)
        kill_times: list[tuple[float, str]] = []
        recs, sent, acked = _drive(
            pub, rig.gws, rig.cloud, rate, seconds, kill_every, restart_after, kill_times
        )
    result = _kill_figures(gateways, rate, seconds, kill_every, recs, sent, acked, kill_times)
    result["device_time"] = device_time
    return result


def _drive(
    pub: Publisher,
    gws: list[Gateway],
    cloud: Cloud,
    rate: int,
    seconds: float,
    kill_every: float,
    restart_after: float,
    kill_times: list[tuple[float, str]],
) -> tuple[list[tuple[float, dict[str, Any]]], dict[int, float], set[int]]:
    """Publish ``rate`` messages/s for ``seconds`` while (``kill_every`` > 0)
    one gateway, round robin, is SIGKILLed that often and restarted
    ``restart_after`` later; then wait until every acknowledged message is at
    the cloud. Returns what the cloud got, what was sent, what was acked."""
    stop = threading.Event()

    def killer() -> None:
        i = 0
        while not stop.wait(kill_every):
            g = gws[i % len(gws)]
            i += 1
            kill_times.append((time.time(), g.id))
            g.kill()
            if stop.wait(restart_after):
                g.start()
                break
            g.start()

    thread = threading.Thread(target=killer, name="killer", daemon=True)
    if kill_every > 0:
        thread.start()
    t0 = time.monotonic()
    k = 0
    while time.monotonic() - t0 < seconds:
        due = int((time.monotonic() - t0) * rate)
        while k < due:
            pub.publish(k)
            k += 1
        time.sleep(0.01)
    stop.set()
    if kill_every > 0:
        thread.join(30)
    for g in gws:  # a gateway restarted at the very end must be up to drain
        if g.proc is None or g.proc.poll() is not None:
            g.start()
    pub.wait_acked(60)
    acked = set(pub.acked)
    # Drain: until everything acknowledged is at the cloud, or nothing new has
    # arrived for DRAIN_QUIET seconds (a backlog still draining is not a loss),
    # at most DRAIN_MAX.
    deadline = time.monotonic() + DRAIN_MAX
    count, quiet_since = cloud.count(), time.monotonic()
    while time.monotonic() < deadline:
        if acked <= {r["metrics"]["k"] for _, r in cloud.snapshot()}:
            break
        if cloud.count() != count:
            count, quiet_since = cloud.count(), time.monotonic()
        elif time.monotonic() - quiet_since > DRAIN_QUIET:
            break
        time.sleep(0.5)
    time.sleep(1.0)  # late duplicates, if any, arrive now
    pub.close()
    if pub.stalled:
        print(
            f"publisher held back {pub.stalled:.0f} s by {MAX_UNACKED} unacknowledged", flush=True
        )
    return cloud.snapshot(), dict(pub.sent), acked


def _kill_figures(
    gateways: int,
    rate: int,
    seconds: float,
    kill_every: float,
    recs: list[tuple[float, dict[str, Any]]],
    sent: dict[int, float],
    acked: set[int],
    kill_times: list[tuple[float, str]],
    broker_inverted: set[tuple[str, int]] | None = None,
    ack_order: dict[int, int] | None = None,
) -> dict[str, Any]:
    """An inversion was made by the broker when ``broker_inverted`` (the
    (device, n) an :class:`Observer` saw after a later one of their device)
    holds it, or when the broker acknowledged the late message after the
    later one (``ack_order``, :attr:`Publisher.ack_order`: it stored them in
    that order, as when the publisher sent a message again after a drop)."""
    ids_of: dict[int, set[str]] = {}
    k_of = {(r["device_id"], r["metrics"]["n"]): r["metrics"]["k"] for _, r in recs}
    copies: dict[int, int] = {}
    first_arrival: dict[int, float] = {}
    inversions = 0
    prompt_inversions = 0
    by_broker = 0
    inverted: list[tuple[str, int, int, str, float]] = []
    unexplained: list[tuple[str, int, int, str, float]] = []
    last_n: dict[str, int] = {}
    seen_k: set[int] = set()
    for t, r in recs:
        k = r["metrics"]["k"]
        ids_of.setdefault(k, set()).add(r["id"])
        copies[k] = copies.get(k, 0) + 1
        if k in seen_k:
            continue
        seen_k.add(k)
        first_arrival[k] = t
        dev, n = r["device_id"], r["metrics"]["n"]
        if n < last_n.get(dev, -1):
            inversions += 1
            late = t - sent.get(k, t)
            before = k_of.get((dev, last_n[dev]))
            if (broker_inverted is not None and (dev, n) in broker_inverted) or (
                ack_order is not None
                and before is not None
                and ack_order.get(k, -1) > ack_order.get(before, 1 << 62)
            ):
                by_broker += 1
            elif late < REDELIVERED_AFTER:
                prompt_inversions += 1
                if len(unexplained) < 10:
                    unexplained.append((dev, n, last_n[dev], r["_gw"], round(late, 2)))
            if len(inverted) < 5:  # which message came late, after which, via which gateway
                inverted.append((dev, n, last_n[dev], r["_gw"], round(late, 2)))
        last_n[dev] = max(n, last_n.get(dev, -1))
    lost = sorted(acked - seen_k)
    dup_same = sum(c - len(ids_of[k]) for k, c in copies.items())
    dup_new = sum(len(ids) - 1 for ids in ids_of.values())
    lat = sorted(first_arrival[k] - sent[k] for k in first_arrival if k in sent)
    takeovers = []
    for kt, _gid in kill_times:
        window = [
            first_arrival[k] - sent[k] for k in first_arrival if kt <= sent.get(k, 0) < kt + 1
        ]
        if window:
            takeovers.append(round(max(window), 2))
    return {
        "scenario": "kills",
        "gateways": gateways,
        "rate": rate,
        "seconds": seconds,
        "kill_every": kill_every,
        "kills": len(kill_times),
        "published": len(sent),
        "acked_by_broker": len(acked),
        "delivered_unique": len(seen_k),
        "lost": len(lost),
        "lost_examples": lost[:10],
        "duplicates_same_id": dup_same,
        "duplicates_new_id": dup_new,
        "order_inversions": inversions,
        "inversion_examples": inverted,
        "inversions_by_broker": by_broker if broker_inverted is not None else None,
        "inversions_at_broker": len(broker_inverted) if broker_inverted is not None else None,
        "inversions_unexplained": prompt_inversions,
        "unexplained_examples": unexplained,
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
        "takeover_s": takeovers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["throughput", "kills", "nats"])
    ap.add_argument("--gateways", type=int, default=3)
    ap.add_argument("--throughput-seconds", type=float, default=15.0)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--kill-every", type=float, default=30.0)
    ap.add_argument("--restart-after", type=float, default=1.0)
    ap.add_argument(
        "--bare",
        action="store_true",
        help="payloads without the device's time: record ids are the gateways' own",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    if args.only in (None, "throughput"):
        for n in (1, 2, 3) if args.only is None else (args.gateways,):
            results.append(throughput(n, args.throughput_seconds))
            _print(results[-1], args.json)
    if args.only in (None, "kills"):
        results.append(
            kills(
                args.gateways,
                args.rate,
                args.seconds,
                args.kill_every,
                args.restart_after,
                device_time=not args.bare,
            )
        )
        _print(results[-1], args.json)
    if args.only in (None, "nats"):
        results.append(
            nats_partitioned(
                args.gateways,
                args.rate,
                args.seconds,
                args.seconds / 3,
                5.0,
                device_time=not args.bare,
                kill_gateway_every=args.kill_every,
            )
        )
        _print(results[-1], args.json)


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(result).decode(), flush=True)
        return
    print(", ".join(f"{k}={v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
