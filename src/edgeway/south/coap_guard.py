"""What the CoAP listener refuses before aiocoap renders a request.

Unauthenticated senders can put anything in a datagram. Where aiocoap would
raise (a traceback in the log per datagram, no answer) or answer as if an
option it does not know were not there, the listener answers itself:

* options: :func:`option_refusal` names a critical option the listener does
  not implement (RFC 7252 5.4.1: 4.02 Bad Option), a proxy option (5.05
  Proxying Not Supported: this is no proxy) or an option value longer than its
  format allows (5.4.3: treated as unrecognised);
* datagrams aiocoap cannot decode (a string option that is not UTF-8 raised
  out of its transport's read callback): :func:`bad_option_ack` builds the
  4.02 answer to a confirmable request from its header alone.

Both are sans-IO; ``coap.py`` wires them in and logs at most a few lines a
second (``edgeway.logs.EventLog``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

IF_MATCH, URI_HOST, URI_PORT, URI_PATH, URI_QUERY, ACCEPT = 1, 3, 7, 11, 15, 17
BLOCK2, BLOCK1, PROXY_URI, PROXY_SCHEME = 23, 27, 35, 39
OBSERVE, CONTENT_FORMAT, MAX_AGE, SIZE1 = 6, 12, 14, 60

HANDLED_CRITICAL = frozenset({URI_HOST, URI_PORT, URI_PATH, URI_QUERY, ACCEPT, BLOCK2, BLOCK1})
"""Critical options (odd numbers) the listener acts on or may safely ignore:
the request target and block-wise transfer. Every other critical option
(If-Match, If-None-Match, OSCORE, EDHOC, Q-Block, ...) changes what a request
means in a way this listener does not implement, so it is refused."""
PROXY_OPTIONS = frozenset({PROXY_URI, PROXY_SCHEME})

MAX_LENGTH = {
    IF_MATCH: 8,
    URI_HOST: 255,
    URI_PORT: 2,
    URI_PATH: 255,
    URI_QUERY: 255,
    ACCEPT: 2,
    OBSERVE: 3,
    CONTENT_FORMAT: 2,
    MAX_AGE: 4,
    BLOCK2: 3,
    BLOCK1: 3,
    SIZE1: 4,
}
"""Longest value of each option the listener reads, in bytes (RFC 7252 5.10,
RFC 7641 2, RFC 7959 2.1)."""


@dataclass(frozen=True, slots=True)
class OptionRefusal:
    """Why a request is refused: ``code`` is ``"4.02"`` or ``"5.05"``."""

    code: str
    reason: str
    """Counted and logged: ``unknown_critical_option``, ``malformed_option``, ``proxy_option``."""
    option: int


def option_refusal(
    options: list[tuple[int, int]], also_handled: frozenset[int] = frozenset()
) -> OptionRefusal | None:
    """The refusal for a request with these ``(number, value length)`` options,
    or None. ``also_handled``: critical options this request's resource acts
    on besides :data:`HANDLED_CRITICAL` (If-Match where a request may be
    conditional)."""
    for number, length in options:
        if number in PROXY_OPTIONS:
            return OptionRefusal("5.05", "proxy_option", number)
        if number & 1 and number not in HANDLED_CRITICAL and number not in also_handled:
            return OptionRefusal("4.02", "unknown_critical_option", number)
        limit = MAX_LENGTH.get(number)
        if limit is not None and length > limit:
            return OptionRefusal("4.02", "malformed_option", number)
    return None


def request_options(request: Any) -> list[tuple[int, int]]:
    """``(number, encoded length)`` of each option of an aiocoap request."""
    return [(int(o.number), len(o.encode())) for o in request.opt.option_list()]


_HEADER = struct.Struct("!BBH")
_CON, _ACK, _RST = 0, 2, 3
_BAD_OPTION = (4 << 5) | 2


def bad_option_ack(datagram: bytes, diagnostic: bytes = b"") -> bytes | None:
    """A piggybacked 4.02 Bad Option for a confirmable request whose header
    (version 1, a request code, a token of at most 8 bytes) is readable;
    None for anything else (RFC 7252 4.3: such messages are ignored)."""
    if len(datagram) < _HEADER.size:
        return None
    first, code, mid = _HEADER.unpack_from(datagram)
    version, mtype, tkl = first >> 6, (first >> 4) & 3, first & 0x0F
    if version != 1 or mtype != _CON or tkl > 8 or not 1 <= code <= 31:
        return None
    token = datagram[4 : 4 + tkl]
    if len(token) != tkl:
        return None
    head = _HEADER.pack((1 << 6) | (_ACK << 4) | tkl, _BAD_OPTION, mid) + token
    return head + (b"\xff" + diagnostic if diagnostic else b"")


@dataclass(frozen=True, slots=True)
class EmptyReply:
    """An empty ACK or RST (RFC 7252 4.2, 4.3): how a peer confirms or
    rejects a confirmable message by its message id alone."""

    mid: int
    reset: bool


def empty_message_id(datagram: bytes) -> EmptyReply | None:
    """The message id of an empty ACK or RST datagram (4 bytes: version 1,
    code 0.00, no token; RFC 7252 4.1 allows nothing after the header), None
    for anything else."""
    if len(datagram) != _HEADER.size:
        return None
    first, code, mid = _HEADER.unpack_from(datagram)
    version, mtype, tkl = first >> 6, (first >> 4) & 3, first & 0x0F
    if version != 1 or code != 0 or tkl != 0 or mtype not in (_ACK, _RST):
        return None
    return EmptyReply(mid, mtype == _RST)
