"""Micro-benchmark of the MQTT codec's hot paths (the broker's QoS 1 ingest).

Run: .venv/bin/python bench/codec_bench.py [--count 10000] [--repeat 20]
         [--out bench/results/codec_bench.json]

Prints, for ``--count`` QoS 1 PUBLISH packets with a ~100-byte JSON payload (the telemetry
shape in MEASUREMENTS.md), how many PUBLISH packets per second ``MqttReader.feed`` decodes,
fed as one chunk (every packet alive at once: the worst case for the garbage collector) and
as 64 KiB chunks (what a socket read delivers), with and without
``share_empty_properties``; and how many ``encode_puback`` / ``encode(Publish)`` calls run per
second. Figures are per second of process CPU time, best of ``--repeat`` runs: the
least-disturbed run is the steadiest figure on a shared machine. The garbage collector stays
on, as in production.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from edgeway.south.mqtt.codec import MqttReader, encode, encode_puback
from edgeway.south.mqtt.packets import MQTT_5, MQTT_311, Publish

PAYLOAD = (
    b'{"device":"sensor-0042","ts":1732262400123,"temperature":21.37,'
    b'"humidity":48.2,"battery":3.71,"ok":true}'
)


def _best(fn: object, repeat: int) -> float:
    """Least CPU time of ``repeat`` runs (process CPU, not wall: steadier on a busy machine)."""
    assert callable(fn)
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def bench_decode(level: int, count: int, repeat: int, chunk_size: int, share: bool) -> float:
    """PUBLISH decodes per second, feeding ``chunk_size`` bytes at a time (0: one chunk)."""
    wire = b"".join(
        encode(
            Publish(f"site/1/dev/{i % 100}/telemetry", PAYLOAD, 1, False, False, i % 65535 + 1),
            level,
        )
        for i in range(count)
    )
    size = chunk_size or len(wire)
    chunks = [wire[i : i + size] for i in range(0, len(wire), size)]

    def run() -> None:
        # Server side learns the level from CONNECT; set it directly here.
        reader = MqttReader(protocol_level=level, share_empty_properties=share)
        decoded = 0
        for chunk in chunks:
            decoded += len(reader.feed(chunk))  # packets of a chunk are dropped, as a broker does
        assert decoded == count

    return count / _best(run, repeat)


def bench_puback(level: int, count: int, repeat: int) -> float:
    def run() -> None:
        for i in range(1, count + 1):
            encode_puback(i, level)

    return count / _best(run, repeat)


def bench_encode_publish(level: int, count: int, repeat: int) -> float:
    packets = [
        Publish(f"site/1/dev/{i % 100}/telemetry", PAYLOAD, 1, False, False, i % 65535 + 1)
        for i in range(count)
    ]

    def run() -> None:
        for p in packets:
            encode(p, level)

    return count / _best(run, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    print(f"payload {len(PAYLOAD)} bytes, {args.count} packets, best of {args.repeat} runs")
    results: dict[str, float] = {}
    for level, name in ((MQTT_311, "3.1.1"), (MQTT_5, "5.0")):
        for chunk_size, label in ((0, "one chunk"), (65536, "64 KiB chunks")):
            for share in (False, True):
                rate = bench_decode(level, args.count, args.repeat, chunk_size, share)
                extra = ", share_empty_properties" if share else ""
                key = f"MQTT {name}: decode PUBLISH qos1 ({label}{extra}) msg/s"
                results[key] = rate
        results[f"MQTT {name}: encode_puback /s"] = bench_puback(level, args.count, args.repeat)
        results[f"MQTT {name}: encode(Publish qos1) /s"] = bench_encode_publish(
            level, args.count, args.repeat
        )
    for key, rate in results.items():
        print(f"{key:<75} {rate:>12,.0f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "python": sys.version.split()[0],
                    # Other work on the machine skews figures; record how busy it was.
                    "load_average_1min": round(os.getloadavg()[0], 2),
                    "count": args.count,
                    "repeat": args.repeat,
                    "results": {k: round(v) for k, v in results.items()},
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
