"""CoAP requests encoded by hand, for tests that need datagrams no CoAP
library would send (or a client that closes its socket at once)."""

from __future__ import annotations

TOKEN = b"\x5a\x17"


def coap_request(
    message_id: int,
    options: list[tuple[int, bytes]],
    code: int = 0x02,
    payload: bytes = b"",
    token: bytes = TOKEN,
) -> bytes:
    """A confirmable request (POST by default) with these ``(number, value)``
    options (values up to 268 bytes) and a token (2 bytes by default)."""
    out = bytes([0x40 | len(token), code]) + message_id.to_bytes(2, "big") + token
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        assert len(value) <= 268, "longer option values are not encoded here"
        delta, last = number - last, number
        ext = b""
        if delta >= 269:
            ext, delta = (delta - 269).to_bytes(2, "big"), 14
        elif delta >= 13:
            ext, delta = bytes([delta - 13]), 13
        length = len(value)
        if length >= 13:
            ext, length = ext + bytes([length - 13]), 13
        out += bytes([(delta << 4) | length]) + ext + value
    return out + (b"\xff" + payload if payload else b"")


def telemetry_path(device: str) -> list[tuple[int, bytes]]:
    """Uri-Path options of ``devices/{device}/telemetry``."""
    return [(11, b"devices"), (11, device.encode()), (11, b"telemetry")]


def con_post(message_id: int, device: str, payload: bytes) -> bytes:
    """A confirmable POST of a JSON ``payload`` to ``devices/{device}/telemetry``."""
    return coap_request(message_id, [*telemetry_path(device), (12, b"\x32")], payload=payload)


def commands_path(device: str) -> list[tuple[int, bytes]]:
    """Uri-Path options of ``devices/{device}/commands``."""
    return [(11, b"devices"), (11, device.encode()), (11, b"commands")]


def observe_get(message_id: int, device: str) -> bytes:
    """A confirmable GET of ``devices/{device}/commands`` with Observe 0 (register)."""
    return coap_request(message_id, [(6, b""), *commands_path(device)], code=0x01)


def empty_reply(message_id: int, *, reset: bool = False) -> bytes:
    """An empty ACK (or RST) for ``message_id``."""
    return bytes([0x70 if reset else 0x60, 0]) + message_id.to_bytes(2, "big")


def parse(datagram: bytes) -> tuple[int, int, int, dict[int, list[bytes]], bytes]:
    """(type, code, message id, options by number, payload) of a CoAP datagram."""
    mtype, tkl = (datagram[0] >> 4) & 3, datagram[0] & 0x0F
    code, mid = datagram[1], int.from_bytes(datagram[2:4], "big")
    pos, number, options = 4 + tkl, 0, {}  # type: ignore[var-annotated]
    while pos < len(datagram) and datagram[pos] != 0xFF:
        delta, length = datagram[pos] >> 4, datagram[pos] & 0x0F
        pos += 1
        values = []
        for nibble in (delta, length):
            if nibble == 13:
                values.append(datagram[pos] + 13)
                pos += 1
            elif nibble == 14:
                values.append(int.from_bytes(datagram[pos : pos + 2], "big") + 269)
                pos += 2
            else:
                values.append(nibble)
        number += values[0]
        options.setdefault(number, []).append(datagram[pos : pos + values[1]])
        pos += values[1]
    payload = datagram[pos + 1 :] if pos < len(datagram) else b""
    return mtype, code, mid, options, payload
