"""The south adapter interface: how devices that are not MQTT clients of the
embedded broker reach the gateway.

An adapter owns one protocol's I/O (a CoAP or HTTP listener, a Modbus poller,
an OPC-UA subscription, a serial port, a client connection to another MQTT
broker). It turns what it receives into :class:`~edgeway.reading.Reading`s with
a codec and hands them to :meth:`edgeway.ingest.Ingest.submit`; where the
protocol has an acknowledgement, it acknowledges only when the future from
``submit`` resolves with ``ACCEPTED``.

Adapters register for a config section name with :func:`register_adapter`.
Each adapter's config model lives in ``edgeway.config`` (so that errors carry
file, line and key); the gateway builds one adapter per configured entry.
"""

from __future__ import annotations

import abc
import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from edgeway.downlink import Downlink, DownlinkEvents, ReceiptDownlink
from edgeway.ingest import Ingest

if TYPE_CHECKING:
    from edgeway.devices.identity import DeviceAccessControl


@dataclass(slots=True)
class AdapterState:
    """What an adapter reports about itself (admin API, metrics, stats)."""

    connected: bool = False
    listening: bool | None = None
    """For adapters that serve devices on a socket (CoAP, HTTP): True while the
    listener is known to serve, False while it is down or restarting (health
    reports it); None for adapters that do not listen (pollers, clients)."""
    last_error: str | None = None
    last_error_at: float | None = None
    last_reading_at: float | None = None
    readings: int = 0
    errors: int = 0
    rejected: int = 0

    def record_readings(self, n: int) -> None:
        self.readings += n
        self.last_reading_at = time.time()

    def record_error(self, error: BaseException | str) -> None:
        self.errors += 1
        self.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.last_error_at = time.time()


class SouthAdapter(abc.ABC):
    """One configured device-side endpoint or poller.

    ``run()`` runs until cancelled. It must never raise because a peer
    misbehaves: it reconnects forever with :class:`Backoff` and records the
    error in ``state``. It may raise at start for a local, permanent problem
    (a port in use, a serial device or BLE adapter that does not exist), with
    a one-line message.
    """

    section: ClassVar[str] = ""
    """The top-level config key this adapter type is configured under."""

    def __init__(self, config: Any, *, ingest: Ingest, gateway_id: str, data_dir: Path) -> None:
        self.config = config
        self.ingest = ingest
        self.gateway_id = gateway_id
        self.data_dir = data_dir
        self.state = AdapterState()
        self.ready = asyncio.Event()
        """Set once listening/connected for the first time (tests wait on it)."""
        self.access: DeviceAccessControl | None = None
        """Per-device credentials and ACL (set by the gateway; None: the
        adapter's own config decides, as in tests building it alone)."""

    @property
    def name(self) -> str:
        return str(getattr(self.config, "name", self.section))

    @abc.abstractmethod
    async def run(self) -> None:
        """Serve or poll until cancelled."""

    def downlink(self, events: DownlinkEvents) -> Downlink | None:
        """This adapter's way to reach devices with commands, if it has one
        (see :mod:`edgeway.downlink`); the gateway registers it."""
        return None

    def receipt_downlink(self) -> ReceiptDownlink | None:
        """This adapter's way to send receipts, if it has one (see
        :mod:`edgeway.receipts`). The gateway asks once receipts are enabled;
        an adapter may start remembering its devices from then on."""
        return None


class Backoff:
    """Capped exponential backoff with full jitter, never giving up.

    ``initial`` 0.5 s and ``maximum`` 30 s by default: fast enough to recover
    from a restart of the peer, slow enough not to hammer a peer that is down.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next_delay(self) -> float:
        # The exponent stops at 62: 2**attempt as a float overflows at attempt
        # 1024 (about 4 h of failures at a 30 s cap), and "forever" must hold.
        cap = min(self.maximum, self.initial * (2 ** min(self.attempt, 62)))
        self.attempt += 1
        return random.uniform(0, cap)

    def reset(self) -> None:
        self.attempt = 0

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())


_REGISTRY: dict[str, type[SouthAdapter]] = {}
_A = TypeVar("_A", bound=type[SouthAdapter])


def register_adapter(cls: _A) -> _A:
    """Class decorator: register an adapter type for its ``section``."""
    _REGISTRY[cls.section] = cls
    return cls


def adapter_class(section: str) -> type[SouthAdapter]:
    """The adapter type for a config section, importing its module on demand."""
    import importlib

    from edgeway.south import SECTION_MODULES

    if section not in _REGISTRY and section in SECTION_MODULES:
        importlib.import_module(f"edgeway.south.{SECTION_MODULES[section]}")
    return _REGISTRY[section]


def registered_sections() -> list[str]:
    """Config sections that have an adapter type (built-in or registered)."""
    from edgeway.south import SECTION_MODULES

    return sorted(set(SECTION_MODULES) | set(_REGISTRY))


AdapterFactory = Callable[..., SouthAdapter]
