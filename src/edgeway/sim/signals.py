"""Signals that look like real sensors: noise, drift, daily cycles, faults, counters, bursts.

Example (what ``edgeway simulate`` builds for each device)::

    rng = random.Random(7)
    env = EnvironmentSignal.random(rng)          # temperature, humidity, battery
    machine = MachineSignal.random(rng, fault=True)  # vibration, current, bearing temp
    meter = MeterSignal.random(rng)              # energy and parts counters
    env.sample(time.time())  # {"temperature": 21.43, "humidity": 48.1, "battery": 3.69}

Every signal is a pure function of time plus its own random generator (seeded,
so a run can be repeated); nothing here does I/O. Values are rounded to the
resolution a real sensor would report, which also keeps payloads short.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from edgeway.reading import MetricValue

DAY = 86_400.0
"""Seconds in a day: the period of the daily cycle unless a demo compresses it."""


@dataclass(slots=True)
class EnvironmentSignal:
    """A room or outdoor sensor: temperature and humidity with a daily cycle,
    a slow drift (a sensor ageing, a building warming) and Gaussian noise;
    humidity moves against temperature, as relative humidity does; the
    battery voltage sags slowly."""

    rng: random.Random
    base_temp: float = 21.0
    daily_amplitude: float = 3.0
    drift_per_hour: float = 0.05
    noise: float = 0.15
    base_humidity: float = 45.0
    day_length: float = DAY
    t0: float = 0.0
    battery: float = 3.7

    @classmethod
    def random(cls, rng: random.Random, *, day_length: float = DAY) -> EnvironmentSignal:
        """A sensor with its own base values, so devices differ from each other."""
        return cls(
            rng=rng,
            base_temp=rng.uniform(17.0, 26.0),
            daily_amplitude=rng.uniform(1.0, 5.0),
            drift_per_hour=rng.uniform(-0.1, 0.1),
            noise=rng.uniform(0.05, 0.3),
            base_humidity=rng.uniform(35.0, 60.0),
            day_length=day_length,
            battery=rng.uniform(3.5, 3.9),
        )

    def sample(self, now: float) -> dict[str, MetricValue]:
        """Metrics at wall-clock time ``now`` (epoch seconds)."""
        if not self.t0:
            self.t0 = now
        # Warmest mid-afternoon: phase shifted so the peak falls at 15:00 of the cycle.
        phase = 2 * math.pi * ((now % self.day_length) / self.day_length - 0.375)
        cycle = math.sin(phase)
        drift = self.drift_per_hour * (now - self.t0) / 3600.0
        temp = self.base_temp + self.daily_amplitude * cycle + drift + self.rng.gauss(0, self.noise)
        humidity = self.base_humidity - 2.5 * self.daily_amplitude * cycle + self.rng.gauss(0, 0.8)
        # A coin cell loses a few mV a day; a little noise from the ADC.
        self.battery = max(2.8, self.battery - self.rng.uniform(0, 2e-6))
        return {
            "temperature": round(temp, 2),
            "humidity": round(min(100.0, max(0.0, humidity)), 1),
            "battery": round(self.battery + self.rng.gauss(0, 0.005), 3),
        }


@dataclass(slots=True)
class MachineSignal:
    """A rotating machine (pump, fan, spindle): vibration RMS, motor current,
    bearing temperature and speed, with the load changing every few minutes.

    With ``fault_start`` set, a bearing fault develops from that moment over
    ``fault_duration`` seconds: vibration, bearing temperature and current rise
    slowly (quadratically), the way a wearing bearing does, so that rules and
    models have a trend to find long before anything breaks.
    """

    rng: random.Random
    rated_current: float = 12.0
    rated_rpm: float = 1480.0
    base_vibration: float = 1.8
    ambient: float = 24.0
    fault_start: float | None = None
    fault_duration: float = 1800.0
    load: float = 0.7
    next_load_change: float = 0.0
    running: bool = True
    halted: bool = False
    """Stopped from outside (a write of ``running``) until started again."""

    @classmethod
    def random(cls, rng: random.Random, *, fault: bool = False, now: float = 0.0) -> MachineSignal:
        """A machine with its own ratings; ``fault`` starts a fault soon after ``now``."""
        return cls(
            rng=rng,
            rated_current=rng.uniform(6.0, 30.0),
            rated_rpm=rng.choice([960.0, 1480.0, 2950.0]),
            base_vibration=rng.uniform(1.0, 2.8),
            ambient=rng.uniform(18.0, 30.0),
            fault_start=(now + rng.uniform(0, 120.0)) if fault else None,
            fault_duration=rng.uniform(600.0, 3600.0),
            load=rng.uniform(0.4, 1.0),
        )

    def fault_severity(self, now: float) -> float:
        """0 (healthy) to 1 (about to fail)."""
        if self.fault_start is None or now <= self.fault_start:
            return 0.0
        return min(1.0, ((now - self.fault_start) / self.fault_duration) ** 2)

    def set_running(self, on: bool) -> None:
        """Start or stop the machine, as an operator's write does: a stopped
        machine stays stopped until started again."""
        self.halted = not on
        if on:
            self.running = True

    def sample(self, now: float) -> dict[str, MetricValue]:
        """Metrics at ``now``; the load steps to a new level every 1-5 minutes."""
        if now >= self.next_load_change:
            self.load = min(1.1, max(0.2, self.load + self.rng.gauss(0, 0.15)))
            self.next_load_change = now + self.rng.uniform(60.0, 300.0)
            # A machine is stopped now and then (a shift change, a batch done).
            self.running = self.rng.random() > 0.05
        if self.halted or not self.running:
            return {
                "running": False,
                "rpm": 0,
                "current": round(abs(self.rng.gauss(0, 0.05)), 2),
                "vibration": round(abs(self.rng.gauss(0, 0.05)), 2),
                "bearing_temp": round(self.ambient + self.rng.gauss(0, 0.2), 1),
            }
        s = self.fault_severity(now)
        current = self.rated_current * (0.3 + 0.7 * self.load) * (1 + 0.12 * s)
        vibration = self.base_vibration * (0.8 + 0.4 * self.load) + 9.0 * s
        bearing = self.ambient + 15.0 + 20.0 * self.load + 30.0 * s
        return {
            "running": True,
            "rpm": round(self.rated_rpm * (1 - 0.02 * self.load) + self.rng.gauss(0, 2)),
            "current": round(current + self.rng.gauss(0, 0.08 * self.rated_current / 10), 2),
            "vibration": round(max(0.0, vibration + self.rng.gauss(0, 0.15 + 0.5 * s)), 2),
            "bearing_temp": round(bearing + self.rng.gauss(0, 0.3), 1),
        }


@dataclass(slots=True)
class MeterSignal:
    """An energy meter and a parts counter: monotonic counters (what a cloud
    differentiates into rates) and the instantaneous power they come from.
    The energy counter wraps at 2**32 Wh, as 32-bit meter registers do."""

    rng: random.Random
    power_w: float = 2000.0
    energy_wh: float = 0.0
    parts: int = 0
    parts_per_hour: float = 600.0
    last: float = 0.0

    @classmethod
    def random(cls, rng: random.Random) -> MeterSignal:
        """A meter part-way through its life (counters do not start at zero)."""
        return cls(
            rng=rng,
            power_w=rng.uniform(500.0, 15_000.0),
            energy_wh=rng.uniform(0, 5e7),
            parts=rng.randrange(0, 1_000_000),
            parts_per_hour=rng.uniform(60.0, 3600.0),
        )

    def preset_parts(self, value: int) -> None:
        """Set the parts counter (a reset to 0 at a shift change, as a write does)."""
        self.parts = value

    def sample(self, now: float) -> dict[str, MetricValue]:
        """Counters advanced by the time elapsed since the previous sample."""
        dt = 0.0 if not self.last else max(0.0, now - self.last)
        self.last = now
        power = max(0.0, self.power_w * (1 + self.rng.gauss(0, 0.05)))
        self.energy_wh = (self.energy_wh + power * dt / 3600.0) % 2**32
        # Parts arrive as a Poisson process; approximate per interval.
        expected = self.parts_per_hour * dt / 3600.0
        self.parts += int(expected) + (1 if self.rng.random() < expected % 1 else 0)
        return {
            "power": round(power, 1),
            "energy_wh": int(self.energy_wh),
            "parts": self.parts,
        }


@dataclass(slots=True)
class Bursts:
    """Occasional bursts: a device that suddenly sends ``factor`` times faster
    for a few seconds (an alarm flurry, a reconnect flushing a buffer).

    ``per_hour`` is how many bursts a device has per hour on average.
    """

    rng: random.Random
    per_hour: float = 2.0
    factor: float = 10.0
    min_seconds: float = 2.0
    max_seconds: float = 8.0
    until: float = 0.0
    last_check: float = field(default=0.0)

    def rate_factor(self, now: float) -> float:
        """How many times the normal rate the device sends at ``now``."""
        if now < self.until:
            return self.factor
        dt = now - self.last_check if self.last_check else 0.0
        self.last_check = now
        if self.per_hour > 0 and self.rng.random() < self.per_hour * dt / 3600.0:
            self.until = now + self.rng.uniform(self.min_seconds, self.max_seconds)
            return self.factor
        return 1.0
