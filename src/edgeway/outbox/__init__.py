"""The durable store-and-forward queue between the pipeline and the sinks.

Configuration::

    outbox: {durability: fsync, max_bytes: 2GiB, when_full: drop_oldest, drain: ordered}

:class:`Outbox` stores readings (group commit, SQLite WAL) and implements
:class:`edgeway.ingest.Ingest`; :class:`SinkRunner` drives one sink from it;
:func:`deadletter_main` is ``edgeway deadletter list|replay|purge``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeway.lazy import lazy_exports

if TYPE_CHECKING:
    from edgeway.outbox.deadletter import (
        DeadLetter,
        deadletter_main,
        list_dead_letters,
        purge_dead_letters,
        replay_dead_letters,
    )
    from edgeway.outbox.runner import SinkRunner
    from edgeway.outbox.store import Batch, Confirmed, Outbox

__all__ = [
    "Batch",
    "Confirmed",
    "DeadLetter",
    "Outbox",
    "SinkRunner",
    "deadletter_main",
    "list_dead_letters",
    "purge_dead_letters",
    "replay_dead_letters",
]

if not TYPE_CHECKING:  # mypy reads the imports above; a typo stays an error
    __getattr__ = lazy_exports(
        __name__,
        {
            "Batch": "store",
            "Confirmed": "store",
            "DeadLetter": "deadletter",
            "Outbox": "store",
            "SinkRunner": "runner",
            "deadletter_main": "deadletter",
            "list_dead_letters": "deadletter",
            "purge_dead_letters": "deadletter",
            "replay_dead_letters": "deadletter",
        },
    )
