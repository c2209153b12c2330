"""Log formatting: untrusted text cannot forge lines; event lines are rate-limited."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from edgeway.logs import EventLog, JsonFormatter, TextFormatter, printable

FORGED = "dev-1\n2026-12-06T20:00:00.000Z info    edgeway.gateway: admin password reset"


@pytest.fixture
def text_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("edgeway.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_printable_escapes_every_line_break_and_control() -> None:
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("\x1b[31mred\x00") == "\\x1b[31mred\\x00"
    assert printable("x\u2028y\u2029z\x85") == "x\\u2028y\\u2029z\\x85"
    assert printable("plain/topic é ✓") == "plain/topic é ✓"
    assert "\n" not in printable(ValueError("two\nlines"))
    for c in map(chr, range(0x3000)):
        assert len(printable(f"a{c}b").splitlines()) == 1, hex(ord(c))


def test_text_line_cannot_be_forged_by_args_fields_or_exceptions(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = text_log
    logger.info("client %s connected", FORGED)
    logger.info(f"built by an f-string: {FORGED}")
    logger.info("fields", extra={"fields": {"client": FORGED, FORGED: 1}})
    try:
        raise ValueError(FORGED)
    except ValueError:
        logger.exception("failed for %s", "x")
    lines = out.getvalue().splitlines()
    records = [line for line in lines if not line.startswith("  ")]
    assert len(records) == 4, lines
    assert all(line.startswith("20") and " edgeway.test_logs: " in line for line in records)
    assert not any(line.startswith("2026-12-06T20:00:00.000Z") for line in lines)
    assert "dev-1\\n2026" in records[0]
    # The traceback's lines are all indented: none can pass for a record.
    assert "  ValueError: dev-1" in lines
    assert "  2026-12-06T20:00:00.000Z info    edgeway.gateway: admin password reset" in lines


def test_json_msg_and_fields_are_escaped_and_one_line() -> None:
    record = logging.LogRecord("edgeway.x", logging.INFO, __file__, 1, "id %s", (FORGED,), None)
    record.fields = {"client": FORGED, "n": 3}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = orjson.loads(line)
    assert obj["msg"] == "id " + FORGED.replace("\n", "\\n")
    assert obj["client"] == FORGED.replace("\n", "\\n")
    assert obj["n"] == 3


def test_event_log_token_bucket_says_what_it_suppressed(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = text_log
    now = [100.0]
    events = EventLog(logger, per_second=1.0, burst=3, clock=lambda: now[0])
    written = [events.emit("connect", logging.INFO, "client %s connected", i) for i in range(5)]
    assert written == [True, True, True, False, False]
    assert events.suppressed_total == 2
    # Another kind has its own bucket.
    assert events.emit("login_failed", logging.WARNING, "refused %s", "x")
    now[0] += 1.0  # one token back
    assert events.emit("connect", logging.INFO, "client %s connected", 5)
    lines = out.getvalue().splitlines()
    assert lines[-1].endswith("client 5 connected (2 more connect lines suppressed) event=connect")
    # A flood that stops is reported by the periodic call, once tokens allow.
    assert not events.emit("connect", logging.INFO, "client %s connected", 6)
    events.report_suppressed()
    assert "suppressed (rate limit)" not in out.getvalue()
    now[0] += 1.0
    events.report_suppressed()
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith("1 connect lines suppressed (rate limit) event=connect")
    )
    events.report_suppressed()
    assert out.getvalue().count("suppressed (rate limit)") == 1


def test_event_log_skips_disabled_levels_without_spending_tokens(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = text_log
    logger.setLevel(logging.WARNING)
    events = EventLog(logger, per_second=1.0, burst=1, clock=lambda: 0.0)
    assert not events.emit("connect", logging.INFO, "hidden")
    assert events.emit("connect", logging.WARNING, "shown")
    assert events.suppressed_total == 0
    assert out.getvalue().count("\n") == 1


def test_library_log_limit_passes_a_burst_per_template_then_says_what_it_held(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    from edgeway.logs import LibraryLogLimit

    logger, out = text_log
    limit = LibraryLogLimit(per_second=0.0001, burst=2)
    logger.addFilter(limit)
    try:
        for i in range(500):
            logger.warning("Ignoring unparsable message from %s", f"10.0.0.{i % 250}")
            logger.warning("another message %d", i)
        lines = out.getvalue().splitlines()
        assert len(lines) == 4  # two of each template
        assert limit.suppressed_total == 996
        limit._buckets["another message %d"].tokens = 1.0  # as if time had passed
        logger.warning("another message %d", 7)
        assert (
            out.getvalue()
            .splitlines()[-1]
            .endswith("another message 7 (498 more such lines suppressed)")
        )
    finally:
        logger.removeFilter(limit)
