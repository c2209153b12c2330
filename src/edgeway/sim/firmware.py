"""Simulated devices that take firmware campaigns (docs/firmware.md, "Simulator").

Example (what tests/integration/test_fw_campaign_1000.py does)::

    agents = make_agents({"g1": ids1, "g2": ids2, "g3": ids3},
                         {"g2": FailurePlan(rate=0.2, result=UpdateResult.INTEGRITY_CHECK_FAILURE)},
                         seed=1)
    fleet = FirmwareFleet(make_devices(...), "127.0.0.1", 1883, agents=agents, transport="http")
    await fleet.run(stop)          # MQTT devices: commands in, results out

Each device has a :class:`FirmwareAgent`: its hardware type, its firmware
version, its LwM2M Object 5 state (idle, downloading, downloaded, updating)
and result. On a ``firmware.update`` command it

1. checks the package (hardware type, room for ``size`` bytes),
2. downloads the image, over HTTP (``url``, a ``Range`` request resumes a cut
   download) or in MQTT chunks (``devices/{id}/firmware/get`` ->
   ``.../chunk``, asking again at the offset it has), hashing as it goes
   (the image is never kept whole),
3. verifies the SHA-256, "installs" it and answers the command with
   ``{"result": <LwM2M result>, "version": <its version now>}``,

and reports every state change as telemetry (``fw_state``, ``fw_result``,
``firmware_version``: the registry takes the last as the device's reported
firmware).

Injected failures (:class:`FailurePlan`, per group of devices): a share
``rate`` of the group fails with ``result``, each the way a device would
meet it: ``integrity_check_failure`` corrupts a downloaded byte (the hash
check finds it), ``connection_lost`` loses the connection mid-download and
cannot resume, ``not_enough_storage`` has too little room, ``unsupported_package``
is other hardware, the others (out of memory, invalid URI, update failed,
unsupported protocol) report that code at the step where it happens. A share
``cut`` of the group loses its connection half way and resumes (and then
succeeds): over HTTP the response is dropped and a ``Range`` request goes on;
over MQTT the device's connection is closed and a new one goes on asking at
its offset. ``invalid_uri`` and ``unsupported_protocol`` also come by
themselves, from a command without a usable URL.

A device runs a given command id once: a redelivery of a command it answered
gets the same answer again (after a gateway restart, say), one it is still
running is ignored (the running one answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from edgeway.firmware.model import UpdateResult, UpdateState
from edgeway.sim.devices import VirtualDevice
from edgeway.sim.runner import MqttFleet, _MqttLink

log = logging.getLogger(__name__)

Transport = Literal["http", "mqtt"]

CHUNK = 16 * 1024
"""Bytes a simulated device asks for per MQTT chunk (a small device's buffer)."""
CHUNK_TIMEOUT = 5.0
"""Seconds a device waits for a chunk before asking again for the same offset."""
CHUNK_TRIES = 6
"""Times a device asks for one offset before it gives up (connection lost)."""
HTTP_TRIES = 10
"""HTTP attempts (the first and its resumes, 0.5-2 s apart: a gateway
restarting has about 15 s) before a device gives up (connection lost)."""
REQUEST_TIMEOUT = 30.0
"""Seconds one HTTP download request may take."""
ANSWERED_MAX = 64
"""Firmware command ids (with their answers) a device remembers."""


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


@dataclass(slots=True, frozen=True)
class FailurePlan:
    """Failures injected into one group of devices."""

    rate: float = 0.0
    """Share of the group's devices that fail."""
    result: UpdateResult = UpdateResult.UPDATE_FAILED
    """How they fail (an LwM2M result code other than success)."""
    cut: float = 0.0
    """Share of the group whose download is cut half way once, then resumed."""


class DownloadError(Exception):
    """A download failed with an LwM2M result."""

    def __init__(self, result: UpdateResult, message: str) -> None:
        super().__init__(message)
        self.result = result


@dataclass(slots=True)
class FirmwareAgent:
    """One device's firmware side (see the module docstring)."""

    device_id: str
    group: str = ""
    hardware: str = "pump-ctl"
    version: str = "1.0"
    storage: int = 64 * 1024 * 1024
    """Bytes of room for an image."""
    fail: UpdateResult | None = None
    cut: bool = False
    state: UpdateState = UpdateState.IDLE
    result: UpdateResult = UpdateResult.INITIAL
    history: list[tuple[int, int]] = field(default_factory=list)
    """(state, result) after each change."""
    updates: int = 0
    """firmware.update commands run (each command id once)."""
    repeated: int = 0
    """Redelivered commands answered again without running."""
    received: int = 0
    """Image bytes received, all downloads (a resume does not fetch again what it had)."""
    downloads: int = 0
    """Images received whole."""
    resumes: int = 0
    answered: dict[str, bytes] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    on_change: Callable[[], None] | None = None
    """Called after each state change (the fleet reports it as telemetry)."""

    def set(self, state: UpdateState, result: UpdateResult | None = None) -> None:
        self.state = state
        if result is not None:
            self.result = result
        self.history.append((int(self.state), int(self.result)))
        if self.on_change is not None:
            self.on_change()


Fetch = Callable[[FirmwareAgent, Mapping[str, Any], int, Hasher, int | None], Awaitable[int]]
"""``fetch(agent, params, offset, hasher, stop_at)``: download from
``offset`` (at most to ``stop_at``), feeding ``hasher``; returns the new offset.
Raises :class:`DownloadError`."""


def make_agents(
    groups: Mapping[str, Sequence[str]],
    plans: Mapping[str, FailurePlan] | None = None,
    *,
    seed: int = 0,
    version: str = "1.0",
    hardware: str = "pump-ctl",
) -> dict[str, FirmwareAgent]:
    """An agent per device; in each group with a plan, exactly
    ``round(rate * n)`` devices fail and ``round(cut * n)`` are cut (picked
    with ``seed``)."""
    rng = random.Random(seed)
    agents: dict[str, FirmwareAgent] = {}
    for group, ids in groups.items():
        plan = (plans or {}).get(group, FailurePlan())
        failing = set(rng.sample(list(ids), round(plan.rate * len(ids))))
        cut = set(rng.sample(list(ids), round(plan.cut * len(ids))))
        for d in ids:
            agents[d] = FirmwareAgent(
                d, group, hardware, version,
                fail=plan.result if d in failing else None, cut=d in cut,
            )  # fmt: skip
    return agents


async def run_update(
    agent: FirmwareAgent, params: Mapping[str, Any], fetch: Fetch
) -> dict[str, Any]:
    """Run one update as the device would; the command result."""
    agent.updates += 1
    fail = agent.fail
    result = UpdateResult.SUCCESS
    try:
        if params.get("hardware") != agent.hardware or fail is UpdateResult.UNSUPPORTED_PACKAGE:
            raise DownloadError(UpdateResult.UNSUPPORTED_PACKAGE, "not for this hardware")
        size = params.get("size")
        if not isinstance(size, int) or fail is UpdateResult.NOT_ENOUGH_STORAGE:
            raise DownloadError(UpdateResult.NOT_ENOUGH_STORAGE, "no room")
        if size > agent.storage:
            raise DownloadError(UpdateResult.NOT_ENOUGH_STORAGE, "no room")
        if fail in (UpdateResult.OUT_OF_MEMORY, UpdateResult.INVALID_URI,
                    UpdateResult.UNSUPPORTED_PROTOCOL):  # fmt: skip
            raise DownloadError(fail, f"injected {fail.label}")
        agent.set(UpdateState.DOWNLOADING, UpdateResult.INITIAL)
        hasher = hashlib.sha256()
        offset = 0
        if agent.cut or fail is UpdateResult.CONNECTION_LOST:
            offset = await fetch(agent, params, 0, hasher, size // 2)
            if fail is UpdateResult.CONNECTION_LOST:
                raise DownloadError(UpdateResult.CONNECTION_LOST, "injected: lost, no resume")
            agent.resumes += 1
        offset = await fetch(agent, params, offset, hasher, None)
        if offset != size:
            raise DownloadError(UpdateResult.CONNECTION_LOST, f"{offset} of {size} bytes")
        agent.downloads += 1
        digest = hasher.hexdigest()
        if fail is UpdateResult.INTEGRITY_CHECK_FAILURE:
            digest = hashlib.sha256(digest.encode()).hexdigest()  # a corrupted byte
        if digest != params.get("sha256"):
            raise DownloadError(UpdateResult.INTEGRITY_CHECK_FAILURE, "SHA-256 differs")
        agent.set(UpdateState.DOWNLOADED)
        agent.set(UpdateState.UPDATING)
        await asyncio.sleep(0)  # "flashing"
        if fail is UpdateResult.UPDATE_FAILED:
            raise DownloadError(UpdateResult.UPDATE_FAILED, "injected: the new image did not boot")
        agent.version = str(params.get("version"))
    except DownloadError as e:
        result = e.result
    agent.set(UpdateState.IDLE, result)
    return {"result": result.label, "version": agent.version}


def _url(params: Mapping[str, Any]) -> str:
    url = params.get("url")
    if not isinstance(url, str) or not url:
        raise DownloadError(UpdateResult.INVALID_URI, "the command has no URL")
    if not url.startswith(("http://", "https://")):
        raise DownloadError(UpdateResult.UNSUPPORTED_PROTOCOL, f"cannot download {url[:40]}")
    return url


class HttpFetch:
    """Downloads over HTTP with one shared aiohttp session (``Range`` resumes)."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self._session: Any = None

    async def __call__(
        self,
        agent: FirmwareAgent,
        params: Mapping[str, Any],
        offset: int,
        hasher: Hasher,
        stop_at: int | None,
    ) -> int:
        import aiohttp

        url = _url(params)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            )
        for attempt in range(HTTP_TRIES):
            try:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                async with self._session.get(url, headers=headers) as r:
                    if r.status not in (200, 206) or (offset and r.status != 206):
                        raise DownloadError(UpdateResult.INVALID_URI, f"HTTP {r.status}")
                    async for data in r.content.iter_chunked(64 * 1024):
                        if stop_at is not None:
                            data = data[: stop_at - offset]
                        hasher.update(data)
                        offset += len(data)
                        agent.received += len(data)
                        if stop_at is not None and offset >= stop_at:
                            return offset  # the connection "drops" here
                return offset
            except (aiohttp.ClientError, TimeoutError) as e:
                if attempt + 1 == HTTP_TRIES:
                    raise DownloadError(UpdateResult.CONNECTION_LOST, str(e)) from None
                agent.resumes += 1
                await asyncio.sleep(min(2.0, 0.5 * (attempt + 1)))
        return offset

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class MqttFetch:
    """Downloads in MQTT chunks over each device's own connection
    (:class:`FirmwareFleet` routes the answers to :meth:`answer`). A cut
    download closes the connection at ``stop_at`` and goes on, at its
    offset, over a new one."""

    def __init__(self, fleet: FirmwareFleet, chunk: int = CHUNK) -> None:
        self.fleet = fleet
        self.chunk = chunk
        self._waiting: dict[str, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}

    def answer(self, device: str, payload: bytes) -> None:
        from edgeway.firmware.mqtt import decode_chunk

        fut = self._waiting.get(device)
        if fut is None or fut.done():
            return  # late: an answer to a request asked again
        try:
            fut.set_result(decode_chunk(payload))
        except ValueError as e:
            log.warning("%s: unreadable chunk: %s", device, e)

    async def __call__(
        self,
        agent: FirmwareAgent,
        params: Mapping[str, Any],
        offset: int,
        hasher: Hasher,
        stop_at: int | None,
    ) -> int:
        image = params.get("image")
        size = params.get("size")
        if not isinstance(image, str) or not isinstance(size, int):
            raise DownloadError(UpdateResult.INVALID_URI, "no image id")
        device = agent.device_id
        end = size if stop_at is None else min(size, stop_at)
        tries = 0
        while offset < end:
            link = self.fleet.link(device)
            if link is not None and not link.client.is_connected:
                link.wake.clear()
                with contextlib.suppress(TimeoutError):  # (re)connecting: ask once it is back
                    await asyncio.wait_for(link.wake.wait(), CHUNK_TIMEOUT)
            fut: asyncio.Future[tuple[dict[str, Any], bytes]] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiting[device] = fut
            want = min(self.chunk, end - offset)
            request = {"image": image, "offset": offset, "size": want}
            if link is not None and link.client.is_connected:
                link.client.publish(f"devices/{device}/firmware/get", orjson.dumps(request), qos=0)
            try:
                header, data = await asyncio.wait_for(fut, CHUNK_TIMEOUT)
            except TimeoutError:
                tries += 1
                if tries >= CHUNK_TRIES:
                    raise DownloadError(UpdateResult.CONNECTION_LOST, "no chunk") from None
                agent.resumes += 1
                continue
            finally:
                self._waiting.pop(device, None)
            if header.get("offset") != offset:
                continue  # an answer to an earlier request
            if "error" in header:
                if header["error"] == "busy":
                    await asyncio.sleep(0.2)
                    continue
                raise DownloadError(UpdateResult.INVALID_URI, f"chunk: {header['error']}")
            if not data:
                break
            tries = 0
            hasher.update(data)
            offset += len(data)
            agent.received += len(data)
        link = self.fleet.link(device)
        if stop_at is not None and link is not None:
            await link.client.reconnect()  # the connection drops here; a new one goes on
        return offset


class FirmwareFleet(MqttFleet):
    """MQTT devices (gmqtt, one connection each, all in one event loop) that
    take ``firmware.update`` commands and download over ``transport``. They
    publish telemetry only when their firmware state changes (``telemetry``
    False) or also their usual readings (``telemetry`` True)."""

    def __init__(
        self,
        devices: Sequence[VirtualDevice],
        host: str,
        port: int,
        *,
        agents: Mapping[str, FirmwareAgent],
        transport: Transport = "http",
        telemetry: bool = False,
        chunk: int = CHUNK,
        **kwargs: Any,
    ) -> None:
        super().__init__(devices, host, port, **kwargs)
        self.agents = dict(agents)
        self.transport = transport
        self.telemetry = telemetry
        self.http = HttpFetch()
        self.mqtt = MqttFetch(self, chunk)
        self._links: dict[str, _MqttLink] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.results: dict[str, list[str]] = {}
        """Per device, the results it answered (in order)."""

    def link(self, device: str) -> _MqttLink | None:
        return self._links.get(device)

    def _make_link(self, device: VirtualDevice) -> _MqttLink:
        link = super()._make_link(device)
        self._links[device.device_id] = link
        return link

    def _on_connect(self, link: _MqttLink, client: Any, flags: Any, rc: Any, props: Any) -> None:
        super()._on_connect(link, client, flags, rc, props)
        import gmqtt

        client.subscribe(
            gmqtt.Subscription(f"devices/{link.device.device_id}/firmware/chunk", qos=0)
        )

    def _on_message(
        self, link: _MqttLink, client: Any, topic: str, payload: bytes, qos: int, props: Any
    ) -> int:
        dev = link.device.device_id
        if topic == f"devices/{dev}/firmware/chunk":
            self.mqtt.answer(dev, payload)
            return 0
        if topic.startswith(f"devices/{dev}/commands/") and dev in self.agents:
            try:
                cmd = orjson.loads(payload)
            except orjson.JSONDecodeError:
                cmd = None
            if isinstance(cmd, dict) and cmd.get("name") == "firmware.update":
                self._firmware_command(link, topic, cmd)
                return 0
        return super()._on_message(link, client, topic, payload, qos, props)

    def _firmware_command(self, link: _MqttLink, topic: str, cmd: dict[str, Any]) -> None:
        agent = self.agents[link.device.device_id]
        cid = str(cmd.get("id"))
        reply = f"{topic}/result"
        if cid in agent.answered:
            agent.repeated += 1
            link.client.publish(reply, agent.answered[cid], qos=1)
            return
        if cid in agent.running:
            agent.repeated += 1
            return
        agent.running.add(cid)
        task = asyncio.get_running_loop().create_task(self._update(link, agent, cid, reply, cmd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _update(
        self, link: _MqttLink, agent: FirmwareAgent, cid: str, reply: str, cmd: dict[str, Any]
    ) -> None:
        params = cmd.get("params") or {}
        fetch: Fetch = self.http if self.transport == "http" else self.mqtt
        agent.on_change = self._reporter(link, agent)
        try:
            result = await run_update(agent, params, fetch)
        except Exception:
            log.exception("%s: firmware update crashed", agent.device_id)
            result = {"result": UpdateResult.UPDATE_FAILED.label, "version": agent.version}
        answer = orjson.dumps({"id": cid, "status": "ok", "result": result})
        agent.answered[cid] = answer
        while len(agent.answered) > ANSWERED_MAX:
            agent.answered.pop(next(iter(agent.answered)))
        agent.running.discard(cid)
        self.results.setdefault(agent.device_id, []).append(result["result"])
        self.stats.commands += 1
        # The answer waits for a connection (a gateway restart in between).
        async with asyncio.timeout(120):
            while not link.client.is_connected:
                link.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(link.wake.wait(), 1.0)
        link.client.publish(reply, answer, qos=1)

    def _reporter(self, link: _MqttLink, agent: FirmwareAgent) -> Callable[[], None]:
        topic = f"devices/{agent.device_id}/telemetry"

        def report() -> None:
            if link.client.is_connected:
                body = {"ts": round(time.time(), 3), "fw_state": int(agent.state),
                        "fw_result": int(agent.result), "firmware_version": agent.version}  # fmt: skip
                link.client.publish(topic, orjson.dumps(body), qos=0)

        return report

    async def _device(
        self, link: _MqttLink, stop: asyncio.Event, gate: asyncio.Semaphore, drain: float
    ) -> None:
        if self.telemetry:
            await super()._device(link, stop, gate, drain)
            return
        await self._connect(link, stop, gate)
        await stop.wait()

    async def run(self, stop: asyncio.Event, drain: float = 0.0) -> None:
        try:
            await super().run(stop, drain)
        finally:
            for t in list(self._tasks):
                t.cancel()
            await self.http.close()


def parse_failure(text: str) -> tuple[float, UpdateResult]:
    """``SHARE:RESULT`` (``0.2:integrity_check_failure``) -> (share, result);
    ValueError with what is wrong."""
    share, sep, name = text.partition(":")
    try:
        rate = float(share)
    except ValueError:
        rate = -1.0
    if not sep or not 0.0 <= rate <= 1.0:
        raise ValueError(f"--firmware-fail {text!r}: SHARE:RESULT, SHARE between 0 and 1")
    try:
        result = UpdateResult[name.upper()]
    except KeyError:
        result = UpdateResult.INITIAL
    if result in (UpdateResult.INITIAL, UpdateResult.SUCCESS):
        names = ", ".join(r.label for r in UpdateResult if r > UpdateResult.SUCCESS)
        raise ValueError(f"--firmware-fail {text!r}: RESULT is one of {names}")
    return rate, result


def firmware_fleet(
    devices: Sequence[VirtualDevice], host: str, port: int, args: Any
) -> FirmwareFleet:
    """``edgeway simulate --protocol mqtt --firmware http|mqtt``: the fleet its options describe."""
    rate, result = (0.0, UpdateResult.UPDATE_FAILED)
    if args.firmware_fail:
        rate, result = parse_failure(args.firmware_fail)
    if not 0.0 <= args.firmware_cut <= 1.0:
        raise ValueError("--firmware-cut is between 0 and 1")
    agents = make_agents(
        {"all": [d.device_id for d in devices]},
        {"all": FailurePlan(rate, result, args.firmware_cut)},
        seed=args.seed or 0,
        version=args.firmware_version,
        hardware=args.firmware_hardware,
    )
    return FirmwareFleet(
        devices, host, port, agents=agents, transport=args.firmware, telemetry=True,
        qos=args.qos, username=args.username, password=args.password,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def running(fleet: FirmwareFleet) -> Any:
    """Run ``fleet`` in a task until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop))
    try:
        yield fleet
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
