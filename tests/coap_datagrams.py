"""CoAP requests encoded by hand, for tests that need datagrams no CoAP
library would send (or a client that closes its socket at once)."""

from __future__ import annotations

TOKEN = b"\x5a\x17"


def coap_request(
    message_id: int, options: list[tuple[int, bytes]], code: int = 0x02, payload: bytes = b""
) -> bytes:
    """A confirmable request (POST by default) with these ``(number, value)``
    options (values up to 12 bytes) and a 2-byte token."""
    out = bytes([0x40 | len(TOKEN), code]) + message_id.to_bytes(2, "big") + TOKEN
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        assert len(value) <= 12, "extended option lengths are not encoded here"
        delta, last = number - last, number
        ext = b""
        if delta >= 269:
            ext, delta = (delta - 269).to_bytes(2, "big"), 14
        elif delta >= 13:
            ext, delta = bytes([delta - 13]), 13
        out += bytes([(delta << 4) | len(value)]) + ext + value
    return out + (b"\xff" + payload if payload else b"")


def telemetry_path(device: str) -> list[tuple[int, bytes]]:
    """Uri-Path options of ``devices/{device}/telemetry``."""
    return [(11, b"devices"), (11, device.encode()), (11, b"telemetry")]


def con_post(message_id: int, device: str, payload: bytes) -> bytes:
    """A confirmable POST of a JSON ``payload`` to ``devices/{device}/telemetry``."""
    return coap_request(message_id, [*telemetry_path(device), (12, b"\x32")], payload=payload)
