"""Firmware campaigns end to end: signed images uploaded through the admin
API, paho-mqtt devices that take the firmware.update command, download the
image from the HTTP ingest with a range request that resumes a cut-off
download, check its SHA-256 and report an LwM2M result; waves, thresholds,
pause/abort, a restart in the middle."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from firmware_rig import IMAGE, KEY, Rig, upload, wait_campaign

SRC = str(Path(__file__).resolve().parents[2] / "src")


class Fleet:
    """Devices in one process. ``fail`` maps a device to the LwM2M result it
    reports instead of success; ``cut`` devices' first download stops half way
    and resumes with a Range request."""

    def __init__(self, port: int, devices: list[str], fail: dict[str, str], version: str) -> None:
        self.port, self.fail, self.version = port, fail, version
        self.executed: Counter[str] = Counter()
        self.resumed = 0
        self.lock = threading.Lock()
        self.clients = []
        for d in devices:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=d)
            c.user_data_set(d)
            c.on_connect = lambda c, u, *a: c.subscribe(f"devices/{u}/commands/+", 1)
            c.on_message = self._on_message
            c.connect("127.0.0.1", port)
            c.loop_start()
            self.clients.append(c)

    def _on_message(self, client: mqtt.Client, device: str, msg: mqtt.MQTTMessage) -> None:
        cmd = orjson.loads(msg.payload)
        threading.Thread(
            target=self._update, args=(client, device, msg.topic, cmd), daemon=True
        ).start()

    def _update(self, client: mqtt.Client, device: str, topic: str, cmd: dict[str, Any]) -> None:
        p = cmd["params"]
        with self.lock:
            self.executed[device] += 1
        if device in self.fail:
            answer = {"id": cmd["id"], "status": "ok", "result": {"result": self.fail[device]}}
        else:
            half = p["size"] // 2
            req = urllib.request.Request(p["url"], headers={"Range": f"bytes=0-{half - 1}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                first = r.read()
                assert r.status == 206
            req = urllib.request.Request(p["url"], headers={"Range": f"bytes={len(first)}-"})
            with urllib.request.urlopen(req, timeout=10) as r:
                data = first + r.read()
            with self.lock:
                self.resumed += 1
            ok = hashlib.sha256(data).hexdigest() == p["sha256"]
            result = {"result": "success", "version": p["version"]} if ok else {"result": 5}
            answer = {"id": cmd["id"], "status": "ok", "result": result}
        client.publish(topic + "/result", orjson.dumps(answer), qos=1)

    def stop(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


async def test_waves_and_error_threshold_halt_before_group_3(rig: Rig) -> None:
    groups = {f"g{g}": [f"pump-{g}-{i}" for i in range(10)] for g in (1, 2, 3)}
    everyone = [d for ids in groups.values() for d in ids]
    fail = {d: "integrity_check_failure" for d in groups["g2"][:5]}
    fleet = await asyncio.to_thread(Fleet, rig.mport, everyone, fail, "2.0")
    try:
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
            r = await upload(http, "2.0", sign=False)
            assert r.status_code == 422 and r.json()["error"] == "unsigned"
            r = await upload(http, "2.0", data=IMAGE[:-1] + b"x", signed_data=IMAGE)
            assert r.status_code == 422 and r.json()["error"] == "bad_signature"
            r = await upload(http, "2.0")
            assert r.status_code == 201, r.text
            image = r.json()["image"]
            # A device that no campaign targets cannot download it.
            r0 = await asyncio.to_thread(
                _status, f"http://127.0.0.1:{rig.hport}/devices/pump-1-0/firmware/{image['id']}"
            )
            assert r0 == 404
            r = await http.post(
                "/api/firmware/campaigns",
                json={
                    "image": image["id"], "groups": groups, "canary_share": 0.1, "pace": 6000,
                    "success_threshold": 0.9, "error_threshold": 0.2, "min_finished": 5,
                },
            )  # fmt: skip
            assert r.status_code == 201, r.text
            cid = r.json()["campaign"]["id"]
            body = await wait_campaign(http, cid, {"halted", "completed"})
        assert body["campaign"]["state"] == "halted", body["campaign"]
        by_state = Counter((d["device_id"].split("-")[1], d["state"]) for d in body["devices"])
        # Group 3 never started; group 1 and the canaries all succeeded.
        assert all(
            d["state"] == "pending"
            for d in body["devices"]
            if d["device_id"].startswith("pump-3-") and d["wave"] == 3
        )
        assert by_state[("1", "failed")] == 0
        failed = [d for d in body["devices"] if d["state"] == "failed"]
        assert failed and all(d["result"] == "integrity_check_failure" for d in failed)
        succeeded = [d for d in body["devices"] if d["state"] == "succeeded"]
        assert all(fleet.executed[d["device_id"]] == 1 for d in succeeded)
        assert fleet.resumed == len(succeeded)  # every download resumed with a Range request
    finally:
        await asyncio.to_thread(fleet.stop)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


async def test_restart_resumes_and_no_device_updates_twice(rig: Rig) -> None:
    devices = [f"pump-{i}" for i in range(12)]
    fleet = await asyncio.to_thread(Fleet, rig.mport, devices, {}, "3.1")
    try:
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
            image = (await upload(http, "3.1")).json()["image"]
            r = await http.post(
                "/api/firmware/campaigns",
                json={"image": image["id"], "groups": {"all": devices}, "canary_share": 0.25,
                      "pace": 240, "max_in_flight": 2},
            )  # fmt: skip
            cid = r.json()["campaign"]["id"]
            async with asyncio.timeout(30):
                while sum(fleet.executed.values()) < 3:  # noqa: ASYNC110 - a thread counts
                    await asyncio.sleep(0.1)
            r = await http.post(f"/api/firmware/campaigns/{cid}/pause")
            assert r.json()["campaign"]["state"] == "paused"
        await rig.stop()
        await rig.start()
        async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
            body = (await http.get(f"/api/firmware/campaigns/{cid}")).json()
            assert body["campaign"]["state"] == "paused"  # it survived the restart as it was
            await http.post(f"/api/firmware/campaigns/{cid}/resume")
            body = await wait_campaign(http, cid, {"completed", "halted"}, 90)
        assert body["campaign"]["state"] == "completed", body
        assert all(d["state"] == "succeeded" for d in body["devices"])
        assert all(fleet.executed[d] == 1 for d in devices), fleet.executed
    finally:
        await asyncio.to_thread(fleet.stop)


async def test_abort_cancels_what_is_queued(rig: Rig) -> None:
    async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
        image = (await upload(http, "4.0")).json()["image"]
        # Nobody is connected: the commands wait in the queue.
        r = await http.post(
            "/api/firmware/campaigns",
            json={"image": image["id"], "groups": {"g": ["ghost-1", "ghost-2"]}, "canary_share": 0},
        )
        cid = r.json()["campaign"]["id"]
        await asyncio.sleep(1.5)
        r = await http.post(f"/api/firmware/campaigns/{cid}/abort")
        body = r.json()["campaign"]
        assert body["state"] == "aborted" and body["counts"] == {"cancelled": 2}
        cmds = (await http.get("/api/commands?device_id=ghost-1")).json()["commands"]
        assert cmds and cmds[0]["state"] == "cancelled"
        r = await http.post(f"/api/firmware/campaigns/{cid}/resume")
        assert r.status_code == 400


async def test_cli_signs_uploads_and_starts_a_campaign(rig: Rig, tmp_path: Path) -> None:
    import sys

    key = tmp_path / "release.pem"
    key.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    image = tmp_path / "image.bin"
    image.write_bytes(IMAGE)
    src = SRC

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeway", "firmware", *args,
            env={**os.environ, "PYTHONPATH": src},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    code, sig, err = await cli("sign", "pump-ctl", "5.0", str(image), "--key", str(key))
    assert code == 0, err
    admin = ["--admin", rig.base]
    code, out, err = await cli(
        "upload", "pump-ctl", "5.0", str(image), "--signature", sig.strip(), *admin
    )
    assert code == 0, err
    image_id = orjson.loads(out)["image"]["id"]
    code, out, err = await cli(
        "upload", "pump-ctl", "5.1", str(image), "--signature", sig.strip(), *admin
    )
    assert code == 1 and "signature" in err  # signed for 5.0, not 5.1
    code, out, err = await cli("campaign", image_id, "--group", "a=ghost-7", *admin)
    assert code == 0, err
    cid = orjson.loads(out)["campaign"]["id"]
    code, out, err = await cli("abort", cid, *admin)
    assert code == 0 and orjson.loads(out)["campaign"]["state"] == "aborted"


async def test_a_finished_campaign_leaves_another_campaigns_downloads(rig: Rig) -> None:
    """Two campaigns of one image: the first completing must not take the
    right to download from a device of the second whose update is out."""
    got: list[str] = []
    holder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hold-1")
    holder.on_connect = lambda c, *a: c.subscribe("devices/hold-1/commands/+", 1)
    holder.on_message = lambda c, u, m: got.append(m.topic)  # takes it, never answers
    holder.connect("127.0.0.1", rig.mport)
    holder.loop_start()
    fleet = await asyncio.to_thread(Fleet, rig.mport, ["quick-1"], {}, "5.0")
    try:
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
            image = (await upload(http, "5.0")).json()["image"]
            url = f"http://127.0.0.1:{rig.hport}/devices/hold-1/firmware/{image['id']}"
            r = await http.post(
                "/api/firmware/campaigns",
                json={"image": image["id"], "groups": {"g": ["hold-1"]}, "canary_share": 0},
            )
            slow = r.json()["campaign"]["id"]
            async with asyncio.timeout(20):
                while not got:  # noqa: ASYNC110 - paho's thread appends
                    await asyncio.sleep(0.1)
            assert await asyncio.to_thread(_status, url) == 200
            r = await http.post(
                "/api/firmware/campaigns",
                json={"image": image["id"], "groups": {"g": ["quick-1"]}, "canary_share": 0},
            )
            quick = r.json()["campaign"]["id"]
            body = await wait_campaign(http, quick, {"completed", "halted"})
            assert body["campaign"]["state"] == "completed", body
            # The first campaign is still under way and its device may still download.
            slow_state = (await http.get(f"/api/firmware/campaigns/{slow}")).json()["campaign"]
            assert slow_state["state"] == "running", slow_state
            assert await asyncio.to_thread(_status, url) == 200
    finally:
        await asyncio.to_thread(fleet.stop)
        holder.disconnect()
        holder.loop_stop()
