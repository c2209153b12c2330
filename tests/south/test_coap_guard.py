"""What the CoAP listener refuses before aiocoap renders (sans-IO rules)."""

from __future__ import annotations

from edgeway.south.coap_guard import (
    EmptyReply,
    OptionRefusal,
    bad_option_ack,
    empty_message_id,
    option_refusal,
)

PATH = [(11, 7), (11, 2), (11, 9)]


def test_option_refusal() -> None:
    assert option_refusal(PATH) is None
    assert option_refusal([*PATH, (12, 1), (60, 2), (23, 1), (27, 3), (258, 1)]) is None
    assert option_refusal([*PATH, (2048, 5)]) is None  # unknown elective: ignored
    assert option_refusal([*PATH, (9, 1)]) == OptionRefusal("4.02", "unknown_critical_option", 9)
    assert option_refusal([(1, 2), *PATH]) == OptionRefusal("4.02", "unknown_critical_option", 1)
    assert option_refusal([*PATH, (35, 10)]) == OptionRefusal("5.05", "proxy_option", 35)
    assert option_refusal([*PATH, (12, 3)]) == OptionRefusal("4.02", "malformed_option", 12)
    assert option_refusal([(11, 256)]) == OptionRefusal("4.02", "malformed_option", 11)


def test_bad_option_ack() -> None:
    con_post = bytes([0x42, 0x02, 0x12, 0x34, 0xAA, 0xBB, 0xB7]) + b"devices"
    assert bad_option_ack(con_post, b"why") == bytes([0x62, 0x82, 0x12, 0x34, 0xAA, 0xBB]) + (
        b"\xffwhy"
    )
    non_post = bytes([0x52, 0x02, 0, 1, 0xAA, 0xBB])
    assert bad_option_ack(non_post) is None  # non-confirmable: ignored
    assert bad_option_ack(bytes([0x42, 0x45, 0, 1, 0xAA, 0xBB])) is None  # a response
    assert bad_option_ack(bytes([0x49, 0x02, 0, 1]) + b"\0" * 9) is None  # token > 8
    assert bad_option_ack(bytes([0x42, 0x02, 0, 1, 0xAA])) is None  # truncated token
    assert bad_option_ack(b"\x40") is None


def test_empty_message_id() -> None:
    assert empty_message_id(bytes([0x60, 0x00, 0x12, 0x34])) == EmptyReply(0x1234, reset=False)
    assert empty_message_id(bytes([0x70, 0x00, 0x00, 0x07])) == EmptyReply(7, reset=True)
    assert empty_message_id(bytes([0x40, 0x00, 0, 1])) is None  # a ping (CON), not a reply
    assert empty_message_id(bytes([0x60, 0x45, 0, 1])) is None  # a piggybacked response
    assert empty_message_id(bytes([0x61, 0x00, 0, 1, 0xAA])) is None  # a token: not empty
    assert empty_message_id(bytes([0x60, 0x00, 0, 1, 0xFF])) is None  # bytes after the header
    assert empty_message_id(bytes([0xA0, 0x00, 0, 1])) is None  # version 2
    assert empty_message_id(b"\x60\x00") is None
