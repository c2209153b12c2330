"""Commands to devices and their results: the shared types.

A :class:`Command` goes down to one device; its state moves along::

    QUEUED -> SENT -> DELIVERED -> SUCCEEDED | FAILED | TIMED_OUT
       |        |                    (the device answered, or did not in time)
       +--------+--> EXPIRED (its time to live ended before delivery)
       +--------+----------> CANCELLED (by an operator)

``SENT`` means handed to the device's transport; ``DELIVERED`` means the
transport confirmed it (an MQTT PUBACK from the device). A command SENT
before a crash or a disconnect is sent again with ``redelivery: true`` and the
same id, so a device that remembers ids runs it once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class CommandState(enum.StrEnum):
    """Where a command is in its life (see the module docstring)."""

    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {
        CommandState.SUCCEEDED,
        CommandState.FAILED,
        CommandState.EXPIRED,
        CommandState.TIMED_OUT,
        CommandState.CANCELLED,
    }
)


@dataclass(slots=True)
class Command:
    """One command for one device, as the queue keeps it."""

    id: str
    device_id: str
    name: str
    params: dict[str, Any]
    created_at: float
    """Wall-clock seconds when it was queued."""
    expires_at: float
    """Wall-clock seconds after which an undelivered command expires."""
    seq: int = 0
    """Queue order (FIFO per device), assigned when stored."""
    idempotency_key: str | None = None
    source: str = "api"
    """Who asked: ``api``, ``cli``, ``cloud:<sink>``, ``rule:<name>``."""
    state: CommandState = CommandState.QUEUED
    attempts: int = 0
    """Times handed to the device's transport (> 1: redeliveries)."""
    updated_at: float = 0.0
    delivered_at: float | None = None
    result: Any = None
    error: str | None = None

    @property
    def redelivery(self) -> bool:
        return self.attempts > 1

    def to_json(self) -> dict[str, Any]:
        """The command as the API, the CLI and the uplink records show it."""
        return {
            "id": self.id,
            "device_id": self.device_id,
            "name": self.name,
            "params": self.params,
            "state": self.state.value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "updated_at": self.updated_at,
            "delivered_at": self.delivered_at,
            "attempts": self.attempts,
            "idempotency_key": self.idempotency_key,
            "source": self.source,
            "result": self.result,
            "error": self.error,
        }

    def device_payload(self) -> dict[str, Any]:
        """What the device receives (every protocol sends this JSON object)."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "params": self.params,
            "expires_at": self.expires_at,
        }
        if self.redelivery:
            out["redelivery"] = True
        return out


@dataclass(slots=True, frozen=True)
class CommandResult:
    """A device's answer to a command."""

    command_id: str
    device_id: str
    success: bool
    result: Any = None
    error: str | None = None

    @classmethod
    def from_payload(cls, device_id: str, doc: Any, command_id: str | None = None) -> CommandResult:
        """Read a device's answer: a JSON object with ``id`` (unless the
        transport carries it, e.g. MQTT 5 correlation data), ``status``
        (``ok``/``success``/``succeeded`` or ``error``/``failed``; without it,
        success unless ``error`` is set), and optional ``result`` / ``error``.
        Raises ValueError for anything else."""
        if not isinstance(doc, dict):
            raise ValueError("a command result must be a JSON object")
        cid = command_id or doc.get("id")
        if not isinstance(cid, str) or not cid:
            raise ValueError("a command result needs the command's id")
        status = doc.get("status")
        error = doc.get("error")
        if error is not None and not isinstance(error, str):
            error = str(error)
        if status is None:
            success = error is None
        elif isinstance(status, str) and status.lower() in _OK:
            success = True
        elif isinstance(status, str) and status.lower() in _FAILED:
            success = False
        else:
            raise ValueError(f"unknown status {status!r} (ok or error)")
        return cls(cid, device_id, success, doc.get("result"), error)


_OK = frozenset({"ok", "success", "succeeded", "done"})
_FAILED = frozenset({"error", "failed", "failure", "fail"})
