"""The CoAP listener's duplicate detection: a bounded cache of recent requests.

RFC 7252 4.5: a confirmable request whose answer was lost is retransmitted
with the same message id, and the server must answer it with the same
response rather than act on it again. So a server remembers, for
EXCHANGE_LIFETIME (247 s), every request's (sender, message id) and the
answer it sent (the ACK carrying the response, or an empty ACK).

aiocoap keeps that as a dict of ``Message`` objects plus one ``call_later``
timer per request: 2.5 KB per confirmable request by tracemalloc, 2.9 KB of
RSS (bench/results/coap_dedup-2026-12-07.md), for 247 s, without any cap
(1,000 requests/s hold 600-700 MB; a flood from many source addresses,
which UDP lets anyone forge, grows the gateway without bound).
:class:`DuplicateCache` replaces it (``coap.py`` wires it into aiocoap's
message manager and transport):

* one ordered map of (address, port, message id) -> (arrival time, the
  answer's encoded bytes or None while it is being prepared), in arrival
  order, so expiry takes entries from the front when they are looked at
  (no timer per request);
* capped by entries (``max_entries``) and by bytes (``max_bytes``, what the
  entries hold as accounted by :data:`ENTRY_BYTES` plus the answers' own
  size); a new request over a cap evicts the oldest entries first;
* capped per sender (``max_per_address``): an IPv4 address, or an IPv6 /64
  (one host can use every address of its /64), at its cap evicts its own
  oldest entry, not everyone else's. A sender that forges many addresses
  can still fill the global caps: that evicts the oldest entries early,
  which costs at most a duplicate (below), never memory.

An entry evicted early (not expired) is counted by cap (``evicted``). A
retransmission that arrives after its entry is gone is a new request: its
telemetry is ingested again, a duplicate reading the at-least-once path
allows (readings carry ids a cloud deduplicates). A device's
retransmissions come within MAX_TRANSMIT_SPAN (45 s) of the first
transmission, so with the default caps early eviction needs more than
20,000 requests in 45 s, or 2,000 from one address.

Sans-IO: addresses and times come in as arguments; nothing here sends.
"""

from __future__ import annotations

import enum
import socket
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from edgeway.runtime.component import counter, gauge

ENTRY_BYTES = 280
"""Memory charged per remembered request besides its answer: the ordered
map's slot and link node, the 20-byte key, the (time, answer) pair, the
float, and its place in its sender's list. Measured with tracemalloc: 211
to 241 bytes per entry from 1,000 to 44,000 entries (the map's table grows
in steps); tests/south/test_coap_dedup.py checks that the accounting stays
above what is allocated."""
ADDRESS_BYTES = 240
"""Memory charged per sender (address or /64) that has entries: its key, its
list and its map slot (measured: 165 to 190 bytes)."""

_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_PORT_MID = struct.Struct("!HH")


class Seen(enum.Enum):
    """What :meth:`DuplicateCache.arrived` says about a request that has no
    answer to send again."""

    NEW = "new"
    """First seen (now remembered, or not remembered by ``remember=False``)."""
    PENDING = "pending"
    """A duplicate of a request whose answer has not been sent yet: drop it."""


class _Entry(NamedTuple):
    arrived: float
    answer: bytes | None


@dataclass(slots=True)
class DuplicateCacheStats:
    """The cache's figures (in the CoAP adapter's status and ``/metrics``)."""

    entries: int = field(
        default=0,
        metadata=gauge(
            "coap_duplicate_cache_entries", "Requests remembered for duplicate detection"
        ),
    )
    bytes: int = field(
        default=0,
        metadata=gauge("coap_duplicate_cache_bytes", "Memory accounted to the duplicate cache"),
    )
    duplicates: int = field(
        default=0,
        metadata=counter(
            "coap_duplicates", "Retransmitted requests answered again or dropped, not processed"
        ),
    )
    evicted: dict[str, int] = field(
        default_factory=lambda: {"entries": 0, "bytes": 0, "per_address": 0},
        metadata=counter(
            "coap_duplicate_cache_evictions",
            "Requests forgotten before their lifetime ended, by cap",
            label="cap",
        ),
    )


def sender_key(host: str, port: int, mid: int) -> tuple[bytes, bytes]:
    """(entry key, sender key) of a message from ``host`` (the text of an IPv6
    socket address, IPv4-mapped for IPv4), ``port`` with message id ``mid``."""
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        packed = host.encode("utf-8", "replace")
    return packed + _PORT_MID.pack(port & 0xFFFF, mid & 0xFFFF), _sender(packed)


def _sender(address: bytes) -> bytes:
    """Whose share of the cache a packed address counts against: an IPv4
    address, an IPv6 /64."""
    return address if len(address) != 16 or address.startswith(_V4_MAPPED) else address[:8]


class DuplicateCache:
    """Recent requests by (address, port, message id), bounded; see the module docstring."""

    def __init__(
        self, *, lifetime: float, max_entries: int, max_bytes: int, max_per_address: int
    ) -> None:
        self.lifetime = lifetime
        self.max_entries = max(1, max_entries)
        self.max_bytes = max_bytes
        self.max_per_address = max(1, max_per_address)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._senders: dict[bytes, list[bytes]] = {}
        """Sender -> its entries' keys, oldest first. Every removal takes the
        oldest entry of its sender (the front of the map is the oldest of
        all), the front of a list of at most ``max_per_address`` keys."""
        self.bytes = 0
        self.duplicates = 0
        self.evicted = {"entries": 0, "bytes": 0, "per_address": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def arrived(
        self, host: str, port: int, mid: int, now: float, *, remember: bool = True
    ) -> bytes | Seen:
        """A request from ``host``:``port`` with message id ``mid`` arrived at
        ``now`` (a monotonic clock): its answer's bytes to send again when it
        is a duplicate that was answered, :attr:`Seen.PENDING` for a duplicate
        not answered yet, :attr:`Seen.NEW` otherwise (then remembered, unless
        ``remember`` is False: a request answered again more cheaply than it
        is remembered)."""
        self._expire(now)
        key, sender = sender_key(host, port, mid)
        entry = self._entries.get(key)
        if entry is not None:
            self.duplicates += 1
            return Seen.PENDING if entry.answer is None else entry.answer
        if remember:
            self._add(key, sender, now)
        return Seen.NEW

    def answered(self, host: str, port: int, mid: int, answer: bytes) -> None:
        """The encoded ``answer`` (an ACK, piggybacked response or empty) went
        out for the request ``mid`` from ``host``:``port``: keep it to send
        again to a retransmission. Nothing when the request is not remembered."""
        key, _ = sender_key(host, port, mid)
        entry = self._entries.get(key)
        if entry is None or entry.answer is not None:
            return
        self._entries[key] = _Entry(entry.arrived, answer)
        self.bytes += sys.getsizeof(answer)
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            self._evict_oldest("bytes")

    def stats(self) -> DuplicateCacheStats:
        """The cache's figures now."""
        return DuplicateCacheStats(
            len(self._entries), self.bytes, self.duplicates, dict(self.evicted)
        )

    def clear(self) -> None:
        """Forget everything (the counters stay)."""
        self._entries.clear()
        self._senders.clear()
        self.bytes = 0

    def _add(self, key: bytes, sender: bytes, now: float) -> None:
        keys = self._senders.get(sender)
        if keys is None:
            keys = self._senders[sender] = []
            self.bytes += ADDRESS_BYTES
        elif len(keys) >= self.max_per_address:
            self._remove(keys[0])
            self.evicted["per_address"] += 1
            keys = self._senders.setdefault(sender, [])
            if not keys:
                self.bytes += ADDRESS_BYTES
        keys.append(key)
        self._entries[key] = _Entry(now, None)
        self.bytes += ENTRY_BYTES
        while len(self._entries) > self.max_entries:
            self._evict_oldest("entries")
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            self._evict_oldest("bytes")

    def _expire(self, now: float) -> None:
        entries = self._entries
        deadline = now - self.lifetime
        while entries:
            key = next(iter(entries))
            if entries[key].arrived > deadline:
                return
            self._remove(key)

    def _evict_oldest(self, cap: str) -> None:
        self._remove(next(iter(self._entries)))
        self.evicted[cap] += 1

    def _remove(self, key: bytes) -> None:
        """Forget ``key``, the oldest entry of its sender."""
        entry = self._entries.pop(key)
        self.bytes -= ENTRY_BYTES + (0 if entry.answer is None else sys.getsizeof(entry.answer))
        sender = _sender(key[:-4])
        keys = self._senders[sender]
        keys.remove(key)  # at the front: one comparison
        if not keys:
            del self._senders[sender]
            self.bytes -= ADDRESS_BYTES
