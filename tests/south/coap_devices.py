"""What the CoAP tests share: aiocoap's client as a fixture, and a gateway
running in-process whose devices have CoAP tokens in the credential store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest

from edgeway.config import parse_config
from edgeway.devices.credentials import CredentialStore
from edgeway.firmware.service import FirmwareService
from edgeway.gateway import Gateway
from edgeway.south.coap import CoapAdapter
from edgeway.twins.service import TwinService


@pytest.fixture(name="client")
async def aiocoap_client() -> AsyncIterator[Any]:
    """``client``: an aiocoap client context (import ``aiocoap_client`` to use it)."""
    ctx = await aiocoap.Context.create_client_context()
    try:
        yield ctx
    finally:
        await ctx.shutdown()


class DeviceGateway:
    """A running gateway, its CoAP adapter and each device's CoAP token."""

    def __init__(self, gw: Gateway, adapter: CoapAdapter, tokens: dict[str, str]) -> None:
        self.gw, self.adapter, self.tokens = gw, adapter, tokens

    @property
    def twins(self) -> TwinService:
        assert self.gw.twins is not None
        return self.gw.twins

    @property
    def fw(self) -> FirmwareService:
        assert self.gw.firmware is not None
        return self.gw.firmware

    def uri(self, device: str, path: str, token: str | None = "") -> str:
        """``coap://.../devices/{device}/{path}?token=...``: the device's own
        token by default, ``token`` when given, none when None."""
        token = self.tokens[device] if token == "" else token
        query = "" if token is None else f"?token={token}"
        return f"coap://127.0.0.1:{self.adapter.port}/devices/{device}/{path}{query}"


@contextlib.asynccontextmanager
async def device_gateway(
    tmp_path: Path, devices: tuple[str, ...], config: str
) -> AsyncIterator[DeviceGateway]:
    """A gateway with ``config`` (YAML; ``{data}`` is the data directory),
    each of ``devices`` given a CoAP token before it starts."""
    data = tmp_path / "data"
    store = CredentialStore.open(data)
    tokens = {d: store.issue(d, "coap") for d in devices}
    store.close()
    gw = Gateway(parse_config(config.replace("{data}", str(data)), "t.yaml"))
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        adapter = next(a for a in gw.adapters if isinstance(a, CoapAdapter))
        await asyncio.wait_for(adapter.ready.wait(), 10)
        yield DeviceGateway(gw, adapter, tokens)
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)


async def request(
    client: Any, code: Any, uri: str, payload: bytes = b"", *, whole: bool = True, **opts: Any
) -> Any:
    """The response to one request with these options (``whole``: let aiocoap
    fetch the other blocks of a block-wise answer itself)."""
    from aiocoap import Message

    msg = Message(code=code, uri=uri, payload=payload)
    for k, v in opts.items():
        setattr(msg.opt, k, v)
    return await asyncio.wait_for(client.request(msg, handle_blockwise=whole).response, 15)
