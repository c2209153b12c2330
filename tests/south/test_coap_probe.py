"""The CoAP self-check: ping encoding, and answers from a real listener or none."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("aiocoap")

from ingest_doubles import RecordingIngest
from test_coap import coap_server

from edgeway.south.coap_probe import CoapPinger, is_reset_for, ping_datagram, probe_address


def test_ping_and_reset_encoding() -> None:
    assert ping_datagram(0x1234) == b"\x40\x00\x12\x34"
    assert is_reset_for(b"\x70\x00\x12\x34", 0x1234)
    assert not is_reset_for(b"\x70\x00\x12\x35", 0x1234)  # another ping's
    assert not is_reset_for(b"\x60\x00\x12\x34", 0x1234)  # an ACK, not a reset
    assert not is_reset_for(b"\x70\x00\x12\x34\xff", 0x1234)
    assert probe_address("::ffff:0.0.0.0", 5683) == ("127.0.0.1", 5683)
    assert probe_address("::", 5683) == ("127.0.0.1", 5683)
    assert probe_address("::ffff:10.1.2.3", 5683) == ("10.1.2.3", 5683)
    assert probe_address("::1", 5683) == ("::1", 5683)


async def test_a_listener_answers_and_a_silent_socket_does_not() -> None:
    async with coap_server(RecordingIngest()) as adapter:
        assert adapter.port is not None
        pinger = CoapPinger("127.0.0.1", adapter.port)
        try:
            # Several pings in a row: each needs its own message id (a repeated
            # one is a duplicate the server does not answer again).
            assert [await pinger.ping(2.0) for _ in range(3)] == [True, True, True]
        finally:
            pinger.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        pinger = CoapPinger("127.0.0.1", silent.getsockname()[1])
        try:
            assert await pinger.answers(2, 0.1) is False
        finally:
            pinger.close()
