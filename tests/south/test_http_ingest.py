"""HTTP ingest against a real HTTP client (httpx), in-process, on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from ingest_doubles import RecordingIngest, wait_until

from certs import (
    CertFiles,
    crl_read,
    tls_certs,  # noqa: F401  (fixture)
)
from edgeway.config import HttpIngestSection, TlsConfig, parse_config
from edgeway.ingest import IngestStatus
from edgeway.south.base import adapter_class
from edgeway.south.http import HttpIngestAdapter

TOKEN = "token-of-boiler-1-abcdef"
ANY_TOKEN = "upstream-token-0123456789"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocols" / "http.md"

Start = Callable[..., Any]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Factory: run an HttpIngestAdapter on 127.0.0.1:0; every one is stopped at the end."""
    tasks: list[asyncio.Task[None]] = []

    async def _start(ingest: Any = None, **overrides: Any) -> tuple[HttpIngestAdapter, str]:
        options: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "tokens": {
                "boiler-1": TOKEN,
                "*": "sha256:" + hashlib.sha256(ANY_TOKEN.encode()).hexdigest(),
            },
        }
        token_check = overrides.pop("token_check", None)
        options.update(overrides)
        adapter = HttpIngestAdapter(
            HttpIngestSection.model_validate(options),
            ingest=ingest or RecordingIngest(),
            gateway_id="gw",
            data_dir=tmp_path,
            token_check=token_check,
        )
        task = asyncio.create_task(adapter.run())
        tasks.append(task)
        async with asyncio.timeout(10):
            await adapter.ready.wait()
        scheme = "https" if adapter.config.tls else "http"
        return adapter, f"{scheme}://127.0.0.1:{adapter.port}"

    try:
        yield _start
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_post_json_reading(start: Start) -> None:
    ingest = RecordingIngest()
    adapter, url = await start(ingest)
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{url}/devices/boiler-1/telemetry",
            json={"ts": 1700000000, "temp": 71.5, "pressure": 1.9},
            headers={**auth(), "X-Message-Id": "m-17"},
        )
    assert r.status_code == 200 and r.json() == {"accepted": 1}
    [reading] = ingest.readings
    assert reading.device_id == "boiler-1"
    assert reading.ts == 1700000000.0
    assert reading.metrics == {"temp": 71.5, "pressure": 1.9}
    assert reading.origin.adapter == "http"
    assert reading.origin.address == "/devices/boiler-1/telemetry"
    assert reading.origin.message_id == "m-17"
    assert adapter.state.readings == 1 and adapter.requests == {200: 1}


async def test_array_senml_and_cbor_bodies(start: Start) -> None:
    ingest = RecordingIngest()
    _, url = await start(ingest)
    async with httpx.AsyncClient() as client:
        r1 = await client.post(
            f"{url}/devices/boiler-1/telemetry", json=[{"a": 1}, {"a": 2}], headers=auth()
        )
        r2 = await client.post(
            f"{url}/devices/boiler-1/telemetry",
            content=b'[{"bn":"ignored:","n":"temp","u":"Cel","v":21.5}]',
            headers={**auth(), "Content-Type": "application/senml+json"},
        )
        r3 = await client.post(
            f"{url}/devices/boiler-1/telemetry",
            content=cbor2.dumps({"b": 3}),
            headers={**auth(), "Content-Type": "application/cbor"},
        )
    assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
    assert [r.json()["accepted"] for r in (r1, r2, r3)] == [2, 1, 1]
    assert [(r.device_id, r.metrics) for r in ingest.readings] == [
        ("boiler-1", {"a": 1}),
        ("boiler-1", {"a": 2}),
        ("boiler-1", {"temp": 21.5}),  # the URL names the device, not the base name
        ("boiler-1", {"b": 3}),
    ]
    assert ingest.readings[2].tags == {"unit:temp": "Cel"}


async def test_plain_and_binary_bodies_need_their_codec_options(start: Start) -> None:
    """text/plain and application/octet-stream carry no metric names: without
    codec_options they are a 415 naming the option, never a server error."""
    ingest = RecordingIngest()
    _, bare = await start(ingest)
    _, configured = await start(
        ingest,
        codec_options={
            "plain": {"metric": "temperature", "type": "number"},
            "binary": {"format": ">hH", "fields": [{"name": "t", "scale": 0.1}, {"name": "n"}]},
        },
    )
    path = "/devices/boiler-1/telemetry"
    text = {**auth(), "Content-Type": "text/plain"}
    octets = {**auth(), "Content-Type": "application/octet-stream"}
    frame = struct.pack(">hH", -25, 7)
    async with httpx.AsyncClient() as client:
        plain_bare = await client.post(bare + path, content=b"21.5", headers=text)
        binary_bare = await client.post(bare + path, content=frame, headers=octets)
        plain_ok = await client.post(configured + path, content=b" 21.5\n", headers=text)
        binary_ok = await client.post(configured + path, content=frame, headers=octets)
        plain_bad = await client.post(configured + path, content=b"ERR", headers=text)
    for r, codec in ((plain_bare, "plain"), (binary_bare, "binary")):
        assert r.status_code == 415
        assert r.json()["reason"] == "codec_not_configured"
        assert f"http_ingest.codec_options.{codec}" in r.json()["detail"]
    assert (plain_ok.status_code, binary_ok.status_code) == (200, 200)
    assert (plain_bad.status_code, plain_bad.json()["reason"]) == (400, "not_a_number")
    assert [r.metrics for r in ingest.readings] == [
        {"temperature": 21.5},
        {"t": pytest.approx(-2.5), "n": 7},
    ]


async def test_a_listener_nobody_can_use_says_so(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    # What `edgeway run --http-listen 0.0.0.0:PORT` without a config file builds.
    with caplog.at_level("WARNING", logger="edgeway.south.http"):
        _, url = await start(tokens={}, allow_anonymous=False)
    assert "every request will be refused (401)" in caplog.text
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{url}/devices/d/telemetry", json={"t": 1})
    assert r.status_code == 401
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgeway.south.http"):
        await start()  # tokens configured: nothing to warn about
        await start(allow_anonymous=True)  # anonymous on loopback: info, not a warning
    assert caplog.text == ""


async def test_answer_waits_for_the_ingest_future(start: Start) -> None:
    ingest = RecordingIngest(auto=False)
    _, url = await start(ingest)
    async with httpx.AsyncClient() as client:
        request = asyncio.create_task(
            client.post(f"{url}/devices/boiler-1/telemetry", json={"t": 1}, headers=auth())
        )
        await ingest.wait_pending(1)
        # The readings were submitted; the device must not have its answer yet.
        done, _ = await asyncio.wait({request}, timeout=0.3)
        assert not done
        ingest.pending[0].set_result(IngestStatus.ACCEPTED)
        r = await request
    assert r.status_code == 200


async def test_outbox_full_gives_503_with_retry_after(start: Start) -> None:
    ingest = RecordingIngest(auto=False)
    _, url = await start(ingest, retry_after=7)
    async with httpx.AsyncClient() as client:
        request = asyncio.create_task(
            client.post(f"{url}/devices/boiler-1/telemetry", json={"t": 1}, headers=auth())
        )
        await ingest.wait_pending(1)
        ingest.pending[0].set_result(IngestStatus.REJECTED_FULL)
        r = await request
        assert (r.status_code, r.headers["Retry-After"], r.json()["error"]) == (
            503,
            "7",
            "outbox_full",
        )

        # While saturated, requests are refused before the body is decoded.
        ingest.status = IngestStatus.REJECTED_FULL
        r = await client.post(f"{url}/devices/boiler-1/telemetry", json={"t": 1}, headers=auth())
        assert r.status_code == 503 and r.headers["Retry-After"] == "7"
        h = await client.get(f"{url}/healthz")
        assert h.status_code == 503
    assert len(ingest.batches) == 1


async def test_pipeline_rejection_and_ack_timeout(start: Start) -> None:
    ingest = RecordingIngest(auto=False)
    _, url = await start(ingest, ack_timeout=0.2)
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{url}/devices/boiler-1/telemetry", json={"t": 1}, headers=auth())
        assert (
            r.status_code == 503 and r.json()["error"] == "timeout" and "Retry-After" in r.headers
        )
        ingest.auto, ingest.status = True, IngestStatus.REJECTED_INVALID
        r = await client.post(f"{url}/devices/boiler-1/telemetry", json={"t": 1}, headers=auth())
        assert r.status_code == 400 and r.json()["reason"] == "rejected_invalid"


async def test_authentication(start: Start) -> None:
    ingest = RecordingIngest()
    _, url = await start(ingest)
    post = f"{url}/devices/boiler-1/telemetry"
    async with httpx.AsyncClient() as client:
        no_token = await client.post(post, json={"t": 1})
        wrong = await client.post(post, json={"t": 1}, headers=auth("wrong-token-0123456789"))
        basic = await client.post(
            post, json={"t": 1}, headers={"Authorization": "Basic dXNlcjpwdw=="}
        )
        other_device = await client.post(
            f"{url}/devices/boiler-2/telemetry", json={"t": 1}, headers=auth()
        )
        upstream = await client.post(
            f"{url}/devices/boiler-2/telemetry", json={"t": 1}, headers=auth(ANY_TOKEN)
        )
    for r, reason in [
        (no_token, "no_token"),
        (wrong, "bad_token"),
        (basic, "bad_authorization"),
        (other_device, "bad_token"),
    ]:
        assert r.status_code == 401, reason
        assert r.json()["reason"] == reason
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.status_code == 200
    assert [r.device_id for r in ingest.readings] == ["boiler-2"]


async def test_anonymous_and_token_check_hook(start: Start) -> None:
    _, url = await start(allow_anonymous=True, tokens={})
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"{url}/devices/d/telemetry", json={"t": 1})).status_code == 200

    seen: list[tuple[str, str | None]] = []

    async def check(device_id: str, token: str | None) -> bool:
        seen.append((device_id, token))
        return token == "registry-token"

    _, url = await start(token_check=check)
    async with httpx.AsyncClient() as client:
        ok = await client.post(
            f"{url}/devices/d/telemetry", json={"t": 1}, headers=auth("registry-token")
        )
        bad = await client.post(f"{url}/devices/d/telemetry", json={"t": 1}, headers=auth(TOKEN))
    assert (ok.status_code, bad.status_code) == (200, 401)
    assert seen == [("d", "registry-token"), ("d", TOKEN)]


async def test_anonymous_requests_need_a_json_or_cbor_content_type(start: Start) -> None:
    """A web page can post text/plain, forms and multipart cross-origin without
    a CORS preflight; JSON and CBOR types need one, which is never granted. So
    without a token only JSON and CBOR bodies are taken (415 otherwise); with a
    token the device may use any type it is configured for."""
    ingest = RecordingIngest()
    _, url = await start(ingest, allow_anonymous=True, codec_options={"plain": {"metric": "t"}})
    post = f"{url}/devices/d/telemetry"
    async with httpx.AsyncClient() as client:
        refused = [
            await client.post(post, content=b'{"t": 1}'),  # no Content-Type
            await client.post(post, content=b'{"t": 1}', headers={"Content-Type": "text/plain"}),
            await client.post(post, data={"t": "1"}),  # application/x-www-form-urlencoded
            await client.post(post, files={"t": b"1"}),  # multipart/form-data
            await client.post(
                post, content=b"21.5", headers={"Content-Type": "text/plain; charset=utf-8"}
            ),
        ]
        accepted = [
            await client.post(post, json={"t": 2}),
            await client.post(
                post,
                content=cbor2.dumps({"t": 3}),
                headers={"Content-Type": "application/cbor"},
            ),
            await client.post(
                post,
                content=b'[{"n": "t", "v": 4}]',
                headers={"Content-Type": "application/senml+json; charset=utf-8"},
            ),
            # With a token, text/plain (configured here) is fine.
            await client.post(
                post, content=b"5", headers={**auth(ANY_TOKEN), "Content-Type": "text/plain"}
            ),
        ]
    assert [r.status_code for r in refused] == [415] * 5
    assert all(r.json()["reason"] == "anonymous_needs_json_or_cbor" for r in refused)
    assert [r.status_code for r in accepted] == [200] * 4
    assert [r.metrics["t"] for r in ingest.readings] == [2, 3, 4, 5]


async def test_bad_requests(start: Start) -> None:
    ingest = RecordingIngest()
    adapter, url = await start(ingest, max_body_size=1024)
    post = f"{url}/devices/boiler-1/telemetry"
    async with httpx.AsyncClient() as client:
        invalid = await client.post(
            post, content=b"{not json", headers={**auth(), "Content-Type": "application/json"}
        )
        no_metrics = await client.post(post, json={}, headers=auth())
        too_big = await client.post(post, json={"s": "x" * 2000}, headers=auth())

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 200

        too_big_chunked = await client.post(
            post, content=chunks(), headers={**auth(), "Content-Type": "application/json"}
        )
        xml = await client.post(
            post, content=b"<a/>", headers={**auth(), "Content-Type": "application/xml"}
        )
        form = await client.post(post, data={"a": "1"}, headers=auth())
        bad_id = await client.post(f"{url}/devices/a+b/telemetry", json={"t": 1}, headers=auth())
        not_found = await client.post(
            f"{url}/devices/boiler-1/other", json={"t": 1}, headers=auth()
        )
    assert (invalid.status_code, invalid.json()["reason"]) == (400, "invalid_json")
    assert (no_metrics.status_code, no_metrics.json()["reason"]) == (400, "no_metrics")
    assert too_big.status_code == 413
    assert too_big_chunked.status_code == 413
    assert xml.status_code == 415 and form.status_code == 415
    assert (bad_id.status_code, bad_id.json()["reason"]) == (400, "bad_device_id")
    assert not_found.status_code == 404
    assert ingest.readings == []
    assert adapter.decode_errors.counts == {
        ("boiler-1", "invalid_json"): 1,
        ("boiler-1", "no_metrics"): 1,
    }
    assert adapter.state.errors == 2


async def test_rate_limit_per_device(start: Start) -> None:
    _, url = await start(rate_limit=0.01, rate_burst=2, retry_after=3)
    async with httpx.AsyncClient() as client:
        codes = [
            (
                await client.post(
                    f"{url}/devices/boiler-1/telemetry", json={"t": i}, headers=auth()
                )
            ).status_code
            for i in range(3)
        ]
        other = await client.post(
            f"{url}/devices/boiler-2/telemetry", json={"t": 1}, headers=auth(ANY_TOKEN)
        )
        limited = await client.post(
            f"{url}/devices/boiler-1/telemetry", json={"t": 1}, headers=auth()
        )
    assert codes == [200, 200, 429]
    assert other.status_code == 200  # buckets are per device
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"


async def test_https(start: Start, tls_certs: CertFiles) -> None:  # noqa: F811
    ingest = RecordingIngest()
    tls = TlsConfig(cert=tls_certs.server_cert, key=tls_certs.server_key)
    _, url = await start(ingest, tls=tls.model_dump())
    assert url.startswith("https://")
    async with httpx.AsyncClient(verify=tls_certs.client_context(with_cert=False)) as client:
        r = await client.post(f"{url}/devices/boiler-1/telemetry", json={"t": 1}, headers=auth())
        health = await client.get(f"{url}/healthz")
    assert r.status_code == 200 and health.json() == {"status": "ok"}
    async with httpx.AsyncClient() as plain:  # the system CAs do not know the test CA
        with pytest.raises(httpx.ConnectError):
            await plain.get(f"{url}/healthz")


async def test_port_in_use_is_one_clear_error(start: Start, tmp_path: Path) -> None:
    adapter, _ = await start()
    second = HttpIngestAdapter(
        HttpIngestSection(listen=f"127.0.0.1:{adapter.port}"),
        ingest=RecordingIngest(),
        gateway_id="gw",
        data_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match=r"http_ingest: cannot listen on 127\.0\.0\.1:\d+"):
        await second.run()


def test_registered_for_its_section() -> None:
    assert adapter_class("http_ingest") is HttpIngestAdapter


def test_docs_example_loads() -> None:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert blocks, "docs/protocols/http.md has a yaml example"
    for block in blocks:
        cfg = parse_config(block, str(DOCS))
        assert cfg.http_ingest is not None


MALFORMED = [
    # one header line over aiohttp's 8190 bytes
    b"POST /devices/d/telemetry HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
    # more than 128 headers
    b"POST /devices/d/telemetry HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
    # a request line over 8190 bytes
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"POST /devices/d/telemetry HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n",
]


async def test_a_thousand_malformed_requests_get_400_and_a_few_lines_no_traceback(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ingest = RecordingIngest()
    adapter, url = await start(ingest)
    statuses: list[bytes] = []

    async def send(raw: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
        try:
            writer.write(raw)
            await writer.drain()
            statuses.append((await reader.readline()).split(b" ")[1])
        finally:
            writer.close()

    async with asyncio.timeout(60):
        for i in range(0, 1000, 20):
            await asyncio.gather(*(send(MALFORMED[j % len(MALFORMED)]) for j in range(i, i + 20)))
    assert statuses == [b"400"] * 1000
    async with httpx.AsyncClient() as client:
        ok = await client.post(f"{url}/devices/boiler-1/telemetry", json={"t": 1}, headers=auth())
    assert ok.status_code == 200
    lines = [
        r
        for r in caplog.records
        if r.name.startswith(("aiohttp", "edgeway.south.http", "asyncio"))
        and r.levelno >= logging.WARNING
    ]
    assert not [r for r in lines if r.exc_info]
    assert len(lines) <= 4, [r.getMessage() for r in lines]
    assert sum(adapter.refusals.values()) == 1000
    assert adapter.refusals["LineTooLong"] >= 280


async def test_non_http_traffic_is_counted_without_a_line(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # aiohttp reports it at debug
    adapter, _ = await start()
    reader, writer = await asyncio.open_connection("127.0.0.1", adapter.port)
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64)  # TLS hello
    assert (await reader.readline()).split(b" ")[1] == b"400"
    writer.close()
    await wait_until(lambda: sum(adapter.refusals.values()) == 1)
    assert list(adapter.refusals) == ["BadHttpMethod"]
    assert not [
        r
        for r in caplog.records
        if r.name.startswith(("aiohttp", "edgeway.south.http")) and r.levelno >= logging.WARNING
    ]


async def test_mutual_tls_follows_the_crl_as_it_changes(start: Start, tmp_path: Path) -> None:
    """With ``require_client_cert`` and ``tls.crl``, a certificate revoked
    after the listener started (``edgeway ca revoke`` rewrites the CRL) is
    refused at the next handshake, as on the MQTT listeners, and on a
    keep-alive connection opened before at its next request (the listener
    read the CRL once, at start, before)."""
    import ssl

    from edgeway.devices.ca import GatewayCa

    ca = GatewayCa(tmp_path / "ca")
    ca.init("test CA")
    ca.issue("127.0.0.1", ca.dir / "server.pem", server_names=["127.0.0.1"],
             key_out=ca.dir / "server.key")  # fmt: skip
    ca.issue("boiler-1", tmp_path / "boiler-1.pem")
    tls = TlsConfig(cert=ca.dir / "server.pem", key=ca.dir / "server.key", ca=ca.cert_path,
                    crl=ca.crl_path, require_client_cert=True)  # fmt: skip
    ingest = RecordingIngest()
    adapter, url = await start(ingest, tls=tls.model_dump(), allow_anonymous=True)
    client = ssl.create_default_context(cafile=str(ca.cert_path))
    client.load_cert_chain(tmp_path / "boiler-1.pem")

    async def post() -> int:
        # A new connection each time: a revoked certificate is refused at the handshake.
        async with httpx.AsyncClient(verify=client) as c:
            r = await c.post(f"{url}/devices/boiler-1/telemetry", json={"t": 1})
            return r.status_code

    assert await post() == 200
    async with httpx.AsyncClient(verify=client) as kept:  # a keep-alive connection
        r = await kept.post(f"{url}/devices/boiler-1/telemetry", json={"t": 2})
        assert r.status_code == 200
        assert ca.revoke("boiler-1") == 1
        await wait_until(crl_read(adapter._crl_watch, ca.crl_path), 5)
        # The connection opened before: refused per request, and closed.
        r = await kept.post(f"{url}/devices/boiler-1/telemetry", json={"t": 3})
        assert r.status_code == 403 and r.json()["error"] == "certificate_revoked"
        assert r.headers.get("connection", "").lower() == "close"
    # A new connection: refused at the handshake.
    with pytest.raises(httpx.HTTPError):
        await post()
    assert [r.metrics["t"] for r in ingest.readings] == [1, 2]
