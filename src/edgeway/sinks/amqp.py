"""AMQP 0-9-1 sink (RabbitMQ): publish with publisher confirms.

Config example::

    sinks:
      - name: rabbit
        url: amqp://edgeway:secret@rabbit.example.com:5672/telemetry   # amqps:// for TLS
        options:
          exchange: edgeway               # the default; "" is the default exchange
          exchange_type: topic            # used when declaring
          declare_exchange: true          # declare it (durable) at connect
          routing_key: "edgeway.{gateway_id}.{device_id}"   # the default
          mandatory: true                 # unroutable messages fail the batch
          ca: /etc/edgeway/rabbit-ca.pem  # amqps: CA, and cert/key for mutual TLS

What it does:

- One message per record: body ``Record.to_json_obj()`` as JSON
  (``content_type: application/json``), ``delivery_mode`` persistent,
  ``message_id`` = the record id (consumers de-duplicate by it),
  ``timestamp`` = the reading's time, ``app_id`` ``edgeway``, header
  ``gateway_id``.
- The channel is in publisher-confirm mode; the publishes of a batch are
  pipelined and :meth:`AmqpSink.send_batch` returns when RabbitMQ has
  confirmed every one (for a persistent message to a durable queue, RabbitMQ
  confirms once it is written to disk). A nack fails the batch.
- ``mandatory: true`` (default): a message that no queue binding matches is
  returned by RabbitMQ; the batch fails (retryably: add the binding and the
  data flows) instead of the message being dropped silently.
- The sink owns reconnection: no robust connection; a lost connection fails
  the batch in flight with :class:`RetryableSinkError` and the next
  ``send_batch`` connects again.

aio-pika is imported when the sink is used, so the gateway runs without the
``sinks`` extra unless an ``amqp://`` sink is configured.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict

from edgeway.config_types import Duration
from edgeway.extras import OptionalLibrary
from edgeway.sinks.base import (
    BatchOptions,
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

logger = logging.getLogger(__name__)

# Routing keys are cached per device (formatting per record costs more than
# building the message); capped so churning device ids cannot grow it forever.
_KEY_CACHE_MAX = 100_000


class AmqpSinkOptions(BatchOptions):
    """The ``options`` of an ``amqp://`` / ``amqps://`` sink."""

    model_config = ConfigDict(extra="forbid")

    exchange: str = "edgeway"
    """Exchange every record is published to."""
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    """Type used when declaring the exchange."""
    declare_exchange: bool = True
    """Declare the exchange (durable) at connect; off when it is managed elsewhere
    or the user may not declare."""
    routing_key: str = "edgeway.{gateway_id}.{device_id}"
    """Template with ``{gateway_id}``, ``{device_id}``, ``{sink}``."""
    mandatory: bool = True
    """A message no queue binding matches fails the batch (retryably) instead of
    being dropped by the broker without a word."""
    connect_timeout: Duration = 10.0
    """Longest wait for a connection; then the batch is retried with backoff."""
    ack_timeout: Duration = 30.0
    """A batch whose confirms have not all arrived after this long fails and
    the connection is dropped: a broker that stopped answering must not hang the sink."""
    ca: Path | None = None
    """CA bundle that signed the broker's certificate (``amqps://``)."""
    cert: Path | None = None
    """Client certificate (PEM) for brokers that verify clients."""
    key: Path | None = None
    """Private key of ``cert`` (PEM)."""


@register_sink
class AmqpSink(Sink):
    """Publishes records to an AMQP exchange with publisher confirms (see the module docstring).

    The sink keeps ``state.connected`` current; the runner records successes,
    errors and batch latency in ``state``.
    """

    schemes = ("amqp", "amqps")
    options_model = AmqpSinkOptions
    options: AmqpSinkOptions
    library = OptionalLibrary("aio_pika", "aio-pika", "sinks")

    def __init__(self, config: SinkConfig, gateway_id: str) -> None:
        super().__init__(config, gateway_id)
        opts = self.options
        url = urllib.parse.urlsplit(config.url)
        if not url.hostname:
            raise SinkOptionsError.at("url", f"no host in {config.url!r}")
        try:
            url.port  # noqa: B018 - validates the port
        except ValueError:
            raise SinkOptionsError.at("url", f"bad port in {config.url!r}") from None
        self.tls = url.scheme.lower() == "amqps"
        try:
            opts.routing_key.format(gateway_id="g", device_id="d", sink="s")
        except (KeyError, IndexError, ValueError) as e:
            raise SinkOptionsError.at(
                "options.routing_key",
                f"bad template {opts.routing_key!r} "
                f"(placeholders: gateway_id, device_id, sink): {e}",
            ) from None
        self.ssl_context = self._make_ssl_context(opts)
        self._keys: dict[str, str] = {}
        self._connection: Any = None
        self._channel: Any = None
        self._publish: Any = None
        self._lock = asyncio.Lock()

    def _make_ssl_context(self, opts: AmqpSinkOptions) -> ssl.SSLContext | None:
        return client_ssl_context(
            opts.ca, opts.cert, opts.key, enabled=bool(self.tls), scheme="amqps"
        )

    def routing_key_for(self, device_id: str) -> str:
        """The routing key of a record of ``device_id``."""
        k = self._keys.get(device_id)
        if k is None:
            if len(self._keys) >= _KEY_CACHE_MAX:
                self._keys.clear()
            k = self.options.routing_key.format(
                gateway_id=self.gateway_id, device_id=device_id, sink=self.name
            )
            self._keys[device_id] = k
        return k

    # -- connection -------------------------------------------------------

    async def _connect(self) -> None:
        import aio_pika  # lazy: optional dependency (the "sinks" extra)

        kwargs: dict[str, Any] = {"timeout": self.options.connect_timeout}
        if self.ssl_context is not None:
            kwargs["ssl_context"] = self.ssl_context
        conn = await aio_pika.connect(
            self.config.url,
            client_properties={"connection_name": f"edgeway-{self.gateway_id}-{self.name}"},
            **kwargs,
        )
        try:
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            if self.options.exchange and self.options.declare_exchange:
                await channel.declare_exchange(
                    self.options.exchange, self.options.exchange_type, durable=True
                )
            # aio-pika's Exchange.publish waits for each frame to be written
            # before the next publish may start (one loop iteration and one
            # send() per message); aiormq's basic_publish with wait=False only
            # queues the frame, which is 1.6x faster here. Confirms, nacks
            # (DeliveryError) and returns (PublishError) behave the same.
            raw = await channel.get_underlay_channel()
        except BaseException:
            await conn.close()
            raise
        self._connection, self._channel, self._publish = conn, channel, raw.basic_publish
        logger.info("sink %s: connected to %s", self.name, _redacted(self.config.url))

    async def _ensure_connected(self) -> Any:
        conn = self._connection
        if conn is not None and not conn.is_closed and not self._channel.is_closed:
            return self._publish
        await self._drop()
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await self._connect()
        except TimeoutError:
            raise RetryableSinkError(
                f"cannot connect to {_redacted(self.config.url)}: "
                f"timed out after {self.options.connect_timeout}s"
            ) from None
        except Exception as e:
            raise RetryableSinkError(
                f"cannot connect to {_redacted(self.config.url)}: {e!r}"
            ) from e
        return self._publish

    async def _drop(self) -> None:
        conn, self._connection = self._connection, None
        self._channel = self._publish = None
        if conn is not None and not conn.is_closed:
            await close_bounded(conn.close(), f"sink {self.name}")

    # -- Sink -------------------------------------------------------------

    async def send_batch(self, records: Sequence[Record]) -> None:
        """Publish ``records``; return once RabbitMQ confirmed every one."""
        if not records:
            return
        import aiormq  # aio-pika's protocol layer

        properties = aiormq.spec.Basic.Properties

        headers: dict[str, Any] = {"gateway_id": self.gateway_id}
        mandatory = self.options.mandatory
        exchange = self.options.exchange
        utc = datetime.UTC
        from_ts = datetime.datetime.fromtimestamp
        try:
            async with self._lock:
                publish = await self._ensure_connected()
                self.state.connected = True
                try:
                    async with asyncio.timeout(self.options.ack_timeout):
                        results = await asyncio.gather(
                            *(
                                publish(
                                    r.to_json_bytes(),
                                    exchange=exchange,
                                    routing_key=self.routing_key_for(r.device_id),
                                    properties=properties(
                                        content_type="application/json",
                                        delivery_mode=2,  # persistent
                                        message_id=r.id,
                                        timestamp=from_ts(r.ts, utc),
                                        app_id="edgeway",
                                        headers=headers,
                                    ),
                                    mandatory=mandatory,
                                    wait=False,
                                )
                                for r in records
                            ),
                            return_exceptions=True,
                        )
                except TimeoutError:
                    await self._drop()
                    raise RetryableSinkError(
                        f"publisher confirms missing after {self.options.ack_timeout}s; "
                        "reconnecting"
                    ) from None
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    if self._connection is None or self._connection.is_closed:
                        await self._drop()
                    elif self._channel is None or self._channel.is_closed:
                        await self._drop()
                    raise RetryableSinkError(
                        f"{len(errors)} of {len(records)} messages not confirmed: {errors[0]!r}"
                    )
        except BaseException:
            if self._connection is None:
                self.state.connected = False
            raise

    def probe_addresses(self) -> list[tuple[str, int]]:
        addr = url_address(self.config.url, 5671 if self.tls else 5672)
        return [addr] if addr else []

    async def close(self) -> None:
        """Close the connection (everything sent is already confirmed)."""
        await self._drop()
        self.state.connected = False


def _redacted(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    u = urllib.parse.urlsplit(url)
    if u.password is None:
        return url
    netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit(u._replace(netloc=netloc))
