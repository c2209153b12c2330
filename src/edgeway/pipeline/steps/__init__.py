"""The built-in pipeline steps; importing this package registers them.

One module per step type; each module's docstring opens with a config example
(the same examples appear in docs/pipeline.md and are run by the tests).
"""

from __future__ import annotations

from edgeway.ml import step as _model_step  # noqa: F401  (the ``model`` step)
from edgeway.ml import zscore as _anomaly_step  # noqa: F401  (the ``anomaly`` step)
from edgeway.pipeline.steps import (  # noqa: F401  (registration at import)
    deadband,
    dedup,
    mapping,
    onchange,
    priority,
    ratelimit,
    transform,
    validate,
    window,
)
from edgeway.rules import step as _rules_step  # noqa: F401  (the ``rules`` step)
