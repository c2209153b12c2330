"""HTTP sink against a real aiohttp server on a free loopback port."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner, deadletter_main, list_dead_letters
from edgeway.outbox.store import stored_size
from edgeway.reading import Reading
from edgeway.sinks.base import PermanentSinkError, RetryableSinkError, create_sink
from edgeway.sinks.http import HttpSink, idempotency_key, parse_retry_after

Responder = Callable[[int], "tuple[int, dict[str, str]] | None"]


@dataclass
class Seen:
    """One request the server received."""

    at: float
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class IngestServer:
    """A real HTTP server: records every POST, answers as ``respond`` says."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)
    respond: Responder | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()  # aiohttp undoes Content-Encoding: gzip
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        self.wire_bytes.append(request.content_length or 0)
        n = len(self.seen) + 1
        status, headers = (200, {})
        if self.respond is not None:
            answer = self.respond(n)
            if answer is not None:
                status, headers = answer
        self.seen.append(Seen(time.monotonic(), status, dict(request.headers), orjson.loads(raw)))
        self.changed.set()
        return web.Response(status=status, headers=headers, text="nope" if status >= 300 else "ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def delivered(self) -> list[dict[str, Any]]:
        """Records of the 2xx answers, in arrival order."""
        return [r for s in self.seen if 200 <= s.status < 300 for r in s.body["records"]]

    async def wait_records(self, n: int, within: float = 15.0) -> None:
        async with asyncio.timeout(within):
            while len({r["id"] for r in self.delivered()}) < n:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def server() -> AsyncIterator[IngestServer]:
    srv = IngestServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@dataclass
class Harness:
    outbox: Outbox
    sink: HttpSink
    task: asyncio.Task[None] | None = None

    def start(self, **backoff: float) -> None:
        runner = SinkRunner(self.outbox, self.sink, **backoff)
        self.task = asyncio.create_task(runner.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def make(url: str, outbox: OutboxSection | None = None, **options: Any) -> Harness:
        sink = create_sink(SinkConfig(name="cloud", url=url, options=options), "gw1")
        assert isinstance(sink, HttpSink)
        await sink.start()
        ob = Outbox(
            tmp_path / "outbox.db",
            gateway_id="gw1",
            config=outbox or OutboxSection(),
            sink_names=["cloud"],
        )
        await ob.open()
        h = Harness(ob, sink)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            await h.stop()
            await h.sink.close()
            await h.outbox.close()


async def until_counter(ob: Outbox, key: str, value: int, within: float = 10.0) -> None:
    """Wait (bounded) until the sink's counter ``key`` reaches ``value``."""
    async with asyncio.timeout(within):
        while ob.counters()["cloud"][key] < value:
            await ob.wait_for_commit()


def reading(device: str, i: int) -> Reading:
    return Reading(device, 1_700_000_000.0 + i, {"i": i, "v": i * 0.5, "ok": True})


def assert_per_device_order(records: list[dict[str, Any]]) -> None:
    """First arrival of each id, per device, in increasing seq (duplicates allowed)."""
    seen: set[str] = set()
    last: dict[str, int] = {}
    for r in records:
        if r["id"] in seen:
            continue
        seen.add(r["id"])
        seq = int(r["id"].rsplit(":", 1)[1])
        assert seq > last.get(r["device_id"], 0), (r, last)
        last[r["device_id"]] = seq


async def test_batches_body_and_order(server: IngestServer, make_harness: Any) -> None:
    h = await make_harness(server.url, max_records=50)
    for i in range(230):
        h.outbox.submit([reading(f"dev{i % 4}", i)])
    h.start()
    await server.wait_records(230)
    assert all(len(s.body["records"]) <= 50 for s in server.seen)
    assert all(s.body["gateway_id"] == "gw1" for s in server.seen)
    recs = server.delivered()
    assert sorted(int(r["id"].split(":")[1]) for r in recs) == list(range(1, 231))
    first = recs[0]
    assert set(first) == {"id", "device_id", "ts", "metrics"}
    assert first["metrics"] == {"i": 0, "v": 0.0, "ok": True}
    assert_per_device_order(recs)
    assert server.seen[0].headers["Content-Type"] == "application/json"
    await until_counter(h.outbox, "delivered", 230)
    assert h.outbox.counters()["cloud"]["delivered"] == 230


async def test_gzip_bearer_and_headers(server: IngestServer, make_harness: Any) -> None:
    h = await make_harness(
        server.url,
        max_records=2000,
        max_bytes="4MiB",
        gzip=True,
        bearer_token="t0k",
        headers={"X-Site": "plant-7"},
    )
    await h.outbox.submit([reading("d", i) for i in range(20)])
    h.start()
    await server.wait_records(20)
    # a large batch: compressed off the loop, same result
    await h.outbox.submit([reading("d", i) for i in range(1500)])
    await server.wait_records(1520)
    for n in (0, -1):
        hdrs = server.seen[n].headers
        assert hdrs["Content-Encoding"] == "gzip"
        plain = len(orjson.dumps(server.seen[n].body))
        assert 0 < server.wire_bytes[n] < plain / 3  # it really was compressed
        assert hdrs["Authorization"] == "Bearer t0k"
        assert hdrs["X-Site"] == "plant-7"
    assert len(orjson.dumps(server.seen[-1].body)) > 64 * 1024
    assert len(server.delivered()) == 1520


async def test_retry_after_honoured_and_key_stable(server: IngestServer, make_harness: Any) -> None:
    answers = {1: (503, {"Retry-After": "1"}), 2: (500, {}), 3: (429, {"Retry-After": "0"})}
    server.respond = lambda n: answers.get(n)
    h = await make_harness(server.url)
    await h.outbox.submit([reading("d", i) for i in range(10)])
    # Backoff alone would retry within 20 ms; only Retry-After explains a 1 s gap.
    h.start(backoff_initial=0.01, backoff_max=0.02)
    await server.wait_records(10)
    s = server.seen
    assert [x.status for x in s] == [503, 500, 429, 200]
    assert s[1].at - s[0].at >= 0.95
    assert s[2].at - s[1].at < 0.5
    keys = {x.headers["Idempotency-Key"] for x in s}
    assert len(keys) == 1  # the same key on every retry of the batch
    assert all(x.body == s[0].body for x in s)
    assert h.sink.state.last_error is not None and "429" in h.sink.state.last_error


async def test_4xx_dead_letters_then_replay(
    server: IngestServer, make_harness: Any, tmp_path: Path
) -> None:
    server.respond = lambda n: (422, {}) if n == 1 else None
    h = await make_harness(server.url, max_records=10)
    await asyncio.gather(*(h.outbox.submit([reading("d", i)]) for i in range(25)))
    h.start()
    await server.wait_records(15)
    await until_counter(h.outbox, "delivered", 15)
    c = h.outbox.counters()["cloud"]
    assert c["dropped_dead_letter"] == 10 and c["delivered"] == 15 and c["pending"] == 0
    letters = list_dead_letters(tmp_path / "outbox.db")
    assert [d.record_id for d in letters] == [f"gw1:{i}" for i in range(1, 11)]
    assert "422" in letters[0].error
    await h.stop()
    await h.outbox.close()
    assert deadletter_main(["replay", "--sink", "cloud"], tmp_path) == 0
    h2 = await make_harness(server.url, max_records=10)
    assert h2.outbox.counters()["cloud"]["pending"] == 10
    h2.start()
    await server.wait_records(25)
    ids = {r["id"] for r in server.delivered()}
    assert ids == {f"gw1:{i}" for i in range(1, 26)}


async def test_outage_then_everything_arrives_in_device_order(make_harness: Any) -> None:
    srv = IngestServer()
    await srv.start()
    url = srv.url
    await srv.stop()  # the port is known, the server is down
    h = await make_harness(url, max_records=40)
    h.start(backoff_initial=0.02, backoff_max=0.2)
    try:
        for i in range(400):
            await h.outbox.submit([reading(f"dev{i % 5}", i)])
            if i == 200:
                await asyncio.sleep(0.3)  # the outage lasts a while: several retries
        assert h.outbox.counters()["cloud"]["pending"] == 400
        assert h.sink.state.last_error is not None and not h.sink.state.connected
        await srv.start()
        await srv.wait_records(400)
        recs = srv.delivered()
        assert {r["id"] for r in recs} == {f"gw1:{i}" for i in range(1, 401)}
        assert_per_device_order(recs)
    finally:
        await srv.stop()


async def test_limits_drop_exactly_while_the_server_is_down(make_harness: Any) -> None:
    srv = IngestServer()
    await srv.start()
    url = srv.url
    await srv.stop()
    # Every reading below stores the same number of bytes, so the count is exact.
    one = stored_size(reading("dev0", 200), "gw1")
    h = await make_harness(url, OutboxSection(max_bytes=one * 120), max_records=50)
    h.start(backoff_initial=0.02, backoff_max=0.1)
    try:
        for i in range(200, 500):
            await h.outbox.submit([reading(f"dev{i % 4}", i)])
        c = h.outbox.counters()["cloud"]
        assert c["accepted"] == 300
        assert c["dropped_max_bytes"] == 180 and c["pending"] == 120 and c["delivered"] == 0
        assert c["accepted"] == c["delivered"] + c["pending"] + c["dropped"]
        await srv.start()
        await srv.wait_records(120)
        await until_counter(h.outbox, "delivered", 120)
        c = h.outbox.counters()["cloud"]
        assert c["delivered"] == 120 and c["pending"] == 0 and c["dropped"] == 180
        assert {r["id"] for r in srv.delivered()} == {f"gw1:{i}" for i in range(181, 301)}
        assert h.outbox.stored_bytes == 0
    finally:
        await srv.stop()


async def test_status_mapping(server: IngestServer) -> None:
    sink = create_sink(SinkConfig(name="c", url=server.url), "gw")
    await sink.start()
    from edgeway.sinks.base import Record

    rec = [Record("gw:1", 1, "d", 1.0, {"x": 1})]
    try:
        for status, kind in [
            (408, RetryableSinkError),
            (429, RetryableSinkError),
            (502, RetryableSinkError),
            (400, PermanentSinkError),
            (404, PermanentSinkError),
            (308, RetryableSinkError),
        ]:
            server.respond = lambda _n, s=status: (s, {"Retry-After": "7"})
            with pytest.raises(kind) as ei:
                await sink.send_batch(rec)
            if kind is RetryableSinkError:
                assert isinstance(ei.value, RetryableSinkError) and ei.value.retry_after == 7.0
        server.respond = None
        await sink.send_batch(rec)
        assert sink.state.connected
    finally:
        await sink.close()


def test_options_are_validated_with_key_names() -> None:
    with pytest.raises(ValueError, match=r"options\.max_recods: unknown key"):
        create_sink(SinkConfig(name="c", url="http://x/", options={"max_recods": 5}), "gw")
    with pytest.raises(ValueError, match=r"options\.max_records"):
        create_sink(SinkConfig(name="c", url="http://x/", options={"max_records": 0}), "gw")
    with pytest.raises(ValueError, match=r"options\.tls"):
        create_sink(
            SinkConfig(name="c", url="https://x/", options={"tls": {"ca": "/nonexistent.pem"}}),
            "gw",
        )
    s = create_sink(
        SinkConfig(name="c", url="https://x/", options={"max_wait": "20ms", "max_bytes": "64KiB"}),
        "gw",
    )
    assert s.max_wait == 0.02 and s.max_batch_bytes == 65536


def test_retry_after_parsing_and_key() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    got = parse_retry_after(date, now)
    assert got is not None and 28 <= got <= 31
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    from edgeway.sinks.base import Record

    a = [Record("g:1", 1, "d", 1.0, {}), Record("g:2", 2, "d", 1.0, {})]
    assert idempotency_key(a) == idempotency_key(list(a)) != idempotency_key(a[:1])


def _yaml_blocks(doc: str) -> list[str]:
    text = (Path(__file__).parents[2] / "docs" / doc).read_text(encoding="utf-8")
    return [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]


def test_documented_config_is_valid() -> None:
    from edgeway.config import parse_config

    outbox_doc = _yaml_blocks("outbox.md")[0]
    assert parse_config(outbox_doc).outbox.max_age == 7 * 86400
    cfg = parse_config(_yaml_blocks("sinks/http.md")[0])
    sink = cfg.sinks[0]
    with pytest.raises(
        ValueError, match=r"options\.tls"
    ):  # the example's cert files do not exist here
        create_sink(sink, "gw")
    sink.options.pop("tls")
    built = create_sink(sink, "gw")
    assert isinstance(built, HttpSink) and built.max_batch_records == 2000


def _make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca, ca_key)
    for stem, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(stem))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if san:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        write(stem, b.sign(ca_key, hashes.SHA256()), key)
    return {k: d / k for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


async def test_mutual_tls(tmp_path: Path) -> None:
    import ssl

    pki = _make_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca.pem"]))
    server_ctx.load_cert_chain(str(pki["server.pem"]), str(pki["server.key"]))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        seen.append(str(peer["subject"]) if peer else "")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/ingest", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"https://127.0.0.1:{port}/ingest"
    from edgeway.sinks.base import Record

    rec = [Record("gw:1", 1, "d", 1.0, {"x": 1})]
    tls = {"ca": str(pki["ca.pem"]), "cert": str(pki["client.pem"]), "key": str(pki["client.key"])}
    with_cert = create_sink(SinkConfig(name="c", url=url, options={"tls": tls}), "gw")
    no_cert = create_sink(
        SinkConfig(name="c", url=url, options={"tls": {"ca": str(pki["ca.pem"])}}), "gw"
    )
    untrusted = create_sink(SinkConfig(name="c", url=url), "gw")  # system CAs only
    try:
        await with_cert.send_batch(rec)
        assert seen and "client" in seen[0]
        with pytest.raises(RetryableSinkError):
            await no_cert.send_batch(rec)  # the server demands a client certificate
        with pytest.raises(RetryableSinkError):
            await untrusted.send_batch(rec)  # the server's CA is not trusted
        assert len(seen) == 1
    finally:
        for s in (with_cert, no_cert, untrusted):
            await s.close()
        await runner.cleanup()
