"""A base for services that answer devices' requests on the embedded broker
(twins, firmware chunks): who may ask for a device, how many of its requests
are worked on at once, and the tasks that do the work.

A subclass registers as a BrokerObserver with :meth:`attach`, checks each
request with :meth:`admit` (the client must speak for the device,
``Broker.speaks_for``; refusals are logged and counted in ``refused``), takes
a slot with :meth:`take` (False when the device has ``max_pending``
unanswered), runs the work with :meth:`spawn` and gives the slot back with
:meth:`release`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeway.south.mqtt.broker import Broker
    from edgeway.south.mqtt.packets import Properties
    from edgeway.south.mqtt.session import Session

log = logging.getLogger(__name__)


class DeviceRequests:
    """Per-device admission and work tasks (see the module docstring)."""

    what = "request"
    """Named in the refusal's log line."""

    def __init__(self, broker: Broker, max_pending: int) -> None:
        self.broker = broker
        self.max_pending = max_pending
        self._pending: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0
        """Requests from a client that does not speak for the device."""

    def attach(self) -> None:
        self.broker.observers.append(self)

    def detach(self) -> None:
        if self in self.broker.observers:
            self.broker.observers.remove(self)
        for t in list(self._tasks):
            t.cancel()

    # BrokerObserver's other calls: nothing to do unless a subclass says so.
    def session_online(self, session: Session) -> None:
        pass

    def session_offline(self, session: Session) -> None:
        pass

    def subscribed(self, session: Session, topic_filter: str) -> None:
        pass

    def published(
        self, topic: str, payload: bytes, properties: Properties | None, sender: str
    ) -> None:
        raise NotImplementedError

    def admit(self, sender: str, device: str) -> bool:
        """Whether ``sender`` may ask for ``device``; a refusal is logged and counted."""
        if self.broker.speaks_for(sender, device):
            return True
        self.refused += 1
        log.warning(
            "%s refused: a client may not ask for another device",
            self.what,
            extra={"fields": {"client_id": sender, "device_id": device}},
        )
        return False

    def take(self, device: str) -> bool:
        """A slot for one more request of ``device``; False when it has
        ``max_pending`` being worked on."""
        n = self._pending.get(device, 0)
        if n >= self.max_pending:
            return False
        self._pending[device] = n + 1
        return True

    def release(self, device: str) -> None:
        n = self._pending.get(device, 1) - 1
        if n > 0:
            self._pending[device] = n
        else:
            self._pending.pop(device, None)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
