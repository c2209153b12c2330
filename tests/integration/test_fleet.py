"""Fleet configuration (issue 19, section 2) with ten gateway processes.

Ten ``edgeway run`` processes send to one cloud Mosquitto through their MQTT
sink, which also takes commands for them. A controller (this test, a paho
client: the cloud's side) rolls signed configurations out the way a fleet
manager does: to a canary first, then to the rest only if the canary reports
success. A good configuration reaches all ten; a bad one (it validates, but
its listener cannot start) is rolled back on the canary, reported as failed
and goes no further; the next good one is not blocked by it. Every outcome
comes back as the command's result record through each gateway's outbox.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from scale_out import Broker, free_port  # noqa: E402

from edgeway.runtime.fleet import signed_message  # noqa: E402
from edgeway.signing import generate, sign  # noqa: E402

GATEWAYS = 10
ROLLBACK_LIMIT = 60.0
"""A configuration that fails on the canary is rolled back there within this."""


def config(gw: str, data: Path, broker: int, public: str, extra: str = "") -> str:
    return f"""
gateway: {{id: {gw}, data_dir: "{data}"}}
mqtt: {{enabled: false}}
sinks:
  - name: cloud
    url: mqtt://127.0.0.1:{broker}
    options: {{commands: true}}
fleet:
  keys: {{ops: "{public}"}}
{extra}"""


class Controller:
    """The cloud side: sends config.apply requests, collects result records."""

    def __init__(self, port: int) -> None:
        self.results: dict[tuple[str, str], dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-controller")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edgeway/+/+/telemetry", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        rec = orjson.loads(msg.payload)
        m = rec.get("metrics", {})
        if rec.get("tags", {}).get("record_type") != "command":
            return
        if m.get("state") not in ("succeeded", "failed"):
            return
        with self.cond:
            self.results[(rec["device_id"], m.get("request_id", ""))] = {
                **m,
                "result": orjson.loads(m["result"]) if "result" in m else None,
            }
            self.cond.notify_all()

    def send(self, gw: str, request: dict[str, Any]) -> None:
        info = self.client.publish(f"edgeway/{gw}/commands", orjson.dumps(request), qos=1)
        info.wait_for_publish(10)

    def wait(self, gw: str, request_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while (gw, request_id) not in self.results:
                left = deadline - time.monotonic()
                assert left > 0, f"no result from {gw} for {request_id} in {timeout} s"
                self.cond.wait(left)
            return self.results[(gw, request_id)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def request(text: str, version: int, key: Path, gw: str, tag: str = "") -> dict[str, Any]:
    return {
        "id": f"v{version}{tag}-{gw}",
        "device_id": gw,
        "name": "config.apply",
        "params": {
            "version": version,
            "config": text,
            "signature": sign(key, signed_message(version, text)),
        },
    }


def start(gw: str, cfg: Path, workdir: Path) -> subprocess.Popen[bytes]:
    log = open(workdir / f"{gw}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeway", "run", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    log.close()
    return proc


def wait_ready(gw: str, workdir: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = (workdir / f"{gw}.log").read_bytes()
        assert proc.poll() is None, out.decode()[-2000:]
        if b"edgeway ready" in out:
            return
        time.sleep(0.1)
    raise AssertionError(f"{gw} not ready")


def test_ten_gateways_canary_rollout_and_rollback(tmp_path: Path) -> None:
    key = tmp_path / "fleet.pem"
    public = generate(key)
    broker = Broker(tmp_path)
    gws = [f"gw-{i}" for i in range(GATEWAYS)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    controller = None
    try:
        for gw in gws:
            cfg = tmp_path / f"{gw}.yaml"
            cfg.write_text(config(gw, tmp_path / gw, broker.port, public))
            procs[gw] = start(gw, cfg, tmp_path)
        for gw in gws:
            wait_ready(gw, tmp_path, procs[gw])
        controller = Controller(broker.port)
        time.sleep(1.0)  # every sink subscribed to its commands topic

        def texts(extra: str) -> dict[str, str]:
            return {gw: config(gw, tmp_path / gw, broker.port, public, extra) for gw in gws}

        # A good configuration: canary, then the rest.
        good = texts("outbox: {max_age: 2d}\n")
        controller.send("gw-0", request(good["gw-0"], 2, key, "gw-0"))
        r = controller.wait("gw-0", "v2-gw-0", 60)
        assert r["state"] == "succeeded", r
        assert r["result"]["version"] == 2 and r["result"]["changes"], r
        for gw in gws[1:]:
            controller.send(gw, request(good[gw], 2, key, gw))
        for gw in gws[1:]:
            r = controller.wait(gw, f"v2-{gw}", 60)
            assert r["state"] == "succeeded", (gw, r)
        # A bad one: it validates, but its HTTP listener's port is taken, so
        # it fails to start on the canary and is rolled back there.
        taken = subprocess.Popen(  # a port someone else holds
            [sys.executable, "-c", "import socket,time;s=socket.socket();"
             f"s.bind(('127.0.0.1',{(port := free_port())}));s.listen();time.sleep(120)"]
        )  # fmt: skip
        try:
            time.sleep(0.5)
            bad = texts(f'http_ingest: {{listen: "127.0.0.1:{port}"}}\n')
            t0 = time.monotonic()
            controller.send("gw-0", request(bad["gw-0"], 3, key, "gw-0"))
            r = controller.wait("gw-0", "v3-gw-0", ROLLBACK_LIMIT)
            rollback_s = time.monotonic() - t0
            assert r["state"] == "failed", r
            assert r["result"]["error"] == "rolled_back", r
            assert rollback_s < ROLLBACK_LIMIT
        finally:
            taken.kill()
            taken.wait()
        # The controller stops the rollout: nobody else has version 3, and the
        # canary still runs version 2 (its fleet state says so).
        for gw in gws:
            state = orjson.loads((tmp_path / gw / "fleet.json").read_bytes())
            assert state["version"] == 2, (gw, state)
        # A forged request and a replay of an old version are refused.
        forged = request(good["gw-1"], 9, key, "gw-1", "-forged")
        forged["params"]["config"] += "\n# changed after signing\n"
        controller.send("gw-1", forged)
        r = controller.wait("gw-1", "v9-forged-gw-1", 30)
        assert r["state"] == "failed" and r["result"]["error"] == "bad_signature", r
        controller.send("gw-1", request(good["gw-1"], 1, key, "gw-1", "-old"))
        r = controller.wait("gw-1", "v1-old-gw-1", 30)
        assert r["state"] == "failed" and r["result"]["error"] == "stale", r
        # The failed version blocks nothing: version 4 goes to the canary.
        fixed = texts("outbox: {max_age: 3d}\n")
        controller.send("gw-0", request(fixed["gw-0"], 4, key, "gw-0"))
        r = controller.wait("gw-0", "v4-gw-0", 60)
        assert r["state"] == "succeeded" and r["result"]["version"] == 4, r
        # Every gateway is still running.
        assert all(p.poll() is None for p in procs.values())
    finally:
        if controller is not None:
            controller.close()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        broker.close()
