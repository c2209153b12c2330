"""Desired twin changes from the cloud, through the command downlink.

A cloud request (any cloud downlink: MQTT sink, NATS, HTTP long-poll)::

    {"id": "t-81", "device_id": "pump-1", "name": "twin.desired",
     "params": {"patch": {"setpoint": 42}, "version": 6}}

is a command named ``twin.desired`` for the device; this downlink takes it
whether or not the device is connected (the twin is the gateway's), merges
``patch`` into the device's desired document and answers with the command's
result ``{"version": <new desired version>}`` (or fails with ``conflict``,
``too_large``, ``too_deep``, ``invalid``). ``version`` is optional: when given,
the patch applies only if desired is still at that version (the cloud's
optimistic concurrency). The device then gets the delta over its own
protocol (docs/twins.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeway.commands.model import Command, CommandResult
from edgeway.downlink import GatewayHandled
from edgeway.twins.model import TwinError

if TYPE_CHECKING:
    from edgeway.downlink import DownlinkEvents
    from edgeway.twins.service import TwinService

COMMAND = "twin.desired"


class TwinDownlink(GatewayHandled):
    name = "twins"

    def __init__(self, service: TwinService, events: DownlinkEvents) -> None:
        super().__init__()
        self.service = service
        self.events = events

    def reachable(self, command: Command) -> bool:
        return command.name == COMMAND

    async def handle(self, command: Command) -> None:
        params: dict[str, Any] = command.params
        try:
            unknown = set(params) - {"patch", "version"}
            if unknown:
                raise TwinError("invalid", f"unknown parameters: {', '.join(sorted(unknown))}")
            version = params.get("version")
            if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
                raise TwinError("invalid", "version must be an integer")
            twin = await self.service.patch(
                command.device_id,
                "desired",
                params.get("patch"),
                if_match=version,
                by=command.source,
            )
        except TwinError as e:
            self.events.report(
                CommandResult(
                    command.id,
                    command.device_id,
                    False,
                    result={"error": e.code, "message": str(e), **e.extra},
                    error=f"{e.code}: {e}",
                )
            )
            return
        self.events.report(
            CommandResult(
                command.id, command.device_id, True, result={"version": twin.desired_version}
            )
        )
