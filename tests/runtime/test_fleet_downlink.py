"""The gateway as a device on the command downlink: config.apply and
config.status handled in-process by a real Gateway (its command queue, its
reload), one refusal per rule of docs/fleet.md."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgeway.commands.model import Command, CommandState
from edgeway.config import parse_config
from edgeway.gateway import Gateway
from edgeway.runtime.fleet import signed_message
from edgeway.signing import generate, sign

GW = "gw-f"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp: Path, public: str, extra: str = "", fleet: str | None = None) -> str:
    fleet = fleet if fleet is not None else f'fleet: {{keys: {{ops: "{public}"}}}}\n'
    return f"""
gateway: {{id: {GW}, data_dir: "{tmp / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]
sinks:
  - {{name: a, url: "file://{tmp / "a"}"}}
{fleet}{extra}"""


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Path, str]]:
    key = tmp_path / "fleet.pem"
    public = generate(key)
    text = config(tmp_path, public)
    gw = Gateway(parse_config(text, "t.yaml"), config_text=text, reload_grace=0.2)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    yield gw, key, public
    gw.request_stop()
    await asyncio.wait_for(task, 10)


async def push(gw: Gateway, name: str, params: dict[str, Any]) -> Command:
    assert gw.commands is not None
    cmd, _ = await gw.commands.submit(GW, name, params)
    done = await gw.commands.wait(cmd.id, 15)
    assert done.state in (CommandState.SUCCEEDED, CommandState.FAILED), done
    return done


def signed(text: str, version: int, key: Path) -> dict[str, Any]:
    return {
        "version": version,
        "config": text,
        "signature": sign(key, signed_message(version, text)),
    }


async def test_apply_status_idempotent_and_stale(
    running: tuple[Gateway, Path, str], tmp_path: Path
) -> None:
    gw, key, public = running
    text = config(tmp_path, public, "outbox: {max_age: 2d}\n")
    cmd = await push(gw, "config.apply", signed(text, 5, key))
    assert cmd.state is CommandState.SUCCEEDED, cmd
    assert cmd.result["version"] == 5 and cmd.result["signed_by"] == "ops"
    assert gw.config.outbox.max_age == 2 * 86400
    assert gw.config_source == "fleet:v5"
    # The same version and text again (a redelivery): success, nothing applied.
    again = await push(gw, "config.apply", signed(text, 5, key))
    assert again.state is CommandState.SUCCEEDED and again.result["already_applied"] is True
    # The same version with another text, or an older one: stale.
    other = config(tmp_path, public, "outbox: {max_age: 3d}\n")
    for version in (5, 4):
        r = await push(gw, "config.apply", signed(other, version, key))
        assert r.state is CommandState.FAILED and r.result["error"] == "stale", r
    status = await push(gw, "config.status", {})
    assert status.result["version"] == 5
    assert status.result["sha256"] == status.result["in_force_sha256"]
    state = orjson.loads((tmp_path / "data" / "fleet.json").read_bytes())
    assert state["version"] == 5


async def test_refusals(running: tuple[Gateway, Path, str], tmp_path: Path) -> None:
    gw, key, public = running
    before = gw.config_text
    # Signed for another version: the version is part of what is signed.
    text = config(tmp_path, public, "outbox: {max_age: 2d}\n")
    params = signed(text, 2, key)
    params["version"] = 3
    r = await push(gw, "config.apply", params)
    assert r.result["error"] == "bad_signature", r
    # Signed by a key the gateway does not trust.
    stranger = tmp_path / "stranger.pem"
    generate(stranger)
    r = await push(gw, "config.apply", signed(text, 2, stranger))
    assert r.result["error"] == "bad_signature", r
    # Does not validate: the issues say where.
    bad = config(tmp_path, public, "outbox: {max_agee: 2d}\n")
    r = await push(gw, "config.apply", signed(bad, 2, key))
    assert r.result["error"] == "invalid" and "max_agee" in " ".join(r.result["issues"]), r
    # Would lock the fleet out: no key kept, or fleet turned off.
    other = tmp_path / "other.pem"
    other_public = generate(other)
    lockout = config(tmp_path, public, fleet=f'fleet: {{keys: {{new: "{other_public}"}}}}\n')
    r = await push(gw, "config.apply", signed(lockout, 2, key))
    assert r.result["error"] == "locked_out", r
    off = config(tmp_path, public, fleet=f'fleet: {{enabled: false, keys: {{ops: "{public}"}}}}\n')
    r = await push(gw, "config.apply", signed(off, 2, key))
    assert r.result["error"] == "locked_out", r
    # Unknown parameters and a missing signature.
    r = await push(gw, "config.apply", {"version": 2, "config": text, "extra": 1})
    assert r.result["error"] == "invalid", r
    r = await push(gw, "config.apply", {"version": 2, "config": text})
    assert r.result["error"] == "bad_signature", r
    assert gw.config_text == before  # nothing of it was applied
    # Key rotation works when the new configuration keeps a current key.
    rotate = config(
        tmp_path, public, fleet=f'fleet: {{keys: {{ops: "{public}", new: "{other_public}"}}}}\n'
    )
    r = await push(gw, "config.apply", signed(rotate, 2, key))
    assert r.state is CommandState.SUCCEEDED, r
    final = config(tmp_path, public, fleet=f'fleet: {{keys: {{new: "{other_public}"}}}}\n')
    r = await push(gw, "config.apply", signed(final, 3, other))
    assert r.state is CommandState.SUCCEEDED and r.result["signed_by"] == "new", r
