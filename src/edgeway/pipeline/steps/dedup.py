"""``dedup``: drop exact repeats of a reading.

Example::

    - dedup: {by: values}                           # same device, timestamp and metrics
    - dedup: {by: sequence, sequence_metric: seq}   # same device and sequence number

Devices repeat readings when they did not get an acknowledgement (MQTT QoS 1
resends, an HTTP retry after a timeout). Per device the step remembers the
last ``memory`` readings it let through; a repeat of one of them is dropped.
With ``by: sequence`` a reading without the sequence metric passes.
"""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import Field

from edgeway.pipeline.registry import Step, StepContext, StepParams, register_step
from edgeway.reading import Reading


class DedupParams(StepParams):
    by: Literal["values", "sequence"] = "values"
    sequence_metric: str = Field(default="seq", min_length=1)
    memory: int = Field(default=1000, ge=1, le=1_000_000)
    """Readings remembered per device. 1000: a device's resends follow within
    its retry window, a few messages; a device replaying a backlog after a
    reconnect resends at most its own buffer, typically hundreds. Each entry
    costs about 100 bytes."""


@register_step
class DedupStep(Step):
    """Drop a reading equal to one of the device's recent readings."""

    type_name = "dedup"
    Params = DedupParams

    def __init__(self, params: DedupParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.by_seq = params.by == "sequence"
        self.seq_metric = params.sequence_metric
        self.limit = params.memory
        # dicts keep insertion order: the first key is the oldest (a cheap LRU).
        self.seen: dict[str, dict[object, None]] = {}

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        out: list[Reading] = []
        for r in readings:
            key: object
            if self.by_seq:
                key = r.metrics.get(self.seq_metric)
                if key is None:
                    out.append(r)
                    continue
            else:
                key = (r.ts, orjson.dumps(r.metrics, option=orjson.OPT_SORT_KEYS))
            seen = self.seen.get(r.device_id)
            if seen is None:
                seen = self.seen[r.device_id] = {}
            elif key in seen:
                self.ctx.reject("duplicate")
                continue
            seen[key] = None
            if len(seen) > self.limit:
                del seen[next(iter(seen))]
            out.append(r)
        return out

    def forget(self, device_id: str) -> None:
        self.seen.pop(device_id, None)
