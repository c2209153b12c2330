"""The ingest the adapters and the broker hold: a switch in front of the
pipeline, so a reload can replace the pipeline (and the outbox behind it)
without touching a device connection.

While the data path is being replaced (:meth:`IngestSwitch.hold`), submits
are kept with their futures and handed to the new pipeline when it is in
place (:meth:`IngestSwitch.release`); devices wait for their
acknowledgements meanwhile (milliseconds), nothing is refused or lost. The
number of readings held is bounded by what devices may have unacknowledged
(MQTT receive maximum, HTTP requests in flight), as at any other time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from edgeway.ingest import Ingest, IngestStatus
from edgeway.reading import Reading


class IngestSwitch:
    """Forwards :class:`~edgeway.ingest.Ingest` calls to the current target."""

    def __init__(self, target: Ingest) -> None:
        self.target = target
        self._held: list[tuple[list[Reading], asyncio.Future[IngestStatus]]] | None = None
        self.tap: Callable[[Sequence[Reading]], None] | None = None
        """Sees every submitted batch first (the HMI's recent values); it
        must be quick and must not raise."""

    @property
    def batchable(self) -> bool:
        return self.target.batchable

    def submit(self, readings: Sequence[Reading]) -> asyncio.Future[IngestStatus]:
        if self.tap is not None:
            self.tap(readings)
        held = self._held
        if held is None:
            return self.target.submit(readings)
        fut: asyncio.Future[IngestStatus] = asyncio.get_running_loop().create_future()
        held.append((list(readings), fut))
        return fut

    def is_saturated(self) -> bool:
        return self._held is None and self.target.is_saturated()

    def hold(self) -> None:
        """Keep new submits until :meth:`release`."""
        if self._held is None:
            self._held = []

    def release(self, target: Ingest | None = None) -> int:
        """Forward to ``target`` (or the same one) from now on; hand it what was
        held, in order. Returns the number of submits handed over."""
        if target is not None:
            self.target = target
        held, self._held = self._held or [], None
        for readings, fut in held:
            inner = self.target.submit(readings)
            _chain(inner, fut)
        return len(held)


def _chain(inner: asyncio.Future[IngestStatus], outer: asyncio.Future[IngestStatus]) -> None:
    def done(f: asyncio.Future[IngestStatus]) -> None:
        if outer.done():
            return
        if f.cancelled():
            outer.cancel()
        elif f.exception() is not None:
            outer.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            outer.set_result(f.result())

    inner.add_done_callback(done)
