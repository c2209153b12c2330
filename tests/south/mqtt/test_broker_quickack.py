"""A client that leaves Nagle on (paho's default) and writes a packet right
after the PUBACK of one of our PUBLISHes (a reading after a command) must
not wait for the broker's delayed ACK (40 ms on Linux)."""

from __future__ import annotations

import socket
import statistics
import sys
import time
from pathlib import Path

import pytest
from mqtt_harness import RawClient, running_broker

from edgeway.south.mqtt import connection
from edgeway.south.mqtt.packets import PubAck, Publish

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="TCP_QUICKACK and 40 ms delayed ACKs are Linux's"
)

ROUNDS = 12


async def _rounds(tmp_path: Path) -> list[float]:
    """Seconds from a device's PUBACK + PUBLISH (two writes, Nagle on) to the
    broker's PUBACK of that PUBLISH, per round."""
    async with running_broker(tmp_path) as rb:
        dev, _ = await RawClient.connect(rb.port, "dev")
        sock = dev.w.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # as paho leaves it
        await dev.subscribe("cmd/dev", qos=1)
        app, _ = await RawClient.connect(rb.port, "app")
        out = []
        for i in range(ROUNDS):
            await app.publish("cmd/dev", b"fan", qos=1)
            cmd = await dev.expect(Publish)
            assert cmd.packet_id is not None
            t0 = time.perf_counter()
            dev.send(PubAck(cmd.packet_id))
            pid = dev.pid()
            dev.send(Publish("t/dev", b"%d" % i, 1, False, False, pid, cmd.properties))
            ack = await dev.expect(PubAck)
            out.append(time.perf_counter() - t0)
            assert ack.packet_id == pid
        await app.disconnect()
        await dev.disconnect()
    return out


async def test_a_packet_after_a_puback_is_not_held_by_the_delayed_ack(tmp_path: Path) -> None:
    took = await _rounds(tmp_path)
    # Without the quick ACK most rounds take 40+ ms (measured: median 44 ms, 0.06 ms with it).
    assert statistics.median(took) < 0.02, [round(t * 1000, 1) for t in took]


async def test_without_quickack_the_delayed_ack_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: this setup does expose the delay the fix removes."""
    monkeypatch.setattr(connection, "quickack_socket", lambda transport: None)
    took = await _rounds(tmp_path)
    assert statistics.median(took) > 0.03, [round(t * 1000, 1) for t in took]
