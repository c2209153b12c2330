"""Applying a new configuration to a running gateway, with rollback.

:func:`apply_config` is what SIGHUP, ``edgeway reload`` and ``POST
/api/config`` call once the new configuration passed ``validate()``:

1. :func:`~edgeway.runtime.reload.plan` says what changes; a change that needs
   a restart refuses the whole reload (nothing is touched).
2. The parts that change are replaced one kind after the other (data path,
   MQTT listeners, south adapters; see the table in edgeway.runtime.reload),
   each recording how to undo itself.
3. Health gate: for :data:`HEALTH_GRACE` seconds the gateway must report no
   problem it did not have before (a new listener that stopped serving, an
   adapter that failed to start).
4. On any failure the undo steps run in reverse and the previous configuration
   is back in force (:class:`ReloadError` with ``rolled_back``). On success the
   text joins the history (``DATA_DIR/config``).

One reload at a time (a lock); a reload never restarts what did not change,
so devices on unchanged listeners stay connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeway.config import Config
from edgeway.runtime.component import stop_within
from edgeway.runtime.reload import ConfigHistory, ReloadError, ReloadPlan, adapter_entries, plan
from edgeway.sinks.base import SINK_STOP_WAIT

if TYPE_CHECKING:
    from edgeway.gateway import Gateway
    from edgeway.sinks.base import Sink
    from edgeway.south.base import SouthAdapter

log = logging.getLogger("edgeway.reload")

HEALTH_GRACE = 2.0
"""Seconds a reloaded gateway must stay healthy before the reload counts."""
ADAPTER_START_WAIT = 5.0
"""Seconds a new south adapter has to bind or connect before the reload rolls back
(a poller whose device is down is not a failure: it keeps retrying)."""

ADAPTER_STOP_WAIT = 5.0
"""Seconds a replaced south adapter has to stop (release its port) before its
successor starts; an adapter stops in milliseconds, this bounds one that hangs."""

Undo = Callable[[], Awaitable[None]]


async def apply_config(gw: Gateway, new: Config, text: str | None, source: str) -> list[str]:
    """Apply ``new`` to the running ``gw``; see the module docstring."""
    async with gw._reload_lock:
        if gw._tg is None or not gw.ready.is_set():
            raise ReloadError("the gateway is not running (starting or stopping)")
        old = gw.config
        p = plan(old, new)
        if p.restart_needed:
            gw.reload_failures += 1
            raise ReloadError(
                "not applied: these changes need a restart: " + ", ".join(p.restart_needed)
            )
        history = ConfigHistory(Path(old.gateway.data_dir))
        if p.empty:
            if text is not None:
                await asyncio.to_thread(history.record, text, source)
                gw.config_text, gw.config_source = text, source
            log.info("reload (%s): nothing changed", source)
            return []
        before = set(gw.health_problems())
        undo: list[Undo] = []
        started = time.monotonic()
        try:
            gw.config = new
            if p.log:
                _apply_log(gw, old, new, undo)
            if p.commands:
                _apply_commands(gw, old, new, undo)
            if p.mqtt_auth:
                _apply_mqtt_auth(gw, old, new, undo)
            if p.mqtt_input_limits:
                _apply_mqtt_input_limits(gw, new, undo)
            if p.data_path:
                await _reopen_data_path(gw, old, new, undo)
            if p.listeners_added or p.listeners_removed or p.listeners_changed:
                await _apply_listeners(gw, old, new, p, undo)
            if p.adapters_added or p.adapters_removed or p.adapters_changed:
                await _apply_adapters(gw, old, new, p, undo)
            await _health_gate(gw, before, gw.reload_grace)
        except Exception as e:
            gw.reload_failures += 1
            log.error("reload (%s) failed: %s; rolling back", source, e)
            gw.config = old
            gw._retired_sinks.clear()
            for step in reversed(undo):
                try:
                    await step()
                except Exception:
                    log.exception("rollback step failed; the gateway may need a restart")
            raise ReloadError(
                f"not applied, previous configuration restored: {e}", rolled_back=True
            ) from e
        gw.reloads += 1
        retired, gw._retired_sinks = gw._retired_sinks, []
        for sink in retired:
            await stop_within(sink, SINK_STOP_WAIT)
        gw.config_text, gw.config_source = text, source
        if text is not None:
            await asyncio.to_thread(history.record, text, source)
        changes = p.changes()
        log.info(
            "configuration applied (%s) in %.0f ms: %s",
            source,
            (time.monotonic() - started) * 1000,
            "; ".join(changes),
        )
        return changes


# ---------------------------------------------------------------- small parts


def _apply_log(gw: Gateway, old: Config, new: Config, undo: list[Undo]) -> None:
    root = logging.getLogger()
    before = root.level
    root.setLevel(new.log.level.upper())

    async def back() -> None:
        root.setLevel(before)

    undo.append(back)


def _apply_commands(gw: Gateway, old: Config, new: Config, undo: list[Undo]) -> None:
    svc = gw.commands
    if svc is None:
        return
    svc.config = new.commands
    downlink = getattr(gw, "_broker_downlink", None)
    if downlink is not None and old.commands.mqtt != new.commands.mqtt:
        downlink.set_topics(new.commands.mqtt)

    async def back() -> None:
        svc.config = old.commands
        if downlink is not None and old.commands.mqtt != new.commands.mqtt:
            downlink.set_topics(old.commands.mqtt)

    undo.append(back)


def _apply_mqtt_auth(gw: Gateway, old: Config, new: Config, undo: list[Undo]) -> None:
    broker = gw.broker
    if broker is None or gw.authenticator is not None:
        return  # no broker, or identities injected in code: nothing from the file
    from edgeway.devices.config_auth import ConfigAuthenticator, ConfigAuthoriser

    before = (broker.authenticator, broker.authoriser)
    access = gw.access
    if access is not None:
        # The credential store stays; mqtt.users and mqtt.acl are replaced.
        access.reconfigure(new)
        broker.authenticator, broker.authoriser = access.authenticator, access.authoriser
    else:
        broker.authenticator = ConfigAuthenticator(new.mqtt)
        broker.authoriser = ConfigAuthoriser(new.mqtt)
    if gw.devices is not None:  # the registry's checks stay in front
        broker.authenticator = gw.devices.authenticator_for(broker.authenticator)
    # Connections remember decisions (publish verdicts, the telemetry fast
    # path, read verdicts): a new ACL must apply to their next message.
    broker.acl_changed()
    # A user removed or given a new password loses its connections now.
    kept = {u.username: u.password_hash for u in new.mqtt.users}
    for user in old.mqtt.users:
        if kept.get(user.username) != user.password_hash:
            broker.revoke(user.username)

    async def back() -> None:
        if access is not None:
            access.reconfigure(old)
            broker.authenticator, broker.authoriser = access.authenticator, access.authoriser
        else:
            broker.authenticator, broker.authoriser = before
        broker.acl_changed()

    undo.append(back)


def _apply_mqtt_input_limits(gw: Gateway, new: Config, undo: list[Undo]) -> None:
    broker = gw.broker
    if broker is None:
        return
    from edgeway.config import input_limits

    before = broker.input_limits
    broker.input_limits = input_limits(new.mqtt.input_limits)

    async def back() -> None:
        broker.input_limits = before

    undo.append(back)


# ----------------------------------------------------------------- data path


def _same(a: Any, b: Any) -> bool:
    return bool(a.model_dump(mode="json") == b.model_dump(mode="json"))


async def _reopen_data_path(gw: Gateway, old: Config, new: Config, undo: list[Undo]) -> None:
    """Replace sinks, outbox and pipeline while devices keep their connections."""
    from edgeway.sinks.base import create_sink

    switch = gw.ingest
    assert switch is not None
    old_sinks: list[Sink] = list(gw.sinks)
    by_name = {s.name: s for s in old_sinks}
    old_cfg = {s.name: s for s in old.sinks}
    new_sinks: list[Sink] = []
    created: list[Sink] = []
    for sc in new.sinks:
        keep = by_name.get(sc.name)
        if keep is not None and _same(old_cfg[sc.name], sc):
            new_sinks.append(keep)
            continue
        sink = create_sink(sc, new.gateway.id)  # validated: raises only on a bug
        created.append(sink)
        new_sinks.append(sink)

    async def close_sinks(sinks: list[Sink]) -> None:
        for s in sinks:
            await stop_within(s, SINK_STOP_WAIT)

    switch.hold()
    try:
        await gw._close_data_path()
        try:
            for s in created:
                await s.start()
            await gw._open_data_path(new, new_sinks)
        except BaseException:
            await close_sinks(created)
            await gw._open_data_path(old, old_sinks)  # the previous one opened before
            raise
    finally:
        _resume(gw)

    async def back() -> None:
        switch.hold()
        try:
            await gw._close_data_path()
            await close_sinks(created)
            await gw._open_data_path(old, old_sinks)
        finally:
            _resume(gw)

    undo.append(back)
    # Sinks no longer used are closed once the reload stands (see _finish).
    retired = [s for s in old_sinks if s not in new_sinks]
    gw._retired_sinks.extend(retired)


def _resume(gw: Gateway) -> None:
    switch = gw.ingest
    assert switch is not None and gw.pipeline is not None
    held = switch.release(gw.pipeline)
    if gw.broker is not None:
        gw.broker.set_ingest_batching(gw.pipeline.batchable)
    gw._start_runners()
    if held:
        log.info("reload: %d submits held while the data path re-opened", held)


# ------------------------------------------------------------------ listeners


async def _apply_listeners(
    gw: Gateway, old: Config, new: Config, p: ReloadPlan, undo: list[Undo]
) -> None:
    from edgeway.south.mqtt.listeners import RunningListener, start_listeners

    broker = gw.broker
    assert broker is not None
    # mqtt.limits needs a restart, so old and new connect timeouts are the same.
    timeout = new.mqtt.limits.connect_timeout

    async def close(listeners: list[RunningListener]) -> None:
        for lst in listeners:
            await lst.close()
            if lst in gw.listeners:
                gw.listeners.remove(lst)
            _disconnect_clients(gw, lst.config)

    async def open_(cfgs: list[Any]) -> list[RunningListener]:
        opened = await start_listeners(cfgs, broker.protocol_factory, connect_timeout=timeout)
        gw.listeners.extend(opened)
        return opened

    going = set(p.listeners_removed) | set(p.listeners_changed)
    closing = [lst for lst in gw.listeners if lst.config.bind in going]
    old_cfgs = [lst.config for lst in closing]
    await close(closing)
    coming = set(p.listeners_added) | set(p.listeners_changed)
    try:
        opened = await open_([c for c in new.mqtt.listeners if c.bind in coming])
    except BaseException:
        await open_(old_cfgs)
        raise
    for lst in opened:
        log.info("reload: MQTT listener on %s:%d", *lst.bound)

    async def back() -> None:
        await close(opened)
        await open_(old_cfgs)

    undo.append(back)


def _disconnect_clients(gw: Gateway, listener: Any) -> None:
    """Clients of a listener that is going away: v5 DISCONNECT 0x8B (server
    shutting down, for this address), then close."""
    broker = gw.broker
    if broker is None:
        return
    for conn in list(broker.connections):
        if conn.listener is listener:
            conn.close(0x8B, "listener removed by a reload")


# ------------------------------------------------------------------- adapters


async def _apply_adapters(
    gw: Gateway, old: Config, new: Config, p: ReloadPlan, undo: list[Undo]
) -> None:
    by_key = {(a.section, a.name): a for a in gw.adapters}
    going = [by_key[k] for k in [*p.adapters_removed, *p.adapters_changed] if k in by_key]
    for a in going:
        await _stop(gw, a)
    entries = adapter_entries(new)
    started: list[SouthAdapter] = []

    async def back() -> None:
        for a in started:
            await _stop(gw, a)
        old_entries = adapter_entries(old)
        for a in going:
            restored = _build(gw, a.section, old_entries[(a.section, a.name)])
            gw.adapters.append(restored)
            await gw._start_adapter(restored, fatal=False)

    undo.append(back)
    for key in [*p.adapters_changed, *p.adapters_added]:
        a = _build(gw, key[0], entries[key])
        gw.adapters.append(a)
        started.append(a)
        await gw._start_adapter(a, fatal=False)
    await _wait_started(gw, started)


def _build(gw: Gateway, section: str, entry: Any) -> SouthAdapter:
    a = gw._build_adapter(section, entry)
    gw._register_downlink(a)
    return a


async def _stop(gw: Gateway, a: SouthAdapter) -> None:
    await a.stop(ADAPTER_STOP_WAIT)
    if a in gw.adapters:
        gw.adapters.remove(a)
    dl = gw._downlinks.pop(id(a), None)
    if dl is not None and gw.commands is not None:
        gw.commands.remove_downlink(dl)


async def _wait_started(gw: Gateway, started: list[SouthAdapter]) -> None:
    """Each new adapter binds/connects or keeps retrying; one that failed before
    it was ready (a port in use) fails the reload."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ADAPTER_START_WAIT
    while loop.time() < deadline:
        for a in started:
            if a.gave_up:
                raise ReloadError(f"{a.section} adapter {a.name}: {a.state.last_error}")
        if all(a.ready.is_set() for a in started):
            return
        await asyncio.sleep(0.05)
    for a in started:
        if not a.ready.is_set():
            log.warning("reload: south adapter %s is not connected yet; it keeps retrying", a.name)


async def _health_gate(gw: Gateway, before: set[str], grace: float = HEALTH_GRACE) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while True:
        new = [p for p in gw.health_problems() if p not in before]
        if new:
            raise ReloadError("unhealthy after the change: " + "; ".join(new))
        if loop.time() >= deadline:
            return
        await asyncio.sleep(0.1)
