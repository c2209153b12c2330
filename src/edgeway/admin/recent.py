"""Recent values for the HMI: each device's latest metrics and short trends.

The HMI's device pages need what a device sent last and how a number moved
over the last minutes; the outbox has the data but is a queue for sinks (rows
leave when delivered), and the pipeline's state keeps windows, not series.
So the admin listener keeps its own store, fed by a tap on the ingest switch
(every reading a device submits, before the pipeline, as the device sent it):

- per device: last seen, the adapter it came through, the latest value of
  each metric (at most :data:`METRICS_PER_DEVICE`);
- per numeric metric: a ring of the last ``points_per_series`` (time, value)
  pairs, two ``array('d')`` of fixed size (16 bytes a point, no object per
  point);
- bounded: at most ``max_series`` rings (beyond that, a new series takes
  the ring of the least recently seen device if it has been silent for
  :data:`RING_IDLE`, else it has no trend) and ``max_devices`` devices (the least recently seen is
  forgotten), so memory is at most ``max_series * points_per_series * 16``
  bytes plus the latest values (defaults: 2,000 x 3,600 x 16 = 115 MB worst
  case, 1 hour at 1 Hz for 2,000 series; a few MB for a typical site).

Trends are downsampled on the server (:func:`min_max_downsample`): the range
is cut into buckets and each keeps its minimum and maximum, in time order, so
a spike survives and the browser never draws more than ``2 * buckets``
points, however long the series.
"""

from __future__ import annotations

import asyncio
import bisect
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from edgeway.reading import MetricValue, Reading

try:  # optional (the ml extra): the fast path of min_max_downsample
    import numpy as _np
except ImportError:  # pragma: no cover - depends on the installation
    _np = None  # type: ignore[assignment]

POINTS_PER_SERIES = 3600
"""One hour at 1 Hz: what a technician looks at while standing at a machine."""
MAX_SERIES = 2000
"""Rings kept (see the module docstring for the memory this bounds)."""
MAX_DEVICES = 50_000
"""Devices remembered: five times the 10,000 a site's HMI is sized for."""
METRICS_PER_DEVICE = 64
"""Latest values kept per device; a device sending more keeps its first 64."""
STRING_MAX = 256
"""Characters of a string value kept (the HMI shows it, it does not store it)."""
RING_IDLE = 600.0
"""Seconds a device must have been silent before its rings go to a new series
once ``max_series`` rings exist. Taking the least recent device's ring at
once would, with more live series than rings, hand rings round in a circle
(every point a cleared ring, no trend for anyone, and ~20 us per reading);
first come, first served keeps the trends that exist."""
_NUMBERS = frozenset((float, int, bool))
"""Value types that make a trend point (a subclass, such as an enum, goes one at a time)."""
FLUSH_EVERY = 0.05
"""Seconds a batch taken by :meth:`RecentValues.record` may wait before it is
stored (anything reading the store stores it first)."""
PENDING_MAX = 4000
"""Readings taken and not stored yet, at most: a flush of that many holds the
event loop ~6 ms (1.4 us a reading, bench/recent_micro.py); W1 flat out
(~60,000 readings/s) takes ~3,000 per FLUSH_EVERY."""
RUN_MIN = 8
"""Readings of one device in a row from which they are stored a column at a
time (measured: runs of 2 cost 4.8 us a reading that way, against 1.9 one
at a time; runs of 8, 1.9; of 64, 0.8)."""
TREND_POINTS_MAX = 4000
"""Most points a trend answer holds (2 per bucket): a chart is ~2,000 pixels wide."""


class Ring:
    """The last ``capacity`` (time, value) pairs of one series."""

    __slots__ = ("appended", "capacity", "count", "head", "ts", "values")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ts = array("d", bytes(8 * capacity))
        self.values = array("d", bytes(8 * capacity))
        self.head = 0
        self.count = 0
        self.appended = 0
        """Points ever appended: tells a reader in another thread how many
        of the oldest points were overwritten while it copied."""

    def append(self, t: float, v: float) -> None:
        self.ts[self.head] = t
        self.values[self.head] = v
        self.head = (self.head + 1) % self.capacity
        self.appended += 1
        if self.count < self.capacity:
            self.count += 1

    def clear(self) -> None:
        self.head = 0
        self.count = 0

    def snapshot(self) -> RingSnapshot:
        """Where the points are now (O(1), on the event loop); :meth:`RingSnapshot.copy`
        copies them in a worker thread."""
        return RingSnapshot(self, self.head, self.count, self.appended)

    def ordered(self) -> tuple[array[float], array[float]]:
        """Copies of the times and values, oldest first."""
        return self.snapshot().copy()


@dataclass(slots=True, frozen=True)
class RingSnapshot:
    """A ring's position at one moment, to copy from another thread.

    The event loop keeps appending meanwhile; each append overwrites the
    oldest point (single element stores, atomic under the GIL). So after
    copying oldest-first, the points appended since the snapshot are counted
    and that many are dropped from the front: what remains is the ring as it
    was, in time order, without a lock on the append path.
    """

    ring: Ring
    head: int
    count: int
    appended: int

    def copy(self) -> tuple[array[float], array[float]]:
        r, h, n = self.ring, self.head, self.count
        if n < r.capacity:
            ts, vs = r.ts[:n], r.values[:n]
            stale = 0
        else:
            ts, vs = r.ts[h:] + r.ts[:h], r.values[h:] + r.values[:h]
            stale = r.appended - self.appended
        if stale:
            # Overwritten while copying: drop them (and one more for an append
            # that stored its time but not yet its value).
            ts, vs = ts[stale + 1 :], vs[stale + 1 :]
        return ts, vs


def _bucket_size(n: int, buckets: int) -> int:
    return -(-n // buckets)  # ceil: at most ``buckets`` buckets


def min_max_downsample(
    ts: Sequence[float], values: Sequence[float], since: float, until: float, buckets: int
) -> tuple[list[float], list[float]]:
    """The points of ``[since, until]`` reduced to each bucket's min and max.

    ``ts`` must be sorted. Returns at most ``2 * buckets`` points in time
    order; a range with fewer points than that comes back whole. Buckets
    hold ``ceil(n / buckets)`` points each (the last may hold fewer). Uses
    numpy when it is installed (the ``ml`` extra; 604,800 points in ~5 ms
    instead of ~80 ms), with the same result (a test compares them).
    """
    lo = bisect.bisect_left(ts, since)
    hi = bisect.bisect_right(ts, until)
    n = hi - lo
    if n <= 2 * buckets:
        return list(ts[lo:hi]), list(values[lo:hi])
    if _np is not None and isinstance(ts, array) and isinstance(values, array):
        return _downsample_numpy(ts, values, lo, hi, buckets)
    return _downsample_python(ts, values, lo, hi, buckets)


def _downsample_python(
    ts: Sequence[float], values: Sequence[float], lo: int, hi: int, buckets: int
) -> tuple[list[float], list[float]]:
    size = _bucket_size(hi - lo, buckets)
    out_t: list[float] = []
    out_v: list[float] = []
    index = values.index
    for start in range(lo, hi, size):
        stop = min(start + size, hi)
        chunk = values[start:stop]
        i_mn = index(min(chunk), start, stop)
        i_mx = index(max(chunk), start, stop)
        first, second = (i_mn, i_mx) if i_mn <= i_mx else (i_mx, i_mn)
        out_t.append(ts[first])
        out_v.append(values[first])
        if second != first:
            out_t.append(ts[second])
            out_v.append(values[second])
    return out_t, out_v


def _downsample_numpy(
    ts: array[float], values: array[float], lo: int, hi: int, buckets: int
) -> tuple[list[float], list[float]]:
    assert _np is not None
    np = _np
    t = np.frombuffer(ts, dtype=np.float64)[lo:hi]
    v = np.frombuffer(values, dtype=np.float64)[lo:hi]
    n = hi - lo
    size = _bucket_size(n, buckets)
    full = n // size
    starts = np.arange(0, n, size)
    grid = v[: full * size].reshape(full, size)
    i_mn = grid.argmin(axis=1) + starts[:full]
    i_mx = grid.argmax(axis=1) + starts[:full]
    if full * size < n:  # the last, shorter bucket
        tail = v[full * size :]
        i_mn = np.append(i_mn, full * size + int(tail.argmin()))
        i_mx = np.append(i_mx, full * size + int(tail.argmax()))
    first = np.minimum(i_mn, i_mx)
    second = np.maximum(i_mn, i_mx)
    both = np.stack([first, second], axis=1).ravel()
    keep = np.ones(both.shape[0], dtype=bool)
    keep[1::2] = second != first
    idx = both[keep]
    return t[idx].tolist(), v[idx].tolist()


@dataclass(slots=True)
class DeviceEntry:
    """What the HMI knows of one device."""

    device_id: str
    adapter: str
    first_seen: float
    last_seen: float
    readings: int = 0
    latest: dict[str, MetricValue] = field(default_factory=dict)
    rings: dict[str, Ring] = field(default_factory=dict)
    """The trend of each numeric metric that has one."""

    def to_json(self) -> dict[str, object]:
        return {
            "device_id": self.device_id,
            "adapter": self.adapter,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "readings": self.readings,
            "metrics": len(self.latest),
        }


class RecentValues:
    """The store the module docstring describes; fed by :meth:`record`."""

    def __init__(
        self,
        *,
        points_per_series: int = POINTS_PER_SERIES,
        max_series: int = MAX_SERIES,
        max_devices: int = MAX_DEVICES,
    ) -> None:
        self.points_per_series = points_per_series
        self.max_series = max_series
        self.max_devices = max_devices
        self._devices: OrderedDict[str, DeviceEntry] = OrderedDict()
        self._pending: list[Sequence[Reading]] = []
        """Batches taken by :meth:`record` and not stored yet (see :meth:`flush`)."""
        self._pending_n = 0
        self._timer: asyncio.TimerHandle | None = None
        self.rings = 0
        """Rings held by all devices (at most :attr:`max_series`)."""
        self._holders: OrderedDict[str, DeviceEntry] = OrderedDict()
        """Devices that hold rings, least recently seen first: where a ring
        is taken from, in O(1), once :attr:`max_series` is reached."""
        self.series_reused = 0
        """Rings handed to another series because :attr:`max_series` was reached."""
        self.series_refused = 0
        """New series left without a trend: every ring in use by a device seen
        in the last :data:`RING_IDLE` seconds."""

    @property
    def devices(self) -> OrderedDict[str, DeviceEntry]:
        """Every device remembered, least recently seen first (what was taken
        by :meth:`record` is stored first)."""
        if self._pending:
            self.flush()
        return self._devices

    def record(self, readings: Sequence[Reading]) -> None:
        """Take a batch of readings (called on the event loop for every submit).

        On an event loop the batch is only kept (a list append) and stored at
        the next :meth:`flush`, at most :data:`FLUSH_EVERY` later, or at once
        once :data:`PENDING_MAX` readings wait, or when anything reads the
        store (:attr:`devices`, :meth:`ring`, :meth:`trended`). A flush
        stores each device's readings of that time together: a device's
        messages come a few at a time, interleaved with other devices', and
        runs of one device are what :meth:`_store` stores a column at a time
        (reads of 1 to 4 readings of 100 devices: 3.1 -> 1.4 us a reading,
        bench/recent_micro.py; W1's reads were measured later at 16 readings,
        a device's whole window, where it costs ~1 us).
        Readings are immutable once built (:class:`Reading`), so keeping them
        is safe. Without a running loop (tests, tools) a batch is stored at once."""
        self._pending.append(readings)
        self._pending_n += len(readings)
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_EVERY, self.flush)
        if self._pending_n >= PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        """Store what :meth:`record` took: each device's readings in their
        order, devices in the order they first came."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        self._pending_n = 0
        if len(pending) == 1:
            self._store(pending[0])
            return
        by_device: dict[str, list[Reading]] = {}
        get = by_device.get
        for batch in pending:
            for r in batch:
                got = get(r.device_id)
                if got is None:
                    by_device[r.device_id] = [r]
                else:
                    got.append(r)
        for readings in by_device.values():
            # Usually one run already (one device, the same metrics): no scan.
            if len(readings) < RUN_MIN or not self._record_run(readings, 0, len(readings)):
                self._store(readings)

    def _store(self, readings: Sequence[Reading]) -> None:
        """Store a batch: runs of one device with the same metric names, each
        already trended, a column at a time (:meth:`_record_run`: one array
        slice per series instead of a dozen statements per point); anything
        else a reading at a time (:meth:`_record_one`), with the same result
        (a differential test compares them). A column costs more than a few
        points one at a time (building its arrays): runs shorter than
        :data:`RUN_MIN` go one at a time."""
        n = len(readings)
        i = 0
        while i < n:
            r = readings[i]
            j = i + 1
            if j < n:
                did = r.device_id
                keys = r.metrics.keys()
                while j < n and readings[j].device_id == did and readings[j].metrics.keys() == keys:
                    j += 1
            if j - i < RUN_MIN or not self._record_run(readings, i, j):
                for k in range(i, j):
                    self._record_one(readings[k])
            i = j

    def _record_run(self, readings: Sequence[Reading], i: int, j: int) -> bool:
        """Readings ``i..j-1`` (one device) a column at a time, if they have
        the same metric names, every metric already has a ring and every value
        is a finite number or a bool; False (nothing changed) otherwise."""
        first = readings[i]
        dev = self._devices.get(first.device_id)
        if dev is None:
            return False
        rings = dev.rings
        k = j - i
        columns: list[tuple[str, Ring, array[float], MetricValue]] = []
        group = readings[i:j]
        metrics = [r.metrics for r in group]
        if len(set(map(len, metrics))) != 1:
            return False
        try:
            # As many names each, and each of the first's in all (KeyError
            # otherwise): the same names.
            for name in first.metrics:
                ring = rings.get(name)
                if ring is None or ring.capacity < k:
                    return False
                values = list(map(itemgetter(name), metrics))
                if not set(map(type, values)) <= _NUMBERS:
                    return False
                points = array("d", values)  # bools as 1.0 / 0.0, as one at a time
                total = sum(points)
                if total - total != 0.0:  # an inf or NaN among them (or a huge sum)
                    return False
                columns.append((name, ring, points, values[-1]))
        except (OverflowError, KeyError):  # an int beyond a double; other names
            return False
        stamps = array("d", [r.ts for r in group])
        last = group[-1]
        self._devices.move_to_end(first.device_id)
        if rings:
            self._holders.move_to_end(first.device_id)
        dev.last_seen = last.ts
        dev.readings += k
        latest = dev.latest
        for name, ring, points, value in columns:
            latest[name] = value
            # Counted first: a reader copying in another thread drops at least
            # the points overwritten meanwhile (see RingSnapshot).
            ring.appended += k
            h = ring.head
            room = ring.capacity - h
            if k <= room:
                ring.ts[h : h + k] = stamps
                ring.values[h : h + k] = points
            else:
                ring.ts[h:] = stamps[:room]
                ring.values[h:] = points[:room]
                ring.ts[: k - room] = stamps[room:]
                ring.values[: k - room] = points[room:]
            ring.head = (h + k) % ring.capacity
            ring.count = min(ring.count + k, ring.capacity)
        return True

    def _record_one(self, r: Reading) -> None:
        """One reading (per reading a dict move, per metric a dict store and an
        array store; no allocation per point)."""
        devices = self._devices
        dev = devices.get(r.device_id)
        if dev is None:
            dev = self._new_device(r)
        else:
            devices.move_to_end(r.device_id)
            if dev.rings:
                self._holders.move_to_end(r.device_id)
        ts = r.ts
        dev.last_seen = ts
        dev.readings += 1
        latest = dev.latest
        rings = dev.rings
        for name, value in r.metrics.items():
            kind = type(value)
            if kind is float or kind is int:
                try:
                    num = float(value)
                except OverflowError:  # an int beyond a double
                    num = float("inf")
                if num - num != 0.0:  # inf or NaN: no trend point
                    latest[name] = value
                    continue
            elif kind is bool:
                num = 1.0 if value else 0.0
            else:
                if name in latest or len(latest) < METRICS_PER_DEVICE:
                    text = str(value)
                    latest[name] = text[:STRING_MAX] if len(text) > STRING_MAX else text
                continue
            ring = rings.get(name)
            if ring is None:
                if len(latest) >= METRICS_PER_DEVICE and name not in latest:
                    continue
                ring = self._new_ring(dev, name, ts)
                if ring is None:
                    latest[name] = value
                    continue
            latest[name] = value
            h = ring.head
            ring.ts[h] = ts
            ring.values[h] = num
            ring.head = h + 1 if h + 1 < ring.capacity else 0
            ring.appended += 1
            if ring.count < ring.capacity:
                ring.count += 1

    def _new_device(self, r: Reading) -> DeviceEntry:
        dev = DeviceEntry(r.device_id, r.origin.adapter, r.ts, r.ts)
        self._devices[r.device_id] = dev
        while len(self._devices) > self.max_devices:
            _, gone = self._devices.popitem(last=False)
            self.rings -= len(gone.rings)
            self._holders.pop(gone.device_id, None)
        return dev

    def _new_ring(self, dev: DeviceEntry, metric: str, now: float) -> Ring | None:
        """A ring for a new series: a new one while under :attr:`max_series`,
        else one of the least recently seen device that has rings if it has
        been silent for :data:`RING_IDLE`; None otherwise (the new series
        keeps its latest value, without a trend)."""
        holders = self._holders
        if self.rings >= self.max_series:
            victim = next(iter(holders.values()), None)
            if victim is None or victim is dev or now - victim.last_seen < RING_IDLE:
                self.series_refused += 1
                return None
            _, ring = victim.rings.popitem()  # (max_series > 0: victim has one)
            if not victim.rings:
                del holders[victim.device_id]
            ring.clear()
            self.series_reused += 1
        else:
            ring = Ring(self.points_per_series)
            self.rings += 1
        dev.rings[metric] = ring
        holders[dev.device_id] = dev
        holders.move_to_end(dev.device_id)
        return ring

    def ring(self, device_id: str, metric: str) -> Ring | None:
        dev = self.devices.get(device_id)
        return dev.rings.get(metric) if dev is not None else None

    def trended(self, device_id: str) -> list[str]:
        """Metrics of ``device_id`` that have a ring."""
        dev = self.devices.get(device_id)
        return list(dev.rings) if dev is not None else []
