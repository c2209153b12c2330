"""The ingest interface: how south adapters hand readings to the gateway.

An adapter calls :meth:`Ingest.submit` synchronously with the readings decoded
from one device message and gets back a future. The future completes when the
readings are *safe*: handled by the pipeline and whatever it produced is
durable in the outbox. Only then may the adapter acknowledge the device (MQTT
PUBACK/PUBREC, CoAP ACK, HTTP 2xx). This is guarantee 1 of DESIGN.md.

``submit`` is deliberately not a coroutine: the MQTT hot path must not create
a task per message. Implementations batch: many submits made in the same loop
iteration typically share one future (one group commit, one fsync).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from typing import Protocol

from edgeway.reading import Reading


class IngestStatus(enum.Enum):
    """What became of a submitted batch of readings."""

    ACCEPTED = "accepted"
    """Safe: durable (or, for an in-memory ingest, held)."""
    REJECTED_FULL = "rejected_full"
    """Refused because the outbox is full and its policy is ``reject_new``.
    MQTT v5 answers 0x97 (quota exceeded); HTTP answers 503; CoAP 5.03."""
    REJECTED_INVALID = "rejected_invalid"
    """Refused by validation in the pipeline (the reason is counted there)."""
    REJECTED_DEVICE = "rejected_device"
    """Refused because of who sent it: a disabled device, or one the registry
    does not know on a listener that refuses unregistered devices
    (edgeway.devices.presence). HTTP answers 403; CoAP 4.03."""


class Ingest(Protocol):
    """Accepts readings and tells when they are safe."""

    @property
    def batchable(self) -> bool:
        """True when the readings of several device messages may be submitted
        together: each message would get the same answer alone as the whole
        batch gets (no per-message validation). The MQTT broker then stores a
        read's telemetry with one submit; otherwise it submits per message."""
        ...

    def submit(self, readings: Sequence[Reading]) -> asyncio.Future[IngestStatus]:
        """Hand over readings; the future resolves once they are safe."""
        ...

    def is_saturated(self) -> bool:
        """True while new readings would be refused (``reject_new`` and full).

        Adapters without a refusal code (MQTT 3.1.1) stop reading their sockets
        while this is true.
        """
        ...


class MemoryIngest:
    """An ingest that keeps readings in a list and accepts at once.

    For tests and for running the broker without an outbox.
    """

    batchable = True

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def submit(self, readings: Sequence[Reading]) -> asyncio.Future[IngestStatus]:
        self.readings.extend(readings)
        fut: asyncio.Future[IngestStatus] = asyncio.get_running_loop().create_future()
        fut.set_result(IngestStatus.ACCEPTED)
        return fut

    def is_saturated(self) -> bool:
        return False
