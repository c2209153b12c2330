"""Fixtures of the simulator tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeway.sim.cloud import CloudReceiver
from sim_gateway import cloud_receiver


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[CloudReceiver]:
    """The bundled cloud receiver, storing to tmp_path/cloud.jsonl."""
    async with cloud_receiver(tmp_path) as c:
        yield c
