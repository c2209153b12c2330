"""PostgreSQL sink: insert records into a table, idempotently, one statement per batch.

Config example::

    sinks:
      - name: db
        url: postgresql://edgeway:secret@db.example.com:5432/telemetry?sslmode=verify-full
        options:
          table: edgeway_records     # the default; "schema.table" works too
          create_table: true         # create it if missing (the default)

The table (created if missing)::

    CREATE TABLE edgeway_records (
        id          text PRIMARY KEY,        -- the record id, "{gateway_id}:{seq}" or a UUID
        gateway_id  text NOT NULL,
        device_id   text NOT NULL,
        ts          timestamptz NOT NULL,    -- the reading's time
        metrics     jsonb NOT NULL,
        tags        jsonb NOT NULL DEFAULT '{}',
        received_at timestamptz NOT NULL DEFAULT now()   -- when the row was inserted
    );

What it does:

- **Idempotent.** ``INSERT ... ON CONFLICT DO NOTHING``: a batch sent again
  after a lost answer inserts each row once.
- **One statement per batch**, so one transaction and one round trip: the
  records go as five arrays expanded by ``unnest`` (one ``INSERT ... SELECT``).
  That is what ``executemany`` (one statement per row) or ``COPY`` (which
  cannot skip conflicts, so it needs a temporary table and a second
  statement) cost more than.
- **TimescaleDB.** When the ``timescaledb`` extension is installed in the
  database (``pg_extension``), a table we create becomes a hypertable on
  ``ts``. TimescaleDB requires the partitioning column in every unique index,
  so its primary key is ``(id, ts)``; a record's ``ts`` never changes, so this
  is as idempotent. Without the extension nothing of this happens.
- Connection errors, timeouts and server-side problems are retryable; a data
  error for the batch (SQLSTATE class 22, e.g. a NUL character in a string,
  which ``jsonb`` refuses) is permanent, so that batch is dead-lettered
  instead of blocking the sink. A dropped table is created again.

Query parameters of the URL follow libpq (``sslmode``, ``sslrootcert``, ...),
as asyncpg reads them. asyncpg is imported when the sink is used, so the gateway
runs without the ``sinks`` extra unless a ``postgresql://`` sink is configured.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

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
    register_sink,
    url_address,
)
from edgeway.sinks.config import SinkConfig

logger = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class PostgresSinkOptions(BatchOptions):
    """The ``options`` of a ``postgresql://`` sink."""

    model_config = ConfigDict(extra="forbid")

    table: str = "edgeway_records"
    """Table name, optionally ``schema.table``."""
    create_table: bool = True
    """Create the table (and a hypertable, with TimescaleDB) if it is missing."""
    connect_timeout: Duration = 10.0
    """Longest wait for a connection; then the batch is retried with backoff."""
    statement_timeout: Duration = 30.0
    """A batch insert that takes longer fails (retryably): a stuck server or a
    lock must not hang the sink."""
    pool_size: int = Field(default=2, ge=1, le=32)
    """Connections kept open. The runner sends one batch at a time; a second
    connection lets a new batch start while a broken one is being replaced."""


def _quote_table(name: str) -> tuple[str, str]:
    """``(quoted qualified name, bare table name)``; ``ValueError`` if not an identifier."""
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError(f"expected table or schema.table, got {name!r}")
    return ".".join(f'"{p}"' for p in parts), parts[-1]


@register_sink
class PostgresSink(Sink):
    """Inserts records into a PostgreSQL table (see the module docstring).

    The sink keeps ``state.connected`` current; the runner records successes,
    errors and batch latency in ``state``.
    """

    schemes = ("postgresql", "postgres")
    options_model = PostgresSinkOptions
    options: PostgresSinkOptions
    library = OptionalLibrary("asyncpg", "asyncpg", "sinks")

    def __init__(self, config: SinkConfig, gateway_id: str) -> None:
        super().__init__(config, gateway_id)
        opts = self.options
        url = urllib.parse.urlsplit(config.url)
        if not url.hostname and "host=" not in url.query:
            raise SinkOptionsError.at("url", f"no host in {config.url!r}")
        try:
            url.port  # noqa: B018 - validates the port
        except ValueError:
            raise SinkOptionsError.at("url", f"bad port in {config.url!r}") from None
        try:
            self.table, self._bare_table = _quote_table(opts.table)
        except ValueError as e:
            raise SinkOptionsError.at("options.table", f"{e}") from None
        self.dsn = config.url
        self.hypertable = False
        self._pool: Any = None
        self._table_ready = False
        self._insert = (
            f"INSERT INTO {self.table} (id, gateway_id, device_id, ts, metrics, tags) "
            "SELECT id, $1, device_id, to_timestamp(ts), metrics::jsonb, tags::jsonb "
            "FROM unnest($2::text[], $3::text[], $4::float8[], $5::text[], $6::text[]) "
            "AS r(id, device_id, ts, metrics, tags) "
            "ON CONFLICT DO NOTHING"
        )

    # -- connection -------------------------------------------------------

    async def _ensure_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        import asyncpg  # lazy: optional dependency (the "sinks" extra)

        try:
            async with asyncio.timeout(self.options.connect_timeout):
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=self.options.pool_size,
                    timeout=self.options.connect_timeout,
                    command_timeout=self.options.statement_timeout,
                    server_settings={"application_name": f"edgeway-{self.gateway_id}"},
                )
        except TimeoutError:
            raise RetryableSinkError(
                f"cannot connect to PostgreSQL: timed out after {self.options.connect_timeout}s"
            ) from None
        except Exception as e:
            raise RetryableSinkError(f"cannot connect to PostgreSQL: {e!r}") from e
        logger.info("sink %s: connected to PostgreSQL (table %s)", self.name, self.table)
        return self._pool

    async def _create_table(self, conn: Any) -> None:
        """Create the table if missing; a hypertable when TimescaleDB is installed."""
        timescale = bool(
            await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
        )
        key = "PRIMARY KEY (id, ts)" if timescale else "PRIMARY KEY (id)"
        async with conn.transaction():
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                "id text NOT NULL, "
                "gateway_id text NOT NULL, "
                "device_id text NOT NULL, "
                "ts timestamptz NOT NULL, "
                "metrics jsonb NOT NULL, "
                "tags jsonb NOT NULL DEFAULT '{}', "
                "received_at timestamptz NOT NULL DEFAULT now(), "
                f"{key})"
            )
            if timescale:
                await conn.execute(
                    "SELECT create_hypertable($1::regclass, 'ts', if_not_exists => TRUE)",
                    self.table,
                )
        self.hypertable = timescale
        logger.info(
            "sink %s: table %s ready%s", self.name, self.table, " (hypertable)" if timescale else ""
        )

    # -- Sink -------------------------------------------------------------

    async def send_batch(self, records: Sequence[Record]) -> None:
        """Insert ``records`` (skipping ids already there); return once committed."""
        if not records:
            return
        import asyncpg

        dumps = orjson.dumps
        ids = [r.id for r in records]
        devices = [r.device_id for r in records]
        tss = [r.ts for r in records]
        metrics = [dumps(r.metrics).decode() for r in records]
        tags = [dumps(r.tags).decode() for r in records]
        try:
            pool = await self._ensure_pool()
            try:
                async with pool.acquire(timeout=self.options.connect_timeout) as conn:
                    if not self._table_ready and self.options.create_table:
                        await self._create_table(conn)
                    self._table_ready = True
                    await conn.execute(
                        self._insert, self.gateway_id, ids, devices, tss, metrics, tags
                    )
            except asyncpg.UndefinedTableError as e:
                self._table_ready = False  # dropped under us: create it again next time
                raise RetryableSinkError(f"table {self.table} is missing: {e}") from e
            except asyncpg.DataError as e:
                # SQLSTATE class 22 (e.g. NUL in text/jsonb): will never pass.
                raise PermanentSinkError(f"PostgreSQL refused the batch: {e!r}") from e
            except (asyncpg.PostgresConnectionError, OSError, TimeoutError) as e:
                self.state.connected = False
                raise RetryableSinkError(f"PostgreSQL connection problem: {e!r}") from e
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                raise RetryableSinkError(f"PostgreSQL error: {e!r}") from e
        except Exception:
            if self._pool is None:
                self.state.connected = False
            raise
        self.state.connected = True

    def probe_addresses(self) -> list[tuple[str, int]]:
        # None for a Unix socket or a host given in the query string: no probe.
        addr = url_address(self.dsn, 5432)
        return [addr] if addr else []

    async def close(self) -> None:
        """Close the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(5):
                    await pool.close()
            except Exception as e:  # a broken pool: terminate it instead
                logger.debug("sink %s: pool close failed: %s", self.name, e)
                pool.terminate()
        self.state.connected = False
