"""End to end: paho MQTT device -> edgeway broker -> pipeline -> outbox -> HTTP
sink -> a real aiohttp server; exactly the aggregates the route defines arrive.

The parts are built in-process the way ``gateway.py`` builds them.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from pipeline_harness import T0, CloudServer, publish_all

from edgeway.config import parse_config
from edgeway.devices.config_auth import ConfigAuthenticator, ConfigAuthoriser
from edgeway.outbox import Outbox, SinkRunner
from edgeway.pipeline import Pipeline, load_stats
from edgeway.sinks.base import create_sink
from edgeway.south.mqtt.broker import Broker
from edgeway.south.mqtt.listeners import start_listeners


def config_text(data_dir: Path, cloud_port: int) -> str:
    return f"""
gateway: {{id: gw-e2e, data_dir: "{data_dir}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
sinks:
  - {{name: cloud, url: "http://127.0.0.1:{cloud_port}/ingest"}}
routes:
  - name: sensors
    match: {{devices: ["sensor-*"], topics: ["devices/+/telemetry"]}}
    steps:
      - validate: {{ranges: {{temp: {{min: -40, max: 125}}}}}}
      - window: {{size: 10s, aggregates: [mean], grace: 2s}}
      - deadband: {{absolute: 0.5}}
    sinks: [cloud]
pipeline: {{tick_interval: 0.1s, stats_interval: 0.2s}}
"""


async def test_mqtt_device_to_http_cloud_through_the_pipeline(
    tmp_path: Path, cloud: CloudServer
) -> None:
    cfg = parse_config(config_text(tmp_path / "data", cloud.port), "e2e.yaml")
    outbox = Outbox(
        tmp_path / "data" / "outbox.db",
        gateway_id=cfg.gateway.id,
        config=cfg.outbox,
        sink_names=["cloud"],
    )
    await outbox.open()
    pipeline = Pipeline(
        cfg.routes,
        cfg.pipeline,
        outbox=outbox,
        data_dir=cfg.gateway.data_dir,
        durability=cfg.outbox.durability,
    )
    await pipeline.open()
    broker = Broker(
        cfg.mqtt,
        ingest=pipeline,
        authenticator=ConfigAuthenticator(cfg.mqtt),
        authoriser=ConfigAuthoriser(cfg.mqtt),
        data_dir=tmp_path / "data",
        gateway_id=cfg.gateway.id,
    )
    await broker.start()
    listeners = await start_listeners(cfg.mqtt.listeners, broker.protocol_factory)
    sink = create_sink(cfg.sinks[0], cfg.gateway.id)
    await sink.start()
    runner = asyncio.create_task(SinkRunner(outbox, sink).run())
    try:
        port = listeners[0].bound[1]
        topic = "devices/sensor-1/telemetry"
        messages: list[tuple[str, str, dict[str, Any]]] = []
        # Window 1: 20.0 .. 20.9 -> mean 20.45. Window 2: all 20.6 -> mean 20.6,
        # within the 0.5 deadband of 20.45: not sent. Window 3: 30.0.
        messages += [("sensor-1", topic, {"temp": 20.0 + i / 10, "ts": T0 + i}) for i in range(10)]
        messages += [("sensor-1", topic, {"temp": 20.6, "ts": T0 + 10 + i}) for i in range(10)]
        messages += [("sensor-1", topic, {"temp": 500, "ts": T0 + 20})]  # out of range
        messages += [("sensor-1", topic, {"temp": 30.0, "ts": T0 + 21})]
        # No route takes alarm-1: it goes to the default sinks (every sink) as it came.
        messages += [("alarm-1", "devices/alarm-1/telemetry", {"door": "open", "ts": T0 + 5})]
        codes = await asyncio.to_thread(publish_all, port, messages)
        assert codes["sensor-1"] == [0] * 20 + [0x99, 0]  # 0x99: payload format invalid
        assert codes["alarm-1"] == [0]

        await cloud.wait_for(3)
        await asyncio.sleep(0.5)  # nothing else may arrive
        got = sorted(
            ((r["device_id"], r["ts"], r["metrics"]) for r in cloud.records),
            key=lambda x: (x[0], x[1]),
        )
        assert len(got) == 3
        assert got[0] == ("alarm-1", T0 + 5, {"door": "open"})
        assert got[1][:2] == ("sensor-1", T0 + 10)
        assert got[1][2] == {
            "temp_mean": pytest.approx(20.45),
            "window_start": T0,
            "window_end": T0 + 10,
        }
        assert got[2] == (
            "sensor-1",
            T0 + 30,
            {"temp_mean": 30.0, "window_start": T0 + 20, "window_end": T0 + 30},
        )
        assert all(r["id"].startswith("gw-e2e:") for r in cloud.records)
        s = pipeline.report()
        assert s["received"]["readings"] == 23
        steps = {st["step"]: st for st in s["routes"][0]["steps"]}
        assert steps["sensors/0:validate"]["dropped"] == {"range:temp": 1}
        assert steps["sensors/1:window"]["in"]["readings"] == 21
        assert steps["sensors/1:window"]["out"]["readings"] == 3
        assert steps["sensors/2:deadband"]["out"]["readings"] == 2
        # The running pipeline writes the figures `edgeway stats` reads.
        async with asyncio.timeout(5):
            while True:
                written = load_stats(tmp_path / "data")
                if written is not None and written["sent"]["readings"] == 3:
                    break
                await asyncio.sleep(0.05)
    finally:
        for lst in listeners:
            await lst.close()
        await broker.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await sink.close()
        await pipeline.close()
        await outbox.close()
