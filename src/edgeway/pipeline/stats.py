"""``edgeway stats``: the bandwidth report, from ``data_dir/stats.json``.

The running gateway's pipeline rewrites ``stats.json`` every
``pipeline.stats_interval`` (5 s) and at stop; this command reads it, so it
works without an admin API and against a stopped gateway (last figures).

Example::

    $ edgeway stats --data-dir ./edgeway-data
    received 36,000 readings, 2.7 MB; sent 1,310 readings, 0.2 MB (-96.4 % records, -93.1 % bytes)
    route     step                  in rd     in bytes   out rd    out bytes  dropped
    climate   climate/0:window      36,000    2,712,000   3,600      446,400
    ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from edgeway.pipeline.core import STATS_FILE


def load_stats(data_dir: Path | str) -> dict[str, Any] | None:
    """The last figures the pipeline wrote, or None if it never ran here."""
    path = Path(data_dir) / STATS_FILE
    try:
        data: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data


def _pct(before: int, after: int) -> str:
    if before <= 0:
        return "-"
    return f"{(after - before) / before * 100:+.1f} %"


def format_stats(s: dict[str, Any]) -> str:
    """The report as text: totals, then per route and step, then per sink."""
    lines = []
    rec, sent = s["received"], s["sent"]
    age = time.time() - s.get("at", time.time())
    lines.append(
        f"received {rec['readings']:,} readings, {rec['bytes']:,} bytes; "
        f"sent {sent['readings']:,} readings, {sent['bytes']:,} bytes "
        f"(records {_pct(rec['readings'], sent['readings'])}, "
        f"bytes {_pct(rec['bytes'], sent['bytes'])}); figures {age:.0f} s old"
    )
    d = s.get("default_route", {})
    if d.get("readings"):
        lines.append(f"no route (default sinks): {d['readings']:,} readings, {d['bytes']:,} bytes")
    if s.get("rejected_full"):
        lines.append(f"refused while the outbox was full: {s['rejected_full']:,} readings")
    lines.append("")
    hdr = f"{'route / step':<34} {'in':>10} {'in bytes':>12} {'out':>10} {'out bytes':>12}  dropped"
    # An empty table reads like a fault; without routes, say so instead.
    lines.append(
        hdr
        if s.get("routes")
        else "no routes configured: every reading goes to the default sinks unchanged"
    )
    for route in s.get("routes", []):
        r, o = route["received"], route["sent"]
        lines.append(
            f"{route['name']:<34} {r['readings']:>10,} {r['bytes']:>12,} "
            f"{o['readings']:>10,} {o['bytes']:>12,}  -> {route['sinks'] or 'all sinks'}"
        )
        for st in route["steps"]:
            dropped = ", ".join(f"{k}={v}" for k, v in st.get("dropped", {}).items())
            if st.get("errors"):
                dropped += f" errors={st['errors']}"
            lines.append(
                f"  {st['step']:<32} {st['in']['readings']:>10,} {st['in']['bytes']:>12,} "
                f"{st['out']['readings']:>10,} {st['out']['bytes']:>12,}  {dropped}"
            )
    lines.append("")
    lines.append(f"{'sink':<34} {'sent':>10} {'sent bytes':>12} {'delivered':>10} {'pending':>10}")
    for name, v in s.get("sinks", {}).items():
        ob = v.get("outbox", {})
        lines.append(
            f"{name:<34} {v['sent']['readings']:>10,} {v['sent']['bytes']:>12,} "
            f"{ob.get('delivered', 0):>10,} {ob.get('pending', 0):>10,}"
        )
    return "\n".join(lines)


def stats_main(argv: list[str], data_dir: Path | str) -> int:
    """``edgeway stats [--json]``: print the bandwidth report; 1 if there is none."""
    parser = argparse.ArgumentParser(prog="edgeway stats")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)
    s = load_stats(data_dir)
    if s is None:
        print(
            f"no figures in {Path(data_dir) / STATS_FILE}: has the gateway run here?",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(orjson.dumps(s, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_stats(s))
    return 0
