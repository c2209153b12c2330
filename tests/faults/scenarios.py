"""The fault scenarios, sized by their arguments: tests/faults/ runs them small
(CI), bench/faults.py long. Each returns the harness's :class:`Report`; the
caller holds it to the rules with ``report.check()``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from harness import Report, scenario
from mosquitto_process import MosquittoProcess
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def sigkill_loop(
    tmp: Path, kills: int = 3, acks_per_life: int = 40, outbox: str = "{durability: fsync}"
) -> Report:
    """SIGKILL at a random moment of the stream, restart on the same data directory."""
    with scenario(f"SIGKILL loop ({kills} kills)", tmp, outbox=outbox) as s:
        for _ in range(kills):
            s.wait_acked(acks_per_life)
            time.sleep(s.rng.uniform(0.0, 0.2))  # the kill lands anywhere in the stream
            s.kill_gateway()
            s.start_gateway()
        s.wait_acked(acks_per_life)
        return s.finish()


def cloud_away(tmp: Path, mode: str = "down", acks_during: int = 200) -> Report:
    """The cloud away while devices keep publishing, then back: ``down`` (its
    port closed) or ``error`` (up, answering 503 to everything)."""
    label = {"down": "sink outage", "error": "sink answers 503"}[mode]
    with scenario(label, tmp) as s:
        assert s.cloud is not None
        s.wait_acked(40)
        s.cloud.set_mode(mode)
        stored = len(s.cloud.snapshot())
        s.wait_acked(acks_during)  # devices are acknowledged while the cloud is away
        assert len(s.cloud.snapshot()) == stored, "records reached a cloud that was away"
        s.cloud.set_mode("ok")
        s.wait_acked(40)
        return s.finish()


def flapping_sink(tmp: Path, cycles: int = 8, acks_per_phase: int = 15) -> Report:
    """The cloud goes down and up again and again."""
    with scenario(f"flapping sink ({cycles} cycles)", tmp) as s:
        assert s.cloud is not None
        for _ in range(cycles):
            s.cloud.set_mode("down")
            stored = len(s.cloud.snapshot())
            s.wait_acked(acks_per_phase)
            assert len(s.cloud.snapshot()) == stored, "records reached a cloud that was down"
            s.cloud.set_mode("ok")
            s.wait_acked(acks_per_phase)
        return s.finish()


def sink_never_answers(tmp: Path, seconds: float = 3.0) -> tuple[Report, int]:
    """The cloud accepts connections and requests and never answers (the HTTP
    sink's 1 s timeout ends each); also returns how many requests it swallowed."""
    with scenario(f"sink accepts, never answers ({seconds:.0f} s)", tmp) as s:
        assert s.cloud is not None
        s.wait_acked(40)
        s.cloud.set_mode("hang")
        time.sleep(seconds)  # the fault's duration
        hung = s.cloud.requests
        s.cloud.set_mode("ok")
        s.wait_acked(40)
        return s.finish(), hung


def slow_sink(tmp: Path, acks: int = 300, delay: float = 0.3) -> Report:
    """Every request takes ``delay`` seconds to answer."""
    with scenario(f"slow sink ({delay * 1000:.0f} ms per request)", tmp) as s:
        assert s.cloud is not None
        s.cloud.set_mode("slow", delay=delay)
        s.wait_acked(acks)
        s.cloud.set_mode("ok")
        return s.finish()


def sigstop_sigcont(tmp: Path, seconds: float = 3.0, rounds: int = 1) -> Report:
    """The gateway frozen (SIGSTOP: a debugger, a VM pause), then thawed."""
    with scenario(f"SIGSTOP {seconds:.0f} s / SIGCONT x{rounds}", tmp) as s:
        assert s.gw is not None
        for _ in range(rounds):
            s.wait_acked(40)
            os.kill(s.gw.pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)  # the fault's duration
            finally:
                os.kill(s.gw.pid, signal.SIGCONT)
        s.wait_acked(40)
        return s.finish()


def half_open(tmp: Path, side: str, seconds: float = 2.0) -> Report:
    """The TCP connections of one ``side`` (``sink``: gateway to cloud;
    ``devices``: devices to gateway, keep-alive 5 s) go silent (no FIN, no
    RST) for ``seconds``; devices are acknowledged meanwhile on the sink side."""
    proxy_of = {"sink": {"sink_proxy": True}, "devices": {"device_proxy": True}}[side]
    with scenario(f"half-open {side} connections ({seconds:.0f} s)", tmp, **proxy_of) as s:
        proxy = s.sink_proxy if side == "sink" else s.device_proxy
        assert proxy is not None
        s.wait_acked(40)
        proxy.set_mode("blackhole")
        time.sleep(seconds)  # the fault's duration
        proxy.set_mode("pass")
        s.wait_acked(40, timeout=30)
        return s.finish()


def odd_timestamps(tmp: Path, acks: int = 200) -> Report:
    """Every 5th reading 20 years old, every 7th two days ahead: refused with
    0x99 (input_limits), never stored; the others flow."""

    def payload(_device: str, n: int) -> dict[str, Any]:
        if n % 5 == 0:
            return {"n": n, "ts": time.time() - 20 * 365 * 86400}
        if n % 7 == 0:
            return {"n": n, "ts": time.time() + 2 * 86400}
        return {"n": n}

    with scenario("timestamps far past / future", tmp, payload=payload) as s:
        s.wait_acked(acks)
        s.wait_refused(10)
        report = s.finish()
    codes = {c for d in s.devices for c in d.ledger.refused.values()}
    report.notes["refusal codes"] = sorted(codes)
    return report


class CloudSubscriber:
    """A paho MQTT 5 subscriber with a persistent session on the cloud broker,
    reconnecting on its own; collects the sink's records."""

    def __init__(self, port: int, topic: str) -> None:
        self.records: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="fault-cloud-sub", protocol=paho.MQTTv5
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        self.topic = topic

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                c.subscribe(topic, qos=1)

        def on_subscribe(*_a: Any) -> None:
            self.subscribed.set()

        def on_disconnect(*_a: Any) -> None:
            self.subscribed.clear()

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            with self._lock:
                self.records.append(json.loads(msg.payload))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_disconnect = on_disconnect
        self.client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10), "cloud subscriber never subscribed"

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.records)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def _mqtt_cloud(tmp: Path, persistence: bool) -> Iterator[tuple[MosquittoProcess, Any, Any]]:
    from harness import FaultyProxy

    broker = MosquittoProcess(tmp / "cloud", persistence=persistence)
    broker.start()
    proxy = FaultyProxy(broker.port)
    proxy.start()
    sub = CloudSubscriber(broker.port, "edgeway/fault-gw/+/telemetry")
    try:
        yield broker, proxy, sub
    finally:
        sub.close()
        proxy.stop()
        broker.kill()


def cloud_broker_restart(tmp: Path, persistence: bool, restarts: int = 2) -> Report:
    """The MQTT sink's broker restarted while devices publish.

    With persistence (SIGTERM: Mosquitto writes its state), the subscriber's
    session and its queued messages survive, so everything arrives. Without
    (SIGKILL, nothing on disk), the broker forgets the gateway's session and
    whatever it had not acknowledged: the gateway must not care (its outbox
    re-sends what the broker had not acknowledged, with the same record ids).
    What a volatile broker loses of what it had acknowledged but not yet
    handed to its subscriber is the broker's loss, not the gateway's, so the
    gateway is cut off (a proxy) and the broker's backlog flushed before the
    kill, and the subscriber is back before the gateway reconnects.
    """
    label = "with" if persistence else "without"
    with _mqtt_cloud(tmp, persistence) as (broker, proxy, sub):
        url = f"mqtt://127.0.0.1:{proxy.port}"
        options = "{max_records: 200, ack_timeout: 2s, connect_timeout: 2s, keepalive: 5}"
        with scenario(
            f"cloud MQTT broker restarted {label} persistence (x{restarts})",
            tmp,
            sink_url=url,
            sink_options=options,
        ) as s:
            for _ in range(restarts):
                s.wait_acked(60)
                if persistence:
                    broker.stop()
                    broker.start()
                else:
                    # Cut the gateway off first and let the broker hand its
                    # subscriber what it has acknowledged: a volatile broker
                    # loses what it holds when killed, which is the broker's
                    # loss to measure, not the gateway's (see docs/faults.md).
                    proxy.set_mode("refuse")
                    _flushed(s, sub)
                    broker.kill()
                    broker.start()
                    _resubscribed(sub)
                    proxy.set_mode("pass")
                s.wait_acked(60)
            return s.finish(sub.snapshot)


def _flushed(s: Any, sub: CloudSubscriber, timeout: float = 15.0) -> None:
    """Wait (bounded) until the subscriber holds every record the gateway's
    outbox counts as delivered (acknowledged by the broker)."""
    deadline = time.monotonic() + timeout
    while True:
        delivered = s.status()["outbox"]["cloud"]["delivered"]
        if len({r["id"] for r in sub.snapshot()}) >= delivered:
            return
        assert time.monotonic() < deadline, "the broker never delivered what it acknowledged"
        time.sleep(0.05)  # paho's thread and the gateway's counters: polled, bounded


def _resubscribed(sub: CloudSubscriber) -> None:
    """Wait (bounded) until the subscriber is connected to the new broker and
    has a SUBACK from it (the broker forgot the old subscription)."""
    deadline = time.monotonic() + 10
    while not sub.client.is_connected():
        assert time.monotonic() < deadline, "cloud subscriber did not reconnect"
        time.sleep(0.02)  # paho reconnects on its own thread: polled, bounded
    sub.subscribed.clear()
    sub.client.subscribe(sub.topic, qos=1)
    assert sub.subscribed.wait(10), "no SUBACK after the broker restart"


@contextmanager
def small_disk(tmp: Path, size_mb: int = 16, filler_mb: int = 9) -> Iterator[Path | None]:
    """A tmpfs of ``size_mb`` with ``filler_mb`` taken (old logs); None when
    this machine cannot mount one (not root, or no permission)."""
    d = tmp / "disk"
    d.mkdir()
    if os.geteuid() != 0:
        yield None
        return
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(d)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        yield None
        return
    try:
        (d / "old.log").write_bytes(b"\0" * (filler_mb * 1024 * 1024))
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def disk_full(tmp: Path, disk: Path) -> Report:
    """The data directory's disk fills while the cloud is down: devices are
    refused (0x97, quota exceeded), never lied to; once the cloud is back the
    backlog drains, space comes back and devices are accepted again."""

    def payload(_device: str, n: int) -> dict[str, Any]:
        return {"n": n, "pad": "x" * 3000}

    with scenario(
        "data directory's disk full",
        tmp,
        payload=payload,
        interval=0.0,
        data_dir=disk / "data",
        outbox="{durability: fsync, disk_reserve: 1MiB}",
    ) as s:
        assert s.cloud is not None
        s.cloud.set_mode("down")
        s.wait_refused(20, timeout=60)
        s.cloud.set_mode("ok")
        s.wait_acked(40, timeout=60)  # accepted again once the drain gave space back
        report = s.finish()
    report.notes["refusal codes"] = sorted(
        {c for d in s.devices for c in d.ledger.refused.values()}
    )
    return report
