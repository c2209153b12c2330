"""The sink runner: moves one sink's records from the outbox to the remote side.

Configuration: none of its own; a runner is started for every entry of
``sinks:``, and the sink's own options set its batch size and wait::

    sinks:
      - name: cloud
        url: https://ingest.example.com/v1/telemetry
        options: {max_records: 500, max_wait: 20ms}

Loop: read a batch at the sink's cursor, send it, and only when the sink
returns (the remote side confirmed) hand the confirmation to the outbox, which
clears the sink's bit in the same group commit as the next readings. Failures
retry the *same* batch (same record ids) forever with capped exponential
backoff and full jitter, or after the ``Retry-After`` the remote side named; a
:class:`~edgeway.sinks.base.PermanentSinkError` moves the batch to the
dead-letter table and the runner goes on. Each sink has its own runner, so a
sink that is down only ever waits for itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from edgeway.outbox.store import Batch, Outbox
from edgeway.ratelimit_log import RateLimitedLog
from edgeway.sinks.base import PermanentSinkError, RetryableSinkError, Sink

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0
"""Default seconds between probes of a sink that is backing off after a
connection failure (``SinkConfig.probe_interval``)."""

RETRY_AFTER_MAX = 3600.0
"""Longest ``Retry-After`` honoured (seconds). A server asking for more than an
hour is more likely misconfigured than busy; we would rather probe hourly."""

ERROR_LOG_INTERVAL = 60.0
"""Seconds between repeated error log lines of one failing sink (the first
failure and the recovery are always logged; the lines between are counted)."""


@dataclass(slots=True)
class _Flight:
    """A batch being delivered while others are (see :meth:`SinkRunner._launch`):
    its devices, and the delivery, whose result is the batch as sent."""

    devices: set[str]
    task: asyncio.Task[tuple[bool, Batch]]


class SinkRunner:
    """Drives one :class:`~edgeway.sinks.base.Sink` from the outbox.

    The gateway owns the sink's ``start``/``close``; the runner only sends.
    ``run`` runs until cancelled.
    """

    def __init__(
        self,
        outbox: Outbox,
        sink: Sink,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 60.0,
        probe_interval: float = PROBE_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        """``probe_interval``: see :meth:`wait_backoff` (0: no probes); ``rng``
        draws the backoff jitter (tests pass a fixed one)."""
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if probe_interval < 0:
            raise ValueError("need probe_interval >= 0")
        self.outbox = outbox
        self.sink = sink
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.probe_interval = probe_interval
        self._rng = rng if rng is not None else random.Random()
        self._failing_since: float | None = None
        self._failures = 0
        """Failed sends since the last success."""
        self._confirm_failures = 0
        """Confirmations in a row whose commit failed (a full disk)."""
        self._errors = RateLimitedLog(log, ERROR_LOG_INTERVAL)
        self._last_error = ""
        self._flights: deque[_Flight] = deque()
        """Batches in flight at once, oldest first (a sink that keeps up and
        takes several: :meth:`~edgeway.sinks.base.Sink.max_batches_in_flight`)."""
        self._confirming: deque[asyncio.Future[None]] = deque()
        """Confirmations of landed flights, oldest first, not settled yet."""
        self._landed: asyncio.Future[None] | None = None
        self._flight_error: BaseException | None = None
        """A flight ended in an exception (not a send failure: those retry):
        no later flight is confirmed, and the runner raises it."""

    async def run(self) -> None:
        """Forever: read a batch from the cursor, send, advance. Cancel to stop.

        While a batch is being sent, the next one is read (when the batch holds
        no rows read ahead of the cursor), so disk reads overlap the network.
        If priority rows (alarms, command records) are committed after that
        read, the batch read ahead is given back unsent and read again, so
        they go first: ahead of a priority row only the batch on the wire
        (being sent or retried) when it was committed.

        A sink that keeps up and takes several batches at once (the MQTT
        sink with several connections) gets the next batch while the previous
        one waits for its acknowledgement, when the two share no device
        (:meth:`_launch`); confirmations stay in order.
        """
        outbox, sink, name = self.outbox, self.sink, self.sink.name
        prev: asyncio.Future[None] | None = None
        prev_out_of_order = False
        caught_up = False
        prefetch: asyncio.Task[Batch] | None = None
        prefetch_mark = 0
        try:
            while True:
                if caught_up:
                    await outbox.wait_for_rows(name, 1)
                    if sink.max_wait > 0:
                        # Let a batch fill, but never wait longer than max_wait.
                        await outbox.wait_for_rows(
                            name, sink.max_batch_records, within=sink.max_wait
                        )
                if prev is not None and prev_out_of_order:
                    # Rows read ahead of the cursor must have their bit cleared
                    # before the next read, or it would send them again.
                    await self._settle(prev)
                    prev = None
                prefetched = prefetch is not None
                if prefetch is not None:
                    batch = await prefetch
                    prefetch = None
                    if (
                        batch.records
                        and outbox.priority_mark(name) != prefetch_mark
                        and outbox.give_back(batch)
                    ):
                        # Priority rows (an alarm) came after this batch was
                        # read ahead: read again, so they go before it.
                        prefetched = False
                        batch = await self._read()
                else:
                    batch = await self._read()
                caught_up = not batch.more
                if not batch.records:
                    continue
                depth = sink.max_batches_in_flight()
                if caught_up and not batch.out_of_order and depth > 1:
                    if prev is not None:  # the oldest confirmation: settled first
                        self._confirming.appendleft(prev)
                        prev = None
                    await self._launch(batch, depth)
                    prev_out_of_order = False
                    continue
                if self._flights or self._confirming:
                    prev = await self._land_all(prev)
                if batch.more and not batch.out_of_order:
                    prefetch_mark = outbox.priority_mark(name)
                    prefetch = asyncio.create_task(self._read(), name=f"prefetch:{name}")
                delivered, batch = await self._deliver(batch, stale=prefetched)
                if prev is not None:
                    # In order, one confirmation in flight. If it failed, the
                    # outbox rewound this sink and ignores the confirmation of a
                    # batch read before that: the batch is read and sent again.
                    await self._settle(prev)
                # Caught up: the confirmation may ride with the next readings.
                prev = self._conclude(delivered, batch, linger=caught_up)
                prev_out_of_order = batch.out_of_order
        finally:
            if prefetch is not None:
                prefetch.cancel()
                await asyncio.gather(prefetch, return_exceptions=True)
            flights = [f.task for f in self._flights]
            for task in flights:
                task.cancel()
            await asyncio.gather(*flights, return_exceptions=True)

    async def _launch(self, batch: Batch, depth: int) -> None:
        """Start delivering ``batch`` while earlier batches are still in
        flight: at most ``depth`` at once, and never beside one holding a
        record of the same device, so a device's records reach the remote
        side in order even when a batch before fails and is sent again.
        Confirmations follow in order (:meth:`_on_landed`)."""
        devices = {r.device_id for r in batch.records}
        flights = self._flights
        while flights and (
            len(flights) >= depth or any(not devices.isdisjoint(f.devices) for f in flights)
        ):
            await self._wait_landed()
        while self._confirming and (self._confirming[0].done() or len(self._confirming) > depth):
            await self._settle(self._confirming.popleft())
        task = asyncio.create_task(self._deliver(batch), name=f"deliver:{self.sink.name}")
        flights.append(_Flight(devices, task))
        task.add_done_callback(self._on_landed)

    async def _wait_landed(self) -> None:
        """Until the oldest flight landed (and was confirmed in order)."""
        self._landed = asyncio.get_running_loop().create_future()
        try:
            await self._landed
        finally:
            self._landed = None
        if self._flight_error is not None:
            raise self._flight_error

    def _on_landed(self, _task: asyncio.Task[tuple[bool, Batch]]) -> None:
        """Confirm the flights that landed, oldest first, up to the first one
        still in the air: a batch is confirmed only after every batch before it
        (its cursor covers theirs). After a cancelled or failed flight none is."""
        flights = self._flights
        while flights and flights[0].task.done():
            task = flights.popleft().task
            if task.cancelled() or self._flight_error is not None:
                self._flight_error = self._flight_error or asyncio.CancelledError()
                continue
            error = task.exception()
            if error is not None:
                self._flight_error = error
                continue
            delivered, batch = task.result()
            self._confirming.append(self._conclude(delivered, batch, linger=True))
        if self._landed is not None and not self._landed.done():
            self._landed.set_result(None)

    def _conclude(self, delivered: bool, batch: Batch, *, linger: bool) -> asyncio.Future[None]:
        """The outbox's end of a batch sent: confirmed if it was delivered,
        else dead-lettered (refused for good) with the sink's last error."""
        if delivered:
            return self.outbox.confirm(batch, linger=linger)
        return self.outbox.dead_letter(batch, self._last_error)

    async def _land_all(self, prev: asyncio.Future[None] | None) -> asyncio.Future[None] | None:
        """Wait for every flight to land; the last confirmation is the new
        ``prev`` of the one-at-a-time path, the others are settled."""
        while self._flights:
            await self._wait_landed()
        if prev is not None:
            self._confirming.appendleft(prev)
        while len(self._confirming) > 1:
            await self._settle(self._confirming.popleft())
        return self._confirming.popleft() if self._confirming else None

    def _read(self) -> Coroutine[Any, Any, Batch]:
        sink = self.sink
        return self.outbox.read_batch(sink.name, sink.max_batch_records, sink.max_batch_bytes)

    async def _settle(self, confirmation: asyncio.Future[None]) -> None:
        """Wait for a confirmation's commit. If the commit failed (disk full),
        the outbox has rewound this sink's reads to the last committed cursor,
        so the batch is sent again; pause before that rather than spin."""
        if not confirmation.done():
            self.outbox.expedite()
        try:
            await confirmation
        except RuntimeError as e:
            # Back off like a failing send: a commit that keeps failing must
            # not turn into the same batch sent every second.
            self._errors.log(
                logging.ERROR,
                "confirm",
                "sink %s: could not record a confirmation: %s",
                self.sink.name,
                e,
                extra={"fields": {"sink": self.sink.name}},
            )
            await asyncio.sleep(self.backoff_delay(self._confirm_failures + 2))
            self._confirm_failures += 1
            return
        # (Not a reset of the log's rate limit: a confirmation read before the
        # rewind resolves at once, committed or not.)
        self._confirm_failures = 0

    async def _deliver(self, batch: Batch, *, stale: bool = False) -> tuple[bool, Batch]:
        """Send until confirmed (True) or refused for good (False); returns the
        batch as finally sent (retention may have dropped records meanwhile).
        ``stale``: the batch was read a while ago (prefetched)."""
        sink = self.sink
        attempt = 0
        while True:
            if attempt or stale:
                batch = await self.outbox.refresh_batch(batch)
                if not batch.records:
                    return True, batch  # all dropped while failing: only the cursor moves
            t0 = time.monotonic()
            try:
                await sink.send_batch(batch.records)
            except PermanentSinkError as e:
                sink.state.record_error(e)
                self._last_error = f"{type(e).__name__}: {e}"
                # A cloud that refuses every batch (a schema change) would log a
                # line per batch: the dead-letter table keeps each one.
                self._errors.log(
                    logging.ERROR,
                    "dead_letter",
                    "sink %s refused %d records (%s..%s) for good, dead-lettered: %s",
                    sink.name,
                    len(batch),
                    batch.records[0].id,
                    batch.records[-1].id,
                    e,
                    extra={"fields": {"sink": sink.name, "records": len(batch)}},
                )
                return False, batch
            except Exception as e:  # any failure but a permanent one: retry the same batch
                sink.state.record_error(e)
                retry_after = e.retry_after if isinstance(e, RetryableSinkError) else None
                delay = self.backoff_delay(attempt, retry_after)
                attempt += 1
                self._log_failure(e, delay)
                # A Retry-After is the remote side's own word, and a sink that
                # is connected failed for another reason: no probe then.
                await self.wait_backoff(
                    delay, probe=retry_after is None and not sink.state.connected
                )
                continue
            sink.state.record_success(len(batch), time.monotonic() - t0)
            if self._failing_since is not None:
                self._errors.reset("send")
                log.info(
                    "sink %s is delivering again after %.1f s (%d failed attempts)",
                    sink.name,
                    time.monotonic() - self._failing_since,
                    self._failures,
                )
                self._failing_since = None
                self._failures = 0
            return True, batch

    async def wait_backoff(self, delay: float, *, probe: bool) -> None:
        """Sleep ``delay`` seconds; with ``probe``, every :attr:`probe_interval`
        ask the sink whether its remote side accepts connections, and end the
        wait as soon as one that was refused (down) is accepted (back). A probe
        that succeeds from the start says nothing new (the failure was not a
        refused connection), so the backoff then runs its course: a probe never
        turns the backoff into a retry every second."""
        interval = self.probe_interval
        if not probe or interval <= 0 or delay <= interval:
            await asyncio.sleep(delay)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        seen_down = False
        while deadline - loop.time() > interval:
            await asyncio.sleep(interval)
            up = await self.sink.probe()
            if up is None:
                break
            if not up:
                seen_down = True
            elif seen_down:
                log.info(
                    "sink %s: the remote side accepts connections again; retrying now",
                    self.sink.name,
                    extra={"fields": {"sink": self.sink.name}},
                )
                return
        await asyncio.sleep(max(deadline - loop.time(), 0.0))

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry ``attempt`` (0-based): full jitter over a capped
        exponential, and at least the remote side's ``retry_after`` if given.

        A ``Retry-After`` is a lower bound, not the delay itself: a cloud that
        answers 503 with ``Retry-After: 0`` to every attempt would otherwise
        be retried as fast as the loopback allows, a busy loop that starved
        the devices' acknowledgements (tests/faults, "sink answers 503")."""
        ceiling = min(self.backoff_max, self.backoff_initial * (2 ** min(attempt, 62)))
        jitter = self._rng.uniform(0.0, ceiling)
        if retry_after is not None and retry_after >= 0:
            return max(min(retry_after, RETRY_AFTER_MAX), jitter)
        return jitter

    def _log_failure(self, error: BaseException, delay: float) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._failures += 1
        # No traceback: the error says what failed; a sink down for a day is
        # one line a minute with a count of the attempts in between.
        self._errors.log(
            logging.WARNING,
            "send",
            "sink %s failed (%s: %s); retrying in %.2f s",
            self.sink.name,
            type(error).__name__,
            error,
            delay,
            extra={"fields": {"sink": self.sink.name, "error": str(error)}},
        )
