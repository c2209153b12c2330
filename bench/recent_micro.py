"""Micro-benchmark: CPU per reading of ``RecentValues.record`` (the HMI's tap on
every submit) for the end-to-end benchmark's payload, in reads of 15 readings of
one device, 100 devices. Not a test. Usage::

    .venv/bin/python bench/recent_micro.py
"""

from __future__ import annotations

import time

import orjson

from edgeway.admin.recent import RecentValues
from edgeway.reading import Origin, Reading

PAYLOAD = b'{"temp": 21.5, "hum": 40.2, "on": true, "battery": 3.71, "rssi": -67}'


def main() -> None:
    origin = Origin("mqtt")
    t = time.time()
    batches = [
        [
            Reading(f"bench-{b % 100}", t + i * 1e-4, orjson.loads(PAYLOAD), origin)
            for i in range(15)
        ]
        for b in range(2000)
    ]
    store = RecentValues()
    for batch in batches[:200]:
        store.record(batch)
    best = 1e9
    for _ in range(5):
        t0 = time.process_time()
        for batch in batches:
            store.record(batch)
        best = min(best, time.process_time() - t0)
    print(f"RecentValues.record: {best / (len(batches) * 15) * 1e6:.2f} us CPU per reading")


if __name__ == "__main__":
    main()
