"""Retained store, session queue, persistence and telemetry decoding (no sockets)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeway.south.mqtt.packets import Properties
from edgeway.south.mqtt.persistence import BrokerStore, properties_from_blob, properties_to_blob
from edgeway.south.mqtt.retained import Message, RetainedStore
from edgeway.south.mqtt.session import Delivery, Inflight, Session
from edgeway.south.mqtt.telemetry import TelemetryError, TelemetryTopics, decode_telemetry
from edgeway.south.mqtt.topics import SubEntry


def test_retained_set_clear_match_and_expiry() -> None:
    r = RetainedStore()
    r.set(Message("a/b", b"1", retain=True))
    r.set(Message("a/c", b"2", retain=True))
    r.set(Message("$SYS/x", b"3", retain=True))
    assert {m.topic for m in r.matching("a/+")} == {"a/b", "a/c"}
    assert {m.topic for m in r.matching("#")} == {"a/b", "a/c"}
    assert [m.payload for m in r.matching("a/b")] == [b"1"]
    r.set(Message("a/b", b"", retain=True))
    assert r.matching("a/b") == []
    assert r.dirty["a/b"] is None
    r.set(Message("e", b"x", retain=True, expires_at=time.time() - 1))
    assert r.matching("e") == []
    assert r.matching("#") and all(m.topic != "e" for m in r.matching("#"))


def test_message_remaining_expiry() -> None:
    m = Message("t", b"", expires_at=100.0)
    assert m.remaining_expiry(98.5) == 2
    assert m.remaining_expiry(98.0) == 2
    assert m.remaining_expiry(100.0) == 0
    assert Message("t", b"").remaining_expiry(0) is None


def test_session_queue_bounded_drops_oldest_qos0_first() -> None:
    s = Session("c", 5, 60)
    for i in range(3):
        s.enqueue(Delivery(Message("t", b"%d" % i, qos=1), 1, False), 3)
    s.enqueue(Delivery(Message("t", b"q0"), 0, False), 4)
    assert s.enqueue(Delivery(Message("t", b"new", qos=1), 1, False), 4) == (1, False)
    assert [d.msg.payload for d in s.queue] == [b"0", b"1", b"2", b"new"]
    assert s.enqueue(Delivery(Message("t", b"new2", qos=1), 1, False), 4) == (1, True)
    assert [d.msg.payload for d in s.queue] == [b"1", b"2", b"new", b"new2"]
    assert s.dropped == 2


def test_session_packet_ids_skip_inflight() -> None:
    s = Session("c", 4)
    d = Delivery(Message("t", b""), 1, False)
    s.inflight[1] = Inflight(1, d)
    s.inflight[2] = Inflight(2, d)
    assert s.next_packet_id() == 3
    s._next_pid = 65535
    assert s.next_packet_id() == 65535
    assert s.next_packet_id() == 3


def test_properties_blob_roundtrip() -> None:
    p = Properties(
        payload_format_indicator=1,
        content_type="application/json",
        response_topic="r/t",
        correlation_data=b"\x00\x01",
        user_properties=[("a", "b"), ("a", "c")],
    )
    assert properties_from_blob(properties_to_blob(p)) == p
    assert properties_to_blob(Properties()) is None
    assert properties_from_blob(None) is None


def test_store_roundtrip(tmp_path: Path) -> None:
    store = BrokerStore(tmp_path / "broker.db")
    r = RetainedStore()
    r.set(Message("a", b"1", 1, True, Properties(content_type="x")))
    r.set(Message("b", b"2", 0, True))
    store.retained_changed(r.dirty)
    s = Session("dev1", 5, 3600)
    s.disconnected_at = 123.0
    s.in_qos2 = {7}
    store.session_saved(s)
    e = SubEntry("a/#", 1, True, False, 1, 42)
    s.subscriptions[e.topic_filter] = e
    store.subscription_saved("dev1", e)
    m = Message("a/x", b"p", 2, False, Properties(user_properties=[("k", "v")]), None, "other")
    s.inflight[5] = Inflight(5, Delivery(m, 2, False, (42,)), released=True)
    s.enqueue(Delivery(m, 1, True), 10)
    s.enqueue(Delivery(m, 0, False), 10)
    store.messages_saved([s])
    store.close()

    store = BrokerStore(tmp_path / "broker.db")
    state = store.load()
    assert sorted(m.topic for m in state.retained) == ["a", "b"]
    (s2,) = state.sessions
    assert s2.client_id == "dev1" and s2.expiry_interval == 3600 and s2.protocol_level == 5
    assert s2.disconnected_at == 123.0 and s2.in_qos2 == {7}
    assert s2.subscriptions["a/#"] == e
    assert list(s2.inflight) == [5] and s2.inflight[5].released
    assert s2.inflight[5].delivery.sub_ids == (42,)
    assert [(d.qos, d.retain) for d in s2.queue] == [(1, True), (0, False)]
    assert s2.qos0_queued == 1
    assert s2.queue[0].msg == m
    store.session_deleted("dev1")
    store.retained_changed({"a": None})
    store.flush()
    state = store.load()
    assert state.sessions == [] and [m.topic for m in state.retained] == ["b"]
    store.close()


def test_telemetry_topics() -> None:
    t = TelemetryTopics(["devices/{device_id}/telemetry", "site/+/{device_id}/#"])
    assert t.device_id("devices/d1/telemetry") == "d1"
    assert t.device_id("devices/d1/telemetry/x") is None
    assert t.device_id("devices//telemetry") is None
    assert t.device_id("site/a/d2/x/y") == "d2"
    assert t.device_id("site/a/d2") == "d2"
    assert t.device_id("other") is None
    with pytest.raises(ValueError):
        TelemetryTopics(["no/placeholder"])


def test_decode_telemetry_variants() -> None:
    (r,) = decode_telemetry(
        b'{"temp": 21.5, "on": true, "mode": "a", "ts": 1732550400500, "msg_id": 17,'
        b' "motor": {"rpm": 1200}, "gone": null}',
        "d1",
        "devices/d1/telemetry",
        "c1",
    )
    assert r.device_id == "d1" and r.ts == pytest.approx(1732550400.5)
    assert r.metrics == {"temp": 21.5, "on": True, "mode": "a", "motor.rpm": 1200}
    assert r.origin.message_id == "17" and r.origin.client_id == "c1"
    assert r.origin.address == "devices/d1/telemetry"
    (r,) = decode_telemetry(b'{"v": 1, "ts": "2024-11-25T16:00:00Z"}', "d", "t", "c", b"corr")
    assert r.ts == 1732550400.0 and r.origin.message_id == "corr"
    (r,) = decode_telemetry(b'{"v": 1, "ts": "2024-11-25T16:00:00"}', "d", "t", "c")
    assert r.ts == 1732550400.0
    rs = decode_telemetry(
        b'[{"v": 1, "ts": 1732550410}, {"v": 2, "ts": 1732550411}]', "d", "t", "c"
    )
    assert [x.metrics["v"] for x in rs] == [1, 2]
    before = time.time()
    (r,) = decode_telemetry(b'{"v": 1}', "d", "t", "c")
    assert before <= r.ts <= time.time()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"42", "not_an_object"),
        (b"[1]", "not_an_object"),
        (b"[]", "no_metrics"),
        (b"{}", "no_metrics"),
        (b'{"ts": 5}', "no_metrics"),
        # The codecs' timestamp rules and reason (was "bad_ts" before input_limits).
        (b'{"v": 1, "ts": "yesterday"}', "bad_timestamp"),
        (b'{"v": 1, "ts": true}', "bad_timestamp"),
        (b'{"v": [1, 2]}', "unsupported_value"),
    ],
)
def test_decode_telemetry_errors(payload: bytes, reason: str) -> None:
    with pytest.raises(TelemetryError) as ei:
        decode_telemetry(payload, "d", "t", "c")
    assert ei.value.reason == reason
