"""The MQTT chunk server's rules without a network (a stand-in broker and
firmware service): chunks at offsets and past the end, the per-device bound
on requests being read, a connection with something still queued, a maximum
packet size that leaves no room, who may ask, malformed requests."""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from edgeway.firmware.mqtt import MAX_PENDING, FirmwareMqtt, decode_chunk
from edgeway.south.mqtt.packets import Properties

DATA = bytes(range(256)) * 40  # 10,240 bytes


class Broker:
    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.sessions: dict[str, Any] = {}
        self.sent: list[tuple[str, dict[str, Any], bytes, Properties | None]] = []

    def speaks_for(self, client_id: str, device_id: str) -> bool:
        return client_id == device_id

    def publish(self, topic: str, payload: bytes, *, qos: int, properties: Any = None) -> None:
        header, data = decode_chunk(payload)
        self.sent.append((topic, header, data, properties))

    def connect(self, device: str, max_packet: int = 0) -> Any:
        s = SimpleNamespace(queue=deque(), conn=SimpleNamespace(max_out_packet=max_packet))
        self.sessions[device] = s
        return s


class Service:
    def __init__(self, path: Path) -> None:
        self.file = path

    def may_download(self, image: str, device: str) -> bool:
        return image == "img" and device.startswith("d")

    def path(self, image: str) -> Path:
        return self.file


def ask(fw: FirmwareMqtt, sender: str, body: Any, device: str | None = None, **props: Any) -> None:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    p = Properties(**props) if props else None
    fw.published(f"devices/{device or sender}/firmware/get", payload, p, sender)


async def settle(fw: FirmwareMqtt) -> None:
    while fw._tasks:
        await asyncio.gather(*list(fw._tasks))


async def test_chunks_bounds_and_refusals(tmp_path: Path) -> None:
    image = tmp_path / "img.bin"
    image.write_bytes(DATA)
    broker = Broker()
    fw = FirmwareMqtt(broker, Service(image), chunk_max=4096)  # type: ignore[arg-type]
    broker.connect("d1")
    # Offsets: a whole chunk, the chunk_max cap, the tail, past the end.
    for offset, size in ((0, 1000), (1000, 100_000), (10_000, 1000), (20_000, 10)):
        ask(fw, "d1", {"image": "img", "offset": offset, "size": size})
        await settle(fw)
    got = [(h["offset"], h["size"], h["total"], d) for _, h, d, _ in broker.sent]
    assert got == [
        (0, 1000, len(DATA), DATA[:1000]),
        (1000, 4096, len(DATA), DATA[1000:5096]),
        (10_000, 240, len(DATA), DATA[10_000:]),
        (20_000, 0, len(DATA), b""),
    ]
    assert all(t == "devices/d1/firmware/chunk" for t, *_ in broker.sent)
    broker.sent.clear()
    # At most MAX_PENDING being read for one device; the next is busy.
    for i in range(MAX_PENDING + 1):
        ask(fw, "d1", {"image": "img", "offset": i})
    assert [h.get("error") for _, h, _, _ in broker.sent] == ["busy"]
    await settle(fw)
    assert len(broker.sent) == MAX_PENDING + 1 and not fw._pending
    broker.sent.clear()
    # Something still queued for its connection: busy, nothing read.
    broker.sessions["d1"].queue.append(object())
    ask(fw, "d1", {"image": "img", "offset": 0})
    assert broker.sent[-1][1]["error"] == "busy" and not fw._tasks
    broker.sessions["d1"].queue.clear()
    # MQTT 5: a small maximum packet size caps the chunk; a tiny one leaves no room.
    broker.connect("d5", max_packet=1000)
    ask(
        fw,
        "d5",
        {"image": "img", "offset": 0},
        response_topic="devices/d5/fw",
        correlation_data=b"k",
    )
    await settle(fw)
    topic, header, data, props = broker.sent[-1]
    assert topic == "devices/d5/fw" and props is not None and props.correlation_data == b"k"
    assert 0 < len(data) == header["size"]
    # The PUBLISH: fixed header (<= 5), topic, properties (length, correlation
    # data), payload (header length, header, data) within the 1,000 bytes.
    publish = 5 + 2 + len(topic) + 1 + 3 + 1 + 2 + len(orjson.dumps(header)) + len(data)
    assert 970 < publish <= 1000, publish
    broker.connect("d6", max_packet=120)
    ask(fw, "d6", {"image": "img", "offset": 0})
    assert broker.sent[-1][1]["error"] == "too_small"
    # A response topic outside the device's own topics is not used.
    ask(fw, "d1", {"image": "img", "offset": 0}, response_topic="devices/d5/fw")
    await settle(fw)
    assert broker.sent[-1][0] == "devices/d1/firmware/chunk"
    # Not updating to it; another client; malformed.
    ask(fw, "x1", {"image": "img", "offset": 0})
    ask(fw, "d1", {"image": "other", "offset": 0})
    assert [h["error"] for _, h, _, _ in broker.sent[-2:]] == ["not_found", "not_found"]
    n = len(broker.sent)
    ask(fw, "d2", {"image": "img", "offset": 0}, device="d1")
    assert fw.refused == 1 and len(broker.sent) == n
    for bad in (b"[1]", b"{", b'{"image": "img", "offset": 1.5}', b'{"image": "img", "size": 0}',
                orjson.dumps({"image": "img", "pad": "x" * 600})):  # fmt: skip
        ask(fw, "d1", bad)
        assert broker.sent[-1][1]["error"] == "invalid", bad
    assert fw.errors == {"busy": 2, "too_small": 1, "not_found": 2, "invalid": 5}
