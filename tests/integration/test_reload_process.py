"""Reload of a real ``edgeway run``: SIGHUP, ``edgeway reload``, ``edgeway
config apply|history|rollback`` through the admin API with a token, while a
paho-mqtt device stays connected on the unchanged listener."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from edgeway_process import StartGateway, free_port
from paho.mqtt.enums import CallbackAPIVersion

SRC = str(Path(__file__).resolve().parents[2] / "src")

BASE = """
mqtt:
  listeners: [{{bind: "127.0.0.1:{{port}}", allow_anonymous: true}}]
admin: {{listen: "127.0.0.1:{admin}", auth: tokens}}
sinks:
  - {{name: a, url: "file://{out}/a"}}
"""


def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    if token:
        env["EDGEWAY_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "edgeway", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )


def sinks_of(base: str, token: str) -> set[str]:
    r = httpx.get(f"{base}/api/status", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    return set(r.json()["outbox"])


def wait(cond: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_sighup_reload_apply_history_rollback(start_gateway: StartGateway, tmp_path: Path) -> None:
    admin = free_port()
    out = tmp_path / "out"
    text = BASE.format(admin=admin, out=out)
    gw = start_gateway(text)
    assert gw.config_path is not None
    base = f"http://127.0.0.1:{admin}"
    made = cli(
        "tokens", "create", "--name", "eng", "--role", "engineer", "--data-dir", str(gw.data_dir)
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.split()[0]
    viewer = cli(
        "tokens", "create", "--name", "v", "--role", "viewer", "--data-dir", str(gw.data_dir)
    )
    vtoken = viewer.stdout.split()[0]

    disconnects = threading.Event()
    dev = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-reload", protocol=mqtt.MQTTv5)
    dev.on_disconnect = lambda *a: disconnects.set()
    dev.connect("127.0.0.1", gw.port)
    dev.loop_start()
    try:
        wait(lambda: sinks_of(base, token) == {"a"})
        # 1. Edit the file and send SIGHUP: a second sink appears.
        edited = gw.config_path.read_text() + f'  - {{name: b, url: "file://{out}/b"}}\n'
        gw.config_path.write_text(edited)
        gw.process.send_signal(signal.SIGHUP)
        wait(lambda: sinks_of(base, token) == {"a", "b"})
        # 2. A broken edit: `edgeway reload` refuses it, names the problem, keeps a and b.
        gw.config_path.write_text(edited + "routes: [{name: r, sinks: [nope]}]\n")
        r = cli("reload", "--admin", base, token=token)
        assert r.returncode == 1 and "nope" in r.stderr, r.stderr
        assert sinks_of(base, token) == {"a", "b"}
        # A viewer may not reload.
        r = cli("reload", "--admin", base, token=vtoken)
        assert r.returncode == 1 and "403" in r.stderr
        # 3. `config apply` a file with only sink a.
        only_a = tmp_path / "only-a.yaml"
        only_a.write_text(text.replace("{port}", str(gw.port)))
        r = cli("config", "apply", str(only_a), "--admin", base, token=token)
        assert r.returncode == 0 and "data path (sinks)" in r.stdout, r.stderr
        assert sinks_of(base, token) == {"a"}
        # 4. History: start, sighup, api; roll back to the one with two sinks.
        r = cli("config", "history", "--admin", base, token=vtoken)
        sources = [line.split()[-1] for line in r.stdout.strip().splitlines()]
        assert sources[:3] == ["api", "sighup", "start"], r.stdout
        r = cli("config", "rollback", "--admin", base, token=token)
        assert r.returncode == 0, r.stderr
        assert sinks_of(base, token) == {"a", "b"}
        r = cli("config", "show", "--admin", base, token=token)
        assert "name: b" in r.stdout
        assert not disconnects.is_set()
    finally:
        dev.disconnect()
        dev.loop_stop()
