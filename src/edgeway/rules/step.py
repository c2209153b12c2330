"""``rules``: evaluate rules at this point of a route.

Example::

    routes:
      - name: pumps
        match: {devices: ["pump-*"]}
        steps:
          - transform: {vibration_rms: {expr: "sqrt(vx * vx + vy * vy)"}}
          - rules: {names: [pump-vibration]}

Rules named here see the readings as they reach this step (after the
transforms, a model's outputs, ...) instead of as devices sent them; the
rules no step names are evaluated at the front of the pipeline. Readings
pass on unchanged: the step's output is typed (rule state changes and
transitions with their commands, alarms, publishes, webhooks and records;
see edgeway.rules.stage), and its commit joins the device's
acknowledgement.
"""

from __future__ import annotations

from pydantic import Field

from edgeway.pipeline.registry import Step, StepContext, StepParams, register_step
from edgeway.reading import Reading


class RulesParams(StepParams):
    names: list[str] = Field(min_length=1)
    """The rules (``rules:`` names) evaluated here."""


@register_step
class RulesStep(Step):
    """Hands the readings to the gateway's rule stage for the named rules."""

    type_name = "rules"
    Params = RulesParams

    def __init__(self, params: RulesParams, ctx: StepContext) -> None:
        super().__init__(params, ctx)

    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        stage = self.ctx.services.get("rules")
        if stage is not None:  # None: built without a gateway (edgeway check)
            fut = stage.observe(readings, step=self.ctx.step_id)
            if fut is not None:
                self.ctx.commits.append(fut)
        return readings
