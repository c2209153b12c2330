"""Firmware over CoAP block-wise transfer (RFC 7959 Block2): a CoAP device takes
the campaign's firmware.update command as a notification, downloads the image
block by block with aiocoap's client, loses its connection half way, resumes
from the middle block with a new client (checking the ETag), verifies the
SHA-256 and reports success; refusals for devices the campaign does not target."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import socket
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiocoap")

import aiocoap
from aiocoap import Code, Message
from aiocoap.optiontypes import BlockOption
from coap_devices import (
    DeviceGateway,
    aiocoap_client,  # noqa: F401  (the client fixture)
    device_gateway,
    request,
)
from ingest_doubles import wait_until
from test_coap import COAP_CLIENT, coap_client

from coap_datagrams import coap_request, parse
from edgeway.firmware.model import CampaignState, TargetState

IMAGE = os.urandom(50_000)  # 49 blocks of 1024 bytes
SHA = hashlib.sha256(IMAGE).hexdigest()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, image: bytes = IMAGE) -> AsyncIterator[tuple[DeviceGateway, str]]:
    port = free_udp_port()
    config = f"""
gateway: {{id: gw-cf, data_dir: "{{data}}"}}
mqtt: {{enabled: false}}
outbox: {{durability: os}}
coap: {{listen: "127.0.0.1:{port}", probe_interval: 0, allow_anonymous: false, commands: true}}
firmware: {{require_signature: false, download_base: "coap://127.0.0.1:{port}"}}
"""
    async with device_gateway(tmp_path, ("dev-1", "dev-2"), config) as env:

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(image), 65536):
                yield image[i : i + 65536]

        img = await env.fw.add_image("board-a", "2.0", chunks())
        yield env, img.id


async def updating(env: DeviceGateway, image_id: str, device: str) -> None:
    """A campaign of the image for ``device`` alone, once its update command
    is out (only then may it download)."""
    await env.fw.create(image_id, {"site": [device]}, canary_share=0.0, pace=600)
    await wait_until(lambda: env.fw.may_download(image_id, device))


async def get_block(client: Any, uri: str, number: int, szx: int = 6, **opts: Any) -> Any:
    block2 = BlockOption.BlockwiseTuple(number, False, szx)
    return await request(client, Code.GET, uri, whole=False, block2=block2, **opts)


async def test_a_coap_device_updates_with_a_resumed_block2_download(
    tmp_path: Path, client: Any
) -> None:
    async with gateway(tmp_path) as (env, image_id):
        camp = await env.fw.create(
            image_id, {"site": ["dev-1"]}, canary_share=0.0, pace=600, min_finished=1
        )
        observe = client.request(
            Message(code=Code.GET, uri=env.uri("dev-1", "commands"), observe=0)
        )
        assert (await asyncio.wait_for(observe.response, 15)).code == Code.CONTENT
        n = await asyncio.wait_for(anext(aiter(observe.observation)), 30)
        cmd = json.loads(n.payload)
        assert cmd["name"] == "firmware.update"
        params = cmd["params"]
        url = f"{params['url']}?token={env.tokens['dev-1']}"
        assert url.startswith(f"coap://127.0.0.1:{env.adapter.port}/devices/dev-1/firmware/")

        # Blocks 0-19, then the connection is lost.
        got = bytearray()
        first = await get_block(client, url, 0)
        assert first.code == Code.CONTENT and first.opt.size2 == len(IMAGE)
        assert first.opt.content_format == 42 and first.opt.etag == bytes.fromhex(SHA[:16])
        etag = first.opt.etag
        got += first.payload
        for number in range(1, 20):
            r = await get_block(client, url, number)
            assert r.opt.block2.more and r.opt.etag == etag and r.opt.size2 is None
            got += r.payload
        # A rebooted device resumes from block 20 with a new endpoint; the
        # ETag tells it the image is the one it started (If-Match makes the
        # gateway check it too).
        resumed = await aiocoap.Context.create_client_context()
        try:
            number, more = 20, True
            while more:
                r = await get_block(resumed, url, number, if_match=[etag])
                assert r.code == Code.CONTENT and r.opt.etag == etag
                got += r.payload
                more, number = r.opt.block2.more, number + 1
        finally:
            await resumed.shutdown()
        assert number == 49 and hashlib.sha256(got).hexdigest() == params["sha256"] == SHA
        assert env.adapter.firmware_blocks == 49 and env.adapter.firmware_bytes == len(IMAGE)

        # The device reports the new version: the campaign records success.
        result = Message(
            code=Code.POST,
            uri=env.uri("dev-1", f"commands/{cmd['id']}/result"),
            payload=json.dumps(
                {"status": "ok", "result": {"result": "success", "version": "2.0"}}
            ).encode(),
            content_format=50,
        )
        r = await asyncio.wait_for(client.request(result).response, 15)
        assert r.code == Code.CHANGED

        async def state() -> Any:
            return (await env.fw.targets(camp.id))[0].state

        for _ in range(300):
            if await state() is TargetState.SUCCEEDED:
                break
            await asyncio.sleep(0.05)
        assert await state() is TargetState.SUCCEEDED
        await wait_until(lambda: not env.fw.may_download(image_id, "dev-1"))
        done = await env.fw.campaign(camp.id)
        assert done is not None and done.state is CampaignState.COMPLETED
        # Finished: the image is no longer served to it.
        r = await get_block(client, url, 0)
        assert r.code == Code.NOT_FOUND
        observe.observation.cancel()


async def test_refusals_and_block_sizes(tmp_path: Path, client: Any) -> None:
    async with gateway(tmp_path) as (env, image_id):
        await updating(env, image_id, "dev-1")
        path = f"firmware/{image_id}"
        # The device asks for 64-byte blocks; a size above 1024 (BERT, szx 7) gets 1024.
        r = await get_block(client, env.uri("dev-1", path), 3, szx=2)
        assert r.code == Code.CONTENT and r.payload == IMAGE[192:256]
        assert r.opt.block2 == (3, True, 2)
        r = await get_block(client, env.uri("dev-1", path), 1, szx=7)
        assert r.payload == IMAGE[1024:2048] and r.opt.block2.size_exponent == 6
        # The last block: short, no more.
        r = await get_block(client, env.uri("dev-1", path), 48)
        assert r.payload == IMAGE[48 * 1024 :] and not r.opt.block2.more
        # aiocoap's own block-wise client assembles the whole image.
        whole = Message(code=Code.GET, uri=env.uri("dev-1", path))
        r = await asyncio.wait_for(client.request(whole).response, 30)
        assert r.code == Code.CONTENT and r.payload == IMAGE

        refusals = [
            (env.uri("dev-2", path), 0, {}, Code.NOT_FOUND),  # not targeted
            (env.uri("dev-1", "firmware/other-image"), 0, {}, Code.NOT_FOUND),
            (env.uri("dev-1", "firmware/..%2f..%2fcredentials.db"), 0, {}, Code.NOT_FOUND),
            (env.uri("dev-1", path, None), 0, {}, Code.UNAUTHORIZED),
            (env.uri("dev-1", path, env.tokens["dev-2"]), 0, {}, Code.UNAUTHORIZED),
            (env.uri("dev-1", path), 49, {}, Code.BAD_REQUEST),  # past the end
            (env.uri("dev-1", path), 2, {"if_match": [b"\x00" * 8]}, Code.PRECONDITION_FAILED),
        ]
        for uri, number, opts, code in refusals:
            r = await get_block(client, uri, number, **opts)
            assert r.code == code, (uri, number, r.code, r.payload)
        assert env.adapter.refusals["firmware_not_targeted"] == 3
        assert env.adapter.refusals["bad_block"] == 1
        assert env.adapter.refusals["firmware_etag"] == 1
        r = await asyncio.wait_for(
            client.request(Message(code=Code.POST, uri=env.uri("dev-1", path))).response, 15
        )
        assert r.code == Code.METHOD_NOT_ALLOWED
        # The listener still serves.
        r = await get_block(client, env.uri("dev-1", path), 0)
        assert r.code == Code.CONTENT


async def test_block_requests_hold_no_memory_and_a_repeated_one_is_answered_again(
    tmp_path: Path, client: Any
) -> None:
    big = os.urandom(4 * 1024 * 1024)
    async with gateway(tmp_path, big) as (env, image_id):
        await updating(env, image_id, "dev-1")
        uri = env.uri("dev-1", f"firmware/{image_id}")
        await get_block(client, uri, 0)  # the image's size and ETag are looked up once
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for number in range(1, 301):
                r = await get_block(client, uri, number * 13)
                assert r.payload == big[number * 13 * 1024 : (number * 13 + 1) * 1024]
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Reading the whole image would allocate 4 MiB at once; aiocoap's
        # duplicate detection keeping each response (for 247 s) about 1.5 MB.
        assert peak - before < 512 * 1024, peak - before
        assert current - before < 256 * 1024, current - before

        # A retransmitted block request (same message id) is answered again,
        # read again (RFC 7252 4.5: an idempotent request needs no state).
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        class Device(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                answers.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(
            Device, remote_addr=("127.0.0.1", env.adapter.port)
        )
        try:
            options = [(11, p.encode()) for p in ("devices", "dev-1", "firmware", image_id)]
            options += [(15, f"token={env.tokens['dev-1']}".encode()), (23, bytes([0x26]))]
            datagram = coap_request(0x321, options, code=1)
            served = env.adapter.firmware_blocks
            for _ in range(2):
                transport.sendto(datagram)
                mtype, code, mid, _opts, payload = parse(await asyncio.wait_for(answers.get(), 15))
                assert (mtype, code, mid) == (2, 0x45, 0x321) and payload == big[2048:3072]
            assert env.adapter.firmware_blocks == served + 2
        finally:
            transport.close()


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin (coap-client) not installed")
async def test_libcoap_downloads_the_image_and_reads_and_patches_its_twin(
    tmp_path: Path,
) -> None:
    """Another implementation (libcoap's coap-client, in C) against the same resources."""
    async with gateway(tmp_path) as (env, image_id):
        await updating(env, image_id, "dev-1")
        out_file = tmp_path / "image.bin"
        # -b 512: Block2 transfer in 512-byte blocks, written to a file.
        rc, out = await coap_client(
            "-m", "get", "-b", "512", "-o", str(out_file), env.uri("dev-1", f"firmware/{image_id}")
        )  # fmt: skip
        assert rc == 0, out
        assert out_file.read_bytes() == IMAGE
        assert env.adapter.firmware_blocks == len(IMAGE) // 512 + 1

        rc, out = await coap_client(
            "-m", "put", "-t", "50", "-e", '{"fw": "1.0"}', env.uri("dev-1", "twin/reported")
        )  # fmt: skip
        assert rc == 0, out
        assert (await env.twins.get("dev-1")).reported == {"fw": "1.0"}
        await env.twins.patch("dev-1", "desired", {"fw": "2.0"}, by="t")
        rc, out = await coap_client("-m", "get", "-A", "50", env.uri("dev-1", "twin/delta"))
        assert rc == 0 and json.loads(out.strip().splitlines()[-1]) == {"fw": "2.0"}, out
        rc, out = await coap_client("-m", "get", env.uri("dev-1", "twin/desired", None))
        assert "4.01" in out
