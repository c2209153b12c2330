"""Large files received from afar (model files, firmware images): streamed to
disk in chunks while their SHA-256 is computed, never held whole in memory.

:func:`receive` writes the chunks to a ``.part`` file next to ``final``,
refuses the upload once it passes ``max_size`` (nothing more is read), fsyncs,
checks the SHA-256 the uploader announced and lets the caller check more
(a signature over the digest) before the file is renamed into place. On any
failure the ``.part`` file is removed; one left by a crash is removed by
:func:`remove_parts` at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path


class BlobError(Exception):
    """An upload refused: ``code`` is too_large, invalid or digest_mismatch."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def remove_parts(directory: Path) -> None:
    """Remove what uploads cut short by a crash left behind (``*.part``)."""
    for part in directory.rglob("*.part"):
        with contextlib.suppress(OSError):
            part.unlink()


async def receive(
    chunks: AsyncIterator[bytes],
    final: Path,
    *,
    max_size: int,
    sha256: str | None = None,
    check: Callable[[bytes], None] | None = None,
    what: str = "file",
) -> tuple[str, int]:
    """Store ``chunks`` as ``final``; (hex SHA-256, size). ``check(digest)``
    may raise to refuse the file after it was received (a bad signature)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(f"{final.name}.{os.getpid()}.{time.monotonic_ns()}.part")
    digest = hashlib.sha256()
    size = 0
    try:
        f = await asyncio.to_thread(open, part, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_size:
                    raise BlobError("too_large", f"{what} over {max_size} bytes")
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(_sync, f)
        finally:
            await asyncio.to_thread(f.close)
        if size == 0:
            raise BlobError("invalid", f"empty {what}")
        raw = digest.digest()
        hexd = raw.hex()
        if sha256 is not None and sha256.lower() != hexd:
            raise BlobError("digest_mismatch", f"SHA-256 is {hexd}, the uploader said {sha256}")
        if check is not None:
            check(raw)
        await asyncio.to_thread(os.replace, part, final)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    return hexd, size


def _sync(f: object) -> None:
    f.flush()  # type: ignore[attr-defined]
    os.fsync(f.fileno())  # type: ignore[attr-defined]
