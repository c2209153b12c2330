"""Gateway birth and death on the MQTT sink's broker (``options.status_topic``),
with the real ``edgeway run`` process, a real Mosquitto and a paho subscriber:
online when it starts, offline "stopped" on SIGTERM, offline "connection lost"
(the broker's will) at once on SIGKILL, all retained for a late subscriber."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgeway_process import StartGateway, edgeway_only
from mosquitto_process import MosquittoProcess
from mqtt_peers import TIMEOUT, PahoPeer

TOPIC = "edgeway/gw-p/status"


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[MosquittoProcess]:
    m = MosquittoProcess(tmp_path / "cloud")
    m.start()
    try:
        yield m
    finally:
        m.kill()


def _config(port: int) -> str:
    return f"""
    gateway: {{id: gw-p}}
    sinks:
      - name: cloud
        url: mqtt://127.0.0.1:{port}
        options: {{status_topic: "edgeway/{{gateway_id}}/status", keepalive: 5}}
    """


def _next(peer: PahoPeer, timeout: float = TIMEOUT) -> dict[str, Any]:
    msg = peer.messages.get(timeout=timeout)
    assert msg.topic == TOPIC and msg.retain in (True, False)
    body: dict[str, Any] = json.loads(msg.payload)
    return body


def _subscriber(port: int, peers: list[PahoPeer]) -> PahoPeer:
    peer = PahoPeer("127.0.0.1", port)
    peers.append(peer)
    peer.connect()
    peer.subscribe(TOPIC, qos=1)
    return peer


def test_birth_stop_and_kill_are_seen_and_retained(
    cloud: MosquittoProcess, start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    edgeway_only()
    watcher = _subscriber(cloud.port, peers)
    gw = start_gateway(_config(cloud.port))
    birth = _next(watcher)
    assert birth["state"] == "online" and birth["gateway_id"] == "gw-p" and "reason" not in birth
    assert gw.terminate() == 0
    death = _next(watcher)
    assert death == {**death, "state": "offline", "reason": "stopped", "seq": birth["seq"]}

    gw2 = start_gateway(_config(cloud.port), data_dir=gw.data_dir)
    birth2 = _next(watcher)
    assert birth2["state"] == "online" and birth2["seq"] > birth["seq"]
    t0 = time.monotonic()
    gw2.process.kill()
    gw2.process.wait(TIMEOUT)
    will = _next(watcher)
    # The kernel closed the socket: the broker publishes the will at once,
    # not after the keep-alive (5 s * 1.5).
    assert time.monotonic() - t0 < 3.0
    assert will["state"] == "offline" and will["reason"] == "connection lost"
    assert will["seq"] == birth2["seq"]
    with pytest.raises(queue.Empty):
        watcher.messages.get(timeout=0.5)

    late = _subscriber(cloud.port, peers)
    retained = late.messages.get(timeout=TIMEOUT)
    assert retained.retain and json.loads(retained.payload)["reason"] == "connection lost"


def test_birth_comes_again_after_the_broker_restarts(
    cloud: MosquittoProcess, start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    edgeway_only()
    gw = start_gateway(_config(cloud.port))
    first = _next(_subscriber(cloud.port, peers))
    assert first["state"] == "online"
    cloud.kill()
    cloud.start()  # no persistence: the retained status is gone with it
    again = _next(_subscriber(cloud.port, peers), timeout=40)  # reconnect backoff < 30 s
    assert again["state"] == "online" and again["seq"] > first["seq"]
    assert gw.terminate() == 0


def test_status_topic_with_a_wildcard_is_a_configuration_error() -> None:
    from edgeway.validate import validate

    issues = validate(
        "sinks:\n  - name: cloud\n    url: mqtt://127.0.0.1:1883\n"
        "    options: {status_topic: 'edgeway/+/status'}\n",
        filename="f.yaml",
    )
    assert [(i.line, i.key) for i in issues] == [(4, "sinks[0].options.status_topic (cloud)")]
    assert "invalid MQTT topic" in issues[0].message
