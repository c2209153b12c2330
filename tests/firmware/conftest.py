"""The ``rig`` fixture of the firmware tests: a gateway in this process
(tests/firmware_rig.py), started before the test and stopped after it. A
test module may set ``RIG_EXTRA`` (YAML appended to the configuration)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_rig import Rig


@pytest.fixture
async def rig(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    r = Rig(tmp_path, extra=getattr(request.module, "RIG_EXTRA", ""))
    await r.start()
    try:
        yield r
    finally:
        await r.stop()
