"""The broker's own clock for session expiry, delayed wills and message expiry (sans-IO).

Configuration::

    mqtt:
      limits:
        max_session_expiry: 7d
        session_downtime_credit: 0s   # how much of a stop across a reboot counts

Session expiry, will delay and message expiry are durations ("300 s after
the client went away"). Measured on the wall clock, a forward jump (NTP correcting a board
without a real-time clock by years) would expire every session at once, and a
backward one would keep them forever. So the broker measures them on its own
clock: :meth:`BrokerClock.now` advances with the monotonic clock while the
process runs, and is saved (:class:`ClockStamp`, with the wall clock, the boot
id and the time since boot) every autosave and at stop. At the next start it
resumes from the saved value plus the downtime:

- the same boot (edgeway restarted, the machine did not): the time since boot
  (``CLOCK_BOOTTIME``) tells the downtime exactly, whatever the wall clock did;
- after a reboot only the wall clock spans the stop, and a board without a
  real-time clock cannot tell a long stop from a clock correction of years:
  the wall-clock gap counts only between 0 and ``session_downtime_credit``
  (default 0: sessions do not age while the gateway is off).

A broker database from before this clock stored wall-clock times; the clock
of a database without a saved stamp starts at the wall clock, so those times
remain comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(slots=True, frozen=True)
class BootTime:
    """Which boot this is, and seconds since it (suspend included)."""

    boot_id: str
    since_boot: float


def read_boot_time() -> BootTime | None:
    """The kernel's boot id and ``CLOCK_BOOTTIME`` (Linux); None elsewhere."""
    try:
        boot_id = _BOOT_ID.read_text().strip()
        return BootTime(boot_id, time.clock_gettime(time.CLOCK_BOOTTIME))
    except (OSError, AttributeError):
        return None


@dataclass(slots=True, frozen=True)
class ClockStamp:
    """The broker clock as saved, with what lets the next start measure the stop."""

    clock: float
    wall: float
    boot: BootTime | None


class BrokerClock:
    """Seconds on the broker's clock; see the module docstring. The clocks it
    reads are parameters, so tests can jump the wall clock or reboot."""

    __slots__ = ("_base", "_boot", "_mono0", "_monotonic", "_wall", "credited")

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        boot: Callable[[], BootTime | None] = read_boot_time,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._boot = boot
        self._mono0 = monotonic()
        self._base = wall()
        self.credited = 0.0
        """Downtime counted when the clock resumed (for the start-up log line)."""

    def resume(self, saved: ClockStamp | None, downtime_credit: float) -> None:
        """Continue from ``saved`` (None: a new database; start at the wall clock)."""
        self._mono0 = self._monotonic()
        if saved is None:
            self._base = self._wall()
            self.credited = 0.0
            return
        boot = self._boot()
        if boot is not None and saved.boot is not None and boot.boot_id == saved.boot.boot_id:
            down = boot.since_boot - saved.boot.since_boot
        else:
            down = min(self._wall() - saved.wall, downtime_credit)
        self.credited = max(0.0, down)
        self._base = saved.clock + self.credited

    def now(self) -> float:
        """Seconds on the broker clock (never jumps)."""
        return self._base + (self._monotonic() - self._mono0)

    def stamp(self) -> ClockStamp:
        return ClockStamp(self.now(), self._wall(), self._boot())
