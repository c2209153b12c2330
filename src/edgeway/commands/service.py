"""The durable command queue and its dispatcher.

Configuration (defaults shown; see docs/commands.md)::

    commands:
      max_per_device: 1000     # unfinished commands per device
      default_ttl: 1h          # time to wait for the device before EXPIRED
      result_timeout: 30s      # time after delivery for a result before TIMED_OUT
      mqtt:
        topic: devices/{device_id}/commands/{name}

What it promises (guarantee 7 of DESIGN.md):

* :meth:`CommandService.submit` returns only once the command is committed
  to ``commands.db`` (SQLite WAL, ``synchronous=FULL`` with ``durability:
  fsync``): "queued" means on disk. Submits of one loop iteration share one
  commit (:class:`~edgeway.storage.sqlite.Database`).
* Per device, commands go out in the order they were queued (FIFO), one at a
  time until the device's transport confirmed the previous one (DELIVERED);
  over a transport that keeps a device's messages in order (MQTT: one
  connection, QoS 1; a downlink with ``ordered = True``) up to
  :data:`ORDERED_IN_FLIGHT` go out before the first is confirmed. Results
  may come back in any order.
* Every state change is committed before it is acted on: a command is marked
  SENT (attempts + 1) on disk *before* it is handed to the transport. After a
  kill -9, commands found SENT or DELIVERED-without-result are sent again with
  ``redelivery: true`` and the same id; QUEUED ones go out as usual. None is
  lost; a device that remembers ids runs each once. (A command submitted with
  :meth:`CommandService.submit_journaled` goes out before its insert and SENT
  are committed: the caller's journal sends it again, same id, after a kill.)
* A command ends in exactly one terminal state: SUCCEEDED, FAILED (the device
  said so, or its protocol can never take it), EXPIRED (its time to live ended
  before delivery), TIMED_OUT (delivered, no result in time) or CANCELLED.
* A duplicate idempotency key (per device) returns the existing command
  instead of queueing a second one, while that command is kept in history.

Memory: unfinished commands are held in memory (bounded by
``max_per_device`` per device); finished ones are in the database only, plus
a small cache for callers waiting on them.

Every state change also goes up to the sinks as a record (through
``emit``; the gateway passes the outbox), tagged ``record_type: command``, in
the priority lane, so the cloud learns durably what became of its commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import re
import sqlite3
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import orjson

from edgeway.commands.model import Command, CommandResult, CommandState
from edgeway.downlink import DeliveryError, Downlink
from edgeway.reading import Origin, Reading
from edgeway.storage.sqlite import Database

if TYPE_CHECKING:
    from edgeway.commands.config import CommandsSection

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""Command names: they become one MQTT topic level, a CoAP/HTTP path segment
and a log field, so no '/', '+', '#', spaces or control characters."""
DEVICE_ID_MAX = 256
"""Longest device id a command may address (device ids elsewhere are topic
levels; 256 is far above any seen and bounds the index)."""
COMMAND_ID_RE = re.compile(r"^[0-9a-f]{1,64}$")
"""A caller-chosen command id (``uuid4().hex`` like the queue's own)."""
IDEMPOTENCY_KEY_MAX = 128
"""Longest idempotency key kept (a UUID is 36)."""
TERMINAL_CACHE = 1024
"""Finished commands kept in memory for ``get``/``wait`` right after they end;
older ones are read from the database."""
TICK = 0.25
"""Seconds between checks of time to live and result deadlines: the error of
an EXPIRED or TIMED_OUT transition is below this."""
PURGE_EVERY = 300.0
"""Seconds between purges of finished commands past ``history``."""
EVENT_TEXT_MAX = 4096
"""Longest result or error text carried in an uplink command record; the full
result stays in the queue's database."""

SCHEMA_V1 = """
CREATE TABLE commands(
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    params BLOB NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    result_timeout REAL NOT NULL,
    idem_key TEXT,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    result BLOB,
    error TEXT
);
CREATE UNIQUE INDEX commands_idem ON commands(device_id, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX commands_active ON commands(state) WHERE state IN ('queued', 'sent', 'delivered');
CREATE INDEX commands_device ON commands(device_id, seq);
CREATE INDEX commands_updated ON commands(updated_at);
"""

_COLS = (
    "seq, id, device_id, name, params, created_at, expires_at, result_timeout, idem_key, "
    "source, state, attempts, updated_at, delivered_at, result, error"
)


class CommandError(Exception):
    """A command the service refuses; ``code`` is stable for API clients:
    ``invalid``, ``queue_full``, ``not_found``, ``disabled``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class CommandStats:
    """Counters of the command queue (admin API, metrics)."""

    submitted: int = 0
    duplicates: int = 0
    """Submits answered with an existing command (same idempotency key)."""
    refused_full: int = 0
    refused_invalid: int = 0
    sent: int = 0
    redelivered: int = 0
    delivered: int = 0
    succeeded: int = 0
    failed: int = 0
    expired: int = 0
    timed_out: int = 0
    cancelled: int = 0
    results_unmatched: int = 0
    """Results for unknown or finished commands, or from another device."""
    active: int = 0
    """Unfinished commands now."""
    devices_waiting: int = 0
    """Devices with unfinished commands now."""


ORDERED_IN_FLIGHT = 16
"""Commands of one device handed to an ordered downlink (``ordered = True``)
before the first of them is confirmed. MQTT keeps a connection's QoS 1
messages in order, so a command need not wait for the PUBACK of the one
before it (which a busy device can take milliseconds to send); other
transports get one at a time."""


def _ordered(downlink: Downlink | None) -> bool:
    return bool(getattr(downlink, "ordered", False))


@dataclass(slots=True)
class _Record:
    """One unfinished command with what the dispatcher needs beside it."""

    cmd: Command
    result_timeout: float
    journaled: bool = False
    """Held in the caller's journal: its first hand-off does not wait for
    SENT on disk (see :meth:`CommandService.submit_journaled`)."""
    in_flight: bool = False
    """Handed to the transport, its delivery not confirmed yet (a pump holds
    its delivery in :attr:`CommandService._flights`)."""
    waiters: list[asyncio.Future[Command]] = field(default_factory=list)


class _Flight(NamedTuple):
    """A command handed to a downlink, its delivery not yet confirmed."""

    rec: _Record
    delivery: Awaitable[bool]
    ordered: bool
    """The downlink that took it keeps the device's commands in order: the
    next may follow before this one is confirmed."""


def _may_follow(flights: deque[_Flight]) -> bool:
    """Whether the device's next command may be handed over behind those in
    ``flights`` (not empty) before they are confirmed: over a downlink that
    keeps order, up to :data:`ORDERED_IN_FLIGHT` of them."""
    return flights[-1].ordered and len(flights) < ORDERED_IN_FLIGHT


class CommandService:
    """The queue of commands to devices; see the module docstring."""

    def __init__(
        self,
        data_dir: Path,
        config: CommandsSection,
        *,
        emit: Callable[[Sequence[Reading]], Any] | None = None,
        durability: Literal["fsync", "os"] = "fsync",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.db = Database(
            data_dir / "commands.db",
            migrations=[SCHEMA_V1],
            durability=durability,
            name="commands",
            wake_per_turn=True,
        )
        self.stats = CommandStats()
        self.downlinks: list[Downlink] = []
        self._emit = emit
        self._emits: list[Reading] = []
        """Command records of this turn of the event loop (:meth:`_emit_state`)."""
        self._clock = clock
        self._active: dict[str, _Record] = {}
        self._by_device: dict[str, deque[_Record]] = {}
        self._todo: dict[str, deque[_Record]] = {}
        """Per device, its commands not DELIVERED yet (to send, or handed
        over and not confirmed), in queue order: what :meth:`_next_to_send`
        looks through, without the delivered ones waiting for a result."""
        self._keys: dict[tuple[str, str], _Record] = {}
        self._finished: OrderedDict[str, Command] = OrderedDict()
        self._pumping: set[str] = set()
        self._rekick: set[str] = set()
        self._flights: dict[str, deque[_Flight]] = {}
        """Per pumping device: commands handed over, deliveries not yet
        confirmed, in order (more than one only over an ordered downlink)."""
        self._deadlines: list[tuple[float, int, str]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_seq = 1
        self._ticker: asyncio.Task[None] | None = None
        self._last_purge = 0.0
        self._closed = False

    # --------------------------------------------------------------- lifetime

    async def open(self) -> None:
        """Open the database and take back every unfinished command."""
        await self.db.open()

        def load(conn: sqlite3.Connection) -> tuple[int, list[tuple[Any, ...]]]:
            top = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM commands").fetchone()[0]
            rows = conn.execute(
                f"SELECT {_COLS} FROM commands WHERE state IN ('queued', 'sent', 'delivered') "
                "ORDER BY seq"
            ).fetchall()
            return int(top), rows

        top, rows = await self.db.read(load)
        self._next_seq = top + 1
        for row in rows:
            rec = _record_from_row(row)
            if rec.cmd.state is CommandState.DELIVERED:
                # Its result may have been lost with the process: send it
                # again (a redelivery, same id) so the device answers again.
                rec.cmd.state = CommandState.SENT
                rec.cmd.delivered_at = None
            self._remember(rec)
        self.stats.active = len(self._active)
        self._ticker = asyncio.create_task(self._tick_loop(), name="commands:timers")
        if rows:
            log.info(
                "command queue: %d unfinished commands for %d devices taken back",
                len(rows),
                len(self._by_device),
            )

    async def close(self) -> None:
        """Stop dispatching; unfinished commands stay on disk for the next start."""
        self._closed = True
        tasks = list(self._tasks)
        if self._ticker is not None:
            tasks.append(self._ticker)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for rec in self._active.values():
            for w in rec.waiters:
                if not w.done():
                    w.cancel()
        self._flush_emits()  # this turn's records, before the outbox closes
        await self.db.close()

    def add_downlink(self, downlink: Downlink) -> None:
        """A protocol that can reach devices; queued commands are tried on it."""
        self.downlinks.append(downlink)
        for device in list(self._by_device):
            self.device_reachable(device)

    def remove_downlink(self, downlink: Downlink) -> None:
        with contextlib.suppress(ValueError):
            self.downlinks.remove(downlink)

    # ---------------------------------------------------------------- callers

    async def submit(
        self,
        device_id: str,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        ttl: float | None = None,
        result_timeout: float | None = None,
        idempotency_key: str | None = None,
        source: str = "api",
        command_id: str | None = None,
        redelivery: bool = False,
    ) -> tuple[Command, bool]:
        """Queue a command; returns it (QUEUED, on disk) and whether it is new
        (False: an existing command with the same idempotency key).
        ``command_id``: the id to give it (a caller's journal holds it);
        ``redelivery``: it may have reached the device already."""
        if self._closed:
            raise CommandError("disabled", "the command queue is stopped")
        params = {} if params is None else params
        self._check(device_id, name, params, ttl, result_timeout, idempotency_key)
        if idempotency_key is not None:
            existing = self._keys.get((device_id, idempotency_key))
            if existing is not None:
                self.stats.duplicates += 1
                return existing.cmd, False
            found = await self.db.read(
                lambda conn: conn.execute(
                    f"SELECT {_COLS} FROM commands WHERE device_id = ? AND idem_key = ?",
                    (device_id, idempotency_key),
                ).fetchone()
            )
            existing = self._keys.get((device_id, idempotency_key))  # queued meanwhile
            if existing is not None:
                self.stats.duplicates += 1
                return existing.cmd, False
            if found is not None:
                self.stats.duplicates += 1
                return _record_from_row(found).cmd, False
        rec = self._new_record(
            device_id, name, params, ttl, result_timeout, idempotency_key, source, command_id
        )
        if redelivery:
            # It may have reached the device before a kill (the caller's own
            # journal says so): the first hand-off is flagged as a redelivery.
            rec.cmd.attempts = 1
        # Held in memory before the commit so a second submit with the same
        # key, or one that would overflow the queue, is answered consistently;
        # not dispatched before the commit.
        self._remember(rec, dispatch=False)
        try:
            await self.db.write(lambda conn: _insert(conn, rec))
        except BaseException:
            self._forget(rec)
            raise
        self._queued(rec)
        return rec.cmd, True

    def submit_journaled(
        self,
        device_id: str,
        name: str,
        params: dict[str, Any],
        *,
        ttl: float | None,
        idempotency_key: str,
        command_id: str,
        source: str,
    ) -> tuple[Command, asyncio.Future[None]]:
        """Queue a command the caller holds in a journal of its own (a rule
        transition in ``rules.db``) and submits again, with the same id and
        key, after a kill, until the returned future says it is stored here.

        Unlike :meth:`submit` it returns at once: the command may be handed to
        the transport before its row is committed here (one fsync less on a
        rule's path; guarantee 7 holds through the caller's journal: a copy
        lost here is submitted again with the same id, flagged as a
        redelivery). The future resolves when the row is committed; it fails
        if the commit did (the command may have gone out)."""
        if self._closed:
            raise CommandError("disabled", "the command queue is stopped")
        self._check(device_id, name, params, ttl, None, idempotency_key)
        existing = self._keys.get((device_id, idempotency_key))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if existing is not None:
            self.stats.duplicates += 1
            done.set_result(None)
            return existing.cmd, done
        rec = self._new_record(
            device_id, name, params, ttl, None, idempotency_key, source, command_id
        )
        rec.journaled = True
        self._remember(rec, dispatch=False)
        stored = self.db.write(lambda conn: _insert(conn, rec))
        stored.add_done_callback(functools.partial(self._journaled_stored, rec, done))
        self._queued(rec, now=True)
        return rec.cmd, done

    def _journaled_stored(
        self, rec: _Record, done: asyncio.Future[None], stored: asyncio.Future[None]
    ) -> None:
        if stored.cancelled():  # not known to be stored: the caller keeps it waiting
            done.cancel()
            return
        e = stored.exception()
        if e is not None:
            log.error("command %s not stored (it may have been sent): %s", rec.cmd.id, e)
            if rec.cmd.id in self._active:
                self._forget(rec)
        if not done.done():
            if e is None:
                done.set_result(None)
            else:
                done.set_exception(e)

    def _new_record(
        self,
        device_id: str,
        name: str,
        params: dict[str, Any],
        ttl: float | None,
        result_timeout: float | None,
        idempotency_key: str | None,
        source: str,
        command_id: str | None,
    ) -> _Record:
        """A new QUEUED command (CommandError if the device's queue is full)."""
        cfg = self.config
        queue = self._by_device.get(device_id)
        if queue is not None and len(queue) >= cfg.max_per_device:
            self.stats.refused_full += 1
            raise CommandError(
                "queue_full",
                f"device {device_id!r} has {len(queue)} unfinished commands "
                f"(commands.max_per_device = {cfg.max_per_device})",
            )
        if command_id is not None and not COMMAND_ID_RE.match(command_id):
            self.stats.refused_invalid += 1
            raise CommandError("invalid", "command id must be 1-64 of a-f 0-9")
        now = self._clock()
        cmd = Command(
            id=command_id or uuid.uuid4().hex,
            device_id=device_id,
            name=name,
            params=params,
            created_at=now,
            expires_at=now + (ttl if ttl is not None else cfg.default_ttl),
            seq=self._next_seq,
            idempotency_key=idempotency_key,
            source=source,
            updated_at=now,
        )
        self._next_seq += 1
        return _Record(cmd, result_timeout if result_timeout is not None else cfg.result_timeout)

    def _queued(self, rec: _Record, now: bool = False) -> None:
        self.stats.submitted += 1
        self._emit_state(rec.cmd)
        self.device_reachable(rec.cmd.device_id, now=now)

    def _check(
        self,
        device_id: str,
        name: str,
        params: Any,
        ttl: float | None,
        result_timeout: float | None,
        idempotency_key: str | None,
    ) -> None:
        cfg = self.config
        problem: str | None = None
        if not isinstance(device_id, str) or not 0 < len(device_id) <= DEVICE_ID_MAX:
            problem = f"device id must be 1-{DEVICE_ID_MAX} characters"
        elif any(c in device_id for c in "/+#") or not device_id.isprintable():
            problem = "device id cannot contain '/', '+', '#' or control characters"
        elif not isinstance(name, str) or not NAME_RE.match(name):
            problem = "command name must be 1-64 of A-Z a-z 0-9 _ . : -"
        elif not isinstance(params, dict):
            problem = "params must be a JSON object"
        elif len(orjson.dumps(params)) > cfg.max_params_bytes:
            problem = f"params are larger than commands.max_params_bytes ({cfg.max_params_bytes})"
        elif ttl is not None and not 0 < ttl <= cfg.max_ttl:
            problem = f"ttl must be above 0 and at most commands.max_ttl ({cfg.max_ttl:g} s)"
        elif result_timeout is not None and not 0 < result_timeout <= cfg.max_ttl:
            problem = "timeout must be above 0 and at most commands.max_ttl"
        elif idempotency_key is not None and (
            not isinstance(idempotency_key, str)
            or not 0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX
        ):
            problem = f"idempotency key must be 1-{IDEMPOTENCY_KEY_MAX} characters"
        if problem is not None:
            self.stats.refused_invalid += 1
            raise CommandError("invalid", problem)

    async def _inactive(self, command_id: str) -> Command:
        """A command that is not active: from history, or CommandError not_found."""
        cmd = await self.get(command_id)
        if cmd is None:
            raise CommandError("not_found", f"no command {command_id!r}")
        return cmd

    async def cancel(self, command_id: str) -> Command:
        """Cancel an unfinished command (a finished one is returned as it is).
        A command already SENT may still run on the device: cancelling it only
        stops the gateway from sending it again and from waiting for it."""
        rec = self._active.get(command_id)
        if rec is None:
            return await self._inactive(command_id)
        await self._finish(rec, CommandState.CANCELLED, error="cancelled")
        return rec.cmd

    async def get(self, command_id: str) -> Command | None:
        """The command with this id, unfinished or in history."""
        rec = self._active.get(command_id)
        if rec is not None:
            return rec.cmd
        cmd = self._finished.get(command_id)
        if cmd is not None:
            return cmd
        row = await self.db.read(
            lambda conn: conn.execute(
                f"SELECT {_COLS} FROM commands WHERE id = ?", (command_id,)
            ).fetchone()
        )
        return None if row is None else _record_from_row(row).cmd

    async def list(
        self,
        *,
        device_id: str | None = None,
        state: str | None = None,
        limit: int = 100,
        before_seq: int | None = None,
    ) -> list[Command]:
        """Commands, newest first, filtered; page with ``before_seq``."""
        where: list[str] = []
        args: list[Any] = []
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = f"SELECT {_COLS} FROM commands"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(max(1, min(limit, 1000)))
        rows = await self.db.read(lambda conn: conn.execute(sql, args).fetchall())
        out = []
        for row in rows:
            rec = self._active.get(row[1])
            out.append(rec.cmd if rec is not None else _record_from_row(row).cmd)
        return out

    async def wait(self, command_id: str, within: float) -> Command:
        """The command once finished, or as it is after ``within`` seconds."""
        rec = self._active.get(command_id)
        if rec is None:
            return await self._inactive(command_id)
        fut: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        rec.waiters.append(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), within)
        except TimeoutError:
            return rec.cmd
        finally:
            with contextlib.suppress(ValueError):
                rec.waiters.remove(fut)

    # ---------------------------------------------------------- downlink events

    def device_reachable(self, device_id: str, now: bool = False) -> None:
        """Send what is queued for ``device_id`` (a downlink says it is back).

        ``now``: a journaled command just queued may be handed to the
        transport in this call, when it is the device's next and nothing of
        the device's is under way (no task's turn of the event loop first: a
        rule's command leaves in the turn that made its transition)."""
        if self._closed or device_id not in self._by_device:
            return
        if device_id in self._pumping:
            flights = self._flights.get(device_id)
            if now and flights and _may_follow(flights):
                # The device's pump waits for a confirmation; over an ordered
                # transport this command need not wait behind it.
                sent = self._send_journaled_now(device_id, ordered_only=True)
                if sent is not None:
                    flights.append(sent)
                    return
            self._rekick.add(device_id)
            return
        self._pumping.add(device_id)
        flights = self._flights[device_id] = deque()
        first = self._send_journaled_now(device_id) if now else None
        if first is not None:
            flights.append(first)
        task = asyncio.get_running_loop().create_task(
            self._pump(device_id, flights), name=f"commands:{device_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def report(self, result: CommandResult) -> bool:
        """A device's answer; False (and counted) if it matches no command of
        that device that is waiting for one."""
        rec = self._active.get(result.command_id)
        if rec is None or rec.cmd.device_id != result.device_id:
            self.stats.results_unmatched += 1
            log.debug(
                "command result not matched",
                extra={"fields": {"device_id": result.device_id, "id": result.command_id}},
            )
            return False
        cmd = rec.cmd
        if cmd.state is not CommandState.DELIVERED:
            # The answer overtook the transport's confirmation (both in one
            # read): an answer proves delivery. Stored with the final state.
            self._delivered(rec)
            self.stats.delivered += 1
            self._emit_state(cmd)
        state = CommandState.SUCCEEDED if result.success else CommandState.FAILED
        res = result.result
        error: str | None
        if res is not None and len(orjson.dumps(res)) > self.config.max_params_bytes:
            res = None
            error = "result larger than commands.max_params_bytes (dropped)"
        else:
            error = result.error
        task = asyncio.get_running_loop().create_task(
            self._finish(rec, state, result=res, error=error)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    # --------------------------------------------------------------- dispatch

    def _send_journaled_now(self, device_id: str, *, ordered_only: bool = False) -> _Flight | None:
        """The first step of :meth:`_pump` for a journaled command, done at
        once (:meth:`_hand_over_journaled`). None if anything asks for the
        task's ordinary path (not the device's next, expired, no downlink;
        with ``ordered_only``, a downlink that does not keep order)."""
        rec = self._next_to_send(device_id)
        if rec is None or not rec.journaled:
            return None
        cmd = rec.cmd
        if cmd.expires_at <= self._clock():
            return None
        downlink = self._downlink_for(cmd, ordered_only)
        if downlink is None:
            return None
        return self._hand_over_journaled(rec, downlink)

    def _downlink_for(self, cmd: Command, ordered_only: bool) -> Downlink | None:
        """The first downlink that reaches ``cmd``'s device now (None if none
        does or, with ``ordered_only``, if that one does not keep order)."""
        downlink = next((d for d in self.downlinks if d.reachable(cmd)), None)
        if downlink is None or (ordered_only and not _ordered(downlink)):
            return None
        return downlink

    def _hand_over_journaled(self, rec: _Record, downlink: Downlink) -> _Flight:
        """SENT and handed over with nothing awaited: the caller's journal
        stands in for SENT on disk (a copy lost here comes back as a
        redelivery), so SENT is written behind, after the insert (one
        writer thread, in order)."""
        rec.journaled = False
        self._mark_sent(rec.cmd)
        self.db.write(functools.partial(_update, c=rec.cmd)).add_done_callback(_log_failure)
        return self._in_flight(rec, downlink)

    def _in_flight(self, rec: _Record, downlink: Downlink) -> _Flight:
        rec.in_flight = True
        return _Flight(rec, self._hand_over(rec.cmd, downlink), _ordered(downlink))

    def _mark_sent(self, cmd: Command) -> None:
        cmd.attempts += 1
        cmd.state = CommandState.SENT
        cmd.updated_at = self._clock()

    def _hand_over(self, cmd: Command, downlink: Downlink) -> Awaitable[bool]:
        """Count, record and deliver a command marked SENT; its delivery (a
        refusal by the transport as a failed one, for :meth:`_confirm`)."""
        self.stats.sent += 1
        if cmd.redelivery:
            self.stats.redelivered += 1
        self._emit_state(cmd)
        try:
            return downlink.deliver(cmd)
        except DeliveryError as e:
            failed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            return failed

    async def _pump(self, device_id: str, flights: deque[_Flight]) -> None:
        """Hand this device's commands to a downlink in order, one until its
        delivery is confirmed, then the next; over an ordered downlink up to
        :data:`ORDERED_IN_FLIGHT` before the first is confirmed (``flights``:
        those already handed over, by :meth:`_send_journaled_now`)."""
        # Once the device went away, what is in flight learns its fate
        # (delivered, or sent again when the device is back); nothing more goes.
        gone = False
        try:
            while not self._closed:
                if not gone and (not flights or _may_follow(flights)):
                    sent = await self._send_next(device_id, ordered_only=bool(flights))
                    if sent is not None:
                        flights.append(sent)
                        continue
                if not flights:
                    return
                # Left in ``flights`` while it is confirmed: a rule's command
                # queued meanwhile sees it and may follow it at once
                # (device_reachable).
                flight = flights[0]
                ok = await self._confirm(flight.rec, flight.delivery)
                flights.popleft()
                flight.rec.in_flight = False
                if not ok and device_id not in self._rekick:
                    gone = True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("command dispatch for device %r failed", device_id)
        finally:
            for flight in flights:
                flight.rec.in_flight = False
            self._flights.pop(device_id, None)
            self._pumping.discard(device_id)
            if device_id in self._rekick and not self._closed:
                self._rekick.discard(device_id)
                self.device_reachable(device_id)

    async def _send_next(self, device_id: str, *, ordered_only: bool = False) -> _Flight | None:
        """Mark the device's next command SENT and hand it over; None when
        there is none to send now (nothing queued, no downlink takes it;
        with ``ordered_only``, none that keeps order)."""
        while not self._closed:
            self._rekick.discard(device_id)
            rec = self._next_to_send(device_id)
            if rec is None:
                return None
            cmd = rec.cmd
            if cmd.expires_at <= self._clock():
                await self._finish(rec, CommandState.EXPIRED, error="time to live ended")
                continue
            downlink = self._downlink_for(cmd, ordered_only)
            if downlink is None:
                return None
            if rec.journaled:
                return self._hand_over_journaled(rec, downlink)
            before = (cmd.state, cmd.attempts, cmd.updated_at)
            self._mark_sent(cmd)
            await self.db.write(functools.partial(_update, c=cmd))
            if cmd.state is not CommandState.SENT:  # cancelled meanwhile
                continue
            if not downlink.reachable(cmd):
                # Its room went to another device's command while SENT was
                # being stored (pumps run per device; an MQTT broker's
                # Receive Maximum is shared): delivering now would break
                # the broker's limit. Back as it was, until the next kick.
                cmd.state, cmd.attempts, cmd.updated_at = before
                await self.db.write(functools.partial(_update, c=cmd))
                return None
            return self._in_flight(rec, downlink)
        return None

    async def _confirm(self, rec: _Record, delivery: Awaitable[bool]) -> bool:
        """Wait for the transport to confirm ``rec``'s delivery; False when
        the device went away (it gets the command again, flagged as a
        redelivery, when it is back) and the pump should stop."""
        cmd = rec.cmd
        try:
            ok = await asyncio.wait_for(delivery, rec.result_timeout)
        except DeliveryError as e:
            await self._finish(rec, CommandState.FAILED, error=str(e))
            return True
        except TimeoutError:
            ok = False
        if cmd.state is not CommandState.SENT:
            return True  # answered (or cancelled) before the transport's ack
        if not ok:
            return False
        at = self._delivered(rec)
        self.stats.delivered += 1
        heapq.heappush(self._deadlines, (at + rec.result_timeout, cmd.seq, cmd.id))
        # Not awaited: DELIVERED on disk only informs (after a restart a
        # delivered command without a result is sent again anyway), and the
        # device's answer usually follows within the same commit window, so
        # the two share one commit.
        self.db.write(functools.partial(_update, c=cmd)).add_done_callback(_log_failure)
        self._emit_state(cmd)
        return True

    def _next_to_send(self, device_id: str) -> _Record | None:
        todo = self._todo.get(device_id)
        if todo:
            for rec in todo:
                if not rec.in_flight:
                    return rec
        return None

    def _delivered(self, rec: _Record) -> float:
        """Mark ``rec`` DELIVERED (in memory); returns when."""
        cmd = rec.cmd
        cmd.state = CommandState.DELIVERED
        at = cmd.delivered_at = cmd.updated_at = self._clock()
        self._untodo(rec)
        return at

    def _untodo(self, rec: _Record) -> None:
        todo = self._todo.get(rec.cmd.device_id)
        if todo is not None:
            if todo and todo[0] is rec:
                todo.popleft()  # the usual case: delivered in order
            else:
                with contextlib.suppress(ValueError):
                    todo.remove(rec)
            if not todo:
                del self._todo[rec.cmd.device_id]

    async def _finish(
        self,
        rec: _Record,
        state: CommandState,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        cmd = rec.cmd
        if cmd.state.terminal:
            return
        cmd.state = state
        cmd.result = result
        cmd.error = error if state is not CommandState.SUCCEEDED else None
        cmd.updated_at = self._clock()
        self._forget(rec)
        self._finished[cmd.id] = cmd
        while len(self._finished) > TERMINAL_CACHE:
            self._finished.popitem(last=False)
        counter = state.value
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        try:
            await self.db.write(lambda conn: _update(conn, cmd))
        finally:
            self._emit_state(cmd)
            for w in rec.waiters:
                if not w.done():
                    w.set_result(cmd)
            # The next command of the device may go out now.
            if cmd.device_id in self._by_device:
                self.device_reachable(cmd.device_id)

    # ---------------------------------------------------------------- timers

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("command queue timer failed")

    async def _tick(self) -> None:
        now = self._clock()
        # Downlinks that poll their devices (Modbus, OPC-UA) say nothing when
        # a device comes back: try the ones with commands waiting.
        for dl in self.downlinks:
            for device in getattr(dl, "devices", ()):
                if device in self._by_device and device not in self._pumping:
                    self.device_reachable(device)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, cid = heapq.heappop(deadlines)
            rec = self._active.get(cid)
            if rec is None:
                continue
            cmd = rec.cmd
            if cmd.state is CommandState.DELIVERED:
                if cmd.delivered_at is not None and cmd.delivered_at + rec.result_timeout <= now:
                    await self._finish(rec, CommandState.TIMED_OUT, error="no result in time")
            elif cmd.expires_at <= now:
                await self._finish(rec, CommandState.EXPIRED, error="time to live ended")
        if now - self._last_purge >= PURGE_EVERY:
            self._last_purge = now
            await self._purge(now)

    async def _purge(self, now: float) -> None:
        cfg = self.config
        cutoff = now - cfg.history
        keep = cfg.max_history

        def purge(conn: sqlite3.Connection) -> int:
            done = "state NOT IN ('queued', 'sent', 'delivered')"
            n = conn.execute(f"DELETE FROM commands WHERE {done} AND updated_at < ?", (cutoff,))
            total = n.rowcount
            count = conn.execute(f"SELECT COUNT(*) FROM commands WHERE {done}").fetchone()[0]
            if count > keep:
                total += conn.execute(
                    f"DELETE FROM commands WHERE seq IN (SELECT seq FROM commands WHERE {done} "
                    "ORDER BY seq LIMIT ?)",
                    (count - keep,),
                ).rowcount
            return int(total)

        await self.db.write(purge)

    # -------------------------------------------------------------- bookkeeping

    def _remember(self, rec: _Record, *, dispatch: bool = True) -> None:
        cmd = rec.cmd
        self._active[cmd.id] = rec
        self._by_device.setdefault(cmd.device_id, deque()).append(rec)
        if cmd.state is not CommandState.DELIVERED:
            self._todo.setdefault(cmd.device_id, deque()).append(rec)
        if cmd.idempotency_key is not None:
            self._keys[(cmd.device_id, cmd.idempotency_key)] = rec
        heapq.heappush(self._deadlines, (cmd.expires_at, cmd.seq, cmd.id))
        if cmd.state is CommandState.DELIVERED and cmd.delivered_at is not None:
            heapq.heappush(
                self._deadlines, (cmd.delivered_at + rec.result_timeout, cmd.seq, cmd.id)
            )
        self.stats.active = len(self._active)
        self.stats.devices_waiting = len(self._by_device)

    def _forget(self, rec: _Record) -> None:
        cmd = rec.cmd
        self._active.pop(cmd.id, None)
        queue = self._by_device.get(cmd.device_id)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(rec)
            if not queue:
                del self._by_device[cmd.device_id]
        self._untodo(rec)
        if cmd.idempotency_key is not None:
            self._keys.pop((cmd.device_id, cmd.idempotency_key), None)
        self.stats.active = len(self._active)
        self.stats.devices_waiting = len(self._by_device)

    def _emit_state(self, cmd: Command) -> None:
        if self._emit is None:
            return
        metrics: dict[str, Any] = {
            "command_id": cmd.id,
            "command": cmd.name,
            "state": cmd.state.value,
            "attempts": cmd.attempts,
            "source": cmd.source,
        }
        key = cmd.idempotency_key
        if key is not None:
            # The caller's own id for its request (the cloud's id, without
            # the "cloud:" prefix), so it can match records to requests.
            metrics["request_id"] = key.removeprefix("cloud:")
        if cmd.error is not None:
            metrics["error"] = cmd.error[:EVENT_TEXT_MAX]
        if cmd.result is not None:
            metrics["result"] = orjson.dumps(cmd.result).decode()[:EVENT_TEXT_MAX]
        reading = Reading(
            cmd.device_id,
            cmd.updated_at,
            metrics,
            Origin("commands", cmd.name, message_id=cmd.id),
            {"record_type": "command"},
            priority=1,
        )
        # The records of one turn of the event loop go to the outbox together,
        # at its end: a burst of commands (rules firing for many devices at
        # once) is one submit, not two per command in the middle of sending.
        self._emits.append(reading)
        if len(self._emits) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._flush_emits)
            except RuntimeError:  # no loop running (a synchronous caller)
                self._flush_emits()

    def _flush_emits(self) -> None:
        readings, self._emits = self._emits, []
        if not readings or self._emit is None:
            return
        try:
            fut = self._emit(readings)
        except Exception:
            log.exception("%d command records could not be stored", len(readings))
            return
        if isinstance(fut, asyncio.Future):
            fut.add_done_callback(_log_emit_failure)


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("command state not stored: %s", fut.exception())


def _log_emit_failure(fut: asyncio.Future[Any]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.warning("command record not stored: %s", exc)


def _insert(conn: sqlite3.Connection, rec: _Record) -> None:
    c = rec.cmd
    conn.execute(
        f"INSERT INTO commands({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            c.seq,
            c.id,
            c.device_id,
            c.name,
            orjson.dumps(c.params),
            c.created_at,
            c.expires_at,
            rec.result_timeout,
            c.idempotency_key,
            c.source,
            c.state.value,
            c.attempts,
            c.updated_at,
            c.delivered_at,
            None if c.result is None else orjson.dumps(c.result),
            c.error,
        ),
    )


def _update(conn: sqlite3.Connection, c: Command) -> None:
    conn.execute(
        "UPDATE commands SET state = ?, attempts = ?, updated_at = ?, delivered_at = ?, "
        "result = ?, error = ? WHERE seq = ?",
        (
            c.state.value,
            c.attempts,
            c.updated_at,
            c.delivered_at,
            None if c.result is None else orjson.dumps(c.result),
            c.error,
            c.seq,
        ),
    )


def _record_from_row(row: tuple[Any, ...]) -> _Record:
    (
        seq,
        cid,
        device_id,
        name,
        params,
        created_at,
        expires_at,
        result_timeout,
        idem_key,
        source,
        state,
        attempts,
        updated_at,
        delivered_at,
        result,
        error,
    ) = row
    cmd = Command(
        id=cid,
        device_id=device_id,
        name=name,
        params=orjson.loads(params),
        created_at=created_at,
        expires_at=expires_at,
        seq=seq,
        idempotency_key=idem_key,
        source=source,
        state=CommandState(state),
        attempts=attempts,
        updated_at=updated_at,
        delivered_at=delivered_at,
        result=None if result is None else orjson.loads(result),
        error=error,
    )
    return _Record(cmd, result_timeout)


__all__ = [
    "CommandError",
    "CommandService",
    "CommandStats",
]
