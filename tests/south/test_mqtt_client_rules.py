"""A device behind an existing broker -> rule -> command back to the device,
end to end with real clients: a real Mosquitto, a paho device publishing its
telemetry there, and the gateway in MQTT client mode subscribed to it. The
rule's commands go back through the same Mosquitto on the device's command
topic (the embedded-broker path is in tests/rules/test_rules_gateway.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from test_mqtt_client import Mosquitto, broker  # noqa: F401  (fixture)
from test_mqtt_client_commands import Device

from edgeway.commands.model import CommandState
from edgeway.config import parse_config
from edgeway.gateway import Gateway


async def test_mqtt_device_rule_command_through_mosquitto(
    tmp_path: Path,
    broker: Mosquitto,  # noqa: F811
) -> None:
    cfg = parse_config(
        f"""
gateway: {{id: gw-rc, data_dir: "{tmp_path / "data"}"}}
mqtt: {{enabled: false}}
mqtt_client:
  - name: plant
    url: mqtt://127.0.0.1:{broker.port}
    subscriptions:
      - topic: "site/{{device_id}}/telemetry"
        command_topic: "site/{{device_id}}/cmd/{{name}}"
rules:
  - name: hot
    when: "temperature > 80"
    clear: "temperature < 70"
    on_set: [{{command: {{name: fan, params: {{speed: 100}}}}}}]
    on_clear: [{{command: {{name: fan, params: {{speed: 0}}}}}}]
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    try:
        async with asyncio.timeout(15):
            await gw.ready.wait()
        async with Device(broker.port, "site/+/cmd/+", client_id="boiler-1") as device:
            device.publish("site/boiler-1/telemetry", b'{"temperature": 75}')
            device.publish("site/boiler-1/telemetry", b'{"temperature": 85}')
            topic, payload = await device.next()
            assert (topic, json.loads(payload)) == ("site/boiler-1/cmd/fan", {"speed": 100})
            device.publish("site/boiler-1/telemetry", b'{"temperature": 75}')  # hysteresis
            device.publish("site/boiler-1/telemetry", b'{"temperature": 65}')
            topic, payload = await device.next()
            assert (topic, json.loads(payload)) == ("site/boiler-1/cmd/fan", {"speed": 0})
            assert device.messages.empty()  # one command per transition, no more
        assert gw.commands is not None
        cmds = await gw.commands.list(device_id="boiler-1")
        assert sorted(c.idempotency_key or "" for c in cmds) == [
            "rule:hot:hot:boiler-1:1",
            "rule:hot:hot:boiler-1:2",
        ]
        for c in cmds:
            done = await gw.commands.wait(c.id, 10)
            assert done.state is CommandState.SUCCEEDED and done.source == "rule:hot"
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)
