"""The periodic health summary (``gateway.health_interval``) reaches every
sink as records of the gateway's own, with the real ``edgeway run`` process:
two file sinks, a paho device connected meanwhile."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgeway_process import StartGateway, edgeway_only
from mqtt_peers import TIMEOUT, PahoPeer, connected

from edgeway.health_report import summarize


def _records(directory: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def _health(directory: Path) -> list[dict[str, Any]]:
    return [r for r in _records(directory) if r.get("tags", {}).get("record_type") == "health"]


def _wait_for(directory: Path, n: int, check: Any = None) -> list[dict[str, Any]]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = _health(directory)
        if len(found) >= n and (check is None or check(found)):
            return found
        time.sleep(0.1)  # the file sink writes on its own schedule: polled, bounded
    raise AssertionError(f"fewer than {n} health records in {directory}: {_records(directory)}")


def test_every_sink_gets_the_health_series(
    start_gateway: StartGateway, tmp_path: Path, peers: list[PahoPeer]
) -> None:
    edgeway_only()
    a, b = tmp_path / "a", tmp_path / "b"
    gw = start_gateway(
        f"""
        gateway: {{id: gw-h, health_interval: 300ms}}
        sinks:
          - {{name: one, url: "file://{a}", options: {{durability: os}}}}
          - {{name: two, url: "file://{b}", options: {{durability: os}}}}
        """
    )
    first = _wait_for(a, 1)[0]
    assert first["device_id"] == "gw-h"
    m = first["metrics"]
    assert m["ready"] is True and m["sinks_total"] == 2 and m["version"]
    assert {"sink.one.pending", "sink.two.pending", "outbox_pending", "uptime_s"} <= set(m)
    connected(gw, peers)  # a device arrives: the next summaries count it
    later = _wait_for(a, 2, lambda rs: rs[-1]["metrics"]["devices_connected"] == 1)
    uptimes = [r["metrics"]["uptime_s"] for r in later]
    assert uptimes == sorted(uptimes)
    assert gw.terminate() == 0
    # Both sinks got the same series (the outbox routes the records to every sink).
    assert [r["id"] for r in _health(a)] == [r["id"] for r in _health(b)]
    assert len(_health(a)) >= 2


def test_summary_flags_problems_and_counts_pending() -> None:
    status = {
        "ready": True,
        "uptime_s": 12.5,
        "broker": {"clients_connected": 3},
        "outbox": {"cloud": {"pending": 7, "dropped": 2}, "file": {"pending": 0, "dropped": 0}},
        "sinks": {"cloud": {"connected": False}, "file": {"connected": True}},
    }
    m = summarize(status, ["outbox: the disk is full, new readings are refused"])
    assert m["healthy"] is False and m["problems"].startswith("outbox: the disk is full")
    assert (m["outbox_pending"], m["outbox_dropped"], m["sinks_connected"]) == (7, 2, 1)
    assert (m["sink.cloud.pending"], m["sink.cloud.connected"]) == (7, False)
    assert summarize(status, [])["healthy"] is True
