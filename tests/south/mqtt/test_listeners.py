"""Listeners: TCP, TLS (client certificates, versions), WebSocket adapter.

An echo protocol stands in for the broker: these tests pin what the listener
layer does (bind, errors, TLS policy, WebSocket framing and lifecycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from certs import CertFiles, make_cert_files
from edgeway.config import ListenerConfig, TlsConfig
from edgeway.south.mqtt.listeners import (
    ListenerError,
    RunningListener,
    WebSocketTransport,
    build_server_ssl_context,
    client_cert_cn,
    start_listeners,
)

WAIT = 5.0
"""Upper bound for any single wait in these tests (they finish in milliseconds)."""


class Echo(asyncio.Protocol):
    """Writes back what it receives; ``b"bye"`` makes it close the transport."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self.received = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.rec.made.append(self)
        self.rec.made_event.set()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.received += data
        if data == b"bye":
            self.transport.write(b"bye!")
            self.transport.close()
            return
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.rec.lost_count += 1
        if not self.lost.done():
            self.lost.set_result(exc)


class Recorder:
    def __init__(self) -> None:
        self.made: list[Echo] = []
        self.made_event = asyncio.Event()
        self.lost_count = 0

    def factory(self, cfg: ListenerConfig) -> Callable[[], asyncio.Protocol]:
        return lambda: Echo(self)

    async def first(self) -> Echo:
        await asyncio.wait_for(self.made_event.wait(), WAIT)
        return self.made[0]


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_cert_files(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def running() -> AsyncIterator[list[RunningListener]]:
    """Collects listeners a test starts and closes them at the end."""
    out: list[RunningListener] = []
    yield out
    for lst in out:
        await lst.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start(
    running: list[RunningListener], rec: Recorder, *cfgs: ListenerConfig
) -> list[RunningListener]:
    lst = await start_listeners(list(cfgs), rec.factory)
    running.extend(lst)
    return lst


async def echo_once(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), WAIT)


# --------------------------------------------------------------------------
# TCP


async def test_tcp_port_zero_binds_a_real_port_and_logs_it(
    running: list[RunningListener], caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="edgeway.south.mqtt.listeners"):
        (lst,) = await start(running, rec, ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True))
    host, port = lst.bound
    assert host == "127.0.0.1" and port != 0
    assert f"MQTT listening on tcp://127.0.0.1:{port} (anonymous allowed)" in caplog.messages
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert await echo_once(reader, writer, b"hello") == b"hello"
        proto = await rec.first()
        assert proto.transport is not None
        assert proto.transport.get_extra_info("peername")[0] == "127.0.0.1"
    finally:
        writer.close()
    await asyncio.wait_for(proto.lost, WAIT)


async def test_port_in_use_gives_one_line_error(running: list[RunningListener]) -> None:
    rec = Recorder()
    (first,) = await start(running, rec, ListenerConfig(bind="127.0.0.1:0"))
    port = first.bound[1]
    with pytest.raises(ListenerError) as err:
        await start_listeners([ListenerConfig(bind=f"127.0.0.1:{port}")], rec.factory)
    assert str(err.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"


async def test_failure_closes_listeners_already_started(running: list[RunningListener]) -> None:
    rec = Recorder()
    (taken,) = await start(running, rec, ListenerConfig(bind="127.0.0.1:0"))
    ok_port = free_port()
    with pytest.raises(ListenerError, match="address already in use"):
        await start_listeners(
            [
                ListenerConfig(bind=f"127.0.0.1:{ok_port}"),
                ListenerConfig(bind=f"127.0.0.1:{taken.bound[1]}"),
            ],
            rec.factory,
        )
    # The first one had started; it must not be left listening.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", ok_port)


async def test_address_not_on_this_machine() -> None:
    with pytest.raises(ListenerError) as err:
        # 203.0.113.0/24 is TEST-NET-3: never assigned to a local interface.
        await start_listeners([ListenerConfig(bind="203.0.113.7:0")], Recorder().factory)
    assert str(err.value) == "cannot listen on 203.0.113.7:0: cannot assign requested address"
    assert "\n" not in str(err.value)


async def test_close_stops_accepting_but_keeps_connections(running: list[RunningListener]) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, ListenerConfig(bind="127.0.0.1:0"))
    reader, writer = await asyncio.open_connection(*lst.bound)
    try:
        assert await echo_once(reader, writer, b"one") == b"one"
        await lst.close()
        await lst.close()  # idempotent
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*lst.bound)
        assert await echo_once(reader, writer, b"two") == b"two"
    finally:
        writer.close()


# --------------------------------------------------------------------------
# TLS


def tls_listener(
    certs: CertFiles, *, require_client_cert: bool = False, min_version: str = "1.2", **kw: Any
) -> ListenerConfig:
    return ListenerConfig(
        bind="127.0.0.1:0",
        tls=TlsConfig(
            cert=certs.server_cert,
            key=certs.server_key,
            ca=certs.ca_cert if require_client_cert else None,
            require_client_cert=require_client_cert,
            min_version=min_version,  # type: ignore[arg-type]
        ),
        **kw,
    )


async def refused_by_server(port: int, ctx: ssl.SSLContext, rec: Recorder) -> None:
    """Assert that a TLS client with ``ctx`` cannot exchange data: the
    handshake fails, or (TLS 1.3, where the server checks the client
    certificate after the client considers the handshake done) the first read
    fails or gets EOF. The server's protocol never sees the connection."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), WAIT
        )
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        try:
            writer.write(b"ping")
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                data = await asyncio.wait_for(reader.read(10), WAIT)
                assert data == b""
        finally:
            writer.close()
    assert rec.made == []


async def test_tls_with_required_client_certificate(
    running: list[RunningListener], tls_certs: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="edgeway.south.mqtt.listeners"):
        (lst,) = await start(running, rec, tls_listener(tls_certs, require_client_cert=True))
    port = lst.bound[1]
    assert (
        f"MQTT listening on tls://127.0.0.1:{port} (client certificate required, "
        "credentials required)" in caplog.messages
    )
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls_certs.client_context(), server_hostname="localhost"
    )
    try:
        assert await echo_once(reader, writer, b"secret") == b"secret"
        proto = await rec.first()
        assert proto.transport is not None
        assert client_cert_cn(proto.transport) == tls_certs.client_cn
    finally:
        writer.close()


async def test_tls_client_without_certificate_is_refused_when_required(
    running: list[RunningListener], tls_certs: CertFiles
) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, tls_listener(tls_certs, require_client_cert=True))
    await refused_by_server(lst.bound[1], tls_certs.client_context(with_cert=False), rec)


async def test_tls_client_certificate_from_another_ca_is_refused(
    running: list[RunningListener], tls_certs: CertFiles
) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, tls_listener(tls_certs, require_client_cert=True))
    await refused_by_server(lst.bound[1], tls_certs.client_context(rogue=True), rec)


async def test_tls_without_client_certificates(
    running: list[RunningListener], tls_certs: CertFiles
) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, tls_listener(tls_certs))
    # A client that has a certificate is not asked for it: no CN to trust.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lst.bound[1], ssl=tls_certs.client_context(), server_hostname="localhost"
    )
    try:
        assert await echo_once(reader, writer, b"x") == b"x"
        proto = await rec.first()
        assert proto.transport is not None
        assert client_cert_cn(proto.transport) is None
    finally:
        writer.close()


def _old_tls_client(ctx: ssl.SSLContext, version: ssl.TLSVersion) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    # OpenSSL 3 disables TLS < 1.2 at the default security level; lower it so
    # the client really offers the old version and the *server* must refuse.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def test_tls_1_1_is_refused(running: list[RunningListener], tls_certs: CertFiles) -> None:
    # Control: this client does speak TLS 1.1 with a server that allows it.
    permissive = tls_certs.server_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    control = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=permissive)
    try:
        client = _old_tls_client(tls_certs.client_context(), ssl.TLSVersion.TLSv1_1)
        _, w = await asyncio.open_connection(
            "127.0.0.1",
            control.sockets[0].getsockname()[1],
            ssl=client,
            server_hostname="localhost",
        )
        assert w.get_extra_info("ssl_object").version() == "TLSv1.1"
        w.close()
    finally:
        control.close()

    rec = Recorder()
    (lst,) = await start(running, rec, tls_listener(tls_certs))
    client = _old_tls_client(tls_certs.client_context(), ssl.TLSVersion.TLSv1_1)
    # The server ends the handshake: an alert (SSLError) or a reset, by timing.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await asyncio.open_connection(
            "127.0.0.1", lst.bound[1], ssl=client, server_hostname="localhost"
        )
    assert rec.made == []


async def test_tls_min_version_1_3_refuses_1_2(
    running: list[RunningListener], tls_certs: CertFiles
) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, tls_listener(tls_certs, min_version="1.3"))
    ctx = tls_certs.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await asyncio.open_connection(
            "127.0.0.1", lst.bound[1], ssl=ctx, server_hostname="localhost"
        )
    ctx = tls_certs.client_context()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lst.bound[1], ssl=ctx, server_hostname="localhost"
    )
    try:
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert await echo_once(reader, writer, b"13") == b"13"
    finally:
        writer.close()


def test_ssl_context_errors_name_the_file(tls_certs: CertFiles, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ListenerError) as err:
        build_server_ssl_context(TlsConfig(cert=missing, key=tls_certs.server_key))
    assert str(err.value) == f"cannot read TLS certificate {missing}: no such file or directory"

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ListenerError, match=rf"TLS certificate {garbage}: no PEM certificate"):
        build_server_ssl_context(TlsConfig(cert=garbage, key=tls_certs.server_key))
    with pytest.raises(ListenerError, match=rf"TLS key {garbage}: not a PEM private key"):
        build_server_ssl_context(TlsConfig(cert=tls_certs.server_cert, key=garbage))

    with pytest.raises(ListenerError) as err:
        build_server_ssl_context(TlsConfig(cert=tls_certs.server_cert, key=tls_certs.client_key))
    assert str(err.value) == (
        f"TLS key {tls_certs.client_key} does not match certificate {tls_certs.server_cert}"
    )

    with pytest.raises(ListenerError, match=rf"cannot read TLS CA {missing}"):
        build_server_ssl_context(
            TlsConfig(
                cert=tls_certs.server_cert,
                key=tls_certs.server_key,
                ca=missing,
                require_client_cert=True,
            )
        )


async def test_tls_error_is_reported_by_start_listeners(tmp_path: Path) -> None:
    cfg = ListenerConfig(
        bind="127.0.0.1:0", tls=TlsConfig(cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    )
    with pytest.raises(ListenerError) as err:
        await start_listeners([cfg], Recorder().factory)
    assert str(err.value) == (
        f"cannot listen on 127.0.0.1:0: cannot read TLS certificate {tmp_path / 'c.pem'}: "
        "no such file or directory"
    )


# --------------------------------------------------------------------------
# WebSocket


def ws_listener(**kw: Any) -> ListenerConfig:
    return ListenerConfig(bind="127.0.0.1:0", transport="websocket", **kw)


async def test_websocket_exchanges_bytes(
    running: list[RunningListener], caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger="edgeway.south.mqtt.listeners"):
        (lst,) = await start(running, rec, ws_listener(allow_anonymous=True))
    port = lst.bound[1]
    assert f"MQTT listening on ws://127.0.0.1:{port}/mqtt (anonymous allowed)" in caplog.messages
    async with ws_connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"]) as ws:
        assert ws.subprotocol == "mqtt"
        await ws.send(b"\x10\x00abc")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"\x10\x00abc"
        proto = await rec.first()
        assert isinstance(proto.transport, WebSocketTransport)
        # The broker reads peer addresses and TLS details through the adapter.
        assert proto.transport.get_extra_info("peername")[0] == "127.0.0.1"
        assert proto.transport.get_extra_info("ssl_object") is None
        # Several writes go out; the stream arrives in order whatever the framing.
        await ws.send(b"part1-")
        await ws.send(b"part2")
        got = b""
        while len(got) < len(b"part1-part2"):
            got += await asyncio.wait_for(ws.recv(), WAIT)
        assert got == b"part1-part2"
    # Client closed: the protocol learns it exactly once.
    assert await asyncio.wait_for(proto.lost, WAIT) is None
    assert rec.lost_count == 1


async def test_websocket_server_side_close_flushes_then_closes(
    running: list[RunningListener],
) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, ws_listener())
    async with ws_connect(f"ws://127.0.0.1:{lst.bound[1]}/mqtt", subprotocols=["mqtt"]) as ws:
        await ws.send(b"bye")
        # What the protocol wrote before close() is delivered, then the close.
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"bye!"
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), WAIT)
    proto = await rec.first()
    await asyncio.wait_for(proto.lost, WAIT)
    assert rec.lost_count == 1


async def test_websocket_abort_drops_the_connection(running: list[RunningListener]) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, ws_listener())
    async with ws_connect(f"ws://127.0.0.1:{lst.bound[1]}/mqtt", subprotocols=["mqtt"]) as ws:
        await ws.send(b"x")
        await asyncio.wait_for(ws.recv(), WAIT)
        proto = await rec.first()
        assert proto.transport is not None
        proto.transport.abort()
        assert proto.transport.is_closing()
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT)
    await asyncio.wait_for(proto.lost, WAIT)
    assert rec.lost_count == 1


async def test_websocket_text_frame_closes_with_1003(running: list[RunningListener]) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, ws_listener())
    async with ws_connect(f"ws://127.0.0.1:{lst.bound[1]}/mqtt", subprotocols=["mqtt"]) as ws:
        await ws.send("text is not MQTT")
        with pytest.raises(websockets.ConnectionClosed) as err:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert err.value.rcvd is not None and err.value.rcvd.code == 1003
    proto = await rec.first()
    await asyncio.wait_for(proto.lost, WAIT)
    assert bytes(proto.received) == b""


async def test_websocket_wrong_path_and_plain_http(running: list[RunningListener]) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, ws_listener(websocket_path="/mqtt"))
    base = f"http://127.0.0.1:{lst.bound[1]}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/other") as resp:
            assert resp.status == 404
        async with http.get(f"{base}/mqtt") as resp:
            assert resp.status == 426
    with pytest.raises(websockets.InvalidStatus):
        async with ws_connect(f"ws://127.0.0.1:{lst.bound[1]}/other", subprotocols=["mqtt"]):
            pass
    assert rec.made == []


async def test_websocket_listener_closes_sockets_that_never_upgrade(
    running: list[RunningListener],
) -> None:
    rec = Recorder()
    lst = await start_listeners([ws_listener()], rec.factory, connect_timeout=0.2)
    running.extend(lst)
    port = lst[0].bound[1]
    async with ws_connect(f"ws://127.0.0.1:{port}/mqtt", subprotocols=["mqtt"]) as ws:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # The idle socket is closed by the deadline...
            assert await asyncio.wait_for(reader.read(100), WAIT) == b""
        finally:
            writer.close()
        # ...which has passed for the WebSocket opened before it too: still fine.
        await ws.send(b"alive")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"alive"


async def test_websocket_close_keeps_established_connections(
    running: list[RunningListener],
) -> None:
    rec = Recorder()
    (lst,) = await start(running, rec, ws_listener())
    url = f"ws://127.0.0.1:{lst.bound[1]}/mqtt"
    async with ws_connect(url, subprotocols=["mqtt"]) as ws:
        await ws.send(b"a")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"a"
        await lst.close()
        with pytest.raises(OSError):
            async with ws_connect(url, subprotocols=["mqtt"], open_timeout=WAIT):
                pass
        await ws.send(b"b")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"b"


async def test_websocket_over_tls_with_client_certificate(
    running: list[RunningListener], tls_certs: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    cfg = tls_listener(tls_certs, require_client_cert=True, transport="websocket")
    with caplog.at_level(logging.INFO, logger="edgeway.south.mqtt.listeners"):
        (lst,) = await start(running, rec, cfg)
    port = lst.bound[1]
    assert any(
        m.startswith(f"MQTT listening on wss://127.0.0.1:{port}/mqtt") for m in caplog.messages
    )
    async with ws_connect(
        f"wss://localhost:{port}/mqtt", subprotocols=["mqtt"], ssl=tls_certs.client_context()
    ) as ws:
        await ws.send(b"tls")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"tls"
        proto = await rec.first()
        assert proto.transport is not None
        assert client_cert_cn(proto.transport) == tls_certs.client_cn
    with pytest.raises((ssl.SSLError, OSError, websockets.InvalidHandshake)):
        async with ws_connect(
            f"wss://localhost:{port}/mqtt",
            subprotocols=["mqtt"],
            ssl=tls_certs.client_context(with_cert=False),
            open_timeout=WAIT,
        ):
            pass


async def test_websocket_write_buffer_flow_control(running: list[RunningListener]) -> None:
    """Writes beyond the high-water mark pause the protocol; draining resumes it."""
    events: list[str] = []
    written = asyncio.Event()

    class Bulk(asyncio.Protocol):
        def connection_made(self, base: asyncio.BaseTransport) -> None:
            transport = cast(asyncio.Transport, base)
            transport.set_write_buffer_limits(high=1000, low=100)
            assert transport.get_write_buffer_limits() == (100, 1000)
            transport.write(b"x" * 600)
            assert events == []
            transport.write(b"y" * 600)
            assert events == ["pause"]
            assert transport.get_write_buffer_size() == 1200
            written.set()

        def pause_writing(self) -> None:
            events.append("pause")

        def resume_writing(self) -> None:
            events.append("resume")

    (lst,) = await start_listeners([ws_listener()], lambda cfg: Bulk)
    running.append(lst)
    async with ws_connect(f"ws://127.0.0.1:{lst.bound[1]}/mqtt", subprotocols=["mqtt"]) as ws:
        got = b""
        while len(got) < 1200:
            got += await asyncio.wait_for(ws.recv(), WAIT)
        assert got == b"x" * 600 + b"y" * 600
        assert written.is_set()
        assert events == ["pause", "resume"]


# --------------------------------------------------------------------------
# The same on uvloop, which ``edgeway run`` uses when installed: its server,
# TLS and transport classes are its own.

UVLOOP_CASES = [
    test_tcp_port_zero_binds_a_real_port_and_logs_it,
    test_port_in_use_gives_one_line_error,
    test_close_stops_accepting_but_keeps_connections,
    test_tls_with_required_client_certificate,
    test_tls_client_without_certificate_is_refused_when_required,
    test_tls_1_1_is_refused,
    test_tls_min_version_1_3_refuses_1_2,
    test_websocket_exchanges_bytes,
    test_websocket_server_side_close_flushes_then_closes,
    test_websocket_abort_drops_the_connection,
    test_websocket_over_tls_with_client_certificate,
    test_websocket_listener_closes_sockets_that_never_upgrade,
]


@pytest.mark.parametrize("case", UVLOOP_CASES, ids=lambda f: f.__name__.removeprefix("test_"))
def test_on_uvloop(
    case: Callable[..., Any], tls_certs: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    uvloop = pytest.importorskip("uvloop")
    available = {"tls_certs": tls_certs, "caplog": caplog}

    async def run() -> None:
        running: list[RunningListener] = []
        wanted = case.__code__.co_varnames[: case.__code__.co_argcount]
        kwargs = {k: v for k, v in available.items() if k in wanted}
        try:
            await case(running, **kwargs) if "running" in wanted else await case(**kwargs)
        finally:
            for lst in running:
                await lst.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


# --------------------------------------------------------------------------
# With the real broker, config auth and paho-mqtt as the client


def paho_session(
    port: int,
    *,
    transport: str = "websockets",
    username: str | None = None,
    password: str | None = None,
    tls: CertFiles | None = None,
    client_cert: bool = True,
    subscribe: str | None = None,
    publish: tuple[str, bytes] | None = None,
) -> dict[str, Any]:
    """Connect with paho (blocking, run in a thread), optionally subscribe and
    publish, wait for the outcome, disconnect. Returns what happened."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    out: dict[str, Any] = {"messages": []}
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="paho-ws-1",
        transport=transport,  # type: ignore[arg-type]
        protocol=mqtt.MQTTv311,
    )
    if transport == "websockets":
        client.ws_set_options(path="/mqtt")
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        if client_cert:
            client.tls_set(
                ca_certs=str(tls.ca_cert),
                certfile=str(tls.client_cert),
                keyfile=str(tls.client_key),
            )
        else:
            client.tls_set(ca_certs=str(tls.ca_cert))

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        out["connack"] = rc.value
        connected.set()

    def on_subscribe(c: Any, userdata: Any, mid: int, rcs: list[Any], props: Any) -> None:
        out["suback"] = [r.value for r in rcs]
        subscribed.set()

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        out["messages"].append((msg.topic, msg.payload))
        received.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("localhost" if tls else "127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        assert connected.wait(WAIT), "no CONNACK"
        if out["connack"] != 0:
            return out
        if subscribe is not None:
            client.subscribe(subscribe, qos=1)
            assert subscribed.wait(WAIT), "no SUBACK"
        if publish is not None:
            client.publish(publish[0], publish[1], qos=1).wait_for_publish(WAIT)
            if subscribe is not None and out["suback"][0] < 0x80:
                received.wait(WAIT)
        client.disconnect()
    finally:
        client.loop_stop()
    return out


@contextlib.asynccontextmanager
async def broker_on(
    tmp_path: Path, listener: ListenerConfig, mqtt_yaml: str
) -> AsyncIterator[RunningListener]:
    broker_mod = pytest.importorskip("edgeway.south.mqtt.broker")
    from edgeway.config import parse_config
    from edgeway.devices.config_auth import ConfigAuthenticator, ConfigAuthoriser
    from edgeway.ingest import MemoryIngest

    mqtt = parse_config(mqtt_yaml).mqtt
    authn = ConfigAuthenticator(mqtt)
    broker = broker_mod.Broker(
        mqtt,
        ingest=MemoryIngest(),
        authenticator=authn,
        authoriser=ConfigAuthoriser(mqtt),
        data_dir=tmp_path,
        gateway_id="test-gw",
    )
    await broker.start()
    try:
        (lst,) = await start_listeners([listener], broker.protocol_factory)
        try:
            yield lst
        finally:
            await lst.close()
    finally:
        await broker.stop()
        authn.close()


def _users_yaml(**users: str) -> str:
    import argon2

    cheap = argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    lines = ["mqtt:", "  users:"]
    for name, pw in users.items():
        lines.append(f'    - {{username: {name}, password_hash: "{cheap.hash(pw)}"}}')
    return "\n".join(lines) + "\n"


async def test_broker_over_websocket_with_password_and_acl(tmp_path: Path) -> None:
    yaml_text = _users_yaml(alice="wonderland") + (
        "  acl:\n"
        '    - {username: "*", topic: "devices/{username}/#"}\n'
        '    - {topic: "public/#", access: subscribe}\n'
    )
    async with broker_on(tmp_path, ws_listener(), yaml_text) as lst:
        port = lst.bound[1]
        ok = await asyncio.to_thread(
            paho_session,
            port,
            username="alice",
            password="wonderland",
            subscribe="devices/alice/#",
            publish=("devices/alice/telemetry", b'{"t": 21.5}'),
        )
        assert ok["connack"] == 0
        assert ok["suback"] == [1]
        assert ok["messages"] == [("devices/alice/telemetry", b'{"t": 21.5}')]

        # Nothing under other/ is readable for alice: refused. (devices/# would
        # be granted, delivering only her own topics: see test_broker_acl.py.)
        denied = await asyncio.to_thread(
            paho_session, port, username="alice", password="wonderland", subscribe="other/#"
        )
        assert denied["suback"] == [0x80]

        bad = await asyncio.to_thread(paho_session, port, username="alice", password="nope")
        assert bad["connack"] == 0x86  # paho's name for 3.1.1 return code 4

        anon = await asyncio.to_thread(paho_session, port)
        assert anon["connack"] == 0x87  # 3.1.1 return code 5: not authorised


async def test_broker_over_tls_authenticates_by_certificate(
    tmp_path: Path, tls_certs: CertFiles
) -> None:
    yaml_text = (
        "mqtt:\n  acl:\n"
        f'    - {{username: "{tls_certs.client_cn}", topic: "devices/{{username}}/#"}}\n'
    )
    cfg = tls_listener(tls_certs, require_client_cert=True)
    async with broker_on(tmp_path, cfg, yaml_text) as lst:
        port = lst.bound[1]
        ok = await asyncio.to_thread(
            paho_session,
            port,
            transport="tcp",
            tls=tls_certs,
            subscribe=f"devices/{tls_certs.client_cn}/+",
            publish=(f"devices/{tls_certs.client_cn}/x", b"hi"),
        )
        assert ok["connack"] == 0
        assert ok["suback"] == [1]
        assert ok["messages"] == [(f"devices/{tls_certs.client_cn}/x", b"hi")]
        other = await asyncio.to_thread(
            paho_session, port, transport="tcp", tls=tls_certs, subscribe="devices/someone/+"
        )
        assert other["suback"] == [0x80]


async def test_broker_stop_closes_websocket_clients(tmp_path: Path) -> None:
    """A CONNECT split over two frames gets its CONNACK; stopping the broker
    sends a v5 client DISCONNECT 0x8B over the WebSocket, then closes it."""
    broker_mod = pytest.importorskip("edgeway.south.mqtt.broker")
    from edgeway.config import MqttSection
    from edgeway.devices.auth import AllowAll
    from edgeway.ingest import MemoryIngest
    from edgeway.south.mqtt.codec import encode
    from edgeway.south.mqtt.packets import Connect

    allow = AllowAll()
    broker = broker_mod.Broker(
        MqttSection(),
        ingest=MemoryIngest(),
        authenticator=allow,
        authoriser=allow,
        data_dir=tmp_path,
        gateway_id="test-gw",
    )
    await broker.start()
    stopped = False
    try:
        (lst,) = await start_listeners([ws_listener(allow_anonymous=True)], broker.protocol_factory)
        try:
            url = f"ws://127.0.0.1:{lst.bound[1]}/mqtt"
            async with ws_connect(url, subprotocols=["mqtt"]) as ws:
                connect = encode(Connect(5, "ws-client"), 5)
                await ws.send(connect[:5])
                await ws.send(connect[5:])
                connack = await asyncio.wait_for(ws.recv(), WAIT)
                assert isinstance(connack, bytes) and connack[0] == 0x20 and connack[3] == 0
                start = asyncio.get_running_loop().time()
                await lst.close()
                await broker.stop()
                stopped = True
                rest = b""
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        chunk = await asyncio.wait_for(ws.recv(), WAIT)
                        assert isinstance(chunk, bytes)
                        rest += chunk
                assert rest[:1] == b"\xe0" and rest[2] == 0x8B  # DISCONNECT, server shutting down
                assert asyncio.get_running_loop().time() - start < 3.0
        finally:
            await lst.close()
    finally:
        if not stopped:
            await broker.stop()
