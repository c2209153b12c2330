"""Helpers for the firmware tests (tests/firmware, tests/integration): a
signing key the gateway trusts, a gateway with MQTT, HTTP ingest (downloads)
and the admin API, image uploads and waiting for a campaign's state."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeway.config import parse_config
from edgeway.firmware.service import signed_message
from edgeway.gateway import Gateway

IMAGE = os.urandom(200_000)
KEY = Ed25519PrivateKey.generate()
PUBLIC = base64.b64encode(
    KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp: Path, mport: int, hport: int, admin: int, extra: str = "") -> str:
    """A gateway: MQTT, HTTP ingest (downloads), admin API without auth, the
    test key in ``firmware.keys``; ``extra`` is YAML appended (more sections)."""
    return f"""
gateway: {{id: gw-fw, data_dir: "{tmp / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{mport}", allow_anonymous: true}}]
http_ingest: {{listen: "127.0.0.1:{hport}", allow_anonymous: true, commands_allow_anonymous: true}}
admin: {{listen: "127.0.0.1:{admin}", auth: none}}
sinks: [{{name: files, url: "file://{tmp / "out"}"}}]
firmware:
  keys: {{release: "{PUBLIC}"}}
  download_base: "http://127.0.0.1:{hport}"
{extra}"""


class Rig:
    """A gateway in this process, started and stopped (again) by the test."""

    def __init__(self, tmp: Path, extra: str = "") -> None:
        self.tmp = tmp
        self.extra = extra
        self.mport, self.hport, self.admin = free_port(), free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.admin}"
        self.gw: Gateway | None = None
        self.task: asyncio.Task[None] | None = None

    def text(self) -> str:
        return config(self.tmp, self.mport, self.hport, self.admin, self.extra)

    async def start(self) -> Gateway:
        text = self.text()
        self.gw = Gateway(parse_config(text, "t.yaml"), config_text=text)
        self.task = asyncio.create_task(self.gw.run())
        await asyncio.wait_for(self.gw.ready.wait(), 15)
        return self.gw

    async def stop(self) -> None:
        if self.gw is not None and self.task is not None:
            self.gw.request_stop()
            await asyncio.wait_for(self.task, 15)
            self.gw = self.task = None


def sign_image(hardware: str, version: str, data: bytes) -> str:
    """The base64 signature the test key gives ``data`` as ``hardware`` ``version``."""
    digest = hashlib.sha256(data).digest()
    return base64.b64encode(KEY.sign(signed_message(hardware, version, digest))).decode()


async def upload(
    http: httpx.AsyncClient,
    version: str,
    sign: bool = True,
    data: bytes = IMAGE,
    signed_data: bytes | None = None,
) -> httpx.Response:
    """PUT an image; signed (over ``signed_data`` if given, else ``data``)."""
    headers = {"X-Image-SHA256": hashlib.sha256(data).hexdigest()}
    if sign:
        headers["X-Image-Signature"] = sign_image(
            "pump-ctl", version, signed_data if signed_data is not None else data
        )
    return await http.put(
        f"/api/firmware/images?hardware=pump-ctl&version={version}", content=data, headers=headers
    )


async def wait_campaign(
    http: httpx.AsyncClient, cid: str, states: set[str], limit: float = 60
) -> dict[str, Any]:
    """The campaign and its devices once its state is one of ``states``."""
    async with asyncio.timeout(limit):
        while True:
            body = (await http.get(f"/api/firmware/campaigns/{cid}")).json()
            if body["campaign"]["state"] in states:
                return body
            await asyncio.sleep(0.2)
