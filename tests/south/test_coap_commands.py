"""Commands to CoAP devices: observe, a confirmable notification per command, the
result POSTed back; aiocoap's client (and a hand-made UDP client where a test needs
to withhold an ACK) against a gateway running in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiocoap")
pytest.importorskip("cbor2")

import aiocoap
import cbor2
from aiocoap import Code, Message
from coap_devices import aiocoap_client  # noqa: F401  (the client fixture)
from ingest_doubles import wait_until

from coap_datagrams import coap_request, commands_path, empty_reply, observe_get, parse
from edgeway.commands.model import Command, CommandState
from edgeway.config import parse_config
from edgeway.gateway import Gateway
from edgeway.south.coap import CoapAdapter

CON, NON, ACK, RST = 0, 1, 2, 3


async def start_gateway(tmp_path: Path, coap: str) -> tuple[Gateway, asyncio.Task[Any]]:
    cfg = parse_config(
        f"""
gateway: {{id: gw-c, data_dir: "{tmp_path}"}}
mqtt: {{enabled: false}}
coap: {{listen: "127.0.0.1:0", probe_interval: 0, {coap}}}
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    return gw, task


@contextlib.asynccontextmanager
async def gateway_with(tmp_path: Path, coap: str) -> AsyncIterator[tuple[Gateway, CoapAdapter]]:
    gw, task = await start_gateway(tmp_path, coap)
    try:
        adapter = next(a for a in gw.adapters if isinstance(a, CoapAdapter))
        await asyncio.wait_for(adapter.ready.wait(), 10)
        yield gw, adapter
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, CoapAdapter]]:
    async with gateway_with(tmp_path, "commands: true, command_poll_wait: 2s") as pair:
        yield pair


def url(adapter: CoapAdapter, path: str) -> str:
    return f"coap://127.0.0.1:{adapter.port}/{path}"


def observe(client: Any, adapter: CoapAdapter, device: str) -> Any:
    return client.request(
        Message(code=Code.GET, uri=url(adapter, f"devices/{device}/commands"), observe=0)
    )


async def post_result(
    client: Any, adapter: CoapAdapter, device: str, command_id: str, body: bytes, fmt: int = 50
) -> Any:
    msg = Message(
        code=Code.POST,
        uri=url(adapter, f"devices/{device}/commands/{command_id}/result"),
        payload=body,
    )
    msg.opt.content_format = fmt
    return await asyncio.wait_for(client.request(msg).response, 10)


async def state_becomes(gw: Gateway, cmd: Command, state: CommandState) -> None:
    assert gw.commands is not None
    await wait_until(lambda: cmd.state is state)


async def test_observe_take_a_command_as_a_notification_and_answer_it(
    gateway: tuple[Gateway, CoapAdapter], client: Any
) -> None:
    gw, adapter = gateway
    assert gw.commands is not None
    req = observe(client, adapter, "valve-1")
    first = await asyncio.wait_for(req.response, 10)
    # Registered: an empty 2.05 (no command yet), and the device is reachable.
    assert first.code == Code.CONTENT and first.payload == b"" and first.opt.observe is not None
    await wait_until(lambda: adapter.observer_count("valve-1") == 1)
    notifications = aiter(req.observation)
    cmd, _ = await gw.commands.submit("valve-1", "open", {"percent": 40})
    n = await asyncio.wait_for(anext(notifications), 10)
    assert n.opt.content_format == 50
    assert json.loads(n.payload) == {
        "id": cmd.id,
        "name": "open",
        "params": {"percent": 40},
        "expires_at": cmd.expires_at,
    }
    # aiocoap's client acknowledged the confirmable notification: DELIVERED.
    await state_becomes(gw, cmd, CommandState.DELIVERED)
    r = await post_result(
        client, adapter, "valve-1", cmd.id, b'{"status": "ok", "result": {"percent": 40}}'
    )
    assert r.code == Code.CHANGED
    done = await gw.commands.wait(cmd.id, 5)
    assert done.state is CommandState.SUCCEEDED and done.result == {"percent": 40}
    status = gw.status()["adapters"]["coap:coap"]
    assert status["commands"]["notified"] == status["commands"]["acknowledged"] == 1
    # The same answer again: nothing waits for it any more.
    r = await post_result(client, adapter, "valve-1", cmd.id, b'{"status": "ok"}')
    assert r.code == Code.NOT_FOUND
    req.observation.cancel()


class RawDevice(asyncio.DatagramProtocol):
    """A CoAP client by hand: it sees every datagram and ACKs only when told."""

    def __init__(self) -> None:
        self.datagrams: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.put_nowait(data)

    async def next(self) -> tuple[int, int, int, dict[int, list[bytes]], bytes]:
        return parse(await asyncio.wait_for(self.datagrams.get(), 10))


@contextlib.asynccontextmanager
async def raw_device(adapter: CoapAdapter, host: str = "127.0.0.1") -> AsyncIterator[RawDevice]:
    loop = asyncio.get_running_loop()
    transport, device = await loop.create_datagram_endpoint(
        RawDevice, local_addr=(host, 0), remote_addr=("127.0.0.1", adapter.port)
    )
    try:
        yield device
    finally:
        transport.close()


async def test_delivered_only_on_the_devices_ack_and_redelivered_after_a_reset(
    gateway: tuple[Gateway, CoapAdapter], client: Any
) -> None:
    gw, adapter = gateway
    assert gw.commands is not None
    async with raw_device(adapter) as device:
        device.transport.sendto(observe_get(0x100, "pump-7"))
        mtype, code, mid, opts, payload = await device.next()
        assert (mtype, code, mid, payload) == (ACK, 0x45, 0x100, b"")  # piggybacked 2.05
        assert 6 in opts  # Observe: registered
        cmd, _ = await gw.commands.submit("pump-7", "stop")
        mtype, code, mid, opts, payload = await device.next()
        assert (mtype, code) == (CON, 0x45)
        assert json.loads(payload)["id"] == cmd.id and "redelivery" not in json.loads(payload)
        # Not acknowledged yet: handed to the transport (SENT), not DELIVERED.
        # aiocoap retransmits the same message after ACK_TIMEOUT (2-3 s).
        again = await device.next()
        assert again[:3] == (CON, 0x45, mid)
        assert cmd.state is CommandState.SENT
        # The device says it does not want it (it lost its observation state,
        # say): the notification is rejected and the observation ends.
        device.transport.sendto(empty_reply(mid, reset=True))
        await wait_until(lambda: adapter.observer_count("pump-7") == 0)
        assert cmd.state is CommandState.SENT and cmd.attempts == 1
        # The device observes again (a new registration): the command goes out
        # once more, flagged as a redelivery, and the ACK delivers it.
        device.transport.sendto(observe_get(0x101, "pump-7"))
        first = await device.next()
        assert first[:3] == (ACK, 0x45, 0x101)
        mtype, code, mid2, opts, payload = await device.next()
        assert mtype == CON and mid2 != mid
        doc = json.loads(payload)
        assert doc["id"] == cmd.id and doc["redelivery"] is True
        assert cmd.attempts == 2
        device.transport.sendto(empty_reply(mid2))
        await state_becomes(gw, cmd, CommandState.DELIVERED)
        assert gw.commands.stats.redelivered == 1
    r = await post_result(client, adapter, "pump-7", cmd.id, b'{"status": "error", "error": "jam"}')
    assert r.code == Code.CHANGED
    done = await gw.commands.wait(cmd.id, 5)
    assert done.state is CommandState.FAILED and done.error == "jam"


async def test_a_device_gone_gets_its_command_again_when_it_observes_again(
    gateway: tuple[Gateway, CoapAdapter],
) -> None:
    gw, adapter = gateway
    assert gw.commands is not None
    gone = await aiocoap.Context.create_client_context()
    await asyncio.wait_for(observe(gone, adapter, "fan-2").response, 10)
    # The device goes away (its process and socket are gone); the gateway does
    # not know yet: its observation stays until a notification goes unanswered.
    await gone.shutdown()
    cmd, _ = await gw.commands.submit("fan-2", "speed", {"rpm": 900})
    await wait_until(lambda: cmd.attempts == 1)
    second, _ = await gw.commands.submit("fan-2", "stop")
    # Nobody acknowledged the notification: SENT, not DELIVERED; the second waits.
    assert cmd.state is CommandState.SENT and second.state is CommandState.QUEUED
    # Back (from a new port): the new observation replaces the old one, and the
    # first command goes out again, flagged as a redelivery, then the second.
    back = await aiocoap.Context.create_client_context()
    try:
        req = observe(back, adapter, "fan-2")
        await asyncio.wait_for(req.response, 10)
        notifications = aiter(req.observation)
        got = [json.loads((await asyncio.wait_for(anext(notifications), 10)).payload)]
        await state_becomes(gw, cmd, CommandState.DELIVERED)
        got.append(json.loads((await asyncio.wait_for(anext(notifications), 10)).payload))
        assert [(d["id"], d.get("redelivery")) for d in got] == [(cmd.id, True), (second.id, None)]
        await state_becomes(gw, second, CommandState.DELIVERED)
        assert cmd.attempts == 2 and second.attempts == 1
        assert adapter.observer_count("fan-2") == 1
        req.observation.cancel()
    finally:
        await back.shutdown()


async def test_another_devices_result_is_refused(
    gateway: tuple[Gateway, CoapAdapter], client: Any
) -> None:
    gw, adapter = gateway
    assert gw.commands is not None
    cmd, _ = await gw.commands.submit("door-1", "unlock")
    r = await asyncio.wait_for(
        client.request(
            Message(code=Code.GET, uri=url(adapter, "devices/door-1/commands"))
        ).response,
        10,
    )
    assert json.loads(r.payload)["id"] == cmd.id
    await state_becomes(gw, cmd, CommandState.DELIVERED)
    # door-2 cannot answer door-1's command, even knowing its id.
    r = await post_result(client, adapter, "door-2", cmd.id, b'{"status": "ok"}')
    assert r.code == Code.NOT_FOUND
    assert cmd.state is CommandState.DELIVERED
    # Bad answers: not an object, an unknown status, an unsupported format.
    r = await post_result(client, adapter, "door-1", cmd.id, b"[1, 2]")
    assert r.code == Code.BAD_REQUEST and b"invalid_payload" in r.payload
    r = await post_result(client, adapter, "door-1", cmd.id, b'{"status": "maybe"}')
    assert r.code == Code.BAD_REQUEST
    r = await post_result(client, adapter, "door-1", cmd.id, b"<ok/>", fmt=41)
    assert r.code == Code.UNSUPPORTED_CONTENT_FORMAT
    # The device's own answer, in CBOR, is taken.
    r = await post_result(
        client, adapter, "door-1", cmd.id, cbor2.dumps({"status": "ok", "result": 1}), fmt=60
    )
    assert r.code == Code.CHANGED
    done = await gw.commands.wait(cmd.id, 5)
    assert done.state is CommandState.SUCCEEDED and done.result == 1


async def test_plain_get_takes_the_next_command_or_answers_empty(
    gateway: tuple[Gateway, CoapAdapter], client: Any
) -> None:
    gw, adapter = gateway
    assert gw.commands is not None

    async def get() -> Any:
        msg = Message(code=Code.GET, uri=url(adapter, "devices/lamp-3/commands"))
        return await asyncio.wait_for(client.request(msg).response, 10)

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await get()
    # Nothing queued: an empty 2.05 after command_poll_wait (2 s; long enough
    # for the commit before a command goes out on a loaded machine).
    assert (r.code, r.payload) == (Code.CONTENT, b"")
    assert loop.time() - t0 >= 1.9
    first, _ = await gw.commands.submit("lamp-3", "on")
    second, _ = await gw.commands.submit("lamp-3", "dim", {"level": 3})
    r = await get()
    assert r.code == Code.CONTENT and json.loads(r.payload)["id"] == first.id
    await state_becomes(gw, first, CommandState.DELIVERED)
    # One at a time: the next goes out once the previous is delivered.
    r = await get()
    assert json.loads(r.payload) == {
        "id": second.id,
        "name": "dim",
        "params": {"level": 3},
        "expires_at": second.expires_at,
    }
    await state_becomes(gw, second, CommandState.DELIVERED)


async def test_large_commands_go_block_by_block(tmp_path: Path, client: Any) -> None:
    async with gateway_with(tmp_path, "commands: true") as (gw, adapter):
        assert gw.commands is not None
        # Near commands.max_params_bytes (64 KiB): about 65 blocks of 1024 bytes.
        big = {"firmware": "x" * 60_000, "chunks": list(range(500))}
        req = observe(client, adapter, "cam-1")
        await asyncio.wait_for(req.response, 10)
        notifications = aiter(req.observation)
        cmd, _ = await gw.commands.submit("cam-1", "load", big)
        n = await asyncio.wait_for(anext(notifications), 20)
        # aiocoap's client fetched the other blocks with Block2 GETs.
        doc = json.loads(n.payload)
        assert doc["id"] == cmd.id and doc["params"] == big
        await state_becomes(gw, cmd, CommandState.DELIVERED)
        downlink = adapter._downlink
        assert downlink is not None
        assert downlink.stats.blocks_served >= 60
        req.observation.cancel()
        # And by plain GET (another device: aiocoap's client stack still
        # acknowledges cam-1's notifications after the cancel).
        cmd2, _ = await gw.commands.submit("cam-3", "load", big)
        msg = Message(code=Code.GET, uri=url(adapter, "devices/cam-3/commands"))
        r = await asyncio.wait_for(client.request(msg).response, 20)
        assert json.loads(r.payload)["id"] == cmd2.id
        await state_becomes(gw, cmd2, CommandState.DELIVERED)


async def test_each_notification_fits_in_one_small_datagram(
    gateway: tuple[Gateway, CoapAdapter],
) -> None:
    gw, adapter = gateway
    assert gw.commands is not None
    async with raw_device(adapter) as device:
        device.transport.sendto(observe_get(0x200, "cam-2"))
        await device.next()
        cmd, _ = await gw.commands.submit("cam-2", "load", {"blob": "y" * 5000})
        mtype, _code, mid, opts, payload = await device.next()
        # The first of several 1024-byte blocks, with Size2 and an ETag.
        assert mtype == CON and len(payload) == 1024
        block2 = int.from_bytes(opts[23][0], "big")
        assert block2 & 0x08 and block2 & 0x07 == 6 and block2 >> 4 == 0  # M=1, 1024, num 0
        assert int.from_bytes(opts[28][0], "big") > 5000
        device.transport.sendto(empty_reply(mid))
        # A CoAP ping after the ACK: its RST says the listener has read the ACK.
        device.transport.sendto(bytes([0x40, 0x00, 0x02, 0x01]))
        assert (await device.next())[:3] == (RST, 0, 0x201)
        # The ACK of the first block is not delivery: the rest was not fetched.
        assert cmd.state is CommandState.SENT


async def test_commands_are_off_unless_turned_on(tmp_path: Path, client: Any) -> None:
    async with gateway_with(tmp_path, "observe: allow") as (gw, adapter):
        assert gw.commands is not None
        # No CoAP downlink registered (the gateway's own, for pushed configurations
        # and twins, are there whatever the adapters).
        assert [d.name for d in gw.commands.downlinks if d.name == "coap"] == []
        await gw.commands.submit("valve-9", "open")
        r = await asyncio.wait_for(observe(client, adapter, "valve-9").response, 10)
        assert r.code == Code.NOT_FOUND and r.opt.observe is None
        assert adapter.observer_count("valve-9") == 0
        r = await post_result(client, adapter, "valve-9", "x", b"{}")
        assert r.code == Code.NOT_FOUND


async def test_observe_networks_gate_every_commands_request(tmp_path: Path, client: Any) -> None:
    async with gateway_with(tmp_path, 'commands: true, observe_networks: ["10.0.0.0/8"]') as (
        gw,
        adapter,
    ):
        assert gw.commands is not None
        cmd, _ = await gw.commands.submit("valve-8", "open")
        r = await asyncio.wait_for(observe(client, adapter, "valve-8").response, 10)
        assert r.code == Code.FORBIDDEN
        msg = Message(code=Code.GET, uri=url(adapter, "devices/valve-8/commands"))
        r = await asyncio.wait_for(client.request(msg).response, 10)
        assert r.code == Code.FORBIDDEN
        r = await post_result(client, adapter, "valve-8", cmd.id, b'{"status": "ok"}')
        assert r.code == Code.FORBIDDEN
        assert cmd.state is CommandState.QUEUED and cmd.attempts == 0
        assert adapter.refusals == {"observe_denied": 1, "commands_denied": 2}


async def test_a_late_ack_after_the_queue_stopped_waiting_gets_the_command_sent_again(
    gateway: tuple[Gateway, CoapAdapter],
) -> None:
    gw, adapter = gateway
    assert gw.commands is not None
    async with raw_device(adapter) as device:
        device.transport.sendto(observe_get(0x300, "slow-1"))
        await device.next()
        # The queue waits 1 s for the device's ACK (the command's timeout),
        # aiocoap retransmits for much longer (2-3 s for the first retry).
        cmd, _ = await gw.commands.submit("slow-1", "ping", result_timeout=1.0)
        mtype, _code, mid, _opts, payload = await device.next()
        assert mtype == CON and json.loads(payload).get("redelivery") is None
        # The device misses it, and acknowledges the retransmission, late.
        again = await device.next()
        assert again[:3] == (CON, 0x45, mid)
        device.transport.sendto(empty_reply(mid))
        # The device still observes: the command goes out again, as a
        # redelivery, instead of staying SENT until the device registers again.
        mtype, _code, mid2, _opts, payload = await device.next()
        assert mtype == CON and mid2 != mid
        assert json.loads(payload)["id"] == cmd.id and json.loads(payload)["redelivery"] is True
        device.transport.sendto(empty_reply(mid2))
        await state_becomes(gw, cmd, CommandState.DELIVERED)


async def test_only_the_address_that_took_a_command_fetches_its_other_blocks(
    gateway: tuple[Gateway, CoapAdapter],
) -> None:
    gw, adapter = gateway
    assert gw.commands is not None

    def block_get(mid: int, device: str, number: int) -> bytes:
        # Block2: block number, M=0, size exponent 6 (1024 bytes). A token of
        # its own: the observation's token would replace the observation.
        block2 = (23, bytes([number << 4 | 6]))
        return coap_request(mid, [*commands_path(device), block2], code=1, token=b"\xb1")

    async with raw_device(adapter) as taker, raw_device(adapter, "127.0.0.2") as other:
        taker.transport.sendto(observe_get(0x400, "cam-9"))
        await taker.next()
        cmd, _ = await gw.commands.submit("cam-9", "load", {"blob": "q" * 4000})
        mtype, _code, mid, _opts, first = await taker.next()
        assert mtype == CON
        taker.transport.sendto(empty_reply(mid))
        # Another address cannot read the rest of the command: 4.08.
        other.transport.sendto(block_get(0x500, "cam-9", 1))
        assert (await other.next())[:3] == (ACK, 0x88, 0x500)
        body, number = first, 1
        while True:
            taker.transport.sendto(block_get(0x410 + number, "cam-9", number))
            mtype, code, _mid, opts, chunk = await taker.next()
            assert (mtype, code) == (ACK, 0x45)
            block2 = int.from_bytes(opts[23][0], "big")
            assert block2 >> 4 == number
            body += chunk
            if not block2 & 0x08:
                break
            number += 1
        assert json.loads(body)["params"] == {"blob": "q" * 4000}
        await state_becomes(gw, cmd, CommandState.DELIVERED)
        # Past the end: nothing more to read.
        taker.transport.sendto(block_get(0x4FF, "cam-9", 9))
        assert (await taker.next())[1] == 0x88
