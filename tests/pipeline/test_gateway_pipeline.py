"""The pipeline inside the assembled gateway (``gateway.py``): MQTT devices ->
routes -> HTTP sink, then ``edgeway stats`` on the data directory it left."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from pipeline_harness import T0, CloudServer, publish_all

from edgeway.cli import main as cli_main
from edgeway.config import parse_config
from edgeway.gateway import Gateway


async def test_gateway_runs_routes_and_edgeway_stats_reports(
    tmp_path: Path, cloud: CloudServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    cfg = parse_config(
        f"""
gateway: {{id: gw-p, data_dir: "{data_dir}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
sinks:
  - {{name: cloud, url: "http://127.0.0.1:{cloud.port}/ingest"}}
routes:
  - name: averaged
    match: {{devices: ["sensor-*"]}}
    steps:
      - window: {{size: 10s, aggregates: [mean, max], grace: 1s}}
pipeline: {{tick_interval: 0.1s, stats_interval: 0.2s}}
admin: {{listen: "127.0.0.1:0"}}
""",
        "gw.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        port = gw.listeners[0].bound[1]
        topic = "devices/sensor-7/telemetry"
        messages: list[tuple[str, str, dict[str, Any]]] = [
            ("sensor-7", topic, {"t": float(i), "ts": T0 + i}) for i in range(12)
        ]
        codes = await asyncio.to_thread(publish_all, port, messages)
        assert codes["sensor-7"] == [0] * 12
        await cloud.wait_for(2)  # [T0, T0+10) by reading time, [T0+10, T0+20) by the timer
        got = sorted((r["ts"], r["metrics"]) for r in cloud.records)
        assert got == [
            (T0 + 10, {"t_mean": 4.5, "t_max": 9.0, "window_start": T0, "window_end": T0 + 10}),
            (
                T0 + 20,
                {"t_mean": 10.5, "t_max": 11.0, "window_start": T0 + 10, "window_end": T0 + 20},
            ),
        ]
        # The same figures per route and per sink in the Prometheus metrics.
        assert gw.admin is not None and gw.admin.bound is not None
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{gw.admin.bound[1]}/metrics")).text
        assert 'edgeway_route_received_readings_total{route="averaged"} 12.0' in metrics
        assert 'edgeway_route_sent_readings_total{route="averaged"} 2.0' in metrics
        assert 'edgeway_sink_pipeline_sent_readings_total{sink="cloud"} 2.0' in metrics
        assert "edgeway_pipeline_received_readings_total 12.0" in metrics
        sent_bytes = _metric(metrics, 'edgeway_sink_pipeline_sent_bytes_total{sink="cloud"}')
        in_bytes = _metric(metrics, 'edgeway_route_received_bytes_total{route="averaged"}')
        assert 0 < sent_bytes < in_bytes
        assert sent_bytes == _metric(metrics, 'edgeway_route_sent_bytes_total{route="averaged"}')
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)

    capsys.readouterr()
    assert cli_main(["stats", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("received 12 readings")
    assert "sent 2 readings" in out
    assert "averaged/0:window" in out


def _metric(text: str, series: str) -> float:
    """The value of one series in Prometheus text output."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the metrics")
