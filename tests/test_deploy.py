"""``edgeway init`` (starter configuration) and ``edgeway systemd-unit``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeway.cli import main
from edgeway.config import parse_config_lines
from edgeway.deploy.init import starter_config
from edgeway.systemd import unit_text
from edgeway.validate import validate


def test_init_writes_a_configuration_that_validates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGEWAY_GATEWAY_ID", raising=False)
    assert main(["init"]) == 0
    path = tmp_path / "edgeway.yaml"
    assert path.stat().st_mode & 0o777 == 0o640
    assert validate(path) == []
    cfg = parse_config_lines(path.read_text(encoding="utf-8"), str(path))[0]
    assert cfg.sinks[0].url == f"file://{tmp_path}/edgeway-data/export"
    assert cfg.admin is not None
    monkeypatch.setenv("EDGEWAY_GATEWAY_ID", "gw-from-env")
    assert parse_config_lines(path.read_text(encoding="utf-8"))[0].gateway.id == "gw-from-env"


def test_init_never_overwrites_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("gateway: {id: precious}\n", encoding="utf-8")
    assert main(["init", str(path)]) != 0
    assert path.read_text(encoding="utf-8") == "gateway: {id: precious}\n"
    assert "exists" in capsys.readouterr().err
    assert main(["init", str(path), "--force", "--data-dir", "/var/lib/edgeway"]) == 0
    assert "data_dir: /var/lib/edgeway" in path.read_text(encoding="utf-8")


def _uncommented(text: str) -> str:
    """The starter with its commented-out settings turned on: lines of the
    form ``# key: ...`` or ``# - ...`` (indentation kept)."""
    return re.sub(r"(?m)^(\s*)# (\s*(?:- |[a-z_]+:))", r"\1\2", text)


def test_every_commented_out_setting_is_valid_too() -> None:
    # An example that is wrong when uncommented teaches the wrong key.
    text = _uncommented(starter_config("/var/lib/edgeway", "gw1"))
    assert "# - name: cloud" not in text and "bearer_token: ${CLOUD_TOKEN}" in text
    cfg = parse_config_lines(text, "starter", {"CLOUD_TOKEN": "t", "MQTT_PASSWORD": "p"})[0]
    assert [s.name for s in cfg.sinks] == ["local", "cloud", "cloud-mqtt"]
    assert cfg.outbox.max_bytes == 2 * 1024**3
    assert len(cfg.mqtt.listeners) == 2 and cfg.mqtt.users and cfg.mqtt.acl


def test_init_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "-"]) == 0
    assert capsys.readouterr().out.startswith("# edgeway configuration, written by `edgeway init`.")


HARDENING = [
    "Type=notify",
    "NotifyAccess=main",
    "User=edgeway",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "CapabilityBoundingSet=",
    "StateDirectory=edgeway",
    "Restart=on-failure",
    "RestartPreventExitStatus=2",
    "WatchdogSec=30s",
    "SystemCallFilter=@system-service",
]


def test_unit_has_the_hardening_and_this_installation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["systemd-unit", "--executable", "/opt/edgeway/bin/edgeway"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for setting in HARDENING:
        assert setting in lines, setting
    assert (
        "ExecStart=/opt/edgeway/bin/edgeway run --config /etc/edgeway/edgeway.yaml "
        "--data-dir /var/lib/edgeway" in lines
    )
    assert "@EDGEWAY@" not in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # systemd's own parser: an unknown key or one in the wrong section is a
    # warning it prints; the unit must produce none.
    unit = tmp_path / "edgeway.service"
    unit.write_text(unit_text(), encoding="utf-8")
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", (
        r.stdout + r.stderr
    )
