"""Logging set-up: human text or one JSON object per line.

Components log through ``logging.getLogger(__name__)`` and pass structured
fields with ``extra={"fields": {...}}``; the JSON formatter puts them at the top
level of the object, the text formatter appends them as ``key=value``.

Log lines cannot be forged. Much of what is logged comes from the network
(client ids, user names, topics, device ids, paths, exception messages quoting
a payload); a value holding a newline would otherwise start a line of its own
that looks like the gateway's. Both formatters therefore write every control
character of the message and of the fields as an escape (:func:`printable`),
whatever the call site did; an exception's traceback, the one multi-line part,
has every line indented, so a line that starts at the left margin is always a
record. Call sites need no escaping of their own.

:class:`EventLog` gives client events (connect, disconnect, refused login,
denied publish) a line each without letting a flood of them flood the log.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators:
# everything a terminal, ``str.splitlines`` or a log shipper may take for the
# end of a line or a cursor movement.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``str(value)`` with every control character written as an escape
    (``\\n``, ``\\x1b``, ``\\u2028``): safe to put on one log line. Backslashes
    are left as they are, so the result reads like the original."""
    s = value if type(value) is str else str(value)
    return _CONTROL.sub(_escape, s) if _CONTROL.search(s) else s


def _field(v: Any) -> Any:
    """A structured field's value, escaped when it is text."""
    if v is None or isinstance(v, bool | int | float):
        return v
    return printable(v)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            # JSON escapes control characters itself; escaping them here too
            # makes the text the same in both formats (and safe to print).
            "msg": printable(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                obj.setdefault(printable(k), _field(v))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(obj, default=str).decode()


class TextFormatter(logging.Formatter):
    """``2026-11-25T18:00:00.123Z info edgeway.gateway: message key=value``.

    One line per record; a traceback follows on lines indented by two spaces.
    """

    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"{t}.{int(record.msecs):03d}Z {record.levelname.lower():7} {record.name}: "
            f"{printable(record.getMessage())}"
        )
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{printable(k)}={_field(v)}" for k, v in fields.items())
        if record.exc_info:
            exc = self.formatException(record.exc_info)
            line += "\n" + "\n".join("  " + printable(x) for x in exc.splitlines())
        return line


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send all logs to stderr in the chosen format (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Third-party libraries are chatty at debug/info; keep them at warning.
    for noisy in ("aiohttp.access", "asyncio", "gmqtt", "aiocoap", "pymodbus", "asyncua", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# --------------------------------------------------------------------------
# rate-limited event lines


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    suppressed: int = 0

    def take(self, now: float, rate: float, burst: float) -> bool:
        """Refill at ``rate`` per second up to ``burst``; take one token if there is one."""
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class EventLog:
    """Log lines about client events, rate-limited per kind.

    Each kind (``"connect"``, ``"login_failed"``, ...) has a token bucket of
    ``burst`` lines refilled at ``per_second``: the lines of a normal day all
    appear, and a reconnect storm or a device hammering a denied topic costs
    at most ``per_second`` lines a second per kind. What was left out is said:
    the next line of that kind ends with ``(N more <kind> lines suppressed)``,
    and :meth:`report_suppressed` (called periodically) says so on its own
    when no next line comes. Kinds are fixed by the code, so the buckets are
    a handful. Not thread-safe: use it from the event loop.
    """

    __slots__ = ("_buckets", "_burst", "_clock", "_logger", "_rate", "suppressed_total")

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._rate = per_second
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self.suppressed_total = 0
        """Lines not written because of the rate limit (all kinds)."""

    def _take(self, b: _Bucket) -> bool:
        """Take one token from ``b``; False when none is left."""
        return b.take(self._clock(), self._rate, self._burst)

    def emit(self, kind: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``kind`` is over its rate;
        True when written. Arguments are formatted only when written."""
        if not self._logger.isEnabledFor(level):
            return False
        b = self._buckets.get(kind)
        if b is None:
            b = self._buckets[kind] = _Bucket(self._burst, self._clock())
        if not self._take(b):
            b.suppressed += 1
            self.suppressed_total += 1
            return False
        if b.suppressed:
            msg += " (%d more %s lines suppressed)"
            args = (*args, b.suppressed, kind)
            b.suppressed = 0
        self._logger.log(level, msg, *args, extra={"fields": {"event": kind}})
        return True

    def report_suppressed(self) -> None:
        """Say how many lines each kind left out, once its rate allows a line."""
        for kind, b in self._buckets.items():
            if b.suppressed and self._take(b):
                n, b.suppressed = b.suppressed, 0
                self._logger.warning(
                    "%d %s lines suppressed (rate limit)",
                    n,
                    kind,
                    extra={"fields": {"event": kind}},
                )


class LibraryLogLimit(logging.Filter):
    """Rate-limits a library's log lines that a remote sender can trigger.

    Attached to a library's logger (``aiocoap.server``), it lets each message
    template (the ``msg`` before formatting, so every "Ignoring unparsable
    message from %s" is one kind) through at most ``per_second`` times a
    second after a burst of ``burst``; a line that passes after some were held
    back says how many. Tracebacks are kept on the lines that pass.
    """

    def __init__(self, *, per_second: float, burst: int, kinds: int = 64) -> None:
        super().__init__()
        self._rate = per_second
        self._burst = float(burst)
        self._kinds = kinds
        """Templates tracked at most; a library has a fixed set of them, the
        bound only guards against one that formats before logging."""
        self._buckets: dict[str, _Bucket] = {}
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = time.monotonic()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self._kinds:
                self._buckets.pop(next(iter(self._buckets)))
            b = self._buckets[key] = _Bucket(self._burst, now)
        if not b.take(now, self._rate, self._burst):
            b.suppressed += 1
            self.suppressed_total += 1
            return False
        if b.suppressed and isinstance(record.args, tuple):
            record.msg = f"{record.msg} (%d more such lines suppressed)"
            record.args = (*record.args, b.suppressed)
            b.suppressed = 0
        return True
