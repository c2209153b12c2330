"""Firmware images, campaigns and per-device results.

Per-device update states and result codes follow LwM2M Object 5 (Firmware
Update), so a device that speaks LwM2M maps one to one and others have a
well-known vocabulary:

- state: 0 idle, 1 downloading, 2 downloaded, 3 updating;
- result: 0 initial, 1 success, 2 not enough storage, 3 out of memory,
  4 connection lost during download, 5 integrity check failure, 6 unsupported
  package type, 7 invalid URI, 8 firmware update failed, 9 unsupported protocol.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class UpdateResult(enum.IntEnum):
    INITIAL = 0
    SUCCESS = 1
    NOT_ENOUGH_STORAGE = 2
    OUT_OF_MEMORY = 3
    CONNECTION_LOST = 4
    INTEGRITY_CHECK_FAILURE = 5
    UNSUPPORTED_PACKAGE = 6
    INVALID_URI = 7
    UPDATE_FAILED = 8
    UNSUPPORTED_PROTOCOL = 9

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: Any) -> UpdateResult:
        """A result from a device's answer: the code or its name; anything else
        is ``update_failed``."""
        if isinstance(value, bool):
            return cls.UPDATE_FAILED
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                return cls.UPDATE_FAILED
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                return cls.UPDATE_FAILED
        return cls.UPDATE_FAILED


class UpdateState(enum.IntEnum):
    IDLE = 0
    DOWNLOADING = 1
    DOWNLOADED = 2
    UPDATING = 3


class CampaignState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    """Stopped by its error threshold or a wave below its success threshold."""
    ABORTED = "aborted"
    COMPLETED = "completed"


class TargetState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True, frozen=True)
class Image:
    id: str
    version: str
    hardware: str
    size: int
    sha256: str
    signed_by: str | None
    created_at: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "hardware": self.hardware,
            "size": self.size,
            "sha256": self.sha256,
            "signed_by": self.signed_by,
            "created_at": self.created_at,
            "note": self.note,
        }


@dataclass(slots=True)
class Campaign:
    id: str
    image_id: str
    state: CampaignState
    created_at: float
    waves: list[str]
    """Wave names in order: ``canary`` first, then the groups."""
    canary_share: float = 0.1
    pace: float = 60.0
    """Devices started per minute, at most."""
    max_in_flight: int = 50
    success_threshold: float = 0.9
    """Share of a wave's finished devices that must succeed before the next wave starts."""
    error_threshold: float = 0.2
    """Share of failures (of finished devices, once ``min_finished`` finished) that halts."""
    min_finished: int = 5
    ttl: float = 3600.0
    """Time a device has to take and finish its update command."""
    selection: dict[str, Any] = field(default_factory=dict)
    """What the devices were selected by in the registry (groups, tags,
    type), resolved when the campaign was created; empty: named devices."""
    counted_since: float = 0.0
    """The thresholds count devices finished at or after this time: a resume
    after a halt sets it, so the failures that halted the campaign do not
    halt it again at once."""
    reason: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image_id": self.image_id,
            "state": self.state.value,
            "created_at": self.created_at,
            "waves": self.waves,
            "canary_share": self.canary_share,
            "pace": self.pace,
            "max_in_flight": self.max_in_flight,
            "success_threshold": self.success_threshold,
            "error_threshold": self.error_threshold,
            "min_finished": self.min_finished,
            "ttl": self.ttl,
            "selection": self.selection,
            "counted_since": self.counted_since,
            "reason": self.reason,
            "counts": self.counts,
            "updated_at": self.updated_at,
        }


@dataclass(slots=True)
class Target:
    campaign_id: str
    device_id: str
    wave: int
    order: int
    state: TargetState = TargetState.PENDING
    command_id: str | None = None
    result: int = 0
    detail: str = ""
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "wave": self.wave,
            "state": self.state.value,
            "command_id": self.command_id,
            "result": UpdateResult(self.result).label,
            "detail": self.detail,
            "updated_at": self.updated_at,
        }
