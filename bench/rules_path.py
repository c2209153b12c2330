"""Rule -> command path alone: a transition to its command handed to the transport.

Usage::

    .venv/bin/python bench/rules_path.py [--transitions 300] [--durability fsync]

In one process, without network or load generator: a :class:`RuleStage`
(``rules.db``) and a :class:`CommandService` (``commands.db``) on the same data
directory, durability as given, and a downlink that records when each command
reaches it (every device reachable, confirmed at once). One rule (``t > 50``
sets, ``t < 50`` clears, a command on both); readings alternate hot and cold,
one at a time, each waiting for its command: ``--transitions`` transitions.
Reported: p50/p99/max of ``observe()`` -> ``deliver()`` (the rule evaluated,
its state committed, the command queued and handed over), and the commits of
each database per transition.

This isolates the path that ``bench/rules.py``'s device-to-device latency
contains, so that a change to it can be compared in one sitting on a shared
machine (``EDGEWAY_SRC=/other/tree/src`` measures another source tree). Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# EDGEWAY_SRC: another source tree to measure (a "before" in the same sitting).
sys.path.insert(0, os.environ.get("EDGEWAY_SRC", str(ROOT / "src")))

RULES = """
rules:
  - name: hot
    when: "t > 50"
    clear: "t < 50"
    on_set: [{command: {name: fan, params: {speed: 100}}}]
    on_clear: [{command: {name: fan, params: {speed: 0}}}]
"""


class Transport:
    """Every device reachable; records the time each command reaches it."""

    name = "bench"

    def __init__(self) -> None:
        self.got: asyncio.Queue[float] = asyncio.Queue()

    def reachable(self, command: Any) -> bool:
        return True

    def deliver(self, command: Any) -> asyncio.Future[bool]:
        self.got.put_nowait(time.perf_counter())
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        fut.set_result(True)
        return fut


async def run(transitions: int, durability: str) -> dict[str, Any]:
    from edgeway.commands.service import CommandService
    from edgeway.config import CommandsSection, parse_config
    from edgeway.reading import Origin, Reading
    from edgeway.rules.stage import RuleStage
    from edgeway.rules.targets import ActionTargets

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        commands = CommandService(data, CommandsSection(), durability=durability)  # type: ignore[arg-type]
        await commands.open()
        transport = Transport()
        commands.add_downlink(transport)
        stage = RuleStage(
            parse_config(RULES).rules,
            data,
            targets=ActionTargets(commands=commands),
            durability=durability,  # type: ignore[arg-type]
        )
        await stage.open()
        stage.start_actions()
        lat: list[float] = []
        c0, r0 = commands.db.commits, stage.store.db.commits
        for i in range(transitions):
            t0 = time.perf_counter()
            stage.observe(
                [Reading("d1", time.time(), {"t": 90.0 if i % 2 == 0 else 10.0}, Origin("bench"))]
            )
            got = await asyncio.wait_for(transport.got.get(), 30)
            lat.append(got - t0)
            await stage.runner.idle()  # its marks done: the next one starts on a quiet path
            await asyncio.sleep(0.005)
        c1, r1 = commands.db.commits, stage.store.db.commits
        await stage.close()
        await commands.close()
    q = statistics.quantiles(lat, n=100)
    return {
        "transitions": transitions,
        "durability": durability,
        "p50_ms": round(q[49] * 1e3, 3),
        "p99_ms": round(q[98] * 1e3, 3),
        "max_ms": round(max(lat) * 1e3, 3),
        "rules_db_commits_per_transition": round((r1 - r0) / transitions, 2),
        "commands_db_commits_per_transition": round((c1 - c0) / transitions, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transitions", type=int, default=300)
    ap.add_argument("--durability", choices=["fsync", "os"], default="fsync")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.transitions, args.durability))), flush=True)


if __name__ == "__main__":
    main()
