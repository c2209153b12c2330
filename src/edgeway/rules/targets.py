"""Where rule actions go: the services a running gateway hands the rules.

Kept apart from :mod:`edgeway.rules.actions` so the gateway can hold an
:class:`ActionTargets` without importing the rule engine when no rule is
configured.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from edgeway.reading import MetricValue, Reading


class AlarmTarget(Protocol):
    """What a rule needs of the alarm service (edgeway.alarms.service.AlarmService)."""

    async def raise_alarm(
        self,
        source: str,
        type: str,
        *,
        severity: int,
        message: str,
        by: str,
        values: dict[str, MetricValue] | None = None,
    ) -> Any: ...

    async def clear_alarm(self, source: str, type: str, *, by: str, message: str = "") -> Any: ...


class CommandTarget(Protocol):
    """What a rule needs of :class:`edgeway.commands.service.CommandService`."""

    async def submit(
        self,
        device_id: str,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        ttl: float | None = None,
        result_timeout: float | None = None,
        idempotency_key: str | None = None,
        source: str = "api",
        command_id: str | None = None,
        redelivery: bool = False,
    ) -> tuple[Any, bool]: ...

    def submit_journaled(
        self,
        device_id: str,
        name: str,
        params: dict[str, Any],
        *,
        ttl: float | None,
        idempotency_key: str,
        command_id: str,
        source: str,
    ) -> tuple[Any, asyncio.Future[None]]: ...


class TwinTarget(Protocol):
    """What a rule needs of :class:`edgeway.twins.service.TwinService`: a
    merge patch of a device's desired state, on disk when it returns."""

    async def patch(
        self,
        device_id: str,
        section: Literal["desired", "reported"],
        patch: Any,
        *,
        if_match: int | None = None,
        by: str,
    ) -> Any: ...

    async def list(self, limit: int = 100, after: str = "") -> list[Any]:
        """Stored twins by device id (``Twin``: device_id, desired,
        desired_version, reported, reported_version)."""
        ...

    def add_listener(self, listener: Callable[[Any, Any], None]) -> None: ...

    def remove_listener(self, listener: Callable[[Any, Any], None]) -> None: ...


@dataclass(slots=True)
class ActionTargets:
    """Where actions go; the gateway fills it as it builds its parts (a part
    left None fails its actions visibly: counted and logged)."""

    commands: CommandTarget | None = None
    publish: Callable[[str, bytes, int, bool], None] | None = None
    """(topic, payload, qos, retain) on the embedded broker."""
    alarms: AlarmTarget | None = None
    emit: Callable[[Sequence[Reading]], Any] | None = None
    """Records into the outbox (``Outbox.submit``)."""
    twins: TwinTarget | None = None
