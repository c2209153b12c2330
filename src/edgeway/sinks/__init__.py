"""Cloud-side sinks.

Each sink module registers itself with :func:`edgeway.sinks.base.register_sink`.
Modules are imported on demand, by URL scheme (``SCHEME_MODULES``), so that the
gateway's start-up only pays for the sinks it uses; add a new sink to that
table. Optional dependencies (nats-py, aio-pika, asyncpg) are imported inside
the sink module, so a missing extra only matters when that sink is configured.
"""

from __future__ import annotations

SCHEME_MODULES: dict[str, str] = {
    "http": "http",
    "https": "http",
    "file": "file",
    "mqtt": "mqtt",
    "mqtts": "mqtt",
    "nats": "nats",
    "amqp": "amqp",
    "amqps": "amqp",
    "postgresql": "postgres",
    "postgres": "postgres",
}
