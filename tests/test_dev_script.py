"""``./dev`` tells a newcomer what it is doing, and hides pip's noise unless it fails.

A stand-in interpreter (a shell script given as ``PYTHON``) plays ``python -m
venv`` and ``pip``: it prints what pip prints and can fail on request, so the
script's own behaviour is tested without a network or a minute of installing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/sh
# -c: the version checks; -m venv DIR: make DIR/bin/python (this script) and
# DIR/bin/edgeway; -m pip: pip's chatter, failing when FAKE_PIP_FAIL is set.
case "$1" in
    -c) exit 0 ;;
esac
if [ "$1" = -m ] && [ "$2" = venv ]; then
    mkdir -p "$3/bin"
    cp "$0" "$3/bin/python"
    cp "$FAKE_EDGEWAY" "$3/bin/edgeway"
    exit 0
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
    echo "Collecting pydantic>=2.6"
    echo "  Downloading pydantic-2.9.0-py3-none-any.whl (434 kB)" >&2
    if [ -n "${FAKE_PIP_FAIL:-}" ]; then
        echo "ERROR: No matching distribution found for gmqtt" >&2
        exit 1
    fi
    exit 0
fi
exit 3
"""


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    python = tmp_path / "fakepython"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    edgeway = tmp_path / "fake-edgeway"
    edgeway.write_text('#!/bin/sh\necho "edgeway $*"\n')
    edgeway.chmod(0o755)
    return {
        **os.environ,
        "PYTHON": str(python),
        "EDGEWAY_VENV": str(tmp_path / "venv"),
        "FAKE_EDGEWAY": str(edgeway),
        "TMPDIR": str(tmp_path),
    }


def run_dev(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ROOT / "dev"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_first_run_says_what_it_does_and_hides_pip_output(fake_env: dict[str, str]) -> None:
    done = run_dev(fake_env, "edgeway", "version")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("dev: creating ")
    assert any(
        line.startswith("dev: installing edgeway[sinks,protocols] (about a minute")
        for line in lines
    )
    assert lines[-1].startswith("dev: installed in ")
    assert all(line.startswith("dev: ") for line in lines), lines
    assert done.stdout == "edgeway version\n"
    # The second run has nothing to install and says nothing.
    again = run_dev(fake_env, "edgeway", "version")
    assert again.returncode == 0 and again.stderr == ""
    assert not list(Path(fake_env["TMPDIR"]).glob("edgeway-dev.*"))


def test_a_failing_install_shows_pip_output_and_installs_again_next_time(
    fake_env: dict[str, str],
) -> None:
    failed = run_dev({**fake_env, "FAKE_PIP_FAIL": "1"}, "edgeway", "version")
    assert failed.returncode != 0
    assert "ERROR: No matching distribution found for gmqtt" in failed.stderr
    assert "Collecting pydantic" in failed.stderr
    assert "dev: failed (exit 1): " in failed.stderr
    assert "edgeway version" not in failed.stdout
    assert not list(Path(fake_env["EDGEWAY_VENV"]).glob(".edgeway-installed-*"))
    retried = run_dev(fake_env, "edgeway", "version")
    assert retried.returncode == 0
    assert "dev: installing edgeway[sinks,protocols]" in retried.stderr
