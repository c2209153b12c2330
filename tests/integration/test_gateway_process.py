"""``edgeway run`` as a process: telemetry in, sink out, start-up and shutdown.

- telemetry published to ``devices/{id}/telemetry`` is acknowledged, and
  reaches a real aiohttp server through ``--sink http://...``;
- SIGTERM under load exits 0 within 5 s;
- a second gateway on a taken port exits 1 with one line naming the port, and
  on a data directory in use with one line naming it;
- no config file: embedded defaults (anonymous on loopback, ``./edgeway-data``);
- retained messages and persistent sessions survive a restart.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiohttp import web
from edgeway_process import GatewayProcess, StartGateway, edgeway_only
from mqtt_peers import TIMEOUT, PahoPeer, connected, raw_connect_packet, unique

from outbox_db import stored_records

# ---------------------------------------------------------------------------
# telemetry


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_telemetry_is_acknowledged_and_still_routed(
    shared_gateway: GatewayProcess, peers: list[PahoPeer], version: int
) -> None:
    gw = shared_gateway
    device = unique("dev")
    watcher = connected(gw, peers, version=version)
    watcher.subscribe(f"devices/{device}/telemetry", 1)
    pub = connected(gw, peers, version=version, client_id=device)
    body = b'{"temp": 21.5, "on": true}'
    assert pub.publish(f"devices/{device}/telemetry", body, qos=1) == 0
    assert pub.publish(f"devices/{device}/telemetry", body, qos=2) == 0
    assert [m.payload for m in watcher.collect(2)] == [body, body]


def test_undecodable_telemetry_v5_puback_0x99_and_still_routed(
    shared_gateway: GatewayProcess, peers: list[PahoPeer]
) -> None:
    edgeway_only()
    gw = shared_gateway
    device = unique("dev")
    topic = f"devices/{device}/telemetry"
    watcher = connected(gw, peers, version=5)
    watcher.subscribe(topic, 1)
    pub = connected(gw, peers, version=5)
    assert pub.publish(topic, b"not json {", qos=1) == 0x99  # payload format invalid
    assert watcher.get().payload == b"not json {"
    assert pub.publish(topic, b'{"ok": 1}', qos=1) == 0  # the connection goes on
    assert gw.process.poll() is None


def _records(body: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in a sink body that looks like a record."""
    if isinstance(body, dict):
        if "device_id" in body and "metrics" in body:
            yield body
        for v in body.values():
            yield from _records(v)
    elif isinstance(body, list):
        for v in body:
            yield from _records(v)


async def test_telemetry_reaches_http_sink(start_gateway: StartGateway) -> None:
    received: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def ingest(request: web.Request) -> web.Response:
        received.extend(_records(await request.json()))
        arrived.set()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/ingest", ingest)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        sink_port = runner.addresses[0][1]
        gw = await asyncio.to_thread(
            start_gateway, extra_args=["--sink", f"http://127.0.0.1:{sink_port}/ingest"]
        )
        device = unique("dev")
        async with asyncio.timeout(TIMEOUT * 2):
            async with aiomqtt.Client(gw.host, gw.port, identifier=device) as client:
                for i in range(5):
                    payload = json.dumps({"temp": 20 + i, "seq": i})
                    await client.publish(f"devices/{device}/telemetry", payload, qos=1)
            while len([r for r in received if r["device_id"] == device]) < 5:
                arrived.clear()
                await arrived.wait()
    finally:
        await runner.cleanup()
    mine = [r for r in received if r["device_id"] == device]
    assert [r["metrics"] for r in mine] == [{"temp": 20 + i, "seq": i} for i in range(5)]
    assert len({r["id"] for r in mine}) == 5, "record ids must be distinct"


# ---------------------------------------------------------------------------
# start-up and shutdown


def _telemetry_load(gw: GatewayProcess, n: int, stop: threading.Event, acks: list[int]) -> None:
    """Publish QoS 1 telemetry in pipelined batches until ``stop``; count PUBACKs."""
    topic = f"devices/load-{n}/telemetry".encode()
    payload = b'{"temp": 21.5}'
    batch = bytearray()
    for pid in range(1, 101):
        body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", pid) + payload
        batch += bytes([0x32, len(body)]) + body
    with socket.create_connection((gw.host, gw.port), timeout=TIMEOUT) as sock:
        sock.sendall(raw_connect_packet(f"load-{n}"))
        sock.recv(4)
        sock.settimeout(1.0)
        while not stop.is_set():
            try:
                sock.sendall(batch)
                data = sock.recv(65536)
            except OSError:
                return  # the gateway closed the connection: expected on shutdown
            if not data:
                return
            acks[0] += len(data) // 4


def test_sigterm_under_load_exits_zero_within_5s(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    stop = threading.Event()
    acks = [0]
    loaders = [threading.Thread(target=_telemetry_load, args=(gw, n, stop, acks)) for n in range(4)]
    for t in loaders:
        t.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while acks[0] < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a counter the loader thread updates
        assert acks[0] >= 1000, "the load never got going"
        started = time.monotonic()
        gw.process.send_signal(signal.SIGTERM)
        code = gw.wait_exit(8.0)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        for t in loaders:
            t.join(TIMEOUT)
    assert code == 0, f"exit code {code}; output:\n{gw.output()[-3000:]}"
    assert elapsed <= 5.0, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in gw.output()
    if gw.args[0] != "/usr/sbin/mosquitto":
        # In-flight work finished: every message a device got a PUBACK for,
        # before or during the shutdown, is in the outbox (no sink: all kept).
        stored = len(stored_records(gw.data_dir / "outbox.db"))
        assert stored >= acks[0], f"{acks[0]} acknowledged, {stored} stored"


def test_sigint_exits_zero(start_gateway: StartGateway) -> None:
    gw = start_gateway()
    gw.process.send_signal(signal.SIGINT)
    assert gw.wait_exit(5.0) == 0, gw.output()[-3000:]
    assert "Traceback" not in gw.output()


def test_second_gateway_on_same_port_exits_1_naming_the_port(
    start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    edgeway_only()
    first = start_gateway()
    second = start_gateway(port=first.port, wait=False)
    code = second.wait_exit(15.0)
    out = second.output()
    assert code == 1, f"exit code {code}; output:\n{out[-3000:]}"
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "no message at all"
    assert str(first.port) in lines[-1], f"last line does not name the port: {lines[-1]!r}"
    # The first gateway is unaffected.
    connected(first, peers, version=4)


def test_second_gateway_on_same_data_dir_exits_1_naming_it(
    start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    edgeway_only()
    first = start_gateway()
    second = start_gateway(data_dir=first.data_dir, wait=False)
    code = second.wait_exit(15.0)
    out = second.output()
    assert code == 1, f"exit code {code}; output:\n{out[-3000:]}"
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "no message at all"
    assert lines[-1].startswith("error: ") and str(first.data_dir) in lines[-1], lines[-1]
    connected(first, peers, version=4)  # the first gateway is unaffected


def test_no_config_runs_on_embedded_defaults(
    start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    gw = start_gateway(data_dir=False)  # no --config, no --data-dir
    assert gw.config_path is None
    client = connected(gw, peers, version=5)  # anonymous, on the loopback listener
    assert client.publish(f"devices/{unique('dev')}/telemetry", b'{"v": 1}', qos=1) == 0
    assert (gw.workdir / "edgeway-data").is_dir(), "data not under ./edgeway-data"
    assert "anonymous" in gw.output().lower(), "no log line saying anonymous clients are allowed"


def test_config_from_environment_and_flags_override_it(
    start_gateway: StartGateway, peers: list[PahoPeer], tmp_path: Path
) -> None:
    """``EDGEWAY_CONFIG`` names the file; ``--log-format``/``--log-level`` win over it."""
    edgeway_only()
    cfg = tmp_path / "from-env.yaml"
    cfg.write_text("gateway: {id: gw-from-env}\nlog: {level: error, format: text}\n")
    gw = start_gateway(env={"EDGEWAY_CONFIG": str(cfg)}, extra_args=["--log-format", "json"])
    connected(gw, peers, version=5)
    for _ in range(100):  # the ready line follows the listener by a moment: at most 5 s
        if '"edgeway ready"' in gw.output():
            break
        time.sleep(0.05)
    lines = [json.loads(line) for line in gw.output().splitlines() if line.strip()]
    ready = [obj for obj in lines if obj["msg"] == "edgeway ready"]  # info: --log-level info
    assert ready and ready[0]["gateway_id"] == "gw-from-env", lines


def test_retained_and_sessions_survive_restart(
    start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    first = start_gateway()
    topic = unique("keep")
    sub_id = unique("sleeper")
    retained_topic = unique("retained-keep")

    setter = connected(first, peers, version=5)
    assert setter.publish(retained_topic, b"kept-state", qos=1, retain=True) in (0, 0x10)
    sleeper = connected(first, peers, version=4, client_id=sub_id, clean=False)
    sleeper.subscribe(topic, 1)
    sleeper.disconnect()
    sent = [f"queued-{i}".encode() for i in range(5)]
    for p in sent:
        setter.publish(topic, p, qos=1)
    setter.disconnect()
    assert first.terminate() == 0

    second = start_gateway(port=first.port, data_dir=first.data_dir)
    late = connected(second, peers, version=5)
    late.subscribe(retained_topic, 1)
    msg = late.get()
    assert (msg.payload, msg.retain) == (b"kept-state", True)

    back = PahoPeer(second.host, second.port, version=4, client_id=sub_id, clean=False)
    peers.append(back)
    rc, session_present = back.connect()
    assert rc == 0
    assert session_present, "persistent session lost in the restart"
    assert [m.payload for m in back.collect(len(sent))] == sent


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_mqtt_over_websocket(
    start_gateway: StartGateway, peers: list[PahoPeer], version: int
) -> None:
    gw = start_gateway(
        """
        mqtt:
          listeners:
            - bind: "127.0.0.1:{port}"
              transport: websocket
              websocket_path: /mqtt
              allow_anonymous: true
        """
    )
    topic = unique("ws")
    sub = connected(gw, peers, version=version, websocket_path="/mqtt")
    assert sub.subscribe(topic, 1) == [1]
    pub = connected(gw, peers, version=version, websocket_path="/mqtt")
    assert pub.publish(topic, b"over-websocket", qos=1) == 0
    assert sub.get().payload == b"over-websocket"
