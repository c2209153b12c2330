"""HTTP ingest: devices POST readings to ``/devices/{device_id}/telemetry``.

Example::

    http_ingest:
      listen: "0.0.0.0:8443"
      tls: {cert: /etc/edgeway/server.pem, key: /etc/edgeway/server.key}
      tokens:
        boiler-1: "s3cr3t-token-of-boiler-1"
        "*": "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
      max_body_size: 256KiB
      rate_limit: 5            # requests/s per device, burst rate_burst
      codec_options:
        json: {timestamp: time, timestamp_unit: ms}

The body is one reading object or an array of them (``application/json``), a
SenML pack (``application/senml+json``, ``application/senml+cbor``), CBOR
(``application/cbor``) or a plain value (``text/plain``): the Content-Type
picks the codec. The device id comes from the URL; a body cannot speak for
another device.

Answers (a JSON body ``{"error": ..., "reason": ..., "detail": ...}`` on errors):

* ``200 {"accepted": N}`` only once the ingest future resolved ``ACCEPTED``,
  i.e. the readings are in the outbox (guarantee 1 of DESIGN.md);
* ``400`` a body that does not decode (``reason`` is the codec's slug, counted
  per device), or one the pipeline refused;
* ``401`` no or a wrong bearer token (``WWW-Authenticate: Bearer``);
* ``413`` a body over ``max_body_size``; ``415`` a request without a token
  that is not JSON or CBOR (see :data:`ANONYMOUS_CODECS`), an unknown Content-Type, or
  ``text/plain`` / ``application/octet-stream`` while ``codec_options`` has no
  ``plain`` / ``binary`` entry (reason ``codec_not_configured``);
* ``429`` over the device's ``rate_limit``; ``503`` the outbox is full and
  refuses new readings, or did not answer within ``ack_timeout`` — both with
  ``Retry-After``.

``GET /healthz`` answers ``200 {"status": "ok"}``, or 503 while the outbox
refuses new readings. Built on aiohttp's server (17.8k POST/s measured on
these machines, the fastest of the Python servers tried).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from edgeway.codecs.base import (
    Codec,
    DecodeError,
    check_device_id,
    codec_class,
    codec_for_content_type,
)
from edgeway.config_types import input_limits, is_loopback, parse_host_port
from edgeway.devices.backoff import RequestBackoff
from edgeway.downlink import Downlink, DownlinkEvents
from edgeway.ingest import Ingest, IngestStatus
from edgeway.logs import EventLog
from edgeway.reading import Origin
from edgeway.south.base import SouthAdapter, register_adapter
from edgeway.south.decode_errors import DecodeErrorCounter
from edgeway.south.http_config import HttpIngestSection
from edgeway.south.http_downlink import HttpDownlink
from edgeway.south.mqtt.listeners import CrlWatch, client_cert_serial
from edgeway.streams import BodyError, read_json_object

if TYPE_CHECKING:
    from edgeway.firmware.service import FirmwareService
    from edgeway.twins.service import TwinService

log = logging.getLogger(__name__)

TokenCheck = Callable[[str, str | None], Awaitable[bool]]
"""``await check(device_id, bearer_token_or_None)`` -> may this request post for the device?
Replaces the config's ``tokens`` when given (e.g. the device registry)."""

PROVISION_BODY_MAX = 4096
"""Bytes of a ``POST /provision`` body: ``{"device_id": ...}`` is under 200."""

MAX_RATE_BUCKETS = 100_000
"""Devices whose token buckets are kept; beyond it the least recently used go.
A bucket is ~100 bytes, so the bound is ~10 MB even with anonymous posting."""
FIRMWARE_READ = 32 * 1024
"""Bytes of a firmware image read per step of a download. The event loop
(uvloop) has no sendfile, so aiohttp reads the file in steps of this size
(its default, 256 KiB, took the gateway ~75 MB above idle with 100 devices
downloading at once, bench/firmware.py); each connection also buffers up to
its transport's high-water mark."""


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def config_token_check(tokens: dict[str, str], allow_anonymous: bool) -> TokenCheck:
    """The token check backed by ``http_ingest.tokens``; comparisons are constant-time."""

    def matches(expected: str, given: str) -> bool:
        if expected.startswith("sha256:"):
            digest = hashlib.sha256(given.encode("utf-8")).hexdigest()
            return hmac.compare_digest(expected[7:].lower(), digest)
        return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))

    async def check(device_id: str, token: str | None) -> bool:
        if token is None:
            return allow_anonymous
        for key in (device_id, "*"):
            expected = tokens.get(key)
            if expected is not None and matches(expected, token):
                return True
        return False

    return check


def _admits_any_request(config: HttpIngestSection) -> bool:
    """True when the config lets at least some request in (a token or anonymous)."""
    return bool(config.tokens) or config.allow_anonymous


ANONYMOUS_CODECS = frozenset({"json", "cbor", "senml+json", "senml+cbor"})
"""Codecs a request without a token may use. None of their media types is one
a web page may send cross-origin without asking first (a CORS preflight, which
this listener never grants): a page the operator's browser opens cannot make
it post readings. A missing Content-Type, ``text/plain``, form and multipart
bodies are exactly what such a page can send, so they need a token."""


def _anonymous_may_send(content_type: str | None) -> bool:
    """True when ``content_type`` is a JSON or CBOR type of :data:`ANONYMOUS_CODECS`."""
    if content_type is None:
        return False
    cls = codec_for_content_type(content_type)
    return cls is not None and cls.name in ANONYMOUS_CODECS


BAD_REQUEST_LINES_PER_SECOND = 0.1
BAD_REQUEST_LINE_BURST = 2
"""Lines about malformed requests: two at once, then one every 10 s saying how
many were left out. Anyone who can connect can send them in bulk; each is
counted in ``refusals`` anyway."""


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger aiohttp's request handler writes to, for one listener.

    aiohttp logs every request it cannot parse (a header line over 8190
    bytes, more than 128 headers, a bad request line, a bad chunk) as "Error
    handling request" with a full traceback, after answering 400 itself. An
    unauthenticated client can send those in bulk; here each is counted by
    kind and said in one rate-limited line without a traceback. Anything else
    (a bug of ours: 500) passes through unchanged.
    """

    def __init__(self, refusals: dict[str, int]) -> None:
        super().__init__(log, {})
        self._refusals = refusals
        self._events = EventLog(
            log, per_second=BAD_REQUEST_LINES_PER_SECOND, burst=BAD_REQUEST_LINE_BURST
        )

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            kind = type(exc).__name__
            self._refusals[kind] = self._refusals.get(kind, 0) + 1
            # LoggerAdapter.debug() comes here whatever the level: aiohttp
            # reports non-HTTP traffic (a bad method first) at debug, counted
            # but not worth a line.
            if level > logging.DEBUG:
                self._events.emit(
                    "http_bad_request",
                    logging.WARNING,
                    "http ingest: refused a malformed request from %s: %s: %s",
                    args[0] if args else "?",
                    kind,
                    str(exc.message)[:200],
                )
            return
        super().log(level, msg, *args, **kwargs)


def _error(
    status: int, error: str, reason: str = "", detail: str = "", **headers: str
) -> web.Response:
    body: dict[str, Any] = {"error": error}
    if reason:
        body["reason"] = reason
    if detail:
        body["detail"] = detail
    return web.json_response(body, status=status, headers=headers or None)


@register_adapter
class HttpIngestAdapter(SouthAdapter):
    """The HTTP(S) ingest listener."""

    section = "http_ingest"
    config_model = HttpIngestSection

    def __init__(
        self,
        config: HttpIngestSection,
        *,
        ingest: Ingest,
        gateway_id: str,
        data_dir: Path,
        token_check: TokenCheck | None = None,
    ) -> None:
        super().__init__(config, ingest=ingest, gateway_id=gateway_id, data_dir=data_dir)
        self.config: HttpIngestSection = config
        self._custom_token_check = token_check
        self.token_check = token_check or config_token_check(config.tokens, config.allow_anonymous)
        self.decode_errors = DecodeErrorCounter()
        self.limits = input_limits(config.input_limits)
        self.port: int | None = None
        """The bound port, once listening (useful with port 0)."""
        self._crl_watch: CrlWatch | None = None
        """The listener's CRL (``tls.crl``) as it changes: new handshakes use
        the latest, and requests on connections opened before it are checked
        against it (:meth:`_revoked_certificates`)."""
        self.requests: dict[int, int] = {}
        """Responses by status code."""
        self.refusals: dict[str, int] = {}
        """Requests aiohttp refused (400) before routing them, by kind
        (``LineTooLong``, ``BadHttpMessage``, ``InvalidHeader``, ...)."""
        self._codecs: dict[str, Codec] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._unconfigured_warned: set[str] = set()
        self._downlink: HttpDownlink | None = None
        self.twins: TwinService | None = None
        self.firmware: FirmwareService | None = None
        """Set by the gateway: the images devices may download here."""
        """Set by the gateway when twins are on (edgeway.twins.http serves them)."""
        self._twin_polls = 0
        self.backoff = RequestBackoff()
        """Failed tokens per device id and per address (``locked`` answers: 429)."""
        self._auth_events = EventLog(
            log, per_second=BAD_REQUEST_LINES_PER_SECOND, burst=BAD_REQUEST_LINE_BURST
        )
        """Refused credentials and ACL refusals: one line each, rate-limited
        (a client sending wrong tokens in a loop must not fill the disk)."""

    def downlink(self, events: DownlinkEvents) -> Downlink | None:
        """Long-poll commands; see :mod:`edgeway.south.http_downlink`."""
        self._downlink = HttpDownlink(events, max_polls=self.config.max_command_polls)
        return self._downlink

    def _codec(self, name: str) -> Codec:
        codec = self._codecs.get(name)
        if codec is None:
            codec = codec_class(name)(self.config.codec_options.get(name, {}), limits=self.limits)
            self._codecs[name] = codec
        return codec

    def build_app(self) -> web.Application:
        """The aiohttp application (routes and body limit); :meth:`run` serves it."""
        # aiohttp enforces client_max_size while reading, so an oversized chunked
        # body is cut off without being buffered whole.
        app = web.Application(
            client_max_size=self.config.max_body_size, middlewares=[self._revoked_certificates]
        )
        app.router.add_post("/devices/{device_id}/telemetry", self._post_telemetry)
        app.router.add_get("/devices/{device_id}/commands", self._get_commands)
        app.router.add_post(
            "/devices/{device_id}/commands/{command_id}/result", self._post_command_result
        )
        app.router.add_get("/devices/{device_id}/firmware/{image_id}", self._get_firmware)
        app.router.add_get("/devices/{device_id}/twin", self._get_twin)
        app.router.add_patch("/devices/{device_id}/twin/reported", self._patch_twin_reported)
        app.router.add_post("/provision", self._post_provision)
        app.router.add_get("/healthz", self._healthz)
        return app

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.config.tls is None:
            return None
        from edgeway.south.mqtt.listeners import build_server_ssl_context

        return build_server_ssl_context(self.config.tls)

    async def run(self) -> None:
        host, port = parse_host_port(self.config.listen)
        runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            handle_signals=False,
            logger=_ServerLog(self.refusals),
        )
        await runner.setup()
        if self._downlink is not None:
            self._downlink.open()  # a restarted adapter (after a failure) serves polls again
        crl_watch = None
        try:
            ssl_ctx = self._ssl_context()
            tls = self.config.tls
            if ssl_ctx is not None and tls is not None and tls.crl is not None:
                # As on the MQTT listeners: a CRL written later (edgeway ca
                # revoke) is in force within a second.
                crl_watch = self._crl_watch = CrlWatch(ssl_ctx, tls.crl, tls)
                crl_watch.start()
            site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx)
            try:
                await site.start()
            except OSError as e:
                raise RuntimeError(
                    f"http_ingest: cannot listen on {self.config.listen}: {e.strerror or e}"
                ) from None
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1]) if sockets else port
            scheme = "https" if self.config.tls else "http"
            log.info("http ingest listening on %s://%s:%d", scheme, host, self.port)
            if (
                self._custom_token_check is None
                and self.access is None
                and not _admits_any_request(self.config)
            ):
                # e.g. --http-listen 0.0.0.0:8080 without a config file: say why
                # every device gets 401 rather than leave the operator guessing.
                log.warning(
                    "http ingest: no http_ingest.tokens and allow_anonymous is false: "
                    "every request will be refused (401)"
                )
            elif self.config.allow_anonymous:
                # As for MQTT listeners: fine on loopback, worth a warning elsewhere.
                log.log(
                    logging.INFO if is_loopback(host) else logging.WARNING,
                    "http ingest: requests without a token are accepted on %s:%d%s",
                    host,
                    self.port,
                    "" if is_loopback(host) else ", which is not loopback",
                )
            self.state.connected = self.state.listening = True
            self.ready.set()
            await asyncio.Event().wait()  # serve until cancelled
        finally:
            if crl_watch is not None:
                crl_watch.stop()
                self._crl_watch = None
            self.state.connected = self.state.listening = False
            if self._downlink is not None:
                self._downlink.close()  # long polls would hold the cleanup below
            await runner.cleanup()

    @web.middleware
    async def _revoked_certificates(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A request on a keep-alive connection whose client certificate the
        CRL revoked since its handshake: 403 ``certificate_revoked``, and the
        connection is closed (a device posting every second would otherwise
        never be cut off)."""
        watch = self._crl_watch
        if watch is not None and watch.revoked and request.transport is not None:
            if client_cert_serial(request.transport) in watch.revoked:
                response = _error(403, "certificate_revoked", detail="client certificate revoked")
                response.force_close()
                return self._respond(response)
        return await handler(request)

    def _respond(self, response: web.Response) -> web.Response:
        self.requests[response.status] = self.requests.get(response.status, 0) + 1
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.ingest.is_saturated():
            return web.json_response(
                {"status": "saturated"},
                status=503,
                headers={"Retry-After": self._retry_after()},
            )
        return web.json_response({"status": "ok"})

    def _retry_after(self) -> str:
        return str(max(1, round(self.config.retry_after)))

    async def _post_telemetry(self, request: web.Request) -> web.Response:
        return self._respond(await self._telemetry(request))

    async def _telemetry(self, request: web.Request) -> web.Response:
        cfg = self.config
        caller = _device_and_token(request)
        if isinstance(caller, web.Response):
            return caller
        device_id, token = caller
        verified = await self._authenticate(request, device_id, token)
        if isinstance(verified, web.Response):
            return verified
        if self.access is not None and not self.access.may_ingest(device_id, verified=verified):
            self._auth_events.emit(
                "http_acl_denied",
                logging.WARNING,
                "http ingest: the ACL refuses telemetry of %s from %s",
                device_id,
                request.remote,
            )
            return _error(403, "forbidden", "acl")

        if cfg.rate_limit is not None and not self._rate_ok(device_id):
            return _error(429, "rate_limited", **{"Retry-After": self._retry_after()})

        if request.content_length is not None and request.content_length > cfg.max_body_size:
            return _error(413, "too_large", detail=f"limit {cfg.max_body_size} bytes")
        content_type = request.headers.get("Content-Type")
        if token is None and not _anonymous_may_send(content_type):
            return _error(
                415,
                "unsupported_media_type",
                "anonymous_needs_json_or_cbor",
                "requests without a token must be application/json, application/cbor, "
                "application/senml+json or application/senml+cbor",
            )
        if content_type is None:
            codec = self._codec(cfg.default_codec)
        else:
            cls = codec_for_content_type(content_type)
            if cls is None or cls.name == "sparkplug_b":
                return _error(415, "unsupported_media_type", detail=content_type[:100])
            try:
                codec = self._codec(cls.name)
            except ValueError:
                # plain and binary cannot decode without options (a metric name,
                # a struct format): this gateway does not take that type until
                # the operator configures it, so 415 rather than a server error.
                if cls.name not in self._unconfigured_warned:
                    self._unconfigured_warned.add(cls.name)
                    log.warning(
                        "http ingest: refusing %s (415): set http_ingest.codec_options.%s",
                        content_type[:100],
                        cls.name,
                    )
                return _error(
                    415,
                    "unsupported_media_type",
                    "codec_not_configured",
                    f"{content_type[:100]} needs http_ingest.codec_options.{cls.name}",
                )

        if self.ingest.is_saturated():
            return _error(503, "outbox_full", **{"Retry-After": self._retry_after()})
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", detail=f"limit {cfg.max_body_size} bytes")

        origin = Origin(
            "http",
            address=request.path,
            client_id=device_id if token is not None else "",
            message_id=request.headers.get("X-Message-Id"),
        )
        try:
            readings = codec.decode(body, device_id=device_id, origin=origin, now=time.time())
        except DecodeError as e:
            self.decode_errors.record(self.state, device_id, e.reason, e.detail)
            return _error(400, "invalid_payload", e.reason, e.detail)
        if not readings:
            return web.json_response({"accepted": 0})

        future = self.ingest.submit(readings)
        try:
            async with asyncio.timeout(cfg.ack_timeout):
                status = await asyncio.shield(future)
        except TimeoutError:
            self.state.record_error(f"{device_id}: outbox did not answer in {cfg.ack_timeout}s")
            return _error(503, "timeout", **{"Retry-After": self._retry_after()})
        if status is IngestStatus.ACCEPTED:
            self.state.record_readings(len(readings))
            return web.json_response({"accepted": len(readings)})
        self.state.rejected += 1
        if status is IngestStatus.REJECTED_FULL:
            return _error(503, "outbox_full", **{"Retry-After": self._retry_after()})
        if status is IngestStatus.REJECTED_DEVICE:
            return _error(403, "device_refused", detail="device disabled or not registered")
        return _error(400, "rejected", "rejected_invalid")

    async def _command_caller(self, request: web.Request) -> str | web.Response:
        """The device id a command request may act for, or the error answer."""
        if self._downlink is None:
            return _error(404, "not_found", detail="commands are not enabled on this gateway")
        return await self._device_caller(request)

    async def _device_caller(self, request: web.Request) -> str | web.Response:
        """The device id a request for a device's own data (commands, twin) may
        act for, or the error answer: a token is needed even where telemetry
        may come without one, unless ``commands_allow_anonymous``."""
        caller = _device_and_token(request)
        if isinstance(caller, web.Response):
            return caller
        device_id, token = caller
        if token is None and (
            not self.config.commands_allow_anonymous
            or (self.access is not None and self.access.store.has("http", device_id))
        ):
            # A device with a token in the credential store must use it here too.
            return _error(401, "unauthorized", "no_token", **_bearer())
        if token is not None:
            verified = await self._authenticate(request, device_id, token)
            if isinstance(verified, web.Response):
                return verified
        return device_id

    async def _authenticate(
        self, request: web.Request, device_id: str, token: str | None
    ) -> bool | web.Response:
        """:meth:`_credentials_ok` behind the failed-token backoff: True when
        the token proved the device, False for an allowed anonymous request,
        or the answer: 429 ``locked`` while the device id or the address is
        locked out (no token is checked), 401 for refused credentials (a
        wrong token counts towards a lockout; each refusal is an
        ``auth_failed`` lifecycle event and a rate-limited log line)."""
        remote = request.remote or ""
        if token is not None:
            wait = self.backoff.locked_for(device_id, remote)
            if wait > 0:
                return _error(
                    429,
                    "locked",
                    detail="too many failed tokens; retry later",
                    **{"Retry-After": str(max(1, round(wait)))},
                )
        verified = await self._credentials_ok(device_id, token)
        if verified is not None:
            if token is not None:
                self.backoff.succeeded(device_id)
            return verified
        reason = "no_token" if token is None else "bad_token"
        if token is not None:
            self.backoff.failed(device_id, remote)
        if self.access is not None:
            self.access.auth_failed(device_id, "http", remote, reason.replace("_", " "))
        self._auth_events.emit(
            "http_auth_failed",
            logging.WARNING,
            "http ingest: refused credentials for %s from %s",
            device_id,
            remote,
        )
        return _error(401, "unauthorized", reason, **_bearer())

    async def _post_provision(self, request: web.Request) -> web.Response:
        return self._respond(await self._provision(request))

    async def _provision(self, request: web.Request) -> web.Response:
        """``POST /provision`` with ``Authorization: Bearer KEY_ID:SECRET`` (a
        provisioning key) and ``{"device_id": ...}``: ``201`` with the
        device's own credentials, shown this once (see
        :mod:`edgeway.devices.provisioning`)."""
        from edgeway.devices.provisioning import ProvisioningError, split_presented

        provisioner = self.access.provisioner if self.access is not None else None
        if provisioner is None:
            return _error(404, "not_found", detail="provisioning is not enabled on this gateway")
        token = _bearer_token(request)
        if isinstance(token, web.Response):
            return token
        if token is None:
            return _error(401, "unauthorized", "no_token", **_bearer())
        limit = PROVISION_BODY_MAX
        try:
            body = await read_json_object(request.content, limit, request.content_length)
        except BodyError as e:
            if e.too_large:
                return _error(413, "too_large", detail=f"limit {limit} bytes")
            return _error(400, "invalid", detail="the body is a JSON object")
        try:
            key_id, secret = split_presented(token)
            result = await provisioner.enrol(
                key_id, secret, body, remote=request.remote or "", protocol="http"
            )
        except ProvisioningError as e:
            headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else {}
            if e.status == 401:
                headers.update(_bearer())
            return _error(e.status, e.code, detail=str(e), **headers)
        # The answer holds secrets: no cache may keep it.
        return web.json_response(
            result.to_json(), status=201, headers={"Cache-Control": "no-store"}
        )

    async def _credentials_ok(self, device_id: str, token: str | None) -> bool | None:
        """Whether the request may act for ``device_id``: True when its token
        proved it, False when it came in anonymously (allowed here), None when
        refused. A token in the credential store decides for its device (and
        a device disabled there is refused whatever it sends); devices the
        store has no HTTP token for are left to ``http_ingest.tokens``."""
        access = self.access
        if access is not None:
            from edgeway.devices.credentials import Verdict

            verdict = access.check_token("http", device_id, token)
            if verdict is Verdict.OK:
                return True
            if verdict is not Verdict.UNKNOWN:
                return None
        if not await self.token_check(device_id, token):
            return None
        return token is not None

    async def _get_commands(self, request: web.Request) -> web.StreamResponse:
        caller = await self._command_caller(request)
        if isinstance(caller, web.Response):
            return self._respond(caller)
        assert self._downlink is not None
        try:
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            return self._respond(_error(400, "bad_request", detail="wait must be seconds"))
        wait = min(max(wait, 0.0), self.config.command_poll_max)
        return await self._downlink.poll(request, caller, wait)

    async def _post_command_result(self, request: web.Request) -> web.Response:
        caller = await self._command_caller(request)
        if isinstance(caller, web.Response):
            return self._respond(caller)
        assert self._downlink is not None
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._respond(_error(413, "too_large"))
        return self._respond(self._downlink.result(caller, request.match_info["command_id"], body))

    async def _get_firmware(self, request: web.Request) -> web.StreamResponse:
        """``GET /devices/{id}/firmware/{image}``: the image, with range requests
        (a download cut off resumes where it stopped), only for a device that an
        unfinished campaign of that image targets."""
        caller = await self._device_caller(request)
        if isinstance(caller, web.Response):
            return self._respond(caller)
        image_id = request.match_info["image_id"]
        fw = self.firmware
        if fw is None or not fw.may_download(image_id, caller):
            return self._respond(_error(404, "not_found", detail="no such image for this device"))
        path = fw.path(image_id)
        if not path.is_file():
            return self._respond(_error(404, "not_found", detail="no such image"))
        self.requests[200] = self.requests.get(200, 0) + 1
        return web.FileResponse(
            path, chunk_size=FIRMWARE_READ, headers={"Content-Type": "application/octet-stream"}
        )

    async def _twin_caller(self, request: web.Request) -> str | web.Response:
        if self.twins is None:
            return _error(404, "not_found", detail="twins are not enabled on this gateway")
        return await self._device_caller(request)

    async def _get_twin(self, request: web.Request) -> web.Response:
        """``GET /devices/{id}/twin[?wait=S]``: the twin with an ETag; with
        ``If-None-Match`` and ``wait``, held until it changes (long-poll, at most
        ``command_poll_max``; ``304`` if it did not)."""
        from edgeway.twins.http import get_twin

        caller = await self._twin_caller(request)
        if isinstance(caller, web.Response):
            return self._respond(caller)
        assert self.twins is not None
        if self._twin_polls >= self.config.max_command_polls:
            return self._respond(_error(503, "busy", detail="too many waiting requests"))
        self._twin_polls += 1
        try:
            return self._respond(
                await get_twin(self.twins, caller, request, self.config.command_poll_max)
            )
        finally:
            self._twin_polls -= 1

    async def _patch_twin_reported(self, request: web.Request) -> web.Response:
        """``PATCH /devices/{id}/twin/reported``: a JSON merge patch of the
        device's reported state (``If-Match: <version>`` to make it conditional)."""
        from edgeway.twins.http import patch_reported

        caller = await self._twin_caller(request)
        if isinstance(caller, web.Response):
            return self._respond(caller)
        assert self.twins is not None
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._respond(_error(413, "too_large"))
        return self._respond(await patch_reported(self.twins, caller, request, body))

    def _rate_ok(self, device_id: str) -> bool:
        assert self.config.rate_limit is not None
        now = time.monotonic()
        bucket = self._buckets.pop(device_id, None)  # re-insert: dict order is LRU order
        if bucket is None:
            bucket = TokenBucket(self.config.rate_limit, self.config.rate_burst, now)
            if len(self._buckets) >= MAX_RATE_BUCKETS:
                self._buckets.pop(next(iter(self._buckets)))
        self._buckets[device_id] = bucket
        return bucket.take(now)


def _device_and_token(request: web.Request) -> tuple[str, str | None] | web.Response:
    """The path's device id and the request's bearer token (None without one), or
    the 400/401 answer for a malformed id or Authorization header."""
    try:
        device_id = check_device_id(request.match_info["device_id"])
    except DecodeError as e:
        return _error(400, "bad_request", e.reason, e.detail)
    token = _bearer_token(request)
    if isinstance(token, web.Response):
        return token
    return device_id, token


def _bearer_token(request: web.Request) -> str | web.Response | None:
    """The request's bearer token, None without one, or the 401 for a malformed
    Authorization header."""
    auth = request.headers.get("Authorization")
    if auth is None:
        return None
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return _error(401, "unauthorized", "bad_authorization", **_bearer())
    return value.strip()


def _bearer() -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="edgeway"'}
