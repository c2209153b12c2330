"""``edgeway demo``: the gateway, simulated devices on every protocol, and a local cloud.

Example::

    edgeway demo                          # until Ctrl-C
    edgeway demo --cloud-outage 20        # the cloud goes down for 20 s after a few seconds
    edgeway demo --duration 30 --devices 100

One process runs, on loopback: the gateway (built in code, no file: MQTT,
CoAP and HTTP listeners, receipts on, admin API on, one HTTP sink), a small
cloud receiver (:class:`~edgeway.sim.cloud.CloudReceiver`) that the sink
delivers to, and simulated devices: MQTT, CoAP and HTTP devices that push,
and Modbus and OPC-UA servers that the gateway polls (those two when
pymodbus / asyncua are installed). Each listener takes its usual port, or a
free one when that port is taken (a local Mosquitto on 1883 is common).

Every few seconds a line shows readings in, records delivered, pending and
dropped (from :meth:`Gateway.status`), what the cloud has, and what the
devices still hold. From ``command_after`` seconds on, every
``command_interval`` seconds, the demo sends a command through the gateway's
command queue to one MQTT device and one other device (HTTP, CoAP, Modbus,
OPC-UA in turn) and prints each round trip: device, command, end state, time from
queued to result (:class:`CommandRounds`). At the end (``--duration`` or
Ctrl-C) devices stop, the backlog drains, and a summary proves for every
pushed message that it reached the cloud: ``lost`` counts messages a device
produced that the cloud never received and no device still holds; it also
counts the commands sent and succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import logging
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from edgeway.commands.service import CommandError
from edgeway.config import (
    AdminSection,
    CoapSection,
    Config,
    GatewaySection,
    HttpIngestSection,
    ListenerConfig,
    LogSection,
    MqttSection,
    ReceiptsSection,
    SinkConfig,
)
from edgeway.sim.cloud import CloudReceiver, OutageMode
from edgeway.sim.devices import VirtualDevice, make_devices
from edgeway.sim.predictive import (
    PredictiveChain,
    add_predictive,
    machine_id,
    predictive_summary,
)
from edgeway.sim.runner import (
    CoapFleet,
    FleetStats,
    HttpFleet,
    ModbusSimServer,
    MqttFleet,
    OpcUaSimServer,
)

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "coap": 5683, "http": 8080, "admin": 9180, "cloud": 8088}
"""The gateway's usual ports, and one for the demo's cloud receiver."""

READY_TIMEOUT = 20.0
"""Seconds the gateway may take to start (an OPC-UA session takes ~1 s)."""

DRAIN_TIMEOUT = 30.0
"""Seconds allowed at the end for devices' buffers and the outbox to empty.
After a cloud outage the sink's retry backoff (at most a few seconds here,
the cloud answers Retry-After: 1) and the backlog must both fit in it."""

OPCUA_START_WAIT = 20.0
"""Seconds during which the OPC-UA adapters' connection warnings are hidden:
the demo's OPC-UA simulator is a child process and asyncua takes 1-5 s of
CPU to build its address space, while the gateway starts at once (its
adapters retry until the server is up)."""

COMMAND_WAIT = 10.0
"""Seconds a demo command may take, queued to result (its time to live and
result timeout too): a device on loopback answers in milliseconds; one that
is not connected yet (the OPC-UA simulator starts in seconds) gets the time
to connect."""

LINE_DETAIL_MAX = 80
"""Characters of a command's result or error shown on its line (the line stays one line)."""

Write = Callable[[str], None]


class _QuietUntil(logging.Filter):
    """Drops log records that mention one of ``words`` until a monotonic time."""

    def __init__(self, words: tuple[str, ...], until: float) -> None:
        super().__init__()
        self.words = words
        self.until = until

    def filter(self, record: logging.LogRecord) -> bool:
        if time.monotonic() >= self.until:
            return True
        msg = record.getMessage()
        return not any(w in msg for w in self.words)


@dataclass(slots=True)
class DemoOptions:
    """What ``edgeway demo`` runs."""

    duration: float | None = None
    """Seconds to run; None: until Ctrl-C (or ``stop``)."""
    cloud_outage: float = 0.0
    """Seconds the cloud receiver is down, starting ``outage_after`` s in."""
    outage_after: float = 4.0
    outage_mode: OutageMode = "503"
    mqtt_devices: int = 20
    coap_devices: int = 5
    http_devices: int = 5
    modbus_devices: int = 3
    opcua_devices: int = 2
    rate: float = 1.0
    """Messages per second per pushing device."""
    interval: float = 2.0
    """Seconds between status lines."""
    data_dir: Path | None = None
    """Gateway data and the cloud's records; None: a temporary directory, removed at the end."""
    host: str = "127.0.0.1"
    seed: int | None = None
    command_after: float = 5.0
    """Seconds after the devices start that the first commands go out."""
    command_interval: float = 10.0
    """Seconds between command round trips; 0: no commands."""
    fault_after: float = 20.0
    """Seconds after the devices start that a bearing fault begins on the first
    MQTT machine (edgeway.sim.predictive); 0: none."""


@dataclass(slots=True)
class DemoResult:
    """The summary's figures (also what tests check)."""

    seconds: float = 0.0
    produced: dict[str, int] = field(default_factory=dict)
    """Messages produced by pushing devices, per protocol."""
    polled: int = 0
    """Readings the gateway took from Modbus and OPC-UA (delivered or pending)."""
    stored: int = 0
    delivered: int = 0
    pending: int = 0
    dropped: int = 0
    cloud_records: int = 0
    cloud_unique: int = 0
    duplicates: int = 0
    resent: int = 0
    held_by_devices: int = 0
    lost: int = 0
    lost_ids: list[str] = field(default_factory=list)
    commands_sent: int = 0
    commands_succeeded: int = 0


@dataclass(slots=True, frozen=True)
class CommandTarget:
    """A device the demo sends commands to, and the commands it cycles through."""

    protocol: str
    device_id: str
    commands: tuple[tuple[str, dict[str, Any]], ...]


@dataclass(slots=True, frozen=True)
class RoundTrip:
    """One command's trip: what was sent and how it ended."""

    target: CommandTarget
    name: str
    params: dict[str, Any]
    state: str
    seconds: float | None
    """Queued to result (None: no end within COMMAND_WAIT)."""
    result: Any = None
    error: str | None = None

    def line(self) -> str:
        """The line the demo prints."""
        params = orjson.dumps(self.params).decode() if self.params else ""
        head = f"command  {self.target.device_id} ({self.target.protocol})  {self.name}"
        if params:
            head += f" {params}"
        if self.seconds is None:
            return f"{head}  still {self.state} after {COMMAND_WAIT:g} s"
        tail = orjson.dumps(self.result).decode() if self.state == "succeeded" else self.error or ""
        if len(tail) > LINE_DETAIL_MAX:
            tail = tail[: LINE_DETAIL_MAX - 3] + "..."
        return f"{head}  {self.state} in {self.seconds * 1000:.0f} ms: {tail}"


class CommandRounds:
    """Command round trips through the gateway's command queue: after
    ``first_after`` seconds and then every ``every`` seconds, one command to
    ``mqtt`` and one to the next of ``others`` (in turn), concurrently; a
    line per trip."""

    def __init__(
        self,
        commands: Any,
        write: Write,
        mqtt: CommandTarget | None,
        others: Sequence[CommandTarget],
        *,
        first_after: float,
        every: float,
    ) -> None:
        self.commands = commands
        """The gateway's :class:`~edgeway.commands.service.CommandService`."""
        self.write = write
        self.mqtt = mqtt
        self.others = list(others)
        self.first_after = first_after
        self.every = every
        self.trips: list[RoundTrip] = []
        self.sent = 0
        self._turns: dict[str, int] = {}

    @property
    def succeeded(self) -> int:
        return sum(1 for t in self.trips if t.state == "succeeded")

    async def run(self, ending: asyncio.Event) -> None:
        """Send rounds until ``ending`` is set; a round under way is finished."""
        delay = self.first_after
        n = 0
        while not await _wait_event(ending, delay):
            targets = [self.mqtt] if self.mqtt is not None else []
            if self.others:
                targets.append(self.others[n % len(self.others)])
            n += 1
            await asyncio.gather(*(self._trip(t) for t in targets))
            delay = self.every

    async def _trip(self, target: CommandTarget) -> None:
        turn = self._turns.get(target.device_id, 0)
        self._turns[target.device_id] = turn + 1
        name, params = target.commands[turn % len(target.commands)]
        try:
            cmd, _ = await self.commands.submit(
                target.device_id,
                name,
                params,
                ttl=COMMAND_WAIT,
                result_timeout=COMMAND_WAIT,
                source="demo",
            )
        except CommandError as e:  # queue full, stopping: say so, the demo goes on
            self.write(f"command  {target.device_id} ({target.protocol})  {name}  refused: {e}")
            return
        self.sent += 1
        done = await self.commands.wait(cmd.id, COMMAND_WAIT + 1.0)
        trip = RoundTrip(
            target,
            name,
            params,
            done.state.value,
            done.updated_at - done.created_at if done.state.terminal else None,
            done.result,
            done.error,
        )
        self.trips.append(trip)
        self.write(trip.line())


async def _wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


def pick_port(host: str, preferred: int, kind: int = socket.SOCK_STREAM) -> int:
    """``preferred`` when it can be bound on ``host``, else a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in (preferred, 0):
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:
                # As the servers do: a port in TIME_WAIT is free to take.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port on {host}")  # pragma: no cover - bind(0) does not fail


def available_protocols() -> dict[str, bool]:
    """Which protocol libraries are installed (the demo runs what it can)."""
    return {
        "coap": importlib.util.find_spec("aiocoap") is not None,
        "modbus": importlib.util.find_spec("pymodbus") is not None,
        "opcua": importlib.util.find_spec("asyncua") is not None,
    }


class Demo:
    """Everything ``edgeway demo`` runs, with its lifetimes."""

    def __init__(self, options: DemoOptions, write: Write) -> None:
        self.opt = options
        self.write = write
        self.stop = asyncio.Event()
        """Set to end the demo (Ctrl-C, --duration)."""
        self.cloud: CloudReceiver | None = None
        self.gateway: Any = None
        self.fleets: list[MqttFleet | CoapFleet | HttpFleet] = []
        self.modbus: ModbusSimServer | None = None
        self.opcua: OpcUaSimServer | None = None
        self.ports: dict[str, int] = {}
        self.result = DemoResult()
        self._tmp: Path | None = None
        self._opcua_proc: asyncio.subprocess.Process | None = None
        self._started = 0.0
        self._outage_state = ""
        self._http_token = secrets.token_urlsafe(24)
        """The HTTP devices' bearer token: telemetry is open on loopback, but
        the gateway hands commands only to a device that shows a token."""
        self.rounds: CommandRounds | None = None
        self.enrolled: tuple[int, float] = (0, 0.0)
        """Devices enrolled with the demo's provisioning key, and in how long."""
        self.predictive: PredictiveChain | None = None

    # ------------------------------------------------------------------ set-up

    def _config(self, data_dir: Path) -> Config:
        o, p = self.opt, self.ports
        assert self.cloud is not None
        cfg = Config(
            gateway=GatewaySection(id="demo-gw", data_dir=data_dir / "gateway"),
            log=LogSection(level="warning"),
            mqtt=MqttSection(
                listeners=[ListenerConfig(bind=f"{o.host}:{p['mqtt']}", allow_anonymous=True)]
            ),
            sinks=[SinkConfig(name="cloud", url=self.cloud.url, options={"max_wait": 0.2})],
            receipts=ReceiptsSection(enabled=True),
            admin=AdminSection(listen=f"{o.host}:{p['admin']}"),
            http_ingest=HttpIngestSection(
                listen=f"{o.host}:{p['http']}",
                allow_anonymous=True,
                tokens={"*": self._http_token},
            ),
        )
        if "coap" in p:
            # Commands over CoAP: off by default (no DTLS, no credentials); on
            # loopback only the demo's own devices can reach it.
            cfg.coap = CoapSection(listen=f"{o.host}:{p['coap']}", commands=True)
        if self.modbus is not None:
            cfg.modbus = self.modbus.gateway_config(interval=1.0)
        if self.opcua is not None:
            cfg.opcua = self.opcua.gateway_config(sampling_interval=1.0)
        self._add_predictive(cfg)
        return cfg

    def _predictive_machine(self) -> str | None:
        """The MQTT machine the fault is injected on (None: no fault)."""
        o = self.opt
        if o.fault_after <= 0 or o.mqtt_devices <= 0:
            return None
        return machine_id(make_devices(o.mqtt_devices, prefix="mqtt"))

    def _add_predictive(self, cfg: Config) -> None:
        """The anomaly step and the rule of the predictive-maintenance chain."""
        device_id = self._predictive_machine()
        if device_id is not None:
            add_predictive(cfg, device_id)

    def _predictive_chain(self) -> PredictiveChain | None:
        device_id = self._predictive_machine()
        if device_id is None:
            return None
        dev = next(d for f in self.fleets for d in f.devices if d.device_id == device_id)
        self.predictive = PredictiveChain(
            self.gateway, dev, self.write, fault_after=self.opt.fault_after
        )
        return self.predictive

    async def run(self) -> DemoResult:
        """Start everything, show figures until stopped, drain, summarise, stop."""
        from edgeway.gateway import Gateway

        o = self.opt
        have = available_protocols()
        if o.data_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="edgeway-demo-"))
        data_dir = o.data_dir or self._tmp
        assert data_dir is not None
        seed = o.seed if o.seed is not None else int(time.time())
        self.ports = {
            name: pick_port(
                o.host, port, socket.SOCK_DGRAM if name == "coap" else socket.SOCK_STREAM
            )
            for name, port in DEFAULT_PORTS.items()
            if name != "coap" or have["coap"]
        }
        self.cloud = CloudReceiver(
            o.host, self.ports["cloud"], store_path=data_dir / "cloud-records.jsonl"
        )
        gw_task: asyncio.Task[None] | None = None
        # Start-up on a busy machine: pollers may miss their first connect
        # (the loop is busy starting everything) and the OPC-UA simulator needs
        # a few seconds; they retry, and their warnings would only alarm.
        quiet = _QuietUntil(("sim-opcua", "sim-modbus"), time.monotonic() + OPCUA_START_WAIT)
        for name in ("edgeway.south.opcua", "edgeway.south.modbus", "edgeway.gateway"):
            logging.getLogger(name).addFilter(quiet)
        logging.getLogger("pymodbus.logging").setLevel(logging.ERROR)
        try:
            await self.cloud.start()
            if have["modbus"] and o.modbus_devices > 0:
                self.modbus = ModbusSimServer(
                    make_devices(
                        o.modbus_devices,
                        prefix="modbus",
                        seed=seed + 1,
                        kinds=("machine", "meter", "env"),
                    ),
                    o.host,
                )
                await self.modbus.start()
            if have["opcua"] and o.opcua_devices > 0:
                await self._start_opcua(seed + 2)
            self.gateway = Gateway(self._config(data_dir))
            gw_task = asyncio.create_task(self.gateway.run(), name="gateway")
            ready = asyncio.create_task(self.gateway.ready.wait())
            done, _ = await asyncio.wait(
                {ready, gw_task}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if gw_task in done:
                ready.cancel()
                gw_task.result()  # raises the start-up error
                raise RuntimeError("the gateway stopped during start-up")
            if ready not in done:
                ready.cancel()
                raise RuntimeError(f"the gateway was not ready within {READY_TIMEOUT:g} s")
            self._fix_bound_ports()
            self._build_fleets(seed)
            await self._enrol_fleets()
            self._banner(data_dir)
            await self._run_devices()
            return self.result
        finally:
            if self.gateway is not None and gw_task is not None:
                self.gateway.request_stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(gw_task, 10.0)
            await self._stop_opcua()
            if self.modbus is not None:
                await self.modbus.stop()
            await self.cloud.stop()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    async def _start_opcua(self, seed: int) -> None:
        """Start the simulated OPC-UA server in a child process (``edgeway simulate
        --protocol opcua``): asyncua takes seconds of CPU to build a server's
        address space, which would hold up this process's event loop (and the
        first data a newcomer sees). The gateway's OPC-UA adapter connects when
        the server is up, retrying meanwhile."""
        import sys

        o = self.opt
        port = pick_port(o.host, 0)
        args = {"prefix": "opcua", "seed": seed, "kinds": ("machine",), "fault_fraction": 0.5}
        # Same devices as the child builds: the gateway's node ids come from them.
        devices = make_devices(o.opcua_devices, **args)  # type: ignore[arg-type]
        self.opcua = OpcUaSimServer(devices, o.host, port)
        self._opcua_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeway", "simulate", "--protocol", "opcua",
            "--devices", str(o.opcua_devices), "--prefix", "opcua", "--seed", str(seed),
            "--kinds", "machine", "--fault-fraction", "0.5", "--rate", "1",
            "--target", f"{o.host}:{port}", "--interval", "3600",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    async def _stop_opcua(self) -> None:
        proc = self._opcua_proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _fix_bound_ports(self) -> None:
        gw = self.gateway
        if gw.listeners:
            self.ports["mqtt"] = gw.listeners[0].bound[1]
        for a in gw.adapters:
            if a.section == "coap" and a.port:
                self.ports["coap"] = a.port
            if a.section == "http_ingest" and getattr(a, "port", None):
                self.ports["http"] = a.port
        if gw.admin is not None and gw.admin.bound is not None:
            self.ports["admin"] = gw.admin.bound[1]

    def _build_fleets(self, seed: int) -> None:
        o, p = self.opt, self.ports
        if o.mqtt_devices > 0:
            devs = make_devices(o.mqtt_devices, prefix="mqtt", seed=seed, rate=o.rate)
            self.fleets.append(MqttFleet(devs, o.host, p["mqtt"], qos=1))
        if "coap" in p and o.coap_devices > 0:
            devs = make_devices(o.coap_devices, prefix="coap", seed=seed + 3, rate=o.rate)
            self.fleets.append(CoapFleet(devs, o.host, p["coap"], observe_commands=True))
        if o.http_devices > 0:
            devs = make_devices(o.http_devices, prefix="http", seed=seed + 4, rate=o.rate)
            self.fleets.append(HttpFleet(devs, o.host, p["http"], token=self._http_token))

    async def _enrol_fleets(self) -> None:
        """Every pushing device enrols with a provisioning key made for the
        demo (MQTT devices over MQTT, HTTP and CoAP devices with POST
        /provision) and then connects with its own credentials: the registry
        lists them as registered, in group ``demo``. See docs/devices.md."""
        from edgeway.sim.enrol import enrol_devices

        access = self.gateway.access
        if access is None or access.provisioner is None or not self.fleets:
            return
        n = sum(len(f.devices) for f in self.fleets)
        secret = access.provisioning_keys.add(
            "demo",
            groups=["demo"],
            template={"kinds": ["mqtt", "http", "coap"], "tags": ["simulated"]},
            rate_per_minute=max(60.0, 2.0 * n),
        )
        start = time.monotonic()
        for fleet in self.fleets:
            via = "mqtt" if fleet.protocol == "mqtt" else "http"
            port = self.ports["mqtt" if via == "mqtt" else "http"]
            creds = await enrol_devices(
                [d.device_id for d in fleet.devices],
                key=f"demo:{secret}",
                kind=fleet.protocol,
                via=via,
                host=self.opt.host,
                port=port,
            )
            if isinstance(fleet, MqttFleet):
                fleet.credentials = creds
            else:
                fleet.tokens = creds
        self.enrolled = (n, time.monotonic() - start)

    def _banner(self, data_dir: Path) -> None:
        o, p, w = self.opt, self.ports, self.write
        assert self.cloud is not None

        def note(name: str) -> str:
            return (
                "" if p[name] == DEFAULT_PORTS[name] else f"  (port {DEFAULT_PORTS[name]} is taken)"
            )

        w("edgeway demo: a gateway, simulated devices and a local cloud, all on this machine")
        w("")
        w("devices connect to the gateway at")
        w(f"  MQTT   mqtt://{o.host}:{p['mqtt']}{note('mqtt')}   topic devices/<id>/telemetry")
        if "coap" in p:
            w(f"  CoAP   coap://{o.host}:{p['coap']}/devices/<id>/telemetry{note('coap')}")
        w(f"  HTTP   http://{o.host}:{p['http']}/devices/<id>/telemetry{note('http')}")
        for fleet in self.fleets:
            w(
                f"         {len(fleet.devices)} simulated {fleet.protocol.upper()} devices, "
                f"{o.rate:g} reading/s each"
            )
        if self.modbus is not None:
            w(
                f"  Modbus {len(self.modbus.devices)} simulated devices at {o.host}:{self.modbus.port}, "
                "polled every second"
            )
        if self.opcua is not None:
            w(
                f"  OPC-UA {len(self.opcua.devices)} simulated machines at {self.opcua.endpoint}, "
                "subscribed"
            )
        if self.enrolled[0]:
            w(
                f"devices enrolled with provisioning key 'demo' in {self.enrolled[1]:.1f} s: "
                f"{self.enrolled[0]} registered (edgeway devices list --group demo --admin "
                f"http://{o.host}:{p['admin']})"
            )
        w(f"the gateway forwards to the cloud receiver at {self.cloud.url}{note('cloud')}")
        w(f"status: http://{o.host}:{p['admin']}/api/status   metrics: /metrics{note('admin')}")
        w(
            f"try:    mosquitto_pub -p {p['mqtt']} -q 1 -t devices/my-sensor/telemetry "
            "-m '{\"temp\": 21.5}'"
        )
        if self.gateway.commands is not None:
            if o.command_interval > 0:
                w(
                    f"commands: after {o.command_after:g} s, then every {o.command_interval:g} s, "
                    "one to an MQTT device and one to another device, through the command queue"
                )
            w(
                f"try:    edgeway command send mqtt-0001 ping --wait --admin "
                f"http://{o.host}:{p['admin']}"
            )
        if self._tmp is None:
            w(f"data:   {data_dir} (the cloud's records in cloud-records.jsonl)")
        if o.cloud_outage > 0:
            w(
                f"the cloud goes down for {o.cloud_outage:g} s after {o.outage_after:g} s: watch "
                "'pending' grow, then drain"
            )
        stop_how = (
            f"stops after {o.duration:g} s, or press Ctrl-C"
            if o.duration
            else "press Ctrl-C to stop"
        )
        w(f"{stop_how}")
        w("")

    # --------------------------------------------------------------- running

    async def _run_devices(self) -> None:
        o = self.opt
        assert self.cloud is not None
        self._started = time.monotonic()
        devices_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            fleet_tasks = [
                tg.create_task(f.run(devices_stop, drain=DRAIN_TIMEOUT), name=f"sim:{f.protocol}")
                for f in self.fleets
            ]
            outage = tg.create_task(self._outage(), name="outage") if o.cloud_outage > 0 else None
            status = tg.create_task(self._status_lines(), name="status")
            ending = asyncio.Event()
            rounds = self._command_rounds()
            commands = (
                tg.create_task(rounds.run(ending), name="commands") if rounds is not None else None
            )
            chain = self._predictive_chain()
            predictive = (
                tg.create_task(chain.run(ending), name="predictive") if chain is not None else None
            )
            await self._wait_for_end()
            ending.set()
            if predictive is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(predictive), COMMAND_WAIT + 2.0)
                predictive.cancel()
            if commands is not None:
                # A round under way ends within COMMAND_WAIT; its line belongs in the output.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(commands), COMMAND_WAIT + 2.0)
                commands.cancel()
            if outage is not None and not outage.done():
                outage.cancel()
                if self.cloud.down:
                    self.write("ending the cloud outage early, so the backlog can drain")
                    await self.cloud.bring_up()
            self.write("stopping devices; waiting for the backlog to reach the cloud ...")
            # A Ctrl-C in a terminal also stops the OPC-UA simulator (same process
            # group): its adapter's reconnect warnings would only be noise now.
            logging.getLogger("edgeway.south.opcua").setLevel(logging.ERROR)
            devices_stop.set()
            await asyncio.gather(*fleet_tasks, return_exceptions=True)
            await self._wait_outbox_drained()
            status.cancel()
        self._summary()

    def _command_rounds(self) -> CommandRounds | None:
        """Who gets commands: the first MQTT device (``set_rate`` up and back:
        it then publishes faster or slower), and in turn the first HTTP device
        (``ping``), the first CoAP device (``get_state``), a Modbus machine and
        an OPC-UA machine (``write running`` false then true: the machine
        stops, rpm 0, and starts again)."""
        o = self.opt
        if o.command_interval <= 0 or getattr(self.gateway, "commands", None) is None:
            return None
        by_protocol = {f.protocol: f.devices[0].device_id for f in self.fleets if f.devices}
        mqtt = None
        if "mqtt" in by_protocol:
            rates = (("set_rate", {"rate": o.rate * 2}), ("set_rate", {"rate": o.rate}))
            mqtt = CommandTarget("MQTT", by_protocol["mqtt"], rates)
        others = []
        if "http" in by_protocol:
            others.append(CommandTarget("HTTP", by_protocol["http"], (("ping", {}),)))
        if "coap" in by_protocol:
            others.append(CommandTarget("CoAP", by_protocol["coap"], (("get_state", {}),)))
        stop_start = (("write", {"running": False}), ("write", {"running": True}))
        for protocol, server in (("Modbus", self.modbus), ("OPC-UA", self.opcua)):
            machines = [d for d in server.devices if d.kind == "machine"] if server else []
            if machines:
                others.append(CommandTarget(protocol, machines[0].device_id, stop_start))
        self.rounds = CommandRounds(
            self.gateway.commands,
            self.write,
            mqtt,
            others,
            first_after=o.command_after,
            every=o.command_interval,
        )
        return self.rounds

    async def _wait_for_end(self) -> None:
        if self.opt.duration is None:
            await self.stop.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.opt.duration)

    async def _outage(self) -> None:
        assert self.cloud is not None
        o = self.opt
        await asyncio.sleep(o.outage_after)
        self._outage_state = " cloud DOWN"
        self.write(
            f"--- cloud receiver DOWN for {o.cloud_outage:g} s ({_mode_text(o.outage_mode)})"
        )
        try:
            await self.cloud.outage(o.cloud_outage, o.outage_mode)
        finally:
            self._outage_state = ""
        self.write("--- cloud receiver UP again: the backlog drains")

    async def _status_lines(self) -> None:
        assert self.cloud is not None
        # The first line as soon as the cloud has data: the newcomer's "it works".
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.opt.interval * 5):
                while self.cloud.stats.unique == 0:
                    await self.cloud.changed.wait()
            self.write(
                f"first records reached the cloud {time.monotonic() - self._started:.1f} s "
                "after the devices started"
            )
            self.write(self._status_line())
        while True:
            await asyncio.sleep(self.opt.interval)
            self.write(self._status_line())

    def _counters(self) -> dict[str, int]:
        st = self.gateway.status()
        return dict(st["outbox"].get("cloud", {}))

    def _status_line(self) -> str:
        assert self.cloud is not None
        c = self._counters()
        held = sum(len(d.buffer) for f in self.fleets for d in f.devices)
        t = time.monotonic() - self._started
        return (
            f"{t:5.0f}s  in {c.get('accepted', 0):6d}  delivered {c.get('delivered', 0):6d}  "
            f"pending {c.get('pending', 0):5d}  dropped {c.get('dropped', 0)}  | cloud "
            f"{self.cloud.stats.unique} ({self.cloud.stats.duplicates} dup)  | devices hold "
            f"{held}{self._outage_state}"
        )

    async def _wait_outbox_drained(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        while loop.time() < deadline:
            if self._counters().get("pending", 0) == 0:
                return
            await asyncio.sleep(0.1)

    # --------------------------------------------------------------- summary

    def _summary(self) -> None:
        assert self.cloud is not None
        r, w = self.result, self.write
        c = self._counters()
        r.seconds = time.monotonic() - self._started
        r.produced = {f.protocol: f.stats.produced for f in self.fleets}
        r.stored = c.get("accepted", 0)
        r.delivered = c.get("delivered", 0)
        r.pending = c.get("pending", 0)
        r.dropped = c.get("dropped", 0)
        r.cloud_records = self.cloud.stats.records
        r.cloud_unique = self.cloud.stats.unique
        r.duplicates = self.cloud.stats.duplicates
        r.resent = self.cloud.stats.resent
        pushed = [d for f in self.fleets for d in f.devices]
        r.held_by_devices = sum(len(d.buffer) for d in pushed)
        adapters = self.gateway.status()["adapters"]
        r.polled = sum(
            int(a.get("readings", 0))
            for name, a in adapters.items()
            if name.startswith(("modbus:", "opcua:"))
        )
        r.lost_ids = lost_messages(pushed, self.cloud)
        r.lost = len(r.lost_ids) + r.dropped
        fleet_stats: list[FleetStats] = [f.stats for f in self.fleets]
        per = ", ".join(f"{s.protocol} {s.produced}" for s in fleet_stats)
        w("")
        w(f"summary after {r.seconds:.1f} s")
        w(f"  sent by devices   {sum(r.produced.values())} messages ({per})")
        w(f"  polled by gateway {r.polled} readings from Modbus and OPC-UA devices")
        w(
            f"  gateway stored    {r.stored} readings, delivered {r.delivered}, "
            f"pending {r.pending}, dropped {r.dropped}"
        )
        w(
            f"  cloud received    {r.cloud_records} records: {r.cloud_unique} unique, "
            f"{r.duplicates} duplicates (sent again after a failure; the cloud drops them by id)"
        )
        if r.resent:
            w(f"  sent again        {r.resent} messages a device sent twice (no receipt in time)")
        if r.held_by_devices:
            w(f"  held by devices   {r.held_by_devices} (still waiting for a receipt: not lost)")
        if r.pending:
            w(f"  still pending     {r.pending} in the gateway's outbox (on disk: not lost)")
        if self.rounds is not None:
            r.commands_sent = self.rounds.sent
            r.commands_succeeded = self.rounds.succeeded
            w(f"  commands          {r.commands_sent} sent, {r.commands_succeeded} succeeded")
        if self.predictive is not None:
            w(f"  predictive        {predictive_summary(self.predictive.result)}")
        w(f"  lost              {r.lost}")
        if r.lost:
            w(f"  lost messages: {', '.join(r.lost_ids[:20])}{' ...' if r.lost > 20 else ''}")
        else:
            w("nothing was lost: every message a device sent reached the cloud")


def lost_messages(devices: list[VirtualDevice], cloud: CloudReceiver) -> list[str]:
    """Message ids (``<device>-<seq>``) a device produced that the cloud never
    received and that the device no longer holds: really lost."""
    out: list[str] = []
    for d in devices:
        got = cloud.received_seqs(d.device_id)
        held = d.buffer.seqs()
        out.extend(
            f"{d.device_id}-{s}" for s in range(1, d.seq + 1) if s not in got and s not in held
        )
    return out


def _mode_text(mode: OutageMode) -> str:
    return "answering 503" if mode == "503" else "refusing connections"


async def run_demo(options: DemoOptions, write: Write) -> DemoResult:
    """Run the demo until ``options.duration`` or Ctrl-C (SIGINT/SIGTERM)."""
    import signal

    demo = Demo(options, write)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_signal() -> None:
        # First Ctrl-C: stop devices, drain, summarise. Second: stop now.
        if demo.stop.is_set() and main is not None:
            write("second interrupt: stopping without waiting for the backlog")
            main.cancel()
        demo.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    try:
        return await demo.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def add_demo_arguments(p: Any) -> None:
    """The options of ``edgeway demo`` (an argparse parser)."""
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--cloud-outage",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="take the cloud receiver down for SECONDS, starting a few seconds in",
    )
    p.add_argument(
        "--outage-after",
        type=float,
        default=4.0,
        metavar="S",
        help="when the outage starts (default 4 s)",
    )
    p.add_argument(
        "--outage-mode",
        choices=["503", "refuse"],
        default="503",
        help="the cloud answers 503 with Retry-After (default) or refuses connections",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=20,
        metavar="N",
        help="MQTT devices (default 20; 5 CoAP and 5 HTTP devices come with them)",
    )
    p.add_argument("--rate", type=float, default=1.0, help="readings per second per device")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between status lines")
    p.add_argument(
        "--command-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between command round trips, the first 5 s in (default 10; 0: none)",
    )
    p.add_argument(
        "--fault-after",
        type=float,
        default=20.0,
        metavar="S",
        help="a bearing fault begins on an MQTT machine after S seconds: anomaly, alarm, "
        "rule, command to the machine (default 20; 0: none)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="keep the gateway's data and the cloud's records here (default: a "
        "temporary directory, removed at the end)",
    )
    p.add_argument("--seed", type=int, help="random seed for the devices")


def options_from_args(args: Any) -> DemoOptions:
    """DemoOptions from parsed ``edgeway demo`` arguments."""
    return DemoOptions(
        duration=args.duration,
        cloud_outage=args.cloud_outage,
        outage_after=args.outage_after,
        outage_mode=args.outage_mode,
        mqtt_devices=args.devices,
        rate=args.rate,
        interval=args.interval,
        command_interval=args.command_interval,
        fault_after=args.fault_after,
        data_dir=args.data_dir,
        seed=args.seed,
    )
