"""The shape every part of the running gateway shares: a component.

South adapters, the embedded broker, the pipeline, the outbox and every sink are
components. Each is built from its own configuration section, started, stopped
within a bounded time, asked for its health, and asked for typed stats::

    component = Outbox(path, gateway_id=..., config=cfg.outbox, sink_names=[...])
    await component.start()
    component.health()        # Health(ok=True, problems=())
    component.stats()         # OutboxStats(sinks={"cloud": OutboxSinkStats(...)}, ...)
    await component.stop(grace=2.0)

Stats are dataclasses, never dicts: ``/api/status`` is their ``asdict`` (two
keep the document's older shape: the broker's figures flat, ``BrokerStats.flat``,
and the pipeline's fuller ``Pipeline.report``, which ``edgeway stats`` reads too)
and ``/metrics`` is built from them. A field that is a Prometheus metric says so in
its metadata, with :func:`counter` or :func:`gauge` (name, help, and for a
mapping the label its keys become), so a figure is declared once, where it is
counted, and the collector (:func:`metric_samples`) hard-codes no key::

    @dataclass(slots=True)
    class SinkState:
        connected: bool = field(default=False, metadata=gauge("sink_connected", "1 when ..."))
        records_sent: int = field(default=0, metadata=counter("sink_records_sent", "Records ..."))
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

METRIC_PREFIX = "edgeway_"
"""Every metric a component declares is exported under this prefix."""


class MetricKind(enum.Enum):
    """Prometheus metric types a stats field can be."""

    COUNTER = "counter"
    """Counts since start; exported with the ``_total`` suffix."""
    GAUGE = "gauge"
    """A level that goes up and down."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """How one stats field is exported: its name (without ``edgeway_``), type
    and help; ``label`` names the label a mapping field's keys become (a
    mapping without one exports each key as its own metric, ``name`` + key)."""

    name: str
    kind: MetricKind
    help: str
    label: str | None = None


def counter(
    name: str, help: str, *, label: str | None = None, omit_none: bool = False
) -> dict[str, Any]:
    """Field metadata: export the field as the counter ``edgeway_<name>_total``
    (``label``: a mapping's keys become that label; ``omit_none``: see :data:`OMIT_NONE`)."""
    return {"metric": MetricSpec(name, MetricKind.COUNTER, help, label), "omit_none": omit_none}


def gauge(
    name: str, help: str, *, label: str | None = None, omit_none: bool = False
) -> dict[str, Any]:
    """Field metadata: export the field as the gauge ``edgeway_<name>``."""
    return {"metric": MetricSpec(name, MetricKind.GAUGE, help, label), "omit_none": omit_none}


OMIT_NONE: Mapping[str, Any] = {"omit_none": True}
"""Field metadata: a figure that is None where the component has no such thing,
left out of the status document (:func:`status_dict`) rather than shown as null."""


def keyed(label: str, key: str | None = None) -> dict[str, Any]:
    """Field metadata for stats dataclasses held by name (a mapping), or a list
    of them whose attribute ``key`` names each: their metrics carry the name as
    the label ``label`` (``sink``, ``route``)."""
    return {"keyed": (label, key)}


def status_dict(stats: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` of a stats dataclass, without its ``optional()``
    fields that are None: the JSON ``/api/status`` shows."""
    out = dataclasses.asdict(stats)
    for f in dataclasses.fields(stats):
        if f.metadata.get("omit_none") and out.get(f.name) is None:
            del out[f.name]
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one metric: its spec, its labels (name -> value) and the number."""

    spec: MetricSpec
    labels: tuple[tuple[str, str], ...]
    value: float


def _number(value: Any) -> float:
    if value is None:
        return 0.0
    return float(value)  # bools become 1.0 / 0.0


def metric_samples(stats: Any, labels: tuple[tuple[str, str], ...] = ()) -> Iterator[Sample]:
    """Every metric value a stats dataclass declares, with ``labels`` added
    (the component's own: ``sink``, ``adapter``, ``route``). Nested stats
    dataclasses are walked with the same labels; those in a :func:`keyed`
    field with their name as one more label."""
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        spec: MetricSpec | None = f.metadata.get("metric")
        if spec is None:
            if "keyed" in f.metadata:
                label, key = f.metadata["keyed"]
                items = value.items() if key is None else ((getattr(v, key), v) for v in value)
                for name, sub in items:
                    yield from metric_samples(sub, (*labels, (label, str(name))))
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                yield from metric_samples(value, labels)
            continue
        if value is None and spec.label is not None:
            continue  # no such figures here (an adapter without decode errors)
        if isinstance(value, Mapping):
            for key, n in sorted(value.items()):
                if spec.label is not None:
                    yield Sample(spec, (*labels, (spec.label, str(key))), _number(n))
                else:
                    own = MetricSpec(f"{spec.name}_{key}", spec.kind, f"{spec.help} {key}")
                    yield Sample(own, labels, _number(n))
        else:
            yield Sample(spec, labels, _number(value))


class StartupError(Exception):
    """A part could not start for a reason the operator must fix (one line):
    a port in use, a missing device, a data directory another gateway holds."""


@dataclass(frozen=True, slots=True)
class Health:
    """Whether a component serves as it should; ``problems`` says what is
    wrong in words an operator acts on (``/healthz`` lists them)."""

    ok: bool = True
    problems: tuple[str, ...] = ()

    @classmethod
    def failing(cls, *problems: str) -> Health:
        """Unhealthy, for these reasons."""
        return cls(False, problems)


HEALTHY = Health()


@runtime_checkable
class Component(Protocol):
    """A part of the running gateway (see the module docstring).

    ``start`` returns once the component can do its work (a listener bound, a
    store open) or raises for a problem the operator must fix; ``stop`` ends
    its work within ``grace`` seconds (in-flight work finishes or is left
    for the next start, never lost: what was acknowledged is on disk).
    ``health`` and ``stats`` are cheap and never block: the admin API calls
    them on every request.
    """

    @property
    def name(self) -> str:
        """The component's name in logs, the status and metric labels."""
        ...

    async def start(self) -> None:
        """Start work; raise for a problem the operator must fix."""
        ...

    async def stop(self, grace: float) -> None:
        """Stop work within ``grace`` seconds."""
        ...

    def health(self) -> Health:
        """Whether it serves now, and what is wrong if not."""
        ...

    def stats(self) -> Any:
        """Its figures: a dataclass whose metric fields say how they are exported."""
        ...


async def finish_closing(close: Awaitable[None], what: str, grace: float) -> None:
    """Await ``close`` to the end, warning once it takes longer than ``grace``
    seconds: for a close that commits what devices were told is stored (the
    outbox, the pipeline's state), which must not be abandoned at a deadline."""
    task = asyncio.ensure_future(close)
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        log.warning("%s: still closing after %.1f s; waiting for it", what, grace)
    await task


async def stop_within(component: Component, grace: float) -> bool:
    """Stop ``component``, giving up (logged) after ``grace`` seconds; True
    when it stopped in time. A failure to stop is logged, never raised:
    shutdown goes on with the next component."""
    try:
        await asyncio.wait_for(component.stop(grace), grace)
    except TimeoutError:
        log.warning("%s did not stop within %.1f s", component.name, grace)
        return False
    except Exception as e:
        log.warning("%s did not stop cleanly: %s", component.name, e, exc_info=True)
        return False
    return True
