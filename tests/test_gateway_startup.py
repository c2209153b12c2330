"""Start-up messages an operator needs: a listener nobody can use is named."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from edgeway.config import parse_config
from edgeway.gateway import Gateway

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$3V6l0mL6kJ0cqj2yQ5Z6zw"


async def _start_and_stop(text: str) -> None:
    gw = Gateway(parse_config(text, "gw.yaml"))
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 10)
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        ("", True),  # credentials required, no users: nobody can connect
        (f'  users: [{{username: u, password_hash: "{HASH}"}}]\n', False),
    ],
    ids=["no-users", "users"],
)
async def test_listener_nobody_can_use_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: str, warned: bool
) -> None:
    text = (
        f'gateway: {{id: gw, data_dir: "{tmp_path}"}}\n'
        "mqtt:\n"
        '  listeners: [{bind: "127.0.0.1:0"}]\n' + extra
    )
    with caplog.at_level(logging.WARNING, logger="edgeway.gateway"):
        await _start_and_stop(text)
    hits = [r for r in caplog.records if "no client can connect" in r.getMessage()]
    assert bool(hits) is warned, [r.getMessage() for r in caplog.records]


async def test_anonymous_loopback_listener_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = (
        f'gateway: {{id: gw, data_dir: "{tmp_path}"}}\n'
        'mqtt:\n  listeners: [{bind: "127.0.0.1:0", allow_anonymous: true}]\n'
    )
    with caplog.at_level(logging.WARNING, logger="edgeway.gateway"):
        await _start_and_stop(text)
    assert not [r for r in caplog.records if "no client can connect" in r.getMessage()]


async def test_a_configuration_the_pipeline_refuses_is_a_startup_error(tmp_path: Path) -> None:
    """Built without the CLI's checks (tests, embedding): still one line."""
    from edgeway.gateway import StartupError

    text = (
        f'gateway: {{id: gw, data_dir: "{tmp_path}"}}\n'
        'mqtt:\n  listeners: [{bind: "127.0.0.1:0", allow_anonymous: true}]\n'
        "routes:\n  - {name: r, sinks: [nosuch]}\n"
    )
    gw = Gateway(parse_config(text, "gw.yaml"))
    with pytest.raises(StartupError, match="unknown sinks"):
        await asyncio.wait_for(gw.run(), 10)
