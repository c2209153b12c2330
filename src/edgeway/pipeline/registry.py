"""The step interface and the registry steps join at import.

A route's ``steps:`` list holds entries of the form ``{step_type: {params}}``::

    routes:
      - name: temperatures
        steps:
          - validate: {ranges: {temperature: {min: -40, max: 125}}}
          - window: {size: 10s, aggregates: [mean]}

Each step type is one :class:`Step` subclass in ``edgeway.pipeline.steps``
with a pydantic ``Params`` model (unknown keys are errors) and one method,
:meth:`Step.apply`. Steps that hold readings across submits (windows, the
held value of a rate limit) derive from :class:`HoldingStep`: they journal what
they absorb in the pipeline's state store and say, through
:meth:`HoldingStep.take_releases`, which journal entries their emitted
readings made redundant (see docs/pipeline.md, "Durability of windows").
"""

from __future__ import annotations

import abc
import asyncio
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails
from pydantic_core import ValidationError as CoreValidationError

from edgeway.reading import Reading

if TYPE_CHECKING:
    from edgeway.pipeline.state import Journal


class StepParams(BaseModel):
    """Base of every step's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(slots=True)
class StepContext:
    """What a step gets from its route besides its parameters."""

    route: str
    """The route's name (origin address of readings the step creates)."""
    step_id: str
    """``route/index:type``: the key of this step's journal and counters."""
    journal: Journal | None = None
    """The state store handle of a :class:`HoldingStep` (None for other steps)."""
    rejects: dict[str, int] = field(default_factory=dict)
    """Readings refused by this step, per reason (validate, late windows, ...)."""
    quarantine: list[Reading] = field(default_factory=list)
    """Rejected readings the pipeline must store for the quarantine sink."""
    invalid: int = 0
    """Readings refused as invalid during the current submit (reset per submit):
    a submit whose every reading was refused is answered ``REJECTED_INVALID``."""
    errors: int = 0
    """Per-metric failures that did not refuse the reading (a transform that
    divided by zero, a missing operand)."""
    services: Mapping[str, Any] = field(default_factory=dict)
    """Gateway services a step may use, by name (``models``: the
    :class:`edgeway.ml.manager.ModelManager`); empty when the pipeline is
    built without a running gateway (``edgeway check``, tests)."""
    commits: list[asyncio.Future[Any]] = field(default_factory=list)
    """Commits a step started for this submit that must be on disk before the
    device is acknowledged (the ``rules`` step's rule state); the pipeline
    joins them to the submit's future and empties the list."""
    wake: Callable[[], None] | None = None
    """Ask the pipeline to call the holding steps' ``tick`` soon (a step whose
    results arrive from another thread); None until the pipeline opens."""

    def reject(self, reason: str, n: int = 1) -> None:
        """Count ``n`` readings refused for ``reason``."""
        self.rejects[reason] = self.rejects.get(reason, 0) + n


class Step(abc.ABC):
    """One processing step of a route. Subclasses set ``type_name`` and ``Params``."""

    type_name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: Any, ctx: StepContext) -> None:
        self.params = params
        self.ctx = ctx

    @abc.abstractmethod
    def apply(self, readings: list[Reading], now: float) -> list[Reading]:
        """Process a batch (in arrival order) and return what goes on.

        ``now`` is the wall clock (seconds since the epoch) of this submit.
        """

    def forget(self, device_id: str) -> None:  # noqa: B027 - optional hook
        """Drop what the step remembers about ``device_id``.

        Called when the outbox refused readings this step let through, so a
        retry by the device is not taken for a repeat of something stored.
        """


@dataclass(slots=True, frozen=True)
class Release:
    """The journal entries ``ids`` of ``key`` are no longer needed, and ``before``
    (unless None) is the key's new closed mark (persisted with the deletion)."""

    key: str
    before: float | None
    ids: Sequence[int] = ()


class HoldingStep(Step):
    """A step that keeps readings across submits and emits later (on a timer)."""

    def __init__(self, params: Any, ctx: StepContext) -> None:
        super().__init__(params, ctx)
        self._releases: list[Release] = []

    @abc.abstractmethod
    def tick(self, now: float) -> list[Reading]:
        """Emit what is due at wall-clock ``now`` (windows that closed, held values)."""

    @abc.abstractmethod
    def restore(self, key: str, reading: Reading, journal_id: int) -> None:
        """Absorb a journaled reading again after a restart (no journaling);
        ``journal_id`` is its entry, to be named in a later :class:`Release`."""

    @abc.abstractmethod
    def restore_mark(self, key: str, before: float) -> None:
        """Set ``key``'s closed mark from the state store after a restart."""

    def take_releases(self) -> list[Release]:
        """Releases owed since the last call; the pipeline applies them once the
        readings emitted with them are safe in the outbox."""
        out = self._releases
        if out:
            self._releases = []
        return out


NAME_CACHE_LIMIT = 10_000
"""Entries of a step's per-metric-name caches (glob results, output names).
Metric names come from devices; a device inventing names must not grow a
cache without bound. Real sites have hundreds of names; past the limit the
cache is cleared and refilled."""

_STEPS: dict[str, type[Step]] = {}

S = TypeVar("S", bound=type[Step])


def register_step(cls: S) -> S:
    """Class decorator: make ``cls`` available as ``cls.type_name`` in routes."""
    name = cls.type_name
    if name in _STEPS and _STEPS[name] is not cls:
        raise ValueError(f"step type {name!r} registered twice")
    _STEPS[name] = cls
    return cls


def step_types() -> dict[str, type[Step]]:
    """Every registered step type by name (imports the built-in ones)."""
    import edgeway.pipeline.steps  # noqa: F401  (registers the built-in steps)

    return dict(_STEPS)


def parse_step_spec(spec: dict[str, Any]) -> tuple[type[Step], BaseModel]:
    """``{type: params}`` -> the step class and its validated parameters.

    Raises pydantic's ``ValidationError`` with locations under the type name
    (``window.size``) so config errors point at the key.
    """
    types = step_types()
    if len(spec) != 1:
        raise ValueError(
            f"a step is one mapping {{type: {{params}}}}, got keys {sorted(spec)}; "
            f"types: {', '.join(sorted(types))}"
        )
    ((name, raw),) = spec.items()
    cls = types.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), list(types), n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown step type {name!r}{hint}; types: {', '.join(sorted(types))}")
    if raw is None:
        raw = {}
    try:
        params = cls.Params.model_validate(raw)
    except ValidationError as e:
        raise CoreValidationError.from_exception_data(
            e.title,
            [
                InitErrorDetails(
                    type=err["type"],
                    loc=(name, *err["loc"]),
                    input=err["input"],
                    ctx=err.get("ctx", {}),
                )
                for err in e.errors()
            ],
        ) from None
    return cls, params


def check_step_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validator used by the config schema: raise on a bad step, return it unchanged."""
    parse_step_spec(spec)
    return spec


def build_step(spec: dict[str, Any], ctx: StepContext) -> Step:
    """Create the step ``spec`` describes (validating it again)."""
    cls, params = parse_step_spec(spec)
    return cls(params, ctx)
