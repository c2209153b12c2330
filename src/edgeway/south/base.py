"""The south adapter interface: how devices that are not MQTT clients of the
embedded broker reach the gateway.

An adapter owns one protocol's I/O (a CoAP or HTTP listener, a Modbus poller,
an OPC-UA subscription, a serial port, a client connection to another MQTT
broker). It turns what it receives into :class:`~edgeway.reading.Reading`s with
a codec and hands them to :meth:`edgeway.ingest.Ingest.submit`; where the
protocol has an acknowledgement, it acknowledges only when the future from
``submit`` resolves with ``ACCEPTED``.

Adapters register for a config section name with :func:`register_adapter`.
Each adapter's config model lives in its own configuration module
(``edgeway.south.<protocol>_config``, imported by the root schema so that errors
carry file, line and key); the gateway builds one adapter per configured entry.

An adapter is a :class:`~edgeway.runtime.component.Component`: ``start()`` runs
``run()`` in a task the adapter owns, ``stop(timeout)`` cancels it, ``health()``
reads its state and ``stats()`` returns an :class:`AdapterStats`.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel

from edgeway.downlink import Downlink, DownlinkEvents, ReceiptDownlink
from edgeway.ingest import Ingest
from edgeway.runtime.component import (
    HEALTHY,
    OMIT_NONE,
    Health,
    StartupError,
    counter,
    gauge,
)
from edgeway.south.decode_errors import DecodeErrorCounter

log = logging.getLogger(__name__)

DECODE_ERROR_DEVICES_SHOWN = 20
"""(device, reason) pairs listed per adapter in the status: the worst offenders,
so /api/status stays small however many devices send garbage."""

if TYPE_CHECKING:
    from edgeway.devices.identity import DeviceAccessControl


@dataclass(slots=True)
class AdapterState:
    """What an adapter reports about itself (admin API, metrics, stats)."""

    connected: bool = field(
        default=False, metadata=gauge("adapter_connected", "1 when connected or listening")
    )
    listening: bool | None = None
    """For adapters that serve devices on a socket (CoAP, HTTP): True while the
    listener is known to serve, False while it is down or restarting (health
    reports it); None for adapters that do not listen (pollers, clients)."""
    last_error: str | None = None
    last_error_at: float | None = None
    last_reading_at: float | None = None
    readings: int = field(default=0, metadata=counter("adapter_readings", "Readings received"))
    errors: int = field(default=0, metadata=counter("adapter_errors", "Errors (decode, peer)"))
    rejected: int = 0

    def record_readings(self, n: int) -> None:
        self.readings += n
        self.last_reading_at = time.time()

    def record_error(self, error: BaseException | str) -> None:
        self.errors += 1
        self.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.last_error_at = time.time()


@dataclass(slots=True, frozen=True)
class DecodeErrorEntry:
    """How many payloads of one device failed to decode for one reason."""

    device_id: str
    reason: str
    count: int


@dataclass(slots=True)
class AdapterStats(AdapterState):
    """An adapter's state plus its refusals, command figures and decode failures
    (by reason, and the worst devices) where the adapter has them."""

    refusals: dict[str, int] | None = field(default=None, metadata=OMIT_NONE)
    """Requests refused before decoding, by reason (listeners)."""
    commands: Any = field(default=None, metadata=OMIT_NONE)
    """The adapter's command delivery figures (a dataclass), if it takes commands."""
    # Per reason, not per device: reasons are a small fixed set (codec slugs),
    # device ids are not, and a label per device would grow the series without bound.
    decode_errors: dict[str, int] | None = field(
        default=None,
        metadata=counter(
            "adapter_decode_errors",
            "Payloads that did not decode, by reason",
            label="reason",
            omit_none=True,
        ),
    )
    decode_errors_by_device: list[DecodeErrorEntry] | None = field(default=None, metadata=OMIT_NONE)


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
    config_model: ClassVar[type[BaseModel]]
    """The model of one entry of that section, from the adapter's own
    configuration module (``edgeway.south.<protocol>_config``); the root
    schema's field for the section holds it (a test checks the two agree)."""

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
        self._task: asyncio.Task[None] | None = None

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

    # ---------------------------------------------------------- as a component

    async def supervise(self, *, fatal: bool = True) -> None:
        """Run the adapter; a failure before it was ever ready is fatal (a port in
        use, a missing device: the operator must fix it) and raises
        :class:`~edgeway.runtime.component.StartupError`; a failure later is a bug or a resource
        problem: logged, and the adapter restarted with backoff, so one protocol
        never takes the gateway down. With ``fatal=False`` (an adapter a reload
        started) a failure before ready ends the task with the error recorded in
        ``state`` instead: the reload rolls back."""
        backoff = Backoff(initial=1.0, maximum=60.0)
        while True:
            try:
                await self.run()
                return
            except Exception as e:
                if not self.ready.is_set():
                    if not fatal:
                        self.state.record_error(e)
                        return
                    raise StartupError(f"{self.section} adapter {self.name}: {e}") from e
                self.state.record_error(e)
                log.exception("south adapter %s failed; restarting", self.name)
                await backoff.wait()

    async def start(self, *, group: asyncio.TaskGroup | None = None, fatal: bool = False) -> None:
        """Run :meth:`supervise` in a task, until :meth:`stop`: in ``group``
        (the gateway's TaskGroup, which a ``fatal`` start-up error then stops)
        or, alone, in a task of the adapter's own. Returns at once: ``ready``
        tells when the adapter serves, ``state`` why it does not, and
        :attr:`gave_up` whether it ended before it ever served."""
        if self._task is not None and not self._task.done():
            return
        run = self.supervise(fatal=fatal)
        name = f"south:{self.name}"
        if group is not None:
            self._task = group.create_task(run, name=name)
        else:
            self._task = asyncio.get_running_loop().create_task(run, name=name)

    @property
    def gave_up(self) -> bool:
        """Its run ended before it was ever ready (a port in use: the error is
        in ``state``); a reload that started it rolls back."""
        task = self._task
        return task is not None and task.done() and not self.ready.is_set()

    async def stop(self, grace: float) -> None:
        """Cancel the task :meth:`start` made and wait up to ``grace`` seconds for it."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            log.warning("south adapter %s did not stop within %.1f s", self.name, grace)

    def health(self) -> Health:
        """Unhealthy while a listener is known not to serve (down, restarting):
        devices that reach the gateway that way get no answer."""
        if self.state.listening is False:
            return Health.failing(f"{self.section}:{self.name} is not serving")
        return HEALTHY

    def stats(self) -> AdapterStats:
        """The state, plus refusals, command figures and decode failures."""
        out = AdapterStats(**{f: getattr(self.state, f) for f in AdapterState.__dataclass_fields__})
        refusals = getattr(self, "refusals", None)
        if isinstance(refusals, dict):
            out.refusals = dict(refusals)
        command_stats = getattr(self, "command_stats", None)
        if dataclasses.is_dataclass(command_stats) and not isinstance(command_stats, type):
            out.commands = command_stats
        errors = getattr(self, "decode_errors", None)
        if isinstance(errors, DecodeErrorCounter):
            out.decode_errors = errors.by_reason()
            out.decode_errors_by_device = [
                DecodeErrorEntry(device, reason, n)
                for (device, reason), n in errors.counts.most_common(DECODE_ERROR_DEVICES_SHOWN)
            ]
        return out


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
