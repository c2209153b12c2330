"""Commands from the cloud through the sinks: NATS request/reply against the
local nats-server, HTTP long-poll against an aiohttp server playing the cloud."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from edgeway.config import parse_config
from edgeway.gateway import Gateway

nats = pytest.importorskip("nats")

NATS_URL = "nats://127.0.0.1:4222"


async def start(text: str) -> tuple[Gateway, asyncio.Task[None]]:
    gw = Gateway(parse_config(text, "t.yaml"))
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    return gw, task


async def stop(gw: Gateway, task: asyncio.Task[None]) -> None:
    gw.request_stop()
    await asyncio.wait_for(task, 10)


def test_commands_subject_may_not_be_a_record_subject() -> None:
    from edgeway.config import SinkConfig
    from edgeway.sinks.base import SinkOptionsError
    from edgeway.sinks.nats import NatsSink

    with pytest.raises(SinkOptionsError) as e:
        NatsSink(
            SinkConfig(
                name="s",
                url=NATS_URL,
                options={"commands_subject": "edgeway.{gateway_id}.commands"},
            ),
            "gw",
        )
    assert e.value.problems[0][0] == ("options", "commands_subject")


async def test_nats_request_reply(tmp_path: Path) -> None:
    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2)
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"no nats-server on {NATS_URL}: {e}")
    token = uuid.uuid4().hex[:8]
    gw, task = await start(
        f"""
gateway: {{id: gw-{token}, data_dir: "{tmp_path}"}}
mqtt: {{enabled: false}}
sinks:
  - name: stream
    url: {NATS_URL}
    options: {{subject: "t{token}.{{gateway_id}}.{{device_id}}", stream: S{token},
               create_stream: true, commands_subject: "c{token}.{{gateway_id}}"}}
"""
    )
    try:
        assert gw.commands is not None
        subject = f"c{token}.gw-{token}"
        request = {"id": "c-1", "device_id": "pump-1", "name": "stop", "ttl": "5m"}
        answer: dict[str, Any] = {}
        for _ in range(50):  # the subscription is made as the gateway starts
            try:
                msg = await nc.request(subject, orjson.dumps(request), timeout=1)
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.1)
                continue
            answer = orjson.loads(msg.data)
            break
        assert answer["request_id"] == "c-1" and answer["state"] == "queued"
        cmd = await gw.commands.get(answer["id"])
        assert cmd is not None and cmd.source == "cloud:stream" and cmd.device_id == "pump-1"
        assert 299 <= cmd.expires_at - cmd.created_at <= 301
        # The cloud sends it again (it missed the answer): the same command.
        msg = await nc.request(subject, orjson.dumps(request), timeout=5)
        assert orjson.loads(msg.data)["id"] == answer["id"]
        # A request without an id, or with a bad name, is refused and answered.
        msg = await nc.request(subject, b'{"device_id": "p", "name": "x"}', timeout=5)
        assert orjson.loads(msg.data)["error"] == "invalid"
        bad = {"id": "c-2", "device_id": "p", "name": "no spaces"}
        msg = await nc.request(subject, orjson.dumps(bad), timeout=5)
        assert orjson.loads(msg.data)["error"] == "invalid"
        assert len(await gw.commands.list()) == 1
    finally:
        await stop(gw, task)
        js = nc.jetstream()
        try:
            await js.delete_stream(f"S{token}")
        except Exception:
            pass
        await nc.close()


class Cloud:
    """Serves command polls: each request until the gateway answered it."""

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self.polls: list[dict[str, str]] = []
        self.lose_next_answer = False
        self.trickle = False  # send poll answers in small pieces, one at a time
        self.answered = asyncio.Event()

    async def poll(self, request: web.Request) -> web.StreamResponse:
        assert request.headers.get("Authorization") == "Bearer cloud-token-123"
        self.polls.append(dict(request.query))
        if not self.pending:
            await asyncio.sleep(min(float(request.query["wait"]), 0.2))
            return web.Response(status=204)
        if not self.trickle:
            return web.json_response({"commands": self.pending})
        body = orjson.dumps({"commands": self.pending})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 300):
            await resp.write(body[i : i + 300])
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async def ingest(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    async def answer(self, request: web.Request) -> web.Response:
        doc = await request.json()
        if self.lose_next_answer:
            self.lose_next_answer = False
            return web.Response(status=502)  # as if the answer was lost
        self.answers.extend(doc["answers"])
        answered = {a["request_id"] for a in doc["answers"]}
        self.pending = [p for p in self.pending if p["id"] not in answered]
        self.answered.set()
        return web.json_response({})


@pytest.fixture
async def cloud() -> AsyncIterator[tuple[Cloud, str]]:
    c = Cloud()
    app = web.Application()
    app.router.add_get("/commands", c.poll)
    app.router.add_post("/commands", c.answer)
    app.router.add_post("/ingest", c.ingest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield c, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _polling_gateway(tmp_path: Path, base: str) -> str:
    """A gateway whose HTTP sink polls ``base``/commands for cloud requests."""
    return f"""
gateway: {{id: gw-http, data_dir: "{tmp_path}"}}
mqtt: {{enabled: false}}
sinks:
  - name: cloud
    url: {base}/ingest
    options: {{bearer_token: cloud-token-123, commands_url: "{base}/commands",
               commands_wait: 1s}}
"""


async def test_http_long_poll(tmp_path: Path, cloud: tuple[Cloud, str]) -> None:
    c, base = cloud
    c.pending = [
        {"id": "r-1", "device_id": "pump-1", "name": "stop"},
        {"id": "r-2", "device_id": "pump-1", "name": "bad name"},
    ]
    c.lose_next_answer = True
    gw, task = await start(_polling_gateway(tmp_path, base))
    try:
        assert gw.commands is not None
        await asyncio.wait_for(c.answered.wait(), 10)
        # The first answer was lost: the cloud sent both requests again,
        # and r-1 was still queued once.
        assert len(c.polls) >= 2
        assert c.polls[0] == {"gateway_id": "gw-http", "wait": "1"}
        by_id = {a["request_id"]: a for a in c.answers}
        assert by_id["r-1"]["state"] == "queued"
        assert by_id["r-2"]["error"] == "invalid"
        cmds = await gw.commands.list()
        assert [(x.device_id, x.name, x.idempotency_key) for x in cmds] == [
            ("pump-1", "stop", "cloud:r-1")
        ]
    finally:
        await stop(gw, task)


async def test_http_long_poll_answer_in_pieces(tmp_path: Path, cloud: tuple[Cloud, str]) -> None:
    """A poll answer that arrives in many TCP segments is read whole (one
    ``read(n)`` returned only its first piece and the poll never parsed)."""
    c, base = cloud
    c.trickle = True
    c.pending = [
        {"id": f"r-{i}", "device_id": "pump-1", "name": "set", "params": {"note": "x" * 40}}
        for i in range(40)
    ]
    gw, task = await start(_polling_gateway(tmp_path, base))
    try:
        assert gw.commands is not None
        await asyncio.wait_for(c.answered.wait(), 15)
        assert sorted(a["request_id"] for a in c.answers) == sorted(f"r-{i}" for i in range(40))
        assert len(await gw.commands.list()) == 40
    finally:
        await stop(gw, task)
