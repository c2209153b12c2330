"""Counting payloads that do not decode, per device and reason.

Used by the CoAP, Modbus, OPC-UA, serial and BLE adapters::

    counter = DecodeErrorCounter()
    counter.record(adapter.state, "boiler-1", "invalid_json", "line 1: unexpected '}'")
    counter.counts[("boiler-1", "invalid_json")]  # -> 1

A payload that does not decode never reaches the ingest (guarantee 4 of
DESIGN.md); it is counted here and in ``AdapterState.errors`` so the admin API
and the metrics can show which device sends what kind of garbage.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeway.south.base import AdapterState

log = logging.getLogger(__name__)

MAX_KEYS = 10_000
"""Distinct (device, reason) pairs kept. Device ids can come from payloads
(serial JSON lines, CoAP paths), so a misbehaving peer could otherwise grow
this dictionary without bound; beyond it, new pairs go to ``("*", reason)``."""


LOG_INTERVAL = 10.0
"""Seconds between warnings for one reason: a device sending garbage at 100/s
must not flood the log; the counts stay exact (as the broker does)."""


@dataclass(slots=True)
class DecodeErrorCounter:
    """Decode failures by ``(device_id, reason)``."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    _logged_at: dict[str, float] = field(default_factory=dict)

    def record(self, state: AdapterState, device_id: str, reason: str, detail: str = "") -> None:
        """Count one failure and note it as the adapter's last error."""
        key = (device_id, reason)
        if key not in self.counts and len(self.counts) >= MAX_KEYS:
            key = ("*", reason)
        self.counts[key] += 1
        state.record_error(
            f"{device_id}: {reason}: {detail}" if detail else f"{device_id}: {reason}"
        )
        now = time.monotonic()
        if now - self._logged_at.get(reason, -LOG_INTERVAL) >= LOG_INTERVAL:
            self._logged_at[reason] = now
            log.warning(
                "payload refused from %s: %s%s (%d so far with this reason)",
                device_id,
                reason,
                f": {detail[:200]}" if detail else "",
                sum(n for (_, r), n in self.counts.items() if r == reason),
                extra={"device_id": device_id, "reason": reason},
            )

    def by_reason(self) -> dict[str, int]:
        """Totals per reason over all devices."""
        out: Counter[str] = Counter()
        for (_, reason), n in self.counts.items():
            out[reason] += n
        return dict(out)
