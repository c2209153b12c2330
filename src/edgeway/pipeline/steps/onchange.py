"""``on_change``: send a metric only when its value differs from the last one sent.

Example::

    - on_change:
        metrics: [state, "door_*"]   # globs (default: all)
        max_silence: 15m             # send anyway after 15 min without sending

A deadband of zero with exact comparison (strings, booleans and numbers
alike): see ``deadband`` for which metrics ride along and how
``max_silence`` works.
"""

from __future__ import annotations

from pydantic import Field

from edgeway.config_types import Duration
from edgeway.pipeline.registry import StepContext, StepParams, register_step
from edgeway.pipeline.steps.deadband import DeadbandParams, DeadbandStep


class OnChangeParams(StepParams):
    metrics: list[str] = Field(default_factory=lambda: ["*"])
    max_silence: Duration | None = None


@register_step
class OnChangeStep(DeadbandStep):
    """Per device and metric: pass a value only when it changed."""

    type_name = "on_change"
    Params = OnChangeParams  # type: ignore[assignment]
    exact = True

    def __init__(self, params: OnChangeParams, ctx: StepContext) -> None:
        super().__init__(
            DeadbandParams(absolute=0.0, metrics=params.metrics, max_silence=params.max_silence),
            ctx,
        )
        self.params = params
