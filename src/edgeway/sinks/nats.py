"""NATS JetStream sink: publish every record and wait for its JetStream ack.

Config example::

    sinks:
      - name: stream
        url: nats://user:secret@nats.example.com:4222   # several: nats://a:4222,nats://b:4222
        options:
          subject: "edgeway.{gateway_id}.{device_id}"     # the default
          stream: EDGEWAY            # expected stream (Nats-Expected-Stream header)
          create_stream: true        # create it if missing, for the subjects above
          duplicate_window: 10m      # JetStream de-duplication window of a created stream
          ca: /etc/edgeway/nats-ca.pem   # TLS (also cert/key for mutual TLS)

What it does:

- One message per record: subject from the template (placeholders
  ``gateway_id``, ``device_id``, ``sink``), body ``Record.to_json_obj()`` as
  JSON, header ``Nats-Msg-Id`` = the record id. JetStream drops a message
  whose id it has seen within the stream's duplicate window, so a batch sent
  again after a lost ack is stored once.
- The publishes of a batch are pipelined (``publish_async``) and
  :meth:`NatsSink.send_batch` returns when every PubAck has arrived; a
  JetStream error for any message fails the batch.
- A device id is one subject token: ``.``, ``*``, ``>`` and whitespace in it
  become ``_`` so that it cannot add tokens or wildcards.
- The sink owns reconnection: nats-py's own reconnect loop is off, a lost
  connection fails the batch in flight (:class:`RetryableSinkError`) and the
  next ``send_batch`` connects again. nats-py would otherwise buffer
  publishes in memory while reconnecting, which the outbox already does on
  disk.

nats-py is imported when the sink starts, so the gateway runs without the
``sinks`` extra unless a ``nats://`` sink is configured.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ConfigDict, Field

from edgeway.config_types import Duration
from edgeway.extras import OptionalLibrary
from edgeway.sinks.base import (
    BatchOptions,
    PermanentSinkError,
    Record,
    RetryableSinkError,
    Sink,
    SinkOptionsError,
    client_ssl_context,
    close_bounded,
    register_sink,
    url_address,
)
from edgeway.sinks.config import SinkConfig

if TYPE_CHECKING:
    from edgeway.commands.service import CommandService
    from edgeway.sinks.base import CommandSource

logger = logging.getLogger(__name__)

_TOKEN_UNSAFE = re.compile(r"[.*>\s]")
# Subjects are cached per device (formatting per record costs more than the
# publish); capped so churning device ids cannot grow it without bound.
_SUBJECT_CACHE_MAX = 100_000


class NatsSinkOptions(BatchOptions):
    """The ``options`` of a ``nats://`` sink."""

    model_config = ConfigDict(extra="forbid")

    subject: str = "edgeway.{gateway_id}.{device_id}"
    """Template with ``{gateway_id}``, ``{device_id}``, ``{sink}``."""
    stream: str | None = Field(default=None, pattern=r"^[^.*>\s/\\]+$")
    """The stream the subjects belong to. Sent as ``Nats-Expected-Stream`` so a
    subject captured by another stream fails instead of landing there."""
    create_stream: bool = False
    """Create ``stream`` (required then) for the template's subjects if missing."""
    duplicate_window: Duration = 120.0
    """De-duplication window of a stream we create (JetStream's default, 2 min)."""
    connect_timeout: Duration = 5.0
    """Longest wait for a connection; then the batch is retried with backoff."""
    ack_timeout: Duration = 30.0
    """A batch whose acks have not all arrived after this long fails: a server
    that stopped answering must not hang the sink."""
    ca: Path | None = None
    """CA bundle that signed the server's certificate (``tls://`` servers)."""
    cert: Path | None = None
    """Client certificate (PEM) for servers that verify clients."""
    key: Path | None = None
    """Private key of ``cert`` (PEM)."""
    credentials: Path | None = None
    """A NATS ``.creds`` file (JWT and NKey seed)."""
    commands_subject: str | None = None
    """Take commands for devices from the cloud on this subject (placeholder
    ``{gateway_id}``, e.g. ``edgeway-commands.{gateway_id}``); absent: off. A
    request (see docs/commands.md) is answered once the command is on disk.
    It must not be one of the record subjects (``subject`` with any device)."""


@register_sink
class NatsSink(Sink):
    """Publishes records to NATS JetStream with acks (see the module docstring).

    The sink keeps ``state.connected`` current; the runner records successes,
    errors and batch latency in ``state``.
    """

    schemes = ("nats",)
    options_model = NatsSinkOptions
    options: NatsSinkOptions
    library = OptionalLibrary("nats", "nats-py", "sinks")

    def __init__(self, config: SinkConfig, gateway_id: str) -> None:
        super().__init__(config, gateway_id)
        opts = self.options
        self.servers = [s.strip() for s in config.url.split(",") if s.strip()]
        for s in self.servers:
            u = urllib.parse.urlsplit(s if "://" in s else f"nats://{s}")
            if u.scheme not in ("nats", "tls") or not u.hostname:
                raise SinkOptionsError.at("url", f"bad NATS server {s!r}")
            try:
                u.port  # noqa: B018 - validates the port
            except ValueError:
                raise SinkOptionsError.at("url", f"bad port in {s!r}") from None
        try:
            opts.subject.format(gateway_id="g", device_id="d", sink="s")
        except (KeyError, IndexError, ValueError) as e:
            raise SinkOptionsError.at(
                "options.subject",
                f"bad template {opts.subject!r} (placeholders: gateway_id, device_id, sink): {e}",
            ) from None
        if opts.commands_subject is not None:
            try:
                self.commands_subject: str | None = opts.commands_subject.format(
                    gateway_id=_TOKEN_UNSAFE.sub("_", gateway_id)
                )
            except (KeyError, IndexError, ValueError) as e:
                raise SinkOptionsError.at(
                    "options.commands_subject",
                    f"bad template {opts.commands_subject!r} (placeholder: gateway_id): {e}",
                ) from None
            if any(_subject_matches(p, self.commands_subject) for p in self.stream_subjects()):
                raise SinkOptionsError.at(
                    "options.commands_subject",
                    f"{self.commands_subject!r} is one of the record subjects "
                    f"({self.stream_subjects()[0]}): a stream capturing records would answer "
                    "command requests, and a device could publish on it",
                )
        else:
            self.commands_subject = None
        if opts.create_stream and opts.stream is None:
            raise SinkOptionsError.at("options.stream", "create_stream needs a stream")
        self.tls = self._make_ssl_context(opts)
        self._subjects: dict[str, str] = {}
        self._nc: Any = None
        self._js: Any = None
        self._pending: list[asyncio.Future[Any]] = []
        self._lock = asyncio.Lock()

    def _make_ssl_context(self, opts: NatsSinkOptions) -> ssl.SSLContext | None:
        if opts.ca is None and opts.cert is None and opts.key is None:
            return None
        return client_ssl_context(opts.ca, opts.cert, opts.key)

    def subject_for(self, device_id: str) -> str:
        """The subject a record of ``device_id`` is published on."""
        s = self._subjects.get(device_id)
        if s is None:
            if len(self._subjects) >= _SUBJECT_CACHE_MAX:
                self._subjects.clear()
            s = self.options.subject.format(
                gateway_id=_TOKEN_UNSAFE.sub("_", self.gateway_id),
                device_id=_TOKEN_UNSAFE.sub("_", device_id) or "_",
                sink=self.name,
            )
            self._subjects[device_id] = s
        return s

    def stream_subjects(self) -> list[str]:
        """The subjects a created stream captures: the template with ``*`` per device."""
        return [
            self.options.subject.format(
                gateway_id=_TOKEN_UNSAFE.sub("_", self.gateway_id), device_id="*", sink=self.name
            )
        ]

    # -- connection -------------------------------------------------------

    async def _connect(self) -> None:
        import nats  # lazy: optional dependency (the "sinks" extra)
        from nats.js.api import StreamConfig
        from nats.js.errors import NotFoundError

        async def on_lost(*_args: Any) -> None:
            self.state.connected = False
            err = RetryableSinkError("connection to NATS lost")
            for f in self._pending:
                if not f.done():
                    f.set_exception(err)

        async def on_error(e: Exception) -> None:
            logger.debug("sink %s: nats error: %s", self.name, e)

        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            kwargs["tls"] = self.tls
        if self.options.credentials is not None:
            kwargs["user_credentials"] = str(self.options.credentials)
        # With reconnects off, nats-py still loops over the server list on the
        # first connect until each server failed max_reconnect_attempts + 1
        # times (forever when 0), sleeping reconnect_time_wait in between:
        # 1 and 0.1 s make that two quick tries per server.
        nc = await nats.connect(
            servers=self.servers,
            name=f"edgeway-{self.gateway_id}-{self.name}",
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            connect_timeout=max(1, round(self.options.connect_timeout)),
            disconnected_cb=on_lost,
            closed_cb=on_lost,
            error_cb=on_error,
            **kwargs,
        )
        try:
            js = nc.jetstream(timeout=self.options.ack_timeout)
            stream = self.options.stream
            if self.options.create_stream and stream is not None:
                try:
                    await js.stream_info(stream)
                except NotFoundError:
                    await js.add_stream(
                        StreamConfig(
                            name=stream,
                            subjects=self.stream_subjects(),
                            duplicate_window=self.options.duplicate_window,
                        )
                    )
                    logger.info(
                        "sink %s: created JetStream stream %s for %s",
                        self.name,
                        stream,
                        self.stream_subjects(),
                    )
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js
        url = nc.connected_url
        logger.info("sink %s: connected to %s", self.name, url.netloc if url else self.servers)

    async def _ensure_connected(self) -> Any:
        nc = self._nc
        if nc is not None and nc.is_connected:
            return self._js
        await self._drop()
        try:
            async with asyncio.timeout(self.options.connect_timeout * 2 + 1):
                await self._connect()
        except Exception as e:
            raise RetryableSinkError(f"cannot connect to NATS {self.servers}: {e}") from e
        return self._js

    async def _drop(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            await close_bounded(nc.close(), f"sink {self.name}")

    # -- Sink -------------------------------------------------------------

    async def send_batch(self, records: Sequence[Record]) -> None:
        """Publish ``records``; return once JetStream acknowledged every one."""
        if not records:
            return
        from nats.errors import MaxPayloadError

        headers_stream = self.options.stream
        try:
            async with self._lock:
                js = await self._ensure_connected()
                self.state.connected = True
                pending = self._pending = []
                try:
                    async with asyncio.timeout(self.options.ack_timeout):
                        for r in records:
                            pending.append(
                                await js.publish_async(
                                    self.subject_for(r.device_id),
                                    r.to_json_bytes(),
                                    stream=headers_stream,
                                    headers={"Nats-Msg-Id": r.id},
                                )
                            )
                        results = await asyncio.gather(*pending, return_exceptions=True)
                except TimeoutError:
                    await self._drop()
                    raise RetryableSinkError(
                        f"JetStream acks missing after {self.options.ack_timeout}s; reconnecting"
                    ) from None
                except MaxPayloadError as e:
                    raise PermanentSinkError(f"record larger than the server allows: {e}") from e
                except RetryableSinkError:
                    await self._drop()
                    raise
                except Exception as e:  # connection closed under the publish
                    await self._drop()
                    raise RetryableSinkError(f"publish failed: {e!r}") from e
                finally:
                    for f in pending:
                        if not f.done():
                            f.cancel()
                    self._pending = []
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    if not (self._nc is not None and self._nc.is_connected):
                        await self._drop()
                    if isinstance(errors[0], RetryableSinkError):  # connection lost
                        raise errors[0]
                    raise RetryableSinkError(
                        f"JetStream refused {len(errors)} of {len(records)} messages: {errors[0]!r}"
                    )
        except BaseException:
            if self._nc is None:
                self.state.connected = False
            raise

    def command_source(self, service: CommandService) -> CommandSource | None:
        """Commands from the cloud on ``commands_subject`` (NATS request/reply)."""
        if self.commands_subject is None:
            return None
        return NatsCommandSource(self, self.commands_subject, service)

    def connect_options(self) -> dict[str, Any]:
        """TLS and credentials for a connection of this sink's."""
        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            kwargs["tls"] = self.tls
        if self.options.credentials is not None:
            kwargs["user_credentials"] = str(self.options.credentials)
        return kwargs

    def probe_addresses(self) -> list[tuple[str, int]]:
        out = []
        for s in self.servers:
            addr = url_address(s if "://" in s else f"nats://{s}", 4222)
            if addr is not None:
                out.append(addr)
        return out

    async def close(self) -> None:
        """Close the connection (published messages are already acked)."""
        await self._drop()
        self.state.connected = False


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest."""
    pt, st = pattern.split("."), subject.split(".")
    for i, p in enumerate(pt):
        if p == ">":
            return len(st) > i
        if i >= len(st) or (p != "*" and p != st[i]):
            return False
    return len(pt) == len(st)


class NatsCommandSource:
    """Takes cloud command requests on a NATS subject and answers each once
    its command is on disk (see :mod:`edgeway.commands.cloud`).

    Its own connection, apart from the sink's publishing one (which connects
    only while there is something to send): kept open with nats-py's
    reconnects, subscribed in a queue group named after the gateway so that
    several processes of one gateway id share the requests. A request whose
    command could not be stored gets no answer: the cloud's request times out
    and it sends it again (the idempotency key makes that safe).
    """

    def __init__(self, sink: NatsSink, subject: str, service: CommandService) -> None:
        self.sink = sink
        self.subject = subject
        self.service = service
        self.name = f"{sink.name}:commands"
        self.connected = False
        self.requests = 0

    async def run(self) -> None:
        import nats

        from edgeway.south.base import Backoff

        backoff = Backoff(initial=0.5, maximum=30.0)
        source = f"cloud:{self.sink.name}"
        while True:
            try:
                nc = await nats.connect(
                    servers=self.sink.servers,
                    name=f"edgeway-{self.sink.gateway_id}-{self.sink.name}-commands",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=max(1, round(self.sink.options.connect_timeout)),
                    **self.sink.connect_options(),
                )
            except Exception as e:
                logger.warning("sink %s: commands: cannot connect: %s", self.sink.name, e)
                await backoff.wait()
                continue
            backoff.reset()

            async def handle(msg: Any) -> None:
                from edgeway.commands.cloud import accept

                self.requests += 1
                try:
                    answer = await accept(self.service, msg.data, source)
                except Exception as e:
                    logger.warning("sink %s: command not stored: %s", self.sink.name, e)
                    return  # no answer: the cloud retries
                if msg.reply:
                    await msg.respond(orjson.dumps(answer))

            try:
                await nc.subscribe(self.subject, queue=f"edgeway-{self.sink.gateway_id}", cb=handle)
                self.connected = True
                logger.info(
                    "sink %s: taking commands on NATS subject %s", self.sink.name, self.subject
                )
                await asyncio.Future()  # until cancelled; nats-py reconnects meanwhile
            finally:
                self.connected = False
                await close_bounded(nc.close(), f"sink {self.sink.name} commands")
