"""The Docker image, built and run without Docker (buildah + podman on a Debian
base made with debootstrap): bench/container_image.py does the work.

Opt-in: it takes minutes and builds a 600 MB image, so it runs only with
``EDGEWAY_CONTAINER_TEST=1`` and the tools installed
(``apt-get install buildah podman debootstrap runc``); CI does not set it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import container_image  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("EDGEWAY_CONTAINER_TEST") != "1",
        reason="builds the image (minutes): set EDGEWAY_CONTAINER_TEST=1",
    ),
    pytest.mark.skipif(
        bool(container_image.missing_tools()) or os.geteuid() != 0,
        reason="needs root and buildah, podman, debootstrap, runc",
    ),
]


@pytest.mark.timeout(3600)
def test_image_builds_runs_non_root_is_healthy_stores_a_reading_and_stops_cleanly() -> None:
    r = container_image.run()
    assert r["health"] == "healthy", r
    assert r["uid"] == "10001", r
    assert r["publish"] == "PUBACK", r
    assert r["record"]["device_id"] == "pump-1" and r["record"]["metrics"] == {"temp": 21.5}, r
    assert r["exit_code"] == 0, r
