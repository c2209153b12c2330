"""What is running: edgeway's version, the Python under it, and the process's
CPU time and memory (``/api/status`` ``build`` and ``process``; ``/metrics``
``edgeway_build_info`` and the standard ``process_*`` metrics)."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass

from edgeway import __version__


@dataclass(slots=True, frozen=True)
class BuildInfo:
    """The version of edgeway and of the Python that runs it."""

    version: str
    python: str
    implementation: str
    platform: str


def build_info() -> BuildInfo:
    return BuildInfo(
        version=__version__,
        python=platform.python_version(),
        implementation=sys.implementation.name,
        platform=sys.platform,
    )


@dataclass(slots=True, frozen=True)
class ProcessFigures:
    """CPU time used so far and memory held now by this process."""

    cpu_seconds: float
    resident_memory_bytes: int | None
    """None where ``/proc`` does not exist (not Linux)."""


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def process_figures() -> ProcessFigures:
    return ProcessFigures(cpu_seconds=time.process_time(), resident_memory_bytes=_resident_bytes())
