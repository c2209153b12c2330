"""The Dockerfile and the image's configuration (no Docker daemon here: the
image itself is not built; what it runs is checked against a real gateway)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgeway_process import StartGateway, edgeway_only, free_port

from edgeway.config import ConfigError, parse_config_lines
from edgeway.devices.config_auth import hash_password
from edgeway.validate import check_config

ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    return steps[last_from:]


def test_image_runs_as_a_non_root_user_with_a_data_volume() -> None:
    stage = dict(_final_stage())
    user = stage["USER"].split(":")[0]
    assert user not in ("0", "root"), user
    assert json.loads(stage["VOLUME"]) == ["/var/lib/edgeway"]
    cmd = json.loads(stage["CMD"])
    assert cmd[cmd.index("--data-dir") + 1] == "/var/lib/edgeway"
    assert json.loads(stage["ENTRYPOINT"]) == ["edgeway"]
    assert "/readyz" in stage["HEALTHCHECK"]


def _image_config() -> str:
    return (ROOT / "docker" / "edgeway.yaml").read_text(encoding="utf-8")


def test_image_configuration_needs_the_password_hash_and_is_never_anonymous() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_lines(_image_config(), "edgeway.yaml", {})
    (issue,) = e.value.issues
    assert issue.key == "mqtt.users[0].password_hash"
    assert "EDGEWAY_MQTT_PASSWORD_HASH is not set" in issue.message
    env = {"EDGEWAY_MQTT_PASSWORD_HASH": hash_password("pw")}
    cfg, lines = parse_config_lines(_image_config(), "edgeway.yaml", env)
    assert check_config(cfg, lines) == []
    assert [(listener.bind, listener.allow_anonymous) for listener in cfg.mqtt.listeners] == [
        ("0.0.0.0:1883", False)
    ]
    expose = dict(_final_stage())["EXPOSE"].split()
    assert expose == ["1883"]


def _healthcheck_argv(admin_port: int) -> list[str]:
    spec = dict(_final_stage())["HEALTHCHECK"]
    argv = json.loads(re.sub(r"^.*?CMD\s+", "", spec))
    assert argv[0] == "python"
    return [sys.executable, *[a.replace("9180", str(admin_port)) for a in argv[1:]]]


def test_healthcheck_passes_on_a_ready_gateway_and_fails_on_a_stopped_one(
    start_gateway: StartGateway,
) -> None:
    edgeway_only()
    admin = free_port()
    config = _image_config().replace("127.0.0.1:9180", f"127.0.0.1:{admin}")
    config = config.replace('"0.0.0.0:1883"', '"127.0.0.1:{port}"')
    config = config.replace("/var/lib/edgeway", "./data")
    gw = start_gateway(
        config,
        data_dir=False,
        env={"EDGEWAY_MQTT_PASSWORD_HASH": hash_password("pw"), "EDGEWAY_GATEWAY_ID": "gw-d"},
    )
    check = _healthcheck_argv(admin)
    # As Docker's --start-period: the MQTT port opens a moment before ready.
    deadline = time.monotonic() + 20
    while True:
        ok = subprocess.run(check, capture_output=True, text=True, timeout=30)
        if ok.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ok.returncode == 0, ok.stderr
    assert gw.terminate() == 0
    down = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0
