"""Device status from every adapter, kept cheap on the hot path.

Configuration (``devices:`` section; defaults shown, see docs/devices.md)::

    devices:
      flush_interval: 2s      # status reaches devices.db this often
      offline_after: 5m       # a device without a connection is offline after this silence
      max_unregistered: 10000 # records for devices seen but not registered
      events: false           # lifecycle events up through the outbox
      events_per_second: 200

What tells us what (the gateway wires these up):

- every reading any adapter submits (:class:`DeviceIngest` in front of the
  ingest): last seen, protocol, online for devices without a connection
  (HTTP, CoAP, Modbus, OPC-UA, serial, BLE, MQTT client mode per topic), and a
  ``firmware_version`` metric when a device reports one;
- the embedded broker's sessions (:class:`BrokerPresence`, a
  ``BrokerObserver``): connect, disconnect and why (clean, keep-alive expiry,
  will, error, revoked, taken over, shutdown);
- the MQTT authenticator (:class:`RegistryAuthenticator`): failed logins,
  and the refusal of disabled devices and (per listener) unregistered ones;
- pollers (Modbus, OPC-UA: one device per configured entry): their
  connection and error counters, looked at on each flush.

Hot path cost: a reading costs one dict store (when and over what) and one
dict lookup (a ``firmware_version`` metric); nothing is written until the flush, which writes one
statement per device that changed (one transaction per flush: 10,000 busy
devices cost one commit every ``flush_interval``, never one per reading).
Memory is bounded: at most ``MAX_PENDING`` devices wait for a flush; one
more is counted (``pending_dropped``) and seen again at its next message.

Lifecycle events (connected, disconnected, auth_failed, registered, revoked,
enabled) go up to the sinks through the outbox as records of their own type,
``record_type: device_event``, in the priority lane, the way command states
do; at most ``events_per_second`` (a login storm with wrong passwords must
not flood the cloud); the rest are counted as ``events_suppressed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeway.devices.auth import AuthDecision, Authenticator, ConnectInfo, Principal
from edgeway.devices.registry import DeviceRegistry, StatusUpdate
from edgeway.ingest import Ingest, IngestStatus
from edgeway.reading import Origin, Reading

if TYPE_CHECKING:
    from edgeway.commands.model import CommandResult
    from edgeway.downlink import DownlinkEvents
    from edgeway.south.base import SouthAdapter
    from edgeway.south.mqtt.broker import Broker
    from edgeway.south.mqtt.connection import MqttConnection
    from edgeway.south.mqtt.packets import Properties
    from edgeway.south.mqtt.session import Session

log = logging.getLogger(__name__)

MAX_PENDING = 200_000
"""Devices whose news waits for the next flush. A few hundred bytes each at
most: ~50 MB in the worst case of that many distinct devices in one
``flush_interval``; a normal site has a few thousand."""
FIRMWARE_METRIC = "firmware_version"
"""The metric read as the device's reported firmware version (a string)."""
EVENT_BURST = 1000
"""Events that may go at once before ``events_per_second`` applies (a
gateway restart reconnects every device in a few seconds)."""
EVENT_TEXT_MAX = 200
"""Longest text (reason, error, address) in an event record."""


@dataclass(slots=True)
class PresenceStats:
    """What presence did (``/api/status`` -> ``devices``)."""

    flushes: int = 0
    written: int = 0
    """Device records written by flushes."""
    last_flush_ms: float = 0.0
    pending_dropped: int = 0
    events: int = 0
    events_suppressed: int = 0
    went_idle: int = 0
    """Devices without a connection marked offline after ``offline_after``."""
    by_status: dict[str, int] = field(default_factory=dict)
    """Devices per registry status, as of the last flush (metrics)."""


class DevicePresence:
    """Status news per device, batched in memory and flushed to the registry."""

    def __init__(
        self,
        registry: DeviceRegistry,
        *,
        flush_interval: float = 2.0,
        offline_after: float = 300.0,
        emit: Callable[[Sequence[Reading]], Any] | None = None,
        events_per_second: float = 200.0,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.flush_interval = flush_interval
        self.offline_after = offline_after
        self.emit = emit
        self.max_pending = max_pending
        self.clock = clock
        self.stats = PresenceStats()
        self._seen: dict[str, tuple[float, str]] = {}
        """Device -> (when, protocol) since the last flush: the hot path's only store."""
        self._updates: dict[str, StatusUpdate] = {}
        self._events: list[Reading] = []
        self._events_scheduled = False
        self._rate = events_per_second
        self._tokens = float(EVENT_BURST)
        self._tokens_at = time.monotonic()
        self._pollers: Callable[[], Iterable[SouthAdapter]] = tuple
        self._poller_seen: dict[int, _PollerSeen] = {}
        """Counters last seen per poller (by id of the adapter): as many as adapters."""
        self._flush_lock = asyncio.Lock()

    # ------------------------------------------------------------ hot path

    def seen_readings(self, readings: Sequence[Reading]) -> None:
        """Readings of one device message were submitted: their devices were
        seen now, over the protocol of the first one's origin (one adapter's
        message). One dict store per reading, plus one lookup for firmware."""
        seen = self._seen
        if len(seen) + len(readings) > self.max_pending:
            self._seen_bounded(readings)
            return
        entry = (self.clock(), readings[0].origin.adapter)
        for r in readings:
            seen[r.device_id] = entry
            if FIRMWARE_METRIC in r.metrics:
                self._firmware(r.device_id, r.metrics[FIRMWARE_METRIC])

    def seen(self, device_id: str, protocol: str) -> None:
        """A device was heard without a reading (a command poll, an observe,
        a command result)."""
        seen = self._seen
        if device_id not in seen and len(seen) >= self.max_pending:
            self.stats.pending_dropped += 1
            return
        seen[device_id] = (self.clock(), protocol)

    def _seen_bounded(self, readings: Sequence[Reading]) -> None:
        seen = self._seen
        entry = (self.clock(), readings[0].origin.adapter)
        for r in readings:
            if r.device_id not in seen and len(seen) >= self.max_pending:
                self.stats.pending_dropped += 1
                continue
            seen[r.device_id] = entry

    def _firmware(self, device: str, value: object) -> None:
        # The device's own text, shown in the CLI: printable only (no
        # terminal escapes), 64 characters at most.
        if isinstance(value, str) and value and len(value) <= 64 and value.isprintable():
            update = self._update(device)
            if update is not None:
                update.firmware = value

    def _update(self, device_id: str) -> StatusUpdate | None:
        u = self._updates.get(device_id)
        if u is None:
            if len(self._updates) >= self.max_pending:
                self.stats.pending_dropped += 1
                return None
            u = self._updates[device_id] = StatusUpdate(device_id)
        return u

    # ------------------------------------------------------------ sessions

    def connected(self, device_id: str, protocol: str, remote: str = "") -> None:
        """A device opened a connection (MQTT CONNECT accepted)."""
        now = self.clock()
        u = self._update(device_id)
        if u is not None:
            u.online = u.connected = True
            u.last_connect = u.last_seen = now
            u.protocols.add(protocol)
        self.event(device_id, "connected", protocol=protocol, remote=remote)

    def disconnected(self, device_id: str, protocol: str, reason: str, detail: str = "") -> None:
        """A device's connection ended, for ``reason`` (registry.DISCONNECT_REASONS)."""
        u = self._update(device_id)
        if u is not None:
            u.online = u.connected = False
            u.last_disconnect = self.clock()
            u.disconnect_reason = reason
        self.event(device_id, "disconnected", protocol=protocol, reason=reason, detail=detail)

    def poll_failed(self, device_id: str, protocol: str, error: str, *, offline: bool) -> None:
        """A poller could not read the device (``offline``: its connection is down)."""
        now = self.clock()
        u = self._update(device_id)
        if u is not None:
            u.last_error, u.last_error_at = error, now
            u.protocols.add(protocol)
            if offline:
                u.online = False
                u.last_disconnect = now
                u.disconnect_reason = "error"

    def auth_failed(self, device_id: str, protocol: str, remote: str, reason: str) -> None:
        """A device was refused at connect or request (wrong secret, disabled,
        not registered): an event, nothing written to its record (the id is
        the claimant's, unproven)."""
        self.event(device_id, "auth_failed", protocol=protocol, remote=remote, reason=reason)

    def registry_changed(self, device_id: str, change: str) -> None:
        """The registry's change listener: lifecycle events for the cloud."""
        kind = {"added": "registered", "disabled": "revoked", "removed": "revoked"}.get(change)
        if change == "enabled":
            kind = "enabled"
        if kind is not None:
            self.event(device_id, kind, limited=False, reason=change)

    # ------------------------------------------------------------ pollers

    def watch_pollers(self, adapters: Callable[[], Iterable[SouthAdapter]]) -> None:
        """Follow the adapters that poll one device each (a ``device_id`` in
        their config: Modbus, OPC-UA) through their connection and error
        counters; ``adapters`` gives the running ones at each flush (a reload
        adds and removes some)."""
        self._pollers = adapters

    def _check_pollers(self) -> None:
        current: dict[int, _PollerSeen] = {}
        for adapter in self._pollers():
            device_id = getattr(adapter.config, "device_id", None)
            if not isinstance(device_id, str) or adapter.section not in ("modbus", "opcua"):
                continue
            st = adapter.state
            seen = self._poller_seen.get(id(adapter)) or _PollerSeen(False, 0)
            current[id(adapter)] = seen
            if st.errors > seen.errors:
                self.poll_failed(
                    device_id,
                    adapter.section,
                    st.last_error or "poll failed",
                    offline=not st.connected,
                )
            if st.connected and not seen.connected:
                self.event(device_id, "connected", protocol=adapter.section)
            elif seen.connected and not st.connected:
                self.event(
                    device_id,
                    "disconnected",
                    protocol=adapter.section,
                    reason="error",
                    detail=st.last_error or "",
                )
            seen.connected, seen.errors = st.connected, st.errors
        self._poller_seen = current

    # ------------------------------------------------------------ events

    def event(self, device_id: str, kind: str, *, limited: bool = True, **fields: str) -> None:
        """Queue a lifecycle event record (sent at the end of this loop turn).
        ``limited``: the devices' own doing (connects, failed logins), held to
        ``events_per_second``; an operator's changes always go."""
        if self.emit is None:
            return
        if limited:
            now = time.monotonic()
            tokens = self._tokens + (now - self._tokens_at) * self._rate
            self._tokens = min(float(EVENT_BURST), tokens)
            self._tokens_at = now
            if self._tokens < 1.0:
                self.stats.events_suppressed += 1
                return
            self._tokens -= 1.0
        metrics: dict[str, Any] = {"event": kind}
        for key, value in fields.items():
            if value:
                metrics[key] = value[:EVENT_TEXT_MAX]
        self._events.append(
            Reading(
                device_id[:256],
                self.clock(),
                metrics,
                Origin("devices", kind),
                {"record_type": "device_event"},
                priority=1,
            )
        )
        if not self._events_scheduled:
            self._events_scheduled = True
            asyncio.get_running_loop().call_soon(self._emit_events)

    def _emit_events(self) -> None:
        self._events_scheduled = False
        events, self._events = self._events, []
        if not events or self.emit is None:
            return
        self.stats.events += len(events)
        try:
            fut = self.emit(events)
        except Exception:
            log.exception("device events could not be stored")
            return
        if isinstance(fut, asyncio.Future):
            fut.add_done_callback(_log_emit_failure)

    # ------------------------------------------------------------ flushing

    async def run(self) -> None:
        """Flush every ``flush_interval`` until cancelled (a last flush then)."""
        try:
            while True:
                await asyncio.sleep(self.flush_interval)
                try:
                    await self.flush()
                except Exception:
                    log.exception("device status flush failed; retrying")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    def take(self) -> list[StatusUpdate]:
        """What waits for the flush, merged per device (and forgotten here)."""
        self._check_pollers()
        updates, self._updates = self._updates, {}
        seen, self._seen = self._seen, {}
        for device, (at, protocol) in seen.items():
            u = updates.get(device)
            if u is None:
                u = updates[device] = StatusUpdate(device)
            if u.last_seen is None or at > u.last_seen:
                u.last_seen = at
            u.protocols.add(protocol)
            if u.connected is None:
                # Seen without a connection event in this interval: online
                # (connection-less protocols; a connected device stays so).
                u.online = True
        return list(updates.values())

    async def flush(self) -> int:
        """Write what is pending; mark idle connection-less devices offline."""
        async with self._flush_lock:
            t0 = time.perf_counter()
            updates = self.take()
            try:
                written = await self.registry.record_status(updates) if updates else 0
            except Exception:
                # Not written (disk full, I/O error): keep the news for the
                # next flush unless newer news about the device came since.
                for u in updates:
                    self._updates.setdefault(u.device_id, u)
                raise
            if self.offline_after > 0:
                idle = await self.registry.mark_idle(self.clock() - self.offline_after)
                self.stats.went_idle += idle
            self.stats.by_status = await self.registry.counts()
            self.stats.flushes += 1
            self.stats.written += written
            self.stats.last_flush_ms = round((time.perf_counter() - t0) * 1000, 2)
            return written


@dataclass(slots=True)
class _PollerSeen:
    connected: bool
    errors: int


def _log_emit_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("device events not stored: %s", fut.exception())


def principal_device(principal: Principal | None, client_id: str) -> str:
    """The device an MQTT connection speaks for: the identity's device id
    when the authenticator resolved one, else the client id."""
    device = getattr(principal, "device_id", None)
    return device if isinstance(device, str) and device else client_id


class PresenceEvents:
    """A :class:`~edgeway.downlink.DownlinkEvents` in front of the command
    service: a device that polls or observes its commands, or answers one,
    was heard (HTTP long-poll, CoAP observe, MQTT client mode), so a device
    that only takes commands is seen too."""

    def __init__(self, inner: DownlinkEvents, presence: DevicePresence, protocol: str) -> None:
        self.inner = inner
        self.presence = presence
        self.protocol = protocol

    def device_reachable(self, device_id: str) -> None:
        self.presence.seen(device_id, self.protocol)
        self.inner.device_reachable(device_id)

    def report(self, result: CommandResult) -> bool:
        taken = self.inner.report(result)
        if taken:
            self.presence.seen(result.device_id, self.protocol)
        return taken


# ------------------------------------------------------------------ MQTT


class BrokerPresence:
    """Follows the embedded broker's sessions (a ``BrokerObserver``) and
    disconnects a device's clients when it is disabled or removed."""

    def __init__(self, broker: Broker, presence: DevicePresence) -> None:
        self.broker = broker
        self.presence = presence
        self._conns: dict[str, MqttConnection] = {}
        """Connected clients by client id (what session_offline needs to know
        why the connection ended); as many as connections."""

    def attach(self) -> None:
        self.broker.observers.append(self)

    def session_online(self, session: Session) -> None:
        conn = session.conn
        if conn is None or getattr(conn.principal, "provisioning_key", None) is not None:
            return  # a provisioning client is no device (edgeway.devices.provisioning_mqtt)
        self._conns[session.client_id] = conn
        device = principal_device(conn.principal, session.client_id)
        self.presence.connected(device, "mqtt", conn.remote)

    def session_offline(self, session: Session) -> None:
        conn = self._conns.pop(session.client_id, None)
        if conn is None:
            return
        device = principal_device(conn.principal, session.client_id)
        self.presence.disconnected(device, "mqtt", conn.end_reason)

    def subscribed(self, session: Session, topic_filter: str) -> None:
        return None

    def published(
        self, topic: str, payload: bytes, properties: Properties | None, sender: str
    ) -> None:
        return None

    def registry_changed(self, device_id: str, change: str) -> None:
        """Disabled or removed: its connections end now (reason ``revoked``)."""
        if change not in ("disabled", "removed"):
            return
        for client_id, conn in list(self._conns.items()):
            if principal_device(conn.principal, client_id) == device_id:
                conn.revoke(f"device {change} by an operator")


class RegistryAuthenticator:
    """An :class:`~edgeway.devices.auth.Authenticator` in front of another:
    reports failed logins, refuses disabled devices (CONNACK 0x8A banned) and,
    on listeners whose ``unregistered`` policy is ``refuse``, devices the
    registry does not know (0x87 not authorised)."""

    def __init__(
        self,
        inner: Authenticator,
        registry: DeviceRegistry,
        presence: DevicePresence,
        refuse_unregistered_on: Callable[[str], bool] = lambda listener: False,
    ) -> None:
        self.inner = inner
        self.registry = registry
        self.presence = presence
        self.refuse_unregistered_on = refuse_unregistered_on
        """Whether the listener (its bind string) refuses unregistered devices:
        asked at each CONNECT, so a reload's new policy holds at once."""

    async def authenticate(self, info: ConnectInfo) -> AuthDecision:
        decision = await self.inner.authenticate(info)
        if not decision.allowed:
            self.presence.auth_failed(
                info.client_id, "mqtt", info.remote, decision.reason or "not authorised"
            )
            return decision
        if decision.principal is not None and decision.principal.provisioning_key is not None:
            return decision  # not a device: the registry has nothing to say
        device = principal_device(decision.principal, info.client_id)
        flags = await self.registry.flags(device)
        if flags is not None and flags.registered and not flags.enabled:
            self.presence.auth_failed(device, "mqtt", info.remote, "device disabled")
            return AuthDecision(False, reason_code=0x8A, reason="device disabled")
        if self.refuse_unregistered_on(info.listener) and (flags is None or not flags.registered):
            self.presence.auth_failed(device, "mqtt", info.remote, "device not registered")
            return AuthDecision(False, reason_code=0x87, reason="device not registered")
        return decision


# ------------------------------------------------------------------ ingest


class DeviceIngest:
    """The ingest adapters and the broker submit to, in front of the real one:
    records who was seen (:meth:`DevicePresence.seen_readings`) and, for the
    connection-less listeners named in ``gated`` (HTTP, CoAP), refuses
    readings of disabled devices, and of unregistered ones where that
    listener's policy is ``refuse`` (``REJECTED_DEVICE``: HTTP 403, CoAP 4.03).

    MQTT readings are not gated here: the broker checks the device once per
    connection (:class:`RegistryAuthenticator`) and disconnects it when it is
    disabled (:class:`BrokerPresence`), so its hot path stays synchronous.
    """

    def __init__(
        self,
        inner: Ingest,
        presence: DevicePresence,
        registry: DeviceRegistry,
        gated: Callable[[str], bool | None] = lambda adapter: None,
    ) -> None:
        self.inner = inner
        self.presence = presence
        self.registry = registry
        self.gated = gated
        """Origin adapter -> whether unregistered devices are refused there
        (None: not gated). Asked per submit, so a reload's policy holds at once."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0

    @property
    def batchable(self) -> bool:
        return self.inner.batchable

    def is_saturated(self) -> bool:
        return self.inner.is_saturated()

    def submit(self, readings: Sequence[Reading]) -> asyncio.Future[IngestStatus]:
        if readings:
            self.presence.seen_readings(readings)
            refuse_unregistered = self.gated(readings[0].origin.adapter)
            if refuse_unregistered is not None:
                return self._gated(readings, refuse_unregistered)
        return self.inner.submit(readings)

    def _gated(
        self, readings: Sequence[Reading], refuse_unregistered: bool
    ) -> asyncio.Future[IngestStatus]:
        loop = asyncio.get_running_loop()
        out: asyncio.Future[IngestStatus] = loop.create_future()

        async def check() -> None:
            try:
                for device in {r.device_id for r in readings}:
                    flags = await self.registry.flags(device)
                    registered = flags is not None and flags.registered
                    why = None
                    if registered and flags is not None and not flags.enabled:
                        why = "device disabled"
                    elif refuse_unregistered and not registered:
                        why = "device not registered"
                    if why is not None:
                        self.refused += 1
                        self.presence.auth_failed(device, readings[0].origin.adapter, "", why)
                        if not out.done():
                            out.set_result(IngestStatus.REJECTED_DEVICE)
                        return
                inner = self.inner.submit(readings)
                status = await asyncio.shield(inner)
            except Exception as e:
                if not out.done():
                    out.set_exception(e)
                return
            if not out.done():
                out.set_result(status)

        task = loop.create_task(check())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return out

    async def close(self) -> None:
        """Cancel checks still waiting (shutdown)."""
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
