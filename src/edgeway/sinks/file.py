"""File sink: JSON lines on local disk, for air-gapped export and debugging.

Configuration::

    sinks:
      - name: export
        url: file:///var/lib/edgeway/export        # a directory: writes export.jsonl in it
        # url: file:///mnt/usb/site-a.jsonl        # or the file itself
        options:
          max_file_bytes: 64MiB   # rotate when the file would grow past this
          keep_files: 0           # rotated files kept (0: keep all; oldest deleted first)
          durability: fsync       # fsync each batch (match outbox.durability); or os

One record per line, as in every JSON body (``{"id", "device_id", "ts",
"metrics", ...}``). A batch is confirmed once written (and fsynced under
``durability: fsync``), so a crash between the write and the confirmation
repeats the batch: readers drop duplicates by ``id``. A line torn by a crash
is cut off when the sink starts. Rotated files are named
``<stem>-<UTC time>.jsonl`` next to the live file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from edgeway.config_types import Duration, Size
from edgeway.sinks.base import (
    BatchOptions,
    Record,
    RetryableSinkError,
    Sink,
    SinkOptionsError,
    register_sink,
)
from edgeway.sinks.config import SinkConfig

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".log")
"""A URL path ending in one of these names the file; anything else is a directory."""

TAIL_SCAN = 1024 * 1024
"""Bytes read back from the end of the file at start to find a torn last line;
larger than any single record we write."""


class FileSinkOptions(BatchOptions):
    """``options:`` of a ``file://`` sink."""

    max_file_bytes: Size = Field(default=64 * 1024 * 1024, ge=1024)
    """Rotate before the file would pass this. 64 MiB files copy quickly to
    removable media and open in any editor."""
    keep_files: int = Field(default=0, ge=0)
    """Rotated files kept; 0 keeps all (deleting exported data is the operator's call)."""
    durability: Literal["fsync", "os"] = "fsync"
    """``fsync`` each batch before confirming it (match ``outbox.durability``:
    the sink cannot see the outbox section)."""
    max_records: int = Field(default=1000, ge=1, le=100_000)
    """Records per write (one fsync each). 100,000 caps the memory of one batch."""
    max_bytes: Size = Field(default=4 * 1024 * 1024, ge=1024)
    """About the bytes written per batch."""
    max_wait: Duration = 0.0
    """Wait this long for a batch to fill (0: write what is there)."""


def path_from_url(url: str, sink_name: str) -> Path:
    """The file a ``file://`` URL names (a directory gets ``<sink name>.jsonl``)."""
    raw = url.split("://", 1)[1] if "://" in url else url
    if not raw:
        raise SinkOptionsError.at("url", f"file sink URL {url!r} names no path")
    p = Path(raw)
    if p.suffix.lower() in FILE_SUFFIXES:
        return p
    return p / f"{sink_name}.jsonl"


@register_sink
class FileSink(Sink):
    """Appends records as JSON lines, rotating by size."""

    schemes: ClassVar[tuple[str, ...]] = ("file",)
    options_model = FileSinkOptions
    options: FileSinkOptions

    def __init__(self, config: SinkConfig, gateway_id: str) -> None:
        super().__init__(config, gateway_id)
        self.path = path_from_url(config.url, config.name)
        self._fd: int | None = None
        self._size = 0

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._open)
        except OSError as e:  # must not stop the gateway: send_batch retries
            self.state.record_error(e)
            log.warning("file sink %s cannot open %s: %s", self.name, self.path, e)

    def _open(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        if size:
            # Cut a line torn by a crash mid-write; its batch was not confirmed
            # and comes again.
            n = min(size, TAIL_SCAN)
            tail = os.pread(fd, n, size - n)
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                size = size - n + cut + 1 if cut >= 0 else (0 if n == size else size)
                os.ftruncate(fd, size)
                log.warning("file sink %s: cut a torn last line in %s", self.name, self.path)
        self._fd = fd
        self._size = size
        self.state.connected = True

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        now = time.time()
        stamp = (
            time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1e6) % 1_000_000:06d}"
        )
        base = f"{self.path.stem}-{stamp}"
        target = self.path.with_name(f"{base}{self.path.suffix}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{base}.{n}{self.path.suffix}")
            n += 1
        os.replace(self.path, target)
        if self.options.durability == "fsync":
            _fsync_dir(self.path.parent)
        if self.options.keep_files:
            rotated = sorted(
                p
                for p in self.path.parent.glob(f"{self.path.stem}-*{self.path.suffix}")
                if p != self.path
            )
            for old in rotated[: max(len(rotated) - self.options.keep_files, 0)]:
                old.unlink(missing_ok=True)
        self._open()

    def _write(self, data: bytes) -> None:
        self._open()
        assert self._fd is not None
        if self._size and self._size + len(data) > self.options.max_file_bytes:
            self._rotate()
            assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)
        if self.options.durability == "fsync":
            os.fsync(self._fd)

    async def send_batch(self, records: Sequence[Record]) -> None:
        if not records:
            return
        data = b"".join([r.to_json_bytes() + b"\n" for r in records])
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as e:
            # Disk full, USB stick pulled: retry; the outbox keeps the data.
            self.state.connected = False
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            raise RetryableSinkError(f"{self.path}: {e}") from e

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
