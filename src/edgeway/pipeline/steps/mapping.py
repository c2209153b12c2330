"""``map``: rename metrics, drop or keep metrics, add tags and static metrics.

Example::

    - map:
        rename: {t: temperature, h: humidity}   # old name: new name
        drop: ["debug_*"]                        # globs, after renaming
        keep: [temperature, humidity, battery]   # globs; absent: keep all
        set: {firmware: "2.1"}                   # static metrics added to every reading
        tags: {site: plant-a, type: thermometer} # tags added (they win over the reading's)

Applied in that order: rename, drop, keep, set, tags. A reading left without
metrics is dropped (counted as readings in minus readings out).
"""

from __future__ import annotations

from pydantic import Field

from edgeway.pipeline.registry import Step, StepContext, StepParams, register_step
from edgeway.pipeline.routes import compile_globs
from edgeway.reading import MetricValue, Reading


class MapParams(StepParams):
    rename: dict[str, str] = Field(default_factory=dict)
    drop: list[str] = Field(default_factory=list)
    keep: list[str] | None = None
    set: dict[str, float | int | bool | str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)


@register_step
class MapStep(Step):
    """Rename, drop, keep, set metrics; add tags."""

    type_name = "map"
    Params = MapParams

    def __init__(self, params: MapParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self.rename = params.rename
        self.drop = compile_globs(params.drop) if params.drop else None
        self.keep = compile_globs(params.keep) if params.keep is not None else None
        self.set: dict[str, MetricValue] = dict(params.set)
        self.tags = params.tags

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        out: list[Reading] = []
        rename, drop, keep = self.rename, self.drop, self.keep
        for r in readings:
            metrics: dict[str, MetricValue] = {}
            for name, value in r.metrics.items():
                name = rename.get(name, name)
                if drop is not None and drop(name):
                    continue
                if keep is not None and not keep(name):
                    continue
                metrics[name] = value
            if self.set:
                metrics.update(self.set)
            if not metrics:
                continue
            tags = {**r.tags, **self.tags} if self.tags else r.tags
            out.append(Reading(r.device_id, r.ts, metrics, r.origin, tags, r.priority))
        return out
