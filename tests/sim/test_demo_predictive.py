"""``edgeway demo``'s predictive-maintenance chain, end to end in one process:
a bearing fault injected on a simulated MQTT machine is flagged by the
``anomaly`` step, the ``bearing-fault`` rule raises an alarm and sends the
machine a command through the command queue over its own MQTT connection, the
simulated machine executes it (stops) and its answer comes back; the demo
prints each step and the cloud gets the alarm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import edgeway.sim.demo as demo_mod
import edgeway.sim.predictive as predictive
from edgeway.sim.demo import Demo, DemoOptions


async def test_a_fault_raises_an_alarm_and_a_rule_stops_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predictive, "FAULT_RAMP", 10.0)  # a quick fault: a short test
    # Free ports, not the usual ones: tests/sim/test_sim_demo.py runs `edgeway
    # demo` on those in another worker at the same time, and a port both find
    # free is bound by one of them only (CI: "127.0.0.1:8080 already in use").
    monkeypatch.setattr(demo_mod, "DEFAULT_PORTS", dict.fromkeys(demo_mod.DEFAULT_PORTS, 0))
    lines: list[str] = []
    options = DemoOptions(
        duration=25,
        fault_after=6,
        mqtt_devices=3,
        coap_devices=0,
        http_devices=0,
        modbus_devices=0,
        opcua_devices=0,
        rate=2.0,
        command_interval=0,
        interval=5,
        data_dir=tmp_path,
        seed=5,
    )
    demo = Demo(options, lines.append)
    result = await demo.run()
    out = "\n".join(lines)
    assert demo.predictive is not None, out
    r = demo.predictive.result
    assert r.device_id == "mqtt-0002"
    assert r.anomaly_score is not None and r.anomaly_score >= predictive.THRESHOLD, out
    assert r.alarm_id and r.command_id, out
    assert (r.command_state, r.command_result) == ("succeeded", {"written": {"running": False}})
    assert r.machine_running is False  # the simulated machine executed the stop
    # Each step printed, in order.
    steps = [
        re.search(rf"^{word}\s+mqtt-0002.*$", out, re.M) for word in ("anomaly", "alarm", "command")
    ]
    assert all(steps), out
    assert r.alarm_id in steps[1].group(0) and r.command_id in steps[2].group(0)  # type: ignore[union-attr]
    assert re.search(r"^result\s+mqtt-0002\s+succeeded", out, re.M), out
    assert re.search(r"predictive\s+fault on mqtt-0002: anomaly_score", out), out
    # The alarm and the command's records reached the cloud; nothing was lost.
    records = [json.loads(x) for x in (tmp_path / "cloud-records.jsonl").read_text().splitlines()]
    alarms = [x for x in records if x.get("tags", {}).get("record_type") == "alarm"]
    assert [a["metrics"]["alarm_id"] for a in alarms] == [r.alarm_id]
    states = {
        x["metrics"]["state"]
        for x in records
        if x.get("tags", {}).get("record_type") == "command"
        and x["metrics"]["command_id"] == r.command_id
    }
    assert "succeeded" in states
    assert result.lost == 0
