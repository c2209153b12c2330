"""The outbox's clock for record ages (``created``, ``max_age``).

Configuration::

    outbox:
      max_age: 7d
      max_age_downtime: 0     # how much of a stop counts towards max_age, at most

A board without a real-time clock starts with a wrong wall clock (1970, or the
time it was last shut down) until NTP corrects it, sometimes by years. Ages
measured on the wall clock would then jump, and ``max_age`` would expire the
whole backlog at once. So ages are measured on a clock of their own:

- within a run it advances with the monotonic clock, which no correction moves;
- it is stored with every commit, together with the wall clock at that commit;
  at start it resumes from the stored value, plus the time the wall clock says
  passed since, clamped to ``0 .. max_age_downtime`` (default 0: time while
  edgeway was stopped does not count, since nothing can tell a long stop from a
  clock correction; set it on hardware with a battery-backed clock).

The clock never goes backwards, so ``created`` still grows with the sequence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Resumed:
    """How the clock resumed at start (for the log line)."""

    wall_gap: float
    """Wall-clock seconds since the last commit of the previous run (negative:
    the wall clock is behind it)."""
    credited: float
    """Seconds of it counted towards ages."""


class AgeClock:
    """Seconds on the outbox's age scale: monotonic within a run, resumed at start."""

    __slots__ = ("_base", "_mono0", "_monotonic", "wall")

    def __init__(
        self,
        base: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._base = base
        self._monotonic = monotonic
        self._mono0 = monotonic()
        self.wall = wall
        """The wall clock (stored beside the age clock; shown to people)."""

    def now(self) -> float:
        """The current age-clock time."""
        return self._base + (self._monotonic() - self._mono0)

    @classmethod
    def resume(
        cls,
        stored: float | None,
        stored_wall: float | None,
        max_downtime: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> tuple[AgeClock, Resumed]:
        """The clock at start: ``stored`` (the age clock at the previous run's
        last commit, None for a new outbox: the wall clock) plus the wall-clock
        time since ``stored_wall``, clamped to ``0 .. max_downtime``."""
        w = wall()
        if stored is None:
            return cls(w, monotonic=monotonic, wall=wall), Resumed(0.0, 0.0)
        gap = w - (stored if stored_wall is None else stored_wall)
        credited = min(max(gap, 0.0), max_downtime)
        return cls(stored + credited, monotonic=monotonic, wall=wall), Resumed(gap, credited)
