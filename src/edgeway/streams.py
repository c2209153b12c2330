"""Reading an HTTP body whole, up to a limit.

aiohttp's ``StreamReader.read(n)`` returns what has arrived so far, at most
``n`` bytes, not ``n`` bytes: one call cuts a body that came in several TCP
segments (a 500 kB CSV import kept its first 3,201 rows; a cloud's command
poll answer of a few segments failed to parse). Every bounded body read goes
through :func:`read_capped`."""

from __future__ import annotations

import aiohttp


async def read_capped(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes when it is longer (the
    caller refuses that as too large, or keeps the first ``limit``)."""
    chunks: list[bytes] = []
    n = 0
    while n <= limit:
        chunk = await content.read(limit + 1 - n)
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)
