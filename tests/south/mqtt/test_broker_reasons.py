"""Every error path answers with a reason code that exists for the client's
protocol version, and the client gets to read it before the socket closes.

MQTT 5 CONNACK and DISCONNECT each allow their own set of reason codes; 3.1.1
has CONNACK return codes 0-5 and no DISCONNECT at all. A reason picked for one
packet (0x94 topic alias invalid, a DISCONNECT code) must not be written into
another that cannot carry it: the encoder refuses, and the handler used to
crash with it instead of answering.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_harness import MemoryTransport, RawClient, running_broker, wait_until

from edgeway.config import ListenerConfig, MqttLimits, MqttSection
from edgeway.south.mqtt.codec import MqttReader, connack_code, disconnect_code, encode
from edgeway.south.mqtt.packets import (
    ConnAck,
    Connect,
    Disconnect,
    Properties,
    ProtocolError,
    Publish,
    Subscribe,
    Subscription,
)

LISTENER = ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True)


def test_every_reason_maps_to_a_code_the_packet_may_carry() -> None:
    for reason in range(256):
        code5 = connack_code(reason, 5)
        assert code5 is not None and code5 != 0
        (ack,) = MqttReader(protocol_level=5).feed(encode(ConnAck(False, code5), 5))
        assert isinstance(ack, ConnAck) and ack.reason_code == code5
        code4 = connack_code(reason, 4)
        if code4 is not None:
            assert 1 <= code4 <= 5
            (ack,) = MqttReader(protocol_level=4).feed(encode(ConnAck(False, code4), 4))
            assert isinstance(ack, ConnAck) and ack.reason_code == code4
        d = disconnect_code(reason)
        assert d != 0x04  # "disconnect with will message" is the client's
        (dis,) = MqttReader(protocol_level=5).feed(encode(Disconnect(d), 5))
        assert isinstance(dis, Disconnect) and dis.reason_code == d
    # Codes a packet may carry are kept; 3.1.1 keeps its own refusals.
    assert [connack_code(c, 5) for c in (0x81, 0x86, 0x87, 0x8A, 0x95, 0x97)] == [
        0x81, 0x86, 0x87, 0x8A, 0x95, 0x97,
    ]  # fmt: skip
    assert [connack_code(c, 4) for c in (0x84, 0x85, 0x89, 0x86, 0x87, 0x81)] == [
        1, 2, 3, 4, 5, None,
    ]  # fmt: skip
    assert connack_code(0x94, 5) == 0x82  # topic alias invalid: no such CONNACK code
    assert [disconnect_code(c) for c in (0x8E, 0x93, 0x86, 0x84, 0x04)] == [
        0x8E, 0x93, 0x87, 0x82, 0x80,
    ]  # fmt: skip


async def _feed(
    tmp_path: Path, reads: list[bytes], level: int, config: MqttSection | None = None
) -> MemoryTransport:
    """Feed ``reads`` to one in-process connection; return its transport."""
    async with running_broker(tmp_path, config=config) as rb:
        conn = rb.broker.protocol_factory(LISTENER)()
        t = MemoryTransport()
        conn.connection_made(t)
        for data in reads:
            conn.data_received(data)  # must never raise
            await asyncio.sleep(0)  # authentication completes
        await asyncio.sleep(0.01)
        conn.connection_lost(None)
    return t


async def test_connect_and_bad_topic_alias_in_one_read_get_connack_0x82(tmp_path: Path) -> None:
    """The reader raises 0x94 (topic alias invalid) for the PUBLISH after the
    CONNECT, while authentication is pending: the answer is a CONNACK, which
    has no 0x94. Before, encoding CONNACK 0x94 raised out of data_received."""
    connect = encode(Connect(5, "c", True, 60), 5)
    bad = bytes.fromhex("3008") + b"\x00\x01t" + bytes.fromhex("0323000078")  # alias 0
    t = await _feed(tmp_path, [connect + bad], 5)
    packets = MqttReader(protocol_level=5).feed(bytes(t.out))
    assert [(type(p).__name__, getattr(p, "reason_code", None)) for p in packets] == [
        ("ConnAck", 0x82)
    ]


async def test_v311_protocol_violation_before_connack_closes_without_connack(
    tmp_path: Path,
) -> None:
    connect = encode(Connect(4, "c", True, 60), 4)
    bad = b"\x32\x06\x00\x01t\x00\x00x"  # QoS 1 PUBLISH with packet id 0
    t = await _feed(tmp_path, [connect + bad], 4)
    assert t.out == b"" and t.closed


_PACKETS = st.sampled_from(
    [
        encode(Publish("a/b", b"x", 1, False, False, 1), 5),
        encode(Subscribe(2, [Subscription("a/#", 1)]), 5),
        b"\x32\x06\x00\x01t\x00\x00x",  # packet id 0
        bytes.fromhex("3008") + b"\x00\x01t" + bytes.fromhex("0323000078"),  # alias 0
        bytes.fromhex("3008") + b"\x00\x01t" + bytes.fromhex("0323ffff78"),  # alias too high
        b"\x30\x04\x00\x01+x",  # wildcard in a topic name
        b"\x82\x06\x00\x01\x00\x01a\x03",  # SUBSCRIBE qos 3
        b"\xe0\x02\x04\x00",  # DISCONNECT 0x04
        b"\xf0\x00",  # AUTH
        b"\x10\x00",  # a second CONNECT, truncated
        b"\xff\xff\xff\xff\x7f",  # bad remaining length
        b"\x20\x02\x00\x00",  # CONNACK from a client
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    level=st.sampled_from([4, 5]),
    before=st.lists(_PACKETS, max_size=3),
    junk=st.binary(max_size=24),
    cut=st.integers(0, 200),
)
def test_any_error_path_answers_validly_for_the_version(
    level: int, before: list[bytes], junk: bytes, cut: int
) -> None:
    """Whatever follows a CONNECT, in one read or two: nothing escapes
    ``data_received`` and everything written decodes as valid packets of the
    client's version (the decoder refuses undefined reason codes)."""
    import tempfile

    connect = encode(Connect(level, "fz", True, 60, properties=Properties()), level)
    stream = connect + b"".join(before) + junk
    reads = [stream[:cut], stream[cut:]] if 0 < cut < len(stream) else [stream]
    with tempfile.TemporaryDirectory() as tmp:
        t = asyncio.run(_feed(Path(tmp), reads, level))
    try:
        packets = MqttReader(protocol_level=level).feed(bytes(t.out))
    except ProtocolError as e:  # pragma: no cover - the failure being tested for
        raise AssertionError(f"invalid output {bytes(t.out).hex()}: {e}") from None
    for p in packets:
        if isinstance(p, ConnAck | Disconnect):
            assert level == 5 or isinstance(p, ConnAck)


# ---------------------------------------------------------------------------
# the client reads the reason (graceful close)


def _paho_burst(port: int) -> list[int]:
    """A single-threaded paho-mqtt v5 client (no network thread: it writes a
    whole burst before it reads, like many device clients) sends a PUBLISH
    with a topic alias the broker does not allow, then 20 MB more; then it
    reads. Returns the reason codes its on_disconnect saw."""
    import time

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties

    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="burst", protocol=paho.MQTTv5
    )
    connected: list[bool] = []
    reasons: list[int] = []
    c.on_connect = lambda *a: connected.append(True)
    c.on_disconnect = lambda c_, u, flags, rc, p: reasons.append(int(rc.value))
    c.connect("127.0.0.1", port, keepalive=30)
    deadline = time.monotonic() + 5.0
    while not connected and time.monotonic() < deadline:
        c.loop(0.05)
    assert connected
    bad = PahoProperties(PacketTypes.PUBLISH)
    bad.TopicAlias = 10  # the broker allows 4
    payload = b"x" * 65536
    c.publish("burst/0", payload, 0, properties=bad)
    for i in range(1, 300):
        c.publish(f"burst/{i}", payload, 0)  # written at once (no network thread)
        if reasons:
            break
    while not reasons and time.monotonic() < deadline:
        c.loop(0.05)
    if c.socket() is not None:
        c.disconnect()
    return reasons


async def test_paho_v5_reads_the_disconnect_reason_while_still_sending(tmp_path: Path) -> None:
    """A client that runs into a limit in the middle of a burst learns which:
    the broker sends DISCONNECT 0x94 (topic alias invalid) and then reads and
    discards what is still in flight until the client closes. Before, it
    closed a socket with unread input: the kernel reset the connection, the
    client's next write failed, and paho reported 0x80 "unspecified error"
    (connection lost) without ever reading the reason."""
    cfg = MqttSection(limits=MqttLimits(topic_alias_maximum=4))
    async with running_broker(tmp_path, config=cfg) as rb:
        reasons = await asyncio.to_thread(_paho_burst, rb.port)
        assert reasons[:1] == [0x94]
        assert rb.broker.stats().events["protocol_errors"] == 1


async def test_told_client_gets_eof_after_the_reason_and_a_silent_one_is_cut_off(
    tmp_path: Path,
) -> None:
    """After the reason our side is shut (the client reads the DISCONNECT,
    then end of stream); a client that then neither closes nor stops sending
    is cut off after ``disconnect_linger``; its session is released at once."""
    cfg = MqttSection(limits=MqttLimits(disconnect_linger=0.3))
    async with running_broker(tmp_path, config=cfg) as rb:
        c, _ = await RawClient.connect(rb.port, "quiet")
        c.send_raw(b"\x32\x06\x00\x01t\x00\x00x")  # packet id 0
        got = await c.closed()  # the DISCONNECT, then EOF
        assert [(type(p), p.reason_code) for p in got] == [(Disconnect, 0x82)]  # type: ignore[attr-defined]
        assert "quiet" not in rb.broker.sessions  # released, not waiting for the socket
        assert len(rb.broker.connections) == 1  # lingering: still reading
        c.send_raw(b"more bytes, discarded" * 100)
        await wait_until(lambda: not rb.broker.connections)  # cut off by the sweep
        await c.close()
