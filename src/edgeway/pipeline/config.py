"""The pipeline's configuration: routes (``routes:``) and the ``pipeline:``
section (docs/pipeline.md). Step parameters are validated by each step
type's own model through the step registry.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field

from edgeway.config_types import (
    Duration,
    _Model,
)


def _check_step(value: dict[str, Any]) -> dict[str, Any]:
    """Validate one ``{step_type: {params}}`` entry with that step's own model.

    The step registry is imported here, at validation time, not when this module
    loads (the step modules import this one). Errors keep their full key path
    (``routes[0].steps[1].window.size``) so ``edgeway check`` names the line.
    """
    from edgeway.pipeline.registry import check_step_spec

    return check_step_spec(value)


class RouteMatch(_Model):
    """Which readings a route takes. Every given criterion must hold; an empty
    match takes every reading."""

    devices: list[str] = Field(default_factory=list)
    """Globs on the device id (``sensor-*``); any may match."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Tags the reading must carry; values may be globs."""
    device_types: list[str] = Field(default_factory=list)
    """Globs on the reading's ``type`` tag."""
    metrics: list[str] = Field(default_factory=list)
    """Globs on metric names: the route takes readings carrying any of them,
    and only those metrics (the others go to the other matching routes, or to
    the default sinks when no route takes them)."""
    adapters: list[str] = Field(default_factory=list)
    """Source adapter names (``mqtt``, ``coap``, ``modbus``, ...)."""
    topics: list[str] = Field(default_factory=list)
    """MQTT filters (``+``/``#``) on the origin address (topic, CoAP path, ...)."""


class RouteConfig(_Model):
    """A route: match readings, apply steps in order, store for ``sinks``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Unique name; appears in counters, ``edgeway stats`` and logs."""
    match: RouteMatch = Field(default_factory=RouteMatch)
    """Which readings the route takes (absent: every reading)."""
    steps: list[Annotated[dict[str, Any], AfterValidator(_check_step)]] = Field(
        default_factory=list
    )
    """Each entry is ``{step_type: {params}}``; see docs/pipeline.md."""
    sinks: list[str] | None = None
    """Sink names that get this route's output; absent: every sink."""


class PipelineSection(_Model):
    """Settings of the pipeline itself (``edgeway.pipeline``)."""

    default_sinks: list[str] | None = None
    """Sinks for readings (or metrics) no route takes; absent: every sink;
    ``[]``: keep them in the outbox unrouted."""
    tick_interval: Duration = Field(default=0.5, gt=0)
    """How often windows and held rate-limited readings are checked for
    closing. 0.5 s: a window closes at most half a second after its time."""
    stats_interval: Duration = Field(default=5.0, gt=0)
    """How often ``data_dir/stats.json`` (read by ``edgeway stats``) is rewritten."""
