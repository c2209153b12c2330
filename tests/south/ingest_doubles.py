"""Test ingests for the protocol adapters (CoAP, Modbus, OPC-UA, serial, BLE).

``RecordingIngest`` keeps every submitted batch and lets a test wait for a
number of readings without sleeping; with ``auto=False`` the test resolves
each batch's future by hand, which is how the CoAP tests prove that the
device's acknowledgement waits for the ingest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from edgeway.ingest import IngestStatus
from edgeway.reading import Reading


class RecordingIngest:
    """Records batches; resolves them at once (``auto``) or when the test says."""

    batchable = True  # one status for everything

    def __init__(self, *, auto: bool = True, status: IngestStatus = IngestStatus.ACCEPTED) -> None:
        self.auto = auto
        self.status = status
        self.batches: list[list[Reading]] = []
        self.pending: list[asyncio.Future[IngestStatus]] = []
        self._changed = asyncio.Event()

    @property
    def readings(self) -> list[Reading]:
        return [r for b in self.batches for r in b]

    def submit(self, readings: Sequence[Reading]) -> asyncio.Future[IngestStatus]:
        self.batches.append(list(readings))
        fut: asyncio.Future[IngestStatus] = asyncio.get_running_loop().create_future()
        if self.auto:
            fut.set_result(self.status)
        else:
            self.pending.append(fut)
        self._changed.set()
        return fut

    def is_saturated(self) -> bool:
        return self.status is IngestStatus.REJECTED_FULL

    async def wait_readings(self, n: int, within: float = 10.0) -> list[Reading]:
        """Wait until at least ``n`` readings were submitted."""
        async with asyncio.timeout(within):
            while len(self.readings) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.readings

    async def wait_pending(self, n: int = 1, within: float = 10.0) -> None:
        """Wait until ``n`` batches are waiting for the test to resolve them."""
        async with asyncio.timeout(within):
            while len(self.pending) < n:
                self._changed.clear()
                await self._changed.wait()


async def wait_until(pred: Callable[[], bool], within: float = 10.0, step: float = 0.02) -> None:
    """Poll ``pred`` (state that has no event to wait on) for at most ``within`` seconds."""
    for _ in range(int(within / step) + 1):
        if pred():
            return
        await asyncio.sleep(step)
    raise TimeoutError(f"condition not met within {within} s")
