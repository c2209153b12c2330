"""The broker's byte-level telemetry path (``MqttConnection._fast_telemetry``)
does exactly what the packet-by-packet path does.

Each example is one stream of PUBLISHes (telemetry and not, QoS 0-2, retained,
with and without v5 properties, payloads the fast path takes and payloads it
must leave alone, sometimes a malformed packet at the end), cut into reads at
random offsets, fed in-process to two connections: one with the fast path, one
without. Both must store the same readings and write the same bytes to the
client and to a subscriber, with the same broker counters. Small input limits
(:data:`INPUT_LIMITS`) make some payloads break each of them, and make the
fast path both skip the per-metric check (payloads of at most
``unchecked_payload_size`` bytes) and run it (longer ones).
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_harness import MemoryTransport, running_broker

from edgeway.config import InputLimitsSection, ListenerConfig, MqttLimits, MqttSection
from edgeway.devices.auth import Principal
from edgeway.ingest import MemoryIngest
from edgeway.south.mqtt.codec import encode
from edgeway.south.mqtt.connection import MqttConnection
from edgeway.south.mqtt.packets import Connect, Properties, Publish, Subscribe, Subscription

TOPICS = ["devices/d1/telemetry", "devices/d2/telemetry", "plain/x", "devices/d1/other"]
PAYLOADS = [
    b'{"temp": 21.5, "hum": 40, "on": true, "mode": "auto"}',
    b'{"v": -1}',
    b'{"a": null, "b": 2}',
    b'{"a": {"b": 1}}',
    b'{"v": 1, "ts": 1700000000}',
    b'{"v": 1, "msg_id": "m7"}',
    b'{"v": 1, "tags": {"site": "s"}}',
    b'[{"v": 1}, {"v": 2}]',
    b"{}",
    b'"text"',
    b"not json",
    b'{"v": [1, 2]}',
    b'{"k": "' + b"x" * 150 + b'"}',  # a two-byte remaining length
    b'{"k": "' + b"x" * 300 + b'"}',  # over the maximum packet size
    b'{"k": "\\u0000{["}',
    # Each breaks one of INPUT_LIMITS (or the timestamp rules):
    b'{"nnnnnnnnnnnnnnnnnnnnn": 1}',  # name_too_long
    b'{"a": {"bbbbbbbbbbbbbbbbbbbb": 1}}',  # name_too_long, once flattened
    b'{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}',  # too_many_metrics
    b'{"s": "' + b"x" * 201 + b'"}',  # value_too_long
    b'{"a": "' + b"x" * 100 + b'", "b": "' + b"y" * 60 + b'"}',  # too_large
    b'{"v": 1, "ts": 1e300}',  # bad_timestamp
    b'{"v": 1, "ts": 4000000000}',  # timestamp_out_of_range (2096)
    b'{"v": 1, "ts": 1}',  # timestamp_out_of_range (1970)
    b'{"v": 1, "ts": "2999-01-01T00:00:00Z"}',  # timestamp_out_of_range
    b'[{"v": 1}, {"v": 2}, {"v": 3}]',  # too_many_readings
]
INPUT_LIMITS = InputLimitsSection(
    max_readings_per_message=2,
    max_metrics_per_reading=5,
    max_name_length=20,
    max_string_length=200,
    max_flattened_size=150,
)
"""unchecked_payload_size 20: PAYLOADS[1] skips the per-metric check, PAYLOADS[0] runs it."""
PROPS = [
    Properties(),
    Properties(correlation_data=b"c-1"),
    Properties(payload_format_indicator=1),
    Properties(user_properties=[("k", "v")]),
]
_T0 = b"\x00\x14devices/d1/telemetry"
MALFORMED = [
    b"",
    b"\x32\x20" + _T0 + b"\x00\x00" + b'{"v": 1}',  # packet id 0, on a telemetry topic
    b"\x32\x17" + _T0 + b"\x00",  # packet id cut short
    b"\x30\x30" + _T0 + b'{"v": 1}',  # runs past the end of the stream
    b"\x36\x02\x00\x00",  # QoS 3
    b"\x38\x05\x00\x01a{}",  # QoS 0 with DUP
    b"\x32\x03\x00\x09a",  # topic runs past the end
    b"\x32\x07\x00\x01a\x00\x00{}",  # packet id 0
    b"\x30\x05\x00\x03a+b",  # wildcard in a topic name
]


@st.composite
def streams(draw: st.DrawFn) -> tuple[int, bool, bool, bytes, list[int]]:
    level = draw(st.sampled_from([4, 5]))
    watched = draw(st.booleans())
    batchable = draw(st.booleans())
    packets = []
    pid = 0
    for _ in range(draw(st.integers(1, 40))):
        # The usual telemetry PUBLISH (what the fast path takes), and now and
        # then one thing about it changed, so that runs of usual ones end on
        # each kind of packet the fast path must leave alone.
        topic = draw(st.sampled_from(TOPICS[:2]))
        payload = draw(st.sampled_from(PAYLOADS[:2]))
        qos = draw(st.sampled_from([0, 1, 1]))
        retain = False
        props = Properties()
        change = draw(st.integers(0, 9))
        if change == 5:
            topic = draw(st.sampled_from(TOPICS[2:]))
        elif change == 6:
            payload = draw(st.sampled_from(PAYLOADS[2:]))
        elif change == 7:
            qos = 2
        elif change == 8:
            retain = True
        elif change == 9 and level == 5:
            props = draw(st.sampled_from(PROPS[1:]))
        pid_now = None
        if qos:
            pid += 1
            pid_now = pid
        dup = qos > 0 and draw(st.booleans())
        packets.append(encode(Publish(topic, payload, qos, retain, dup, pid_now, props), level))
    data = b"".join(packets) + draw(st.sampled_from(MALFORMED))
    # Reads end mostly where packets do (as under load), sometimes inside one.
    ends = list(itertools.accumulate(len(p) for p in packets))
    cuts = draw(st.lists(st.sampled_from(ends), max_size=8))
    cuts += draw(st.lists(st.integers(0, len(data)), max_size=2))
    cuts.sort()
    return level, watched, batchable, data, cuts


class _Ingest(MemoryIngest):
    """Accepts at once; ``batchable`` False is an ingest that answers each
    device message on its own (a pipeline with routes)."""

    def __init__(self, batchable: bool) -> None:
        super().__init__()
        self.batchable = batchable  # type: ignore[misc]


class _WatcherMayNotReadD2:
    """Everything is allowed except that the watcher may not read
    devices/d2/telemetry: its subscription (devices/#) is granted, and the
    read ACL at delivery drops d2's telemetry, which both paths route."""

    def may_publish(self, principal: Principal, topic: str) -> bool:
        return True

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        return not (principal.client_id == "watcher" and topic_filter == TOPICS[1])


async def _run(level: int, watched: bool, batchable: bool, data: bytes, cuts: list[int]) -> Any:
    ingest = _Ingest(batchable)
    # A small receive maximum, packet size and retained store, so these limits
    # are hit (the fast path takes no retained PUBLISH: refusals are the slow path's).
    config = MqttSection(
        limits=MqttLimits(receive_maximum=8, max_packet_size=256, max_retained_messages=1),
        input_limits=INPUT_LIMITS,
    )
    with tempfile.TemporaryDirectory() as tmp:
        async with running_broker(
            Path(tmp), config=config, ingest=ingest, authoriser=_WatcherMayNotReadD2()
        ) as rb:
            broker = rb.broker
            factory = broker.protocol_factory(
                ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True)
            )
            conns = []
            for cid in ("dev", "watcher"):
                conn = factory()
                t = MemoryTransport()
                conn.connection_made(t)
                conn.data_received(
                    encode(Connect(level, cid, True, 60, properties=Properties()), level)
                )
                conns.append((conn, t))
            await asyncio.sleep(0.01)  # CONNACKs
            (dev, t_dev), (watcher, t_watch) = conns
            if watched:
                watcher.data_received(
                    encode(Subscribe(1, [Subscription("devices/#", 1)], Properties()), level)
                )
            # Every topic once, the slow way (this is what lets the fast path take it).
            warm = b"".join(
                encode(Publish(t, b'{"w": 0}', 0, False, False, None, Properties()), level)
                for t in TOPICS
            )
            dev.data_received(warm)
            await asyncio.sleep(0)
            del t_dev.out[:]
            del t_watch.out[:]
            ingest.readings.clear()
            stats0 = broker.stats().flat()
            bounds = [0, *cuts, len(data)]
            for a, b in itertools.pairwise(bounds):
                if b > a:
                    dev.data_received(data[a:b])
                    await asyncio.sleep(0)
            await asyncio.sleep(0.01)
            stats = broker.stats().flat()
            # ts: the payload's (1700000000) or the time of arrival, which differs by run.
            readings = [
                (r.device_id, r.metrics, r.origin, r.tags, r.ts == 1700000000)
                for r in ingest.readings
            ]
            result = (
                readings,
                bytes(t_dev.out),
                bytes(t_watch.out),
                t_dev.closed or t_dev.eof,  # ended: closed, or shut for writing (lingering)
                {k: v - stats0.get(k, 0) for k, v in stats.items() if isinstance(v, int)},
            )
            for c, _ in conns:
                c.connection_lost(None)
    return result


def _both(
    level: int, watched: bool, data: bytes, cuts: list[int], fast: bool, batchable: bool = True
) -> Any:
    MqttConnection.fast_telemetry = fast
    try:
        return asyncio.run(_run(level, watched, batchable, data, cuts))
    finally:
        MqttConnection.fast_telemetry = True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_fast_path_matches_the_packet_path(
    stream: tuple[int, bool, bool, bytes, list[int]],
) -> None:
    level, watched, batchable, data, cuts = stream
    slow = _both(level, watched, data, cuts, fast=False, batchable=batchable)
    fast = _both(level, watched, data, cuts, fast=True, batchable=batchable)
    assert fast[0] == slow[0]  # readings, in order
    assert fast[1] == slow[1]  # bytes to the client: acknowledgements, DISCONNECT
    assert fast[2] == slow[2]  # what the subscriber got
    assert fast[3] == slow[3]
    assert fast[4] == slow[4]  # broker counters


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v": %d}',  # checked by size alone
        b'{"temp": 21.5, "hum": 40, "on": true, "mode": "auto", "n": %d}',  # per metric
        b'{"v": %d, "ts": 1700000000}',  # and its timestamp
    ],
)
def test_fast_path_is_taken(payload: bytes) -> None:
    """The common case really goes through the fast path (else the test above
    compares the slow path with itself), within the input limits whether or
    not it needs the per-metric check."""
    calls = []
    orig = MqttConnection._on_publish

    def spy(self: MqttConnection, p: Publish) -> None:
        calls.append(p.topic)
        orig(self, p)

    MqttConnection._on_publish = spy  # type: ignore[method-assign]
    try:
        pubs = b"".join(
            encode(Publish(TOPICS[0], payload % i, 1, False, False, i + 1), 4) for i in range(20)
        )
        res = _both(4, False, pubs, [], fast=True)
    finally:
        MqttConnection._on_publish = orig  # type: ignore[method-assign]
    assert [r[1].get("v", r[1].get("n")) for r in res[0]] == list(range(20))
    assert len(res[1]) == 20 * 4  # twenty PUBACKs
    assert calls == TOPICS  # the warm-up only


def test_receive_maximum_within_one_read() -> None:
    """v5: the ninth unacknowledged QoS 1 PUBLISH of a read (receive maximum
    8 here) closes the connection with 0x93 on both paths, after the eight."""
    pubs = b"".join(
        encode(Publish(TOPICS[0], PAYLOADS[0], 1, False, False, i, Properties()), 5)
        for i in range(1, 13)
    )
    fast = _both(5, False, pubs, [], fast=True)
    assert fast == _both(5, False, pubs, [], fast=False)
    assert fast[1].endswith(b"\xe0\x01\x93") and fast[1].count(b"@\x02") == 8
    assert len(fast[0]) == 8 and fast[3]


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_each_payload_after_a_fast_run(level: int, payload: bytes) -> None:
    """Every kind of payload, right after PUBLISHes the fast path takes, in
    one read: the same outcome on both paths (the random streams reach each
    kind there only now and then)."""
    usual = encode(Publish(TOPICS[0], PAYLOADS[0], 1, False, False, 1, Properties()), level)
    odd = encode(Publish(TOPICS[0], payload, 1, False, False, 2, Properties()), level)
    after = encode(Publish(TOPICS[1], PAYLOADS[1], 0, False, False, None, Properties()), level)
    data = usual + odd + after
    assert _both(level, False, data, [], fast=True) == _both(level, False, data, [], fast=False)


def test_read_acl_at_delivery_on_both_paths() -> None:
    """Telemetry the fast path routes is checked against the subscriber's read
    ACL like the packet path's: d1 reaches the watcher, d2 does not."""
    pubs = b"".join(
        encode(Publish(TOPICS[i % 2], b'{"v": %d}' % i, 1, False, False, i + 1), 4)
        for i in range(10)
    )
    fast = _both(4, True, pubs, [], fast=True)
    assert fast == _both(4, True, pubs, [], fast=False)
    assert len(fast[0]) == 10  # all stored
    assert fast[4]["dropped_read_not_authorised"] == 5
    assert fast[2].count(b"devices/d1/telemetry") == 5 and b"devices/d2" not in fast[2]
