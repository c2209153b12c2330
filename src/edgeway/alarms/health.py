"""Alarm-system health figures (ISA-18.2 section 16, EEMUA 191): the
alarm rate per 10 minutes, time in flood, the most frequent alarms, standing
alarms.

Counted are *annunciations*: an alarm going active while it is not shelved,
suppressed or out of service (what an operator is shown). Memory is bounded:
600 one-second buckets for the rate, 24 one-hour counters of at most
:data:`KEYS_PER_HOUR` keys each for the most frequent.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from edgeway.alarms.model import Alarm

RATE_WINDOW = 600.0
"""The rate's window: ISA-18.2 and EEMUA 191 count alarms per 10 minutes."""
TOP_WINDOW = 24 * 3600.0
"""The most frequent alarms are counted over the last day (hourly buckets)."""
TOP_SHOWN = 10
KEYS_PER_HOUR = 10_000
"""Distinct (source, type) counted per hour; more are counted as one
``(other)`` entry so a flood of distinct keys cannot grow memory."""
OTHER = ("(other)", "(other)")


@dataclass(slots=True)
class HealthFigures:
    """A snapshot for /api/status and /metrics."""

    rate_10m: int = 0
    """Alarms annunciated in the last 10 minutes."""
    in_flood: bool = False
    flood_seconds: float = 0.0
    """Seconds spent in flood since start."""
    floods: int = 0
    """Floods begun since start."""
    standing: int = 0
    """Alarms active for longer than ``alarms.standing_after``."""
    top: list[tuple[str, str, int]] = field(default_factory=list)
    """(source, type, alarms in the last 24 h), most frequent first, at most 10."""


class AlarmHealth:
    """Counts annunciations; see the module docstring."""

    def __init__(self, flood_threshold: int) -> None:
        self.flood_threshold = flood_threshold
        self._seconds: deque[list[float]] = deque()  # [second, count]
        self._rate = 0
        self._hours: deque[tuple[float, Counter[tuple[str, str]]]] = deque()
        self._total: Counter[tuple[str, str]] = Counter()
        self._flood_since: float | None = None
        self._flood_seconds = 0.0
        self.floods = 0

    def annunciated(self, source: str, type: str, at: float) -> None:
        """An alarm went active (not hidden) at wall-clock ``at``."""
        second = float(int(at))
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += 1
        else:
            self._seconds.append([second, 1.0])
        self._rate += 1
        hour = float(int(at // 3600) * 3600)
        if not self._hours or self._hours[-1][0] != hour:
            self._hours.append((hour, Counter()))
        bucket = self._hours[-1][1]
        key = (source, type)
        if key not in bucket and len(bucket) >= KEYS_PER_HOUR:
            key = OTHER
        bucket[key] += 1
        self._total[key] += 1
        self.tick(at)

    def tick(self, now: float) -> None:
        """Let old buckets go and update the flood state (called at least
        once a second by the service's timer, and on every annunciation)."""
        seconds = self._seconds
        while seconds and seconds[0][0] <= now - RATE_WINDOW:
            second, n = seconds.popleft()
            self._rate -= int(n)
            if self._flood_since is not None and self._rate <= self.flood_threshold:
                # Ended when this second left the window, not when we looked.
                self._end_flood(second + RATE_WINDOW)
        hours = self._hours
        while hours and hours[0][0] <= now - TOP_WINDOW:
            _, counts = hours.popleft()
            self._total.subtract(counts)
            for key, _n in counts.items():
                if self._total[key] <= 0:
                    del self._total[key]
        if self._rate > self.flood_threshold and self._flood_since is None:
            self._flood_since = now
            self.floods += 1

    def _end_flood(self, at: float) -> None:
        assert self._flood_since is not None
        self._flood_seconds += max(at - self._flood_since, 0.0)
        self._flood_since = None

    def figures(self, now: float, alarms: Iterable[Alarm], standing_after: float) -> HealthFigures:
        self.tick(now)
        standing = sum(
            1
            for a in alarms
            if a.active and a.active_since is not None and now - a.active_since > standing_after
        )
        since = self._flood_since
        flood = self._flood_seconds + (now - since if since is not None else 0.0)
        top = [(s, t, n) for (s, t), n in self._total.most_common(TOP_SHOWN)]
        return HealthFigures(
            self._rate, since is not None, max(flood, 0.0), self.floods, standing, top
        )
