"""``window``: aggregate each device's metrics over wall-clock-aligned time windows.

Example::

    - window:
        size: 10s                 # window length
        hop: 10s                  # absent or = size: tumbling; < size: sliding
        aggregates: [mean, min, max, p95]
        metrics: ["*"]            # globs of metrics to aggregate (default: all)
        grace: 2s                 # how long after its end a window still takes late readings
        late: drop                # or forward: pass later readings on unaggregated
        names: "{metric}_{agg}"   # output metric names

Windows are aligned to multiples of ``hop`` since the Unix epoch (UTC): a 10 s
window is [12:00:00, 12:00:10), a 1 h window starts on the hour. A reading
goes to the windows containing its timestamp (one when tumbling,
``size / hop`` when sliding), per device; within a window every metric has its
own aggregates. Aggregates: ``mean min max sum count first last stddev``
(sample standard deviation, 0 for a single value) and percentiles ``pNN``
(``p50``, ``p95``, ``p99.9``; linear interpolation). Strings only get
``count``, ``first`` and ``last``; booleans count as 0/1.

A window closes ``grace`` after its end, either

- in reading time: the device sent a reading with ``ts >= end + grace``
  (reading time counts only up to the gateway's clock plus ``grace``: a
  reading stamped in the future, by a device whose clock jumped ahead, goes
  to its own window but does not close the current ones, so the device's
  next readings with a sane time are not late); or
- on the pipeline's timer: the wall clock passed ``end + grace`` and the
  device has sent nothing for ``grace`` seconds (so a steady device whose
  clock lags the gateway's is not cut off; a silent one still closes).

It then emits one reading per device: ``ts`` = window end, the aggregates as
``names`` says, plus ``window_start`` and ``window_end`` (seconds since the
epoch) as metrics, the tags of the window's last reading, origin
``pipeline`` / route name. A reading for a window that already closed is late:
dropped and counted (``late``), or passed on as is with ``late: forward``.

Absorbed readings are journaled in the pipeline's state store: a restart in
the middle of a window loses nothing acknowledged, and a window emitted twice
across a crash carries the same ``window_start``/``window_end`` both times,
which is the key a cloud uses to drop the duplicate (docs/pipeline.md).
"""

from __future__ import annotations

import heapq
import math
import re
from typing import Literal

from pydantic import Field, model_validator

from edgeway.config_types import Duration
from edgeway.pipeline.registry import (
    NAME_CACHE_LIMIT,
    HoldingStep,
    Release,
    StepContext,
    StepParams,
    register_step,
)
from edgeway.pipeline.routes import compile_globs
from edgeway.reading import MetricValue, Origin, Reading

_AGG_RE = re.compile(r"^(?:mean|min|max|sum|count|first|last|stddev|p(\d{1,2}(?:\.\d+)?|100))$")

MAX_PERCENTILE_VALUES = 100_000
"""Values kept per metric and window for percentiles (8 bytes each in an
array, ~0.8 MB). Beyond, further values still count in every other aggregate
but not in percentiles; ``percentile_capped`` counts them. 100k is a 1 h window
of a 25 Hz signal."""


class WindowParams(StepParams):
    size: Duration = Field(gt=0)
    hop: Duration | None = Field(default=None, gt=0)
    aggregates: list[str] = Field(min_length=1)
    metrics: list[str] = Field(default_factory=lambda: ["*"])
    grace: Duration = 2.0
    """2 s: a QoS 1 resend or a device's clock jitter usually falls within it."""
    late: Literal["drop", "forward"] = "drop"
    names: str = "{metric}_{agg}"

    @model_validator(mode="after")
    def _check(self) -> WindowParams:
        if self.hop is not None and self.hop > self.size:
            raise ValueError(f"hop ({self.hop}) must not exceed size ({self.size})")
        for agg in self.aggregates:
            if not _AGG_RE.match(agg):
                raise ValueError(
                    f"unknown aggregate {agg!r}: mean, min, max, sum, count, first, last, "
                    "stddev or pNN (p0 to p100)"
                )
        if len(set(self.aggregates)) != len(self.aggregates):
            raise ValueError("aggregates are listed twice")
        if "{metric}" not in self.names:
            raise ValueError("names must contain {metric}")
        if len(self.aggregates) > 1 and "{agg}" not in self.names:
            raise ValueError("names must contain {agg} when there are several aggregates")
        try:
            self.names.format(metric="m", agg="a")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"names: only {{metric}} and {{agg}} may appear ({e})") from None
        return self


def _number(v: float) -> float | int:
    """Window bounds as integers when they are whole seconds (shorter JSON)."""
    return int(v) if v == int(v) else v


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile of sorted ``values`` (linear interpolation, as numpy)."""
    if len(values) == 1:
        return values[0]
    pos = p / 100.0 * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


class _Acc:
    """Running aggregates of one metric in one window."""

    __slots__ = (
        "capped",
        "comp",
        "first",
        "first_ts",
        "hi",
        "last",
        "last_ts",
        "lo",
        "m2",
        "mean",
        "n",
        "numeric",
        "total",
        "values",
        "welford",
    )

    def __init__(self, keep_values: bool, welford: bool) -> None:
        self.welford = welford
        self.n = 0
        self.total = 0.0
        self.comp = 0.0  # Neumaier compensation: sum and mean stay exact to ~1 ulp
        self.mean = 0.0  # Welford, for stddev
        self.m2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.first: MetricValue = 0.0
        self.first_ts = math.inf
        self.last: MetricValue = 0.0
        self.last_ts = -math.inf
        self.values: list[float] | None = [] if keep_values else None
        self.numeric = True
        self.capped = 0

    def add(self, v: MetricValue, ts: float) -> None:
        self.n += 1
        if ts < self.first_ts:
            self.first_ts, self.first = ts, v
        if ts >= self.last_ts:
            self.last_ts, self.last = ts, v
        if isinstance(v, str):
            self.numeric = False
            return
        x = float(v)
        t = self.total + x
        if abs(self.total) >= abs(x):
            self.comp += (self.total - t) + x
        else:
            self.comp += (x - t) + self.total
        self.total = t
        if self.welford:
            d = x - self.mean
            self.mean += d / self.n
            self.m2 += d * (x - self.mean)
        if x < self.lo:
            self.lo = x
        if x > self.hi:
            self.hi = x
        if self.values is not None:
            if len(self.values) < MAX_PERCENTILE_VALUES:
                self.values.append(x)
            else:
                self.capped += 1

    def result(self, agg: str) -> MetricValue | None:
        if agg == "count":
            return self.n
        if agg == "first":
            return self.first
        if agg == "last":
            return self.last
        if not self.numeric or self.n == 0:
            return None
        if agg == "mean":
            return (self.total + self.comp) / self.n
        if agg == "sum":
            return self.total + self.comp
        if agg == "min":
            return self.lo
        if agg == "max":
            return self.hi
        if agg == "stddev":
            return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0
        assert self.values is not None
        if not self.values:
            return None
        self.values.sort()
        return percentile(self.values, float(agg[1:]))


class _Win:
    __slots__ = ("accs", "ids", "priority", "tags", "tags_ts")

    def __init__(self) -> None:
        self.accs: dict[str, _Acc] = {}
        self.ids: list[int] = []
        """Journal entries of readings whose last window this is: they can go
        once this window's aggregate is safe."""
        self.tags: dict[str, str] = {}
        self.tags_ts = -math.inf
        self.priority = 0


class _Dev:
    __slots__ = ("close_at", "closed_k", "last_arrival", "watermark", "wins")

    def __init__(self) -> None:
        self.wins: dict[int, _Win] = {}
        self.close_at = math.inf
        """Reading time at which the first open window closes (end + grace)."""
        self.closed_k: float = -math.inf
        """Index of the last window closed: windows up to it take nothing more."""
        self.watermark = -math.inf
        """Highest reading time seen, capped at the wall clock + grace on arrival."""
        self.last_arrival = -math.inf
        """Wall clock of the last reading absorbed."""


@register_step
class WindowStep(HoldingStep):
    """Tumbling or sliding time windows per device and metric."""

    type_name = "window"
    Params = WindowParams

    def __init__(self, params: WindowParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.size = params.size
        self.hop = params.hop if params.hop is not None else params.size
        self.grace = params.grace
        self.aggs = params.aggregates
        self.keep_values = any(a.startswith("p") for a in self.aggs)
        self.want_stddev = "stddev" in self.aggs
        self.covers = compile_globs(params.metrics)
        self.all_metrics = "*" in params.metrics
        self.tumbling = self.hop == self.size
        self.forward_late = params.late == "forward"
        self.names = params.names
        self.origin = Origin("pipeline", ctx.route)
        self.devs: dict[str, _Dev] = {}
        self._due: list[tuple[float, str, int]] = []
        self._out_names: dict[str, list[tuple[str, str]]] = {}
        self._recheck: set[str] = set()
        self.open_windows = 0
        self.percentile_capped = 0

    # -- helpers -----------------------------------------------------------

    def _end(self, k: int) -> float:
        return k * self.hop + self.size

    def _windows_of(self, ts: float) -> range:
        """Indices of the windows containing ``ts``: k*hop <= ts < k*hop + size."""
        hi = math.floor(ts / self.hop)
        lo = math.floor((ts - self.size) / self.hop) + 1
        return range(lo, hi + 1)

    def _absorb(
        self, r: Reading, covered: dict[str, MetricValue], now: float, horizon: float
    ) -> _Win | None:
        """Add ``r`` to its open windows; return the last of them (None: late).

        ``horizon`` caps how far ``r`` moves the device's reading time (the
        watermark): the wall clock + grace on arrival, so one reading from the
        future cannot close the device's open windows and make its next,
        correctly stamped readings late."""
        dev = self.devs.get(r.device_id)
        if dev is None:
            dev = self.devs[r.device_id] = _Dev()
        if dev.watermark > horizon:
            # Restored from the journal in full (restore has no clock): capped
            # now, as it would have been on arrival.
            dev.watermark = horizon
        dev.last_arrival = now
        last: _Win | None = None
        ks = (math.floor(r.ts / self.hop),) if self.tumbling else self._windows_of(r.ts)
        for k in ks:
            if k <= dev.closed_k:
                continue
            win = dev.wins.get(k)
            if win is None:
                win = dev.wins[k] = _Win()
                self.open_windows += 1
                close_at = self._end(k) + self.grace
                heapq.heappush(self._due, (close_at, r.device_id, k))
                if close_at < dev.close_at:
                    dev.close_at = close_at
            accs = win.accs
            for name, v in covered.items():
                acc = accs.get(name)
                if acc is None:
                    acc = accs[name] = _Acc(self.keep_values, self.want_stddev)
                acc.add(v, r.ts)
            if r.ts >= win.tags_ts:
                win.tags_ts, win.tags = r.ts, r.tags
            if r.priority > win.priority:
                win.priority = r.priority
            last = win
        if last is not None and r.ts > dev.watermark:
            dev.watermark = r.ts if r.ts <= horizon else max(dev.watermark, horizon)
        return last

    def _emit(self, device_id: str, k: int, win: _Win) -> Reading:
        metrics: dict[str, MetricValue] = {}
        for name, acc in win.accs.items():
            names = self._out_names.get(name)
            if names is None:
                if len(self._out_names) >= NAME_CACHE_LIMIT:
                    self._out_names.clear()
                names = self._out_names[name] = [
                    (agg, self.names.format(metric=name, agg=agg)) for agg in self.aggs
                ]
            for agg, out_name in names:
                v = acc.result(agg)
                if v is not None:
                    metrics[out_name] = v
            self.percentile_capped += acc.capped
        start = k * self.hop
        metrics["window_start"] = _number(start)
        metrics["window_end"] = _number(start + self.size)
        return Reading(device_id, start + self.size, metrics, self.origin, win.tags, win.priority)

    def _close(self, device_id: str, dev: _Dev, upto_k: int) -> list[Reading]:
        """Close every open window of ``dev`` with index <= ``upto_k``, in order."""
        ks = sorted(k for k in dev.wins if k <= upto_k)
        if not ks:
            return []
        out = []
        ids: list[int] = []
        for k in ks:
            win = dev.wins.pop(k)
            out.append(self._emit(device_id, k, win))
            ids.extend(win.ids)
        self.open_windows -= len(ks)
        dev.closed_k = ks[-1]
        dev.close_at = min(self._end(k) for k in dev.wins) + self.grace if dev.wins else math.inf
        # The mark is where the next window starts: readings before it are late.
        self._releases.append(Release(device_id, (ks[-1] + 1) * self.hop, ids))
        return out

    def _close_by_watermark(self, device_id: str, dev: _Dev) -> list[Reading]:
        # Windows with end + grace <= watermark: k*hop + size + grace <= watermark.
        limit = math.floor((dev.watermark - self.size - self.grace) / self.hop)
        if dev.wins and min(dev.wins) <= limit:
            return self._close(device_id, dev, limit)
        return []

    # -- the step interface -----------------------------------------------------

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        out: list[Reading] = []
        covers = self.covers
        all_metrics = self.all_metrics
        journal = self.ctx.journal
        for r in readings:
            covered = (
                r.metrics if all_metrics else {n: v for n, v in r.metrics.items() if covers(n)}
            )
            if not covered:
                out.append(r)
                continue
            win = self._absorb(r, covered, now, now + self.grace)
            if win is not None:
                if journal is not None:
                    win.ids.append(journal.append(r.device_id, r))
                dev = self.devs[r.device_id]
                if dev.watermark >= dev.close_at:
                    out.extend(self._close_by_watermark(r.device_id, dev))
            elif self.forward_late:
                self.ctx.reject("late_forwarded")
                out.append(r)
            else:
                self.ctx.reject("late")
        return out

    def tick(self, now: float) -> list[Reading]:
        out: list[Reading] = []
        if self._recheck:
            for device_id in sorted(self._recheck):
                dev = self.devs.get(device_id)
                if dev is not None:
                    dev.watermark = min(dev.watermark, now + self.grace)  # see _absorb
                    out.extend(self._close_by_watermark(device_id, dev))
            self._recheck.clear()
        due = self._due
        while due and due[0][0] <= now:
            _, device_id, k = heapq.heappop(due)
            dev = self.devs.get(device_id)
            if dev is None or k not in dev.wins:
                continue  # closed already (by a later reading's time)
            if now - dev.last_arrival < self.grace:
                # The device is still sending: let its own clock close the window.
                heapq.heappush(due, (dev.last_arrival + self.grace, device_id, k))
                continue
            out.extend(self._close(device_id, dev, k))
        return out

    def restore(self, key: str, reading: Reading, journal_id: int) -> None:
        covered = {n: v for n, v in reading.metrics.items() if self.covers(n)}
        # Journaled readings were accepted once: their times count in full.
        win = self._absorb(reading, covered, -math.inf, math.inf) if covered else None
        if win is not None:
            win.ids.append(journal_id)
            self._recheck.add(key)
        else:
            # Its window closed after all (the release did not commit): the
            # entry is redundant; delete it, keeping the key's mark as it is.
            self._releases.append(Release(key, None, [journal_id]))

    def restore_mark(self, key: str, before: float) -> None:
        dev = self.devs.get(key)
        if dev is None:
            dev = self.devs[key] = _Dev()
        dev.closed_k = round(before / self.hop) - 1
