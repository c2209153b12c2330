"""``rate_limit``: at most one value per interval per device and metric, the latest.

Example::

    - rate_limit:
        interval: 10s
        metrics: ["*"]      # globs of metrics it limits (default: all)

The first value after a quiet interval passes at once. Values arriving
sooner are held, each replacing the one held before (keep the latest), and
the held value is sent when the interval since the last value sent has
passed: on the next reading, or by the pipeline's timer if the device falls
silent. So the cloud gets at most one value per interval and never misses the
last one. Intervals are measured in reading time; a value not newer than the
last one sent is dropped (counted as ``stale``).

Held values were acknowledged to the device, so they are journaled in the
pipeline's state store and survive a restart (see "Durability of windows" in
docs/pipeline.md); after a restart they are sent at the first tick.
Metrics the step does not cover pass unchanged, in the reading they came in.
"""

from __future__ import annotations

import math

from pydantic import Field

from edgeway.config_types import Duration
from edgeway.pipeline.registry import HoldingStep, Release, StepContext, StepParams, register_step
from edgeway.pipeline.routes import compile_globs
from edgeway.reading import MetricValue, Reading

KEY_SEP = "\x1f"
"""Separates device id and metric in journal keys (a character neither uses)."""


class RateLimitParams(StepParams):
    interval: Duration = Field(gt=0)
    metrics: list[str] = Field(default_factory=lambda: ["*"])


class _Slot:
    __slots__ = ("due", "held", "ids", "last_ts")

    def __init__(self) -> None:
        self.last_ts = -math.inf
        """Reading time of the last value sent."""
        self.held: Reading | None = None
        self.due = math.inf
        """Wall-clock time at which the held value is sent if nothing else comes."""
        self.ids: list[int] = []
        """Journal entries of the held values since the last one sent."""


@register_step
class RateLimitStep(HoldingStep):
    """Per device and metric: one value per interval, keeping the latest."""

    type_name = "rate_limit"
    Params = RateLimitParams

    def __init__(self, params: RateLimitParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.interval = params.interval
        self.covers = compile_globs(params.metrics)
        self.slots: dict[tuple[str, str], _Slot] = {}
        self.n_held = 0

    def _release(self, device: str, metric: str, slot: _Slot, ts: float) -> None:
        if slot.ids:
            ids, slot.ids = slot.ids, []
            key = device + KEY_SEP + metric
            self._releases.append(Release(key, math.nextafter(ts, math.inf), ids))

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        out: list[Reading] = []
        interval = self.interval
        for r in readings:
            send: dict[str, MetricValue] = {}
            dev, ts = r.device_id, r.ts
            for name, v in r.metrics.items():
                if not self.covers(name):
                    send[name] = v
                    continue
                slot = self.slots.get((dev, name))
                if slot is None:
                    slot = self.slots[(dev, name)] = _Slot()
                if ts <= slot.last_ts:
                    self.ctx.reject("stale")
                    continue
                if ts - slot.last_ts >= interval:
                    # Newer than anything held: it supersedes the held value.
                    if slot.held is not None:
                        slot.held = None
                        slot.due = math.inf
                        self.n_held -= 1
                    slot.last_ts = ts
                    self._release(dev, name, slot, ts)
                    send[name] = v
                    continue
                held = Reading(dev, ts, {name: v}, r.origin, r.tags, r.priority)
                if slot.held is None:
                    self.n_held += 1
                    slot.due = now + (slot.last_ts + interval - ts)
                slot.held = held
                journal = self.ctx.journal
                if journal is not None:
                    slot.ids.append(journal.append(dev + KEY_SEP + name, held))
            if send:
                out.append(
                    r
                    if len(send) == len(r.metrics)
                    else Reading(dev, ts, send, r.origin, r.tags, r.priority)
                )
        return out

    def tick(self, now: float) -> list[Reading]:
        if not self.n_held:
            return []
        merged: dict[tuple[str, float], Reading] = {}
        for (dev, name), slot in self.slots.items():
            held = slot.held
            if held is None or slot.due > now:
                continue
            slot.held = None
            slot.due = math.inf
            self.n_held -= 1
            slot.last_ts = held.ts
            self._release(dev, name, slot, held.ts)
            # Values of one device held from the same reading leave as one reading.
            prev = merged.get((dev, held.ts))
            if prev is None:
                merged[(dev, held.ts)] = held
            else:
                prev.metrics.update(held.metrics)
        return sorted(merged.values(), key=lambda r: r.ts)

    def restore(self, key: str, reading: Reading, journal_id: int) -> None:
        dev, _, name = key.partition(KEY_SEP)
        slot = self.slots.get((dev, name))
        if slot is None:
            slot = self.slots[(dev, name)] = _Slot()
        if slot.held is None:
            self.n_held += 1
        slot.held = Reading(
            reading.device_id, reading.ts, dict(reading.metrics), reading.origin, reading.tags
        )
        slot.due = -math.inf  # send at the first tick after the restart
        slot.ids.append(journal_id)

    def restore_mark(self, key: str, before: float) -> None:
        dev, _, name = key.partition(KEY_SEP)
        slot = self.slots.get((dev, name))
        if slot is None:
            slot = self.slots[(dev, name)] = _Slot()
        slot.last_ts = math.nextafter(before, -math.inf)

    def forget(self, device_id: str) -> None:
        for (dev, _name), slot in self.slots.items():
            if dev == device_id:
                slot.last_ts = -math.inf
