"""Helpers for the admin API tests: an in-process gateway with its admin
listener on a free loopback port, and the ``edgeway`` CLI as a subprocess.

(A unique module name: several test folders have helpers of their own.)
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.config import parse_config
from edgeway.gateway import Gateway

SRC = str(Path(__file__).resolve().parents[2] / "src")
"""This tree's code, for the CLI subprocesses."""


@dataclass(slots=True)
class RunningGateway:
    gateway: Gateway
    base: str
    """``http://127.0.0.1:PORT`` of the admin listener."""
    data_dir: Path
    config_path: Path

    @property
    def admin_port(self) -> int:
        assert self.gateway.admin is not None and self.gateway.admin.bound is not None
        return self.gateway.admin.bound[1]


def gateway_config(tmp_path: Path, admin: str, extra: str = "") -> str:
    """A gateway with MQTT on a free port, a file sink and ``admin: {admin}``."""
    return f"""
gateway: {{id: gw-admin, data_dir: "{tmp_path / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
sinks:
  - {{name: files, url: "file://{tmp_path / "out"}"}}
admin: {admin}
{extra}"""


@asynccontextmanager
async def running_gateway(
    tmp_path: Path, admin: str = '{listen: "127.0.0.1:0"}', extra: str = ""
) -> AsyncIterator[RunningGateway]:
    """Run a gateway in this event loop until the block ends."""
    text = gateway_config(tmp_path, admin, extra)
    config_path = tmp_path / "edgeway.yaml"
    config_path.write_text(text)
    gw = Gateway(parse_config(text, str(config_path)))
    task = asyncio.create_task(gw.run())
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what start-up raised
    assert gw.ready.is_set(), "gateway not ready in 10 s"
    assert gw.admin is not None and gw.admin.bound is not None
    try:
        yield RunningGateway(
            gw, f"http://127.0.0.1:{gw.admin.bound[1]}", tmp_path / "data", config_path
        )
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)


@dataclass(slots=True, frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


async def edgeway_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python -m edgeway ARGS`` (this tree's code) without blocking the loop."""
    src = SRC
    full_env = {**os.environ, "PYTHONPATH": src, **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


async def create_token(data_dir: Path, role: str, name: str = "test") -> str:
    """A new token made by ``edgeway tokens create`` (the way an operator does)."""
    r = await edgeway_cli(
        "tokens", "create", "--name", name, "--role", role, "--data-dir", str(data_dir)
    )
    assert r.code == 0, r.stderr
    (token,) = r.stdout.split()
    return token


class Device:
    """A 3.1.1 paho device that runs what it is told and answers with the id."""

    def __init__(self, port: int, device_id: str, status: str = "ok") -> None:
        self.device_id = device_id
        self.status = status
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.on_connect = lambda c, *a: c.subscribe(f"devices/{device_id}/commands/+", 1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        doc = orjson.loads(msg.payload)
        answer = {"id": doc["id"], "status": self.status, "result": {"echo": doc["params"]}}
        if self.status != "ok":
            answer["error"] = "valve stuck"
        client.publish(msg.topic + "/result", orjson.dumps(answer), qos=1)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
