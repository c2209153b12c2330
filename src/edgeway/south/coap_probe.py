"""Is a CoAP listener still serving? Ask it with a CoAP ping (RFC 7252 4.3).

A ping is an empty confirmable message; a CoAP endpoint answers it with a
reset carrying the same message id. :class:`CoapPinger` sends one from its own
socket and waits for that reset: an answer proves that the listener's socket
is still read and its message layer still runs, whatever silenced it otherwise
(a lost reader, a dead transport). The CoAP adapter pings its own listener
every ``coap.probe_interval`` and restarts the listener when it stays silent.

The encoding is sans-IO (:func:`ping_datagram`, :func:`is_reset_for`); the
asyncio part only moves those bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct

from edgeway.south.coap_guard import empty_message_id

_EMPTY_CON = 0x40
"""Version 1, type CON (0), token length 0."""
_HEADER = struct.Struct("!BBH")


def ping_datagram(message_id: int) -> bytes:
    """An empty confirmable message (a CoAP ping) with ``message_id``."""
    return _HEADER.pack(_EMPTY_CON, 0, message_id & 0xFFFF)


def is_reset_for(datagram: bytes, message_id: int) -> bool:
    """True when ``datagram`` is the empty reset that answers the ping ``message_id``."""
    reply = empty_message_id(datagram)
    return reply is not None and reply.reset and reply.mid == message_id & 0xFFFF


def probe_address(host: str, port: int) -> tuple[str, int]:
    """Where to ping a listener whose socket is bound to ``host`` (as its
    ``getsockname()`` says): an IPv4-mapped address as IPv4, a wildcard bind
    on 127.0.0.1 (aiocoap's sockets are dual-stack, and IPv4 loopback exists
    where IPv6 may be off)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0].strip("[]"))
    except ValueError:
        return host, port
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "127.0.0.1", port
    return str(ip), port


class _PingProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[None]] = {}

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = empty_message_id(data)
        if reply is None or not reply.reset:
            return
        fut = self.waiting.get(reply.mid)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def error_received(self, exc: Exception) -> None:
        # A refused ping (nothing bound any more) is the same as no answer:
        # the waiting ping times out.
        pass


class CoapPinger:
    """Pings one CoAP endpoint from a private UDP socket."""

    def __init__(self, host: str, port: int) -> None:
        self.address = probe_address(host, port)
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _PingProtocol | None = None
        # Each ping needs a fresh message id: a CoAP server treats a repeated
        # id from the same sender as a duplicate and does not answer it again.
        self._next_mid = int.from_bytes(os.urandom(2), "big")

    async def open(self) -> None:
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            _PingProtocol, remote_addr=self.address, family=family
        )
        self._transport, self._protocol = transport, protocol

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = self._protocol = None

    async def ping(self, wait: float) -> bool:
        """Send one ping; True when its reset arrives within ``wait`` seconds."""
        if self._transport is None or self._protocol is None:
            await self.open()
        assert self._transport is not None and self._protocol is not None
        mid = self._next_mid
        self._next_mid = (mid + 1) & 0xFFFF
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._protocol.waiting[mid] = fut
        try:
            self._transport.sendto(ping_datagram(mid))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await fut
                return True
            return False
        finally:
            self._protocol.waiting.pop(mid, None)

    async def answers(self, attempts: int, wait: float) -> bool:
        """True when one of ``attempts`` pings is answered (a datagram can be
        lost to a full socket buffer without the listener being dead)."""
        for _ in range(attempts):
            if await self.ping(wait):
                return True
        return False
