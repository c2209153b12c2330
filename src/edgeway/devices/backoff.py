"""Failed-login backoff, per key (a user name, a device id, a source address).

Example::

    by_name = LoginBackoff(max_failures=5)
    if (wait := by_name.locked_for("sensor-7")) > 0:
        refuse(f"retry in {wait:.0f} s")       # no hash is checked
    elif check_password(...):
        by_name.succeeded("sensor-7")
    else:
        by_name.failed("sensor-7")

After ``max_failures`` consecutive failures a key is locked for ``base``
seconds, doubling with each further failure up to ``cap``; a key whose last
failure is older than ``memory`` seconds is forgotten. At most ``max_keys``
keys are tracked, oldest failure evicted first, because an attacker chooses
the keys (user names, and source addresses with IPv6).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LoginBackoff", "RequestBackoff", "address_key"]

BASE = 1.0
"""First lockout (s). Short on purpose: a device whose password was rotated
must get back in soon, while 2**n growth makes online guessing useless
(hours per few dozen tries)."""
CAP = 60.0
"""Longest lockout (s)."""
MEMORY = 900.0
"""Seconds after the last failure when a key's failure count is forgotten."""
MAX_KEYS = 10_000
"""Keys tracked. Evicting the oldest costs an attacker one failed login per
key pushed in, so pushing a target out takes ~10,000 failures, during which
the target stays locked; ~100 bytes a key, ~1 MiB in all."""


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0
    seen: set[int] | None = None
    """Hashes of the distinct names counted (see :meth:`LoginBackoff.failed`)."""


class LoginBackoff:
    """Consecutive failures per key and the lockout they earn (bounded)."""

    __slots__ = ("_base", "_cap", "_clock", "_entries", "_max_failures", "_max_keys", "_memory")

    def __init__(
        self,
        *,
        max_failures: int,
        base: float = BASE,
        cap: float = CAP,
        memory: float = MEMORY,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_failures = max_failures
        self._base = base
        self._cap = cap
        self._memory = memory
        self._max_keys = max_keys
        self._clock = clock
        self._entries: dict[str, _Failures] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def locked_for(self, key: str) -> float:
        """Seconds ``key`` stays locked (0: not locked)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        now = self._clock()
        if now - entry.last > self._memory:
            del self._entries[key]
            return 0.0
        return max(0.0, entry.locked_until - now)

    def failed(self, key: str, name: str | None = None) -> float:
        """Record a failure; return the lockout it starts (0: none yet).

        With ``name`` (the user name tried from address ``key``), only a name
        not seen failing under this key before counts: a spray over many
        names locks the address, while one misconfigured device retrying the
        same wrong password every few seconds does not lock out every other
        device behind its NAT address (its own name is locked per user)."""
        now = self._clock()
        entry = self._entries.pop(key, None)
        if entry is None or now - entry.last > self._memory:
            entry = _Failures()
        if name is not None:
            seen = entry.seen
            if seen is None:
                seen = entry.seen = set()
            h = hash(name)
            if h in seen:
                entry.last = now
                self._entries[key] = entry
                return 0.0
            if len(seen) < self._max_failures:  # bounded: enough to decide
                seen.add(h)
        entry.count += 1
        entry.last = now
        lock = 0.0
        if entry.count >= self._max_failures:
            lock = min(self._cap, self._base * 2 ** (entry.count - self._max_failures))
            entry.locked_until = now + lock
        # Re-inserted last, so the dict's order is oldest failure first.
        self._entries[key] = entry
        while len(self._entries) > self._max_keys:
            del self._entries[next(iter(self._entries))]
        return lock

    def succeeded(self, key: str) -> None:
        """A login under ``key`` succeeded: its failures are forgotten."""
        self._entries.pop(key, None)


def address_key(remote: str) -> str:
    """The host part of ``host:port`` (IPv6 too), the key for per-address
    limits: a client's source port changes with every connection."""
    host, sep, _port = remote.rpartition(":")
    return host if sep else remote


REQUEST_MAX_FAILURES = 5
"""Wrong tokens for one device id (HTTP, CoAP) before it is locked out, as
for MQTT logins (``config_auth.MAX_FAILURES``); and distinct device ids
failing from one address before the address is."""


class RequestBackoff:
    """Failed-token backoff of a connection-less listener (HTTP, CoAP): per
    device id, and per source address counting distinct device ids (a spray
    over many ids locks the address; one device retrying a stale token locks
    only itself, not its NAT neighbours). Bounded like :class:`LoginBackoff`.
    """

    __slots__ = ("by_address", "by_device", "locked_out")

    def __init__(self, *, max_failures: int = REQUEST_MAX_FAILURES, **kw: Any) -> None:
        self.by_device = LoginBackoff(max_failures=max_failures, **kw)
        self.by_address = LoginBackoff(max_failures=max_failures, **kw)
        self.locked_out = 0
        """Requests refused because a lockout was in force (not checked)."""

    def locked_for(self, device_id: str, remote: str) -> float:
        """Seconds the request must wait (0: check its token)."""
        wait = max(
            self.by_device.locked_for(device_id), self.by_address.locked_for(address_key(remote))
        )
        if wait > 0:
            self.locked_out += 1
        return wait

    def failed(self, device_id: str, remote: str) -> None:
        self.by_device.failed(device_id)
        self.by_address.failed(address_key(remote), device_id)

    def succeeded(self, device_id: str) -> None:
        self.by_device.succeeded(device_id)
