"""Builds the gateway's parts from a :class:`~edgeway.config.Config` and runs them.

Every part is a :class:`~edgeway.runtime.component.Component` (the embedded
broker, the pipeline, the outbox, each sink and south adapter): the gateway
starts and stops them, and reads their health and typed stats for the admin
API (:meth:`Gateway.status`, :meth:`Gateway.metric_samples`).

One asyncio process; every long-lived task is owned by a ``TaskGroup``. The
order of start-up is the order data flows backwards: outbox first (so nothing
can be acknowledged before it is ready), then sinks, then the broker and its
listeners. Shutdown goes the other way: stop accepting, let in-flight work
finish, close the outbox last so every acknowledged reading is on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeway.config import Config
from edgeway.devices.auth import Authenticator, Authoriser
from edgeway.ingest import Ingest
from edgeway.outbox import Outbox, SinkRunner
from edgeway.outbox.store import CHUNK_MAX
from edgeway.pipeline import Pipeline
from edgeway.rules.targets import ActionTargets
from edgeway.runtime.component import (
    Component,
    MetricKind,
    MetricSpec,
    Sample,
    metric_samples,
    status_dict,
    stop_within,
)
from edgeway.runtime.component import StartupError as StartupError  # re-exported (cli)
from edgeway.runtime.switch import IngestSwitch
from edgeway.sinks.base import SINK_STOP_WAIT, Sink, create_sink
from edgeway.south.base import SouthAdapter, adapter_class
from edgeway.south.mqtt.broker import Broker
from edgeway.south.mqtt.embedded import EmbeddedBroker
from edgeway.south.mqtt.listeners import RunningListener

if TYPE_CHECKING:
    from edgeway.admin.api import AdminServer
    from edgeway.alarms.service import AlarmService
    from edgeway.commands.service import CommandService
    from edgeway.devices.identity import DeviceAccessControl
    from edgeway.devices.service import DeviceService
    from edgeway.downlink import ReceiptDownlink
    from edgeway.firmware.service import FirmwareService
    from edgeway.ml.manager import ModelManager
    from edgeway.receipts import ReceiptSender
    from edgeway.south.mqtt.downlink import BrokerReceipts
    from edgeway.twins.service import TwinService

log = logging.getLogger(__name__)

ADAPTER_READY_WAIT = 3.0
"""Seconds start-up waits for south adapters to bind or connect before "ready"."""
RECEIPT_SETTLE = 1.0
"""Seconds shutdown waits for in-flight sink batches so their receipts go out."""
RUNNER_STOP_WAIT = 1.0
RUNNER_STOP_ROUNDS = 3
"""A sink runner gets this long after each cancellation, this many times, to end."""
SHUTDOWN_GRACE = 4.0
"""Seconds allowed for an orderly stop; the issue promises exit within 5 s."""
UPTIME = MetricSpec("uptime_seconds", MetricKind.GAUGE, "Seconds since start")


@dataclass(slots=True)
class Gateway:
    """The running gateway: outbox, sinks, broker, listeners.

    ``run()`` starts everything, sets ``ready`` and waits for ``stop``.
    Tests build one in a few lines::

        gw = Gateway(parse_config(text))
        task = asyncio.create_task(gw.run())
        await gw.ready.wait()
    """

    config: Config
    authenticator: Authenticator | None = None
    authoriser: Authoriser | None = None
    access: DeviceAccessControl | None = None
    """Identities, credentials and revocation for every listener (built at
    start from the config and the data directory unless the authenticator
    and authoriser are injected in code)."""
    tune_gc: bool = False
    """Tune the garbage collector for the process once started (``edgeway
    run`` sets it; tests running gateways in-process do not)."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    outbox: Outbox | None = None
    pipeline: Pipeline | None = None
    embedded: EmbeddedBroker | None = None
    """The embedded MQTT broker and its listeners (``broker`` and ``listeners``
    are its parts, kept here for the reload and the tests)."""
    broker: Broker | None = None
    sinks: list[Sink] = field(default_factory=list)
    listeners: list[RunningListener] = field(default_factory=list)
    adapters: list[SouthAdapter] = field(default_factory=list)
    admin: AdminServer | None = None
    commands: CommandService | None = None
    models: ModelManager | None = None
    alarms: AlarmService | None = None
    """The alarms (``alarms.enabled``): rules raise and clear them."""
    devices: DeviceService | None = None
    """The device registry and status (``devices:``), when enabled."""
    started_at: float = 0.0
    config_text: str | None = None
    """The YAML text of the configuration in force (None: built in code or
    from command-line flags only); kept in the history when it changes."""
    config_source: str = "start"
    """Where the configuration in force came from (start, sighup, api, ...)."""
    config_path: Path | None = None
    """The file the configuration was read from: SIGHUP and ``edgeway reload``
    read it again. None: those reloads are refused."""
    config_overrides: Any = None
    """``Config -> Config``: the command-line flags the gateway was started
    with (``--sink``, ``--mqtt-listen``, ...), applied to every configuration
    a reload reads or receives, as they were at start."""
    ingest: IngestSwitch | None = None
    """What adapters and the broker submit to: the pipeline, behind a switch
    a reload can turn (see edgeway.runtime.switch)."""
    reloads: int = 0
    reload_failures: int = 0
    reload_grace: float = 2.0
    """Seconds a reloaded gateway must stay healthy before the reload stands."""
    _front_stopped: bool = False
    _tg: asyncio.TaskGroup | None = None
    _sink_tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _downlinks: dict[int, Any] = field(default_factory=dict)
    """The command downlink of each adapter that has one (by id(adapter))."""
    _broker_downlink: Any = None
    _fleet: Any = None
    """The downlink that takes pushed configurations (edgeway.runtime.fleet)."""
    twins: TwinService | None = None
    firmware: FirmwareService | None = None
    _twin_mqtt: Any = None
    _twin_downlink: Any = None
    _firmware_mqtt: Any = None
    receipts: ReceiptSender | None = None
    """Receipts to devices (``receipts.enabled``), see edgeway.receipts."""
    _broker_receipts: BrokerReceipts | None = None
    _reload_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _retired_sinks: list[Sink] = field(default_factory=list)
    """Sinks a reload replaced, closed once the reload stands."""
    rule_targets: ActionTargets = field(default_factory=ActionTargets)
    """Where rule actions go; filled as the parts start (edgeway.rules.actions)."""

    def status(self) -> dict[str, Any]:
        """A snapshot of every part's counters and state (admin API, metrics)."""
        return {
            "gateway_id": self.config.gateway.id,
            "ready": self.ready.is_set(),
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "broker": self.embedded.stats().flat() if self.embedded is not None else None,
            "outbox": self.outbox.status() if self.outbox is not None else {},
            "outbox_retired": self.outbox.retired_counters() if self.outbox is not None else {},
            "reloads": {"applied": self.reloads, "failed": self.reload_failures},
            "pipeline": self.pipeline.report() if self.pipeline is not None else None,
            "commands": self._command_status(),
            "models": self.models.status() if self.models is not None else None,
            "rules": self.pipeline.rules.status()
            if self.pipeline and self.pipeline.rules
            else None,
            "receipts": (
                dataclasses.asdict(self.receipts.stats) if self.receipts is not None else None
            ),
            "alarms": self.alarms.status() if self.alarms is not None else None,
            "devices": self.devices.status() if self.devices is not None else None,
            "sinks": {s.name: status_dict(s.stats()) for s in self.sinks},
            "adapters": {_adapter_key(a): status_dict(a.stats()) for a in self.adapters},
        }

    def components(self) -> list[Component]:
        """Every running part, in the order data flows (devices to cloud)."""
        out: list[Component] = [*self.adapters]
        if self.embedded is not None:
            out.append(self.embedded)
        out += [c for c in (self.pipeline, self.outbox) if c is not None]
        return out + self.sinks

    def metric_samples(self) -> list[Sample]:
        """``/metrics``: the uptime and every component's declared figures, the
        sinks' and adapters' labelled with their names."""
        uptime = time.monotonic() - self.started_at if self.started_at else 0.0
        out = [Sample(UPTIME, (), uptime)]
        if self.embedded is not None:
            out += metric_samples(self.embedded.stats())
        if self.outbox is not None:
            out += metric_samples(self.outbox.stats())
        for sink in self.sinks:
            out += metric_samples(sink.stats(), (("sink", sink.name),))
        if self.pipeline is not None:
            out += metric_samples(self.pipeline.stats())
        if self.receipts is not None:
            out += metric_samples(self.receipts.stats)
        for adapter in self.adapters:
            out += metric_samples(adapter.stats(), (("adapter", _adapter_key(adapter)),))
        return out

    def _command_status(self) -> dict[str, Any] | None:
        if self.commands is None:
            return None
        out = dataclasses.asdict(self.commands.stats)
        if self._broker_downlink is not None:
            # Results the embedded broker's downlink refused before the queue
            # saw them (not JSON, or published by another client id).
            out["mqtt_results_refused"] = self._broker_downlink.results_refused
        return out

    def health_problems(self) -> list[str]:
        """What keeps the gateway from serving devices right now (empty: healthy).

        A south listener that stopped serving (down, restarting) is one: the
        gateway may still run, but devices that reach it that way get no answer.
        """
        return [problem for c in self.components() for problem in c.health().problems]

    def request_stop(self) -> None:
        """Ask ``run()`` to shut down (signal handlers call this)."""
        self.stop_event.set()

    async def run(self) -> None:
        cfg = self.config
        self.started_at = time.monotonic()
        data_dir = Path(cfg.gateway.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up

        authenticator, authoriser = self._auth()
        sinks = [create_sink(s, cfg.gateway.id) for s in cfg.sinks]
        if not sinks:
            log.warning(
                "no sinks configured: readings are acknowledged, stored and kept in the outbox "
                "until a sink is added (add one with --sink URL or a sinks: section)"
            )
        if cfg.models.enabled:
            await self._open_models(cfg)
        try:
            await self._open_data_path(cfg, sinks)
        except BaseException:
            if self.models is not None:
                await self.models.close()
            raise
        assert self.pipeline is not None
        self.ingest = IngestSwitch(self.pipeline)
        if cfg.commands.enabled:
            from edgeway.commands.service import CommandService

            self.commands = CommandService(
                data_dir, cfg.commands, emit=self._store_records, durability=cfg.outbox.durability
            )
            await self.commands.open()
            if cfg.fleet.enabled:
                from edgeway.runtime.fleet import GatewayDownlink

                try:
                    self._fleet = GatewayDownlink(self, cfg.gateway.id, data_dir, self.commands)
                except RuntimeError as e:
                    raise StartupError(str(e)) from e
                self.commands.add_downlink(self._fleet)
            self.rule_targets.commands = self.commands
        if cfg.twins.enabled:
            await self._open_twins(cfg)
            self.rule_targets.twins = self.twins
        if cfg.firmware.enabled and self.commands is not None:
            from edgeway.firmware.service import FirmwareService
            from edgeway.signing import load_public_key

            self.firmware = FirmwareService(
                data_dir,
                self.commands,
                max_size=cfg.firmware.max_image_size,
                keys={n: load_public_key(k) for n, k in cfg.firmware.keys.items()},
                require_signature=cfg.firmware.require_signature,
                download_base=cfg.firmware.download_base,
                durability=cfg.outbox.durability,
            )
            await self.firmware.open()
        if cfg.alarms.enabled:
            from edgeway.alarms.service import AlarmService

            self.alarms = AlarmService(
                data_dir, cfg.alarms, emit=self._store_records, durability=cfg.outbox.durability
            )
            await self.alarms.open()
            self.rule_targets.alarms = self.alarms
        if cfg.devices.enabled:
            from edgeway.devices.service import DeviceService

            self.devices = DeviceService(
                data_dir, cfg, emit=self._store_records, live=lambda: self.config
            )
            await self.devices.open()
            if self.firmware is not None:
                self.firmware.registry = self.devices.registry  # campaigns by group, tag, type
        self.adapters = self._build_adapters()
        try:
            for sink in self.sinks:
                await sink.start()
            if cfg.mqtt.enabled:
                # Before the TaskGroup, so that a port already in use surfaces as
                # a plain ListenerError the CLI can print in one line.
                await self._start_broker(authenticator, authoriser)
                self.rule_targets.publish = self._publish_for_rules
            if self.access is not None:
                self.access.attach(self.broker)
                if self.devices is not None:
                    self.devices.link_access(self.access)
            for adapter in self.adapters:
                self._register_downlink(adapter)
            if self.commands is not None and self.broker is not None:
                from edgeway.south.mqtt.downlink import BrokerDownlink

                downlink = BrokerDownlink(self.broker, cfg.commands.mqtt, self.commands)
                downlink.attach()
                self.commands.add_downlink(downlink)
                self._broker_downlink = downlink
            if self.twins is not None and self.broker is not None:
                from edgeway.twins.mqtt import TwinMqtt

                self._twin_mqtt = TwinMqtt(self.broker, self.twins)
                self._twin_mqtt.attach()
            if self.firmware is not None and self.broker is not None and cfg.firmware.mqtt_chunks:
                from edgeway.firmware.mqtt import FirmwareMqtt

                self._firmware_mqtt = FirmwareMqtt(
                    self.broker, self.firmware, cfg.firmware.mqtt_chunk_max
                )
                self._firmware_mqtt.attach()
            if cfg.admin is not None and cfg.admin.enabled:
                from edgeway.admin.api import AdminServer

                try:
                    self.admin = AdminServer.from_config(
                        cfg.admin,
                        data_dir,
                        self.status,
                        self.ready.is_set,
                        stopping=self.stop_event.is_set,
                        problems=self.health_problems,
                        samples=self.metric_samples,
                    )
                except ValueError as e:
                    raise StartupError(str(e)) from e
                self.admin.commands = self.commands
                self.admin.models = self.models
                self.admin.twins = self.twins
                self.admin.firmware = self.firmware
                self.admin.alarms = self.alarms
                self.admin.devices = self.devices
                self.admin.outbox = lambda: self.outbox
                self.admin.rules = lambda: self.pipeline.rules if self.pipeline else None
                self.admin.config_control = self
                self.ingest.tap = self.admin.recent.record
                await self.admin.start()
            if self.pipeline.rules is not None:
                self.pipeline.rules.start_actions()
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    self._start_runners()
                    for adapter in self.adapters:
                        await self._start_adapter(adapter)
                    if self.devices is not None:
                        self.devices.watch(lambda: self.adapters)
                        tg.create_task(self.devices.run(), name="devices")
                    await self._wait_adapters_ready()
                    log.info(
                        "edgeway ready",
                        extra={
                            "fields": {
                                "gateway_id": cfg.gateway.id,
                                "data_dir": str(data_dir),
                                "startup_ms": round((time.monotonic() - self.started_at) * 1000, 1),
                            }
                        },
                    )
                    if self.tune_gc:
                        _tune_gc()
                    if self.config_text is not None:
                        from edgeway.runtime.reload import ConfigHistory

                        history = ConfigHistory(data_dir)
                        await asyncio.to_thread(history.record, self.config_text, "start")
                    self.ready.set()
                    if cfg.gateway.health_interval > 0:
                        tg.create_task(self._health_reporter().run(), name="health")
                    await self.stop_event.wait()
                    log.info("stopping")
                    await self._stop_front()
                    await self._stop_runners()
                    raise _Shutdown
            except* _Shutdown:
                pass
        finally:
            await self._stop_front()
            if self.access is not None:
                self.access.close()
            if self.admin is not None:
                await self.admin.close()
            self._tg = None
            # After the adapters stopped (nothing submits any more), before the
            # outbox closes (the pipeline's last window state and stats commit).
            if self.pipeline is not None:
                await self.pipeline.stop(SHUTDOWN_GRACE / 2)
            if self._fleet is not None:
                await self._fleet.close()
            if self._twin_mqtt is not None:
                self._twin_mqtt.detach()
            if self._firmware_mqtt is not None:
                self._firmware_mqtt.detach()
            if self._twin_downlink is not None:
                await self._twin_downlink.close()
            if self.firmware is not None:
                await self.firmware.close()
            if self.twins is not None:
                await self.twins.close()
            if self.commands is not None:
                await self.commands.close()
            if self.models is not None:
                await self.models.close()
            if self.alarms is not None:
                await self.alarms.close()
            if self.devices is not None:
                await self.devices.close()
            for sink in self.sinks:
                await stop_within(sink, SINK_STOP_WAIT)
            if self.outbox is not None:
                await self.outbox.stop(SHUTDOWN_GRACE / 2)
            log.info("stopped")

    async def _open_twins(self, cfg: Config) -> None:
        """The twin store; cloud ``twin.desired`` requests through the command queue."""
        from edgeway.twins.model import TwinLimits
        from edgeway.twins.service import TwinService

        self.twins = TwinService(
            cfg.gateway.data_dir,
            TwinLimits(cfg.twins.max_bytes, cfg.twins.max_depth),
            emit=self._store_records,
            durability=cfg.outbox.durability,
        )
        await self.twins.open()
        if self.commands is not None:
            from edgeway.twins.downlink import TwinDownlink

            self._twin_downlink = TwinDownlink(self.twins, self.commands)
            self.commands.add_downlink(self._twin_downlink)

    async def _open_models(self, cfg: Config) -> None:
        """Open the model registry and start the inference thread."""
        from edgeway.ml.manager import ModelManager
        from edgeway.ml.store import ModelStore
        from edgeway.signing import load_public_key

        store = ModelStore(
            Path(cfg.gateway.data_dir) / "models",
            max_size=cfg.models.max_size,
            keys={name: load_public_key(text) for name, text in cfg.models.keys.items()},
            require_signature=cfg.models.require_signature,
        )
        self.models = ModelManager(store, cfg.models)
        await self.models.open()

    # ------------------------------------------------------------- data path

    async def _open_data_path(self, cfg: Config, sinks: list[Sink]) -> None:
        """Open the outbox for ``sinks`` and the pipeline for ``cfg``'s routes;
        set ``self.sinks``, ``self.outbox``, ``self.pipeline``. Raises
        StartupError (nothing left open) for what the operator must fix."""
        data_dir = Path(cfg.gateway.data_dir)
        try:
            outbox = Outbox(
                data_dir / "outbox.db",
                gateway_id=cfg.gateway.id,
                config=cfg.outbox,
                sink_names=[s.name for s in sinks],
                chunk_max=min([CHUNK_MAX, *(s.max_batch_records for s in sinks)]),
            )
        except ValueError as e:  # sink names defined twice: the operator's to fix
            raise StartupError(str(e)) from e
        try:
            await outbox.start()
        except RuntimeError as e:
            # Another gateway holds this data directory's lock: an operator's
            # mistake, so one line naming the directory, not a traceback.
            raise StartupError(str(e)) from e
        self.rule_targets.emit = self._store_records
        try:
            rules = None
            if cfg.rules:  # imported only when used: nothing changes without rules
                from edgeway.rules.stage import rules_stage_or_none

                rules = rules_stage_or_none(
                    cfg.rules, cfg.routes, data_dir, self.rule_targets, cfg.outbox.durability
                )
            pipeline = Pipeline(
                cfg.routes,
                cfg.pipeline,
                outbox=outbox,
                data_dir=data_dir,
                durability=cfg.outbox.durability,
                services={"models": self.models} if self.models is not None else None,
                rules=rules,
            )
        except ValueError as e:
            # A configuration the pipeline refuses (``edgeway check`` names the
            # line): one line, not a traceback.
            await outbox.close()
            raise StartupError(str(e)) from e
        try:
            await pipeline.start()
        except BaseException:
            await outbox.close()
            raise
        if cfg.receipts.enabled:
            from edgeway.receipts import ReceiptSender

            self.receipts = ReceiptSender(cfg.receipts.topic, self._receipt_downlinks)
            outbox.add_confirmed_listener(self.receipts.confirmed)
        if pipeline.rules is not None and self.ready.is_set():  # a reload's new data path
            pipeline.rules.start_actions()
        self.sinks, self.outbox, self.pipeline = sinks, outbox, pipeline

    async def _close_data_path(self) -> None:
        """Stop the sink runners, close the pipeline and the outbox (sinks stay)."""
        await self._stop_runners()
        if self.pipeline is not None:
            await self.pipeline.stop(SHUTDOWN_GRACE / 2)
        if self.outbox is not None:
            await self.outbox.stop(SHUTDOWN_GRACE / 2)

    def _health_reporter(self) -> Any:
        from edgeway.health_report import HealthReporter, summarize

        cfg = self.config.gateway
        return HealthReporter(
            cfg.id,
            cfg.health_interval,
            lambda: summarize(self.status(), self.health_problems()),
            self._store_records,
        )

    def _store_records(self, readings: Sequence[Any]) -> Any:
        """Records the gateway makes itself (command states, alarm transitions)
        into the outbox in force (a reload may replace it)."""
        assert self.outbox is not None
        return self.outbox.submit(readings)

    def _publish_for_rules(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """A rule's MQTT publish on the embedded broker."""
        assert self.broker is not None
        self.broker.publish(topic, payload, qos=qos, retain=retain)

    def _start_runners(self) -> None:
        """A runner task per sink, and its cloud command source if it has one."""
        tg, outbox = self._tg, self.outbox
        assert tg is not None and outbox is not None
        for sink in self.sinks:
            self._sink_tasks.append(
                tg.create_task(
                    SinkRunner(outbox, sink, probe_interval=sink.config.probe_interval).run(),
                    name=f"sink:{sink.name}",
                )
            )
            source = sink.command_source(self.commands) if self.commands is not None else None
            if source is not None:
                self._sink_tasks.append(
                    tg.create_task(source.run(), name=f"commands:{source.name}")
                )
            side = sink.side_task()
            if side is not None:
                self._sink_tasks.append(tg.create_task(side.run(), name=f"side:{side.name}"))

    async def _stop_runners(self) -> None:
        """Cancel the sink runners and command sources and wait for them. A task
        still running after a second is cancelled again: on Python 3.11 a
        cancellation that races with a library's own timeout can be lost
        (asyncio.timeout/wait_for), and shutdown must not wait for it forever."""
        tasks, self._sink_tasks = self._sink_tasks, []
        pending: set[asyncio.Task[Any]] = set(tasks)
        for _ in range(RUNNER_STOP_ROUNDS):
            if not pending:
                break
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=RUNNER_STOP_WAIT)
            if pending:
                log.warning("still stopping: %s", ", ".join(sorted(t.get_name() for t in pending)))
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: a runner's error was logged where it happened

    async def _start_adapter(self, adapter: SouthAdapter, *, fatal: bool = True) -> None:
        """Start ``adapter`` in the gateway's TaskGroup: a fatal start-up error
        (``fatal``) stops the gateway; otherwise it is in ``adapter.state``."""
        assert self._tg is not None
        await adapter.start(group=self._tg, fatal=fatal)

    async def apply_text(self, text: str, source: str, filename: str = "<api>") -> list[str]:
        """Validate YAML ``text`` (with the start's command-line flags) and apply
        it; ReloadError (with ``issues`` for a configuration that does not
        validate) when nothing changed."""
        from edgeway.config import ConfigError, parse_config_lines
        from edgeway.runtime.reload import ReloadError
        from edgeway.validate import check_config

        try:
            cfg, lines = parse_config_lines(text, filename)
            if self.config_overrides is not None:
                cfg = self.config_overrides(cfg)
            issues = check_config(cfg, lines)
        except ConfigError as e:
            issues = list(e.issues)
        except ValueError as e:
            raise ReloadError(f"not applied: {e}") from e
        if issues:
            err = ReloadError("not applied: the configuration does not validate")
            err.issues = issues
            raise err
        return await self.reload(cfg, text, source)

    async def reload_from_file(self, source: str) -> list[str]:
        """Read the configuration file again and apply it (SIGHUP, ``edgeway reload``)."""
        from edgeway.runtime.reload import ReloadError

        path = self.config_path
        if path is None:
            raise ReloadError("started without a configuration file: nothing to read again")
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except OSError as e:
            raise ReloadError(f"cannot read {path}: {e.strerror}") from e
        return await self.apply_text(text, source, str(path))

    async def rollback(self, number: int | None = None) -> list[str]:
        """Apply a configuration from the history (default: the one before the
        current one)."""
        from edgeway.runtime.reload import ConfigHistory, ReloadError

        history = ConfigHistory(Path(self.config.gateway.data_dir))
        entries = await asyncio.to_thread(history.entries)
        if number is None:
            if len(entries) < 2:
                raise ReloadError("no earlier configuration in the history")
            entry = entries[1]
        else:
            found = next((e for e in entries if e.number == number), None)
            if found is None:
                raise ReloadError(f"no configuration number {number} in the history")
            entry = found
        text = await asyncio.to_thread(entry.text)
        return await self.apply_text(text, f"rollback:{entry.number}", f"history #{entry.number}")

    def request_reload(self, source: str = "sighup") -> None:
        """Re-read the configuration file in the background (a signal handler)."""

        async def run() -> None:
            from edgeway.runtime.reload import ReloadError

            try:
                await self.reload_from_file(source)
            except ReloadError as e:
                issues = getattr(e, "issues", None)
                log.error("reload (%s): %s", source, e)
                for issue in issues or ():
                    log.error("  %s", issue)

        task = asyncio.get_running_loop().create_task(run(), name="reload")
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def reload(self, cfg: Config, text: str | None, source: str) -> list[str]:
        """Apply ``cfg`` (already validated) while running; see edgeway.runtime.apply.
        Returns the changes made; raises ReloadError when nothing was changed
        (refused, or rolled back)."""
        from edgeway.runtime.apply import apply_config

        changes: list[str] = await apply_config(self, cfg, text, source)
        return changes

    async def _wait_adapters_ready(self) -> None:
        """Give listeners a moment to bind before saying ready; pollers whose
        peer is down do not hold up start-up (they keep retrying)."""
        pending = [a for a in self.adapters if not a.ready.is_set()]
        if not pending:
            return
        waits = [asyncio.ensure_future(a.ready.wait()) for a in pending]
        try:
            await asyncio.wait(waits, timeout=ADAPTER_READY_WAIT)
        finally:
            for w in waits:
                w.cancel()
        for a in pending:
            if not a.ready.is_set():
                log.warning("south adapter %s is not connected yet; it keeps retrying", a.name)

    def _build_adapters(self) -> list[SouthAdapter]:
        """One adapter per configured entry of every registered adapter section."""
        from edgeway.south.base import registered_sections

        out: list[SouthAdapter] = []
        for section in registered_sections():
            value = getattr(self.config, section, None)
            entries = value if isinstance(value, list) else ([] if value is None else [value])
            for entry in entries:
                if getattr(entry, "enabled", True) is not False:
                    out.append(self._build_adapter(section, entry))
        return out

    def _build_adapter(self, section: str, entry: Any) -> SouthAdapter:
        """The adapter for one configured entry, submitting to the ingest switch."""
        assert self.ingest is not None
        adapter = adapter_class(section)(
            entry,
            ingest=self._adapter_ingest(),
            gateway_id=self.config.gateway.id,
            data_dir=Path(self.config.gateway.data_dir),
        )
        if hasattr(adapter, "twins"):
            adapter.twins = self.twins  # the HTTP ingest serves them (edgeway.twins)
        if hasattr(adapter, "firmware"):
            adapter.firmware = self.firmware  # and firmware downloads
        adapter.access = self.access
        return adapter

    def _adapter_ingest(self) -> Ingest:
        """What adapters and the broker submit to: the switch, behind the
        device registry's gate when it is enabled."""
        assert self.ingest is not None
        return self.ingest if self.devices is None else self.devices.ingest_for(self.ingest)

    def _register_downlink(self, adapter: SouthAdapter) -> None:
        """Give the command queue the adapter's downlink, if it has one."""
        if self.config.receipts.enabled:
            adapter.receipt_downlink()  # it remembers its devices from now on
        if self.commands is None:
            return
        events: Any = self.commands
        if self.devices is not None:
            events = self.devices.downlink_events(self.commands, adapter.section)
        downlink = adapter.downlink(events)
        if downlink is not None:
            self.commands.add_downlink(downlink)
            self._downlinks[id(adapter)] = downlink

    def _auth(self) -> tuple[Authenticator, Authoriser]:
        if self.authenticator is not None and self.authoriser is not None:
            return self.authenticator, self.authoriser
        from edgeway.devices.identity import DeviceAccessControl

        self.access = DeviceAccessControl(self.config, Path(self.config.gateway.data_dir))
        return self.access.authenticator, self.access.authoriser

    def _devices_have_credentials(self) -> bool:
        """Some device has credentials of its own (``edgeway credentials issue``),
        or can get them (a provisioning key: ``edgeway provisioning add``)."""
        return self.access is not None and (
            bool(self.access.store.devices()) or bool(self.access.provisioning_keys.list())
        )

    async def _start_broker(self, authenticator: Authenticator, authoriser: Authoriser) -> None:
        cfg = self.config
        assert self.ingest is not None
        if self.devices is not None:
            authenticator = self.devices.authenticator_for(authenticator)
        embedded = EmbeddedBroker(
            cfg.mqtt,
            ingest=self._adapter_ingest(),
            authenticator=authenticator,
            authoriser=authoriser,
            data_dir=Path(cfg.gateway.data_dir),
            gateway_id=cfg.gateway.id,
            credentials_from_config=self.authenticator is None,
            devices_have_credentials=self._devices_have_credentials,
            on_broker_started=(self.devices.attach_broker if self.devices is not None else None),
        )
        self.embedded, self.broker = embedded, embedded.broker
        self.listeners = embedded.listeners  # one list: a reload edits it in place
        await embedded.start()

    async def _stop_front(self) -> None:
        """Stop accepting, disconnect clients, let pending acks and commits finish."""
        if self._front_stopped:
            return
        self._front_stopped = True
        if self.embedded is None:
            return
        await self.embedded.close_listeners()
        if self.config.receipts.enabled:
            await self._settle_for_receipts()
        try:
            await asyncio.wait_for(
                self.embedded.stop_broker(SHUTDOWN_GRACE / 2), SHUTDOWN_GRACE / 2
            )
        except TimeoutError:
            log.warning("broker did not stop in time")

    async def _settle_for_receipts(self) -> None:
        """Give sinks a moment to confirm what is in flight before the broker
        stops, so the receipts for those readings still reach their devices
        (queued for persistent sessions, which the broker saves on stop).

        Bounded by RECEIPT_SETTLE: with a sink that is down nothing settles,
        and shutdown must still finish within 5 s. Readings confirmed later
        (after a restart) get their receipt then, as the outbox confirms them.
        """
        outbox = self.outbox
        if outbox is None or not self.sinks:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECEIPT_SETTLE
        while loop.time() < deadline:
            if all(c.get("pending", 0) == 0 for c in outbox.counters().values()):
                return
            outbox.expedite()  # no new readings come to carry a confirmation
            await asyncio.sleep(0.02)

    def _receipt_downlinks(self) -> list[ReceiptDownlink]:
        """Where receipts go now: the embedded broker and every adapter that
        carries them (asked at each batch: a reload may have replaced some)."""
        out: list[ReceiptDownlink] = []
        if self.broker is not None:
            if self._broker_receipts is None or self._broker_receipts.broker is not self.broker:
                from edgeway.south.mqtt.downlink import BrokerReceipts

                self._broker_receipts = BrokerReceipts(self.broker)
            out.append(self._broker_receipts)
        for adapter in self.adapters:
            downlink = adapter.receipt_downlink()
            if downlink is not None:
                out.append(downlink)
        return out


GC_THRESHOLDS = (50_000, 20, 100)
"""Collector thresholds once the gateway runs. The hot path allocates a few
short-lived dicts and objects per reading, almost none of them in cycles
(reference counting frees them), but CPython's default (700, 10, 10) runs a
young-generation collection every 700 allocations anyway: about 10% of the
gateway's CPU at full load. Measured with bench/end_to_end.py's fixed W1
(MQTT sink), alternating runs: 0.0172 -> 0.0152 CPU-s per 1,000 records."""


def _tune_gc() -> None:
    """Freeze what start-up built (config, modules, compiled routes: they live
    as long as the process, so the collector need never look at them again)
    and collect the young generation less often (see GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _adapter_key(adapter: SouthAdapter) -> str:
    """``section:name``: an adapter's key in the status and its metric label."""
    return f"{adapter.section}:{adapter.name}"


class _Shutdown(Exception):
    """Raised inside the TaskGroup to cancel the sink runners on stop."""
