"""File sink: JSON lines, rotation, torn-line repair, end to end from the outbox."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner
from edgeway.reading import Reading
from edgeway.sinks.base import Record, create_sink
from edgeway.sinks.file import FileSink, path_from_url


def records(start: int, n: int) -> list[Record]:
    return [
        Record(f"gw:{i}", i, f"d{i % 3}", 1000.0 + i, {"v": i}) for i in range(start, start + n)
    ]


def read_lines(directory: Path, stem: str = "export") -> list[dict[str, object]]:
    out = []
    for p in sorted(
        directory.glob(f"{stem}*.jsonl"), key=lambda p: (p.name == f"{stem}.jsonl", p.name)
    ):
        out.extend(orjson.loads(line) for line in p.read_bytes().splitlines())
    return out


def files(directory: Path, pattern: str) -> list[Path]:
    return sorted(directory.glob(pattern))


def make(url: str, **options: object) -> FileSink:
    sink = create_sink(SinkConfig(name="export", url=url, options=options), "gw")
    assert isinstance(sink, FileSink)
    return sink


def test_url_forms(tmp_path: Path) -> None:
    assert path_from_url(f"file://{tmp_path}", "x") == tmp_path / "x.jsonl"
    assert path_from_url(f"file://{tmp_path}/a.ndjson", "x") == tmp_path / "a.ndjson"
    with pytest.raises(ValueError, match="unknown key"):
        make(f"file://{tmp_path}", rotate=True)


async def test_writes_json_lines_and_rotates(tmp_path: Path) -> None:
    sink = make(f"file://{tmp_path}", max_file_bytes=2048, keep_files=0)
    await sink.start()
    try:
        for start in range(1, 301, 30):
            await sink.send_batch(records(start, 30))
    finally:
        await sink.close()
    written = files(tmp_path, "export*.jsonl")
    assert len(written) > 3
    assert all(p.stat().st_size <= 2048 for p in written)
    lines = read_lines(tmp_path)
    assert [r["id"] for r in lines] == [f"gw:{i}" for i in range(1, 301)]
    assert lines[0] == {"id": "gw:1", "device_id": "d1", "ts": 1001.0, "metrics": {"v": 1}}


async def test_keep_files_deletes_the_oldest(tmp_path: Path) -> None:
    sink = make(f"file://{tmp_path}", max_file_bytes=1024, keep_files=2)
    await sink.start()
    try:
        for start in range(1, 201, 10):
            await sink.send_batch(records(start, 10))
    finally:
        await sink.close()
    rotated = files(tmp_path, "export-*.jsonl")
    assert len(rotated) == 2
    lines = read_lines(tmp_path)
    assert lines[-1]["id"] == "gw:200"  # the newest are kept
    ids = [int(str(r["id"]).split(":")[1]) for r in lines]
    assert ids == list(range(ids[0], 201))


async def test_torn_last_line_is_cut_at_start(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_bytes(b'{"id":"gw:1"}\n{"id":"gw:2","dev')  # a crash mid-write
    sink = make(f"file://{target}")
    await sink.start()
    try:
        await sink.send_batch(records(2, 1))
    finally:
        await sink.close()
    lines = [orjson.loads(x) for x in target.read_bytes().splitlines()]
    assert [r["id"] for r in lines] == ["gw:1", "gw:2"]


async def test_from_the_outbox(tmp_path: Path) -> None:
    ob = Outbox(
        tmp_path / "outbox.db", gateway_id="gw", config=OutboxSection(), sink_names=["export"]
    )
    await ob.open()
    sink = make(f"file://{tmp_path / 'out'}", max_records=40)
    await sink.start()
    task = asyncio.create_task(SinkRunner(ob, sink).run())
    try:
        await asyncio.gather(
            *(ob.submit([Reading(f"d{i % 4}", float(i), {"i": i})]) for i in range(250))
        )
        async with asyncio.timeout(10):
            while ob.counters()["export"]["delivered"] < 250:
                await ob.wait_for_commit()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        await ob.close()
    lines = read_lines(tmp_path / "out")
    assert [r["id"] for r in lines] == [f"gw:{i}" for i in range(1, 251)]


def test_documented_config_is_valid() -> None:
    from edgeway.config import parse_config

    text = (Path(__file__).parents[2] / "docs" / "sinks" / "file.md").read_text(encoding="utf-8")
    cfg = parse_config(text.split("```yaml\n")[1].split("```", 1)[0])
    sink = create_sink(cfg.sinks[0], "gw")
    assert isinstance(sink, FileSink)
    assert sink.path == Path("/var/lib/edgeway/export/export.jsonl")
    assert sink.options.max_file_bytes == 64 * 1024 * 1024
