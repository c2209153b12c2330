"""Local decisions: rules over readings, with durable state and actions.

Importing :mod:`edgeway.config` first lets ``edgeway.config`` and
``edgeway.rules.config`` import each other whichever is imported first (the
root ``Config`` has a ``rules:`` field; the rule models use its leaf types).
"""

import edgeway.config  # noqa: F401  (see the docstring)
