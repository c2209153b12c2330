"""Campaigns that target the device registry's groups, tags and type:
resolved when the campaign is created, one wave per group in the order
given, through the admin API and the CLI; named device lists still work."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import orjson

from firmware_rig import Rig, upload

SRC = str(Path(__file__).resolve().parents[2] / "src")


DEVICES = [
    {"id": "a-1", "type": "pump", "groups": ["line-1"], "tags": ["beta"]},
    {"id": "a-2", "type": "pump", "groups": ["line-1"], "tags": ["beta", "north"]},
    {"id": "a-3", "type": "valve", "groups": ["line-1"], "tags": ["beta"]},  # other type
    {"id": "a-4", "type": "pump", "groups": ["line-1"], "tags": []},  # no tag
    {"id": "b-1", "type": "pump", "groups": ["line-2"], "tags": ["beta"]},
    {"id": "b-2", "type": "pump", "groups": ["line-2", "line-1"], "tags": ["beta"]},  # both
    {"id": "b-3", "type": "pump", "groups": ["line-2"], "tags": ["beta"]},  # disabled below
    {"id": "c-1", "type": "pump", "groups": ["line-3"], "tags": ["beta"]},  # not selected
]


async def registry(http: httpx.AsyncClient) -> None:
    for d in DEVICES:
        r = await http.post("/api/devices", json=d)
        assert r.status_code == 201, r.text
    assert (await http.post("/api/devices/b-3/disable")).status_code == 200


async def test_groups_tags_and_type_from_the_registry(rig: Rig) -> None:
    async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
        await registry(http)
        image = (await upload(http, "7.0")).json()["image"]["id"]
        r = await http.post(
            "/api/firmware/campaigns",
            json={"image": image, "groups": ["line-2", "line-1"], "tags": ["beta"],
                  "type": "pump", "canary_share": 0, "pace": 1},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        camp = r.json()["campaign"]
        assert camp["waves"] == ["canary", "line-2", "line-1"]
        assert camp["selection"] == {
            "groups": ["line-2", "line-1"], "tags": ["beta"], "type": "pump",
        }  # fmt: skip
        body = (await http.get(f"/api/firmware/campaigns/{camp['id']}")).json()
        waves = {d["device_id"]: d["wave"] for d in body["devices"]}
        # line-2 is the first wave (b-2 is in both groups: the first takes it),
        # b-3 is disabled; line-1's pumps with the tag; a-3 a valve, a-4 untagged.
        assert waves == {"b-1": 1, "b-2": 1, "a-1": 2, "a-2": 2}
        # Resolved when created: a device added to line-1 afterwards is not in it.
        await http.post(
            "/api/devices",
            json={"id": "a-9", "type": "pump", "groups": ["line-1"], "tags": ["beta"]},
        )
        body = (await http.get(f"/api/firmware/campaigns/{camp['id']}")).json()
        assert "a-9" not in {d["device_id"] for d in body["devices"]}
        # Tags alone (two tags: both needed): one wave, "selected".
        r = await http.post(
            "/api/firmware/campaigns",
            json={"image": image, "tags": ["beta", "north"], "canary_share": 0},
        )
        camp2 = r.json()["campaign"]
        assert camp2["waves"] == ["canary", "selected"] and camp2["counts"] == {"pending": 1}
        # Named devices keep working.
        r = await http.post(
            "/api/firmware/campaigns",
            json={"image": image, "groups": {"x": ["ghost-1"]}, "canary_share": 0},
        )
        assert r.status_code == 201 and r.json()["campaign"]["selection"] == {}
        # Refusals: nothing matches; bad shapes.
        for bad in (
            {"image": image, "groups": ["line-9"]},
            {"image": image, "tags": "beta"},
            {"image": image},
            {"image": image, "groups": {"x": ["d"]}, "type": "pump"},
            {"image": image, "type": 7},
        ):
            r = await http.post("/api/firmware/campaigns", json=bad)
            assert r.status_code == 400 and r.json()["error"] == "invalid", (bad, r.text)
        for cid in (camp["id"], camp2["id"]):
            await http.post(f"/api/firmware/campaigns/{cid}/abort")


async def test_cli_targets_registry_groups(rig: Rig) -> None:
    async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
        await registry(http)
        image = (await upload(http, "7.1")).json()["image"]["id"]

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeway", "firmware", *args, "--admin", rig.base,
            env={**os.environ, "PYTHONPATH": SRC},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await cli(
        "campaign", image, "--group", "line-1", "--group", "line-2", "--type", "pump",
        "--tag", "beta", "--canary", "0",
    )  # fmt: skip
    assert code == 0, err
    camp = orjson.loads(out)["campaign"]
    assert camp["waves"] == ["canary", "line-1", "line-2"]
    assert camp["counts"] == {"pending": 4}  # a-1, a-2, b-2 (line-1 first), b-1
    code, out, err = await cli("campaign", image, "--group", "line-1", "--group", "x=ghost-1")
    assert code == 1 and "not with registry groups" in err
