"""The long versions of the fault-injection suite (tests/faults/ runs them small).

Usage::

    .venv/bin/python bench/faults.py [--kills 100] [--only NAME ...] [--out FILE]

Each scenario runs the real ``edgeway run``, paho MQTT 5 devices publishing
numbered readings at QoS 1 and a real cloud (an HTTP server whose modes are
the faults, or Mosquitto), injects its fault many times, lifts it, drains, and
prints one table row with the exact accounting: sent, acknowledged, refused,
resent by devices, delivered (unique record ids), duplicates (same id twice),
acknowledged readings lost, order inversions per device, and the outbox's
books (``accepted = delivered + pending + dropped``). A row that breaks a rule
(see tests/faults/harness.py) is marked FAIL and the script exits 1.

``--out`` writes the table as Markdown (bench/results/faults-<date>.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("tests/faults", "tests/integration", "tests"):
    sys.path.insert(0, str(ROOT / sub))

import scenarios  # noqa: E402
from harness import HEADER, Report  # noqa: E402


def _long(kills: int) -> dict[str, Callable[[Path], Report | None]]:
    """The long versions: ten to thirty times the CI sizes."""

    def never_answers(p: Path) -> Report:
        return scenarios.sink_never_answers(p, seconds=30.0)[0]

    def disk_full(p: Path) -> Report | None:
        with scenarios.small_disk(p, size_mb=64, filler_mb=40) as disk:
            if disk is None:
                return None
            return scenarios.disk_full(p, disk)

    return {
        "sigkill": lambda p: scenarios.sigkill_loop(p, kills=kills, acks_per_life=40),
        "outage": lambda p: scenarios.cloud_away(p, "down", acks_during=5000),
        "flapping": lambda p: scenarios.flapping_sink(p, cycles=100, acks_per_phase=15),
        "never_answers": never_answers,
        "slow": lambda p: scenarios.slow_sink(p, acks=3000, delay=0.5),
        "failing": lambda p: scenarios.cloud_away(p, "error", acks_during=3000),
        "sigstop": lambda p: scenarios.sigstop_sigcont(p, seconds=10.0, rounds=5),
        "half_open_sink": lambda p: scenarios.half_open(p, "sink", seconds=20.0),
        "half_open_devices": lambda p: scenarios.half_open(p, "devices", seconds=15.0),
        "timestamps": lambda p: scenarios.odd_timestamps(p, acks=3000),
        "broker_persistent": lambda p: scenarios.cloud_broker_restart(p, True, restarts=20),
        "broker_volatile": lambda p: scenarios.cloud_broker_restart(p, False, restarts=20),
        "disk_full": disk_full,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=100, help="SIGKILL cycles (default 100)")
    ap.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here")
    args = ap.parse_args()
    runs = _long(args.kills)
    names = args.only or list(runs)
    lines = [HEADER]
    print(HEADER, flush=True)
    failed = 0
    started = time.monotonic()
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"faults-{name}-") as tmp:
            try:
                report = runs[name](Path(tmp))
            except Exception as e:  # a stalled scenario is a result too
                line = f"| {name} | FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200]} |"
                print(f"{name}: {e}", file=sys.stderr, flush=True)  # with the gateway's output
                failed += 1
            else:
                if report is None:
                    line = f"| {name} | skipped: cannot mount a tmpfs here |"
                else:
                    verdict = ""
                    try:
                        report.check()
                    except AssertionError as e:
                        verdict = f" FAIL: {str(e).splitlines()[0]}"
                        failed += 1
                    notes = f" {report.notes}" if report.notes else ""
                    line = report.row() + verdict + notes
        print(line, flush=True)
        lines.append(line)
    total = time.monotonic() - started
    print(f"\n{len(names)} scenarios in {total:.0f} s, {failed} failed", flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
