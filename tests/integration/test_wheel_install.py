"""The wheel builds, installs into a fresh virtual environment with only the
default dependencies, and runs there.

Only what ``pip install edgeway`` (no extras) brings is visible to the fresh
environment: the core requirements and their own requirements, resolved from
the installed metadata and linked into one directory that the new venv sees
through a ``.pth`` file (no download: this machine's CI has no index mirror
for a full resolve). So a module the code imports but the core install lacks
(paho-mqtt for MQTT client mode was one) fails here as it would on a user's
machine. Building needs the build backend pyproject names (setuptools>=77,
fetched by pip's build isolation) and takes about 5 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

import pytest
from edgeway_process import free_port, wait_listening
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
"""pip's environment: without the PYTHONPATH a test run may set (it would make
the checkout's edgeway look installed in the fresh venv already)."""


def _core_closure() -> list[Distribution]:
    """The distributions ``pip install edgeway`` would install, edgeway aside."""
    seen: dict[str, Distribution] = {}
    todo = [Requirement(r) for r in distribution("edgeway").requires or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} (a core requirement) is not installed here")
        seen[key] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return list(seen.values())


def _link_core_site(target: Path) -> None:
    """Symlink each core distribution's top-level entries into ``target``."""
    target.mkdir()
    for dist in _core_closure():
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or (target / top).exists():
                continue
            source = Path(str(dist.locate_file(top)))
            if source.exists():
                (target / top).symlink_to(source)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    wheels = tmp / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("edgeway-*.whl")
    venv = tmp / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=CLEAN_ENV
    )
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        env=CLEAN_ENV,
    ).stdout.strip()
    _link_core_site(tmp / "core-site")
    Path(purelib, "edgeway-core-deps.pth").write_text(f"{tmp / 'core-site'}\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=CLEAN_ENV,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    yield venv


def _run(venv: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(venv)}
    return subprocess.run(
        [str(venv / "bin" / "edgeway"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )


def test_wheel_carries_the_license_unit_and_starter(fresh_venv: Path) -> None:
    (wheel,) = (fresh_venv.parent / "wheels").glob("edgeway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgeway/deploy/edgeway.service" in names
    assert "edgeway/deploy/starter.yaml" in names
    assert "edgeway/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_edgeway_is_the_wheel_not_the_checkout(fresh_venv: Path) -> None:
    r = subprocess.run(
        [fresh_venv / "bin" / "python", "-c", "import edgeway; print(edgeway.__file__)"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert r.stdout.startswith(str(fresh_venv)), r.stdout
    # Only the core install: no test peer, no optional protocol library.
    for module in ("paho", "aiocoap", "nats", "pytest"):
        probe = subprocess.run(
            [fresh_venv / "bin" / "python", "-c", f"import {module}"],
            capture_output=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert probe.returncode != 0, f"{module} is importable in the core install"


def test_version_init_check_and_unit_run_from_the_wheel(fresh_venv: Path, tmp_path: Path) -> None:
    r = _run(fresh_venv, "--version")
    assert r.returncode == 0 and r.stdout.strip() == "edgeway 0.1.0", r.stdout + r.stderr
    assert _run(fresh_venv, "init", cwd=tmp_path).returncode == 0
    r = _run(fresh_venv, "check", "edgeway.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(fresh_venv, "systemd-unit")
    assert f"ExecStart={fresh_venv}/bin/edgeway run" in r.stdout, r.stdout + r.stderr


def test_mqtt_client_mode_needs_no_extra_and_coap_names_its_extra(
    fresh_venv: Path, tmp_path: Path
) -> None:
    config = tmp_path / "client.yaml"
    config.write_text(
        "mqtt_client:\n  - name: plant\n    url: mqtt://127.0.0.1:1883\n"
        "    subscriptions: [{topic: 'plant/{device_id}/data', codec: json}]\n"
    )
    r = _run(fresh_venv, "check", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    config.write_text("coap: {listen: '127.0.0.1:5683'}\n")
    r = _run(fresh_venv, "check", str(config))
    assert r.returncode == 2
    assert "aiocoap is not installed (pip install 'edgeway[protocols]')" in r.stderr


def test_the_core_install_runs_a_gateway(fresh_venv: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            fresh_venv / "bin" / "edgeway",
            "run",
            "--mqtt-listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        assert wait_listening(proc, port, 20), proc.stderr.read() if proc.stderr else ""
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert (tmp_path / "data" / "outbox.db").exists()
