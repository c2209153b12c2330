"""Twins over CoAP: aiocoap's client against a gateway running in-process, with
per-device CoAP tokens from the credential store (``edgeway.twins.coap``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiocoap")

import aiocoap
import cbor2
from aiocoap import Code, Message
from coap_devices import (
    DeviceGateway,
    aiocoap_client,  # noqa: F401  (the client fixture)
    device_gateway,
    request,
)
from ingest_doubles import wait_until

from edgeway.twins.coap import version_etag


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, coap: str = "") -> AsyncIterator[DeviceGateway]:
    config = f"""
gateway: {{id: gw-ct, data_dir: "{{data}}"}}
mqtt: {{enabled: false}}
outbox: {{durability: os}}
coap: {{listen: "127.0.0.1:0", probe_interval: 0, allow_anonymous: false, {coap}}}
twins: {{max_bytes: 8KiB, max_depth: 4}}
"""
    async with device_gateway(tmp_path, ("dev-1", "dev-2", "dev-3"), config) as env:
        yield env


async def test_get_views_with_versions_as_etags_in_json_and_cbor(
    tmp_path: Path, client: Any
) -> None:
    async with gateway(tmp_path) as env:
        await env.twins.patch("dev-1", "desired", {"setpoint": 45, "mode": "auto"}, by="t")
        await env.twins.patch("dev-1", "desired", {"fan": {"speed": 3}}, by="t")
        await env.twins.patch("dev-1", "reported", {"setpoint": 40, "mode": "auto"}, by="t")
        desired = {"setpoint": 45, "mode": "auto", "fan": {"speed": 3}}

        r = await request(client, Code.GET, env.uri("dev-1", "twin/desired"))
        assert r.code == Code.CONTENT and r.opt.content_format == 50
        assert json.loads(r.payload) == desired and r.opt.etag == version_etag(2) == b"\x02"
        r = await request(client, Code.GET, env.uri("dev-1", "twin/reported"))
        assert json.loads(r.payload) == {"setpoint": 40, "mode": "auto"}
        assert r.opt.etag == b"\x01"
        r = await request(client, Code.GET, env.uri("dev-1", "twin/delta"))
        assert json.loads(r.payload) == {"setpoint": 45, "fan": {"speed": 3}}
        assert r.opt.etag == bytes([0, 0, 0, 2, 0, 0, 0, 1])
        r = await request(client, Code.GET, env.uri("dev-1", "twin"), accept=60)
        assert r.opt.content_format == 60
        whole = cbor2.loads(r.payload)
        assert whole["desired"] == desired and whole["reported_version"] == 1
        assert whole["delta"] == {"setpoint": 45, "fan": {"speed": 3}}
        # A device without a twin yet: empty documents at version 0.
        r = await request(client, Code.GET, env.uri("dev-2", "twin/desired"))
        assert r.code == Code.CONTENT and r.payload == b"{}" and r.opt.etag == b"\x00"
        # Another Accept: 4.06; another method on a read-only view: 4.05.
        r = await request(client, Code.GET, env.uri("dev-1", "twin"), accept=110)
        assert r.code == Code.NOT_ACCEPTABLE
        r = await request(client, Code.PUT, env.uri("dev-1", "twin/desired"), b"{}")
        assert r.code == Code.METHOD_NOT_ALLOWED
        assert env.adapter.refusals.get("twin_not_acceptable") == 1


async def test_observe_desired_each_change_then_one_consolidated_state_after_1000_patches(
    tmp_path: Path, client: Any
) -> None:
    async with gateway(tmp_path) as env:
        uri = env.uri("dev-1", "twin/desired")
        device = await aiocoap.Context.create_client_context()
        try:
            req = device.request(Message(code=Code.GET, uri=uri, observe=0))
            first = await asyncio.wait_for(req.response, 15)
            assert first.code == Code.CONTENT and first.opt.observe is not None
            assert json.loads(first.payload) == {} and first.opt.etag == b"\x00"
            await wait_until(lambda: env.adapter.twin_observer_count("dev-1") == 1)
            notifications = aiter(req.observation)
            for i in range(1, 4):
                await env.twins.patch("dev-1", "desired", {"step": i}, by="t")
                n = await asyncio.wait_for(anext(notifications), 15)
                assert json.loads(n.payload) == {"step": i} and n.opt.etag == version_etag(i)
            # A reported change leaves desired as it was: no notification.
            await env.twins.patch("dev-1", "reported", {"step": 3}, by="t")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(notifications), 0.5)
        finally:
            # The device goes away (its socket closes; the gateway is not told).
            await device.shutdown()

        # 1,000 patches while the device is away.
        await asyncio.gather(
            *(env.twins.patch("dev-1", "desired", {f"k{i % 50}": i}, by="t") for i in range(1000))
        )
        latest = await env.twins.get("dev-1")
        assert latest.desired_version == 1003

        # It comes back (a new endpoint, as after a reboot) and observes again:
        # its new observation replaces the old one, and the first answer is
        # the document at the latest version; nothing else follows.
        received: list[Any] = []
        again = client.request(Message(code=Code.GET, uri=uri, observe=0))
        first = await asyncio.wait_for(again.response, 15)
        received.append(first)

        async def collect() -> None:
            async for n in again.observation:
                received.append(n)

        collector = asyncio.create_task(collect())
        await asyncio.sleep(1.5)
        collector.cancel()
        assert len(received) == 1, [r.opt.etag for r in received]
        assert json.loads(first.payload) == latest.desired
        assert first.opt.etag == version_etag(1003)
        assert env.adapter.twin_observer_count("dev-1") == 1
        again.observation.cancel()


async def test_patch_reported_put_and_patch_if_match_limits_and_formats(
    tmp_path: Path, client: Any
) -> None:
    async with gateway(tmp_path) as env:
        uri = env.uri("dev-1", "twin/reported")
        r = await request(
            client, Code.PUT, uri, b'{"rpm": 1400, "mode": "auto"}', content_format=50
        )
        assert r.code == Code.CHANGED and r.opt.etag == b"\x01"
        r = await request(
            client, Code.PATCH, uri, cbor2.dumps({"mode": None, "t": 21.5}), content_format=60
        )
        assert r.code == Code.CHANGED and r.opt.etag == b"\x02"
        # If-Match with the version read before: 4.12 with the current ETag.
        r = await request(
            client, Code.PATCH, uri, b'{"rpm": 0}', content_format=52, if_match=[b"\x01"]
        )
        assert r.code == Code.PRECONDITION_FAILED and r.opt.etag == b"\x02"
        assert b"version 2" in r.payload
        r = await request(client, Code.PATCH, uri, b'{"rpm": 1500}', if_match=[b"\x02"])
        assert r.code == Code.CHANGED and r.opt.etag == b"\x03"
        twin = await env.twins.get("dev-1")
        assert twin.reported == {"rpm": 1500, "t": 21.5} and twin.reported_version == 3

        refused = [
            (b"[1, 2]", 50, Code.BAD_REQUEST, b"invalid"),
            (b"{not json", None, Code.BAD_REQUEST, b"invalid"),
            (b'{"a": {"b": {"c": {"d": {"e": 1}}}}}', 50, Code.BAD_REQUEST, b"too_deep"),
            (json.dumps({"x": "y" * 9000}).encode(), 50, Code.REQUEST_ENTITY_TOO_LARGE, b"8192"),
            (b"\xa1\x61", 60, Code.BAD_REQUEST, b"not CBOR"),
            (cbor2.dumps({"blob": b"\x00\x01"}), 60, Code.BAD_REQUEST, b"bytes"),
            (cbor2.dumps({1: "x"}), 60, Code.BAD_REQUEST, b"text strings"),
            (cbor2.dumps({"x": float("nan")}), 60, Code.BAD_REQUEST, b"finite"),
            (b"{}", 0, Code.UNSUPPORTED_CONTENT_FORMAT, b"50"),
        ]
        for body, fmt, code, said in refused:
            opts = {} if fmt is None else {"content_format": fmt}
            r = await request(client, Code.PATCH, uri, body, **opts)
            assert r.code == code, (body[:40], r.code)
            assert said in r.payload, (body[:40], r.payload)
        r = await request(client, Code.PATCH, uri, json.dumps({"x": "y" * 9000}).encode())
        assert r.opt.size1 == 8192
        r = await request(client, Code.PATCH, uri, b"{}", if_match=[b"\x01", b"\x02"])
        assert r.code == Code.BAD_REQUEST and b"one If-Match" in r.payload
        # Nothing above changed the document.
        assert (await env.twins.get("dev-1")).reported_version == 3
        refusals = env.adapter.refusals
        assert refusals["twin_invalid"] == 7 and refusals["twin_too_large"] == 2
        assert refusals["twin_conflict"] == 1 and refusals["twin_too_deep"] == 1
        assert refusals["twin_unsupported_format"] == 1
        # If-Match stays refused where it means nothing (RFC 7252 5.4.1).
        r = await request(
            client, Code.POST, env.uri("dev-1", "telemetry"), b'{"v": 1}', if_match=[b"\x01"]
        )
        assert r.code == Code.BAD_OPTION


async def test_only_the_device_own_token_reaches_its_twin(tmp_path: Path, client: Any) -> None:
    async with gateway(tmp_path) as env:
        own = env.tokens["dev-1"]
        for uri in (
            env.uri("dev-1", "twin/desired", None),
            env.uri("dev-1", "twin/desired", "wrong"),
            env.uri("dev-2", "twin/desired", own),  # dev-1's token is not dev-2's
            env.uri("nobody", "twin", own),
        ):
            r = await request(client, Code.GET, uri)
            assert r.code == Code.UNAUTHORIZED, uri
        r = await request(client, Code.PATCH, env.uri("dev-2", "twin/reported", own), b"{}")
        assert r.code == Code.UNAUTHORIZED
        # No observation is held for a refused request.
        req = client.request(
            Message(code=Code.GET, uri=env.uri("dev-2", "twin/desired", own), observe=0)
        )
        r = await asyncio.wait_for(req.response, 15)
        assert r.code == Code.UNAUTHORIZED and r.opt.observe is None
        assert env.adapter.twin_observer_count("dev-2") == 0
        assert env.adapter.refusals["bad_token"] == 5 and env.adapter.refusals["no_token"] == 1
        assert (await env.twins.get("dev-2")).reported_version == 0


async def test_anonymous_twins_only_when_allowed_and_never_for_a_device_with_a_token(
    tmp_path: Path, client: Any
) -> None:
    async with gateway(tmp_path, "device_data_allow_anonymous: true") as env:
        r = await request(client, Code.GET, env.uri("open-1", "twin/desired", None))
        assert r.code == Code.CONTENT
        r = await request(client, Code.GET, env.uri("dev-1", "twin/desired", None))
        assert r.code == Code.UNAUTHORIZED


async def test_twin_observations_count_against_the_observation_caps(
    tmp_path: Path, client: Any
) -> None:
    async with gateway(tmp_path, "max_observations_per_address: 2") as env:
        held = []
        for view in ("desired", "delta"):
            req = client.request(
                Message(code=Code.GET, uri=env.uri("dev-1", f"twin/{view}"), observe=0)
            )
            r = await asyncio.wait_for(req.response, 15)
            assert r.code == Code.CONTENT and r.opt.observe is not None
            held.append(req)
        req = client.request(
            Message(code=Code.GET, uri=env.uri("dev-1", "twin/reported"), observe=0)
        )
        r = await asyncio.wait_for(req.response, 15)
        assert r.code == Code.SERVICE_UNAVAILABLE and r.opt.max_age is not None
        assert env.adapter.refusals["observe_limit_per_address"] == 1
        # Observing the same view again replaces the old observation: no new place.
        again = client.request(
            Message(code=Code.GET, uri=env.uri("dev-1", "twin/desired"), observe=0)
        )
        r = await asyncio.wait_for(again.response, 15)
        assert r.code == Code.CONTENT and r.opt.observe is not None
        await wait_until(lambda: env.adapter.twin_observer_count("dev-1") == 2)
        # The replaced one ended with a last 5.03.
        with pytest.raises((aiocoap.error.Error, StopAsyncIteration)):
            await asyncio.wait_for(anext(aiter(held[0].observation)), 15)
        for req in (held[1], again):
            req.observation.cancel()


async def test_a_large_desired_document_goes_out_in_blocks(tmp_path: Path, client: Any) -> None:
    async with gateway(tmp_path) as env:
        big = {f"key{i:03}": "v" * 40 for i in range(100)}  # about 5 KB
        await env.twins.patch("dev-3", "desired", big, by="t")
        req = client.request(
            Message(code=Code.GET, uri=env.uri("dev-3", "twin/desired"), observe=0)
        )
        first = await asyncio.wait_for(req.response, 15)
        # aiocoap's client fetched the other blocks itself and assembled them.
        assert json.loads(first.payload) == big
        notifications = aiter(req.observation)
        await env.twins.patch("dev-3", "desired", {"key000": "changed"}, by="t")
        n = await asyncio.wait_for(anext(notifications), 15)
        assert json.loads(n.payload) == {**big, "key000": "changed"}
        req.observation.cancel()
        # A single block by hand: 256 bytes of block 2, Size2 only on block 0.
        from aiocoap.optiontypes import BlockOption

        r = await request(
            client, Code.GET, env.uri("dev-3", "twin/desired"),
            block2=BlockOption.BlockwiseTuple(2, False, 4), whole=False,
        )  # fmt: skip
        assert r.code == Code.CONTENT and len(r.payload) == 256 and r.opt.block2.more
        r = await request(
            client, Code.GET, env.uri("dev-3", "twin/desired"),
            block2=BlockOption.BlockwiseTuple(500, False, 4), whole=False,
        )  # fmt: skip
        assert r.code == Code.BAD_REQUEST and b"past the end" in r.payload


async def test_bad_requests_are_answered_counted_and_the_listener_keeps_serving(
    tmp_path: Path, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from aiocoap.optiontypes import BlockOption

    async with gateway(tmp_path, "max_body_size: 4KiB") as env:
        port = env.adapter.port
        token = env.tokens["dev-1"]
        cases = [
            (Code.GET, f"devices/a+b/twin?token={token}", {}, Code.BAD_REQUEST),
            (Code.GET, f"devices//twin/desired?token={token}", {}, Code.BAD_REQUEST),
            (Code.GET, f"devices/dev-1/twin/desired/x?token={token}", {}, Code.NOT_FOUND),
            (Code.GET, f"devices/dev-1/twin/other?token={token}", {}, Code.NOT_FOUND),
            (
                Code.DELETE,
                f"devices/dev-1/twin/reported?token={token}",
                {},
                Code.METHOD_NOT_ALLOWED,
            ),
            (
                Code.GET,
                f"devices/dev-1/twin?token={token}",
                {"block2": BlockOption.BlockwiseTuple(2**20 - 1, False, 6)},
                Code.BAD_REQUEST,
            ),
            # Observe on a PUT means nothing (RFC 7641): answered as a PUT.
            (Code.PUT, f"devices/dev-1/twin/reported?token={token}", {"observe": 0}, Code.CHANGED),
            # A patch announced larger than the listener's body limit: 4.13 at once.
            (
                Code.PUT,
                f"devices/dev-1/twin/reported?token={token}",
                {"size1": 10**6},
                Code.REQUEST_ENTITY_TOO_LARGE,
            ),
        ]
        for code, path, opts, expected in cases:
            msg = Message(code=code, uri=f"coap://127.0.0.1:{port}/{path}", payload=b"{}")
            for k, v in opts.items():
                setattr(msg.opt, k, v)
            r = await asyncio.wait_for(client.request(msg, handle_blockwise=False).response, 15)
            assert r.code == expected, (code, path, r.code, r.payload)
        assert env.adapter.refusals["bad_device_id"] == 2
        assert env.adapter.refusals["twin_bad_block"] == 1
        r = await request(client, Code.GET, env.uri("dev-1", "twin/reported"))
        assert r.code == Code.CONTENT and r.opt.etag == b"\x01"
        assert not [rec for rec in caplog.records if rec.exc_info or rec.levelname == "ERROR"]


async def test_random_requests_to_twins_and_firmware_never_get_a_server_error(
    tmp_path: Path, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """600 seeded random requests, mostly well-addressed (the device's own
    token, its reported document) so that the payloads reach the decoders:
    valid, truncated, random bytes, CBOR that JSON cannot hold; with random
    formats, If-Match and Block2. Each gets a 2.xx or 4.xx answer, nothing is
    logged as an error, and the listener keeps serving."""
    import random

    from aiocoap.optiontypes import BlockOption

    rng = random.Random(16)
    async with gateway(tmp_path) as env:
        await env.twins.patch("dev-1", "desired", {"a": {"b": [1, 2, 3]}, "s": "x" * 2000}, by="t")
        token = env.tokens["dev-1"]
        paths = ["twin/reported"] * 6 + [
            "twin", "twin/desired", "twin/delta", "twin/nope", "firmware/img", "firmware/",
            "commands", "telemetry",
        ]  # fmt: skip
        bodies = [
            (b"{}", 50), (b'{"k": 1}', 52), (b'{"k": {"x": null}}', 50), (b"[]", 50),
            (cbor2.dumps({"k": [1.5, None]}), 60), (cbor2.dumps({"k": 2**70}), 60),
            (cbor2.dumps({"k": b"raw"}), 60), (cbor2.dumps({"k": float("inf")}), 60),
            (cbor2.dumps({2: "x"}), 60), (b"\xd9\xd9\xf7\xa1\x61k\x01", 60),
            (b"\xff\x00\x13", 60), (b'{"k": ', 50), (b"null", 50), (b"\xa1\x61", 60),
        ]  # fmt: skip
        codes = [Code.PUT, Code.PATCH, Code.PUT, Code.PATCH, Code.GET, Code.POST, Code.DELETE]
        seen: dict[str, int] = {}
        for i in range(600):
            device = "dev-1" if rng.random() < 0.8 else rng.choice(["dev-2", "x+y", "a" * 300])
            query = f"?token={token}" if rng.random() < 0.8 else rng.choice(["", "?token=", "?t=1"])
            uri = f"coap://127.0.0.1:{env.adapter.port}/devices/{device}/{rng.choice(paths)}{query}"
            body, fmt = rng.choice(bodies)
            msg = Message(code=rng.choice(codes), uri=uri, payload=body)
            if rng.random() < 0.8:
                msg.opt.content_format = fmt
            elif rng.random() < 0.5:
                msg.opt.content_format = rng.choice([0, 42, 110, 65000])
            if rng.random() < 0.2:
                msg.opt.accept = rng.choice([50, 60, 0, 42])
            if rng.random() < 0.2:
                msg.opt.if_match = [rng.randbytes(rng.randint(0, 8))]
            if rng.random() < 0.2:
                msg.opt.block2 = BlockOption.BlockwiseTuple(
                    rng.choice([0, 1, 2, 3, 1000, 2**20 - 1]), False, rng.randint(0, 7)
                )
            r = await asyncio.wait_for(client.request(msg, handle_blockwise=False).response, 15)
            assert r.code.is_successful() or r.code.class_ == 4, (i, msg, r.code, r.payload)
            seen[str(r.code.dotted)] = seen.get(str(r.code.dotted), 0) + 1
        # The mix reached the decoders and the store, not only the refusals.
        assert seen["2.04"] >= 5 and seen["4.00"] > 50, seen
        r = await request(client, Code.GET, env.uri("dev-1", "twin/desired"))
        assert r.code == Code.CONTENT
        assert not [rec for rec in caplog.records if rec.exc_info or rec.levelname == "ERROR"]


async def test_twin_gets_hold_no_memory_after_they_are_answered(
    tmp_path: Path, client: Any
) -> None:
    """aiocoap keeps each confirmable request's response for 247 s (3.4 KB a
    twin GET, 7.4 KB with orjson's 4 KiB output buffer as the payload); plain
    twin GETs keep nothing."""
    import gc
    import tracemalloc

    async with gateway(tmp_path) as env:
        await env.twins.patch("dev-1", "desired", {"mode": "auto"}, by="t")
        uri = env.uri("dev-1", "twin/desired")
        await request(client, Code.GET, uri)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(300):
                r = await request(client, Code.GET, uri)
                assert r.payload == b'{"mode":"auto"}'
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert retained < 256 * 1024, retained


async def test_a_disabled_device_loses_its_twin_observation_at_the_next_change(
    tmp_path: Path, client: Any
) -> None:
    """Every notification is rendered through the token check: a device
    disabled (as ``edgeway credentials disable`` does, on the same data
    directory) gets 4.01 instead of its next desired state, which ends the
    observation."""
    from edgeway.devices.credentials_cli import credentials_main

    async with gateway(tmp_path) as env:
        req = client.request(
            Message(code=Code.GET, uri=env.uri("dev-1", "twin/desired"), observe=0)
        )
        assert (await asyncio.wait_for(req.response, 15)).code == Code.CONTENT
        notifications = aiter(req.observation)
        await env.twins.patch("dev-1", "desired", {"v": 1}, by="t")
        assert json.loads((await asyncio.wait_for(anext(notifications), 15)).payload) == {"v": 1}
        data = tmp_path / "data"
        assert await asyncio.to_thread(credentials_main, ["disable", "dev-1"], data) == 0
        for _ in range(100):  # the gateway sees the store change within a second
            r = await request(client, Code.GET, env.uri("dev-1", "twin/desired"))
            if r.code == Code.UNAUTHORIZED:
                break
            await asyncio.sleep(0.05)
        await env.twins.patch("dev-1", "desired", {"v": 2, "secret": "x"}, by="t")
        last = await asyncio.wait_for(anext(notifications), 15)
        assert last.code == Code.UNAUTHORIZED and b"secret" not in last.payload
        with pytest.raises((aiocoap.error.Error, StopAsyncIteration)):
            await asyncio.wait_for(anext(notifications), 15)  # the observation is over
        await wait_until(lambda: env.adapter.twin_observer_count("dev-1") == 0)
