"""Signals, devices, buffers and commands of the simulator (no I/O)."""

from __future__ import annotations

import random
import statistics

import orjson

from edgeway.sim.devices import BUFFER_MAX, OutgoingBuffer, make_devices
from edgeway.sim.signals import Bursts, EnvironmentSignal, MachineSignal, MeterSignal

T0 = 1_790_000_000.0


def test_environment_has_a_daily_cycle_with_noise() -> None:
    sig = EnvironmentSignal(
        random.Random(1),
        base_temp=20.0,
        daily_amplitude=4.0,
        noise=0.1,
        drift_per_hour=0.0,
        day_length=1000.0,
    )
    temps = [float(sig.sample(T0 + t)["temperature"]) for t in range(0, 1000, 5)]
    assert max(temps) - min(temps) > 7.0  # ~2 x amplitude
    assert 15.0 < statistics.mean(temps) < 25.0
    # Noise: consecutive samples are not identical.
    assert len(set(temps)) > len(temps) // 2
    hums = [float(sig.sample(T0 + t)["humidity"]) for t in range(0, 1000, 5)]
    assert all(0.0 <= h <= 100.0 for h in hums)


def test_environment_drifts() -> None:
    sig = EnvironmentSignal(random.Random(2), daily_amplitude=0.0, noise=0.0, drift_per_hour=1.0)
    first = float(sig.sample(T0)["temperature"])
    later = float(sig.sample(T0 + 10 * 3600)["temperature"])
    assert abs(later - first - 10.0) < 0.01


def test_machine_fault_develops_slowly() -> None:
    rng = random.Random(3)
    healthy = MachineSignal(random.Random(3), fault_start=None)
    faulty = MachineSignal(rng, fault_start=T0, fault_duration=1000.0)
    assert faulty.fault_severity(T0) == 0.0
    assert 0.2 < faulty.fault_severity(T0 + 500) < 0.3  # quadratic growth
    assert faulty.fault_severity(T0 + 5000) == 1.0
    for m in (healthy, faulty):
        m.running = True
        m.next_load_change = float("inf")  # hold the load still to compare
        m.load = 0.7
    h = healthy.sample(T0 + 1000)
    f = faulty.sample(T0 + 1000)
    assert float(f["vibration"]) > float(h["vibration"]) + 5.0
    assert float(f["bearing_temp"]) > float(h["bearing_temp"]) + 20.0
    assert set(h) == {"running", "rpm", "current", "vibration", "bearing_temp"}


def test_meter_counters_only_go_up() -> None:
    sig = MeterSignal(random.Random(4), parts_per_hour=3600.0)
    values = [sig.sample(T0 + t) for t in range(0, 600, 10)]
    energy = [int(v["energy_wh"]) for v in values]
    parts = [int(v["parts"]) for v in values]
    assert energy == sorted(energy) and energy[-1] > energy[0]
    assert parts == sorted(parts) and 500 < parts[-1] - parts[0] < 700


def test_bursts_happen_and_end() -> None:
    b = Bursts(random.Random(5), per_hour=3600.0, factor=10.0, min_seconds=2, max_seconds=2)
    factors = [b.rate_factor(T0 + t * 0.5) for t in range(200)]
    assert 10.0 in factors and 1.0 in factors


def test_make_devices_is_reproducible_and_mixed() -> None:
    a = make_devices(8, prefix="x", seed=42, fault_fraction=1.0)
    b = make_devices(8, prefix="x", seed=42, fault_fraction=1.0)
    assert [d.device_id for d in a] == [f"x-{i:04d}" for i in range(8)]
    assert {d.kind for d in a} == {"env", "machine", "meter"}
    assert [d.signal.sample(T0) for d in a] == [d.signal.sample(T0) for d in b]
    machines = [d for d in a if d.kind == "machine"]
    assert all(isinstance(m.signal, MachineSignal) and m.signal.fault_start for m in machines)


def test_messages_carry_seq_and_msg_id_and_stay_buffered() -> None:
    dev = make_devices(1, prefix="d", seed=1)[0]
    ids = [dev.next_message(T0 + i)[0] for i in range(3)]
    assert ids == ["d-0000-1", "d-0000-2", "d-0000-3"]
    body = orjson.loads(dev.buffer.items["d-0000-2"].payload)
    assert body["seq"] == 2 and body["msg_id"] == "d-0000-2" and body["ts"] == T0 + 1
    assert "temperature" in body
    assert dev.buffer.confirm(["d-0000-1", "d-0000-3", "unknown"]) == 2
    assert dev.buffer.seqs() == {2}


def test_buffer_drops_oldest_when_full_and_counts() -> None:
    buf = OutgoingBuffer(limit=3)
    for i in range(5):
        buf.add(f"m{i}", i, b"x")
    assert list(buf.items) == ["m2", "m3", "m4"] and buf.dropped == 2
    buf.mark_sent("m2")
    assert [k for k, _ in buf.unsent()] == ["m3", "m4"]
    buf.mark_unsent("m2")
    assert [k for k, _ in buf.unsent()] == ["m2", "m3", "m4"]
    assert OutgoingBuffer().limit == BUFFER_MAX


def test_commands() -> None:
    dev = make_devices(3, prefix="c", seed=1, kinds=("machine",), fault_fraction=1.0)[0]
    ok = orjson.loads(dev.handle_command(b'{"id": "1", "name": "ping"}', T0))
    assert ok == {"id": "1", "status": "ok", "result": {"pong": T0}}
    ok = orjson.loads(
        dev.handle_command(b'{"id": 2, "name": "set_rate", "params": {"rate": 4}}', T0)
    )
    assert ok["status"] == "ok" and dev.rate == 4.0
    bad = orjson.loads(
        dev.handle_command(b'{"id": 3, "name": "set_rate", "params": {"rate": -1}}', T0)
    )
    assert bad["status"] == "error" and dev.rate == 4.0
    ok = orjson.loads(dev.handle_command(b'{"id": 4, "name": "reset_fault"}', T0))
    assert ok["status"] == "ok" and isinstance(dev.signal, MachineSignal)
    assert dev.signal.fault_start is None
    state = orjson.loads(dev.handle_command(b'{"id": 5, "name": "get_state"}', T0))
    assert state["result"]["kind"] == "machine"
    assert orjson.loads(dev.handle_command(b'{"id": 6, "name": "fly"}', T0))["status"] == "error"
    assert orjson.loads(dev.handle_command(b"not json", T0))["status"] == "error"
    assert dev.commands_answered == 4
