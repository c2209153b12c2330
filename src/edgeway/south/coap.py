"""CoAP listener (aiocoap): telemetry uploads and observable command resources.

Example::

    coap:
      listen: "127.0.0.1:5683"     # UDP; port 0 picks a free port
      max_body_size: 64KiB         # after Block1 reassembly; larger: 4.13
      default_format: json         # codec for requests without Content-Format
      codec_options:
        json: {timestamp: {field: ts, unit: ms}}
      retry_after: 5s              # Max-Age of a 5.03 when the outbox is full
      commands: false              # observe/GET commands, POST results (no DTLS: trusted networks only)
      dedup_max_entries: 20000     # requests remembered to answer retransmissions (247 s each)
      dedup_max_bytes: 8MiB
      dedup_max_per_address: 2000  # per IPv4 address / IPv6 /64

Resources:

- ``POST``/``PUT /devices/{device_id}/telemetry``: the body is decoded by the
  codec for its Content-Format (50 JSON, 60 CBOR, 110 SenML+JSON, 112
  SenML+CBOR). The response is sent only after the ingest future resolves:
  2.04 Changed when the readings are safe, 5.03 Service Unavailable with
  Max-Age when the outbox refuses them, 4.00 with a diagnostic payload for a
  payload that does not decode or is rejected by validation, 4.13 (with Size1)
  for a body over ``max_body_size``, 4.15 for an unsupported Content-Format.
- ``GET /devices/{device_id}/commands`` (with Observe) and ``POST
  /devices/{device_id}/commands/{command_id}/result``: commands to devices
  when ``commands: true`` (4.04 otherwise); see :mod:`edgeway.south.coap_downlink`.
- ``devices/{device_id}/twin``, ``.../twin/desired`` (observable),
  ``.../twin/reported`` (also PUT/PATCH), ``.../twin/delta``: the device's
  twin when twins are on; see :mod:`edgeway.twins.coap`.
- ``GET /devices/{device_id}/firmware/{image}``: a firmware image in Block2
  blocks (RFC 7959) for a device whose update command for that image is out;
  each block is read from disk on its own, ETag = the first 8 bytes of the
  image's SHA-256.

Twins and firmware are a device's own data: the request's Uri-Query token
must be that device's CoAP token (``coap.device_data_allow_anonymous`` lets
devices without one in, on a trusted network).

On acknowledgement: aiocoap piggybacks the response on the ACK of a
confirmable request when it is ready within its empty-ACK delay, and otherwise
sends an empty ACK first and the response later as a separate confirmable
message. Either way a **2.04 response code** is what tells the device its
reading is on disk (guarantee 1 of DESIGN.md); an empty ACK only says the
request arrived.

On retransmissions: a confirmable request seen again (same sender, same
message id, within 247 s) gets the answer the first one got, and is not
processed again, as long as the listener still remembers it; the memory for
that is capped (:mod:`edgeway.south.coap_dedup`, ``dedup_*`` keys), and a
retransmission of a request forgotten early is processed as a new one (at
worst a duplicate reading). Forgetting early is counted in the adapter's
``duplicate_cache`` figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from edgeway.codecs.base import (
    Codec,
    DecodeError,
    check_device_id,
    codec_for_coap_format,
    get_codec,
)
from edgeway.config_types import input_limits, parse_host_port
from edgeway.devices.backoff import RequestBackoff
from edgeway.downlink import Downlink, DownlinkEvents
from edgeway.ingest import Ingest, IngestStatus
from edgeway.logs import EventLog, LibraryLogLimit
from edgeway.reading import Origin
from edgeway.runtime.component import OMIT_NONE
from edgeway.south.base import AdapterStats, Backoff, SouthAdapter, register_adapter
from edgeway.south.coap_config import CoapSection
from edgeway.south.coap_dedup import DuplicateCache, DuplicateCacheStats, Seen
from edgeway.south.coap_downlink import CoapCommandStats, CoapDownlink
from edgeway.south.coap_guard import (
    IF_MATCH,
    bad_option_ack,
    empty_message_id,
    option_refusal,
    request_options,
)
from edgeway.south.coap_probe import CoapPinger
from edgeway.south.decode_errors import DecodeErrorCounter
from edgeway.twins.coap import VIEWS as TWIN_VIEWS
from edgeway.twins.coap import TwinCoap

if TYPE_CHECKING:
    from edgeway.firmware.service import FirmwareService
    from edgeway.twins.service import TwinService

log = logging.getLogger(__name__)

PROBE_ATTEMPTS = 3
"""Unanswered pings in a row before the listener is declared dead: a single
datagram can be lost to a full socket buffer under a burst without the
listener being dead."""
PROBE_TIMEOUT = 1.0
"""Seconds to wait for each ping's reset. A loopback round trip takes well under
a millisecond; 1 s leaves room for a loop busy with a burst of requests."""

REFUSAL_LINES_PER_SECOND = 0.1
REFUSAL_LINE_BURST = 2
"""Refusal lines: two at once, then one every 10 s (saying how many were left
out), and the same for each of aiocoap's own messages. Anyone can send such
datagrams in bulk; each is counted in ``refusals`` anyway, so the log only
needs to say that it happens and from where."""
AIOCOAP_LOGGER = "aiocoap.server"

EXCHANGE_LIFETIME = 247.0
"""Seconds a request is remembered to answer its retransmissions (RFC 7252
4.8.2 with the default transmission parameters, aiocoap's value): the 45 s
a client retransmits over plus twice the 100 s the RFC allows a datagram to
be on its way."""

_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)


def _ignore_icmp_errors(sock: socket.socket) -> None:
    """Stop the kernel from reporting ICMP errors on the listener's socket.

    aiocoap's udp6 transport turns on ``IP_RECVERR``/``IPV6_RECVERR`` so that an
    ICMP "port unreachable" can fail pending exchanges early. With it on, such
    an error makes the socket signal ``POLLERR``; the stdlib event loop just
    calls the reader, which drains the error queue, but libuv (uvloop, which
    ``edgeway run`` uses) treats ``POLLERR`` on a polled descriptor as fatal and
    silently stops polling it. So one client that sent a confirmable request
    and closed its socket before the answer came (the answer draws the ICMP
    error) made the listener stop reading for good, with nothing logged.

    Without RECVERR, Linux drops ICMP errors for unconnected UDP sockets, which
    is what every other UDP server sees. The cost: an exchange with a vanished
    client ends by timeout (aiocoap's retransmission limit) instead of at once.
    """
    if sys.platform != "linux":
        return
    for level, option in ((socket.IPPROTO_IPV6, _IPV6_RECVERR), (socket.IPPROTO_IP, _IP_RECVERR)):
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, 0)


@dataclasses.dataclass(slots=True)
class CoapAdapterStats(AdapterStats):
    """An adapter's stats plus the CoAP listener's duplicate cache."""

    duplicate_cache: DuplicateCacheStats | None = dataclasses.field(
        default=None, metadata=OMIT_NONE
    )


@register_adapter
class CoapAdapter(SouthAdapter):
    """The CoAP server; see the module docstring."""

    section = "coap"
    config_model = CoapSection
    config: CoapSection

    def __init__(
        self,
        config: CoapSection,
        *,
        ingest: Ingest,
        gateway_id: str = "",
        data_dir: Path = Path(),
    ) -> None:
        super().__init__(config, ingest=ingest, gateway_id=gateway_id, data_dir=data_dir)
        self.decode_errors = DecodeErrorCounter()
        self.limits = input_limits(config.input_limits)
        self._codecs: dict[str, Codec] = {}
        for name in config.codec_options:
            # Bad options stop start-up here rather than fail the first request.
            try:
                self._codec_by_name(name)
            except (KeyError, ValueError) as e:
                raise ValueError(f"coap.codec_options.{name}: {e}") from None
        try:
            self._codec_by_name(config.default_format)
        except (KeyError, ValueError) as e:
            raise ValueError(f"coap.default_format: {e}") from None
        self._downlink: CoapDownlink | None = None
        self.twins: TwinService | None = None
        """Set by the gateway when twins are on (``edgeway.twins.coap`` serves them)."""
        self.firmware: FirmwareService | None = None
        """Set by the gateway when firmware campaigns are on (Block2 downloads)."""
        self._twin_coap: TwinCoap | None = None
        self._images: dict[str, _ImageInfo] = {}
        self.firmware_blocks = 0
        """Firmware blocks served (``devices/{id}/firmware/{image}``)."""
        self.firmware_bytes = 0
        self._observation_count = 0
        self._observation_by_key: dict[tuple[str, str], Any] = {}
        self._observations_by_address: dict[str, int] = {}
        self._observe_networks = [
            ipaddress.ip_network(n, strict=False) for n in config.observe_networks
        ]
        self._context: Any = None
        self.port: int | None = None
        """The UDP port actually bound (useful with port 0)."""
        self.duplicates = DuplicateCache(
            lifetime=EXCHANGE_LIFETIME,
            max_entries=config.dedup_max_entries,
            max_bytes=config.dedup_max_bytes,
            max_per_address=config.dedup_max_per_address,
        )
        """Recent requests and their answers, for retransmissions
        (:mod:`edgeway.south.coap_dedup`); kept across listener restarts."""
        self.responses: dict[str, int] = {}
        """Responses sent to telemetry requests, by code (``"2.04"``, ``"4.00"``, ...)."""
        self.listener_restarts = 0
        """Times the listener stopped answering pings and was replaced."""
        self.probe_answered = False
        """True once the listener answered its self-check (``probe_interval``)."""
        self.refusals: dict[str, int] = {}
        """Requests refused before rendering, by reason (``unknown_critical_option``,
        ``malformed_option``, ``proxy_option``, ``undecodable``)."""
        self._events = EventLog(log, per_second=REFUSAL_LINES_PER_SECOND, burst=REFUSAL_LINE_BURST)
        self.backoff = RequestBackoff()
        """Failed tokens per device id and per address (answered 4.29)."""
        self._library_log_limit = LibraryLogLimit(
            per_second=REFUSAL_LINES_PER_SECOND, burst=REFUSAL_LINE_BURST
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve until cancelled. A port in use raises at once (one line).

        While serving, the listener pings itself every ``probe_interval``; a
        listener that stops answering is reported (``state.listening`` False,
        one error line) and replaced by a fresh one on the same port."""
        host, port = parse_host_port(self.config.listen)
        site = self._build_site()
        if self.twins is not None:
            self._twin_coap = TwinCoap(self.twins, self._respond, self.count_refusal)
            self._twin_coap.attach()
        try:
            await self._open_listener(host, port, site)
        except OSError as e:
            if self._twin_coap is not None:
                self._twin_coap.detach()
            raise OSError(
                f"coap: cannot listen on {self.config.listen}: {e.strerror or e}"
            ) from None
        self.port = self._bound_port() or port
        self.state.connected = self.state.listening = True
        log.info("coap listening on %s:%s (udp)", host, self.port)
        self.ready.set()
        library_log = logging.getLogger(AIOCOAP_LOGGER)
        library_log.addFilter(self._library_log_limit)
        try:
            while True:
                await self._watch_listener()
                await self._restart_listener(host, site)
        finally:
            self.state.connected = False
            self.state.listening = False
            await self._close_listener()
            if self._downlink is not None:
                self._downlink.close()
            if self._twin_coap is not None:
                self._twin_coap.detach()
            library_log.removeFilter(self._library_log_limit)

    async def _open_listener(self, host: str, port: int, site: Any) -> None:
        import aiocoap

        # What create_server_context(transports=["udp6"]) does, with aiocoap's
        # udp6 transport subclassed to answer datagrams it cannot decode (see
        # _guarded_udp6). UDP only: aiocoap would also open CoAP-over-TCP and
        # WebSocket endpoints by default. The logger sits under "aiocoap" so
        # that the gateway's logging set-up keeps the library's per-request
        # lines quiet, and its remaining lines are rate-limited.
        loop = asyncio.get_running_loop()
        ctx = aiocoap.Context(loop=loop, serversite=site, loggername=AIOCOAP_LOGGER)
        _plain_task_names(ctx)
        transport = _guarded_udp6(self)
        try:
            await ctx._append_tokenmanaged_messagemanaged_transport(
                lambda mman: transport.create_server_transport_endpoint(
                    _bounded_duplicates(mman, self.duplicates),
                    log=ctx.log,
                    loop=loop,
                    bind=(host, port),
                    multicast=[],
                )
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await ctx.shutdown()
            raise
        self._context = ctx

    async def _close_listener(self) -> None:
        ctx, self._context = self._context, None
        if ctx is not None:
            with contextlib.suppress(Exception):
                await ctx.shutdown()

    async def _watch_listener(self) -> None:
        """Return when the listener stopped answering pings (never when the
        checks are off, or cannot reach the listener at all)."""
        interval = self.config.probe_interval
        sock = self.listener_socket()
        if interval <= 0 or sock is None:
            await asyncio.Future()
        assert sock is not None
        host, port = sock.getsockname()[:2]
        pinger = CoapPinger(host, port)
        # The first check of the first listener comes at once: it proves that
        # pings reach it, so that a later silence means the listener died.
        wait = 0.0 if not self.probe_answered else interval
        try:
            while True:
                await asyncio.sleep(wait)
                wait = interval
                if await pinger.answers(PROBE_ATTEMPTS, PROBE_TIMEOUT):
                    self.probe_answered = True
                    self.state.connected = self.state.listening = True
                elif self.probe_answered:
                    return
                else:
                    # Not answered right after start: the ping cannot reach
                    # the listener (a firewall on loopback?). Restarting would
                    # not help and would repeat forever.
                    log.warning(
                        "coap: the listener's self-check gets no answer from %s:%s; "
                        "checks are off (coap.probe_interval)",
                        *pinger.address,
                    )
                    await asyncio.Future()
        finally:
            pinger.close()

    async def _restart_listener(self, host: str, site: Any) -> None:
        """Replace a listener that stopped answering; retried with backoff
        while the port cannot be bound again. ``state.listening`` stays False
        until the new listener has answered a ping."""
        self.state.connected = self.state.listening = False
        reason = f"no answer to {PROBE_ATTEMPTS} pings in a row"
        self.state.record_error(f"listener stopped serving ({reason})")
        log.error(
            "coap listener on %s:%s stopped serving (%s); restarting it",
            host,
            self.port,
            reason,
        )
        await self._close_listener()
        backoff = Backoff(initial=0.5, maximum=30.0)
        while True:
            try:
                await self._open_listener(host, self.port or 0, site)
            except OSError as e:
                self.state.record_error(e)
                log.error("coap listener on %s:%s cannot be reopened: %s", host, self.port, e)
                await backoff.wait()
                continue
            self.listener_restarts += 1
            log.warning("coap listener on %s:%s restarted", host, self.port)
            return

    def listener_socket(self) -> socket.socket | None:
        """The listener's UDP socket (diagnostics, tests); None when not listening."""
        # aiocoap has no public accessor for its socket; the bound port (with
        # port 0) and the ICMP set-up need it.
        with contextlib.suppress(Exception):
            for ri in self._context.request_interfaces:
                mi = ri.token_interface.message_interface
                sock = mi.transport.get_extra_info("socket")
                if isinstance(sock, socket.socket):
                    return sock
        return None

    def _bound_port(self) -> int | None:
        sock = self.listener_socket()
        return int(sock.getsockname()[1]) if sock is not None else None

    def _build_site(self) -> Any:
        # The devices resource is the root itself rather than a child of an
        # aiocoap Site: a Site copies every request (deepcopy) to strip the
        # path, which was 40 % of the server's CPU per request.
        return _devices_resource_class()(self)

    def stats(self) -> CoapAdapterStats:
        """The adapter's stats with the duplicate cache's figures."""
        base = super().stats()
        out = CoapAdapterStats(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        out.duplicate_cache = self.duplicates.stats()
        return out

    # ------------------------------------------------------------------ commands

    def downlink(self, events: DownlinkEvents) -> Downlink | None:
        """Commands over CoAP when ``commands: true``; see :mod:`edgeway.south.coap_downlink`."""
        if not self.config.commands:
            return None
        self._downlink = CoapDownlink(
            events,
            poll_wait=self.config.command_poll_wait,
            max_polls=self.config.max_command_polls,
        )
        return self._downlink

    @property
    def commands_enabled(self) -> bool:
        """Whether this listener takes commands (``commands: true`` and the gateway's queue)."""
        return self._downlink is not None

    @property
    def command_stats(self) -> CoapCommandStats | None:
        """The downlink's counters (in the adapter's status), None when commands are off."""
        return None if self._downlink is None else self._downlink.stats

    def observer_count(self, device_id: str) -> int:
        """Clients currently observing ``devices/{device_id}/commands``."""
        return 0 if self._downlink is None else self._downlink.observer_count(device_id)

    def message_sent(self, message: Any, data: bytes) -> None:
        """The transport sent ``message``, encoded as ``data``: an ACK or RST
        answers a request (the duplicate cache keeps it for retransmissions);
        the downlink follows its commands."""
        from aiocoap import ACK, RST

        if message.mtype is ACK or message.mtype is RST:
            sockaddr = message.remote.sockaddr
            self.duplicates.answered(sockaddr[0], sockaddr[1], message.mid, data)
        if self._downlink is not None:
            self._downlink.message_sent(message)

    def empty_received(self, sockaddr: Any, mid: int, *, reset: bool) -> None:
        """An empty ACK or RST arrived (the downlink's notifications are confirmed so)."""
        if self._downlink is not None:
            self._downlink.empty_received(sockaddr, mid, reset=reset)

    # ------------------------------------------------------------------ requests

    def _codec_by_name(self, name: str) -> Codec:
        codec = self._codecs.get(name)
        if codec is None:
            codec = get_codec(name, self.config.codec_options.get(name), limits=self.limits)
            self._codecs[name] = codec
        return codec

    def _respond(self, code: Any, text: str = "", **options: Any) -> Any:
        from aiocoap import Message

        self.responses[str(code.dotted)] = self.responses.get(str(code.dotted), 0) + 1
        # RFC 7252 5.5.2: an error's diagnostic payload is UTF-8 text with no Content-Format.
        msg = Message(code=code, payload=text.encode("utf-8"))
        for k, v in options.items():
            setattr(msg.opt, k, v)
        return msg

    def count_refusal(self, reason: str, detail: str, remote: object) -> None:
        """Count a refused request by ``reason``; a rate-limited line says so."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        self._events.emit(
            "coap_refused",
            logging.WARNING,
            "coap: refused a request from %s: %s (%s)",
            remote,
            reason,
            detail,
        )

    def refuse_options(self, request: Any, *, if_match: bool = False) -> Any | None:
        """The answer to a request whose options the listener refuses, or None
        (``if_match``: the request's resource acts on If-Match)."""
        from aiocoap import Code

        also = _IF_MATCH_HANDLED if if_match else frozenset()
        refusal = option_refusal(request_options(request), also)
        if refusal is None:
            return None
        self.count_refusal(refusal.reason, f"option {refusal.option}", request.remote.hostinfo)
        code = Code.BAD_OPTION if refusal.code == "4.02" else Code.PROXYING_NOT_SUPPORTED
        return self._respond(code, f"{refusal.reason}: option {refusal.option}")

    def answer_undecodable(self, data: bytes, address: object, exc: Exception) -> bytes | None:
        """A datagram aiocoap could not decode: count it, log a rate-limited
        line, and return the 4.02 to send back (None: send nothing)."""
        self.count_refusal("undecodable", type(exc).__name__, _host_port(address))
        return bad_option_ack(data, b"undecodable option")

    async def render_telemetry(self, request: Any, device_id: str) -> Any:
        """Decode a telemetry upload, hand it to the ingest and answer with its fate."""
        from aiocoap import Code

        if request.code not in (Code.POST, Code.PUT):
            return self._respond(Code.METHOD_NOT_ALLOWED, "use POST or PUT")
        try:
            check_device_id(device_id)
        except DecodeError as e:
            self.decode_errors.record(self.state, "-", e.reason, e.detail)
            return self._respond(Code.BAD_REQUEST, f"{e.reason}: {e.detail}")
        refusal = self._caller_refusal(request, device_id, ingest=True)
        if refusal is not None:
            return refusal
        payload: bytes = request.payload
        if len(payload) > self.config.max_body_size:
            return self._too_large()
        fmt = request.opt.content_format
        if fmt is None:
            codec = self._codec_by_name(self.config.default_format)
        else:
            cls = codec_for_coap_format(int(fmt))
            if cls is None:
                self.decode_errors.record(
                    self.state, device_id, "unsupported_content_format", str(int(fmt))
                )
                return self._respond(
                    Code.UNSUPPORTED_CONTENT_FORMAT,
                    f"content format {int(fmt)} not supported; use 50, 60, 110 or 112",
                )
            try:
                codec = self._codec_by_name(cls.name)
            except ValueError:
                # plain/binary need options (metric name, struct format) that
                # this listener was not given: the format is known but not
                # usable here, which for the device is "unsupported".
                self.decode_errors.record(self.state, device_id, "codec_not_configured", cls.name)
                return self._respond(
                    Code.UNSUPPORTED_CONTENT_FORMAT,
                    f"content format {int(fmt)} ({cls.name}) needs coap.codec_options.{cls.name}",
                )
        # No client_id: without DTLS there is no authenticated principal.
        origin = Origin("coap", address=f"devices/{device_id}/telemetry")
        try:
            readings = codec.decode(payload, device_id=device_id, origin=origin, now=time.time())
        except DecodeError as e:
            self.decode_errors.record(self.state, device_id, e.reason, e.detail)
            return self._respond(Code.BAD_REQUEST, f"{e.reason}: {e.detail}"[:512])
        if not readings:
            return self._respond(Code.CHANGED)
        status = await self.ingest.submit(readings)
        if status is IngestStatus.ACCEPTED:
            self.state.record_readings(len(readings))
            return self._respond(Code.CHANGED)
        self.state.rejected += 1
        if status is IngestStatus.REJECTED_FULL:
            return self._respond(
                Code.SERVICE_UNAVAILABLE,
                "outbox full, retry later",
                max_age=max(1, round(self.config.retry_after)),
            )
        if status is IngestStatus.REJECTED_DEVICE:
            return self._respond(Code.FORBIDDEN, "device disabled or not registered")
        return self._respond(Code.BAD_REQUEST, "rejected by validation")

    def _too_large(self) -> Any:
        from aiocoap import Code

        return self._respond(
            Code.REQUEST_ENTITY_TOO_LARGE,
            f"body larger than {self.config.max_body_size} bytes",
            size1=self.config.max_body_size,
        )

    def exceeds_limit(self, request: Any) -> bool:
        """True when a request (or one block of a Block1 transfer) announces in
        Size1 or reaches more than ``max_body_size``: refused before aiocoap
        spools the rest of the transfer."""
        limit = self.config.max_body_size
        size1 = request.opt.size1
        block1 = request.opt.block1
        end = (block1.start if block1 is not None else 0) + len(request.payload)
        return (size1 is not None and size1 > limit) or end > limit

    def _commands_refusal(self, request: Any, device_id: str) -> Any | None:
        """The answer to a commands request this listener does not serve, or None."""
        from aiocoap import Code

        if self._downlink is None:
            return self._respond(
                Code.NOT_FOUND, "commands are not enabled (coap.commands, commands.enabled)"
            )
        try:
            check_device_id(device_id)
        except DecodeError as e:
            return self._respond(Code.BAD_REQUEST, f"{e.reason}: {e.detail}")
        if not self._may_observe(_client_ip(request.remote)):
            text = "commands are not allowed from this address"
            self.count_refusal("commands_denied", text, request.remote.hostinfo)
            return self._respond(Code.FORBIDDEN, text)
        return self._caller_refusal(request, device_id, ingest=False)

    def _caller_refusal(self, request: Any, device_id: str, *, ingest: bool) -> Any | None:
        """4.01 when the request may not act for ``device_id`` (a wrong or
        missing token where one is needed, a disabled device), 4.03 when the
        ACL refuses its telemetry; None when it may go on. The token is the
        Uri-Query ``token=...`` (per-device; see docs/security.md for why not
        OSCORE)."""
        from aiocoap import Code

        token = _query_token(request)
        access = self.access
        remote = str(request.remote.hostinfo)
        if token is not None:
            wait = self.backoff.locked_for(device_id, remote)
            if wait > 0:
                self.count_refusal("locked", "device " + device_id, remote)
                return self._respond(
                    Code.TOO_MANY_REQUESTS, "too many failed tokens", max_age=max(1, round(wait))
                )
        verified = False
        refused = False
        if access is not None:
            from edgeway.devices.credentials import Verdict

            verdict = access.check_token("coap", device_id, token)
            if verdict is Verdict.OK:
                verified = True
            elif verdict is not Verdict.UNKNOWN:
                refused = True
        if refused or (not verified and not self.config.allow_anonymous):
            reason = "no_token" if token is None else "bad_token"
            if token is not None:
                self.backoff.failed(device_id, remote)
            if access is not None:
                access.auth_failed(device_id, "coap", remote, reason.replace("_", " "))
            self.count_refusal(reason, "device " + device_id, remote)
            return self._respond(Code.UNAUTHORIZED, reason)
        if verified:
            self.backoff.succeeded(device_id)
        if ingest and access is not None and not access.may_ingest(device_id, verified=verified):
            self.count_refusal("acl", "device " + device_id, request.remote.hostinfo)
            return self._respond(Code.FORBIDDEN, "acl")
        return None

    async def render_commands(self, request: Any, device_id: str) -> Any:
        """``GET /devices/{id}/commands``: the first answer to an observation
        (empty), a plain GET's poll, or a follow-up block of a command."""
        from aiocoap import Code, Message

        if request.code != Code.GET:
            return self._respond(Code.METHOD_NOT_ALLOWED, "use GET (with Observe)")
        refusal = self._commands_refusal(request, device_id)
        if refusal is not None:
            return refusal
        assert self._downlink is not None
        if request.opt.observe == 0:
            # The observation was accepted (add_observation): commands follow
            # as notifications.
            return Message(code=Code.CONTENT, payload=b"")
        msg = await self._downlink.poll(device_id, _client_ip(request.remote), request.opt.block2)
        if msg is None:
            text = f"{self.config.max_command_polls} command polls waiting; retry later"
            self.count_refusal("poll_limit", text, request.remote.hostinfo)
            return self._respond(
                Code.SERVICE_UNAVAILABLE, text, max_age=max(1, round(self.config.retry_after))
            )
        return msg

    def render_result(self, request: Any, device_id: str, command_id: str) -> Any:
        """``POST /devices/{id}/commands/{command_id}/result``: a device's answer."""
        from aiocoap import Code

        if request.code != Code.POST:
            return self._respond(Code.METHOD_NOT_ALLOWED, "use POST")
        refusal = self._commands_refusal(request, device_id)
        if refusal is not None:
            return refusal
        assert self._downlink is not None
        fmt = request.opt.content_format
        code, text = self._downlink.result(
            device_id, command_id, request.payload, None if fmt is None else int(fmt)
        )
        return self._respond(code, text)

    # ------------------------------------------------------------------ twins, firmware

    def _own_data_reason(self, request: Any, device_id: str) -> str | None:
        """Why a request may not read or change ``device_id``'s own data (its
        twin, its firmware), or None: ``no_token``/``bad_token`` unless the
        Uri-Query token is the device's CoAP token in the credential store.
        Without a token only with ``device_data_allow_anonymous``, and never
        for a device that has a CoAP token."""
        from edgeway.devices.credentials import Verdict

        token = _query_token(request)
        verdict = None
        if self.access is not None:
            verdict = self.access.check_token("coap", device_id, token)
            if verdict is Verdict.OK:
                return None
        if token is None:
            anonymous_ok = verdict in (None, Verdict.UNKNOWN)
            return None if anonymous_ok and self.config.device_data_allow_anonymous else "no_token"
        return "bad_token"

    def _own_data_refusal(self, request: Any, device_id: str) -> Any | None:
        """The answer to a request for ``device_id``'s own data that may not
        act for it (4.00 for a malformed id, 4.01 for the token), or None."""
        from aiocoap import Code

        try:
            check_device_id(device_id)
        except DecodeError as e:
            self.count_refusal("bad_device_id", e.reason, request.remote.hostinfo)
            return self._respond(Code.BAD_REQUEST, f"{e.reason}: {e.detail}"[:200])
        remote = str(request.remote.hostinfo)
        token = _query_token(request)
        if token is not None and (wait := self.backoff.locked_for(device_id, remote)) > 0:
            self.count_refusal("locked", "device " + device_id, remote)
            return self._respond(
                Code.TOO_MANY_REQUESTS, "too many failed tokens", max_age=max(1, round(wait))
            )
        reason = self._own_data_reason(request, device_id)
        if reason is None:
            if token is not None:
                self.backoff.succeeded(device_id)
            return None
        if token is not None:
            self.backoff.failed(device_id, remote)  # a wrong token, as on telemetry
        if self.access is not None:
            self.access.auth_failed(device_id, "coap", remote, reason.replace("_", " "))
        self.count_refusal(reason, "device " + device_id, remote)
        return self._respond(Code.UNAUTHORIZED, reason)

    def may_observe_twin(self, request: Any, device_id: str) -> bool:
        """Whether an observation of ``device_id``'s twin may be accepted (if
        not, rendering the request gives the refusal)."""
        return self._twin_coap is not None and self._own_data_reason(request, device_id) is None

    async def render_twin(self, request: Any, device_id: str, view: str) -> Any:
        """``devices/{id}/twin[/desired|reported|delta]``: see :mod:`edgeway.twins.coap`."""
        from aiocoap import Code

        if self._twin_coap is None:
            return self._respond(Code.NOT_FOUND, "twins are not enabled on this gateway")
        refusal = self._own_data_refusal(request, device_id)
        if refusal is not None:
            return refusal
        return await self._twin_coap.render(request, device_id, view)

    def twin_observer_count(self, device_id: str) -> int:
        """Observations of any view of ``device_id``'s twin held now."""
        return 0 if self._twin_coap is None else self._twin_coap.observer_count(device_id)

    async def render_firmware(self, request: Any, device_id: str, image_id: str) -> Any:
        """``GET /devices/{id}/firmware/{image}``: one Block2 block of the image,
        read from disk, for a device whose update command for it is out."""
        from aiocoap import Code, Message
        from aiocoap.optiontypes import BlockOption

        if request.code != Code.GET:
            return self._respond(Code.METHOD_NOT_ALLOWED, "use GET (with Block2)")
        refusal = self._own_data_refusal(request, device_id)
        if refusal is not None:
            return refusal
        fw = self.firmware
        # The image id is looked up in the campaigns' targets before it names
        # a file: only ids the firmware service made get that far.
        info = None
        if fw is not None and fw.may_download(image_id, device_id):
            info = await self._image_info(fw, image_id)
        if fw is None or info is None:
            self.count_refusal(
                "firmware_not_targeted", "device " + device_id, request.remote.hostinfo
            )
            return self._respond(Code.NOT_FOUND, "no such image for this device")
        block2 = request.opt.block2
        szx = (
            FIRMWARE_BLOCK_SZX if block2 is None else min(block2.size_exponent, FIRMWARE_BLOCK_SZX)
        )
        number = 0 if block2 is None else block2.block_number
        size = 1 << (szx + 4)
        start = number * size
        if number and start >= info.size:
            text = f"block {number} of {size} bytes is past the end ({info.size} bytes)"
            self.count_refusal("bad_block", text, request.remote.hostinfo)
            return self._respond(Code.BAD_REQUEST, text)
        wanted = list(request.opt.if_match)
        if wanted and not any(v == info.etag or not v for v in wanted):
            self.count_refusal("firmware_etag", "device " + device_id, request.remote.hostinfo)
            return self._respond(
                Code.PRECONDITION_FAILED, "the image is not the one If-Match names", etag=info.etag
            )
        expected = min(size, info.size - start)
        try:
            data = _read_block(fw.path(image_id), start, size)
        except OSError as e:
            data, problem = b"", f"{type(e).__name__}: {e.strerror or e}"
        else:
            problem = f"{len(data)} bytes on disk, {expected} expected"
        if len(data) != expected:
            log.error("coap: firmware image %s cannot be served: %s", image_id, problem)
            return self._respond(Code.INTERNAL_SERVER_ERROR, "the image cannot be read")
        msg = Message(code=Code.CONTENT, payload=data)
        msg.opt.content_format = FIRMWARE_CONTENT_FORMAT
        msg.opt.etag = info.etag
        msg.opt.block2 = BlockOption.BlockwiseTuple(number, start + len(data) < info.size, szx)
        if number == 0 or request.opt.size2 is not None:
            msg.opt.size2 = info.size
        self.firmware_blocks += 1
        self.firmware_bytes += len(data)
        return msg

    async def _image_info(self, fw: FirmwareService, image_id: str) -> _ImageInfo | None:
        info = self._images.get(image_id)
        if info is None:
            image = await fw.image(image_id)
            if image is None:
                return None
            info = _ImageInfo(image.size, bytes.fromhex(image.sha256[:16]))
            if len(self._images) >= MAX_IMAGE_INFOS:
                self._images.pop(next(iter(self._images)))
            self._images[image_id] = info
        return info

    def observe_refusal(self, resource: str, client_ip: str) -> tuple[str, str] | None:
        """Why ``client_ip`` may not observe ``resource`` (a path such as
        ``devices/{id}/commands``) now, as ``(reason, text)``, or None. Reasons:
        ``observe_denied`` (4.03), ``observe_limit`` and
        ``observe_limit_per_address`` (5.03). Commands and twin observations
        share the limits."""
        cfg = self.config
        if cfg.observe == "deny" or not self._may_observe(client_ip):
            return "observe_denied", "observe is not allowed from this address"
        if (resource, client_ip) in self._observation_by_key:
            return None  # replaces the one it had: no new place taken
        if self._observation_count >= cfg.max_observations:
            return "observe_limit", f"{cfg.max_observations} observations held; retry later"
        if self._observations_by_address.get(client_ip, 0) >= cfg.max_observations_per_address:
            return (
                "observe_limit_per_address",
                f"{cfg.max_observations_per_address} observations held for this address",
            )
        return None

    def _may_observe(self, client_ip: str) -> bool:
        if not self._observe_networks:
            return True
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(ip in net for net in self._observe_networks if net.version == ip.version)

    def add_observer(self, device_id: str, observation: Any, client_ip: str) -> None:
        """Register an accepted observation of ``device_id``'s commands by ``client_ip``."""
        downlink = self._downlink
        assert downlink is not None
        self._hold_observation(
            f"devices/{device_id}/commands",
            observation,
            client_ip,
            lambda: downlink.observation_ended(device_id, observation),
        )
        downlink.observed(device_id, observation, client_ip)

    def add_twin_observer(
        self, device_id: str, view: str, request: Any, observation: Any, client_ip: str
    ) -> None:
        """Register an accepted observation of a view of ``device_id``'s twin."""
        assert self._twin_coap is not None
        ended = self._twin_coap.observed(device_id, view, request, observation)
        self._hold_observation(_twin_resource(device_id, view), observation, client_ip, ended)

    def _hold_observation(
        self, resource: str, observation: Any, client_ip: str, ended: Callable[[], None]
    ) -> None:
        """Count an accepted observation of ``resource`` by ``client_ip``
        against the limits until it ends (then ``ended`` is called).

        An address holds one observation per resource: a new one replaces the
        old, which ends at once with a last non-confirmable 5.03. A device that
        rebooted and observes again from a new port would otherwise leave its
        old observation behind (nothing tells the gateway that a client is
        gone until a confirmable notification goes unacknowledged, and none
        is sent while no command is pushed), and after a few reboots the
        per-address limit would lock it out."""
        from aiocoap import Code, Message, Unreliable

        key = (resource, client_ip)
        old = self._observation_by_key.get(key)
        if old is not None:
            old.trigger(
                Message(
                    # Non-confirmable: no retransmission state is kept for a
                    # client that is likely gone.
                    transport_tuning=Unreliable,
                    code=Code.SERVICE_UNAVAILABLE,
                    payload=b"replaced by a newer observation from this address",
                ),
                is_last=True,
            )
        self._observation_by_key[key] = observation
        self._observation_count += 1
        by_address = self._observations_by_address
        by_address[client_ip] = by_address.get(client_ip, 0) + 1

        def _cancel() -> None:
            ended()
            if self._observation_by_key.get(key) is observation:
                del self._observation_by_key[key]
            self._observation_count -= 1
            left = by_address.get(client_ip, 1) - 1
            if left:
                by_address[client_ip] = left
            else:
                by_address.pop(client_ip, None)

        observation.accept(_cancel)


@functools.cache
def _devices_resource_class() -> Any:
    """Build the ``devices/`` resource class on first use (aiocoap is imported lazily)."""
    from aiocoap import Code, error, interfaces, resource

    class TooLarge(error.RequestEntityTooLarge):  # type: ignore[misc]
        def __init__(self, limit: int) -> None:
            super().__init__(f"body larger than {limit} bytes")
            self.limit = limit

        def to_message(self) -> Any:
            msg = super().to_message()
            msg.opt.size1 = self.limit
            return msg

    class ObserveLimit(error.ServiceUnavailable):  # type: ignore[misc]
        def __init__(self, text: str, max_age: int) -> None:
            super().__init__(text)
            self.max_age = max_age

        def to_message(self) -> Any:
            msg = super().to_message()
            msg.opt.max_age = self.max_age
            return msg

    class DevicesResource(interfaces.ObservableResource, resource.PathCapable):  # type: ignore[misc]
        """The root resource: ``devices/{device_id}/`` ``telemetry``, ``commands``,
        ``twin[/...]`` and ``firmware/{image}``."""

        def __init__(self, adapter: CoapAdapter) -> None:
            super().__init__()
            self.adapter = adapter

        @staticmethod
        def _split(request: Any) -> _Target | None:
            return _Target.of(request.opt.uri_path)

        async def needs_blockwise_assembly(self, request: Any) -> bool:
            where = self._split(request)
            if where is not None and where.kind == "commands":
                # Command bodies go out block by block from the downlink's
                # own transfer (aiocoap's Block2 cache cannot say when the
                # last block went out, which is when a command is delivered).
                return False
            if (
                where is not None
                and request.code == Code.GET
                and where.kind in ("twin", "firmware")
            ):
                # Each block is rendered on its own (from the store, from
                # the image on disk): nothing is cached between blocks.
                return False
            if self.adapter.exceeds_limit(request):
                raise TooLarge(self.adapter.config.max_body_size)
            return True

        async def render(self, request: Any) -> Any:
            where = self._split(request)
            if where is None:
                raise error.NotFound()
            if where.kind == "telemetry":
                return await self.adapter.render_telemetry(request, where.device_id)
            if where.kind == "result":
                return self.adapter.render_result(request, where.device_id, where.item)
            if where.kind == "twin":
                return await self.adapter.render_twin(request, where.device_id, where.item)
            if where.kind == "firmware":
                return await self.adapter.render_firmware(request, where.device_id, where.item)
            return await self.adapter.render_commands(request, where.device_id)

        async def add_observation(self, request: Any, serverobservation: Any) -> None:
            where = self._split(request)
            adapter = self.adapter
            if where is None or not self._observable(request):
                return
            if where.kind == "commands" and not adapter.commands_enabled:
                return  # answered by render (4.04 when commands are off)
            if where.kind == "twin" and not adapter.may_observe_twin(request, where.device_id):
                return  # answered by render (4.04 without twins, 4.01 without the token)
            client_ip = _client_ip(request.remote)
            resource = "/".join(request.opt.uri_path)
            refusal = adapter.observe_refusal(resource, client_ip)
            if refusal is not None:
                # Raised before aiocoap renders anything: the answer to the
                # GET is this error, without an Observe option.
                reason, text = refusal
                adapter.count_refusal(reason, text, request.remote.hostinfo)
                if reason == "observe_denied":
                    raise error.Forbidden(text)
                raise ObserveLimit(text, max(1, round(adapter.config.retry_after)))
            if where.kind == "twin":
                adapter.add_twin_observer(
                    where.device_id, where.item, request, serverobservation, client_ip
                )
            else:
                adapter.add_observer(where.device_id, serverobservation, client_ip)

        async def render_to_pipe(self, pipe: Any) -> None:
            request = pipe.request
            where = self._split(request)
            # If-Match is acted on where it means something: a reported patch
            # and a firmware block (elsewhere it stays refused, 4.02).
            if_match = where is not None and (
                where.kind == "firmware" or (where.kind == "twin" and where.item == "reported")
            )
            refusal = self.adapter.refuse_options(request, if_match=if_match)
            if refusal is not None:
                pipe.add_response(refusal, is_last=True)
                return
            if request.opt.observe is not None and not self._observable(request):
                # Observe means nothing on other requests (RFC 7641 2); left in,
                # aiocoap 0.4.17 renders the answer and then raises on an
                # observation nobody accepted (a traceback per request).
                request.opt.observe = None
            await interfaces.ObservableResource._render_to_pipe(self, pipe)

        def _observable(self, request: Any) -> bool:
            where = self._split(request)
            return (
                where is not None
                and where.kind in ("commands", "twin")
                and request.code == Code.GET
            )

    return DevicesResource


class _Target(NamedTuple):
    """What a request's path names."""

    device_id: str
    kind: str
    """``telemetry``, ``commands``, ``result``, ``twin`` or ``firmware``."""
    item: str = ""
    """The command id (``result``), the view (``twin``: ``twin``, ``desired``,
    ``reported``, ``delta``) or the image id (``firmware``)."""

    @classmethod
    def of(cls, path: Sequence[str]) -> _Target | None:
        if len(path) < 3 or path[0] != "devices":
            return None
        if len(path) == 3 and path[2] in ("telemetry", "commands"):
            return cls(path[1], path[2])
        if len(path) == 3 and path[2] == "twin":
            return cls(path[1], "twin", "twin")
        if len(path) == 4 and path[2] == "twin" and path[3] in TWIN_VIEWS[1:]:
            return cls(path[1], "twin", path[3])
        if len(path) == 4 and path[2] == "firmware" and path[3]:
            return cls(path[1], "firmware", path[3])
        if (
            len(path) == 5
            and path[0] == "devices"
            and path[2] == "commands"
            and path[4] == "result"
        ):
            return cls(path[1], "result", path[3])
        return None


class _TransportWatch(Protocol):
    """What the listener's transport tells the adapter."""

    def answer_undecodable(self, data: bytes, address: object, exc: Exception) -> bytes | None: ...

    def message_sent(self, message: Any, data: bytes) -> None: ...

    def empty_received(self, sockaddr: Any, mid: int, *, reset: bool) -> None: ...


def _plain_task_names(ctx: Any) -> None:
    """``ctx`` (an aiocoap server Context) naming each request's rendering
    task with a constant instead of ``"Rendering for %r" % request``: that
    ``repr`` of every request (its options, payload preview, remote) was
    about 11 % of the listener's CPU per request (profile of
    bench/coap_flood.py), for a name nobody reads. Otherwise as aiocoap 0.4
    does it (errors turned into an answer, the pipe driven by a task); left
    alone when the installed aiocoap has other internals."""
    try:
        from aiocoap.pipe import error_to_message, run_driving_pipe
    except ImportError:  # pragma: no cover - another aiocoap layout
        return
    render = getattr(ctx, "_render_to_pipe", None)
    if render is None:  # pragma: no cover
        return

    def render_to_pipe(pipe: Any) -> None:
        run_driving_pipe(error_to_message(pipe, ctx.log), render(pipe), name="coap request")

    ctx.render_to_pipe = render_to_pipe


def _bounded_duplicates(mman: Any, cache: DuplicateCache) -> Any:
    """``mman`` (aiocoap's message manager of the listener), detecting
    duplicate requests with ``cache`` instead of its own table.

    aiocoap remembers every request's (remote, message id), with one
    ``call_later`` timer each and the response ``Message`` it sent, for
    EXCHANGE_LIFETIME (247 s) and without a cap: about 2.7 KB per confirmable
    request, so a flood from many (forged) addresses grew the gateway without
    bound. Here :class:`~edgeway.south.coap_dedup.DuplicateCache` keeps the
    answer's encoded bytes (the transport hands them over as it sends them,
    :meth:`CoapAdapter.message_sent`), capped by entries, bytes and per
    sender; a retransmission is answered with those bytes straight from the
    socket, and one whose entry was forgotten early is processed again.

    Nothing is kept at all for GETs of firmware blocks and plain GETs
    (without Observe) of twin documents. For a firmware download aiocoap
    kept one 1 KiB response (about 5 KB with its message object) per block:
    50 devices downloading 512 KiB each held 137 MB more than idle
    (bench/coap_device_data.py). RFC 7252 4.5 lets a server treat a duplicate
    of an idempotent request as a new one when answering is cheaper than
    keeping state; a block GET is idempotent and answering it is one read of
    1 KiB, so a retransmitted block request is answered again from disk. The
    same for a twin GET (one read of the store), but not for one with
    Observe: a registration seen twice would replace itself."""
    from aiocoap import CON, Code

    def deduplicate(message: Any) -> bool:
        remember = True
        if message.code == Code.GET:
            where = _Target.of(message.opt.uri_path)
            remember = where is None or not (
                where.kind == "firmware" or (where.kind == "twin" and message.opt.observe is None)
            )
        sockaddr = message.remote.sockaddr
        seen = cache.arrived(
            sockaddr[0], sockaddr[1], message.mid, time.monotonic(), remember=remember
        )
        if seen is Seen.NEW:
            return False
        if isinstance(seen, bytes) and message.mtype is CON:
            mman.message_interface.send_datagram(seen, message.remote)
        return True

    mman._deduplicate_message = deduplicate
    # Answers reach the cache from the transport, encoded (message_sent).
    mman._store_response_for_duplicates = lambda message: None
    return mman


def _guarded_udp6(watch: _TransportWatch) -> Any:
    """aiocoap's udp6 transport, answering datagrams it cannot decode, and
    telling ``watch`` what it sends and which empty ACKs/RSTs arrive.

    aiocoap 0.4.17 turns only its own ``UnparsableMessage`` into a dropped
    datagram; a string option that is not UTF-8 raises ``UnicodeDecodeError``
    out of the transport's read callback, which the event loop logs with a
    traceback, per datagram, and nothing is answered. Here such a datagram gets
    ``answer``'s bytes (a 4.02 to a confirmable request) and no traceback.

    The socket's ICMP error reporting is turned off as soon as the transport
    has it, before its first read (see :func:`_ignore_icmp_errors`).

    aiocoap confirms nothing to a resource: it retransmits a confirmable
    notification until the peer's ACK and ends the observation when none
    comes, but says nothing when the ACK does come. A command is DELIVERED on
    that ACK, so the transport reports the message id of each message it
    sends and of each empty ACK/RST it receives (read from the 4-byte header,
    :func:`~edgeway.south.coap_guard.empty_message_id`).
    """
    from aiocoap.transports.udp6 import MessageInterfaceUDP6

    class GuardedUDP6(MessageInterfaceUDP6):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            # Called before the transport starts reading (both are scheduled,
            # in this order, when the endpoint is created).
            sock = transport.get_extra_info("socket")
            if isinstance(sock, socket.socket):
                _ignore_icmp_errors(sock)
            super().connection_made(transport)

        def send(self, message: Any) -> None:
            # aiocoap's send, encoding once: the bytes also go to the
            # duplicate cache (watch.message_sent).
            data = message.encode()
            self.send_datagram(data, message.remote)
            watch.message_sent(message, data)

        def send_datagram(self, data: bytes, remote: Any) -> None:
            """Send ``data`` to ``remote`` (an aiocoap UDP6 address), from the
            local address its request came to, as aiocoap does."""
            ancdata = []
            if remote.pktinfo is not None:
                ancdata.append((socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, remote.pktinfo))
            # Which remote a send error (error_received) belongs to.
            self._remote_being_sent_to.set(remote)
            try:
                self.transport.sendmsg(data, ancdata, 0, remote.sockaddr)
            finally:
                self._remote_being_sent_to.set(None)

        def datagram_msg_received(
            self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, address: Any
        ) -> None:
            empty = empty_message_id(data)
            if empty is not None:
                watch.empty_received(address, empty.mid, reset=empty.reset)
            try:
                super().datagram_msg_received(data, ancdata, flags, address)
            except Exception as e:
                # Decoding failed (or dispatching did, which aiocoap has logged
                # already): re-raising would only add the event loop's traceback.
                reply = watch.answer_undecodable(data, address, e)
                if reply is not None:
                    # Answer from the address the request came to, as aiocoap does.
                    pktinfo = [
                        (level, kind, value)
                        for level, kind, value in ancdata
                        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO
                    ]
                    self.transport.sendmsg(reply, pktinfo, 0, address)

    return GuardedUDP6


_IF_MATCH_HANDLED = frozenset({IF_MATCH})


def _twin_resource(device_id: str, view: str) -> str:
    """The path of a twin view (as the Uri-Path options joined by ``/``)."""
    return f"devices/{device_id}/twin" + ("" if view == "twin" else f"/{view}")


class _ImageInfo(NamedTuple):
    """What every block of an image's download needs (images do not change)."""

    size: int
    etag: bytes


MAX_IMAGE_INFOS = 64
"""Images whose size and ETag the listener remembers (a campaign's image is
asked for once per block by every device of the campaign)."""

FIRMWARE_CONTENT_FORMAT = 42
"""application/octet-stream."""
FIRMWARE_BLOCK_SZX = 6
"""The largest block served: 2 ** (6 + 4) = 1024 bytes (RFC 7959 2.2); a
device asks for smaller blocks with the Block2 size of its requests."""


def _read_block(path: Path, start: int, size: int) -> bytes:
    """``size`` bytes of the file at ``start`` (fewer at its end).

    Read on the event loop: one block (at most 1 KiB) from a file that every
    device of a campaign reads, so from the page cache; a hop to a thread
    would cost more than the read."""
    with path.open("rb") as f:
        f.seek(start)
        return f.read(size)


TOKEN_QUERY = "token="


def _query_token(request: Any) -> str | None:
    """The ``token=...`` Uri-Query of a request (the first), or None."""
    for q in request.opt.uri_query:
        if q.startswith(TOKEN_QUERY):
            return str(q[len(TOKEN_QUERY) :])
    return None


def _host_port(address: Any) -> str:
    """``host:port`` of a socket address, IPv4-mapped IPv6 shown as IPv4."""
    try:
        host, port = str(address[0]), int(address[1])
    except (TypeError, ValueError, IndexError):
        return str(address)
    host = _unmapped(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _client_ip(remote: Any) -> str:
    """The client's IP address of an aiocoap remote, IPv4-mapped shown as IPv4."""
    try:
        host = str(remote.sockaddr[0])
    except (AttributeError, IndexError, TypeError):
        host = str(getattr(remote, "hostinfo", remote)).rsplit(":", 1)[0].strip("[]")
    return _unmapped(host)


def _unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) as IPv4; others as they are."""
    return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host
