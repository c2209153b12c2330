"""Telemetry enters the gateway: readings to ingest, acknowledgement only once safe."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from mqtt_harness import HandIngest, RawClient, running_broker, wait_until

from edgeway.ingest import IngestStatus, MemoryIngest
from edgeway.south.mqtt.codec import encode
from edgeway.south.mqtt.connection import MAX_BATCH
from edgeway.south.mqtt.packets import (
    Disconnect,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
)

TOPIC = "devices/dev1/telemetry"


async def test_telemetry_into_memory_ingest(tmp_path: Path) -> None:
    ingest = MemoryIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1")
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("devices/+/telemetry")
        ack = await c.publish(
            TOPIC,
            b'{"temp": 21.5, "ts": 1732550400, "msg_id": "m1"}',
            qos=1,
            properties=Properties(correlation_data=b"corr-9"),
        )
        assert ack.reason_code == 0
        await c.publish(TOPIC, b'[{"a": 1}, {"a": 2}]', qos=0)
        await c.publish("other/topic", b'{"x": 1}', qos=1)
        assert (await watcher.receive_publish()).payload.startswith(b'{"temp"')
        await wait_until(lambda: len(ingest.readings) == 3)
        r = ingest.readings[0]
        assert (r.device_id, r.ts, r.metrics) == ("dev1", 1732550400.0, {"temp": 21.5})
        assert r.origin.message_id == "corr-9"  # v5 correlation data wins over msg_id
        assert r.origin.client_id == "dev1" and r.origin.address == TOPIC
        assert [x.metrics["a"] for x in ingest.readings[1:]] == [1, 2]
        assert rb.broker.stats().readings_in == 3


@pytest.mark.parametrize("level", [4, 5])
async def test_puback_only_after_ingest_resolves_and_in_order(tmp_path: Path, level: int) -> None:
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("#", qos=1)
        c, _ = await RawClient.connect(rb.port, "dev1", level=level)
        c.send(Publish(TOPIC, b'{"v": 1}', 1, False, False, 1))
        c.send(Publish("plain/topic", b"p", 1, False, False, 2))  # behind the telemetry one
        c.send(Publish(TOPIC, b'{"v": 2}', 2, False, False, 3))
        await wait_until(lambda: len(ingest.submitted) == 2)
        await c.nothing(0.2)  # nothing acknowledged yet
        await watcher.nothing(0.05)  # nor routed
        ingest.resolve(1)  # the later one first: still nothing (order of MQTT 4.6)
        await c.nothing(0.2)
        ingest.resolve(0)
        a1 = await c.expect(PubAck)
        a2 = await c.expect(PubAck)
        r3 = await c.expect(PubRec)
        assert (a1.packet_id, a2.packet_id, r3.packet_id) == (1, 2, 3)
        c.send(PubRel(3))
        assert (await c.expect(PubComp)).packet_id == 3
        got = [(await watcher.receive_publish()).payload for _ in range(3)]
        assert got == [b'{"v": 1}', b"p", b'{"v": 2}']


async def test_bad_payload_0x99_counted_and_still_routed(tmp_path: Path) -> None:
    ingest = MemoryIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe(TOPIC)
        c, _ = await RawClient.connect(rb.port, "dev1")
        ack = await c.publish(TOPIC, b"not json", qos=1)
        assert ack.reason_code == 0x99
        assert (await watcher.receive_publish()).payload == b"not json"
        c4, _ = await RawClient.connect(rb.port, "dev1b", level=4)
        ack = await c4.publish(TOPIC, b"[1,2]", qos=1)
        assert ack.reason_code == 0
        assert (await watcher.receive_publish()).payload == b"[1,2]"
        s = rb.broker.stats().flat()
        assert s["decode_errors"] == 2
        assert s["decode_errors_invalid_json"] == 1 and s["decode_errors_not_an_object"] == 1
        assert ingest.readings == []


async def test_rejected_full_v5_quota_exceeded_not_routed(tmp_path: Path) -> None:
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe(TOPIC)
        c, _ = await RawClient.connect(rb.port, "dev1")
        c.send(Publish(TOPIC, b'{"v": 1}', 1, False, False, 1))
        c.send(Publish(TOPIC, b'{"v": 2}', 2, False, False, 2))
        await wait_until(lambda: len(ingest.submitted) == 2)
        ingest.resolve(0, IngestStatus.REJECTED_FULL)
        ingest.resolve(1, IngestStatus.REJECTED_FULL)
        assert (await c.expect(PubAck)).reason_code == 0x97
        assert (await c.expect(PubRec)).reason_code == 0x97
        await watcher.nothing(0.2)
        assert rb.broker.stats().dropped_by_reason["ingest_full"] == 2


async def test_rejected_full_v311_is_held_resubmitted_and_pauses_reading(tmp_path: Path) -> None:
    """3.1.1 has no refusal code: a PUBLISH the full outbox refused is held,
    the socket is not read, and the PUBLISH is submitted again (then
    acknowledged, in order) once the outbox has room."""
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1", level=4)
        # One read each (the PUBLISHes of one read are submitted together).
        c.send(Publish(TOPIC, b'{"v": 1}', 1, False, False, 1))
        await wait_until(lambda: len(ingest.submitted) == 1)
        c.send(Publish(TOPIC, b'{"v": 2}', 1, False, False, 2))
        await wait_until(lambda: len(ingest.submitted) == 2)
        ingest.saturated = True
        ingest.resolve(0, IngestStatus.REJECTED_FULL)
        ingest.resolve(1)  # accepted, but must not be acknowledged before 1
        c.send(Publish(TOPIC, b'{"v": 3}', 1, False, False, 3))
        await asyncio.sleep(0.3)
        assert len(ingest.submitted) == 2  # held, and the socket is not read
        assert c.inbox == []  # no PUBACK for 2 ahead of 1
        ingest.saturated = False
        # 1 is submitted again, then the socket is read again (3 arrives).
        await wait_until(lambda: len(ingest.submitted) == 4)
        assert ingest.submitted[2][0][0].metrics == {"v": 1}
        assert ingest.submitted[3][0][0].metrics == {"v": 3}
        ingest.resolve(2)
        assert (await c.expect(PubAck)).packet_id == 1
        assert (await c.expect(PubAck)).packet_id == 2
        ingest.resolve(3)
        assert (await c.expect(PubAck)).packet_id == 3

        # While ingest is saturated a 3.1.1 client's socket is not read.
        ingest.saturated = True
        c, _ = await RawClient.connect(rb.port, "dev2", level=4)
        c.send(Publish(TOPIC, b'{"v": 4}', 0, False, False, None))
        await wait_until(lambda: len(ingest.submitted) == 5)
        ingest.resolve(4)
        c.send(Publish(TOPIC, b'{"v": 5}', 1, False, False, 5))
        await asyncio.sleep(0.3)
        assert len(ingest.submitted) == 5  # not read while saturated
        ingest.saturated = False
        await wait_until(lambda: len(ingest.submitted) == 6)
        ingest.resolve(5)
        assert (await c.expect(PubAck)).packet_id == 5


async def test_rejected_invalid_is_0x99_in_v5(tmp_path: Path) -> None:
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1")
        c.send(Publish(TOPIC, b'{"v": 1}', 1, False, False, 1))
        await wait_until(lambda: len(ingest.submitted) == 1)
        ingest.resolve(0, IngestStatus.REJECTED_INVALID)
        assert (await c.expect(PubAck)).reason_code == 0x99


@pytest.mark.parametrize("watched", [True, False])
async def test_unanswered_qos2_telemetry_is_taken_again_after_reconnect(
    tmp_path: Path, watched: bool
) -> None:
    # Unwatched telemetry has no message to route, only readings to store:
    # its packet id must be forgotten all the same.
    ingest = HandIngest()
    props = Properties(session_expiry_interval=60)
    async with running_broker(tmp_path, ingest=ingest) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        if watched:
            await watcher.subscribe(TOPIC, qos=2)
        c, _ = await RawClient.connect(rb.port, "dev1", properties=props)
        c.send(Publish(TOPIC, b'{"v": 1}', 2, False, False, 7))
        await wait_until(lambda: len(ingest.submitted) == 1)
        c.abort()  # before any PUBREC
        await wait_until(lambda: rb.broker.connected_count() == 1)
        ingest.resolve(0)
        c, _ = await RawClient.connect(rb.port, "dev1", clean=False, properties=props)
        c.send(Publish(TOPIC, b'{"v": 1}', 2, False, True, 7))
        await wait_until(lambda: len(ingest.submitted) == 2)  # not taken for a duplicate
        ingest.resolve(1)
        assert (await c.expect(PubRec)).packet_id == 7
        c.send(PubRel(7))
        assert (await c.expect(PubComp)).packet_id == 7
        if watched:
            assert (await watcher.receive_publish()).payload == b'{"v": 1}'
        await watcher.nothing(0.2)


async def test_ingest_failure_is_not_acknowledged_as_stored(tmp_path: Path) -> None:
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1")
        c.send(Publish(TOPIC, b'{"v": 1}', 1, False, False, 1))
        await wait_until(lambda: len(ingest.submitted) == 1)
        ingest.submitted[0][1].set_exception(RuntimeError("outbox is closed"))
        assert (await c.expect(PubAck)).reason_code == 0x97
        c.send(Publish(TOPIC, b'{"v": 2}', 1, False, False, 2))
        await wait_until(lambda: len(ingest.submitted) == 2)
        ingest.resolve(1)
        assert (await c.expect(PubAck)).reason_code == 0  # the connection lives on
        assert rb.broker.stats().dropped_by_reason["ingest_failed"] == 1


def _one_read(c: RawClient, *packets: Publish) -> None:
    """Write ``packets`` at once, so the broker reads them together."""
    c.send_raw(b"".join(encode(p, c.level) for p in packets))


@pytest.mark.parametrize("level", [4, 5])
async def test_telemetry_of_one_read_is_submitted_once_and_acked_in_order(
    tmp_path: Path, level: int
) -> None:
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1", level=level)
        _one_read(
            c,
            *(Publish(TOPIC, b'{"v": %d}' % i, 1, False, False, i) for i in range(1, 4)),
            Publish(TOPIC, b'[{"v": 4}, {"v": 5}]', 0, False, False, None),
            Publish(TOPIC, b'{"v": 6}', 1, False, False, 9),
        )
        await wait_until(lambda: len(ingest.submitted) == 1)
        assert [r.metrics["v"] for r in ingest.submitted[0][0]] == [1, 2, 3, 4, 5, 6]
        await c.nothing(0.2)  # nothing acknowledged before it is stored
        ingest.resolve(0)
        assert [(await c.expect(PubAck)).packet_id for _ in range(4)] == [1, 2, 3, 9]
        await c.nothing(0.1)
        assert rb.broker.stats().readings_in == 6


async def test_one_read_keeps_the_order_of_refused_and_plain_publishes(tmp_path: Path) -> None:
    """Telemetry around a bad payload and a plain PUBLISH in one read: each
    gets its own answer, in the order the client sent them, whatever the
    order in which its telemetry is stored."""
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("plain/#", qos=1)
        c, _ = await RawClient.connect(rb.port, "dev1")
        _one_read(
            c,
            Publish(TOPIC, b'{"v": 1}', 1, False, False, 1),
            Publish(TOPIC, b"not json", 1, False, False, 2),
            Publish(TOPIC, b'{"v": 3}', 1, False, False, 3),
            Publish("plain/topic", b"p", 1, False, False, 4),
            Publish(TOPIC, b'{"v": 5}', 1, False, False, 5),
        )
        await wait_until(lambda: len(ingest.submitted) == 3)
        assert [[r.metrics["v"] for r in s[0]] for s in ingest.submitted] == [[1], [3], [5]]
        ingest.resolve(2)
        ingest.resolve(1)
        await c.nothing(0.2)
        await watcher.nothing(0.05)  # the plain PUBLISH waits for the telemetry before it
        ingest.resolve(0)
        acks = [await c.expect(PubAck) for _ in range(5)]
        assert [(a.packet_id, a.reason_code) for a in acks] == [
            (1, 0), (2, 0x99), (3, 0), (4, 0), (5, 0)
        ]  # fmt: skip
        assert (await watcher.receive_publish()).payload == b"p"


async def test_refused_batch_v5_every_publish_gets_0x97(tmp_path: Path) -> None:
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1")
        _one_read(c, *(Publish(TOPIC, b'{"v": 1}', 1, False, False, i) for i in (7, 8, 9)))
        await wait_until(lambda: len(ingest.submitted) == 1)
        assert len(ingest.submitted[0][0]) == 3
        ingest.resolve(0, IngestStatus.REJECTED_FULL)
        acks = [await c.expect(PubAck) for _ in range(3)]
        assert [(a.packet_id, a.reason_code) for a in acks] == [(7, 0x97), (8, 0x97), (9, 0x97)]
        assert rb.broker.stats().dropped_by_reason["ingest_full"] == 3


async def test_refused_batch_v311_is_held_whole_and_submitted_again(tmp_path: Path) -> None:
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1", level=4)
        _one_read(c, *(Publish(TOPIC, b'{"v": %d}' % i, 1, False, False, i) for i in (1, 2, 3)))
        await wait_until(lambda: len(ingest.submitted) == 1)
        ingest.saturated = True
        ingest.resolve(0, IngestStatus.REJECTED_FULL)
        await c.nothing(0.2)
        ingest.saturated = False
        await wait_until(lambda: len(ingest.submitted) == 2)
        assert [r.metrics["v"] for r in ingest.submitted[1][0]] == [1, 2, 3]
        ingest.resolve(1)
        assert [(await c.expect(PubAck)).packet_id for _ in range(3)] == [1, 2, 3]
        assert rb.broker.stats().dropped_by_reason["ingest_full"] == 3


async def test_a_bad_packet_after_telemetry_in_one_read_still_stores_it(tmp_path: Path) -> None:
    """PUBLISHes before a malformed packet are handled as if read alone:
    their readings are stored, then the connection closes with 0x81."""
    ingest = MemoryIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1")
        good = b"".join(
            encode(Publish(TOPIC, b'{"v": %d}' % i, 1, False, False, i), 5) for i in (1, 2)
        )
        c.send_raw(good + b"\x32\x01\x00")  # PUBLISH whose topic runs past its end
        got = await c.closed()
        assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x81
        await wait_until(lambda: len(ingest.readings) == 2)
        assert [r.metrics["v"] for r in ingest.readings] == [1, 2]
        assert rb.broker.stats().readings_in == 2


async def test_large_read_is_submitted_in_bounded_batches(tmp_path: Path) -> None:
    ingest = HandIngest()
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1")
        n = MAX_BATCH * 2 + 10
        _one_read(c, *(Publish(TOPIC, b'{"v": %d}' % i, 0, False, False, None) for i in range(n)))
        await wait_until(lambda: sum(len(s[0]) for s in ingest.submitted) == n)
        got = [r.metrics["v"] for s in ingest.submitted for r in s[0]]
        assert got == list(range(n))
        sizes = [len(s[0]) for s in ingest.submitted]
        assert max(sizes) == MAX_BATCH  # a read this size fills whole batches
        assert rb.broker.stats().readings_in == n


async def test_an_ingest_that_answers_each_message_gets_one_submit_per_publish(
    tmp_path: Path,
) -> None:
    """A pipeline with routes validates per device message: the broker then
    submits each PUBLISH of a read on its own, fast path or not, so only the
    refused one gets 0x99."""
    ingest = HandIngest()
    ingest.batchable = False
    async with running_broker(tmp_path, ingest=ingest) as rb:
        c, _ = await RawClient.connect(rb.port, "dev1")
        for first in (1, 4):  # the second read is one the fast path takes
            _one_read(
                c,
                *(
                    Publish(TOPIC, b'{"v": %d}' % i, 1, False, False, i)
                    for i in range(first, first + 3)
                ),
            )
            await wait_until(lambda n=first + 2: len(ingest.submitted) == n)
            ingest.resolve(first - 1)
            ingest.resolve(first, IngestStatus.REJECTED_INVALID)
            ingest.resolve(first + 1)
            acks = [await c.expect(PubAck) for _ in range(3)]
            assert [(a.packet_id, a.reason_code) for a in acks] == [
                (first, 0), (first + 1, 0x99), (first + 2, 0)
            ]  # fmt: skip
        assert [len(s[0]) for s in ingest.submitted] == [1] * 6
