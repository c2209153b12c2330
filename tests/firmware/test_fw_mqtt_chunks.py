"""Firmware in MQTT chunks: paho-mqtt devices (MQTT 3.1.1, and MQTT 5 with a
small maximum packet size and a response topic) take the firmware.update
command, fetch the image chunk by chunk from the embedded broker, lose their
connection half way and resume at the offset they had, check the SHA-256 and
report. Refusals: another client's request, an image the device is not
updating to, a malformed request."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeway.firmware.mqtt import decode_chunk
from firmware_rig import IMAGE, Rig, upload, wait_campaign


class ChunkDevice:
    """A paho device that downloads over MQTT chunks (one request at a time)."""

    def __init__(self, port: int, device: str, v5: bool, max_packet: int | None = None) -> None:
        self.port, self.device, self.v5, self.max_packet = port, device, v5, max_packet
        self.answers: queue.Queue[tuple[dict[str, Any], bytes, Any]] = queue.Queue()
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reply = f"devices/{device}/firmware/mine" if v5 else f"devices/{device}/firmware/chunk"
        self.largest = 0
        self.resumed_at: int | None = None
        self.client = self._connect()

    def _connect(self) -> mqtt.Client:
        proto = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device, protocol=proto)
        c.on_message = self._on_message
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        props = None
        if self.v5 and self.max_packet:
            props = Properties(PacketTypes.CONNECT)
            props.MaximumPacketSize = self.max_packet
        c.connect("127.0.0.1", self.port, properties=props)
        c.loop_start()
        c.subscribe([(f"devices/{self.device}/commands/+", 1), (self.reply, 0)])
        assert subscribed.wait(10)
        return c

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.reply:
            self.largest = max(self.largest, len(msg.payload))
            header, data = decode_chunk(msg.payload)
            corr = getattr(msg.properties, "CorrelationData", None) if self.v5 else None
            self.answers.put((header, data, corr))
        elif "/commands/" in msg.topic:
            self.commands.put({"topic": msg.topic, **orjson.loads(msg.payload)})

    def ask(self, body: bytes, corr: bytes = b"c") -> tuple[dict[str, Any], bytes]:
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply
            props.CorrelationData = corr
        self.client.publish(f"devices/{self.device}/firmware/get", body, 1, properties=props)
        header, data, got_corr = self.answers.get(timeout=10)
        if self.v5:
            assert got_corr == corr
        return header, data

    def download(self, image: str, cut_at: int) -> bytes:
        """Chunks until the end; the connection dropped once past ``cut_at``,
        then a new connection goes on from the offset it had."""
        got = bytearray()
        while True:
            header, data = self.ask(
                orjson.dumps({"image": image, "offset": len(got), "size": 8192}),
                corr=str(len(got)).encode(),
            )
            assert "error" not in header, header
            assert header["offset"] == len(got)
            got += data
            if not data:
                return bytes(got)
            if self.resumed_at is None and len(got) >= cut_at:
                self.client.disconnect()
                self.client.loop_stop()
                self.resumed_at = len(got)
                self.client = self._connect()

    def update(self) -> None:
        cmd = self.commands.get(timeout=30)
        p = cmd["params"]
        data = self.download(p["image"], p["size"] // 2)
        ok = hashlib.sha256(data).hexdigest() == p["sha256"]
        result = {"result": "success", "version": p["version"]} if ok else {"result": 5}
        answer = {"id": cmd["id"], "status": "ok", "result": result}
        self.client.publish(cmd["topic"] + "/result", orjson.dumps(answer), qos=1)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_chunks_for_311_and_5_with_resume(rig: Rig) -> None:
    assert rig.gw is not None
    v3 = await asyncio.to_thread(ChunkDevice, rig.mport, "dev-v311", False)
    v5 = await asyncio.to_thread(ChunkDevice, rig.mport, "dev-v5", True, 3000)
    evil = await asyncio.to_thread(ChunkDevice, rig.mport, "evil", False)
    try:
        async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
            image = (await upload(http, "8.0")).json()["image"]["id"]
            # Not updating to it (no campaign yet): refused.
            h, data = await asyncio.to_thread(v3.ask, orjson.dumps({"image": image, "offset": 0}))
            assert h["error"] == "not_found" and data == b""
            for bad in (b"not json", b'{"image": 3}', b'{"image": "x", "offset": -1}'):
                h, _ = await asyncio.to_thread(v3.ask, bad)
                assert h["error"] == "invalid", h
            r = await http.post(
                "/api/firmware/campaigns",
                json={"image": image, "groups": {"all": ["dev-v311", "dev-v5"]},
                      "canary_share": 0, "pace": 6000},
            )  # fmt: skip
            cid = r.json()["campaign"]["id"]
            await asyncio.gather(asyncio.to_thread(v3.update), asyncio.to_thread(v5.update))
            # Another client asking for a targeted device's chunks gets nothing.
            fw_mqtt = rig.gw._firmware_mqtt
            before = fw_mqtt.refused
            evil.client.publish(
                "devices/dev-v311/firmware/get", orjson.dumps({"image": image, "offset": 0})
            )
            async with asyncio.timeout(10):
                while fw_mqtt.refused == before:  # noqa: ASYNC110 - a counter
                    await asyncio.sleep(0.05)
            body = await wait_campaign(http, cid, {"completed", "halted"})
        assert body["campaign"]["state"] == "completed", body
        assert all(d["state"] == "succeeded" for d in body["devices"])
        # Both resumed half way on a new connection; MQTT 5 chunks stayed
        # within its 3,000-byte maximum packet size, 3.1.1 got 8 KiB chunks.
        assert v3.resumed_at and v5.resumed_at and v3.resumed_at < len(IMAGE)
        assert v5.largest <= 3000 and v3.largest > 8192
        assert evil.answers.empty()
        # Done: the devices may not read the image any more.
        h, _ = await asyncio.to_thread(v3.ask, orjson.dumps({"image": image, "offset": 0}))
        assert h["error"] == "not_found"
    finally:
        for d in (v3, v5, evil):
            await asyncio.to_thread(d.stop)
