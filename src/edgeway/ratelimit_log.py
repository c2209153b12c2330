"""Rate-limited logging: one line per kind of error per interval, not one per failure.

A failure that repeats (a full disk refusing every commit, a cloud that is
down for a day) must not write a line, let alone a traceback, every time it
happens: the log shares the disk with the outbox. :class:`RateLimitedLog`
writes the first occurrence of a *key* (with its traceback, if one is given),
then at most one line per ``interval`` for that key, each saying how many
were held back since the last one::

    limited = RateLimitedLog(log, interval=60.0)
    limited.log(logging.ERROR, "commit", "outbox commit failed: %s", err, exc_info=err)
    ...
    limited.reset("commit")  # it works again: the next failure is logged at once
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_KEYS = 1024
"""Keys remembered at most. Callers use a few fixed keys (a sink name, an
operation); the cap only bounds memory if one ever derives keys from input.
The least recently logged key is forgotten first (its next line is logged
at once, as a first occurrence)."""


@dataclass(slots=True)
class _KeyState:
    last: float
    """Clock time of the last line written for this key."""
    suppressed: int = 0
    """Occurrences held back since then."""


class RateLimitedLog:
    """A logger wrapper that writes at most one line per key per ``interval`` seconds.

    The first line of a key carries the traceback (``exc_info``) if given; the
    lines after it never do, and say how many occurrences were suppressed.
    Not thread-safe: use one per thread (or call it from one thread).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError("interval must be >= 0")
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def log(
        self,
        level: int,
        key: str,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval``
        ago (then count it); True if a line was written."""
        now = self._clock()
        st = self._keys.get(key)
        if st is not None and now - st.last < self.interval:
            st.suppressed += 1
            return False
        if st is None:
            if len(self._keys) >= MAX_KEYS:
                del self._keys[next(iter(self._keys))]
            self._keys[key] = _KeyState(now)
        else:
            if st.suppressed:
                msg += " (%d more like this in the last %.0f s)"
                args = (*args, st.suppressed, now - st.last)
                st.suppressed = 0
            exc_info = None  # the first line had the traceback
            st.last = now
            # Most recently logged last: the eviction order above.
            self._keys[key] = self._keys.pop(key)
        self.logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
        return True

    def active(self, key: str) -> bool:
        """``key`` was logged and not :meth:`reset` since."""
        return key in self._keys

    def suppressed(self, key: str) -> int:
        """Occurrences of ``key`` held back since its last line."""
        st = self._keys.get(key)
        return st.suppressed if st is not None else 0

    def reset(self, key: str) -> int:
        """The condition behind ``key`` is over: forget it (its next occurrence is
        logged at once, with its traceback). Returns the occurrences still held
        back, for a closing line such as "delivering again after N failures"."""
        st = self._keys.pop(key, None)
        return st.suppressed if st is not None else 0
