"""The PostgreSQL sink against the local server (database ``test``, trust auth)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

asyncpg = pytest.importorskip("asyncpg")

from edgeway.config import SinkConfig  # noqa: E402
from edgeway.sinks.base import (  # noqa: E402
    PermanentSinkError,
    Record,
    RetryableSinkError,
    create_sink,
)
from edgeway.sinks.postgres import PostgresSink  # noqa: E402

PG = ("127.0.0.1", 5432)
DSN = "postgresql://postgres@127.0.0.1:5432/test"
TIMEOUT = 10.0


def records(n: int, start: int = 0, devices: int = 3) -> list[Record]:
    return [
        Record(
            id=f"gw1:{i}",
            seq=i,
            device_id=f"dev{i % devices}",
            ts=1_700_000_000.123456 + i,
            metrics={"temp": 20.0 + i / 10, "ok": True, "state": "run"},
            tags={"site": "a"} if i % 2 else {},
        )
        for i in range(start, start + n)
    ]


def make_sink(url: str = DSN, **options: Any) -> PostgresSink:
    sink = create_sink(SinkConfig(name="db", url=url, options=options), "gw1")
    assert isinstance(sink, PostgresSink)
    return sink


@pytest.fixture
async def db() -> AsyncIterator[tuple[Any, str]]:
    """A connection and a unique table name; the table (and schema) are dropped afterwards."""
    conn = await asyncpg.connect(DSN)
    table = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield conn, table
    finally:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        await conn.execute(f'DROP SCHEMA IF EXISTS "s_{table}" CASCADE')
        await conn.close()


async def test_rows_inserted_with_every_column(db: tuple[Any, str]) -> None:
    conn, table = db
    sink = make_sink(table=table)
    batch = records(500)
    try:
        await sink.start()
        await sink.send_batch(batch)
        assert sink.state.connected
    finally:
        await sink.close()
    assert not sink.state.connected
    assert not sink.hypertable  # no timescaledb here: a plain table
    assert (
        await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = $1", table) == "r"
    )
    rows = await conn.fetch(f'SELECT * FROM "{table}" ORDER BY ts')
    assert len(rows) == 500
    for row, r in zip(rows, batch, strict=True):
        assert row["id"] == r.id
        assert row["gateway_id"] == "gw1"
        assert row["device_id"] == r.device_id
        assert abs(row["ts"].timestamp() - r.ts) < 1e-6
        assert json.loads(row["metrics"]) == r.metrics
        assert json.loads(row["tags"]) == r.tags
        assert row["received_at"] is not None
    pk = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::regclass "
        "AND contype = 'p'",
        f'"{table}"',
    )
    assert pk == "PRIMARY KEY (id)"


async def test_same_batch_twice_inserts_rows_once(db: tuple[Any, str]) -> None:
    conn, table = db
    sink = make_sink(table=table)
    try:
        await sink.send_batch(records(100))
        await sink.send_batch(records(100))  # a retry after a lost answer
        await sink.send_batch(records(100, 50))  # overlaps the first by 50
    finally:
        await sink.close()
    ids = [r["id"] for r in await conn.fetch(f'SELECT id FROM "{table}" ORDER BY ts')]
    assert ids == [f"gw1:{i}" for i in range(150)]


async def test_schema_qualified_table_and_existing_table(db: tuple[Any, str]) -> None:
    conn, table = db
    await conn.execute(f'CREATE SCHEMA "s_{table}"')
    sink = make_sink(table=f"s_{table}.{table}")
    try:
        await sink.send_batch(records(3))
    finally:
        await sink.close()
    # A second sink finds the table already there.
    again = make_sink(table=f"s_{table}.{table}")
    try:
        await again.send_batch(records(3, 3))
    finally:
        await again.close()
    assert await conn.fetchval(f'SELECT count(*) FROM "s_{table}"."{table}"') == 6


async def test_missing_table_without_create_is_retryable(db: tuple[Any, str]) -> None:
    conn, table = db
    sink = make_sink(table=table, create_table=False)
    try:
        with pytest.raises(RetryableSinkError, match="missing"):
            await sink.send_batch(records(3))
        await make_sink(table=table).send_batch(records(1))  # someone creates it
        await sink.send_batch(records(3))
    finally:
        await sink.close()
    assert await conn.fetchval(f'SELECT count(*) FROM "{table}"') == 3


async def test_dropped_table_is_created_again(db: tuple[Any, str]) -> None:
    conn, table = db
    sink = make_sink(table=table)
    try:
        await sink.send_batch(records(3))
        await conn.execute(f'DROP TABLE "{table}"')
        with pytest.raises(RetryableSinkError):
            await sink.send_batch(records(3, 3))
        await sink.send_batch(records(3, 3))
    finally:
        await sink.close()
    assert await conn.fetchval(f'SELECT count(*) FROM "{table}"') == 3


async def test_nul_character_is_permanent(db: tuple[Any, str]) -> None:
    conn, table = db
    sink = make_sink(table=table)
    bad = Record(id="gw1:1", seq=1, device_id="d", ts=1.0, metrics={"s": "a\x00b"})
    try:
        with pytest.raises(PermanentSinkError):
            await sink.send_batch([bad])
        await sink.send_batch(records(2))  # the sink goes on with the next batch
    finally:
        await sink.close()
    assert await conn.fetchval(f'SELECT count(*) FROM "{table}"') == 2


class Proxy:
    """A TCP proxy to PostgreSQL on a fixed local port that the test can take down and up."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*PG)
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.writers -= {writer, up_writer}


async def test_server_unreachable_then_back(db: tuple[Any, str]) -> None:
    conn, table = db
    proxy = Proxy()
    await proxy.start()
    sink = make_sink(f"postgresql://postgres@127.0.0.1:{proxy.port}/test", table=table)
    sink.options.connect_timeout = 3
    try:
        await sink.send_batch(records(10))
        await proxy.stop()
        for _ in range(3):
            with pytest.raises(RetryableSinkError):
                await sink.send_batch(records(10, 10))
        assert not sink.state.connected
        await proxy.start()
        # The pool replaces its broken connection; the runner's next retry succeeds.
        for _attempt in range(3):
            try:
                await sink.send_batch(records(10, 10))
                break
            except RetryableSinkError:
                continue
        else:
            pytest.fail("sink did not recover")
        assert sink.state.connected
    finally:
        await sink.close()
        if proxy.server is not None:
            await proxy.stop()
    assert await conn.fetchval(f'SELECT count(*) FROM "{table}"') == 20


@pytest.mark.parametrize(
    ("options", "url", "key"),
    [
        ({"colour": "red"}, DSN, "options.colour"),
        ({"table": "a;drop"}, DSN, "options.table"),
        ({"table": "a.b.c"}, DSN, "options.table"),
        ({"pool_size": 0}, DSN, "options.pool_size"),
        ({}, "postgresql://h:99999/db", "url"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], url: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        PostgresSink(SinkConfig(name="c", url=url, options=options), "gw1")


def test_batch_size_options_reach_the_runner() -> None:
    sink = make_sink(max_records=5000, max_wait="50ms")
    assert (sink.max_batch_records, sink.max_batch_bytes, sink.max_wait) == (5000, 1 << 20, 0.05)
