"""The downlink interface: how the gateway reaches a device, the mirror of
:mod:`edgeway.ingest`.

A south adapter that can talk to a device implements :class:`Downlink` and
registers it with the :class:`~edgeway.commands.service.CommandService`.
Nothing else in the gateway speaks a device's protocol: rules, the admin API,
the cloud and (later) twins and firmware updates all go through commands.

The contract, for an adapter:

* :meth:`Downlink.reachable` answers now, without I/O, whether a command can
  be handed to the device (an MQTT device is connected and subscribed to its
  command topic; an HTTP device is long-polling; a Modbus point exists).
* :meth:`Downlink.deliver` hands one command over. The future resolves
  ``True`` once the device's transport took it (MQTT PUBACK from the device's
  session, the HTTP long-poll response written, a Modbus write answered),
  ``False`` if the device went away before that (the service keeps the command
  and sends it again, flagged as a redelivery, when the device is back). It
  raises :class:`DeliveryError` for a command the device can never take (an
  unknown Modbus point): the command fails at once.
* When a device becomes reachable (connects, subscribes, polls) the adapter
  calls :meth:`DownlinkEvents.device_reachable` so queued commands go out; a
  device's answer comes back through :meth:`DownlinkEvents.report`.
  Adapters whose transport answers synchronously (Modbus, OPC-UA) report the
  result right after delivering.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from edgeway.commands.model import Command, CommandResult


class DeliveryError(Exception):
    """The device can never take this command (the message says why)."""


class Downlink(Protocol):
    """Reaches devices over one adapter's protocol."""

    name: str
    """Which adapter this is (``mqtt``, ``coap``, ``http``, ...), for status.
    A downlink whose transport keeps a device's commands in order may also
    say ``ordered = True``: the queue then hands several over before the
    first is confirmed (edgeway.commands.service.ORDERED_IN_FLIGHT)."""

    def reachable(self, command: Command) -> bool:
        """Whether ``command`` can be handed to its device now (no I/O)."""
        ...

    def deliver(self, command: Command) -> asyncio.Future[bool]:
        """Hand ``command`` to its device; see the module docstring."""
        ...


class DownlinkEvents(Protocol):
    """What a downlink tells the command service."""

    def device_reachable(self, device_id: str) -> None:
        """The device may now take commands: send what is queued for it."""
        ...

    def report(self, result: CommandResult) -> bool:
        """A device answered a command; False if the answer was not taken
        (unknown command, another device's command, already finished)."""
        ...


class ReceiptDownlink(Protocol):
    """A way to reach devices with receipts (:mod:`edgeway.receipts`).

    Receipts are the one producer on the downlink that is not a command: they
    are not queued on disk (a lost one is superseded by the next, which names
    the highest confirmed sequence), so an adapter hands them straight to its
    transport instead of through the command queue.
    """

    name: str
    """Which adapter this is, for status."""

    def send_receipt(self, device_id: str, payload: bytes, default_topic: str) -> bool:
        """Send ``payload`` to ``device_id`` now if this adapter reaches it
        (no I/O wait: queue it on the transport). ``default_topic`` is the
        ``receipts.topic`` template; an adapter may have its own. False: this
        adapter does not know the device, or cannot send now."""
        ...


class GatewayHandled:
    """Base of the downlinks the gateway serves itself, without a device's
    transport (pushed configurations, cloud twin requests): a command is
    taken at once (delivered) and :meth:`handle` runs in a task of its own
    that reports the result; :meth:`close` ends those still running."""

    name = "gateway"

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def deliver(self, command: Command) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        fut.set_result(True)  # taken: the result follows when it is done
        task = asyncio.create_task(self.handle(command), name=f"{self.name} {command.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def handle(self, command: Command) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
