"""The outbox's configuration section (``outbox:``; docs/outbox.md)."""

from __future__ import annotations

from typing import Literal

from edgeway.config_types import (
    Duration,
    Size,
    _Model,
)


class OutboxSection(_Model):
    durability: Literal["fsync", "os"] = "fsync"
    """``fsync``: a committed reading survives power loss. ``os``: survives a
    process crash (the OS has it) but not a power cut; faster."""
    max_bytes: Size | None = None
    """Size limit of the stored backlog (none: disk is the limit)."""
    max_age: Duration | None = None
    """Readings older than this are dropped (counted per sink). Ages run on a
    clock that no wall-clock correction moves (docs/outbox.md, "Clocks")."""
    max_age_downtime: Duration = 0.0
    """How much of the time edgeway was stopped counts towards ``max_age``, at
    most (the wall-clock gap since the last commit, clamped). 0: none, since a
    board without a real-time clock cannot tell a long stop from a clock
    correction of years; set it (e.g. to ``max_age``) with a battery-backed clock."""
    when_full: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    """``drop_oldest`` (counted, logged) or ``reject_new`` (back-pressure to devices)."""
    drain: Literal["ordered", "live_first"] = "ordered"
    """``ordered``: per-device order; ``live_first``: fresh readings share the link with a backlog."""
    forward_early: bool = True
    """A sink that has sent everything gets a new reading while its group
    commit is under way, instead of after it: the forwarding latency of a
    broker bridge. The device is still acknowledged only after the commit. A
    reading whose commit then fails (a full disk) or is cut short by a crash
    or power cut may have reached the cloud unacknowledged; the device sends
    it again (at least once, as always). ``false``: sinks send only what is
    on disk."""
    commit_interval: Duration = 0.0
    """Extra wait before a group commit to gather more readings (0: commit as
    soon as the previous commit finished)."""
    disk_reserve: Size = 8 * 1024 * 1024
    """Disk space held back in ``outbox.db.reserve`` and released when the disk
    is full, so that sinks' confirmations still commit and the backlog drains
    (0: none). 8 MiB is twice the WAL SQLite lets grow between checkpoints
    (1,000 pages of 4 KiB). Readings are refused while the disk is full and
    accepted again once twice this is free."""
