"""Many concurrent producers per alarm, for the stress test and the bench.

Each *sequence* is one (source, type) key driven by ``producers`` tasks at
once, each sending ``events`` random events (raise with a random severity,
clear, ack, confirm, reset, shelve, unshelve, suppress, ...), the way rules on
several routes and operators hit the same alarm together. Refusals of
illegal transitions are expected (two operators acknowledging at once: one
wins) and counted; anything else is a failure. Afterwards
:func:`edgeway.alarms.check.check_journal` judges the journal.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

from edgeway.alarms.model import Action, AlarmError
from edgeway.alarms.service import AlarmService

_WEIGHTS = [
    ("raise", 8),
    ("clear", 5),
    ("ack", 4),
    ("confirm", 1),
    ("reset", 1),
    ("shelve", 1),
    ("shelve_one_shot", 1),
    ("unshelve", 1),
    ("suppress", 1),
    ("unsuppress", 1),
    ("out_of_service", 1),
    ("in_service", 1),
]
_NAMES = [n for n, _ in _WEIGHTS]
_CUM = [w for _, w in _WEIGHTS]


@dataclass(slots=True)
class StressResult:
    """What the producers did."""

    events: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """Refusals by code (``illegal``, ``not_found`` are expected)."""


async def _producer(
    svc: AlarmService, source: str, type_: str, rnd: random.Random, events: int, out: StressResult
) -> None:
    for _ in range(events):
        name = rnd.choices(_NAMES, _CUM)[0]
        by = f"p{rnd.randrange(16)}"
        try:
            if name == "raise":
                sev = rnd.choice((100, 500, 900))
                await svc.raise_alarm(source, type_, severity=sev, message="m", by=by)
            elif name == "clear":
                await svc.clear_alarm(source, type_, by=by)
            elif name == "shelve":
                await svc.shelve(source, type_, by=by, duration=rnd.choice((0.05, 0.2, 5.0)))
            elif name == "shelve_one_shot":
                await svc.shelve(source, type_, by=by, one_shot=True)
            else:
                await svc.act(Action(name), source, type_, by=by)
        except AlarmError as e:
            out.refused[e.code] += 1
        out.events += 1
        if rnd.random() < 0.3:
            await asyncio.sleep(0)  # let the others in between


async def run_sequences(
    svc: AlarmService,
    sequences: int,
    *,
    producers: int = 16,
    events: int = 4,
    concurrent: int = 64,
    seed: int = 1,
) -> StressResult:
    """Drive ``sequences`` keys, ``concurrent`` of them at a time, each by
    ``producers`` tasks sending ``events`` events each."""
    out = StressResult()
    rnd = random.Random(seed)
    for start in range(0, sequences, concurrent):
        async with asyncio.TaskGroup() as tg:
            for i in range(start, min(start + concurrent, sequences)):
                for _ in range(producers):
                    r = random.Random(rnd.getrandbits(64))
                    tg.create_task(_producer(svc, f"dev-{i}", "overheat", r, events, out))
    return out
