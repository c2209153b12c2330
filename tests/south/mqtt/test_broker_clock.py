"""Session expiry and will delay run on the broker's own clock: a wall-clock
jump neither expires everything at once nor keeps it forever, within a run or
across a restart; and time a client is held by back-pressure is not idleness."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mqtt_harness import HandIngest, RawClient, running_broker, wait_until

from edgeway.config import MqttLimits, MqttSection
from edgeway.ingest import IngestStatus
from edgeway.south.mqtt.clock import BootTime, BrokerClock
from edgeway.south.mqtt.packets import Properties, PubAck, Publish, Will

YEARS_10 = 10 * 365 * 86400.0


@dataclass
class Clocks:
    """The clocks a machine has, moved by hand."""

    mono: float = 1000.0
    wall: float = 1.8e9
    boot: BootTime = field(default_factory=lambda: BootTime("boot-1", 500.0))

    def run(self, seconds: float) -> None:
        """Time passes normally."""
        self.mono += seconds
        self.wall += seconds
        self.boot = BootTime(self.boot.boot_id, self.boot.since_boot + seconds)

    def broker_clock(self) -> BrokerClock:
        return BrokerClock(
            monotonic=lambda: self.mono, wall=lambda: self.wall, boot=lambda: self.boot
        )


async def _leave_with_will(port: int, expiry: int, will_delay: int) -> None:
    props = Properties(session_expiry_interval=expiry)
    will = Will("will/dev", b"gone", 1, False, Properties(will_delay_interval=will_delay))
    c, _ = await RawClient.connect(port, "dev", clean=False, properties=props, will=will)
    c.abort()


async def test_wall_clock_jump_during_a_run_expires_nothing(tmp_path: Path) -> None:
    clocks = Clocks()
    async with running_broker(tmp_path, clock=clocks.broker_clock()) as rb:
        watcher, _ = await RawClient.connect(rb.port, "watcher")
        await watcher.subscribe("will/#", qos=1)
        await _leave_with_will(rb.port, expiry=60, will_delay=30)
        await wait_until(lambda: rb.broker.sessions["dev"].conn is None)
        clocks.wall += YEARS_10  # NTP corrects a board that booted in 2016
        rb.broker.expire_sessions()
        assert "dev" in rb.broker.sessions
        await watcher.nothing(0.2)
        clocks.wall -= 2 * YEARS_10  # and back past where it was
        clocks.mono += 31  # the will delay (30 s) passes
        rb.broker.expire_sessions()
        assert (await watcher.receive_publish()).payload == b"gone"
        assert "dev" in rb.broker.sessions
        clocks.mono += 30  # the session expiry (60 s) passes
        rb.broker.expire_sessions()
        assert "dev" not in rb.broker.sessions


async def test_system_clock_jump_does_not_expire_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the process's real clocks and ``time.time`` jumped 10
    years: the broker's own sweep must not expire the session. (Before, the
    sweep compared time.time() with the disconnect time and did.)"""
    async with running_broker(tmp_path) as rb:
        await _leave_with_will(rb.port, expiry=3600, will_delay=1800)
        await wait_until(lambda: rb.broker.sessions["dev"].conn is None)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + YEARS_10)
        await asyncio.sleep(1.2)  # two sweeps (0.5 s each); nothing may happen
        monkeypatch.setattr(time, "time", real)
        assert "dev" in rb.broker.sessions
        assert rb.broker.stats().flat().get("sessions_expired", 0) == 0
        assert rb.broker.stats().flat().get("wills_published", 0) == 0


async def _session_after_restart(
    tmp_path: Path, restart: Clocks, credit: float = 0.0
) -> float | None:
    """A session (expiry 3600 s) left 100 s before the broker stops; then a
    broker starts on ``restart``'s clocks. Returns the seconds it has left."""
    first = Clocks()
    async with running_broker(tmp_path, clock=first.broker_clock()) as rb:
        props = Properties(session_expiry_interval=3600)
        c, _ = await RawClient.connect(rb.port, "dev", clean=False, properties=props)
        await c.disconnect()
        await wait_until(lambda: rb.broker.sessions["dev"].conn is None)
        first.run(100)
    restart_cfg = MqttSection(limits=MqttLimits(session_downtime_credit=credit))
    async with running_broker(tmp_path, config=restart_cfg, clock=restart.broker_clock()) as rb:
        rb.broker.expire_sessions()
        s = rb.broker.sessions.get("dev")
        if s is None:
            return None
        assert s.disconnected_at is not None
        return s.expiry_interval - (rb.broker.clock.now() - s.disconnected_at)


async def test_restart_same_boot_counts_the_stop_exactly_whatever_the_wall_clock(
    tmp_path: Path,
) -> None:
    # edgeway restarted 10 s later (same boot); meanwhile NTP moved the wall clock 10 years.
    restart = Clocks(mono=5.0, wall=1.8e9 + 100 + 10 + YEARS_10, boot=BootTime("boot-1", 610.0))
    left = await _session_after_restart(tmp_path, restart)
    assert left == pytest.approx(3600 - 100 - 10)


@pytest.mark.parametrize(
    ("wall_gap", "credit", "left"),
    [
        (-YEARS_10, 0.0, 3500.0),  # rebooted without a real-time clock: back in 2016
        (YEARS_10, 0.0, 3500.0),  # rebooted, then corrected by years: not counted
        (3600.0, 0.0, 3500.0),  # a real hour off, but no credit configured
        (600.0, 7200.0, 2900.0),  # credit configured: the stop counts
        (3600.0, 7200.0, None),  # ... and can expire it
    ],
)
async def test_restart_after_reboot_counts_the_stop_up_to_the_credit(
    tmp_path: Path, wall_gap: float, credit: float, left: float | None
) -> None:
    restart = Clocks(mono=5.0, wall=1.8e9 + 100 + wall_gap, boot=BootTime("boot-2", 30.0))
    got = await _session_after_restart(tmp_path, restart, credit)
    assert got == (pytest.approx(left) if left is not None else None)


async def test_v311_client_held_by_backpressure_is_not_keepalive_expired(
    tmp_path: Path,
) -> None:
    """The outbox refuses a 3.1.1 client's PUBLISH: it is held and its socket
    not read for longer than 1.5 x its keep alive. It is alive (its PINGREQs
    wait unread in the socket): no keep-alive timeout, no will; once the
    outbox has room it is acknowledged."""
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        watcher, _ = await RawClient.connect(rb.port, "watcher")
        await watcher.subscribe("will/#", qos=1)
        c, _ = await RawClient.connect(
            rb.port, "dev", level=4, keepalive=1, will=Will("will/dev", b"dead", 1)
        )
        c.send(Publish("devices/dev/telemetry", b'{"v": 1}', 1, False, False, 1))
        await wait_until(lambda: len(ingest.submitted) == 1)
        ingest.saturated = True
        ingest.resolve(0, IngestStatus.REJECTED_FULL)
        # Held for 2.5 s, beyond 1.5 x keep alive plus a sweep.
        await watcher.nothing(2.5)
        assert rb.broker.stats().flat().get("keepalive_timeouts", 0) == 0
        ingest.saturated = False
        await wait_until(lambda: len(ingest.submitted) == 2)
        ingest.resolve(1)
        assert (await c.expect(PubAck)).packet_id == 1
        await c.disconnect()
        await watcher.nothing(0.2)


async def test_message_expiry_survives_a_wall_clock_jump(tmp_path: Path) -> None:
    """Message expiry intervals (retained and queued) run on the broker clock
    too: a 10-year jump expires neither; the real interval does."""
    clocks = Clocks()
    async with running_broker(tmp_path, clock=clocks.broker_clock()) as rb:
        props = Properties(session_expiry_interval=3600)
        sub, _ = await RawClient.connect(rb.port, "sub", clean=False, properties=props)
        await sub.subscribe("q/#", qos=1)
        await sub.disconnect()
        pub, _ = await RawClient.connect(rb.port, "pub")
        ttl = Properties(message_expiry_interval=60)
        await pub.publish("r/x", b"retained", qos=1, retain=True, properties=ttl)
        await pub.publish("q/x", b"queued", qos=1, properties=ttl)
        clocks.wall += YEARS_10
        clocks.mono += 10
        sub, _ = await RawClient.connect(rb.port, "sub", clean=False, properties=props)
        got = await sub.receive_publish()
        assert (got.payload, got.properties.message_expiry_interval) == (b"queued", 50)
        await sub.subscribe("r/#", qos=1)
        got = await sub.receive_publish()
        assert (got.payload, got.properties.message_expiry_interval) == (b"retained", 50)
        clocks.mono += 51
        late, _ = await RawClient.connect(rb.port, "late")
        await late.subscribe("r/#", qos=1)
        await late.nothing(0.2)  # expired by the broker clock


async def test_system_clock_jump_does_not_expire_retained_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the process's time.time jumped 10 years (before: every retained
    message with an expiry interval was gone)."""
    async with running_broker(tmp_path) as rb:
        pub, _ = await RawClient.connect(rb.port, "pub")
        ttl = Properties(message_expiry_interval=3600)
        await pub.publish("r/x", b"retained", qos=1, retain=True, properties=ttl)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + YEARS_10)
        sub, _ = await RawClient.connect(rb.port, "sub")
        await sub.subscribe("r/#", qos=1)
        got = await sub.receive_publish()
        monkeypatch.setattr(time, "time", real)
        assert got.payload == b"retained"
        assert 3590 <= (got.properties.message_expiry_interval or 0) <= 3600
