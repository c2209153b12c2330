"""Outbox benchmark: append rate with group commit, against raw SQLite; drain rate; open time.

Usage::

    .venv/bin/python bench/outbox_bench.py [--rows 200000] [--inflight 1000]
        [--durability fsync|os] [--out bench/results/outbox_bench.json]

- append: ``--inflight`` concurrent single-reading submits are kept outstanding
  (as 100 MQTT clients with 10 QoS 1 messages in flight each would); every
  resolved future is replaced by a new submit until ``--rows`` are stored.
  Reports rows/s, commits, mean rows per commit and process CPU-seconds per
  1,000 rows (all threads: loop + writer).
- raw: the same rows inserted by a plain ``executemany`` loop on a bare
  connection with the same schema and ``synchronous`` setting, in transactions
  of the outbox's mean commit size: the ceiling for this disk and SQLite.
- drain: read_batch + confirm (no network) of the whole backlog in batches of
  500, as a sink runner does: rows/s and CPU-s per 1,000.
- drain_http: the same backlog through a :class:`SinkRunner` and the HTTP sink
  (500 records per POST) to an aiohttp server in a separate process: records/s
  and the gateway process's CPU-s per 1,000 (the server's CPU is not counted).
- open: ``Outbox.open()`` with the backlog pending (crash-recovery start-up).
  ``--open-backlog N`` also times an open with N pending rows (built with raw
  inserts, so millions take seconds) and the first read from it.

Rates on a shared machine are noisy; CPU-seconds per 1,000 rows are steadier.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, cast

from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner
from edgeway.outbox.store import _SCHEMA, INSERT_CHUNK, ChunkBuilder, record_size, record_text
from edgeway.reading import Reading
from edgeway.sinks.base import create_sink

_SERVER = """
import sys
from aiohttp import web
async def ingest(request):
    await request.read()
    return web.Response(text="ok")
app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_post("/ingest", ingest)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


Durability = Literal["fsync", "os"]


def _reading(i: int) -> Reading:
    # ~100-byte telemetry, as MEASUREMENTS.md's SQLite figures use.
    return Reading(
        f"device-{i % 100:03d}",
        1_732_550_400.0 + i * 0.001,
        {"temp": 21.5 + (i % 10) * 0.1, "hum": 40 + i % 7, "on": True, "seq": i},
    )


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def bench_append(
    path: Path, rows: int, inflight: int, durability: Durability
) -> dict[str, Any]:
    ob = Outbox(
        path, gateway_id="bench", config=OutboxSection(durability=durability), sink_names=["s"]
    )
    await ob.open()
    done = asyncio.Event()
    submitted = 0
    completed = 0

    def on_done(_f: asyncio.Future[Any]) -> None:
        nonlocal submitted, completed
        completed += 1
        if submitted < rows:
            f = ob.submit([_reading(submitted)])
            submitted += 1
            f.add_done_callback(on_done)
        elif completed == rows:
            done.set()

    c0, t0 = _cpu(), time.perf_counter()
    for _ in range(min(inflight, rows)):
        f = ob.submit([_reading(submitted)])
        submitted += 1
        f.add_done_callback(on_done)
    await done.wait()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    commits = ob.commits
    await ob.close()
    return {
        "rows": rows,
        "inflight": inflight,
        "rows_per_s": round(rows / wall),
        "cpu_s_per_1000": round(cpu / rows * 1000, 4),
        "commits": commits,
        "rows_per_commit": round(rows / max(commits, 1), 1),
        "wall_s": round(wall, 2),
    }


def _chunk_rows(first: int, texts: list[bytes], now: float) -> list[tuple[Any, ...]]:
    """Chunk rows (CHUNK_MAX records each) for consecutive records from ``first``."""
    builder = ChunkBuilder()
    sizes = [record_size(t, first + k) for k, t in enumerate(texts)]
    builder.add(first, texts, sizes, None, 1, 0, now)
    return builder.rows()


def bench_raw(path: Path, rows: int, per_commit: int, durability: Durability) -> dict[str, Any]:
    """The outbox's own storage work done by hand: each record serialized to
    its JSON text, joined into chunk rows, one transaction per commit."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'fsync' else 'NORMAL'}")
    conn.executescript(_SCHEMA)
    c0, t0 = _cpu(), time.perf_counter()
    now = time.time()
    for start in range(0, rows, per_commit):
        texts = []
        for i in range(start, min(start + per_commit, rows)):
            r = _reading(i)
            texts.append(record_text(r, f"bench:{i + 1}"))
        conn.execute("BEGIN")
        conn.executemany(INSERT_CHUNK, _chunk_rows(start + 1, texts, now))
        conn.execute("COMMIT")
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    conn.close()
    return {
        "rows_per_commit": per_commit,
        "rows_per_s": round(rows / wall),
        "cpu_s_per_1000": round(cpu / rows * 1000, 4),
        "wall_s": round(wall, 2),
    }


async def bench_drain(path: Path, durability: Durability) -> dict[str, Any]:
    t0 = time.perf_counter()
    ob = Outbox(
        path, gateway_id="bench", config=OutboxSection(durability=durability), sink_names=["s"]
    )
    await ob.open()
    open_ms = (time.perf_counter() - t0) * 1000
    pending = ob.counters()["s"]["pending"]
    c0, t0 = _cpu(), time.perf_counter()
    n = 0
    prev: asyncio.Future[None] | None = None
    while True:
        b = await ob.read_batch("s", 500, 1 << 20)
        if b.records:
            n += len(b.records)
            if prev is not None:
                await prev
            prev = ob.confirm(b)
        elif not b.more:
            break
    if prev is not None:
        await prev
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    await ob.close()
    return {
        "open_ms_with_backlog": round(open_ms, 1),
        "backlog": pending,
        "rows": n,
        "rows_per_s": round(n / wall),
        "cpu_s_per_1000": round(cpu / max(n, 1) * 1000, 4),
        "wall_s": round(wall, 2),
    }


def _build_backlog(path: Path, rows: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    step = 102_400  # a multiple of CHUNK_MAX
    total = 0
    for start in range(0, rows, step):
        texts = [
            record_text(_reading(i), f"bench:{i + 1}")
            for i in range(start, min(start + step, rows))
        ]
        chunk_rows = _chunk_rows(start + 1, texts, 1.7e9)
        total += sum(r[4] for r in chunk_rows)
        conn.executemany(INSERT_CHUNK, chunk_rows)
    conn.execute("UPDATE sinks SET accepted = ? WHERE name = 's'", (rows,))
    conn.execute(
        "INSERT OR REPLACE INTO meta VALUES ('next_seq', ?), ('total_bytes', ?)",
        (rows + 1, total),
    )
    conn.execute("COMMIT")
    conn.close()
    return path.stat().st_size / 1e6


async def bench_open_backlog(path: Path, rows: int) -> dict[str, Any]:
    """Build ``rows`` pending rows fast (raw SQL, consistent meta and counters),
    then time a crash-recovery open and the first batch read."""
    ob = Outbox(path, gateway_id="bench", config=OutboxSection(), sink_names=["s"])
    await ob.open()  # creates the schema and the sink row
    await ob.close()
    db_mb = _build_backlog(path, rows)
    t0 = time.perf_counter()
    ob = Outbox(path, gateway_id="bench", config=OutboxSection(), sink_names=["s"])
    await ob.open()
    open_ms = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    b = await ob.read_batch("s", 500, 1 << 20)
    first_ms = (time.perf_counter() - t1) * 1000
    pending = ob.counters()["s"]["pending"]
    await ob.close()
    return {
        "pending": pending,
        "db_mb": round(db_mb),
        "open_ms": round(open_ms, 1),
        "first_batch_ms": round(first_ms, 1),
        "first_batch_records": len(b),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)])
    for _ in range(100):  # bounded wait for the server's port
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return server
        time.sleep(0.05)
    server.kill()
    raise RuntimeError("bench HTTP server did not start")


async def bench_drain_http(path: Path, durability: Durability) -> dict[str, Any]:
    port = _free_port()
    server = _start_server(port)
    try:
        ob = Outbox(
            path, gateway_id="bench", config=OutboxSection(durability=durability), sink_names=["s"]
        )
        await ob.open()
        backlog = ob.counters()["s"]["pending"]
        sink = create_sink(
            SinkConfig(
                name="s", url=f"http://127.0.0.1:{port}/ingest", options={"max_records": 500}
            ),
            "bench",
        )
        await sink.start()
        c0, t0 = _cpu(), time.perf_counter()
        task = asyncio.create_task(SinkRunner(ob, sink).run())
        while ob.counters()["s"]["delivered"] < backlog:
            await ob.wait_for_commit()
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        await ob.close()
    finally:
        server.terminate()
        server.wait(10)
    return {
        "rows": backlog,
        "rows_per_s": round(backlog / wall),
        "cpu_s_per_1000": round(cpu / max(backlog, 1) * 1000, 4),
        "wall_s": round(wall, 2),
        "requests": sink.state.batches_sent,
    }


async def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--inflight", type=int, default=1000)
    p.add_argument("--durability", choices=["fsync", "os"], default="fsync")
    p.add_argument("--open-backlog", type=int, default=0, help="also time an open with N pending")
    p.add_argument("--dir", type=Path, default=None, help="where to put the databases")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    durability = cast(Durability, args.durability)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        append = await bench_append(d / "outbox.db", args.rows, args.inflight, durability)
        raw_same = bench_raw(
            d / "raw.db", args.rows, max(int(append["rows_per_commit"]), 1), durability
        )
        raw_1000 = bench_raw(d / "raw1000.db", args.rows, 1000, durability)
        shutil.copy(d / "outbox.db", d / "outbox-http.db")
        drain = await bench_drain(d / "outbox.db", durability)
        drain_http = await bench_drain_http(d / "outbox-http.db", durability)
        big = (
            await bench_open_backlog(d / "big.db", args.open_backlog) if args.open_backlog else None
        )
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loop": type(asyncio.get_running_loop()).__module__,
        "durability": args.durability,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
        "append": append,
        "raw_executemany_same_commit_size": raw_same,
        "raw_executemany_1000_per_commit": raw_1000,
        "drain_read_confirm": drain,
        "drain_http": drain_http,
        "open_with_backlog": big,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    # The gateway runs on uvloop (edgeway.cli); measure on the same loop.
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        sys.exit(runner.run(main(sys.argv[1:])))
