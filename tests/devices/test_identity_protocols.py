"""One identity model on every protocol, in a real in-process gateway.

Each protocol (MQTT with aiomqtt, HTTP ingest with aiohttp's client, CoAP
with aiocoap's client) x valid secret, wrong secret, unknown device, disabled
device, and revocation mid-connection (``edgeway credentials disable`` run
as the CLI would, in this process, on the same data directory): the running
gateway must act on it within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from edgeway.config import parse_config
from edgeway.devices.credentials import CredentialStore
from edgeway.devices.credentials_cli import credentials_main
from edgeway.gateway import Gateway

aiocoap = pytest.importorskip("aiocoap")
from aiocoap import Code, Message  # noqa: E402

pytestmark = pytest.mark.asyncio

CONFIG = """
gateway: {{id: gw-id, data_dir: "{data}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0"}}]
  acl:
    - {{device: "*", topic: "devices/{{device_id}}/#"}}
    - {{group: watchers, topic: "devices/#", access: subscribe}}
http_ingest: {{listen: "127.0.0.1:0"}}
coap: {{listen: "127.0.0.1:0", allow_anonymous: false, probe_interval: 60}}
"""


class Env:
    def __init__(self, gw: Gateway, secrets: dict[tuple[str, str], str], data: Path) -> None:
        self.gw = gw
        self.secrets = secrets
        self.data = data
        self.mqtt_port = gw.listeners[0].bound[1]
        by_section = {a.section: a for a in gw.adapters}
        self.http_port = by_section["http_ingest"].port  # type: ignore[attr-defined]
        self.coap_port = by_section["coap"].port  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[Env]:
    data = tmp_path / "data"
    store = CredentialStore.open(data)  # provisioned before start, as with the CLI
    secrets = {}
    for device in ("dev-1", "dev-2", "watcher"):
        for kind in ("mqtt", "http", "coap"):
            secrets[(device, kind)] = store.issue(device, kind)
    store.set_groups("watcher", ["watchers"])
    store.set_disabled("dev-2", True)
    store.close()
    gw = Gateway(parse_config(CONFIG.format(data=data)))
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        yield Env(gw, secrets, data)
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)


def cli(data: Path, *argv: str) -> int:
    return credentials_main(list(argv), data)


# ---------------------------------------------------------------------------
# MQTT


async def _mqtt_code(env: Env, user: str, password: str) -> int:
    try:
        async with aiomqtt.Client(
            "127.0.0.1",
            env.mqtt_port,
            username=user,
            password=password,
            protocol=aiomqtt.ProtocolVersion.V5,
        ):
            return 0
    except aiomqtt.MqttCodeError as e:
        return int(e.rc.value if hasattr(e.rc, "value") else e.rc)  # type: ignore[union-attr]


async def test_mqtt_valid_wrong_unknown_disabled(tmp_path: Path) -> None:
    async with gateway(tmp_path) as env:
        assert await _mqtt_code(env, "dev-1", env.secrets[("dev-1", "mqtt")]) == 0
        assert await _mqtt_code(env, "dev-1", "wrong") == 0x86
        # Another protocol's secret of the same device is not its MQTT password.
        assert await _mqtt_code(env, "dev-1", env.secrets[("dev-1", "http")]) == 0x86
        assert await _mqtt_code(env, "nobody", "x") == 0x86
        assert await _mqtt_code(env, "dev-2", env.secrets[("dev-2", "mqtt")]) == 0x86


async def test_mqtt_acl_per_device_template_and_group(tmp_path: Path) -> None:
    async with gateway(tmp_path) as env:
        async with (
            aiomqtt.Client(
                "127.0.0.1", env.mqtt_port, username="watcher",
                password=env.secrets[("watcher", "mqtt")], protocol=aiomqtt.ProtocolVersion.V5,
            ) as watcher,
            aiomqtt.Client(
                "127.0.0.1", env.mqtt_port, username="dev-1",
                password=env.secrets[("dev-1", "mqtt")], protocol=aiomqtt.ProtocolVersion.V5,
            ) as dev,
        ):  # fmt: skip
            # The group's rule (devices/#); state topics only, as the gateway
            # publishes twin deltas under devices/<id>/twin/ on connect.
            await watcher.subscribe("devices/+/state", qos=1)
            # Denied (PUBACK 0x87, which aiomqtt does not raise): never delivered,
            # so the first message the watcher sees is the allowed one after it.
            await dev.publish("devices/dev-2/state", b"spoof", qos=1)
            await dev.publish("devices/dev-1/state", b"mine", qos=1)
            async with asyncio.timeout(5):
                msg = await anext(aiter(watcher.messages))
            assert (str(msg.topic), msg.payload) == ("devices/dev-1/state", b"mine")


async def test_mqtt_revoked_mid_connection_is_disconnected_within_a_second(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as env:
        async with aiomqtt.Client(
            "127.0.0.1", env.mqtt_port, username="dev-1",
            password=env.secrets[("dev-1", "mqtt")], protocol=aiomqtt.ProtocolVersion.V5,
        ) as dev:  # fmt: skip
            await dev.subscribe("devices/dev-1/#", qos=1)
            start = time.monotonic()
            assert await asyncio.to_thread(cli, env.data, "disable", "dev-1") == 0
            with pytest.raises(aiomqtt.MqttError):
                async with asyncio.timeout(5):
                    async for _ in dev.messages:
                        pass
            assert time.monotonic() - start < 1.0
        assert await _mqtt_code(env, "dev-1", env.secrets[("dev-1", "mqtt")]) == 0x86
        assert env.gw.broker is not None
        assert env.gw.broker.counters.get("clients_revoked") == 1


# ---------------------------------------------------------------------------
# HTTP


async def _http(env: Env, device: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{env.http_port}/devices/{device}/telemetry",
            json={"v": 1},
            headers=headers,
        ) as r,
    ):
        return r.status


async def test_http_valid_wrong_unknown_disabled_revoked(tmp_path: Path) -> None:
    async with gateway(tmp_path) as env:
        token = env.secrets[("dev-1", "http")]
        assert await _http(env, "dev-1", token) == 200
        assert await _http(env, "dev-1", "wrong") == 401
        assert await _http(env, "dev-1", None) == 401
        assert await _http(env, "dev-1", env.secrets[("dev-1", "mqtt")]) == 401
        assert await _http(env, "dev-2", env.secrets[("dev-2", "http")]) == 401  # disabled
        assert await _http(env, "nobody", token) == 401  # dev-1's token is not nobody's
        assert await asyncio.to_thread(cli, env.data, "remove", "dev-1", "--kind", "http") == 0
        deadline = time.monotonic() + 1.0
        while await _http(env, "dev-1", token) != 401:
            assert time.monotonic() < deadline, "removed token still accepted after 1 s"
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------
# CoAP


async def _coap(ctx: Any, env: Env, device: str, token: str | None) -> Any:
    query = f"?token={token}" if token is not None else ""
    msg = Message(
        code=Code.POST,
        uri=f"coap://127.0.0.1:{env.coap_port}/devices/{device}/telemetry{query}",
        payload=b'{"v": 1}',
    )
    msg.opt.content_format = 50
    async with asyncio.timeout(10):
        return (await ctx.request(msg).response).code


async def test_coap_valid_wrong_unknown_disabled_revoked(tmp_path: Path) -> None:
    ctx = await aiocoap.Context.create_client_context()
    try:
        async with gateway(tmp_path) as env:
            token = env.secrets[("dev-1", "coap")]
            assert await _coap(ctx, env, "dev-1", token) == Code.CHANGED
            assert await _coap(ctx, env, "dev-1", "wrong") == Code.UNAUTHORIZED
            assert await _coap(ctx, env, "dev-1", None) == Code.UNAUTHORIZED
            assert await _coap(ctx, env, "nobody", None) == Code.UNAUTHORIZED  # no anonymous
            assert await _coap(ctx, env, "dev-2", env.secrets[("dev-2", "coap")]) == (
                Code.UNAUTHORIZED
            )
            assert await asyncio.to_thread(cli, env.data, "disable", "dev-1") == 0
            deadline = time.monotonic() + 1.0
            while await _coap(ctx, env, "dev-1", token) != Code.UNAUTHORIZED:
                assert time.monotonic() < deadline, "disabled device accepted after 1 s"
                await asyncio.sleep(0.05)
    finally:
        await ctx.shutdown()
