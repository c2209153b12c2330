"""The lifecycle events (``record_type: device_event``) a file sink wrote:
shared by the tests that check them at the sink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def device_events(out: Path) -> list[dict[str, Any]]:
    """Every device_event record in ``out``'s ``*.jsonl`` files, in order."""
    found = []
    for f in sorted(out.glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            rec = orjson.loads(line)
            if rec.get("tags", {}).get("record_type") == "device_event":
                found.append(rec)
    return found
