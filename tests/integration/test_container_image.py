"""Production packaging checked for real, opt-in (minutes each, not in CI):

- the Docker image built and run without Docker (buildah + podman on a Debian
  base made with debootstrap): bench/container_image.py, with
  ``EDGEWAY_CONTAINER_TEST=1`` (``apt-get install buildah podman debootstrap runc``);
- edgeway installed from aarch64 wheels in a Debian 12 arm64 root and run
  there under qemu-user: bench/arm64_install.py, with ``EDGEWAY_ARM64_TEST=1``
  (``apt-get install debootstrap qemu-user-static binfmt-support``), about
  15 minutes under emulation.

Both need root. CI sets neither variable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import arm64_install  # noqa: E402
import container_image  # noqa: E402


def opt_in(variable: str, missing: list[str]) -> pytest.MarkDecorator:
    """Skip unless ``variable`` is 1, we are root and nothing is ``missing``."""
    if os.environ.get(variable) != "1":
        return pytest.mark.skip(reason=f"takes minutes: set {variable}=1")
    if missing or os.geteuid() != 0:
        return pytest.mark.skip(reason=f"needs root and {', '.join(missing) or 'nothing more'}")
    return pytest.mark.slow


@opt_in("EDGEWAY_CONTAINER_TEST", container_image.missing_tools())
@pytest.mark.timeout(3600)
def test_image_builds_runs_non_root_is_healthy_stores_a_reading_and_stops_cleanly() -> None:
    r = container_image.run()
    assert r["health"] == "healthy", r
    assert r["uid"] == "10001", r
    assert r["publish"] == "PUBACK", r
    assert r["record"]["device_id"] == "pump-1" and r["record"]["metrics"] == {"temp": 21.5}, r
    assert r["exit_code"] == 0, r


@opt_in("EDGEWAY_ARM64_TEST", arm64_install.missing())
@pytest.mark.timeout(5400)
def test_arm64_installs_from_aarch64_wheels_and_stores_a_reading() -> None:
    r = arm64_install.run()
    assert r["machine"] == "aarch64" and r["imports"] == "aarch64", r
    assert r["version"].startswith("edgeway "), r
    assert r["init_check"] == ["/etc/edgeway-init.yaml: ok"], r
    assert r["record"]["device_id"] == "pi-1" and r["record"]["metrics"] == {"temp": 19.5}, r
    assert r["exit_code"] == 0, r
