"""Alarms survive SIGKILL (issue 17, section 2).

A real ``edgeway run`` process; alarms raised, acknowledged, latched,
shelved (timed and one-shot), suppressed and taken out of service through
the admin API; the process is killed with SIGKILL and started again on the
same data directory, three times. After each restart every alarm is as the
API last answered (an answer means the transition is on disk), and a timed
shelving ends at its stored deadline, not one restarted with the process.
The journal passes the checker at the end.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from edgeway_process import GatewayProcess, StartGateway, free_port

from edgeway.alarms.check import check_journal

CONFIG = """
mqtt:
  listeners: [{{bind: "127.0.0.1:{{port}}", allow_anonymous: true}}]
admin: {{listen: "127.0.0.1:{admin}", auth: none}}
alarms:
  types:
    overheat: {{latching: true}}
"""
SHELVE_S = 6.0
"""The timed shelving that must outlive a kill and end at its stored deadline."""


def _wait_api(base: str, timeout: float = 20.0) -> httpx.Client:
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = httpx.Client(base_url=base, timeout=5)
            if c.get("/readyz").status_code == 200:
                return c
            c.close()
        except httpx.HTTPError:
            c.close()
        assert time.monotonic() < deadline, "admin API not up"
        time.sleep(0.1)


def _act(http: httpx.Client, key: str, action: str, **body: Any) -> dict[str, Any]:
    r = http.post(f"/api/alarms/{key}/{action}", json={"user": "ann", **body})
    assert r.status_code == 200, r.text
    return r.json()["alarm"]  # type: ignore[no-any-return]


def _all(http: httpx.Client) -> dict[str, dict[str, Any]]:
    alarms = http.get("/api/alarms?state=all").json()["alarms"]
    return {f"{a['source']}/{a['type']}": a for a in alarms}


def _kill_and_restart(
    gw: GatewayProcess, start_gateway: StartGateway, config: str, port: int, data: Path
) -> GatewayProcess:
    gw.process.send_signal(signal.SIGKILL)
    gw.process.wait(10)
    return start_gateway(config, port=port, data_dir=data)


@pytest.mark.timeout(180)
def test_alarms_and_shelving_deadlines_survive_sigkill(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    data = tmp_path / "data"
    config = CONFIG.format(admin=admin)
    base = f"http://127.0.0.1:{admin}"
    gw = start_gateway(config, port=port, data_dir=data)
    http = _wait_api(base)
    expected: dict[str, dict[str, Any]] = {}
    try:
        # Round 1: every kind of state at once.
        for key, sev in (("b1/overheat", 950), ("b2/low_flow", 400), ("b3/door", 200)):
            expected[key] = _act(http, key, "raise", severity=sev, message=key)
        expected["b1/overheat"] = _act(http, "b1/overheat", "clear")  # latched
        assert expected["b1/overheat"]["latched"]
        expected["b2/low_flow"] = _act(http, "b2/low_flow", "ack", comment="on it")
        timed = _act(http, "b2/low_flow", "shelve", duration=f"{SHELVE_S}s", comment="known")
        expected["b2/low_flow"] = timed
        expected["b3/door"] = _act(http, "b3/door", "shelve", one_shot=True)
        expected["b4/vibration"] = _act(http, "b4/vibration", "suppress", comment="unit off")
        expected["b5/level"] = _act(http, "b5/level", "out-of-service", comment="maintenance")
        assert _all(http) == expected

        http.close()
        gw = _kill_and_restart(gw, start_gateway, config, port, data)
        http = _wait_api(base)
        ready = time.time()
        after = _all(http)
        until = timed["shelved"]["until"]
        others = {k: v for k, v in expected.items() if k != "b2/low_flow"}
        assert {k: v for k, v in after.items() if k != "b2/low_flow"} == others
        if after["b2/low_flow"]["shelved"] is not None:  # still on: the same deadline
            assert after["b2/low_flow"] == expected["b2/low_flow"]
        # It ends at the stored deadline (or at start, if that passed while down).
        deadline = time.monotonic() + SHELVE_S + 10
        while _all(http)["b2/low_flow"]["shelved"] is not None:
            assert time.monotonic() < deadline, "the shelving never ended"
            time.sleep(0.05)
        last = http.get("/api/alarms/b2/low_flow/history?limit=1").json()["transitions"][0]
        assert (last["action"], last["by"], last["comment"]) == (
            "unshelve",
            "system",
            "shelving time ended",
        )
        assert last["at"] >= until and last["at"] - max(until, ready) < 1.0, (last, until, ready)
        expected["b2/low_flow"] = last["state"]

        # Round 2: the one-shot shelving ends with the alarm; the latch resets.
        expected["b3/door"] = _act(http, "b3/door", "clear")
        assert expected["b3/door"]["shelved"] is None and not expected["b3/door"]["active"]
        expected["b1/overheat"] = _act(http, "b1/overheat", "reset", comment="checked")
        http.close()
        gw = _kill_and_restart(gw, start_gateway, config, port, data)
        http = _wait_api(base)
        assert _all(http) == expected

        # Round 3: acknowledgements close occurrences; a new one gets a new id.
        first_id = expected["b1/overheat"]["id"]
        _act(http, "b1/overheat", "ack")
        _act(http, "b3/door", "ack")
        del expected["b1/overheat"], expected["b3/door"]
        again = _act(http, "b1/overheat", "raise", severity=990, message="again")
        assert again["id"] != first_id and again["count"] == 1
        expected["b1/overheat"] = again
        http.close()
        gw = _kill_and_restart(gw, start_gateway, config, port, data)
        http = _wait_api(base)
        assert _all(http) == expected
    finally:
        http.close()
        gw.terminate()
    conn = sqlite3.connect(data / "alarms.db")
    report = check_journal(conn)
    conn.close()
    assert report.problems == [], report.problems
    assert report.keys == 5
