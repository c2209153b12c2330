"""TCP_QUICKACK: asking the kernel to acknowledge a read at once.

Linux delays the ACK of a segment by up to 40 ms when it has nothing to send
back, hoping to ride it on data. A peer with Nagle on (paho, Mosquitto) holds
its next small packet until that ACK comes: a PUBACK then a reading, or a run
of PUBACKs, each wait 40 ms. The option is not sticky (the kernel goes back
to delayed ACKs by itself), so it is set once per read, and only while the
other side has something small to send (an acknowledgement is due).

Used by the embedded broker (a QoS 1/2 PUBLISH to a client in flight), the
MQTT client-mode adapter and the MQTT sink (PUBACKs due)."""

from __future__ import annotations

import socket
from typing import Any

TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
"""Linux only: elsewhere a Nagle-on peer's packet after our read may wait for
the delayed ACK."""


def quickack_socket(transport: Any) -> Any:
    """``transport``'s TCP socket to set the option on, or None (no such
    option here, not TCP, no socket). Under uvloop it is a stand-in that
    builds a socket object per call; the sink, which sets it on every read
    at tens of thousands of PUBACKs per second, uses a duplicate descriptor
    instead (``edgeway.sinks.mqtt``)."""
    if TCP_QUICKACK is None or transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def ack_now(sock: Any) -> bool:
    """Ask for an immediate ACK on ``sock``; False when the socket is gone
    (only a hint was lost)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except OSError:
        return False
    return True
