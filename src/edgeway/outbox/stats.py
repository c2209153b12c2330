"""The outbox's typed figures: per sink, as of the last commit.

``accepted == delivered + pending + dropped`` always holds (``pending`` is
derived from it; the tests check it against the rows on disk). Each field says
how it is exported (``edgeway_outbox_<name>{sink}``); ``/api/status`` shows them
per sink under ``outbox`` (and ``outbox_retired`` for sinks no longer
configured, which are not exported as metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgeway.runtime.component import counter, gauge, keyed


@dataclass(slots=True)
class OutboxSinkStats:
    """One sink's readings in the outbox."""

    accepted: int = field(
        default=0, metadata=counter("outbox_accepted", "Outbox accepted readings")
    )
    """Readings stored for the sink."""
    delivered: int = field(
        default=0, metadata=counter("outbox_delivered", "Outbox delivered readings")
    )
    """Readings the sink's remote side confirmed."""
    dropped_max_bytes: int = field(
        default=0, metadata=counter("outbox_dropped_max_bytes", "Outbox dropped_max_bytes readings")
    )
    """Dropped by ``outbox.max_bytes`` before the sink had them."""
    dropped_max_age: int = field(
        default=0, metadata=counter("outbox_dropped_max_age", "Outbox dropped_max_age readings")
    )
    """Dropped by ``outbox.max_age`` before the sink had them."""
    dropped_dead_letter: int = field(
        default=0,
        metadata=counter("outbox_dropped_dead_letter", "Outbox dropped_dead_letter readings"),
    )
    """Refused by the remote side for good (kept in the dead letters)."""
    rejected_full: int = field(
        default=0, metadata=counter("outbox_rejected_full", "Outbox rejected_full readings")
    )
    """Refused at the door while the outbox was full (``when_full: reject_new``)."""
    dropped: int = field(default=0, metadata=counter("outbox_dropped", "Outbox dropped readings"))
    """All drops together."""
    pending: int = field(
        default=0, metadata=gauge("outbox_pending", "Readings stored and not yet confirmed")
    )
    """Stored and not yet confirmed."""

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> OutboxSinkStats:
        """From the stored counters (``accepted``, ``delivered``, ``dropped_<reason>``,
        ``rejected_full``), deriving ``dropped`` and ``pending``."""
        dropped = counts["dropped_max_bytes"] + counts["dropped_max_age"]
        dropped += counts["dropped_dead_letter"]
        return cls(
            accepted=counts["accepted"],
            delivered=counts["delivered"],
            dropped_max_bytes=counts["dropped_max_bytes"],
            dropped_max_age=counts["dropped_max_age"],
            dropped_dead_letter=counts["dropped_dead_letter"],
            rejected_full=counts["rejected_full"],
            dropped=dropped,
            pending=counts["accepted"] - counts["delivered"] - dropped,
        )


@dataclass(slots=True)
class OutboxStats:
    """The outbox's figures: configured sinks (exported) and retired ones."""

    sinks: dict[str, OutboxSinkStats] = field(default_factory=dict, metadata=keyed("sink"))
    retired: dict[str, OutboxSinkStats] = field(default_factory=dict)
    """Sinks no longer configured that still have readings pending: they stay
    stored until purged on purpose or dropped by retention."""
    oldest_pending_age: dict[str, float] = field(
        default_factory=dict,
        metadata=gauge(
            "outbox_oldest_pending_age_seconds",
            "Seconds since the oldest reading not yet confirmed by the sink was stored",
            label="sink",
        ),
    )
    """Per configured sink: age of its oldest unconfirmed record (0: none)."""
