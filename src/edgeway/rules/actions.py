"""Carrying out what rule transitions ask for.

:class:`ActionRunner` takes stored actions (:mod:`edgeway.rules.outputs`)
and hands each to its target, then marks it done in ``rules.db``:

- ``command``: :meth:`CommandService.submit_journaled` with the command id
  and idempotency key the transition's journal holds: the command goes out
  without waiting for the queue's own commits, and the action is marked done
  once the queue has committed it; one taken back at start goes through
  :meth:`CommandService.submit` (a repeat returns the queued command, one the
  queue lost is sent again with the same id, flagged as a redelivery);
- ``publish``: the embedded broker's ``publish``;
- ``alarm``: an :class:`AlarmTarget` (the alarm service);
- ``event``: a record into the outbox (priority lane, ``record_type: rule``,
  ``message_id`` the transition id);
- ``webhook``: an HTTP POST in a task of its own, bounded in number, with a
  per-attempt timeout and backoff between retries, so a slow or dead URL
  never delays another action or the event loop;
- ``twin``: a merge patch of the device twin's desired state
  (:class:`TwinTarget`, the twin service), which then reaches the device as
  a delta like any desired change.

Per device, commands, publishes, alarms and events go out in transition
order (a fan switched on, then off, arrives in that order); different devices
proceed side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeway.logs import printable
from edgeway.reading import Origin, Reading
from edgeway.rules.outputs import (
    AlarmChange,
    CallWebhook,
    Publish,
    RecordEvent,
    SendCommand,
    SetTwinDesired,
)
from edgeway.rules.store import RuleStore, StoredAction
from edgeway.rules.targets import ActionTargets, CommandTarget

log = logging.getLogger(__name__)

MAX_WEBHOOKS = 8
"""Webhook calls in flight at once: a site's rules call a handful of URLs;
more in parallel would only hammer a receiver that is already slow."""
MAX_WEBHOOKS_WAITING = 1000
"""Webhook calls waiting for a slot; past this, new ones fail at once
(counted), so a dead URL cannot grow memory without bound. Each is a small
JSON body."""
WEBHOOK_BACKOFF = 0.5
"""Seconds before the first retry, doubled each time."""
WEBHOOK_BODY_LOG = 200
"""Characters of a webhook's error kept for the log and the store."""


@dataclass(slots=True)
class ActionStats:
    """Counters of carried-out actions, per kind (``/api/status``)."""

    done: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    waiting: int = 0


class ActionFailed(Exception):
    """An action that cannot be carried out (its target is missing or refused it)."""


class ActionRunner:
    """Carries stored actions out; see the module docstring."""

    def __init__(self, store: RuleStore, targets: ActionTargets) -> None:
        self.store = store
        self.targets = targets
        self.stats = ActionStats()
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._webhooks: set[asyncio.Task[None]] = set()
        self._marks: set[asyncio.Future[None]] = set()
        self._settling: set[asyncio.Future[None]] = set()
        """Journaled commands not yet committed by the command queue."""
        self._slots = asyncio.Semaphore(MAX_WEBHOOKS)
        self._client: Any = None
        self._closed = False
        self._held: list[StoredAction] | None = []
        """Actions waiting for :meth:`start` (None once started)."""

    def start(self) -> None:
        """The targets are in place (the gateway built the command queue and
        the broker): carry out what waited, and from now on at once."""
        held, self._held = self._held, None
        if held:
            self.run(held)

    def run(self, actions: Sequence[StoredAction]) -> None:
        """Start carrying out ``actions`` (already stored), in order per device."""
        if self._closed:
            return
        if self._held is not None:
            self._held.extend(actions)
            return
        by_device: dict[str, list[StoredAction]] = {}
        for sa in actions:
            a = sa.action
            if isinstance(a, CallWebhook):
                self._start_webhook(sa, a)
                continue
            device = a.source if isinstance(a, AlarmChange) else getattr(a, "device_id", "")
            by_device.setdefault(device, []).append(sa)
        for device, group in by_device.items():
            if device not in self._chains:
                # Nothing of this device's under way: its leading commands go
                # to the queue now, a task hop earlier (the queue sends at once).
                k = 0
                while k < len(group) and _journaled(group[k]):
                    self._send_now(group[k])
                    k += 1
                group = group[k:]
                if not group:
                    continue
            self.stats.waiting += len(group)
            prev = self._chains.get(device)
            task = asyncio.get_running_loop().create_task(
                self._chain(prev, group), name=f"rules:actions:{device}"
            )
            self._chains[device] = task
            task.add_done_callback(functools.partial(self._chain_done, device))

    def _chain_done(self, device: str, task: asyncio.Task[None]) -> None:
        if self._chains.get(device) is task:
            del self._chains[device]

    async def _chain(self, prev: asyncio.Task[None] | None, group: list[StoredAction]) -> None:
        if prev is not None and not prev.done():
            # After the device's earlier actions; wait() does not raise their
            # errors, and a cancellation of this task still ends it.
            await asyncio.wait([prev])
        for sa in group:
            self.stats.waiting -= 1
            await self._one(sa)

    async def _one(self, sa: StoredAction) -> None:
        if _journaled(sa):
            self._send_now(sa)
            return
        try:
            await self._carry_out(sa.action, sa.replay)
        except asyncio.CancelledError:
            raise  # stopping: stays waiting in the store, carried out at the next start
        except Exception as e:
            self._failed(sa, e)
            return
        self._finish(sa, None)

    def _send_now(self, sa: StoredAction) -> None:
        assert isinstance(sa.action, SendCommand)
        try:
            self._send_journaled(sa, sa.action)
        except Exception as e:
            self._failed(sa, e)

    def _failed(self, sa: StoredAction, e: Exception) -> None:
        if self._closed or getattr(e, "code", None) == "disabled":
            return  # the gateway is stopping: carried out at the next start
        self._finish(sa, str(e)[:WEBHOOK_BODY_LOG] or type(e).__name__)

    def _finish(self, sa: StoredAction, error: str | None) -> None:
        kind = sa.action.kind
        counts = self.stats.failed if error is not None else self.stats.done
        counts[kind] = counts.get(kind, 0) + 1
        if error is not None:
            log.warning(
                "rule action %s of %s failed: %s",
                kind,
                printable(sa.transition_id),
                printable(error),
                extra={"fields": {"transition": sa.transition_id, "action": kind}},
            )
        try:
            mark = self.store.mark_done(sa.id, error)
        except Exception:  # the store is closing: done again at the next start
            log.debug("rule action %d not marked done", sa.id, exc_info=True)
            return
        self._marks.add(mark)
        mark.add_done_callback(self._marked)

    def _send_journaled(self, sa: StoredAction, a: SendCommand) -> None:
        """A command of a transition just journaled: queued without waiting
        for the command queue's commit, so it can go out at once; marked done
        here once that commit is done. A kill before it leaves the action
        waiting in ``rules.db``: submitted again at the next start with the
        same command id and key (found there already: not queued twice; not
        found: sent again, flagged as a redelivery)."""
        assert a.command_id is not None
        _, stored = self._commands().submit_journaled(
            a.device_id,
            a.name,
            a.params,
            ttl=a.ttl,
            idempotency_key=a.idempotency_key,
            command_id=a.command_id,
            source=a.source,
        )
        self._settling.add(stored)
        stored.add_done_callback(functools.partial(self._settled, sa))

    def _commands(self) -> CommandTarget:
        if self.targets.commands is None:
            raise ActionFailed("commands are disabled (commands.enabled: false)")
        return self.targets.commands

    def _settled(self, sa: StoredAction, stored: asyncio.Future[None]) -> None:
        self._settling.discard(stored)
        if stored.cancelled() or self._closed:
            return  # done again at the next start
        e = stored.exception()
        self._finish(sa, None if e is None else (str(e)[:WEBHOOK_BODY_LOG] or type(e).__name__))

    def _marked(self, fut: asyncio.Future[None]) -> None:
        self._marks.discard(fut)
        _log_store_failure(fut)

    async def _carry_out(self, a: Any, replay: bool = False) -> None:
        t = self.targets
        if isinstance(a, SendCommand):
            await self._commands().submit(
                a.device_id,
                a.name,
                a.params,
                ttl=a.ttl,
                idempotency_key=a.idempotency_key,
                source=a.source,
                command_id=a.command_id,
                redelivery=replay,
            )
        elif isinstance(a, Publish):
            if t.publish is None:
                raise ActionFailed("the embedded MQTT broker is disabled")
            from edgeway.south.mqtt.codec import validate_topic_name

            validate_topic_name(a.topic)
            t.publish(a.topic, a.payload.encode(), a.qos, a.retain)
        elif isinstance(a, AlarmChange):
            if t.alarms is None:
                raise ActionFailed("no alarm service")
            if a.do == "raise":
                await t.alarms.raise_alarm(
                    a.source,
                    a.type,
                    severity=a.severity,
                    message=a.message,
                    by=a.by,
                    values=a.values,
                )
            else:
                await t.alarms.clear_alarm(a.source, a.type, by=a.by, message=a.message)
        elif isinstance(a, RecordEvent):
            if t.emit is None:
                raise ActionFailed("no outbox")
            reading = Reading(
                a.device_id,
                a.ts,
                dict(a.metrics),
                Origin("rules", a.rule, message_id=a.transition_id),
                {"record_type": "rule"},
                priority=1,
            )
            fut = t.emit([reading])
            if isinstance(fut, asyncio.Future):
                status = await fut
                if getattr(status, "value", "accepted") != "accepted":
                    raise ActionFailed(f"the outbox refused the record: {status}")
        elif isinstance(a, SetTwinDesired):
            if t.twins is None:
                raise ActionFailed("device twins are disabled (twins.enabled: false)")
            await t.twins.patch(a.device_id, "desired", a.desired, by=a.by)
        else:
            raise ActionFailed(f"unknown action {a!r}")

    # ------------------------------------------------------------ webhooks

    def _start_webhook(self, sa: StoredAction, a: CallWebhook) -> None:
        if len(self._webhooks) >= MAX_WEBHOOKS_WAITING:
            self._finish(sa, f"more than {MAX_WEBHOOKS_WAITING} webhook calls waiting")
            return
        task = asyncio.get_running_loop().create_task(
            self._webhook(sa, a), name=f"rules:webhook:{sa.id}"
        )
        self._webhooks.add(task)
        task.add_done_callback(self._webhooks.discard)

    async def _webhook(self, sa: StoredAction, a: CallWebhook) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        headers = {
            "content-type": "application/json",
            "edgeway-transition-id": a.transition_id,
            **a.headers,
        }
        error: str | None = None
        delay = WEBHOOK_BACKOFF
        for attempt in range(a.retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            async with self._slots:
                try:
                    resp = await self._client.post(
                        a.url, content=a.body.encode(), headers=headers, timeout=a.timeout
                    )
                except httpx.HTTPError as e:
                    error = f"{type(e).__name__}: {e}"
                    continue
            if resp.status_code < 300:
                error = None
                break
            error = f"HTTP {resp.status_code}"
            if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                break  # the receiver refuses this body: a retry cannot help
        self._finish(sa, error)

    # ------------------------------------------------------------ lifetime

    async def close(self) -> None:
        """Stop; what is not done stays in the store for the next start."""
        self._closed = True
        tasks = [*self._chains.values(), *self._webhooks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def idle(self) -> None:
        """Wait until every action started so far is carried out and marked
        done on disk (tests, bench)."""
        while self._chains or self._webhooks or self._marks or self._settling:
            self.store.flush_marks()  # not MARK_DELAY later
            await asyncio.wait(
                [*self._chains.values(), *self._webhooks, *self._marks, *self._settling]
            )


def _journaled(sa: StoredAction) -> bool:
    """A command of a transition just journaled (not one taken back at start)."""
    a = sa.action
    return isinstance(a, SendCommand) and a.command_id is not None and not sa.replay


def _log_store_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("rule action not marked done: %s", fut.exception())
