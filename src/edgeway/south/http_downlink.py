"""Commands to HTTP devices: long-poll, then POST the result.

A device asks for its next command with::

    GET /devices/{device_id}/commands?wait=30        Authorization: Bearer <its token>

and gets ``200`` with the command (``{"id", "name", "params", "expires_at"
[, "redelivery": true]}``) as soon as one is queued, or ``204`` after
``wait`` seconds (at most ``http_ingest.command_poll_max``) with none. The
command counts as delivered once its response is written. The device
answers with::

    POST /devices/{device_id}/commands/{command_id}/result
    {"status": "ok" | "error", "result": ..., "error": "..."}

``200 {"accepted": true}``; ``404`` when no command of that device waits for
a result (unknown, finished, another device's).

A token is required for both, even where ``allow_anonymous`` lets telemetry
in: a command can carry what only its device should see, and whoever polls
takes it. ``commands_allow_anonymous: true`` lifts that (a trusted network).
One poll per device is kept (a newer poll replaces the older, which gets
``409``), and ``max_command_polls`` polls in all (``503`` beyond), so the
memory pollers take is bounded. When the gateway stops, waiting polls are
answered at once with ``503`` and ``Retry-After`` rather than holding the
stop for up to ``wait`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from edgeway.commands.model import CommandResult
from edgeway.downlink import DownlinkEvents

if TYPE_CHECKING:
    from edgeway.commands.model import Command

log = logging.getLogger(__name__)


class _Poll:
    """One waiting GET: the command handed to it, and whether it was written."""

    __slots__ = ("command", "written")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.command: asyncio.Future[Command] = loop.create_future()
        self.written: asyncio.Future[bool] = loop.create_future()


class _Superseded(Exception):
    """A newer poll of the same device took this one's place."""


class _Stopping(Exception):
    """The listener is stopping."""


class HttpDownlink:
    """The HTTP ingest listener's :class:`~edgeway.downlink.Downlink`."""

    name = "http"

    def __init__(self, events: DownlinkEvents, *, max_polls: int) -> None:
        self.events = events
        self.max_polls = max_polls
        self._polls: dict[str, _Poll] = {}
        self._closed = False

    def open(self) -> None:
        """The listener (re)starts: polls are served again."""
        self._closed = False

    def close(self) -> None:
        """The listener is stopping: answer every waiting poll now (503), and
        any poll still arriving; their commands stay queued for the next start."""
        self._closed = True
        for poll in self._polls.values():
            if not poll.command.done():
                poll.command.set_exception(_Stopping())

    def reachable(self, command: Command) -> bool:
        poll = self._polls.get(command.device_id)
        return poll is not None and not poll.command.done()

    def deliver(self, command: Command) -> asyncio.Future[bool]:
        poll = self._polls.get(command.device_id)
        if poll is None or poll.command.done():
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            fut.set_result(False)
            return fut
        poll.command.set_result(command)
        return poll.written

    async def poll(self, request: web.Request, device_id: str, wait: float) -> web.StreamResponse:
        """Serve one long-poll GET for ``device_id``."""
        loop = asyncio.get_running_loop()
        if self._closed:
            return _stopping_response()
        old = self._polls.get(device_id)
        if old is None and len(self._polls) >= self.max_polls:
            return web.json_response(
                {"error": "busy", "detail": "too many devices polling"},
                status=503,
                headers={"Retry-After": "5"},
            )
        if old is not None and not old.command.done():
            old.command.set_exception(_Superseded())  # the older poll answers 409
        poll = _Poll(loop)
        self._polls[device_id] = poll
        try:
            self.events.device_reachable(device_id)
            try:
                async with asyncio.timeout(wait):
                    command = await asyncio.shield(poll.command)
            except TimeoutError:
                return web.Response(status=204)
            except _Superseded:
                return web.json_response(
                    {"error": "superseded", "detail": "a newer poll took its place"}, status=409
                )
            except _Stopping:
                return _stopping_response()
            body = orjson.dumps(command.device_payload())
            resp = web.Response(body=body, content_type="application/json")
            try:
                await resp.prepare(request)
                await resp.write_eof()
            except (ConnectionError, asyncio.CancelledError):
                if not poll.written.done():
                    poll.written.set_result(False)
                raise
            if not poll.written.done():
                poll.written.set_result(True)
            return resp
        finally:
            if self._polls.get(device_id) is poll:
                del self._polls[device_id]
            if not poll.command.done():
                poll.command.cancel()
            if not poll.written.done():
                poll.written.set_result(False)  # handed over, never written

    def result(self, device_id: str, command_id: str, body: bytes) -> web.Response:
        """Take a device's answer to ``command_id``."""
        try:
            doc: Any = orjson.loads(body) if body else {}
            result = CommandResult.from_payload(device_id, doc, command_id)
        except (ValueError, orjson.JSONDecodeError) as e:
            return web.json_response({"error": "invalid_payload", "detail": str(e)}, status=400)
        if not self.events.report(result):
            return web.json_response(
                {"error": "not_found", "detail": "no command of this device waits for a result"},
                status=404,
            )
        return web.json_response({"accepted": True})


def _stopping_response() -> web.Response:
    return web.json_response(
        {"error": "stopping", "detail": "the gateway is stopping"},
        status=503,
        headers={"Retry-After": "5"},
    )
