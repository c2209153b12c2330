"""Routes and steps between the south adapters and the outbox (see docs/pipeline.md).

Configuration::

    routes:
      - name: climate
        match: {devices: ["room-*"]}
        steps:
          - window: {size: 10s, aggregates: [mean]}
          - deadband: {percent: 0.5}
        sinks: [cloud]

:class:`Pipeline` implements :class:`edgeway.ingest.Ingest`;
:func:`stats_main` is ``edgeway stats``; steps register in
:mod:`edgeway.pipeline.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeway.lazy import lazy_exports

if TYPE_CHECKING:
    from edgeway.pipeline.core import Pipeline, reading_size
    from edgeway.pipeline.registry import HoldingStep, Step, register_step, step_types
    from edgeway.pipeline.stats import load_stats, stats_main

__all__ = [
    "HoldingStep",
    "Pipeline",
    "Step",
    "load_stats",
    "reading_size",
    "register_step",
    "stats_main",
    "step_types",
]

if not TYPE_CHECKING:  # mypy reads the imports above; a typo stays an error
    __getattr__ = lazy_exports(
        __name__,
        {
            "HoldingStep": "registry",
            "Pipeline": "core",
            "Step": "registry",
            "load_stats": "stats",
            "reading_size": "core",
            "register_step": "registry",
            "stats_main": "stats",
            "step_types": "registry",
        },
    )
