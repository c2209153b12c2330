"""/metrics and /api/status of a running gateway with traffic: build info,
process figures, the pinned list of metric names and types, promtool."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from admin_harness import RunningGateway, create_token, edgeway_cli, running_gateway

import edgeway
from test_gateway import _publish  # paho-mqtt device, QoS 1

GOLDEN = Path(__file__).with_name("metrics_golden.txt")
"""``name type`` per line, as the exposition's ``# TYPE`` lines give them.
Update it in the same commit as a metric is added, removed or retyped: it is
what dashboards and alerts rely on (docs/operations.md lists the main ones)."""

TRAFFIC = """
http_ingest: {listen: "127.0.0.1:0", allow_anonymous: true}
routes:
  - {name: all, steps: []}
receipts: {enabled: true}
"""


async def _traffic(rg: RunningGateway, http: httpx.AsyncClient) -> None:
    """MQTT readings delivered to the file sink, and one HTTP payload that does
    not decode (so every family has samples, decode errors included)."""
    gw = rg.gateway
    await asyncio.to_thread(_publish, gw.listeners[0].bound[1], 20)
    ingest = f"http://127.0.0.1:{gw.adapters[0].port}/devices"  # type: ignore[attr-defined]
    r = await http.post(
        f"{ingest}/bad-1/telemetry", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert gw.outbox is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while gw.outbox.counters()["files"]["delivered"] < 20:
        assert loop.time() < deadline, "readings not delivered in time"
        await asyncio.sleep(0.05)


def _types(exposition: str) -> list[str]:
    return sorted(
        " ".join(line.split()[2:4])
        for line in exposition.splitlines()
        if line.startswith("# TYPE ")
    )


async def test_metrics_names_and_types_match_the_golden_list(tmp_path: Path) -> None:
    async with (
        running_gateway(tmp_path, extra=TRAFFIC) as rg,
        httpx.AsyncClient(base_url=rg.base) as http,
    ):
        await _traffic(rg, http)
        text = (await http.get("/metrics")).text
    golden = sorted(
        line.strip()
        for line in GOLDEN.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    exposed = _types(text)
    added = sorted(set(exposed) - set(golden))
    removed = sorted(set(golden) - set(exposed))
    assert exposed == golden, (
        f"metrics changed (new or retyped: {added}; gone: {removed}): "
        f"update {GOLDEN.name} and docs/operations.md"
    )


async def test_build_info_and_process_figures(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as rg, httpx.AsyncClient(base_url=rg.base) as http:
        cpu_before = time.process_time()
        status = (await http.get("/api/status")).json()
        text = (await http.get("/metrics")).text
    py = ".".join(str(v) for v in sys.version_info[:3])
    assert status["build"] == {
        "version": edgeway.__version__,
        "python": py,
        "implementation": sys.implementation.name,
        "platform": sys.platform,
    }
    # The gateway runs in this process: its CPU time is ours.
    assert 0 < status["process"]["cpu_seconds"] and cpu_before <= status["process"]["cpu_seconds"]
    assert status["process"]["resident_memory_bytes"] > 10 * 1024 * 1024
    labels = (
        f'implementation="{sys.implementation.name}",python="{py}",version="{edgeway.__version__}"'
    )
    assert f"edgeway_build_info{{{labels}}} 1.0" in text
    samples = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith("process_"))
    assert float(samples["process_cpu_seconds_total"]) > 0
    assert float(samples["process_resident_memory_bytes"]) > 10 * 1024 * 1024


async def test_edgeway_status_cli_uses_the_admin_api_with_a_token(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, '{listen: "127.0.0.1:0", auth: tokens}') as rg:
        url = rg.base
        r = await edgeway_cli("status", "--admin", url)
        assert r.code == 1 and "EDGEWAY_TOKEN" in r.stderr
        token = await create_token(rg.data_dir, "viewer")
        r = await edgeway_cli("status", "--admin", url, "--json", env={"EDGEWAY_TOKEN": token})
        assert r.code == 0, r.stderr
        assert orjson.loads(r.stdout)["build"]["version"] == edgeway.__version__
        # Without --admin, the configured listener (admin.listen) is used.
        text = rg.config_path.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{rg.admin_port}"')
        rg.config_path.write_text(text)
        r = await edgeway_cli("status", "-c", str(rg.config_path), env={"EDGEWAY_TOKEN": token})
        assert r.code == 0, r.stderr
        assert r.stdout.startswith("gateway gw-admin: ready") and "sink files:" in r.stdout
        r = await edgeway_cli("status", "--admin", url, env={"EDGEWAY_TOKEN": token + "x"})
        assert r.code == 1 and "unknown or revoked" in r.stderr
    r = await edgeway_cli("status", "--admin", url, env={"EDGEWAY_TOKEN": token})
    assert r.code == 1 and "cannot reach the admin API" in r.stderr


async def test_promtool_finds_nothing_to_report(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; ./dev test installs it)")
    async with (
        running_gateway(tmp_path, extra=TRAFFIC) as rg,
        httpx.AsyncClient(base_url=rg.base) as http,
    ):
        await _traffic(rg, http)
        text = (await http.get("/metrics")).text
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
