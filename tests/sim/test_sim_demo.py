"""``edgeway demo`` end to end, as a newcomer runs it (a subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path


def test_demo_with_a_cloud_outage_loses_nothing(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeway",
            "demo",
            "--duration",
            "15",
            "--cloud-outage",
            "5",
            "--outage-after",
            "3",
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first_delivery = None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            m = re.search(r"delivered\s+(\d+)", line)
            if first_delivery is None and m and int(m.group(1)) > 0:
                first_delivery = time.monotonic() - started
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "\n".join(lines)
    assert proc.returncode == 0, out + (proc.stderr.read() if proc.stderr else "")
    # A newcomer sees data reach the cloud within 10 s of starting the command.
    assert first_delivery is not None and first_delivery < 10.0, out
    assert "mqtt://127.0.0.1:" in out and "cloud receiver at http://127.0.0.1:" in out
    assert "cloud receiver DOWN for 5 s" in out and "cloud receiver UP again" in out
    # The backlog grew during the outage.
    assert max(int(p) for p in re.findall(r"pending\s+(\d+)", out)) > 20, out
    assert re.search(r"^\s+lost\s+0$", out, re.M), out
    assert "nothing was lost" in out
    sent = int(re.search(r"sent by devices\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    unique = int(re.search(r"(\d+) unique", out).group(1))  # type: ignore[union-attr]
    assert sent > 200 and unique >= sent
    # Command round trips through the gateway's command queue (first after 5 s):
    # an MQTT device and another one answered, each line with its time.
    trips = re.findall(r"^command  (\S+) \((\S+)\)  (\S+)(?: \S+)?  (\w+) in (\d+) ms", out, re.M)
    assert ("MQTT", "set_rate", "succeeded") in {(p, n, s) for _, p, n, s, _ in trips}, out
    assert any(p != "MQTT" and s == "succeeded" for _, p, _, s, _ in trips), out
    m = re.search(r"^\s+commands\s+(\d+) sent, (\d+) succeeded$", out, re.M)
    assert m is not None and int(m.group(1)) >= 2 and m.group(1) == m.group(2), out
    # The cloud stored what it counted.
    assert len((tmp_path / "cloud-records.jsonl").read_bytes().splitlines()) >= unique
    # Every pushing device enrolled with the demo's provisioning key and is
    # registered (group demo); the registry file says so after the run.
    m = re.search(r"provisioning key 'demo' in [\d.]+ s: (\d+) registered", out)
    assert m is not None and int(m.group(1)) > 0, out
    import sqlite3

    conn = sqlite3.connect(tmp_path / "gateway" / "devices.db")
    try:
        (registered,) = conn.execute(
            "SELECT count(*) FROM devices WHERE registered = 1 AND groups_ LIKE '%\"demo\"%'"
        ).fetchone()
    finally:
        conn.close()
    assert registered == int(m.group(1)), out
