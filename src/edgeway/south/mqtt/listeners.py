"""MQTT listeners: plain TCP, TLS, and MQTT over WebSocket (optionally TLS).

Example::

    mqtt:
      listeners:
        - {bind: "127.0.0.1:1883", allow_anonymous: true}
        - bind: "0.0.0.0:8883"
          tls: {cert: /etc/edgeway/server.pem, key: /etc/edgeway/server.key,
                ca: /etc/edgeway/ca.pem, require_client_cert: true, min_version: "1.2"}
        - {bind: "0.0.0.0:8080", transport: websocket, websocket_path: /mqtt}

:func:`start_listeners` binds every configured listener and hands each
accepted connection to the broker's protocol (a plain ``asyncio.Protocol``).
WebSocket connections reach the same protocol through
:class:`WebSocketTransport`, an ``asyncio.Transport`` that carries the byte
stream in binary WebSocket frames (subprotocol ``mqtt``), so the broker does
not know which kind of listener a client came through.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeway.config_types import TlsConfig, parse_host_port
from edgeway.south.mqtt.config import ListenerConfig

log = logging.getLogger(__name__)

__all__ = [
    "ListenerError",
    "RunningListener",
    "WebSocketTransport",
    "build_server_ssl_context",
    "client_cert_cn",
    "client_cert_serial",
    "start_listeners",
]

ProtocolFactory = Callable[[], asyncio.Protocol]

BACKLOG = 4096
"""Pending accepted-but-not-yet-handled connections per listening socket.
After a gateway restart thousands of devices reconnect within a second; the
default of 100 would make the kernel drop SYNs and clients back off for
seconds. The kernel caps it at net.core.somaxconn (4096 on current Linux)."""

TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a client gets to finish the TLS handshake (asyncio's default is
60). The broker's connect timeout only starts after the handshake, so this
is what stops half-open TLS sockets from holding memory; 10 s is the same
budget as the default ``limits.connect_timeout``."""

WS_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
"""Largest WebSocket message accepted (aiohttp's default). Above the default
1 MiB MQTT packet limit, so a maximal packet fits in one message (browser
clients send one packet per message); the broker's codec still enforces
``limits.max_packet_size`` on the byte stream."""

WS_UPGRADE_TIMEOUT = 10.0
"""Default seconds from TCP accept to a completed WebSocket upgrade (pass
``limits.connect_timeout``). aiohttp itself waits forever for the first HTTP
request, so without this an idle socket on a WebSocket listener would hold a
file descriptor until the process ends; the broker's connect timeout only
starts once the upgrade is done."""

WS_CLOSE_TIMEOUT = 2.0
"""Seconds to wait for a client's reply to our WebSocket close frame before
dropping the TCP connection; short so that shutdown stays within its 5 s."""

WRITE_HIGH_WATER = 64 * 1024
"""Default buffered-bytes mark above which the protocol is asked to pause
writing (asyncio's own transports use the same 64 KiB)."""


class ListenerError(Exception):
    """A listener could not start. ``str()`` is one line, for the CLI."""


class TlsFileError(ListenerError):
    """A listener's certificate, key or CA file is missing or does not parse;
    ``key`` is the ``tls`` key that names it (``cert``, ``key``, ``ca``), so
    ``edgeway check`` can point at its line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(slots=True)
class RunningListener:
    """A bound listener. ``close()`` stops accepting new connections only;
    established connections are the broker's to drop."""

    config: ListenerConfig
    bound: tuple[str, int]
    """The address actually bound (the real port when port 0 was asked)."""
    _server: asyncio.AbstractServer
    _http: web.Server | None = None
    _closed: bool = field(default=False)
    _crl: CrlWatch | None = None

    @property
    def url(self) -> str:
        """``tcp://``, ``tls://``, ``ws://`` or ``wss://`` URL of the listener."""
        return _url(self.config, self.bound)

    async def close(self) -> None:
        """Stop accepting. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._crl is not None:
            self._crl.stop()
        self._server.close()
        # Not aiohttp's pre_shutdown() for WebSocket listeners: it marks every
        # connection closing, and aiohttp then ignores data arriving on
        # upgraded (MQTT) connections too. Idle plain-HTTP connections end
        # with aiohttp's keep-alive timeout or the process.
        # Not wait_closed(): since Python 3.12 it also waits for every
        # established connection, which the broker closes later.
        await asyncio.sleep(0)


def _format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url(cfg: ListenerConfig, bound: tuple[str, int]) -> str:
    addr = _format_addr(*bound)
    if cfg.transport == "websocket":
        scheme = "wss" if cfg.tls else "ws"
        return f"{scheme}://{addr}{cfg.websocket_path}"
    return f"{'tls' if cfg.tls else 'tcp'}://{addr}"


def _describe(cfg: ListenerConfig) -> str:
    notes = []
    if cfg.tls is not None and cfg.tls.require_client_cert:
        notes.append("client certificate required")
    notes.append("anonymous allowed" if cfg.allow_anonymous else "credentials required")
    return ", ".join(notes)


def _os_reason(e: OSError) -> str:
    if isinstance(e, socket.gaierror):
        return f"cannot resolve host ({e.strerror or e})".lower()
    if e.errno:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


async def start_listeners(
    configs: list[ListenerConfig],
    factory: Callable[[ListenerConfig], ProtocolFactory],
    *,
    websocket_max_message_size: int = WS_MAX_MESSAGE_SIZE,
    connect_timeout: float = WS_UPGRADE_TIMEOUT,
) -> list[RunningListener]:
    """Start every listener; return them in the order given.

    ``factory(config)`` gives the protocol factory for that listener
    (``Broker.protocol_factory``). ``connect_timeout`` bounds the time from
    accept to a completed WebSocket upgrade (``limits.connect_timeout``; plain
    TCP connections are the broker's from accept on). If any listener cannot start, those already
    started are closed and :class:`ListenerError` is raised, e.g.
    ``cannot listen on 127.0.0.1:1883: address already in use``.
    """
    started: list[RunningListener] = []
    try:
        for cfg in configs:
            started.append(
                await _start_one(cfg, factory, websocket_max_message_size, connect_timeout)
            )
    except BaseException:
        for lst in started:
            await lst.close()
        raise
    return started


async def _start_one(
    cfg: ListenerConfig,
    factory: Callable[[ListenerConfig], ProtocolFactory],
    ws_max_message: int,
    connect_timeout: float,
) -> RunningListener:
    host, port = parse_host_port(cfg.bind)
    where = _format_addr(host, port)
    ssl_ctx: ssl.SSLContext | None = None
    if cfg.tls is not None:
        try:
            ssl_ctx = build_server_ssl_context(cfg.tls)
        except ListenerError as e:
            raise ListenerError(f"cannot listen on {where}: {e}") from None
    loop = asyncio.get_running_loop()
    protocol_factory = factory(cfg)
    http: web.Server | None = None
    serve: Callable[[], asyncio.BaseProtocol]
    if cfg.transport == "websocket":
        endpoint = _WebSocketEndpoint(cfg, protocol_factory, ws_max_message, set())
        # No access log: one line per MQTT connection, at its end, is noise.
        http = web.Server(endpoint.handle, access_log=None)
        deadline = _UpgradeDeadline(http, connect_timeout, loop)
        endpoint.upgraded = deadline.upgraded
        serve = deadline.make_protocol
    else:
        serve = protocol_factory
    try:
        server = await loop.create_server(
            serve,
            host,
            port,
            ssl=ssl_ctx,
            reuse_address=True,
            backlog=BACKLOG,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if ssl_ctx is not None else None,
        )
    except OSError as e:
        raise ListenerError(f"cannot listen on {where}: {_os_reason(e)}") from None
    except OverflowError as e:  # out-of-range port from a non-validated config
        raise ListenerError(f"cannot listen on {where}: {e}") from None
    sockets = server.sockets
    bound_addr = sockets[0].getsockname() if sockets else (host, port)
    lst = RunningListener(cfg, (str(bound_addr[0]), int(bound_addr[1])), server, http)
    if ssl_ctx is not None and cfg.tls is not None and cfg.tls.crl is not None:
        lst._crl = CrlWatch(ssl_ctx, cfg.tls.crl, cfg.tls)
        lst._crl.start()
    log.info("MQTT listening on %s (%s)", lst.url, _describe(cfg))
    return lst


# --------------------------------------------------------------------------
# TLS


_TLS_KEYS = {"certificate": "cert", "key": "key", "CA": "ca", "CRL": "crl"}


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        reason = os.strerror(e.errno).lower() if e.errno else str(e)
        raise TlsFileError(_TLS_KEYS[what], f"cannot read TLS {what} {path}: {reason}") from None


def build_server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server-side TLS context for a listener.

    Certificate chain and key from ``tls.cert``/``tls.key`` (PEM, key not
    encrypted); TLS 1.2 minimum (1.3 when ``min_version: "1.3"``). With
    ``require_client_cert`` the client must present a certificate signed by a
    CA in ``tls.ca`` (``CERT_REQUIRED``); otherwise no client certificate is
    asked for. Any problem raises :class:`ListenerError` naming the file.
    """
    cert_pem = _read(tls.cert, "certificate")
    key_pem = _read(tls.key, "key")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsFileError(
            "cert", f"TLS certificate {tls.cert}: no PEM certificate in the file"
        ) from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsFileError(
            "key",
            f"TLS key {tls.key}: the key is encrypted; edgeway needs an unencrypted key "
            "(protect it with file permissions)",
        ) from None
    except (ValueError, Exception) as e:  # cryptography raises several types
        raise TlsFileError("key", f"TLS key {tls.key}: not a PEM private key ({e})") from None
    not_after = certs[0].not_valid_after_utc
    now = dt.datetime.now(dt.UTC)
    if not_after < now:
        log.warning("TLS certificate %s expired on %s", tls.cert, not_after.date())
    elif not_after - now < dt.timedelta(days=30):
        log.warning("TLS certificate %s expires on %s", tls.cert, not_after.date())

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TlsFileError(
                "key", f"TLS key {tls.key} does not match certificate {tls.cert}"
            ) from None
        raise TlsFileError(
            "cert", f"TLS certificate {tls.cert} / key {tls.key}: cannot load ({e.reason or e})"
        ) from None
    except OSError as e:
        raise TlsFileError(
            "cert", f"cannot read TLS certificate {tls.cert}: {_os_reason(e)}"
        ) from None
    if tls.require_client_cert:
        if tls.ca is None:
            raise ListenerError("tls.require_client_cert needs tls.ca")
        ca_pem = _read(tls.ca, "CA")
        try:
            x509.load_pem_x509_certificates(ca_pem)
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except (ValueError, ssl.SSLError):
            raise TlsFileError("ca", f"TLS CA {tls.ca}: no PEM certificate in the file") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        if tls.crl is not None:
            load_crl(ctx, tls.crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


CRL_POLL = 0.5
"""Seconds between looks at a listener's CRL file (one stat): a certificate
revoked by ``edgeway ca revoke`` cannot start a connection a second later."""


def load_crl(ctx: ssl.SSLContext, path: Path) -> None:
    """Add the CRL in ``path`` to ``ctx``'s store (a new context's: a store
    keeps the CRLs added before, and OpenSSL checks with the newest valid one
    of an issuer by last update, in seconds, so a CRL written in the same
    second as the one before could be passed over: :class:`CrlWatch`)."""
    data = _read(path, "CRL")
    try:
        x509.load_pem_x509_crl(data)
        # A file, not cadata: OpenSSL's file lookup loads CRLs, cadata only certificates.
        ctx.load_verify_locations(cafile=str(path))
    except (ValueError, ssl.SSLError) as e:
        raise TlsFileError("crl", f"TLS CRL {path}: not a PEM CRL ({e})") from None


@dataclass(slots=True)
class CrlWatch:
    """Puts a listener's CRL in force when the file changes.

    Adding the new CRL to the running context is not enough: its store keeps
    the older CRLs too, and OpenSSL checks with the newest valid one by last
    update, in seconds, so a CRL written within the same second as the one
    before it (two revocations in a row, or a revocation right after ``ca
    init``) left the certificate it revokes able to connect. So each change
    builds a new context (certificate, key, CA and this CRL alone) and the
    listener's context hands every new handshake to it from its SNI callback
    (called for every ClientHello, with or without a server name), before the
    client's certificate is checked."""

    ctx: ssl.SSLContext
    path: Path
    tls: TlsConfig
    mtime: float = 0.0
    handle: asyncio.TimerHandle | None = None
    current: ssl.SSLContext | None = None
    """The context built from the latest CRL (None: the listener's own)."""
    revoked: frozenset[int] = frozenset()
    """Serial numbers the latest CRL revokes (for checks on open connections)."""

    def start(self) -> None:
        self.mtime = self._mtime()
        self._read_revoked()
        self.handle = asyncio.get_running_loop().call_later(CRL_POLL, self._tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return self.mtime

    def _tick(self) -> None:
        mtime = self._mtime()
        if mtime != self.mtime:
            self.mtime = mtime
            try:
                fresh = build_server_ssl_context(self.tls)
            except ListenerError as e:
                # The previous CRL stays in force; the operator sees why.
                log.error("%s (the previous CRL stays in force)", e)
            else:
                self.current = fresh
                self.ctx.sni_callback = self._switch
                self._read_revoked()
                log.info("TLS CRL %s read again", self.path)
        self.handle = asyncio.get_running_loop().call_later(CRL_POLL, self._tick)

    def _read_revoked(self) -> None:
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
        except (OSError, ValueError):
            return  # build_server_ssl_context said why; the previous list stays
        self.revoked = frozenset(r.serial_number for r in crl)

    def _switch(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: object) -> None:
        if self.current is not None:
            conn.context = self.current


def client_cert_cn(transport: asyncio.BaseTransport) -> str | None:
    """Common name of the client's TLS certificate, if one was verified.

    ``peercert`` is only filled in when the listener verified the
    certificate (``require_client_cert``), so a CN returned here can be
    trusted as ``ConnectInfo.cert_subject_cn``.
    """
    peercert = transport.get_extra_info("peercert")
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str):
                return value
    return None


def client_cert_serial(transport: asyncio.BaseTransport) -> int | None:
    """Serial number of the client's TLS certificate on ``transport`` (None:
    no TLS, or no verified client certificate): what a CRL lists, to end
    connections whose certificate was revoked after their handshake."""
    ssl_obj = transport.get_extra_info("ssl_object")
    cert = ssl_obj.getpeercert() if ssl_obj is not None else None
    serial = cert.get("serialNumber") if cert else None
    return int(serial, 16) if isinstance(serial, str) else None


# --------------------------------------------------------------------------
# WebSocket


class _UpgradeDeadline:
    """Protocol factory around aiohttp's server that closes connections which
    have not become WebSockets within the deadline."""

    __slots__ = ("_http", "_loop", "_timeout", "upgraded")

    def __init__(self, http: web.Server, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self._http = http
        self._timeout = timeout
        self._loop = loop
        self.upgraded: set[web.RequestHandler] = set()
        """Connections carrying MQTT now; the endpoint adds and removes them."""

    def make_protocol(self) -> web.RequestHandler:
        handler = self._http()
        # The timer keeps the handler alive at most `timeout` s after it ends.
        self._loop.call_later(self._timeout, self._expire, handler)
        return handler

    def _expire(self, handler: web.RequestHandler) -> None:
        if handler not in self.upgraded:
            handler.force_close()


@dataclass(slots=True)
class _WebSocketEndpoint:
    """aiohttp handler that upgrades requests on ``websocket_path`` and runs a
    :class:`WebSocketTransport` for each."""

    config: ListenerConfig
    protocol_factory: ProtocolFactory
    max_message_size: int
    upgraded: set[web.RequestHandler]

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != self.config.websocket_path:
            return web.Response(status=404, text="not found\n")
        ws = web.WebSocketResponse(
            # "mqtt" is the name MQTT 3.1.1 and 5.0 define; "mqttv3.1" is what
            # MQTT 3.1 clients still send.
            protocols=("mqtt", "mqttv3.1"),
            # MQTT payloads are small and often binary: deflate costs CPU per
            # message for little gain.
            compress=False,
            max_msg_size=self.max_message_size,
            timeout=WS_CLOSE_TIMEOUT,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(
                status=426, headers={"Upgrade": "websocket"}, text="MQTT over WebSocket only\n"
            )
        handler = request.protocol
        self.upgraded.add(handler)
        try:
            await ws.prepare(request)
            if ws.ws_protocol is None:
                log.debug("WebSocket client %s did not ask for subprotocol mqtt", request.remote)
            underlying = request.transport
            if underlying is None:  # the peer went away during the upgrade
                return ws
            transport = WebSocketTransport(ws, underlying)
            await transport.run(self.protocol_factory())
        finally:
            self.upgraded.discard(handler)
        return ws


class WebSocketTransport(asyncio.Transport):
    """An ``asyncio.Transport`` over one WebSocket connection.

    ``write()`` queues bytes that a writer task sends as binary frames
    (several queued writes go out as one frame: MQTT over WebSocket allows
    packets to span or share frames). Received binary frames go to
    ``protocol.data_received``; a text frame closes the connection (1003), as
    the MQTT specification requires. ``connection_lost`` is called exactly
    once, when the WebSocket has closed.
    """

    __slots__ = (
        "_buffer",
        "_buffered",
        "_closing",
        "_high",
        "_low",
        "_protocol",
        "_protocol_paused",
        "_reading",
        "_underlying",
        "_wakeup",
        "_ws",
    )

    def __init__(self, ws: web.WebSocketResponse, underlying: asyncio.BaseTransport) -> None:
        super().__init__()
        self._ws = ws
        self._underlying = underlying
        self._protocol: asyncio.BaseProtocol | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._closing = False
        self._reading = asyncio.Event()
        self._reading.set()
        self._wakeup = asyncio.Event()
        self._high = WRITE_HIGH_WATER
        self._low = WRITE_HIGH_WATER // 4
        self._protocol_paused = False

    async def run(self, protocol: asyncio.BaseProtocol) -> None:
        """Drive the connection until the WebSocket closes."""
        self._protocol = protocol
        exc: Exception | None = None
        writer = asyncio.create_task(self._write_loop(), name="ws-writer")
        try:
            protocol.connection_made(self)
            if not isinstance(protocol, asyncio.Protocol):
                raise TypeError("WebSocketTransport needs an asyncio.Protocol")
            exc = await self._read_loop(protocol)
        except Exception as e:
            log.exception("WebSocket connection failed")
            exc = e
        finally:
            self._closing = True
            self._wakeup.set()
            try:
                # The writer sends what is queued and the close frame.
                await asyncio.wait({writer}, timeout=WS_CLOSE_TIMEOUT + 1)
            finally:
                if not writer.done():
                    writer.cancel()
                    await asyncio.wait({writer})
                elif not writer.cancelled() and writer.exception() is not None:
                    log.debug("WebSocket writer failed: %r", writer.exception())
            if not self._ws.closed:
                with contextlib.suppress(Exception):  # the peer is gone either way
                    await self._ws.close()
            protocol.connection_lost(exc)

    async def _read_loop(self, protocol: asyncio.Protocol) -> Exception | None:
        ws = self._ws
        while True:
            if not self._reading.is_set():
                await self._reading.wait()
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                protocol.data_received(msg.data)
            elif msg.type == WSMsgType.TEXT:
                log.info("WebSocket client sent a text frame; closing (MQTT needs binary frames)")
                self._closing = True
                await ws.close(code=1003, message=b"MQTT needs binary frames")
                return None
            elif msg.type == WSMsgType.ERROR:
                err = ws.exception()
                return err if isinstance(err, Exception) else None
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return None
            # PING/PONG are answered by aiohttp (autoping).

    async def _write_loop(self) -> None:
        ws = self._ws
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._buffer:
                chunks, self._buffer = self._buffer, []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                try:
                    await ws.send_bytes(data)
                except (ConnectionError, RuntimeError):
                    # Closed under us: drop what is left, as a socket would.
                    self._buffer.clear()
                    self._buffered = 0
                    self._closing = True
                    return
                self._buffered -= len(data)
                self._maybe_resume_protocol()
            if self._closing:
                if not ws.closed:
                    await ws.close()
                return

    # -- asyncio.Transport -------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._buffer.append(bytes(data))
        self._buffered += len(data)
        self._wakeup.set()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """Send what is queued, then a close frame."""
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()

    def abort(self) -> None:
        """Drop queued data and the TCP connection at once."""
        self._closing = True
        self._buffer.clear()
        self._buffered = 0
        self._wakeup.set()
        self._underlying.abort()  # type: ignore[attr-defined]

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``ssl_object``, ``peercert`` ... of the
        underlying connection."""
        return self._underlying.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set() and not self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = WRITE_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def _maybe_pause_protocol(self) -> None:
        if self._buffered > self._high and not self._protocol_paused and self._protocol:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except Exception:
                log.exception("protocol.pause_writing() failed")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffered <= self._low and self._protocol:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception:
                log.exception("protocol.resume_writing() failed")
