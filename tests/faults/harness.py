"""Fault-injection harness: real devices, a real gateway, a real cloud, and a
ledger that accounts for every reading at the end.

A scenario runs ``edgeway run`` (tests/integration/edgeway_process.py), paho
MQTT 5 devices that publish numbered readings at QoS 1, and a cloud: an HTTP
server of our own (:class:`FaultyCloud`, whose modes are the faults: down,
hanging, slow, failing) or a Mosquitto (tests/integration/mosquitto_process.py)
with a subscriber. While the devices publish, the scenario injects its fault;
then the fault is lifted, the devices stop, the outbox drains, and
:func:`Report.check` holds the run to the rules:

- every reading a device got a PUBACK for (reason < 0x80) reached the cloud;
- a reading refused (PUBACK >= 0x80) never reached it;
- a record arriving twice arrives with the same record id (``duplicates``);
  a device that resends a reading whose PUBACK it never got makes a second
  record, with another id (``resent``: the device's at-least-once, not ours);
- per device, records arrive in the order they were stored (``inversions``
  counts first arrivals whose sequence goes backwards; must be 0);
- the outbox's own books balance: ``accepted == delivered + pending +
  dropped`` with ``pending == 0`` and ``dropped == 0`` after the drain, and
  the unique record ids at the cloud are exactly ``accepted`` (conservation);
  with ``outbox.forward_early`` (the default) a kill may leave at the cloud a
  reading that was forwarded while its commit was under way and never
  stored: its device, never acknowledged, sends it again (paho's session
  redelivery or the device's own resend) and it is stored then, so every id
  beyond ``accepted`` belongs to a reading that also arrived under another
  id (``copies``; docs/outbox.md, "Forwarding before the commit").

Used by tests/faults/ (CI-sized) and bench/faults.py (the long versions).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from aiohttp import web
from edgeway_process import GatewayLauncher, GatewayProcess, free_port
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_crash import ThreadedIngestServer

ACK_WAIT = 2.0
"""Seconds a device waits for a PUBACK before it resends the reading on its
next connection (a real device's retry timer; the gateway answers in ms)."""
DRAIN_TIMEOUT = 60.0
"""Bound on the drain after the fault is lifted (the backlog is seconds' worth)."""


# ---------------------------------------------------------------------- devices


@dataclass
class DeviceLedger:
    """What one device did: readings sent, acknowledged and refused (by n)."""

    sent: list[int] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)
    refused: dict[int, int] = field(default_factory=dict)
    """n -> PUBACK reason code (>= 0x80)."""
    resends: int = 0


class Device:
    """A paho MQTT 5 device publishing numbered readings at QoS 1, one in
    flight at a time (a constrained device); on a lost connection it
    reconnects and resends the reading it had no PUBACK for."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        interval: float = 0.005,
        payload: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        self.ledger = DeviceLedger()
        self.interval = interval
        self.payload = payload or (lambda n: {"n": n})
        self.topic = f"devices/{name}/telemetry"
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._acks: dict[int, int] = {}
        self._connected = False
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fault-{name}",
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.host, self.port = host, port
        self._thread = threading.Thread(target=self._run, name=f"device-{name}", daemon=True)

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = int(rc.value)
            self._cond.notify_all()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        with self._cond:
            self._connected = not rc.is_failure
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self.client.connect_async(self.host, self.port, keepalive=5, properties=props)
        self.client.loop_start()
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing (the reading in flight gets its PUBACK or is dropped
        by the device, as a device that is switched off)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(ACK_WAIT * 3)
        self.client.disconnect()
        self.client.loop_stop()

    def _wait_connected(self) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._connected or self._stop.is_set(), 1.0) and (
                self._connected
            )

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            self.ledger.sent.append(n)
            body = json.dumps(self.payload(n)).encode()
            first = True
            while not self._stop.is_set():
                if not self._wait_connected():
                    continue
                if not first:
                    self.ledger.resends += 1
                first = False
                mid = self.client.publish(self.topic, body, qos=1).mid
                with self._cond:
                    got = self._cond.wait_for(
                        lambda m=mid: m in self._acks or self._stop.is_set(),  # type: ignore[misc]
                        ACK_WAIT,
                    )
                    code = self._acks.pop(mid, None)
                if code is not None:
                    if code < 0x80:
                        self.ledger.acked.add(n)
                    else:
                        self.ledger.refused[n] = code
                    break
                if got and self._stop.is_set():
                    break
            if self.interval:
                self._stop.wait(self.interval)


# ------------------------------------------------------------------------ cloud


@dataclass
class FaultyCloud(ThreadedIngestServer):
    """An HTTP ingest endpoint on its own thread (test_crash's server) whose
    behaviour is the fault:

    - ``ok``: stores the batch, 200;
    - ``down``: the port is closed (connection refused);
    - ``hang``: accepts the connection and the request, never answers;
    - ``slow``: answers after ``delay`` seconds;
    - ``error``: 503 with Retry-After: 0 (a cloud that is up but failing).
    """

    port: int = field(default_factory=free_port)
    requests: int = 0
    mode: str = "ok"
    delay: float = 0.0
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        mode = self.mode
        if mode == "down":
            # A request on a connection kept alive from before the port closed:
            # a server that is down answers nothing; the connection just ends.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503, text="down")
        if mode == "hang":
            await self._released.wait()
            return web.Response(status=503, text="was hanging")
        if mode == "error":
            return web.Response(status=503, headers={"Retry-After": "0"}, text="failing")
        if mode == "slow":
            await asyncio.sleep(self.delay)
        return await super()._handle(request)

    def _call(self, coro: Any) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        """Switch behaviour; ``down`` closes the port, leaving it opens it again."""
        assert self._loop is not None
        previous, self.mode, self.delay = self.mode, mode, delay
        if mode == "down" and previous != "down":
            self._call(self._close())
        if previous == "down" and mode != "down":
            self._call(self._open())
        if previous == "hang" and mode != "hang":
            released, self._released = self._released, asyncio.Event()
            self._loop.call_soon_threadsafe(released.set)

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self.set_mode("ok")
        super().stop()


# ---------------------------------------------------------------------- the run


class _TmpFactory:
    """What GatewayLauncher needs of pytest's tmp_path_factory (bench/faults.py)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0

    def mktemp(self, name: str) -> Path:
        self.n += 1
        path = self.root / f"{name}{self.n}"
        path.mkdir(parents=True)
        return path


@dataclass
class Report:
    """What a scenario measured (see the module docstring for the rules)."""

    name: str
    seconds: float
    devices: int
    sent: int
    acknowledged: int
    refused: int
    resent: int
    delivered: int
    """Unique record ids at the cloud."""
    duplicates: int
    """Records that arrived again with the same record id."""
    lost: int
    """Acknowledged readings that never arrived (must be 0)."""
    refused_delivered: int
    """Refused readings that arrived anyway (must be 0)."""
    inversions: int
    """First arrivals whose sequence went backwards, summed over devices (must be 0)."""
    outbox: dict[str, int]
    gateway_lives: int
    notes: dict[str, Any] = field(default_factory=dict)
    forward_early: bool = True
    """The gateway ran with ``outbox.forward_early`` (see the module docstring)."""
    copies: int = 0
    """Unique ids at the cloud beyond one per reading (device, n): readings
    that arrived under more than one id."""

    def check(self) -> None:
        """Assert every rule; the message carries the whole report."""
        ob = self.outbox
        problems = []
        if self.lost:
            problems.append(f"{self.lost} acknowledged readings lost")
        if self.refused_delivered:
            problems.append(f"{self.refused_delivered} refused readings delivered")
        if self.inversions:
            problems.append(f"{self.inversions} order inversions")
        if ob["accepted"] != ob["delivered"] + ob["pending"] + ob["dropped"]:
            problems.append("outbox books do not balance")
        if ob["pending"] or ob["dropped"]:
            problems.append("outbox not drained, or dropped readings")
        extra = self.delivered - ob["accepted"]
        if not self.forward_early and extra:
            problems.append(f"{self.delivered} unique records at the cloud != accepted")
        elif not 0 <= extra <= self.copies:
            problems.append(
                f"{self.delivered} unique records at the cloud: {extra} beyond accepted, "
                f"but only {self.copies} readings arrived under a second id"
            )
        if self.acknowledged == 0:
            problems.append("no reading was acknowledged: the scenario measured nothing")
        assert not problems, f"{self.name}: {'; '.join(problems)}\n{self.row()}"

    def row(self) -> str:
        ob = self.outbox
        return (
            f"| {self.name} | {self.seconds:.1f} | {self.devices} | {self.gateway_lives} | "
            f"{self.sent} | {self.acknowledged} | {self.refused} | {self.resent} | "
            f"{self.delivered} | {self.duplicates} | {self.lost} | {self.inversions} | "
            f"{ob['accepted']} = {ob['delivered']} + {ob['pending']} + {ob['dropped']} |"
        )


HEADER = (
    "| scenario | s | devices | lives | sent | acked | refused | resent | delivered (unique) "
    "| duplicates | lost | inversions | accepted = delivered + pending + dropped |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


class Scenario:
    """One run: a gateway (restartable), devices, a cloud; see the module docstring."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        tmp_factory: Any = None,
        devices: int = 4,
        interval: float = 0.005,
        payload: Callable[[str, int], dict[str, Any]] | None = None,
        sink_url: str | None = None,
        sink_options: str = "{max_records: 200, timeout: 1s}",
        extra_config: str = "",
        data_dir: Path | None = None,
        sink_proxy: bool = False,
        outbox: str = "{durability: fsync}",
        seed: int = 20261206,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.launcher = GatewayLauncher(tmp_factory or _TmpFactory(workdir / "gw"))
        self.cloud: FaultyCloud | None = None
        self.sink_proxy: FaultyProxy | None = None
        if sink_url is None:
            self.cloud = FaultyCloud()
            self.cloud.start()
            sink_url = self.cloud.url
            if sink_proxy:
                # The gateway reaches the cloud through a proxy that can cut it off.
                self.sink_proxy = FaultyProxy(self.cloud.port)
                self.sink_proxy.start()
                sink_url = f"http://127.0.0.1:{self.sink_proxy.port}/ingest"
        self.admin_port = free_port()
        self.data_dir = data_dir or workdir / "data"
        self.forward_early = "forward_early: false" not in outbox
        self.config = f"""
            gateway: {{id: fault-gw}}
            outbox: {outbox}
            admin: {{listen: "127.0.0.1:{self.admin_port}"}}
            sinks:
              - name: cloud
                url: "{sink_url}"
                probe_interval: 100ms
                options: {sink_options}
            {extra_config}
            """
        self.gw: GatewayProcess | None = None
        self.lives = 0
        self.n_devices = devices
        self.interval = interval
        self.payload = payload
        self.devices: list[Device] = []
        self.device_proxy: FaultyProxy | None = None
        """Between the devices and the gateway, when the scenario asks for one."""
        self.t0 = time.monotonic()

    # -- gateway
    def start_gateway(self) -> GatewayProcess:
        port = self.gw.port if self.gw is not None else None
        self.gw = self.launcher.start(self.config, port=port, data_dir=self.data_dir)
        self.lives += 1
        return self.gw

    def kill_gateway(self) -> None:
        assert self.gw is not None
        self.gw.process.kill()
        self.gw.process.wait(10)

    # -- devices
    def start_devices(self) -> None:
        assert self.gw is not None
        make = self.payload
        for i in range(self.n_devices):
            name = f"d{i}"

            def payload(n: int, name: str = name) -> dict[str, Any]:
                return make(name, n) if make is not None else {"n": n}

            port = self.device_proxy.port if self.device_proxy is not None else self.gw.port
            dev = Device(name, self.gw.host, port, interval=self.interval, payload=payload)
            dev.start()
            self.devices.append(dev)

    def stop_devices(self) -> None:
        for d in self.devices:
            d.stop()

    def wait_refused(self, total: int, timeout: float = 30.0) -> None:
        """Until the devices together have ``total`` more refusals than now (bounded)."""
        self._wait_more(lambda d: len(d.ledger.refused), total, timeout, "no refusals")

    def wait_acked(self, total: int, timeout: float = 20.0) -> None:
        """Until the devices together have ``total`` more PUBACKs than now (bounded)."""
        self._wait_more(lambda d: len(d.ledger.acked), total, timeout, "devices stalled")

    def _wait_more(
        self, count: Callable[[Device], int], total: int, timeout: float, what: str
    ) -> None:
        start = sum(count(d) for d in self.devices)
        deadline = time.monotonic() + timeout
        while sum(count(d) for d in self.devices) < start + total:
            assert time.monotonic() < deadline, self._stalled(what)
            time.sleep(0.02)  # the devices run on their own threads: polled, bounded

    def _stalled(self, what: str) -> str:
        devices = ", ".join(
            f"{d.name}: sent {len(d.ledger.sent)} acked {len(d.ledger.acked)} "
            f"connected {d._connected}"
            for d in self.devices
        )
        out = self.gw.output()[-3000:] if self.gw is not None else ""
        return f"{self.name}: {what} ({devices})\ngateway output:\n{out}"

    # -- the end
    def status(self) -> dict[str, Any]:
        r = httpx.get(f"http://127.0.0.1:{self.admin_port}/api/status", timeout=10)
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def drain(self) -> dict[str, int]:
        """Wait (bounded) until the outbox has nothing pending; its counters."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            with contextlib.suppress(httpx.HTTPError):
                counters: dict[str, int] = self.status()["outbox"]["cloud"]
                if counters["pending"] == 0:
                    return counters
            assert time.monotonic() < deadline, f"{self.name}: the outbox did not drain"
            time.sleep(0.1)  # the gateway's counters are read over HTTP: polled, bounded

    def report(self, records: list[dict[str, Any]], outbox: dict[str, int]) -> Report:
        by_id: dict[str, dict[str, Any]] = {}
        duplicates = 0
        first_seq: dict[str, list[int]] = {}
        ns_at_cloud: dict[str, set[int]] = {}
        for r in records:
            if r["id"] in by_id:
                duplicates += 1
                continue
            by_id[r["id"]] = r
            seq = int(str(r["id"]).rsplit(":", 1)[1])
            first_seq.setdefault(r["device_id"], []).append(seq)
            ns_at_cloud.setdefault(r["device_id"], set()).add(int(r["metrics"]["n"]))
        inversions = sum(
            sum(1 for a, b in itertools.pairwise(seqs) if b < a) for seqs in first_seq.values()
        )
        lost = refused_delivered = 0
        for d in self.devices:
            got = ns_at_cloud.get(d.name, set())
            lost += len(d.ledger.acked - got)
            refused_delivered += len(set(d.ledger.refused) & got)
        return Report(
            name=self.name,
            seconds=time.monotonic() - self.t0,
            devices=len(self.devices),
            sent=sum(len(d.ledger.sent) for d in self.devices),
            acknowledged=sum(len(d.ledger.acked) for d in self.devices),
            refused=sum(len(d.ledger.refused) for d in self.devices),
            resent=sum(d.ledger.resends for d in self.devices),
            delivered=len(by_id),
            duplicates=duplicates,
            lost=lost,
            refused_delivered=refused_delivered,
            inversions=inversions,
            outbox={k: outbox[k] for k in ("accepted", "delivered", "pending", "dropped")},
            gateway_lives=self.lives,
            forward_early=self.forward_early,
            copies=len(by_id) - sum(len(ns) for ns in ns_at_cloud.values()),
        )

    def finish(self, records: Callable[[], list[dict[str, Any]]] | None = None) -> Report:
        """Stop the devices, drain, stop the gateway; the report."""
        self.stop_devices()
        counters = self.drain()
        assert self.gw is not None
        code = self.gw.terminate()
        assert code == 0, f"{self.name}: gateway exited {code}\n{self.gw.output()[-3000:]}"
        fetch = records if records is not None else self._cloud().snapshot
        # An MQTT cloud delivers to its subscriber after it acknowledged us.
        deadline = time.monotonic() + 15
        while len({r["id"] for r in fetch()}) < counters["accepted"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)  # the subscriber runs on paho's thread: polled, bounded
        return self.report(fetch(), counters)

    def _cloud(self) -> FaultyCloud:
        assert self.cloud is not None
        return self.cloud

    def close(self) -> None:
        for d in self.devices:
            with contextlib.suppress(Exception):
                d.stop()
        self.launcher.stop_all()
        for part in (self.device_proxy, self.sink_proxy, self.cloud):
            if part is not None:
                part.stop()


@contextlib.contextmanager
def scenario(
    name: str, workdir: Path, *, device_proxy: bool = False, **kwargs: Any
) -> Iterator[Scenario]:
    """A started :class:`Scenario` (gateway up, devices publishing); always
    cleaned up. ``device_proxy``: devices reach the gateway through a
    :class:`FaultyProxy` (``s.device_proxy``); ``sink_proxy`` likewise for the cloud."""
    s = Scenario(name, workdir, **kwargs)
    try:
        gw = s.start_gateway()
        if device_proxy:
            s.device_proxy = FaultyProxy(gw.port)
            s.device_proxy.start()
        s.start_devices()
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------------ proxy


class FaultyProxy:
    """A TCP proxy on its own thread between a client and a server, whose
    modes are network faults:

    - ``pass``: bytes flow both ways;
    - ``blackhole``: connections stay open but bytes are dropped both ways,
      and new connections are accepted and blackholed too: a half-open TCP
      connection as a NAT that forgot the flow, or a cut cable, makes it
      (no FIN, no RST: only a timeout can tell);
    - ``refuse``: existing connections are reset, new ones refused.
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.mode = "pass"
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._listen())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name="faulty-proxy", daemon=True)
        self._thread.start()
        assert ready.wait(10), "proxy did not start"

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.mode == "pass":
                    writer.write(data)
                    await writer.drain()
        writer.transport.abort()

    def set_mode(self, mode: str) -> None:
        assert self._loop is not None
        previous, self.mode = self.mode, mode
        if mode == "refuse" and previous != "refuse":
            asyncio.run_coroutine_threadsafe(self._refuse(), self._loop).result(10)
        elif previous == "refuse" and mode != "refuse":
            asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        elif previous == "blackhole" and mode == "pass":
            # What was dropped is gone: a connection that lived through the
            # blackhole would now be out of step (as after a real one, where
            # TCP's retransmissions eventually give up). End those.
            self._loop.call_soon_threadsafe(self._abort_all)

    def _abort_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._abort_all()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._refuse(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
