"""edgeway installed from aarch64 wheels in a Debian 12 arm64 root and run
there under qemu-user: bench/arm64_install.py does the work.

Opt-in: about 15 minutes under emulation (debootstrap included), so it runs
only with ``EDGEWAY_ARM64_TEST=1``, as root, with debootstrap and an enabled
qemu-aarch64 binfmt (``apt-get install debootstrap qemu-user-static
binfmt-support``); CI does not set it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import arm64_install  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("EDGEWAY_ARM64_TEST") != "1",
        reason="an arm64 install under emulation (15 min): set EDGEWAY_ARM64_TEST=1",
    ),
    pytest.mark.skipif(
        bool(arm64_install.missing()) or os.geteuid() != 0,
        reason="needs root, debootstrap and qemu-aarch64 binfmt",
    ),
]


@pytest.mark.timeout(5400)
def test_installs_from_aarch64_wheels_and_stores_a_reading() -> None:
    r = arm64_install.run()
    assert r["machine"] == "aarch64" and r["imports"] == "aarch64", r
    assert r["version"].startswith("edgeway "), r
    assert r["init_check"] == ["/etc/edgeway-init.yaml: ok"], r
    assert r["record"]["device_id"] == "pi-1" and r["record"]["metrics"] == {"temp": 19.5}, r
    assert r["exit_code"] == 0, r
