"""Bounded work and memory per client (DESIGN guarantee 6), over real sockets."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc
from pathlib import Path

from mqtt_harness import RawClient, running_broker

from edgeway.config import MqttLimits, MqttSection
from edgeway.south.mqtt.connection import MqttConnection
from edgeway.south.mqtt.packets import Disconnect


def _only_connection(conns: set[MqttConnection], client_id: str) -> MqttConnection:
    (conn,) = [c for c in conns if c.client_id == client_id]
    return conn


async def test_trickled_packet_costs_about_its_size(tmp_path: Path) -> None:
    """A PUBLISH arriving one byte per read is held in about its own size
    (it was held as one bytes object per read: ~40x its size)."""
    async with running_broker(tmp_path) as rb:
        client, _ = await RawClient.connect(rb.port, "trickle", level=4)
        conn = _only_connection(rb.broker.connections, "trickle")
        sock: socket.socket = client.w.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A QoS 0 PUBLISH announcing 100,000 bytes; 4,000 of them sent.
        sent = 4000
        await client.w.drain()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            header = bytes([0x30, 0xA0, 0x8D, 0x06])  # remaining length 100,000
            async with asyncio.timeout(10):
                for i in range(sent):
                    client.w.transport.write(header[i : i + 1] if i < len(header) else b"x")
                    # One read per byte: wait until the broker has taken it.
                    while conn.reader.buffered_bytes < i + 1:  # noqa: ASYNC110
                        await asyncio.sleep(0)
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert conn.reader.buffered_bytes == sent
        assert held < 2 * sent + 4096, f"{held} bytes held for {sent} buffered"
        await client.close()


async def test_packet_that_makes_no_progress_is_closed(tmp_path: Path) -> None:
    """Keep alive counts every byte: a client sending one now and then kept
    its socket and partial packet forever; ``packet_timeout`` closes it."""
    cfg = MqttSection(limits=MqttLimits(packet_timeout=0.6))
    async with running_broker(tmp_path, config=cfg) as rb:
        client, _ = await RawClient.connect(rb.port, "slow", level=5, keepalive=60)
        client.send_raw(bytes([0x30, 0x64]))  # PUBLISH of 100 bytes, first 2 bytes
        started = time.monotonic()
        got: list[object] = []
        closed = False
        while time.monotonic() - started < 4.0:
            client.send_raw(b"\x00")  # progress too slow to ever finish in time
            try:
                got.append(await client.recv(0.2))
            except TimeoutError:
                continue
            except EOFError:
                closed = True
                break
        assert closed, "the connection stayed open"
        assert [type(p) for p in got] == [Disconnect]
        assert got[0].reason_code == 0x8D  # type: ignore[attr-defined]
        assert rb.broker.stats()["packet_timeouts"] == 1
        await client.close()


async def test_complete_packets_keep_resetting_the_packet_clock(tmp_path: Path) -> None:
    """Each packet gets its own ``packet_timeout``: a client whose packets
    each complete in time is never closed, however long it stays."""
    cfg = MqttSection(limits=MqttLimits(packet_timeout=0.6))
    async with running_broker(tmp_path, config=cfg) as rb:
        client, _ = await RawClient.connect(rb.port, "ok", level=5, keepalive=60)
        ping = bytes([0xC0, 0x00])
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            client.send_raw(ping[:1])  # half a PINGREQ ...
            await asyncio.sleep(0.3)
            client.send_raw(ping[1:])  # ... completed within the timeout
            assert (await client.recv()).__class__.__name__ == "PingResp"
        assert rb.broker.stats().get("packet_timeouts", 0) == 0
        await client.disconnect()
