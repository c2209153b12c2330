"""The sink interface: how stored records leave the gateway.

A sink sends batches of :class:`Record` to one remote system and returns only
when that system has *confirmed* them (HTTP 2xx, MQTT PUBACK, JetStream ack,
AMQP publisher confirm, a committed SQL transaction, a flushed file). The
runner that drives a sink (``edgeway.outbox``) advances that sink's cursor only
after :meth:`Sink.send_batch` returns; an exception leaves the cursor where it
was, so the batch is sent again, with the same record ids.

Errors tell the runner what to do:

- :class:`RetryableSinkError` (or any other exception): back off and retry the
  same batch, forever; ``retry_after`` (seconds) overrides the backoff once
  (HTTP ``Retry-After``).
- :class:`PermanentSinkError`: the remote side refused this batch for good
  (HTTP 4xx other than 408/429): move it to the dead-letter table, go on.

Sinks register themselves for URL schemes with :func:`register_sink`; the
scheme of ``SinkConfig.url`` picks the class.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import difflib
import importlib
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeway.config import known_keys, unknown_key
from edgeway.config_types import Duration, Size
from edgeway.extras import OptionalLibrary
from edgeway.reading import MetricValue
from edgeway.runtime.component import HEALTHY, Health, counter, gauge
from edgeway.sinks.config import SinkConfig

if TYPE_CHECKING:
    from edgeway.commands.service import CommandService


@dataclass(slots=True)
class Record:
    """A reading as stored in the outbox, with its stable id.

    Treat it as immutable. Not ``frozen``: a frozen dataclass's ``__init__``
    costs about three times as much, and one is built for every row a sink
    reads (the same choice as :class:`~edgeway.reading.Reading`).

    ``id`` is ``"{gateway_id}:{seq}"`` (or, for a reading of an identified
    MQTT client-mode message, a UUID hashed from the message:
    :mod:`edgeway.record_ids`): the same on every retry and after any
    restart, so a cloud can drop duplicates. ``seq`` is always the outbox's.
    """

    id: str
    seq: int
    device_id: str
    ts: float
    metrics: dict[str, MetricValue]
    tags: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    json: bytes | None = field(default=None, compare=False, repr=False)
    """The record's JSON object as stored by the outbox: exactly
    ``orjson.dumps(self.to_json_obj())``, so a sink sends it as it is
    (:meth:`to_json_bytes`). None for a record built elsewhere."""

    def to_json_bytes(self) -> bytes:
        """``orjson.dumps(self.to_json_obj())``, without the work when the
        outbox already has the text."""
        j = self.json
        return j if j is not None else orjson.dumps(self.to_json_obj())

    if not TYPE_CHECKING:  # keeps mypy checking attribute names on Record

        def __getattr__(self, name: str) -> Any:
            # Reached only for an unset slot: ts, metrics and tags of a record
            # that stored_records() built without parsing its text.
            if name in _LAZY_FIELDS:
                d = orjson.loads(self.json)
                self.ts = d["ts"]
                self.metrics = d["metrics"]
                self.tags = d.get("tags") or {}
                return getattr(self, name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_json_obj(self) -> dict[str, Any]:
        """The record as it appears in every JSON body a sink sends."""
        return record_json_obj(
            self.id, self.device_id, self.ts, self.metrics, self.tags, self.priority
        )


_LAZY_FIELDS = frozenset(("ts", "metrics", "tags"))
_HEAD = re.compile(rb'\{"id":"([^"\\]*)","device_id":"([^"\\]*)"')
"""The start of every stored text (see :func:`record_json_obj`), when neither
string holds an escape."""


def stored_records(
    seqs: Sequence[int], priorities: Sequence[int], texts: Sequence[bytes]
) -> list[Record]:
    """Records for the outbox's stored texts, parsed only as far as sinks need.

    Most sinks send the stored text as it is and look at a record's id and
    device id only (topic, routing key, idempotency key); parsing every text
    and building full records cost the reader ~2 us per record, half of a
    read. So id and device id are cut out of the text with one regular
    expression match, and ``ts``, ``metrics`` and ``tags`` are parsed from it
    on first use. A text with an escape in those two strings is parsed whole.
    """
    new = object.__new__
    head = _HEAD.match
    out: list[Record] = []
    append = out.append
    for seq, prio, text in zip(seqs, priorities, texts, strict=True):
        m = head(text)
        if m is not None:
            rid, dev = m.groups()
            r = new(Record)
            r.id = rid.decode()
            r.seq = seq
            r.device_id = dev.decode()
            r.priority = prio
            r.json = text
        else:
            d = orjson.loads(text)
            r = Record(
                d["id"], seq, d["device_id"], d["ts"], d["metrics"], d.get("tags") or {}, prio, text
            )
        append(r)
    return out


def known_records(
    seqs: Sequence[int],
    priorities: Sequence[int],
    texts: Sequence[bytes],
    devices: Sequence[str],
    prefix: str,
) -> list[Record]:
    """:func:`stored_records` for texts whose device ids are known and whose
    record ids are ``prefix + str(seq)`` (the outbox's in-memory tail keeps
    both for the records it just stored): the same records, without cutting
    the two strings out of each text (0.55 -> 0.2 us per record)."""
    new = object.__new__
    out: list[Record] = []
    append = out.append
    for seq, prio, text, dev in zip(seqs, priorities, texts, devices, strict=True):
        r = new(Record)
        r.id = prefix + str(seq)
        r.seq = seq
        r.device_id = dev
        r.priority = prio
        r.json = text
        append(r)
    return out


def record_json_obj(
    record_id: str,
    device_id: str,
    ts: float,
    metrics: dict[str, Any],
    tags: dict[str, str] | None,
    priority: int,
) -> dict[str, Any]:
    """A record's JSON object: ``tags`` and ``priority`` only when set."""
    obj: dict[str, Any] = {"id": record_id, "device_id": device_id, "ts": ts, "metrics": metrics}
    if tags:
        obj["tags"] = tags
    if priority:
        obj["priority"] = priority
    return obj


class SinkError(Exception):
    """Base class of errors a sink raises from ``send_batch``."""


class RetryableSinkError(SinkError):
    """Send again later; ``retry_after`` seconds if the remote side said so."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """The remote side refused this batch for good: dead-letter it."""


@dataclass(slots=True)
class SinkState:
    """What a sink reports about itself (admin API, metrics, ``edgeway stats``)."""

    connected: bool = field(
        default=False, metadata=gauge("sink_connected", "1 when the sink's last send worked")
    )
    last_error: str | None = None
    last_error_at: float | None = None
    last_success_at: float | None = None
    last_batch_latency: float | None = field(
        default=None, metadata=gauge("sink_batch_latency_seconds", "Last batch latency")
    )
    batches_sent: int = 0
    records_sent: int = field(
        default=0, metadata=counter("sink_records_sent", "Records confirmed by the remote side")
    )

    def record_success(self, n_records: int, latency: float) -> None:
        self.connected = True
        self.last_success_at = time.time()
        self.last_batch_latency = latency
        self.batches_sent += 1
        self.records_sent += n_records

    def record_error(self, error: BaseException) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        self.last_error_at = time.time()


class BatchOptions(BaseModel):
    """The batching options every sink type accepts; a sink's options model
    subclasses this (and may change the defaults)."""

    # Attribute docstrings become descriptions: docs/config-reference.md shows them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_records: int = Field(default=500, ge=1, le=100_000)
    """Records per batch. 100,000 caps the memory of one batch (~10 MB of JSON)."""
    max_bytes: Size = Field(default=1024 * 1024, ge=1024)
    """About the encoded size of a batch."""
    max_wait: Duration = 0.0
    """Wait this long for a batch to fill (0: send what is there; batches grow
    by themselves while the previous one is in flight)."""


_O = TypeVar("_O", bound=BaseModel)


class SinkOptionsError(ValueError):
    """Settings of one sink that its type refuses. ``problems`` holds each
    one's key path inside the sink (``("options", "tls", "ca")``) and what
    is wrong, so ``edgeway check`` names the line; ``str()`` is
    ``options.tls.ca: ...; options.x: ...``."""

    def __init__(self, problems: Sequence[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = list(problems)
        super().__init__(
            "; ".join(f"{'.'.join(map(str, key))}: {msg}" for key, msg in self.problems)
        )

    @classmethod
    def at(cls, key: str, message: str) -> SinkOptionsError:
        """One problem at a dotted key (``"options.tls.key"``, ``"url"``)."""
        return cls([(tuple(key.split(".")), message)])


def parse_options(model: type[_O], options: Mapping[str, Any]) -> _O:
    """Validate a sink's ``options``; :class:`SinkOptionsError` naming every key at fault."""
    try:
        return model.model_validate(options)
    except ValidationError as e:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for err in e.errors():
            loc = tuple(err["loc"])
            if err["type"] == "extra_forbidden":
                msg = unknown_key(loc[-1], known_keys(loc[:-1], root=model))
            else:
                msg = err["msg"].removeprefix("Value error, ")
            problems.append((("options", *loc), msg))
        raise SinkOptionsError(problems) from None


_log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0
"""Seconds a probe's TCP connect may take. A handshake on a working link takes
milliseconds; 2 s still covers the first round trip of a slow cellular link."""


async def tcp_reachable(addresses: Sequence[tuple[str, int]]) -> bool:
    """True if one of ``addresses`` accepts a TCP connection (closed at once,
    nothing sent): the cheap check behind :meth:`Sink.probe`."""
    for host, port in addresses:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                _reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def url_address(url: str, default_port: int) -> tuple[str, int] | None:
    """``(host, port)`` of ``url`` (``default_port`` if it names none); None
    without a host name (a Unix socket, a host in the query string)."""
    u = urllib.parse.urlsplit(url)
    if not u.hostname:
        return None
    try:
        port = u.port
    except ValueError:
        return None
    return u.hostname, port or default_port


CLOSE_TIMEOUT = 2.0
"""Seconds a sink waits for a graceful close: a graceful close waits for the
peer (CloseOk, a flush), which never comes on a silent link."""


def client_ssl_context(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    key_password: str | None = None,
    *,
    enabled: bool = True,
    scheme: str = "",
) -> ssl.SSLContext | None:
    """The TLS context of a client sink from its ``ca``/``cert``/``key`` options.

    ``enabled`` False (a plain-text URL) refuses TLS options naming the key;
    errors are :class:`SinkOptionsError` so ``edgeway check`` shows them.
    """
    if not enabled:
        for name, value in (("ca", ca), ("cert", cert), ("key", key)):
            if value is not None:
                raise SinkOptionsError.at(f"options.{name}", f"TLS options need a {scheme}:// url")
        return None
    if (cert is None) != (key is None):
        raise SinkOptionsError.at("options.key", "cert and key go together")
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as e:
        raise SinkOptionsError.at("options.ca", str(e)) from None
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key), key_password)
        except (OSError, ssl.SSLError) as e:
            raise SinkOptionsError.at("options.cert", str(e)) from None
    return ctx


async def close_bounded(close: Awaitable[Any], what: str) -> None:
    """Await a connection's graceful close for at most :data:`CLOSE_TIMEOUT`;
    a close that fails or hangs leaves nothing to release."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await close
    except Exception as e:
        _log.debug("%s: close failed: %r", what, e)


SINK_STOP_WAIT = 1.0
"""Seconds a sink gets to close its connections (shutdown, a reload that
replaced it): a remote side that does not answer must not hold either up."""


class Sink(abc.ABC):
    """One cloud-side destination.

    Subclasses set ``schemes`` and implement ``send_batch``; ``start`` and
    ``close`` open and release connections. ``start`` must not raise on a
    remote side that is down: connect lazily in ``send_batch`` and raise
    :class:`RetryableSinkError` there instead, so a sink that is down never
    stops the gateway.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    options_model: ClassVar[type[BatchOptions]] = BatchOptions
    """The pydantic model of ``SinkConfig.options``; parsed in ``__init__``."""
    library: ClassVar[OptionalLibrary | None] = None
    """An optional dependency the sink needs (the ``sinks`` extra); a missing
    one is a configuration error (``edgeway check``, start-up)."""
    max_batch_records: int = 500
    max_batch_bytes: int = 1024 * 1024
    max_wait: float = 0.05
    """Seconds to wait for a batch to fill before sending a partial one."""

    def __init__(self, config: SinkConfig, gateway_id: str) -> None:
        self.config = config
        self.name = config.name
        self.gateway_id = gateway_id
        self.state = SinkState()
        self.options = parse_options(self.options_model, config.options)
        self.use_batch_options(self.options)

    def use_batch_options(self, opts: BatchOptions) -> None:
        """Take ``max_records``/``max_bytes``/``max_wait`` from parsed options."""
        self.max_batch_records = opts.max_records
        self.max_batch_bytes = opts.max_bytes
        self.max_wait = opts.max_wait

    async def start(self) -> None:
        """Open connections (optional; must not raise when the remote is down).

        The default checks that :attr:`library` is installed and logs how to
        install it if not; the first batch connects."""
        if self.library is not None and not self.library.installed():
            _log.error("sink %s: %s", self.name, self.library.missing())

    @abc.abstractmethod
    async def send_batch(self, records: Sequence[Record]) -> None:
        """Send ``records`` and return once the remote side has confirmed them."""

    def max_batches_in_flight(self) -> int:
        """How many ``send_batch`` calls this sink takes at once (1, the
        default: one at a time). More lets a runner that keeps up send the
        next small batch while the previous one waits for its confirmation;
        the batches then hold no device in common (edgeway.outbox.runner)."""
        return 1

    def probe_addresses(self) -> list[tuple[str, int]]:
        """Where the remote side listens: ``(host, port)`` pairs that accept a
        TCP connection once it is back. Empty (the default): no cheap check,
        the runner waits out its backoff."""
        return []

    async def probe(self) -> bool | None:
        """A cheap check, while the runner backs off after a connection
        failure, that the remote side accepts connections again: True, False,
        or None when this sink has no such check. The default connects to
        :meth:`probe_addresses` (TCP only: no TLS handshake, nothing sent)."""
        addresses = self.probe_addresses()
        if not addresses:
            return None
        return await tcp_reachable(addresses)

    def command_source(self, service: CommandService) -> CommandSource | None:
        """Where this sink takes commands for devices from the cloud, if it is
        configured to (see :mod:`edgeway.commands.cloud`); None by default."""
        return None

    def side_task(self) -> SinkSideTask | None:
        """Work of this sink beside sending batches (the MQTT sink's gateway
        birth/death), run by the gateway next to its runner; None by default."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # ---------------------------------------------------------- as a component

    async def stop(self, grace: float) -> None:
        """Release connections within ``grace`` seconds (a remote side that
        does not answer a close must not hold up shutdown)."""
        try:
            await asyncio.wait_for(self.close(), grace)
        except TimeoutError:
            _log.warning("sink %s did not close within %.1f s", self.name, grace)

    def health(self) -> Health:
        """Always healthy: a sink that is down does not stop the gateway (the
        outbox keeps its readings); :attr:`state` says whether it is connected."""
        return HEALTHY

    def stats(self) -> SinkState:
        """Connection state, last batch and records sent (see :class:`SinkState`)."""
        return self.state


class CommandSource(Protocol):
    """A sink's downlink from the cloud: runs (reconnecting forever) until
    cancelled, queueing the commands it receives."""

    name: str

    async def run(self) -> None: ...


class SinkSideTask(Protocol):
    """A sink's own long-running work beside its batches: runs (reconnecting
    forever) until cancelled, and finishes cleanly when cancelled."""

    name: str

    async def run(self) -> None: ...


_REGISTRY: dict[str, type[Sink]] = {}
_S = TypeVar("_S", bound=type[Sink])


def register_sink(cls: _S) -> _S:
    """Class decorator: make ``cls`` the sink for each scheme in ``cls.schemes``."""
    for scheme in cls.schemes:
        _REGISTRY[scheme] = cls
    return cls


def sink_class_for(url: str) -> type[Sink]:
    """The registered sink class for ``url``'s scheme; ``ValueError`` if none."""

    from edgeway.sinks import SCHEME_MODULES

    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _REGISTRY and scheme in SCHEME_MODULES:
        importlib.import_module(f"edgeway.sinks.{SCHEME_MODULES[scheme]}")
    try:
        return _REGISTRY[scheme]
    except KeyError:
        known = ", ".join(sorted(SCHEME_MODULES))
        close = difflib.get_close_matches(scheme, list(SCHEME_MODULES), n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"no sink for scheme {scheme!r}{hint} (known: {known})") from None


def create_sink(config: SinkConfig, gateway_id: str) -> Sink:
    """Build the sink that ``config.url`` names."""
    return sink_class_for(config.url)(config, gateway_id)


SinkFactory = Callable[[SinkConfig, str], Sink]
