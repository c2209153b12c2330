"""The long version of tests/integration/test_rules_crash.py: ``edgeway run``
killed with SIGKILL 100 times (``--kills``) in the middle of rule durations;
prints the kills, cycles and transitions checked (0 lost, 0 repeated, each
within 1 s of its due time or of the restart) or the failure.

Usage::

    .venv/bin/python bench/rules_crash.py [--kills 100]

About 4 s per kill on this machine (a restart of ``edgeway run`` is most of it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100)
    args = ap.parse_args()
    env = {**os.environ, "EDGEWAY_RULES_KILLS": str(args.kills), "PYTHONPATH": str(ROOT / "src")}
    test = "tests/integration/test_rules_crash.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
