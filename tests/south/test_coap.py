"""CoAP adapter against real clients: aiocoap's client and libcoap's coap-client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiocoap")
pytest.importorskip("cbor2")

import aiocoap
import cbor2
from aiocoap import Code, Message
from coap_devices import aiocoap_client  # noqa: F401  (the client fixture)
from ingest_doubles import RecordingIngest, wait_until

from coap_datagrams import coap_request, con_post, telemetry_path
from edgeway.commands.model import Command
from edgeway.config import CoapSection, parse_config
from edgeway.ingest import IngestStatus
from edgeway.south.coap import CoapAdapter

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocols" / "coap.md"
COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")


class RecordingEvents:
    """The command queue's side of a downlink: records who became reachable."""

    def __init__(self) -> None:
        self.reachable: list[str] = []

    def device_reachable(self, device_id: str) -> None:
        self.reachable.append(device_id)

    def report(self, result: Any) -> bool:
        return False


@contextlib.asynccontextmanager
async def coap_server(ingest: Any, **cfg: Any) -> AsyncIterator[CoapAdapter]:
    adapter = CoapAdapter(CoapSection(listen="127.0.0.1:0", **cfg), ingest=ingest)
    if adapter.config.commands:
        adapter.downlink(RecordingEvents())
    task = asyncio.create_task(adapter.run())
    try:
        async with asyncio.timeout(10):
            await adapter.ready.wait()
        yield adapter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def url(adapter: CoapAdapter, path: str) -> str:
    return f"coap://127.0.0.1:{adapter.port}/{path}"


async def post(
    client: Any,
    adapter: CoapAdapter,
    device: str,
    payload: bytes,
    fmt: int | None = 50,
    code: Any = Code.POST,
) -> Any:
    msg = Message(code=code, uri=url(adapter, f"devices/{device}/telemetry"), payload=payload)
    if fmt is not None:
        msg.opt.content_format = fmt
    async with asyncio.timeout(15):
        return await client.request(msg).response


async def test_json_post_and_put_are_accepted(client: Any) -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest) as adapter:
        r = await post(client, adapter, "sensor-1", b'{"temperature": 21.5, "door": true}')
        assert r.code == Code.CHANGED
        r = await post(client, adapter, "sensor-2", b'{"rh": 40}', fmt=None, code=Code.PUT)
        assert r.code == Code.CHANGED
    first, second = ingest.readings
    assert first.device_id == "sensor-1" and first.metrics == {"temperature": 21.5, "door": True}
    assert first.origin.adapter == "coap" and first.origin.address == "devices/sensor-1/telemetry"
    assert second.device_id == "sensor-2" and second.metrics == {"rh": 40}
    assert adapter.state.readings == 2


async def test_content_formats_senml_json_senml_cbor_cbor(client: Any) -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest) as adapter:
        senml = [{"bn": "x:", "n": "temp", "v": 1.5, "u": "Cel"}, {"n": "hum", "v": 40}]
        assert (
            await post(client, adapter, "a", json.dumps(senml).encode(), 110)
        ).code == Code.CHANGED
        assert (
            await post(client, adapter, "b", cbor2.dumps([{0: "temp", 2: 2.5}]), 112)
        ).code == Code.CHANGED
        assert (
            await post(client, adapter, "c", cbor2.dumps({"temp": 3.5}), 60)
        ).code == Code.CHANGED
    by_device = {r.device_id: r for r in ingest.readings}
    assert by_device["a"].metrics == {"temp": 1.5, "hum": 40}
    assert by_device["b"].metrics == {"temp": 2.5}
    assert by_device["c"].metrics == {"temp": 3.5}


async def test_response_waits_for_the_ingest_future(client: Any) -> None:
    ingest = RecordingIngest(auto=False)
    async with coap_server(ingest) as adapter:
        pending = asyncio.create_task(post(client, adapter, "slow", b'{"v": 1}'))
        await ingest.wait_pending(1)
        # The outbox has not confirmed: no 2.04 may be sent yet.
        done, _ = await asyncio.wait({pending}, timeout=0.5)
        assert not done
        ingest.pending[0].set_result(IngestStatus.ACCEPTED)
        r = await pending
        assert r.code == Code.CHANGED


async def test_full_outbox_answers_503_with_max_age(client: Any) -> None:
    ingest = RecordingIngest(status=IngestStatus.REJECTED_FULL)
    async with coap_server(ingest, retry_after=7) as adapter:
        r = await post(client, adapter, "d", b'{"v": 1}')
    assert r.code == Code.SERVICE_UNAVAILABLE
    assert r.opt.max_age == 7
    assert b"full" in r.payload
    assert adapter.state.rejected == 1 and adapter.state.readings == 0


async def test_bad_payload_is_400_with_reason_and_never_reaches_the_ingest(client: Any) -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest) as adapter:
        r = await post(client, adapter, "dev-x", b'{"temperature": ')
        assert r.code == Code.BAD_REQUEST
        assert r.payload.decode().startswith("invalid_json")
        r = await post(client, adapter, "dev-x", b"\xff\xfe", 60)
        assert r.code == Code.BAD_REQUEST
    assert ingest.batches == []
    assert adapter.decode_errors.counts[("dev-x", "invalid_json")] == 1
    assert sum(n for (dev, _), n in adapter.decode_errors.counts.items() if dev == "dev-x") == 2
    assert adapter.state.errors == 2


async def test_unsupported_format_method_and_path(client: Any) -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest) as adapter:
        r = await post(client, adapter, "d", b"<x/>", 41)  # application/xml
        assert r.code == Code.UNSUPPORTED_CONTENT_FORMAT
        assert b"50" in r.payload
        # text/plain is a known format, but the plain codec needs a metric name
        # this listener was not configured with: 4.15 naming the option, not 5.00.
        r = await post(client, adapter, "d", b"21.5", 0)
        assert r.code == Code.UNSUPPORTED_CONTENT_FORMAT
        assert b"codec_options.plain" in r.payload
        r = await client.request(
            Message(code=Code.GET, uri=url(adapter, "devices/d/telemetry"))
        ).response
        assert r.code == Code.METHOD_NOT_ALLOWED
        r = await client.request(
            Message(code=Code.POST, uri=url(adapter, "devices/d/other"), payload=b"{}")
        ).response
        assert r.code == Code.NOT_FOUND
    assert ingest.batches == []


async def test_blockwise_upload_and_size_limit(client: Any) -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest, max_body_size=8192) as adapter:
        # ~5 KiB of SenML: aiocoap's client sends it with Block1 (1 KiB blocks).
        records = [{"n": f"m{i}", "v": i} for i in range(300)]
        body = json.dumps(records).encode()
        assert 4096 < len(body) < 8192
        r = await post(client, adapter, "big", body, 110)
        assert r.code == Code.CHANGED
        assert len(ingest.readings[0].metrics) == 300
        too_big = json.dumps([{"n": f"m{i}", "v": i} for i in range(1000)]).encode()
        r = await post(client, adapter, "big", too_big, 110)
        assert r.code == Code.REQUEST_ENTITY_TOO_LARGE
        assert r.opt.size1 == 8192
    assert len(ingest.batches) == 1


def command(device: str, name: str, params: dict[str, Any]) -> Command:
    return Command(uuid.uuid4().hex, device, name, params, created_at=0.0, expires_at=1e10)


async def test_observe_commands(client: Any) -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest, commands=True) as adapter:
        downlink = adapter._downlink
        assert downlink is not None
        req = client.request(
            Message(code=Code.GET, uri=url(adapter, "devices/valve-1/commands"), observe=0)
        )
        first = await asyncio.wait_for(req.response, 10)
        assert first.code == Code.CONTENT and first.payload == b""
        assert adapter.observer_count("valve-1") == 1
        assert isinstance(downlink.events, RecordingEvents)
        assert downlink.events.reachable == ["valve-1"]
        notifications = aiter(req.observation)
        cmd = command("valve-1", "open", {"open": True})
        assert downlink.reachable(cmd)
        delivered = downlink.deliver(cmd)
        n1 = await asyncio.wait_for(anext(notifications), 10)
        assert json.loads(n1.payload) == cmd.device_payload()
        assert n1.opt.content_format == 50
        assert await asyncio.wait_for(delivered, 10) is True  # the client's ACK
        # Nobody observes this one: not reachable, and a delivery fails at once.
        nobody = command("nobody-listens", "x", {})
        assert not downlink.reachable(nobody)
        assert await downlink.deliver(nobody) is False
        req.observation.cancel()


async def test_port_in_use_fails_with_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        adapter = CoapAdapter(CoapSection(listen=f"127.0.0.1:{port}"), ingest=RecordingIngest())
        with pytest.raises(OSError, match=f"coap: cannot listen on 127.0.0.1:{port}"):
            await asyncio.wait_for(adapter.run(), 10)


def test_unknown_default_format_is_a_startup_error() -> None:
    with pytest.raises(ValueError, match="default_format"):
        CoapAdapter(CoapSection(default_format="nope"), ingest=RecordingIngest())
    with pytest.raises(ValueError, match=r"codec_options\.json"):
        CoapAdapter(CoapSection(codec_options={"json": {"bogus": 1}}), ingest=RecordingIngest())


def test_docs_example_parses() -> None:
    block = DOCS.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config(block, str(DOCS))
    assert cfg.coap is not None and cfg.coap.listen


# ---------------------------------------------------------------- libcoap


async def coap_client(*args: str) -> tuple[int, str]:
    assert COAP_CLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        COAP_CLIENT, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin (coap-client) not installed")
async def test_libcoap_client_post_blockwise_and_errors() -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest) as adapter:
        base = f"coap://127.0.0.1:{adapter.port}/devices"
        rc, out = await coap_client(
            "-m", "post", "-t", "50", "-e", '{"temperature": 19.5}', f"{base}/lc-1/telemetry"
        )
        assert rc == 0, out
        # -b 64: Block1 transfer in 64-byte blocks
        body = json.dumps([{"n": f"m{i}", "v": i} for i in range(40)])
        rc, out = await coap_client(
            "-m", "put", "-t", "110", "-b", "64", "-e", body, f"{base}/lc-2/telemetry"
        )
        assert rc == 0, out
        # a bad payload: libcoap prints the code and the diagnostic payload
        rc, out = await coap_client(
            "-m", "post", "-t", "50", "-e", "{nope", f"{base}/lc-3/telemetry"
        )
        assert "4.00" in out and "invalid_json" in out
        rc, out = await coap_client(
            "-m", "post", "-t", "41", "-e", "<x/>", f"{base}/lc-3/telemetry"
        )
        assert "4.15" in out
    by_device = {r.device_id: r for r in ingest.readings}
    assert by_device["lc-1"].metrics == {"temperature": 19.5}
    assert len(by_device["lc-2"].metrics) == 40
    assert "lc-3" not in by_device


@pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap3-bin (coap-client) not installed")
async def test_libcoap_client_observes_commands() -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest, commands=True) as adapter:
        uri = f"coap://127.0.0.1:{adapter.port}/devices/lc-obs/commands"
        task = asyncio.create_task(coap_client("-m", "get", "-s", "3", uri))
        await wait_until(lambda: adapter.observer_count("lc-obs") > 0)
        assert adapter._downlink is not None
        delivered = adapter._downlink.deliver(command("lc-obs", "reboot", {"at": "now"}))
        # libcoap acknowledged the confirmable notification.
        assert await asyncio.wait_for(delivered, 10) is True
        _, out = await task
    assert '"params":{"at":"now"}' in out


# ---------------------------------------------------------------- availability


async def _client_gone_before_the_answer_then_another_client_is_served() -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest) as adapter:
        # A real UDP client that sends a confirmable POST and closes its socket
        # at once: the 2.04 finds no socket and draws an ICMP port unreachable.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.sendto(con_post(1, "gone", b'{"v": 1}'), ("127.0.0.1", adapter.port))
        await ingest.wait_readings(1)
        await wait_until(lambda: adapter.responses.get("2.04") == 1)
        ctx = await aiocoap.Context.create_client_context()
        try:
            # aiocoap retransmits for ~90 s; a listener that stopped reading
            # never answers, so the timeout is the failure.
            async with asyncio.timeout(10):
                r = await post(ctx, adapter, "next", b'{"v": 2}')
        finally:
            await ctx.shutdown()
        assert r.code == Code.CHANGED
        assert [x.device_id for x in ingest.readings] == ["gone", "next"]
        assert adapter.listener_restarts == 0  # served by the first listener itself


def test_client_gone_before_the_answer_does_not_stop_the_listener_on_uvloop() -> None:
    """``edgeway run`` runs on uvloop: there the ICMP error that a closed client
    socket draws used to stop the listener's reader for good, silently."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_client_gone_before_the_answer_then_another_client_is_served())


async def test_client_gone_before_the_answer_does_not_stop_the_listener() -> None:
    await _client_gone_before_the_answer_then_another_client_is_served()


async def test_a_listener_that_stops_reading_is_reported_and_restarted(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ingest = RecordingIngest()
    async with coap_server(ingest, probe_interval=0.3) as adapter:
        assert adapter.state.listening is True
        assert (await post(client, adapter, "before", b'{"v": 1}')).code == Code.CHANGED
        await wait_until(lambda: adapter.probe_answered)
        # Silence the listener the way the uvloop bug did: its socket is no
        # longer read, with no error anywhere.
        sock = adapter.listener_socket()
        assert sock is not None
        asyncio.get_running_loop().remove_reader(sock.fileno())
        await wait_until(lambda: adapter.state.listening is False, within=15)
        assert adapter.state.connected is False
        assert "stopped serving" in (adapter.state.last_error or "")
        await wait_until(lambda: adapter.state.listening is True, within=15)
        assert adapter.listener_restarts == 1
        assert adapter.listener_socket() is not sock
        assert (await post(client, adapter, "after", b'{"v": 2}')).code == Code.CHANGED
    errors = [r for r in caplog.records if r.name == "edgeway.south.coap" and "stopped" in r.msg]
    assert len(errors) == 1 and errors[0].levelname == "ERROR"
    assert [r.device_id for r in ingest.readings] == ["before", "after"]


# ---------------------------------------------------------------- hostile input


TELEMETRY = telemetry_path("fz")
BODY = b'{"v": 1}'
HOSTILE = {
    # unknown critical options: 4.02 (aiocoap answered 2.04 as if absent)
    "oscore": (coap_request(0, [*TELEMETRY, (9, b"\x09")], payload=BODY), "4.02"),
    "if-none-match": (coap_request(0, [*TELEMETRY, (5, b"")], payload=BODY), "4.02"),
    "critical 2049": (coap_request(0, [*TELEMETRY, (2049, b"zz")], payload=BODY), "4.02"),
    "proxy-uri": (coap_request(0, [*TELEMETRY, (35, b"coap://e/x")], payload=BODY), "5.05"),
    # a Uri-Path that is not UTF-8: aiocoap raised out of its read callback
    # (a traceback from the event loop per datagram, no answer)
    "uri-path not utf-8": (
        coap_request(0, [(11, b"devices"), (11, b"\xff\xfe"), (11, b"t")], payload=BODY),
        "4.02",
    ),
    "uri-query not utf-8": (coap_request(0, [*TELEMETRY, (15, b"\xc3")], payload=BODY), "4.02"),
    # Observe on a POST: aiocoap answered, then logged a TypeError traceback
    "observe on post": (coap_request(0, [*TELEMETRY, (6, b"")], payload=BODY), "2.04"),
    # a reserved option length (15): aiocoap ignores it (a warning line each)
    "option length 15": (bytes([0x41, 0x02, 0, 0, 0x5A, 0xBF]), None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_request_gets_a_clean_answer(name: str) -> None:
    datagram, expected = HOSTILE[name]
    async with coap_server(RecordingIngest()) as adapter:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(("127.0.0.1", adapter.port))
            s.send(datagram)
            if expected is None:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await loop.sock_recv(s, 2048)
                return
            async with asyncio.timeout(10):
                answer = await loop.sock_recv(s, 2048)
    code = f"{answer[1] >> 5}.{answer[1] & 31:02d}"
    assert (code, answer[0] >> 4 & 3, answer[2:4]) == (expected, 2, datagram[2:4])  # ACK, same MID


async def test_a_thousand_hostile_datagrams_log_a_few_lines_and_no_traceback(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ingest = RecordingIngest()
    async with coap_server(ingest) as adapter:
        loop = asyncio.get_running_loop()
        kinds = list(HOSTILE.values())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(("127.0.0.1", adapter.port))
            # In rounds of one datagram of each kind, reading the answers of a
            # round before the next, so the socket buffer never overflows.
            answers = 0
            for i in range(1000):
                datagram = bytearray(kinds[i % len(kinds)][0])
                datagram[2:4] = (i + 1).to_bytes(2, "big")  # each a new message
                s.send(bytes(datagram))
                if i % len(kinds) == len(kinds) - 1:
                    async with asyncio.timeout(10):
                        for _ in range(sum(1 for _, code in kinds if code is not None)):
                            await loop.sock_recv(s, 2048)
                            answers += 1
        # The listener still serves a well-behaved device.
        r = await post(client, adapter, "good", b'{"v": 2}')
        assert r.code == Code.CHANGED
    assert answers >= 800
    assert adapter.refusals["unknown_critical_option"] == 375  # 3 of 8 kinds
    assert adapter.refusals["undecodable"] == 250
    assert adapter.refusals["proxy_option"] == 125
    lines = [
        r
        for r in caplog.records
        if r.name.startswith(("edgeway.south.coap", "aiocoap", "asyncio"))
        and r.levelno >= logging.WARNING
    ]
    assert not [r for r in lines if r.exc_info], [r.getMessage() for r in lines if r.exc_info]
    assert len(lines) <= 6, [r.getMessage() for r in lines]


# ---------------------------------------------------------------- observation limits


def _observe(client: Any, adapter: CoapAdapter, device: str) -> Any:
    return client.request(
        Message(code=Code.GET, uri=url(adapter, f"devices/{device}/commands"), observe=0)
    )


async def test_observations_are_capped_per_address_with_503_and_max_age(client: Any) -> None:
    async with coap_server(
        RecordingIngest(),
        commands=True,
        command_poll_wait=0.1,
        max_observations_per_address=2,
        retry_after=9,
    ) as adapter:
        first = _observe(client, adapter, "v-1")
        second = _observe(client, adapter, "v-2")
        for req in (first, second):
            r = await asyncio.wait_for(req.response, 10)
            assert r.code == Code.CONTENT and r.opt.observe is not None
        third = await asyncio.wait_for(_observe(client, adapter, "v-3").response, 10)
        assert third.code == Code.SERVICE_UNAVAILABLE and third.opt.max_age == 9
        assert third.opt.observe is None
        assert adapter.observer_count("v-3") == 0
        assert adapter.refusals == {"observe_limit_per_address": 1}
        # A plain GET (no Observe) is still answered: polling stays possible.
        r = await client.request(
            Message(code=Code.GET, uri=url(adapter, "devices/v-3/commands"))
        ).response
        assert r.code == Code.CONTENT
        # Observing a device again from the same address (a device after a
        # reboot, from a new port) replaces its old observation: no lock-out.
        other = await aiocoap.Context.create_client_context()
        try:
            renewed = _observe(other, adapter, "v-1")
            r = await asyncio.wait_for(renewed.response, 10)
            assert r.code == Code.CONTENT and r.opt.observe is not None
            # The replaced observation ends (a last 5.03, which aiocoap's
            # client reports as the end of the observation).
            with pytest.raises((StopAsyncIteration, aiocoap.error.ObservationCancelled)):
                await asyncio.wait_for(anext(aiter(first.observation)), 10)
        finally:
            await wait_until(lambda: adapter.observer_count("v-1") == 1)
            await other.shutdown()
        assert adapter.refusals == {"observe_limit_per_address": 1}


async def test_command_polls_are_capped_and_a_newer_poll_replaces_the_older(client: Any) -> None:
    async with coap_server(
        RecordingIngest(), commands=True, command_poll_wait=5, max_command_polls=1, retry_after=7
    ) as adapter:

        def poll(device: str) -> Any:
            msg = Message(code=Code.GET, uri=url(adapter, f"devices/{device}/commands"))
            return asyncio.ensure_future(client.request(msg).response)

        downlink = adapter._downlink
        assert downlink is not None
        waiting = poll("p-1")
        await wait_until(lambda: downlink.reachable(command("p-1", "x", {})))
        # The one place is taken: another device's poll gets 5.03 at once.
        r = await asyncio.wait_for(poll("p-2"), 10)
        assert r.code == Code.SERVICE_UNAVAILABLE and r.opt.max_age == 7
        assert adapter.refusals == {"poll_limit": 1}
        # The same device polling again takes its place: the older poll is
        # answered at once, empty (nothing was queued), well before its 5 s.
        newer = poll("p-1")
        r = await asyncio.wait_for(waiting, 3)
        assert (r.code, r.payload) == (Code.CONTENT, b"")
        delivered = downlink.deliver(command("p-1", "go", {"n": 1}))
        r = await asyncio.wait_for(newer, 10)
        assert json.loads(r.payload)["params"] == {"n": 1}
        assert await asyncio.wait_for(delivered, 10) is True


async def test_a_result_over_max_body_size_is_refused_block_by_block(client: Any) -> None:
    async with coap_server(RecordingIngest(), commands=True, max_body_size=4096) as adapter:
        msg = Message(
            code=Code.POST,
            uri=url(adapter, "devices/r-1/commands/abc/result"),
            payload=b'{"result": "' + b"r" * 6000 + b'"}',
            content_format=50,
        )
        r = await asyncio.wait_for(client.request(msg).response, 10)
        assert r.code == Code.REQUEST_ENTITY_TOO_LARGE and r.opt.size1 == 4096


async def test_observations_are_capped_in_total(client: Any) -> None:
    async with coap_server(RecordingIngest(), commands=True, max_observations=1) as adapter:
        r = await asyncio.wait_for(_observe(client, adapter, "t-1").response, 10)
        assert r.code == Code.CONTENT
        r = await asyncio.wait_for(_observe(client, adapter, "t-2").response, 10)
        assert r.code == Code.SERVICE_UNAVAILABLE and r.opt.max_age == 5
        assert adapter.refusals == {"observe_limit": 1}


@pytest.mark.parametrize(
    ("options", "allowed"),
    [
        ({"observe": "deny"}, False),
        ({"observe_networks": ["10.0.0.0/8", "fd00::/8"]}, False),
        ({"observe_networks": ["127.0.0.0/8"]}, True),
    ],
)
async def test_who_may_observe(client: Any, options: dict[str, Any], allowed: bool) -> None:
    async with coap_server(
        RecordingIngest(), commands=True, command_poll_wait=0.1, **options
    ) as adapter:
        r = await asyncio.wait_for(_observe(client, adapter, "w-1").response, 10)
        if allowed:
            assert r.code == Code.CONTENT and adapter.observer_count("w-1") == 1
            return
        assert r.code == Code.FORBIDDEN and r.opt.observe is None
        assert adapter.observer_count("w-1") == 0
        assert adapter.refusals == {"observe_denied": 1}
        r = await client.request(
            Message(code=Code.GET, uri=url(adapter, "devices/w-1/commands"))
        ).response
        if "observe_networks" in options:
            # A plain GET takes commands too: refused outside observe_networks.
            assert r.code == Code.FORBIDDEN
            assert adapter.refusals == {"observe_denied": 1, "commands_denied": 1}
        else:
            # observe: deny: devices poll with a plain GET instead (nothing queued).
            assert (r.code, r.payload) == (Code.CONTENT, b"")


def test_observe_networks_must_be_networks() -> None:
    with pytest.raises(ValueError, match=r"observe_networks"):
        CoapSection(observe_networks=["10.0.0.0/8", "not-a-net"])
