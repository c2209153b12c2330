"""Reading an HTTP body whole, up to a limit.

aiohttp's ``StreamReader.read(n)`` returns what has arrived so far, at most
``n`` bytes, not ``n`` bytes: one call cuts a body that came in several TCP
segments (a 500 kB CSV import kept its first 3,201 rows; a cloud's command
poll answer of a few segments failed to parse). Every bounded body read goes
through :func:`read_capped`."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson


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


class BodyError(ValueError):
    """A request body refused by :func:`read_json_object`; ``too_large``
    tells an over-limit body from one that is not a JSON object."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


async def read_json_object(
    content: aiohttp.StreamReader, limit: int, content_length: int | None = None
) -> dict[str, Any]:
    """A JSON object body of at most ``limit`` bytes (an empty body is
    ``{}``), read whole; :class:`BodyError` otherwise. ``content_length``
    (the request's header, if any) refuses a body announced too large
    before reading it."""
    if content_length is not None and content_length > limit:
        raise BodyError(f"body over {limit} bytes", too_large=True)
    raw = await read_capped(content, limit)
    if len(raw) > limit:
        raise BodyError(f"body over {limit} bytes", too_large=True)
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as e:
        raise BodyError(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BodyError("body must be a JSON object")
    return body
