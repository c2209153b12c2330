"""Commands to devices the gateway polls: Modbus writes, OPC-UA writes and
method calls.

The gateway is the client of these devices, so a command is a request it
makes and the device's answer is the result: delivery and result come
together. The points and nodes a command may write are the ones configured
for reading with ``writable: true``; data type, byte/word order and scaling
are the read's, applied in reverse. Commands a device understands:

``write``  ``params: {"setpoint": 61, "pump_on": true}``
    Writes each named point, in the order given; the result lists what was
    written. A point that does not exist or is not writable, or a value it
    cannot hold, fails the command before anything is written.
``call`` (OPC-UA)  ``params: {"method": "reset", "args": [1, 2]}``
    Calls a configured method; the result is its output.
any configured OPC-UA method name  ``params: {"args": [...]}``
    The same as ``call`` with that method.

A device that is not connected keeps its commands queued; they go out, in
order, when the adapter is connected again (checked every
``commands`` timer tick for the devices that have commands waiting).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from edgeway.commands.model import Command, CommandResult
from edgeway.downlink import DeliveryError, DownlinkEvents
from edgeway.reading import MetricValue

if TYPE_CHECKING:
    from edgeway.south.base import SouthAdapter

log = logging.getLogger(__name__)


def _check_value(metric: str, value: Any) -> MetricValue:
    if isinstance(value, bool | int | float | str):
        return value
    raise DeliveryError(f"{metric}: a value must be a number, a boolean or a string")


class WriteDownlink:
    """The :class:`~edgeway.downlink.Downlink` of one polled device."""

    def __init__(self, adapter: SouthAdapter, device_id: str, events: DownlinkEvents) -> None:
        self.adapter = adapter
        self.device_id = device_id
        self.events = events
        self.name = adapter.section
        self.devices = (device_id,)
        """The devices this downlink serves (the command timer polls them)."""
        self._tasks: set[asyncio.Task[Any]] = set()

    def reachable(self, command: Command) -> bool:
        return command.device_id == self.device_id and self.adapter.state.connected

    def deliver(self, command: Command) -> asyncio.Future[bool]:
        """Validate at once (a command the device can never take raises
        DeliveryError), then write; the future resolves True once the device
        answered, whatever it answered (the result says), False if the
        connection was lost first."""
        plan = self._plan(command)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(command, plan, fut), name=f"command:{command.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    def _plan(self, command: Command) -> list[tuple[str, Any]]:
        params = command.params
        methods = self._methods()
        if command.name == "write":
            if not params:
                raise DeliveryError("write needs params: {point: value, ...}")
            steps = [("write", (m, _check_value(m, v))) for m, v in params.items()]
            for _, (metric, _v) in steps:
                self._check_writable(metric)
            return steps
        if command.name == "call" or command.name in methods:
            method = params.get("method") if command.name == "call" else command.name
            args = params.get("args", [])
            if not isinstance(method, str) or method not in methods:
                raise DeliveryError(f"no method {method!r} (configured: {sorted(methods)})")
            if not isinstance(args, list):
                raise DeliveryError("args must be a list")
            return [("call", (method, args))]
        raise DeliveryError(
            f"unknown command {command.name!r} for a {self.adapter.section} device "
            "(write" + (", call or a method name" if methods else "") + ")"
        )

    def _methods(self) -> set[str]:
        return {m.name for m in getattr(self.adapter.config, "methods", [])}

    def _check_writable(self, metric: str) -> None:
        try:
            self.adapter.writable_point(metric)  # type: ignore[attr-defined]
        except (KeyError, PermissionError) as e:
            raise DeliveryError(str(e.args[0])) from None

    async def _run(
        self, command: Command, plan: list[tuple[str, Any]], fut: asyncio.Future[bool]
    ) -> None:
        done: dict[str, Any] = {}
        output: Any = None
        try:
            for kind, arg in plan:
                if kind == "write":
                    metric, value = arg
                    await self.adapter.write(metric, value)  # type: ignore[attr-defined]
                    done[metric] = value
                else:
                    method, args = arg
                    output = await self.adapter.call(method, *args)  # type: ignore[attr-defined]
        except ConnectionError:
            if not fut.done():
                fut.set_result(False)  # sent again when the device is back
            return
        except asyncio.CancelledError:
            if not fut.done():
                fut.set_result(False)
            raise
        except (KeyError, PermissionError, ValueError) as e:
            self._answer(fut, command, False, done or None, f"{type(e).__name__}: {e}")
            return
        except Exception as e:  # the device refused (Modbus exception, OPC-UA status)
            self._answer(fut, command, False, done or None, f"{type(e).__name__}: {e}")
            return
        result: Any = {"written": done} if plan[0][0] == "write" else {"output": _jsonable(output)}
        self._answer(fut, command, True, result, None)

    def _answer(
        self,
        fut: asyncio.Future[bool],
        command: Command,
        success: bool,
        result: Any,
        error: str | None,
    ) -> None:
        if not fut.done():
            fut.set_result(True)
        self.events.report(CommandResult(command.id, command.device_id, success, result, error))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)
