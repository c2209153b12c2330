"""The durable command queue: states, order, limits and restarts.

The downlink here is a test double standing for a device's protocol (the
MQTT path with real clients is in test_mqtt_commands.py): it records what it
was handed and lets the test decide when the device is reachable, when the
transport confirms, and what the device answers.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edgeway.commands.model import Command, CommandResult, CommandState
from edgeway.commands.service import CommandError, CommandService
from edgeway.config import CommandsSection
from edgeway.downlink import DeliveryError
from edgeway.reading import Reading


class FakeDevices:
    """Devices behind a downlink: reachable or not; confirm at once or on demand."""

    name = "fake"

    def __init__(self, *, auto_ack: bool = True) -> None:
        self.online: set[str] = set()
        self.sent: list[Command] = []
        self.payloads: list[dict[str, Any]] = []
        self.auto_ack = auto_ack
        self.pending: dict[str, asyncio.Future[bool]] = {}
        self.fail_names: set[str] = set()
        self.got = asyncio.Event()

    def reachable(self, command: Command) -> bool:
        return command.device_id in self.online

    def deliver(self, command: Command) -> asyncio.Future[bool]:
        if command.name in self.fail_names:
            raise DeliveryError("no such point")
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.sent.append(command)
        self.payloads.append(command.device_payload())
        self.got.set()
        if self.auto_ack:
            fut.set_result(True)
        else:
            self.pending[command.id] = fut
        return fut


def config(**kw: Any) -> CommandsSection:
    return CommandsSection(**kw)


async def until(cond: Any, within: float = 5.0) -> None:
    """Wait (bounded) until ``cond()`` is true, yielding to the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def service(tmp_path: Path) -> Any:
    emitted: list[Reading] = []

    def emit(readings: Any) -> None:
        emitted.extend(readings)

    svc = CommandService(tmp_path, config(), emit=emit)
    svc.emitted = emitted  # type: ignore[attr-defined]
    await svc.open()
    yield svc
    await svc.close()


async def test_queued_means_on_disk(tmp_path: Path) -> None:
    svc = CommandService(tmp_path, config())
    await svc.open()
    cmd, new = await svc.submit("pump-1", "stop", {"reason": "overheat"})
    assert new and cmd.state is CommandState.QUEUED
    # Read the file from another connection before anything else happens.
    conn = sqlite3.connect(tmp_path / "commands.db")
    row = conn.execute("SELECT device_id, name, state FROM commands WHERE id = ?", (cmd.id,))
    assert row.fetchone() == ("pump-1", "stop", "queued")
    conn.close()
    await svc.close()


async def test_success_path_and_uplink_records(service: Any) -> None:
    devices = FakeDevices()
    service.add_downlink(devices)
    devices.online.add("pump-1")
    cmd, _ = await service.submit("pump-1", "stop")
    await until(lambda: cmd.state is CommandState.DELIVERED)
    assert devices.payloads[0] == {
        "id": cmd.id,
        "name": "stop",
        "params": {},
        "expires_at": cmd.expires_at,
    }
    assert service.report(CommandResult(cmd.id, "pump-1", True, {"rpm": 0}))
    done = await service.wait(cmd.id, 5)
    assert done.state is CommandState.SUCCEEDED and done.result == {"rpm": 0}
    states = [r.metrics["state"] for r in service.emitted]
    assert states == ["queued", "sent", "delivered", "succeeded"]
    assert all(r.tags == {"record_type": "command"} and r.priority == 1 for r in service.emitted)
    # The finished command is still there after it left memory's active set.
    again = await service.get(cmd.id)
    assert again is not None and again.state is CommandState.SUCCEEDED


async def test_offline_device_gets_its_commands_in_order(service: Any) -> None:
    devices = FakeDevices()
    service.add_downlink(devices)
    ids = [(await service.submit("valve-7", f"step{i}"))[0].id for i in range(20)]
    await asyncio.sleep(0.1)
    assert devices.sent == []
    devices.online.add("valve-7")
    service.device_reachable("valve-7")
    await until(lambda: len(devices.sent) == 20)
    assert [c.id for c in devices.sent] == ids


async def test_one_at_a_time_until_transport_confirms(service: Any) -> None:
    devices = FakeDevices(auto_ack=False)
    service.add_downlink(devices)
    devices.online.add("d1")
    a, _ = await service.submit("d1", "a")
    b, _ = await service.submit("d1", "b")
    await until(lambda: len(devices.sent) == 1)
    await asyncio.sleep(0.05)
    assert [c.id for c in devices.sent] == [a.id]  # b waits for a's confirmation
    devices.pending[a.id].set_result(True)
    await until(lambda: len(devices.sent) == 2)
    assert devices.sent[1].id == b.id


class OrderedDevices(FakeDevices):
    """A transport that keeps a device's commands in order (as MQTT does)."""

    ordered = True


async def queued_on_ordered(service: Any, n: int) -> tuple[OrderedDevices, list[Command]]:
    """Device d1 online behind an ordered transport that confirms on demand,
    and ``n`` commands queued for it."""
    devices = OrderedDevices(auto_ack=False)
    service.add_downlink(devices)
    devices.online.add("d1")
    return devices, [(await service.submit("d1", f"c{i}"))[0] for i in range(n)]


async def test_ordered_transport_takes_the_next_before_the_first_is_confirmed(
    service: Any,
) -> None:
    from edgeway.commands.service import ORDERED_IN_FLIGHT

    devices, cmds = await queued_on_ordered(service, ORDERED_IN_FLIGHT + 4)
    await until(lambda: len(devices.sent) == ORDERED_IN_FLIGHT)
    await asyncio.sleep(0.05)
    # A window of them in flight, in order; the rest wait for room.
    assert [c.id for c in devices.sent] == [c.id for c in cmds[:ORDERED_IN_FLIGHT]]
    devices.pending[cmds[0].id].set_result(True)
    await until(lambda: len(devices.sent) == ORDERED_IN_FLIGHT + 1)
    assert devices.sent[-1].id == cmds[ORDERED_IN_FLIGHT].id
    for c in cmds[1:]:
        await until(lambda c=c: c.id in devices.pending)
        devices.pending[c.id].set_result(True)
    await until(lambda: all(c.state is CommandState.DELIVERED for c in cmds))
    assert [c.id for c in devices.sent] == [c.id for c in cmds]  # each once, in order


async def test_rule_command_does_not_wait_behind_an_unconfirmed_one(service: Any) -> None:
    """A journaled command (a rule's) is handed over in the call that queues
    it even while the device's previous command awaits its confirmation, on
    an ordered transport (queued in the same turn as the first, or once the
    device's dispatch waits for that confirmation); on another it waits its
    turn."""
    cases = [(c, o, s) for c, o in ((OrderedDevices, True), (FakeDevices, False)) for s in (0, 1)]
    for k, (cls, at_once, settle) in enumerate(cases):
        devices = cls(auto_ack=False)
        service.downlinks.clear()
        service.add_downlink(devices)
        dev = f"d{k}"
        devices.online.add(dev)
        first, second = f"a{k}", f"b{k}"
        kw = {"ttl": None, "source": "rule:r"}
        a, _ = service.submit_journaled(dev, "a", {}, idempotency_key="ka", command_id=first, **kw)
        assert [c.id for c in devices.sent] == [first]
        if settle:  # the device's dispatch now waits for the first's confirmation
            await asyncio.sleep(0.05)
        b, _ = service.submit_journaled(dev, "b", {}, idempotency_key="kb", command_id=second, **kw)
        assert [c.id for c in devices.sent] == ([first, second] if at_once else [first])
        devices.pending[first].set_result(True)
        await until(lambda devices=devices: len(devices.sent) == 2)
        assert [c.id for c in devices.sent] == [first, second]
        devices.pending[second].set_result(True)
        await until(lambda a=a, b=b: a.state is b.state is CommandState.DELIVERED)


async def test_ordered_transport_gone_with_several_in_flight_redelivers_in_order(
    service: Any,
) -> None:
    devices, cmds = await queued_on_ordered(service, 3)
    await until(lambda: len(devices.sent) == 3)
    devices.online.discard("d1")
    devices.pending.pop(cmds[0].id).set_result(True)  # the first got through
    for c in cmds[1:]:
        devices.pending.pop(c.id).set_result(False)  # then the connection ended
    await until(lambda: cmds[0].state is CommandState.DELIVERED)
    await asyncio.sleep(0.05)
    assert [c.state for c in cmds[1:]] == [CommandState.SENT] * 2
    devices.online.add("d1")
    devices.auto_ack = True
    service.device_reachable("d1")
    await until(lambda: all(c.state is CommandState.DELIVERED for c in cmds))
    assert [c.id for c in devices.sent] == [c.id for c in cmds] + [c.id for c in cmds[1:]]
    assert [p.get("redelivery", False) for p in devices.payloads[3:]] == [True, True]


async def test_device_gone_before_confirmation_gets_a_redelivery(service: Any) -> None:
    devices = FakeDevices(auto_ack=False)
    service.add_downlink(devices)
    devices.online.add("d1")
    cmd, _ = await service.submit("d1", "reboot")
    await until(lambda: len(devices.sent) == 1)
    devices.online.discard("d1")
    devices.pending.pop(cmd.id).set_result(False)  # the connection ended
    await asyncio.sleep(0.05)
    assert cmd.state is CommandState.SENT
    devices.online.add("d1")
    devices.auto_ack = True
    service.device_reachable("d1")
    await until(lambda: cmd.state is CommandState.DELIVERED)
    assert len(devices.sent) == 2
    assert devices.payloads[1]["redelivery"] is True and devices.payloads[1]["id"] == cmd.id
    assert "redelivery" not in devices.payloads[0]


async def test_idempotency_key_returns_the_existing_command(service: Any) -> None:
    first, new1 = await service.submit("d1", "open", idempotency_key="k-1")
    second, new2 = await service.submit("d1", "open", idempotency_key="k-1")
    assert new1 and not new2 and second.id == first.id
    # Concurrent submits with one key: one command.
    results = await asyncio.gather(
        *(service.submit("d2", "open", idempotency_key="k-2") for _ in range(10))
    )
    assert len({c.id for c, _ in results}) == 1
    assert sum(1 for _, new in results if new) == 1
    # Another device may use the same key.
    other, new3 = await service.submit("d3", "open", idempotency_key="k-1")
    assert new3 and other.id != first.id
    # Still the same command once it finished.
    await service.cancel(first.id)
    third, new4 = await service.submit("d1", "open", idempotency_key="k-1")
    assert not new4 and third.id == first.id


async def test_full_queue_refuses_and_counts(tmp_path: Path) -> None:
    svc = CommandService(tmp_path, config(max_per_device=3))
    await svc.open()
    for i in range(3):
        await svc.submit("d1", f"c{i}")
    with pytest.raises(CommandError) as e:
        await svc.submit("d1", "c3")
    assert e.value.code == "queue_full"
    assert svc.stats.refused_full == 1
    await svc.submit("d2", "c0")  # other devices are not affected
    await svc.close()


@pytest.mark.parametrize(
    ("device", "name", "params", "ttl"),
    [
        ("", "x", {}, None),
        ("a/b", "x", {}, None),
        ("d", "has space", {}, None),
        ("d", "x/y", {}, None),
        ("d", "x", [1, 2], None),
        ("d", "x", {"big": "y" * 70_000}, None),
        ("d", "x", {}, 0.0),
        ("d", "x", {}, 10 * 86400.0),
    ],
)
async def test_invalid_commands_are_refused(
    service: Any, device: str, name: str, params: Any, ttl: float | None
) -> None:
    with pytest.raises(CommandError) as e:
        await service.submit(device, name, params, ttl=ttl)
    assert e.value.code == "invalid"
    assert service.stats.refused_invalid == 1


async def test_ttl_expires_undelivered_commands(service: Any) -> None:
    cmd, _ = await service.submit("nobody", "ping", ttl=0.3)
    done = await service.wait(cmd.id, 3)
    assert done.state is CommandState.EXPIRED
    assert service.stats.expired == 1


async def test_result_timeout(service: Any) -> None:
    devices = FakeDevices()
    service.add_downlink(devices)
    devices.online.add("d1")
    cmd, _ = await service.submit("d1", "calibrate", result_timeout=0.3)
    done = await service.wait(cmd.id, 3)
    assert done.state is CommandState.TIMED_OUT
    # A late answer changes nothing and is counted.
    assert not service.report(CommandResult(cmd.id, "d1", True))
    assert service.stats.results_unmatched == 1
    assert (await service.get(cmd.id)).state is CommandState.TIMED_OUT  # type: ignore[union-attr]


async def test_result_from_another_device_is_refused(service: Any) -> None:
    devices = FakeDevices()
    service.add_downlink(devices)
    devices.online.add("d1")
    cmd, _ = await service.submit("d1", "open")
    await until(lambda: cmd.state is CommandState.DELIVERED)
    assert not service.report(CommandResult(cmd.id, "d2", True))
    assert cmd.state is CommandState.DELIVERED


async def test_delivery_error_fails_the_command(service: Any) -> None:
    devices = FakeDevices()
    devices.fail_names.add("bogus")
    service.add_downlink(devices)
    devices.online.add("d1")
    bad, _ = await service.submit("d1", "bogus")
    good, _ = await service.submit("d1", "fine")
    assert (await service.wait(bad.id, 3)).state is CommandState.FAILED
    assert bad.error == "no such point"
    await until(lambda: good.state is CommandState.DELIVERED)


async def test_cancel(service: Any) -> None:
    cmd, _ = await service.submit("d1", "open")
    out = await service.cancel(cmd.id)
    assert out.state is CommandState.CANCELLED
    with pytest.raises(CommandError):
        await service.cancel("no-such-id")


async def test_restart_keeps_queued_and_redelivers_sent(tmp_path: Path) -> None:
    svc = CommandService(tmp_path, config())
    await svc.open()
    devices = FakeDevices(auto_ack=False)
    svc.add_downlink(devices)
    devices.online.add("d1")
    sent, _ = await svc.submit("d1", "first")
    queued, _ = await svc.submit("d1", "second")
    await until(lambda: len(devices.sent) == 1)
    await svc.close()  # as if the process ended with "first" SENT

    svc2 = CommandService(tmp_path, config())
    await svc2.open()
    assert svc2.stats.active == 2
    devices2 = FakeDevices()
    devices2.online.add("d1")
    svc2.add_downlink(devices2)
    await until(lambda: len(devices2.sent) == 2)
    assert [c.id for c in devices2.sent] == [sent.id, queued.id]
    assert devices2.payloads[0]["redelivery"] is True
    assert "redelivery" not in devices2.payloads[1]
    await svc2.close()


async def test_list_filters_and_pages(service: Any) -> None:
    for i in range(5):
        await service.submit("a", f"c{i}")
    for i in range(3):
        await service.submit("b", f"c{i}")
    assert len(await service.list(device_id="a")) == 5
    page1 = await service.list(limit=4)
    page2 = await service.list(limit=4, before_seq=page1[-1].seq)
    assert len(page1) == 4 and len(page2) == 4
    assert {c.id for c in page1}.isdisjoint({c.id for c in page2})
    assert len(await service.list(state="queued")) == 8
