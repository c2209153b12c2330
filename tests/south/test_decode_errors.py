"""The decode-error counter shared by the south adapters: exact counts per
device and reason, a bounded key set, and a log line per reason at most every
LOG_INTERVAL seconds (so undecodable payloads are visible, never a flood)."""

from __future__ import annotations

import pytest

from edgeway.south import decode_errors
from edgeway.south.base import AdapterState
from edgeway.south.decode_errors import DecodeErrorCounter


def test_counts_are_exact_and_the_log_is_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("edgeway.south.decode_errors.time.monotonic", lambda: clock[0])
    counter, state = DecodeErrorCounter(), AdapterState()
    with caplog.at_level("WARNING", logger="edgeway.south.decode_errors"):
        for _ in range(50):
            counter.record(state, "d1", "invalid_json", "line 1")
        counter.record(state, "d2", "no_metrics")  # another reason: its own line
        clock[0] += decode_errors.LOG_INTERVAL
        counter.record(state, "d2", "invalid_json")
    assert counter.counts == {
        ("d1", "invalid_json"): 50,
        ("d2", "no_metrics"): 1,
        ("d2", "invalid_json"): 1,
    }
    assert counter.by_reason() == {"invalid_json": 51, "no_metrics": 1}
    assert (state.errors, state.last_error) == (52, "d2: invalid_json")
    assert [r.getMessage() for r in caplog.records] == [
        "payload refused from d1: invalid_json: line 1 (1 so far with this reason)",
        "payload refused from d2: no_metrics (1 so far with this reason)",
        "payload refused from d2: invalid_json (51 so far with this reason)",
    ]


def test_distinct_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_errors, "MAX_KEYS", 3)
    counter, state = DecodeErrorCounter(), AdapterState()
    for i in range(10):
        counter.record(state, f"dev-{i}", "bad")
    assert len(counter.counts) == 4  # three devices, then everyone else under "*"
    assert counter.counts[("*", "bad")] == 7
