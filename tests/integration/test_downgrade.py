"""Downgrade refusal: a data directory written by a newer edgeway is refused.

Every durable store keeps its schema version (the outbox in its ``meta``
table, the others in ``schema_version``, see edgeway.storage.sqlite). Each
test here takes a data directory a real ``edgeway run`` wrote, marks one store
as written by a future release, and starts ``edgeway run`` on it: it must exit
with one clear line naming the file, never a traceback, never touching the
file, and never "migrating" it down. The untouched copy starts normally.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from edgeway_process import StartGateway, edgeway_only

FUTURE = 99
CONFIG = """
admin: {listen: "127.0.0.1:0", auth: tokens}
commands: {enabled: true}
"""

STORES = {
    # file: how its version is stored (table, column, where)
    "outbox.db": "UPDATE meta SET value = ? WHERE key = 'schema_version'",
    "commands.db": "UPDATE schema_version SET version = ?",
    "pipeline.db": "UPDATE schema_version SET version = ?",
    "broker.db": "UPDATE schema_version SET version = ?",
    "tokens.db": "UPDATE schema_version SET version = ?",
    "models/models.db": "UPDATE schema_version SET version = ?",
    "twins.db": "UPDATE schema_version SET version = ?",
    "users.db": "UPDATE schema_version SET version = ?",
    "firmware/firmware.db": "UPDATE schema_version SET version = ?",
    "alarms.db": "UPDATE schema_version SET version = ?",
    "audit.db": "UPDATE schema_version SET version = ?",
    "credentials.db": "UPDATE schema_version SET version = ?",
    "devices.db": "UPDATE schema_version SET version = ?",
    "provisioning.db": "UPDATE schema_version SET version = ?",
}
"""Every store a gateway writes: a new store fails the fixture's check until
it is listed here (and so tested for the refusal)."""


@pytest.fixture(scope="module")
def written_by_this_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with every store, as this release leaves it."""
    from edgeway_process import GatewayLauncher

    data = tmp_path_factory.mktemp("release") / "data"
    create = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeway",
            "tokens",
            "create",
            "--name",
            "ops",
            "--role",
            "admin",
            "--data-dir",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert create.returncode == 0, create.stdout + create.stderr
    launcher = GatewayLauncher(tmp_path_factory)
    try:
        gw = launcher.start(CONFIG, data_dir=data)
        assert gw.terminate() == 0, gw.output()
    finally:
        launcher.stop_all()
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*.db")) == sorted(STORES)
    return data


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        if path.name == "outbox.db":
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        else:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])
    finally:
        conn.close()


@pytest.mark.parametrize("store", sorted(STORES))
def test_a_store_from_a_newer_release_is_refused(
    store: str, written_by_this_release: Path, start_gateway: StartGateway, tmp_path: Path
) -> None:
    edgeway_only()
    data = tmp_path / "data"
    shutil.copytree(written_by_this_release, data)
    current = _version(data / store)
    assert 1 <= current < FUTURE
    conn = sqlite3.connect(data / store)
    with conn:
        assert conn.execute(STORES[store], (str(FUTURE),)).rowcount == 1
    conn.close()
    gw = start_gateway(CONFIG, data_dir=data, wait=False)
    code = gw.wait_exit(30)
    out = gw.output()
    assert code == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    assert str(data / store) in errors[0] and f"{FUTURE}" in errors[0] and "newer" in errors[0]
    assert _version(data / store) == FUTURE  # left as it was: no "migration" down


def test_the_same_directory_unchanged_starts(
    written_by_this_release: Path, start_gateway: StartGateway, tmp_path: Path
) -> None:
    # The control: only the version mark makes the difference above.
    edgeway_only()
    data = tmp_path / "data"
    shutil.copytree(written_by_this_release, data)
    gw = start_gateway(CONFIG, data_dir=data)
    assert gw.terminate() == 0, gw.output()[-3000:]
