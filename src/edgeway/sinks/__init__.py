"""Cloud-side sinks. Importing this package registers the built-in sinks.

Each sink module registers itself with :func:`edgeway.sinks.base.register_sink`;
add a new one to ``_BUILTIN`` below. Optional dependencies (nats-py, aio-pika,
asyncpg) are imported inside the sink module's methods, so a missing extra
only matters when that sink is configured.
"""

from __future__ import annotations

import importlib

_BUILTIN = ("http", "file", "mqtt", "nats", "amqp", "postgres")

for _name in _BUILTIN:
    try:
        importlib.import_module(f"edgeway.sinks.{_name}")
    except ModuleNotFoundError as _e:  # module not written yet
        if _e.name != f"edgeway.sinks.{_name}":
            raise
