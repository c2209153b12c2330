"""Run virtual devices over real protocols: MQTT, CoAP and HTTP clients; Modbus
and OPC-UA servers that the gateway polls.

Example (what ``edgeway simulate --devices 1000 --protocol mqtt`` does)::

    devices = make_devices(1000, prefix="sim", seed=1, rate=1.0)
    fleet = MqttFleet(devices, "127.0.0.1", 1883, qos=1)
    stop = asyncio.Event()
    await fleet.run(stop)          # until stop is set; fleet.stats has the counters

Push fleets (MQTT, CoAP, HTTP) run all their devices in one event loop: a
device is a small object and two tasks, so 1,000 devices cost a few MB.
Each device keeps its messages in its own :class:`OutgoingBuffer` until
they are confirmed: by the gateway's receipt for MQTT (the cloud has them),
by a 2.04 / 2xx for CoAP and HTTP (the gateway has them on disk). While the
gateway is unreachable the buffers grow, and they are sent when it is back.

MQTT devices (gmqtt, MQTT 5) keep a persistent session (session expiry one
hour) with a retained last will on ``devices/{id}/status``, reconnect on
their own after a broker restart, subscribe to ``devices/{id}/receipts`` and
take commands the way the gateway's command queue sends them: subscribed to
``devices/{id}/commands/+``, answering ``devices/{id}/commands/{name}`` on
the message's response topic (``.../{name}/result`` without one). A command
published straight to ``devices/{id}/commands`` (any broker, no queue) is
answered on ``devices/{id}/commands/response``.

HTTP devices given a token (or ``poll_commands=True``) long-poll
``GET /devices/{id}/commands``; CoAP devices with ``observe_commands=True``
observe it (the gateway needs ``coap.commands: true``). Both post each answer
to ``/devices/{id}/commands/{command id}/result``.

Pollers' peers: :class:`ModbusSimServer` (pymodbus, one unit id per device,
register values computed at each read) and :class:`OpcUaSimServer`
(asyncua, one object per device, values written at the device's rate). Each
one gives the gateway configuration that reads it (``gateway_config()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import struct
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from edgeway.config import ModbusDeviceConfig, OpcUaServerConfig
from edgeway.reading import MetricValue
from edgeway.sim.devices import WRITABLE, VirtualDevice
from edgeway.streams import read_capped

log = logging.getLogger(__name__)

MQTT_INFLIGHT = 16
"""Unacknowledged QoS 1 PUBLISH per device connection. Below Mosquitto's
default max_inflight_messages (20) and edgeway's receive_maximum (64): a
client beyond the server's receive maximum is disconnected (MQTT 5 §4.9)."""

CONNECT_CONCURRENCY = 64
"""Devices connecting at once. A listen backlog is typically 128-4096; a
thousand SYNs at once overflow a small one and cost retransmission seconds."""

HTTP_BATCH = 100
"""Messages per HTTP POST when a device flushes its backlog: a JSON array of
100 ~120-byte readings is ~12 KB, far below the ingest's 256 KiB limit."""

REQUEST_TIMEOUT = 10.0
"""Seconds a CoAP or HTTP upload may take before it is retried."""

RECEIPT_GRACE = 30.0
"""Seconds after a reconnect that an MQTT device waits for receipts of what
it sent before the disconnect, before sending those messages again. A
persistent session delivers queued receipts at once; a receipt can still be
lost when the gateway confirmed a record while its broker was stopping (a
restart). Sending again costs a duplicate the cloud can drop; not sending
would leave the message in the device forever."""

RECEIPT_CHECK = 1.0
"""Seconds between checks of the receipt grace above."""

COMMAND_POLL_WAIT = 25.0
"""Seconds an HTTP device's command long-poll asks the gateway to hold it:
below the 30 s idle timeout common in proxies and the gateway's
``command_poll_max`` (60 s); a command arrives at once either way."""

HTTP_POLL_CONNECTIONS = 900
"""Command long-polls an HTTP fleet holds at once. Each holds a connection
for up to COMMAND_POLL_WAIT, so polls get their own connection pool: in the
telemetry pool (aiohttp's default 100) 150 polling devices left no
connection for uploads (0 of 1,199 readings confirmed in 8 s). 900 plus
that pool stays under the 1,024 open files a process commonly gets; devices
beyond it take turns (a command then waits up to one poll for its device)."""

COMMAND_BODY_MAX = 256 * 1024
"""Largest command an HTTP device reads (the gateway caps params at
``commands.max_params_bytes``, 64 KiB by default)."""

RESULT_ATTEMPTS = 3
"""Times an HTTP device tries to post an answer (network errors only);
after that the gateway times the command out."""

STOP_GRACE = 3.0
"""Seconds allowed for disconnecting cleanly at stop."""


@dataclass(slots=True)
class FleetStats:
    """Counters of one fleet (summed over its devices)."""

    protocol: str
    devices: int = 0
    produced: int = 0
    """Messages the devices produced."""
    sent: int = 0
    """Messages handed to a connection (re-sends after a failure counted again)."""
    acked: int = 0
    """Messages the gateway acknowledged as stored (CoAP 2.04, HTTP 2xx, MQTT
    PUBACK/PUBCOMP at QoS 1/2). gmqtt does not report a PUBACK's reason code,
    so an MQTT refusal (not authorised, quota) counts here too."""
    receipts: int = 0
    """Messages freed by gateway receipts (MQTT: the cloud has them)."""
    errors: int = 0
    connects: int = 0
    reconnects: int = 0
    resent: int = 0
    """Messages sent again: no receipt within the grace after a reconnect (MQTT)."""
    connected: int = 0
    commands: int = 0
    """Commands the devices answered (repeated ids included)."""
    command_errors: int = 0
    """Command polls or answers that failed (HTTP: refused, reset, 5xx)."""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def buffered(devices: Sequence[VirtualDevice]) -> int:
    """Messages held in the devices' buffers (not confirmed yet)."""
    return sum(len(d.buffer) for d in devices)


class _Stopping(Exception):
    pass


async def _sleep_until(deadline: float, stop: asyncio.Event) -> None:
    """Sleep until the loop time ``deadline`` or ``stop``; raise _Stopping on stop."""
    delay = deadline - asyncio.get_running_loop().time()
    if stop.is_set():
        raise _Stopping
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            raise _Stopping


async def _produce(
    device: VirtualDevice, stats: FleetStats, wake: asyncio.Event, stop: asyncio.Event
) -> None:
    """Make a device produce messages at its rate (bursts included) until stop."""
    loop = asyncio.get_running_loop()
    # Spread the devices over the first interval so they do not send in lockstep.
    nxt = loop.time() + random.uniform(0, 1.0 / device.rate)
    with contextlib.suppress(_Stopping):
        while True:
            await _sleep_until(nxt, stop)
            now = time.time()
            device.next_message(now)
            stats.produced += 1
            wake.set()
            nxt = max(nxt + device.interval(now), loop.time() - 1.0)


async def _drained(device: VirtualDevice, limit: float) -> None:
    """Wait (at most ``limit`` s) until nothing is left in the device's buffer."""
    buf = device.buffer
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            while len(buf):
                buf.emptied.clear()
                await buf.emptied.wait()


# ------------------------------------------------------------------------------ MQTT


def _inflight_storage_class() -> type[Any]:
    from gmqtt.storage import PersistentStorage

    class InflightStorage(PersistentStorage):  # type: ignore[misc]
        """gmqtt's store of unacknowledged PUBLISH, with a window to wait on;
        counts the telemetry messages the broker acknowledged (PUBACK,
        PUBCOMP), not the status and command responses."""

        def __init__(self, stats: FleetStats) -> None:
            super().__init__()
            self.changed = asyncio.Event()
            self.stats = stats
            self._telemetry: set[int] = set()
            self._next_is_telemetry = False

        def publish_telemetry(self, client: Any, topic: str, payload: bytes, qos: int) -> None:
            """``client.publish``, remembering the packet id (gmqtt stores
            the packet inside ``publish``, synchronously)."""
            self._next_is_telemetry = True
            try:
                client.publish(topic, payload, qos=qos)
            finally:
                self._next_is_telemetry = False

        def push_message(self, mid: int, raw_package: bytes) -> None:
            super().push_message(mid, raw_package)
            if self._next_is_telemetry:
                self._telemetry.add(mid)

        def remove_message_by_mid(self, mid: int) -> None:
            if mid in self._telemetry and mid in self._messages:
                self._telemetry.discard(mid)
                self.stats.acked += 1
            super().remove_message_by_mid(mid)
            self.changed.set()

        def clear(self) -> None:
            super().clear()
            self._telemetry.clear()
            self.changed.set()

        def __len__(self) -> int:
            return len(self._messages)

        def __bool__(self) -> bool:
            # gmqtt takes ``persistent_storage or PersistentStorage()``: without
            # this an empty store (len 0) is falsy and gmqtt silently uses its
            # own, so the window above was never enforced and nothing counted.
            return True

    return InflightStorage


@dataclass(slots=True)
class _MqttLink:
    device: VirtualDevice
    client: Any
    storage: Any
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ever_connected: bool = False
    connected_at: float = 0.0
    """Loop time of the latest CONNACK (0: never)."""


class MqttFleet:
    """MQTT devices (gmqtt clients, MQTT 5) publishing telemetry to one broker."""

    protocol = "mqtt"

    def __init__(
        self,
        devices: Sequence[VirtualDevice],
        host: str,
        port: int,
        *,
        qos: int = 1,
        keepalive: int = 30,
        username: str | None = None,
        password: str | None = None,
        session_expiry: int = 3600,
        reconnect_delay: float = 1.0,
        receipt_grace: float = RECEIPT_GRACE,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        self.devices = list(devices)
        self.host = host
        self.port = port
        self.qos = qos
        self.keepalive = keepalive
        self.username = username
        self.password = password
        self.credentials = credentials or {}
        """Per device: its own MQTT password (user name: its id), e.g. from
        enrolling with a provisioning key (:mod:`edgeway.sim.enrol`)."""
        self.session_expiry = session_expiry
        self.reconnect_delay = reconnect_delay
        self.receipt_grace = receipt_grace
        self.stats = FleetStats("mqtt", devices=len(self.devices))
        self.links: list[_MqttLink] = []
        self.all_connected = asyncio.Event()

    def _make_link(self, device: VirtualDevice) -> _MqttLink:
        import gmqtt

        storage = _inflight_storage_class()(self.stats)
        dev_id = device.device_id
        will = gmqtt.Message(f"devices/{dev_id}/status", b'{"online":false}', qos=1, retain=True)
        client = gmqtt.Client(
            dev_id,
            clean_session=True,
            will_message=will,
            persistent_storage=storage,
            session_expiry_interval=self.session_expiry,
            logger=logging.getLogger("edgeway.sim.gmqtt"),
        )
        # gmqtt's own reconnect, with a per-device delay so a restarted broker
        # is not hit by every device in the same millisecond.
        client.set_config(
            {
                "reconnect_retries": -1,
                "reconnect_delay": self.reconnect_delay * random.uniform(0.5, 1.5),
            }
        )
        if dev_id in self.credentials:
            client.set_auth_credentials(dev_id, self.credentials[dev_id])
        elif self.username is not None:
            client.set_auth_credentials(self.username, self.password)
        link = _MqttLink(device, client, storage)
        client.on_connect = functools.partial(self._on_connect, link)
        client.on_disconnect = functools.partial(self._on_disconnect, link)
        client.on_message = functools.partial(self._on_message, link)
        return link

    def _on_connect(self, link: _MqttLink, client: Any, flags: Any, rc: Any, props: Any) -> None:
        dev_id = link.device.device_id
        self.stats.connects += 1
        self.stats.connected += 1
        if link.ever_connected:
            self.stats.reconnects += 1
        link.ever_connected = True
        link.connected_at = asyncio.get_running_loop().time()
        client.subscribe(
            [
                _subscription(f"devices/{dev_id}/receipts"),
                _subscription(f"devices/{dev_id}/commands"),
                # no_local: the device's own answers on commands/response are
                # not commands for it.
                _subscription(f"devices/{dev_id}/commands/+", no_local=True),
            ]
        )
        client.publish(f"devices/{dev_id}/status", b'{"online":true}', qos=1, retain=True)
        link.wake.set()
        if self.stats.connected >= len(self.links):
            self.all_connected.set()

    def _on_disconnect(self, link: _MqttLink, client: Any, packet: Any, exc: Any = None) -> None:
        self.stats.connected = max(0, self.stats.connected - 1)
        self.all_connected.clear()
        link.storage.changed.set()

    def _on_message(
        self, link: _MqttLink, client: Any, topic: str, payload: bytes, qos: int, props: Any
    ) -> int:
        dev = link.device
        if topic.endswith("/receipts"):
            try:
                doc = orjson.loads(payload)
                ids = doc.get("msg_ids") or []
            except (orjson.JSONDecodeError, AttributeError):
                log.warning("%s: unreadable receipt %r", dev.device_id, payload[:100])
                return 0
            self.stats.receipts += dev.buffer.confirm([str(i) for i in ids])
        elif topic == f"devices/{dev.device_id}/commands":
            answer = dev.handle_command(payload, time.time())
            self.stats.commands += 1
            client.publish(f"devices/{dev.device_id}/commands/response", answer, qos=1)
        elif topic.startswith(f"devices/{dev.device_id}/commands/"):
            answer = dev.handle_command(payload, time.time())
            self.stats.commands += 1
            reply = _response_topic(props, f"devices/{dev.device_id}/commands/")
            client.publish(reply or f"{topic}/result", answer, qos=1)
        return 0

    async def _connect(self, link: _MqttLink, stop: asyncio.Event, gate: asyncio.Semaphore) -> None:
        from gmqtt.mqtt.constants import MQTTv50

        delay = 0.5
        while not stop.is_set():
            try:
                async with gate:
                    await asyncio.wait_for(
                        link.client.connect(
                            self.host, self.port, keepalive=self.keepalive, version=MQTTv50
                        ),
                        REQUEST_TIMEOUT,
                    )
                return
            except Exception as e:  # refused, timeout, reset: retry while the gateway comes up
                self.stats.errors += 1
                log.debug("%s: connect failed: %s", link.device.device_id, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 10.0)

    async def _send(self, link: _MqttLink) -> None:
        """Hand unsent messages to the connection, at most MQTT_INFLIGHT unacked."""
        dev = link.device
        topic = f"devices/{dev.device_id}/telemetry"
        client = link.client
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.wake.wait(), RECEIPT_CHECK)
            link.wake.clear()
            if (
                self.qos > 0
                and client.is_connected
                and loop.time() - link.connected_at > self.receipt_grace
            ):
                self.stats.resent += dev.buffer.requeue_sent_before(link.connected_at)
            for msg_id, pending in dev.buffer.unsent():
                while client.is_connected and self.qos > 0 and len(link.storage) >= MQTT_INFLIGHT:
                    link.storage.changed.clear()
                    await link.storage.changed.wait()
                if not client.is_connected:
                    break
                link.storage.publish_telemetry(client, topic, pending.payload, self.qos)
                dev.buffer.mark_sent(msg_id, loop.time())
                self.stats.sent += 1

    async def run(self, stop: asyncio.Event, drain: float = 0.0) -> None:
        """Connect every device, publish until ``stop``, wait up to ``drain``
        seconds for the buffers to be confirmed, then disconnect."""
        self.links = [self._make_link(d) for d in self.devices]
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        try:
            async with asyncio.TaskGroup() as tg:
                for link in self.links:
                    tg.create_task(self._device(link, stop, gate, drain))
        finally:
            await self._disconnect_all()

    async def _device(
        self, link: _MqttLink, stop: asyncio.Event, gate: asyncio.Semaphore, drain: float
    ) -> None:
        await self._connect(link, stop, gate)
        async with asyncio.TaskGroup() as tg:
            sender = tg.create_task(self._send(link))
            await _produce(link.device, self.stats, link.wake, stop)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain
            await self._acknowledged(link, drain)
            if self.stats.receipts:
                # Only a gateway with receipts on ever frees a device's buffer.
                await _drained(link.device, deadline - loop.time())
            sender.cancel()

    async def _acknowledged(self, link: _MqttLink, limit: float) -> None:
        """Wait (at most ``limit`` s) until the gateway acknowledged everything
        the device has sent (QoS 0: until it is all sent)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while len(link.storage) or link.device.buffer.unsent():
                    link.storage.changed.clear()
                    link.wake.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(link.storage.changed.wait(), RECEIPT_CHECK)

    async def _disconnect_all(self) -> None:
        async def one(link: _MqttLink) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.client.disconnect(), STOP_GRACE)

        await asyncio.gather(*(one(link) for link in self.links if link.ever_connected))


def _subscription(topic: str, *, no_local: bool = False) -> Any:
    import gmqtt

    return gmqtt.Subscription(topic, qos=1, no_local=no_local)


def _response_topic(props: Any, prefix: str) -> str | None:
    """The MQTT 5 response topic of a received PUBLISH (gmqtt gives lists),
    if it is under ``prefix``: whoever can publish a command must not make the
    device publish anywhere else (another device's telemetry, say)."""
    value = props.get("response_topic") if isinstance(props, dict) else None
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if (
        isinstance(value, str)
        and value.startswith(prefix)
        and "+" not in value
        and "#" not in value
    ):
        return value
    return None


# ------------------------------------------------------------------------------ CoAP


class _PushFleet:
    """Devices that push readings over a request/response protocol: per
    device, one producer fills the buffer and one sender empties it; with
    ``takes_commands``, one more task waits for the device's commands
    (:meth:`_commands`) and posts each answer (:meth:`_answer`)."""

    devices: list[VirtualDevice]
    stats: FleetStats
    takes_commands: bool = False
    _refusal_logged: bool = False

    async def _device(
        self, client: Any, dev: VirtualDevice, stop: asyncio.Event, drain: float
    ) -> None:
        wake = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            commands = tg.create_task(self._commands(client, dev)) if self.takes_commands else None
            sender = tg.create_task(self._send(client, dev, wake))
            await _produce(dev, self.stats, wake, stop)
            await _drained(dev, drain)
            sender.cancel()
            if commands is not None:
                commands.cancel()

    async def _send(self, client: Any, dev: VirtualDevice, wake: asyncio.Event) -> None:
        raise NotImplementedError

    host: str
    port: int

    def _commands_url(self, scheme: str, dev: VirtualDevice, command_id: str | None = None) -> str:
        """The device's commands resource, or with ``command_id`` its result resource."""
        url = f"{scheme}://{_host_literal(self.host)}:{self.port}/devices/{dev.device_id}/commands"
        if command_id is None:
            return url
        return f"{url}/{urllib.parse.quote(command_id, safe='')}/result"

    async def _commands(self, client: Any, dev: VirtualDevice) -> None:
        """Wait for the device's commands and answer each, until cancelled."""
        raise NotImplementedError

    async def _post_result(
        self, client: Any, dev: VirtualDevice, command_id: str, answer: bytes
    ) -> bool | None:
        """Post one answer: True taken, False refused (no command waits for
        it), None failed (worth another try)."""
        raise NotImplementedError

    async def _answer(self, client: Any, dev: VirtualDevice, body: bytes) -> None:
        """Run (or, for an id answered before, repeat) a command; post the answer."""
        try:
            cid = orjson.loads(body).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            cid = None
        answer = dev.handle_command(body, time.time())
        self.stats.commands += 1
        if not isinstance(cid, str) or not cid:
            self.stats.command_errors += 1  # nothing to answer to
            return
        for attempt in range(RESULT_ATTEMPTS):
            taken = await self._post_result(client, dev, cid, answer)
            if taken is not None:
                if not taken:
                    self.stats.command_errors += 1  # no longer waited for
                return
            await asyncio.sleep(0.5 * (attempt + 1))
        self.stats.command_errors += 1

    def _refused(self, dev: VirtualDevice, why: str) -> None:
        """The gateway refuses this device's commands requests (not allowed,
        commands off): it stops asking. Logged once per fleet, not per device."""
        self.stats.command_errors += 1
        if not self._refusal_logged:
            self._refusal_logged = True
            log.warning(
                "%s: the gateway refuses command requests (%s); devices that get this "
                "refusal stop asking",
                dev.device_id,
                why,
            )


class CoapFleet(_PushFleet):
    """CoAP devices (aiocoap): confirmable POSTs to ``/devices/{id}/telemetry``,
    one in flight per device; a message is freed on 2.04 (stored)."""

    protocol = "coap"

    def __init__(
        self,
        devices: Sequence[VirtualDevice],
        host: str,
        port: int,
        *,
        observe_commands: bool = False,
        tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.devices = list(devices)
        self.host = host
        self.port = port
        self.tokens = tokens or {}
        """Per device: its own CoAP token (sent as ``?token=``)."""
        self.takes_commands = observe_commands
        """Observe ``/devices/{id}/commands`` (the gateway needs ``coap.commands: true``)."""
        self.stats = FleetStats("coap", devices=len(self.devices))

    def _token_query(self, dev: VirtualDevice) -> str:
        token = self.tokens.get(dev.device_id)
        return "" if token is None else "?token=" + urllib.parse.quote(token, safe="")

    async def _commands(self, ctx: Any, dev: VirtualDevice) -> None:
        """Observe the device's commands resource; answer each notification
        that carries a command (aiocoap acknowledges the confirmable
        notification: DELIVERED). An observation that ends (the gateway
        restarts) is made again."""
        import aiocoap
        from aiocoap.numbers.codes import Code

        uri = self._commands_url("coap", dev) + self._token_query(dev)
        refusals = {Code.NOT_FOUND, Code.FORBIDDEN, Code.UNAUTHORIZED, Code.METHOD_NOT_ALLOWED}
        delay = 0.5
        while True:
            req = ctx.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
            try:
                first = await asyncio.wait_for(req.response, REQUEST_TIMEOUT)
                if first.code in refusals:
                    self._refused(dev, f"CoAP {first.code}")
                    return
                if first.code.is_successful():
                    delay = 0.5
                    if first.payload:
                        await self._answer(ctx, dev, first.payload)
                    async for note in req.observation:
                        if note.payload:
                            await self._answer(ctx, dev, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # timeout, network error, observation ended with an error
                log.debug("%s: command observation ended: %s", dev.device_id, e)
            finally:
                if not req.observation.cancelled:
                    req.observation.cancel()
            self.stats.command_errors += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 10.0)

    async def _post_result(
        self, ctx: Any, dev: VirtualDevice, command_id: str, answer: bytes
    ) -> bool | None:
        import aiocoap
        from aiocoap.numbers.codes import Code

        msg = aiocoap.Message(
            code=Code.POST,
            uri=self._commands_url("coap", dev, command_id) + self._token_query(dev),
            payload=answer,
            content_format=50,  # application/json
        )
        try:
            resp = await asyncio.wait_for(ctx.request(msg).response, REQUEST_TIMEOUT)
        except Exception as e:  # timeout, network error
            log.debug("%s: command answer failed: %s", dev.device_id, e)
            return None
        return None if resp.code.class_ == 5 else resp.code == Code.CHANGED  # 5.xx: retry

    async def run(self, stop: asyncio.Event, drain: float = 0.0) -> None:
        """Send until ``stop``; then up to ``drain`` seconds to empty the buffers."""
        import aiocoap

        ctx = await aiocoap.Context.create_client_context()
        try:
            async with asyncio.TaskGroup() as tg:
                for dev in self.devices:
                    tg.create_task(self._device(ctx, dev, stop, drain))
        finally:
            await ctx.shutdown()

    async def _send(self, ctx: Any, dev: VirtualDevice, wake: asyncio.Event) -> None:
        import aiocoap

        uri = f"coap://{_host_literal(self.host)}:{self.port}/devices/{dev.device_id}/telemetry"
        uri += self._token_query(dev)
        delay = 0.5
        while True:
            await wake.wait()
            wake.clear()
            for msg_id, pending in dev.buffer.unsent():
                req = aiocoap.Message(
                    code=aiocoap.POST,
                    uri=uri,
                    payload=pending.payload,
                    content_format=50,  # application/json
                )
                self.stats.sent += 1
                try:
                    resp = await asyncio.wait_for(ctx.request(req).response, REQUEST_TIMEOUT)
                    ok = resp.code.is_successful()
                except Exception as e:  # timeout, network error: keep it, retry later
                    log.debug("%s: coap post failed: %s", dev.device_id, e)
                    ok = False
                if ok:
                    dev.buffer.confirm([msg_id])
                    self.stats.acked += 1
                    delay = 0.5
                    continue
                self.stats.errors += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 10.0)
                wake.set()
                break


# ------------------------------------------------------------------------------ HTTP


class HttpFleet(_PushFleet):
    """HTTP devices (aiohttp): POST to ``/devices/{id}/telemetry``; a backlog
    goes as JSON arrays of up to HTTP_BATCH; freed on 2xx (stored)."""

    protocol = "http"

    def __init__(
        self,
        devices: Sequence[VirtualDevice],
        host: str,
        port: int,
        *,
        token: str | None = None,
        poll_commands: bool | None = None,
        command_wait: float = COMMAND_POLL_WAIT,
        tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.devices = list(devices)
        self.host = host
        self.port = port
        self.token = token
        self.tokens = tokens or {}
        """Per device: its own bearer token (instead of ``token``)."""
        self.takes_commands = bool(token or self.tokens) if poll_commands is None else poll_commands
        """Long-poll commands: by default when there is a token (the gateway
        wants one for commands, unless ``commands_allow_anonymous``)."""
        self.command_wait = command_wait
        self.stats = FleetStats("http", devices=len(self.devices))
        self._poll_session: Any = None

    async def run(self, stop: asyncio.Event, drain: float = 0.0) -> None:
        """Send until ``stop``; then up to ``drain`` seconds to empty the buffers."""
        import aiohttp

        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        polls = aiohttp.TCPConnector(limit=min(len(self.devices), HTTP_POLL_CONNECTIONS) or 1)
        async with (
            aiohttp.ClientSession(headers=headers, timeout=timeout) as session,
            aiohttp.ClientSession(headers=headers, connector=polls) as self._poll_session,
            asyncio.TaskGroup() as tg,
        ):
            for dev in self.devices:
                tg.create_task(self._device(session, dev, stop, drain))

    def _auth(self, dev: VirtualDevice) -> dict[str, str] | None:
        """The device's own Authorization header (None: the session's)."""
        token = self.tokens.get(dev.device_id)
        return None if token is None else {"Authorization": f"Bearer {token}"}

    async def _commands(self, session: Any, dev: VirtualDevice) -> None:
        """Long-poll the device's commands (in the poll session's own pool) and
        post each answer (``session``, the telemetry pool), until cancelled."""
        import aiohttp

        base = self._commands_url("http", dev)
        hold = aiohttp.ClientTimeout(total=self.command_wait + REQUEST_TIMEOUT)
        delay = 0.5
        while True:
            status, body = 0, b""
            try:
                async with self._poll_session.get(
                    base,
                    params={"wait": f"{self.command_wait:g}"},
                    timeout=hold,
                    headers=self._auth(dev),
                ) as resp:
                    status = resp.status
                    body = await read_capped(resp.content, COMMAND_BODY_MAX)
            except (aiohttp.ClientError, TimeoutError) as e:
                log.debug("%s: command poll failed: %s", dev.device_id, e)
            if status == 200 and len(body) <= COMMAND_BODY_MAX:
                await self._answer(session, dev, body)
                delay = 0.5
                continue
            if status == 204:
                delay = 0.5
                continue
            if status in (401, 403, 404):
                # Not allowed, or a gateway without commands: polling again
                # would only repeat the refusal.
                self._refused(dev, f"HTTP {status}")
                return
            self.stats.command_errors += 1  # 409 superseded, 503 busy, network errors
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 10.0)

    async def _post_result(
        self, session: Any, dev: VirtualDevice, command_id: str, answer: bytes
    ) -> bool | None:
        import aiohttp
        from yarl import URL

        url = URL(self._commands_url("http", dev, command_id), encoded=True)
        try:
            async with session.post(url, data=answer, headers=self._auth(dev)) as resp:
                await resp.read()
                return None if resp.status >= 500 else resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as e:
            log.debug("%s: command answer failed: %s", dev.device_id, e)
            return None

    async def _send(self, session: Any, dev: VirtualDevice, wake: asyncio.Event) -> None:
        url = f"http://{_host_literal(self.host)}:{self.port}/devices/{dev.device_id}/telemetry"
        delay = 0.5
        while True:
            await wake.wait()
            wake.clear()
            unsent = dev.buffer.unsent()
            while unsent:
                chunk, unsent = unsent[:HTTP_BATCH], unsent[HTTP_BATCH:]
                body = (
                    chunk[0][1].payload
                    if len(chunk) == 1
                    else b"[" + b",".join(p.payload for _, p in chunk) + b"]"
                )
                self.stats.sent += len(chunk)
                try:
                    async with session.post(url, data=body, headers=self._auth(dev)) as resp:
                        await resp.read()
                        ok = 200 <= resp.status < 300
                except Exception as e:  # refused, reset, timeout: keep them, retry later
                    log.debug("%s: http post failed: %s", dev.device_id, e)
                    ok = False
                if ok:
                    dev.buffer.confirm([m for m, _ in chunk])
                    self.stats.acked += len(chunk)
                    delay = 0.5
                    continue
                self.stats.errors += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 10.0)
                wake.set()
                break


def _host_literal(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ------------------------------------------------------------------------------ Modbus

_REGISTER_MAP: dict[str, list[tuple[str, int, str, float]]] = {
    # kind: (metric, holding register address, data type, scale) - value = raw * scale
    "env": [
        ("temperature", 0, "int16", 0.01),
        ("humidity", 1, "uint16", 0.1),
        ("battery", 2, "uint16", 0.001),
    ],
    "machine": [
        ("vibration", 0, "uint16", 0.01),
        ("current", 1, "uint16", 0.01),
        ("bearing_temp", 2, "int16", 0.1),
        ("rpm", 3, "uint16", 1.0),
        ("running", 4, "uint16", 1.0),
    ],
    "meter": [
        ("power", 0, "uint32", 0.1),
        ("energy_wh", 2, "uint32", 1.0),
        ("parts", 4, "uint32", 1.0),
    ],
}
MODBUS_REGISTERS = 8
"""Holding registers per simulated unit (the largest map above needs 6)."""
MODBUS_MAX_UNITS = 247
"""Modbus unit ids 1-247 are addressable devices (0 is broadcast, 248-255 reserved)."""


def _to_registers(value: MetricValue, data_type: str, scale: float) -> list[int]:
    raw = round(float(value) / scale)
    if data_type == "int16":
        return [max(-32768, min(32767, raw)) & 0xFFFF]
    if data_type == "uint16":
        return [max(0, min(0xFFFF, raw))]
    hi, lo = struct.unpack(">HH", struct.pack(">I", max(0, min(0xFFFFFFFF, raw))))
    return [hi, lo]


def _from_registers(regs: Sequence[int], data_type: str, scale: float) -> float:
    if data_type == "int16":
        raw = regs[0] - 0x10000 if regs[0] & 0x8000 else regs[0]
    elif data_type == "uint16":
        raw = regs[0]
    else:
        raw = (regs[0] << 16) | regs[1]
    return raw * scale


_REGISTER_COUNT = {"int16": 1, "uint16": 1, "uint32": 2}


def decode_register_write(
    kind: str, address: int, values: Sequence[int]
) -> dict[str, float] | None:
    """The points a write of ``values`` at ``address`` sets on a device of
    ``kind``, or None when the write must be refused: it touches a register
    of a point that is not writable (``WRITABLE``), covers only part of a
    two-register value, or lies outside the map."""
    end = address + len(values)
    out: dict[str, float] = {}
    covered = 0
    for metric, addr, dtype, scale in _REGISTER_MAP[kind]:
        n = _REGISTER_COUNT[dtype]
        if addr + n <= address or addr >= end:
            continue  # not touched
        if metric not in WRITABLE[kind] or addr < address or addr + n > end:
            return None
        out[metric] = _from_registers(values[addr - address : addr - address + n], dtype, scale)
        covered += n
    return out if covered == len(values) else None


class ModbusSimServer:
    """A Modbus TCP server: one unit id per device (1, 2, ...); each read of a
    unit's holding registers returns the device's values at that moment."""

    def __init__(
        self, devices: Sequence[VirtualDevice], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if len(devices) > MODBUS_MAX_UNITS:
            raise ValueError(f"at most {MODBUS_MAX_UNITS} Modbus devices per server")
        self.devices = list(devices)
        self.host = host
        self.port = port
        self.reads = 0
        self.writes = 0
        """Register writes the devices took."""
        self.refused_writes = 0
        self._server: Any = None

    async def _refresh(
        self,
        device: VirtualDevice,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: Any,
    ) -> Any:
        """pymodbus's action for every access: a read refreshes the registers
        from the device; a write goes to :meth:`_written` (its refusal, an
        ExcCodes, is the answer)."""
        if set_values is not None:
            return self._written(device, function_code, address, set_values)
        self.reads += 1
        metrics = device.sample(time.time())
        for metric, addr, dtype, scale in _REGISTER_MAP[device.kind]:
            regs = _to_registers(metrics.get(metric, 0), dtype, scale)
            registers[addr - start_address : addr - start_address + len(regs)] = regs
        return None

    def _written(
        self, device: VirtualDevice, function_code: int, address: int, values: Sequence[Any]
    ) -> Any:
        """A client writes registers: the device takes the values (later reads
        show them) or the write is refused with ILLEGAL_ADDRESS (a register
        that is not writable, coils) / ILLEGAL_DATA_VALUE (a value the point
        cannot hold), and nothing is changed."""
        from pymodbus.constants import ExcCodes

        points = (
            None
            if function_code not in (6, 16)  # write single / multiple registers
            else decode_register_write(device.kind, address, [int(v) for v in values])
        )
        if points is None:
            self.refused_writes += 1
            return ExcCodes.ILLEGAL_ADDRESS
        try:
            checked = {m: device.checked_write(m, v) for m, v in points.items()}
        except (KeyError, ValueError):
            self.refused_writes += 1
            return ExcCodes.ILLEGAL_VALUE
        for metric, value in checked.items():
            device.apply_write(metric, value)
        self.writes += 1
        return None

    async def start(self) -> None:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        sims = [
            SimDevice(
                id=unit,
                simdata=(
                    [SimData(0, count=1, values=False, datatype=DataType.BITS)],
                    [SimData(0, count=1, values=False, datatype=DataType.BITS)],
                    [SimData(0, values=[0] * MODBUS_REGISTERS, datatype=DataType.REGISTERS)],
                    [SimData(0, values=[0] * 1, datatype=DataType.REGISTERS)],
                ),
                action=functools.partial(self._refresh, dev),
            )
            for unit, dev in enumerate(self.devices, start=1)
        ]
        self._server = ModbusTcpServer(sims, address=(self.host, self.port))
        await self._server.serve_forever(background=True)
        self.port = int(self._server.transport.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.shutdown()
            self._server = None

    def gateway_config(self, interval: float = 1.0) -> list[ModbusDeviceConfig]:
        """The ``modbus:`` entries that make the gateway poll every device here."""
        out = []
        for unit, dev in enumerate(self.devices, start=1):
            points = [
                {
                    "metric": m,
                    "address": a,
                    "data_type": t,
                    "scale": s,
                    "writable": m in WRITABLE[dev.kind],
                }
                for m, a, t, s in _REGISTER_MAP[dev.kind]
            ]
            out.append(
                ModbusDeviceConfig.model_validate(
                    {
                        "name": f"sim-modbus-{unit}",
                        "device_id": dev.device_id,
                        "host": self.host,
                        "port": self.port,
                        "unit_id": unit,
                        "timeout": 2.0,
                        "groups": [
                            {
                                "function": "holding_registers",
                                "interval": interval,
                                "points": points,
                            }
                        ],
                    }
                )
            )
        return out


# ------------------------------------------------------------------------------ OPC-UA

OPCUA_NAMESPACE = "urn:edgeway:sim"


class OpcUaSimServer:
    """An OPC-UA server (asyncua, no security: loopback demos and tests only)
    with one object per device and one variable per metric
    (``ns=2;s={device_id}.{metric}``), written at each device's rate."""

    def __init__(
        self, devices: Sequence[VirtualDevice], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.devices = list(devices)
        self.host = host
        self.port = port
        self.writes = 0
        self._server: Any = None
        self._ns = 2
        """The namespace index of our nodes: the first one a server registers
        after 0 (OPC-UA) and 1 (the server's own) is 2, so a gateway can be
        configured before this server runs (the demo starts it in a child)."""
        self._vars: dict[str, dict[str, Any]] = {}
        self._writable: dict[Any, tuple[VirtualDevice, str]] = {}
        """NodeId -> (device, metric) of the variables clients may write."""
        self.client_writes = 0
        """Variable writes from clients that the devices took."""

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{_host_literal(self.host)}:{self.port}/edgeway-sim/"

    async def start(self) -> None:
        from asyncua import ua
        from asyncua.common.callback import CallbackType
        from asyncua.server.server import Server

        if self.port == 0:
            self.port = _free_tcp_port(self.host)
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("edgeway simulator")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self._ns = await server.register_namespace(OPCUA_NAMESPACE)
        now = time.time()
        for dev in self.devices:
            obj = await server.nodes.objects.add_object(self._ns, dev.device_id)
            self._vars[dev.device_id] = {}
            for metric, value in dev.sample(now).items():
                node = ua.NodeId(ua.String(f"{dev.device_id}.{metric}"), ua.Int16(self._ns))
                var = await obj.add_variable(node, metric, _variant(value))
                self._vars[dev.device_id][metric] = var
                if metric in WRITABLE[dev.kind]:
                    await var.set_writable()
                    self._writable[node] = (dev, metric)
        server.subscribe_server_callback(CallbackType.PostWrite, self._client_wrote)
        await server.start()
        self._server = server

    def _client_wrote(self, event: Any, _dispatcher: Any) -> None:
        """A client wrote variables (asyncua's PostWrite): the devices take the
        values they accepted, so the values they report next follow (our own
        updates are internal writes, not external ones)."""
        from asyncua.ua.attribute_ids import AttributeIds

        if not event.is_external:
            return
        for item, status in zip(
            event.request_params.NodesToWrite, event.response_params, strict=False
        ):
            target = self._writable.get(item.NodeId)
            if target is None or item.AttributeId != AttributeIds.Value or not status.is_good():
                continue
            dev, metric = target
            try:
                dev.write(metric, item.Value.Value.Value)
            except (KeyError, ValueError) as e:
                log.warning("%s: write of %s not taken: %s", dev.device_id, metric, e)
                continue
            self.client_writes += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Write every device's values at its rate until ``stop``."""
        async with asyncio.TaskGroup() as tg:
            for dev in self.devices:
                tg.create_task(self._update(dev, stop))

    async def _update(self, dev: VirtualDevice, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        variables = self._vars[dev.device_id]
        with contextlib.suppress(_Stopping):
            while True:
                await _sleep_until(nxt, stop)
                now = time.time()
                for metric, value in dev.sample(now).items():
                    var = variables.get(metric)
                    if var is not None:
                        await var.write_value(_variant(value))
                        self.writes += 1
                nxt = max(nxt + dev.interval(now), loop.time() - 1.0)

    async def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.stop(), STOP_GRACE)
            self._server = None

    def gateway_config(self, sampling_interval: float = 0.5) -> list[OpcUaServerConfig]:
        """The ``opcua:`` entries that make the gateway subscribe to every device here."""
        out = []
        for i, dev in enumerate(self.devices):
            nodes = [
                {
                    "metric": metric,
                    "node_id": f"ns={self._ns};s={dev.device_id}.{metric}",
                    "sampling_interval": sampling_interval,
                    "writable": metric in WRITABLE[dev.kind],
                }
                # The same metrics the server creates variables for (start()).
                for metric in dev.signal.sample(time.time())
            ]
            out.append(
                OpcUaServerConfig.model_validate(
                    {
                        "name": f"sim-opcua-{i}",
                        "device_id": dev.device_id,
                        "endpoint": self.endpoint,
                        "publishing_interval": sampling_interval,
                        "nodes": nodes,
                    }
                )
            )
        return out


def _variant(value: MetricValue) -> Any:
    from asyncua import ua

    if isinstance(value, bool):
        return ua.Variant(value, ua.VariantType.Boolean)
    if isinstance(value, str):
        return ua.Variant(value, ua.VariantType.String)
    # Always Double: a variable keeps the type it was created with.
    return ua.Variant(float(value), ua.VariantType.Double)


def _free_tcp_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ CLI

PROTOCOLS = ("mqtt", "coap", "http", "modbus", "opcua", "mixed")
DEFAULT_TARGETS = {
    "mqtt": "127.0.0.1:1883",
    "coap": "127.0.0.1:5683",
    "http": "127.0.0.1:8080",
    "modbus": "127.0.0.1:5020",
    "opcua": "127.0.0.1:4840",
}
"""Where each protocol's devices connect (mqtt/coap/http: the gateway's
defaults) or listen (modbus/opcua: the simulator is the server; 5020 because
502 needs root)."""
MIXED_SHARES = (("mqtt", 0.6), ("coap", 0.2), ("http", 0.2))
"""How ``--protocol mixed`` splits the devices between the pushing protocols."""


def add_simulate_arguments(p: Any) -> None:
    """The options of ``edgeway simulate`` (an argparse parser)."""
    p.add_argument("--devices", type=int, default=10, metavar="N", help="number of devices")
    p.add_argument("--protocol", choices=PROTOCOLS, default="mqtt")
    p.add_argument(
        "--rate",
        type=float,
        default=1.0,
        metavar="R",
        help="readings per second per device (default 1)",
    )
    p.add_argument("--qos", type=int, choices=[0, 1, 2], default=1, help="MQTT QoS (default 1)")
    p.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="the gateway (mqtt/coap/http) or where to listen (modbus/opcua; port 0: "
        "any free port); default: the protocol's usual port on 127.0.0.1",
    )
    p.add_argument("--mqtt-target", metavar="HOST:PORT", help="with --protocol mixed")
    p.add_argument("--coap-target", metavar="HOST:PORT", help="with --protocol mixed")
    p.add_argument("--http-target", metavar="HOST:PORT", help="with --protocol mixed")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ...")
    p.add_argument("--seed", type=int, help="random seed (same seed, same devices)")
    p.add_argument(
        "--kinds",
        default="env,env,machine,meter",
        help="device kinds, cycled: env (temperature, humidity), machine (vibration, current, "
        "bearing temperature), meter (energy, parts); default env,env,machine,meter",
    )
    p.add_argument(
        "--fault-fraction",
        type=float,
        default=0.2,
        help="share of machines that develop a bearing fault (default 0.2)",
    )
    p.add_argument(
        "--bursts-per-hour",
        type=float,
        default=2.0,
        help="bursts of 10x the rate per device and hour (default 2; 0: none)",
    )
    p.add_argument(
        "--day-length",
        type=float,
        default=86400.0,
        metavar="S",
        help="period of the daily temperature cycle in seconds (shorten it to watch)",
    )
    p.add_argument("--username", help="MQTT user name")
    p.add_argument("--password", help="MQTT password")
    p.add_argument(
        "--token", help="HTTP bearer token (with one, HTTP devices also long-poll their commands)"
    )
    p.add_argument(
        "--provision-key",
        metavar="ID:SECRET",
        help="each device first enrols with this provisioning key (MQTT devices over MQTT, "
        "HTTP and CoAP devices with POST /provision on the HTTP listener) and then uses the "
        "credentials it received (docs/devices.md)",
    )
    p.add_argument(
        "--credentials-file",
        type=Path,
        metavar="FILE",
        help="with --provision-key: keep the devices' credentials here (mode 0600) and reuse "
        "them next time, as a real device keeps what it was given",
    )
    p.add_argument(
        "--coap-commands",
        action="store_true",
        help="CoAP devices observe their commands (the gateway needs coap.commands: true)",
    )
    p.add_argument(
        "--firmware",
        choices=("http", "mqtt"),
        help="MQTT devices take firmware.update commands (campaigns) and download over HTTP "
        "or in MQTT chunks (edgeway.sim.firmware)",
    )
    p.add_argument("--firmware-version", default="1.0", help="their firmware version at start")
    p.add_argument("--firmware-hardware", default="pump-ctl", help="their hardware type")
    p.add_argument(
        "--firmware-fail",
        metavar="SHARE:RESULT",
        help="a share of them fails updates with this LwM2M result, e.g. 0.2:integrity_check_failure",
    )
    p.add_argument(
        "--firmware-cut",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="a share of them loses its connection half way through a download and resumes",
    )
    p.add_argument("--interval", type=float, default=5.0, help="seconds between status lines")


def _split_target(value: str) -> tuple[str, int]:
    from edgeway.config import parse_host_port

    return parse_host_port(value)


async def run_simulation(args: Any, write: Any, stop: asyncio.Event) -> int:
    """``edgeway simulate``: run until ``stop`` or ``--duration``; print status lines."""
    if args.devices < 1 or args.rate <= 0:
        write("error: --devices must be at least 1 and --rate above 0")
        return 2
    proto: str = args.protocol
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or not set(kinds) <= {"env", "machine", "meter"}:
        write("error: --kinds takes env, machine and meter, separated by commas")
        return 2
    common: dict[str, Any] = {
        "kinds": kinds,
        "seed": args.seed,
        "rate": args.rate,
        "fault_fraction": args.fault_fraction,
        "bursts_per_hour": args.bursts_per_hour,
        "day_length": args.day_length,
        "now": time.time(),
    }
    from edgeway.sim.enrol import EnrolError

    try:
        return await _simulate(args, proto, common, write, stop)
    except ValueError as e:
        write(f"error: {e}")
        return 2
    except EnrolError as e:
        write(f"error: {e}")
        return 1


async def _simulate(
    args: Any, proto: str, common: dict[str, Any], write: Any, stop: asyncio.Event
) -> int:
    from edgeway.sim.devices import make_devices

    if proto in ("modbus", "opcua"):
        host, port = _split_target(args.target or DEFAULT_TARGETS[proto])
        devices = make_devices(args.devices, prefix=args.prefix, **common)
        server: ModbusSimServer | OpcUaSimServer
        server = (ModbusSimServer if proto == "modbus" else OpcUaSimServer)(devices, host, port)
        await server.start()
        try:
            write(
                f"{proto} simulator with {len(devices)} devices listening on {host}:{server.port}"
            )
            write("gateway configuration that reads them:")
            import yaml

            entries = [
                c.model_dump(mode="json", exclude_defaults=True) for c in server.gateway_config()
            ]
            write(yaml.safe_dump({proto: entries}, sort_keys=False).rstrip())
            async with asyncio.TaskGroup() as tg:
                if isinstance(server, OpcUaSimServer):
                    tg.create_task(server.run(stop))
                tg.create_task(_until(stop, args.duration))
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.interval)
                    done = server.reads if isinstance(server, ModbusSimServer) else server.writes
                    write(f"{'reads' if proto == 'modbus' else 'value writes'}: {done}")
        finally:
            await server.stop()
        return 0

    plan = [(proto, args.devices)] if proto != "mixed" else _mixed_counts(args.devices)
    fleets: list[MqttFleet | CoapFleet | HttpFleet] = []
    for p, n in plan:
        if n == 0:
            continue
        target = getattr(args, f"{p}_target", None) if proto == "mixed" else args.target
        host, port = _split_target(target or DEFAULT_TARGETS[p])
        prefix = args.prefix if proto != "mixed" else f"{args.prefix}-{p}"
        devices = make_devices(n, prefix=prefix, **common)
        creds = await _enrolled(args, p, devices, host, port, write)
        if p == "mqtt" and getattr(args, "firmware", None):
            from edgeway.sim.firmware import firmware_fleet

            fw = firmware_fleet(devices, host, port, args)
            fw.credentials = creds or {}
            fleets.append(fw)
        elif p == "mqtt":
            fleets.append(
                MqttFleet(
                    devices,
                    host,
                    port,
                    qos=args.qos,
                    username=args.username,
                    password=args.password,
                    credentials=creds,
                )
            )
        elif p == "coap":
            fleets.append(
                CoapFleet(devices, host, port, observe_commands=args.coap_commands, tokens=creds)
            )
        else:
            fleets.append(HttpFleet(devices, host, port, token=args.token, tokens=creds))
    for f in fleets:
        write(
            f"{len(f.devices)} {f.protocol} devices -> {f.host}:{f.port}, "
            f"{args.rate:g} readings/s each"
        )
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(f.run(stop, drain=5.0)) for f in fleets]
        timer = tg.create_task(_until(stop, args.duration))
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=args.interval)
            write(_status(fleets))
        timer.cancel()
    write("stopped: " + _status(fleets, final=True))
    return 0


async def _enrolled(
    args: Any, protocol: str, devices: Sequence[VirtualDevice], host: str, port: int, write: Any
) -> dict[str, str] | None:
    """With ``--provision-key``: each device's own credential for
    ``protocol``, enrolling those that have none yet (kept in
    ``--credentials-file`` when given). None without a key."""
    from edgeway.sim.enrol import enrol_devices, load_credentials, save_credentials

    if not args.provision_key:
        return None
    kept = load_credentials(args.credentials_file)
    missing = [d.device_id for d in devices if d.device_id not in kept]
    if missing:
        # MQTT and HTTP devices enrol where they send; CoAP devices over HTTP
        # (--http-target), as CoAP has no provisioning endpoint.
        via = "mqtt" if protocol == "mqtt" else "http"
        ehost, eport = host, port
        if protocol == "coap":
            ehost, eport = _split_target(args.http_target or DEFAULT_TARGETS["http"])
        start = time.monotonic()
        kept.update(
            await enrol_devices(
                missing, key=args.provision_key, kind=protocol, via=via, host=ehost, port=eport
            )
        )
        save_credentials(args.credentials_file, kept)
        write(
            f"{len(missing)} {protocol} devices enrolled over {via} with key "
            f"{args.provision_key.split(':')[0]} in {time.monotonic() - start:.1f} s"
        )
    return {d.device_id: kept[d.device_id] for d in devices}


def _mixed_counts(n: int) -> list[tuple[str, int]]:
    counts = [(p, int(n * share)) for p, share in MIXED_SHARES]
    counts[0] = (counts[0][0], n - sum(c for _, c in counts[1:]))
    return counts


async def _until(stop: asyncio.Event, duration: float | None) -> None:
    if duration is None:
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), duration)
    stop.set()


def _status(fleets: Sequence[MqttFleet | CoapFleet | HttpFleet], *, final: bool = False) -> str:
    """One status line. CoAP and HTTP devices count a message confirmed when
    the gateway stored it; MQTT devices when the gateway's receipt says the
    cloud has it. Without receipts an MQTT device only knows the gateway
    acknowledged its messages: the last line says so, rather than showing
    every message as held, which would read like data loss."""
    parts = []
    for f in fleets:
        s = f.stats
        if not isinstance(f, MqttFleet):
            parts.append(
                f"{f.protocol}: produced {s.produced} confirmed {s.acked} "
                f"held {buffered(f.devices)} errors {s.errors}"
            )
            continue
        acked = f"acknowledged {s.acked}" if f.qos else "qos 0 (nothing acknowledged)"
        line = (
            f"mqtt: produced {s.produced} sent {s.sent} {acked} confirmed {s.receipts} "
            f"held {buffered(f.devices)} errors {s.errors} connected {s.connected}/{s.devices}"
        )
        if final and not s.receipts:
            line = (
                f"mqtt: produced {s.produced} sent {s.sent} {acked} errors {s.errors}; "
                "delivery to the cloud not confirmed (no receipts came back: the gateway "
                "has receipts off?); the devices keep their messages until a receipt "
                "names them"
            )
        parts.append(line)
    return " | ".join(parts)
