"""LoginBackoff: lockout growth, forgetting, distinct names, bounded memory."""

from __future__ import annotations

import pytest

from edgeway.devices.backoff import MEMORY, LoginBackoff, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lockout_doubles_and_is_forgotten() -> None:
    clock = Clock()
    b = LoginBackoff(max_failures=3, clock=clock)
    assert [b.failed("k") for _ in range(3)] == [0.0, 0.0, 1.0]
    assert 0.9 < b.locked_for("k") <= 1.0
    assert b.locked_for("other") == 0.0
    assert b.failed("k") == 2.0
    clock.now += 2.01
    assert b.locked_for("k") == 0.0
    for _ in range(20):
        b.failed("k")
    assert b.locked_for("k") == pytest.approx(60.0)  # capped
    clock.now += MEMORY + 61
    assert b.locked_for("k") == 0.0 and len(b) == 0
    b.failed("k")
    b.succeeded("k")
    assert len(b) == 0


def test_only_distinct_names_count_under_an_address() -> None:
    b = LoginBackoff(max_failures=3, clock=Clock())
    for _ in range(50):  # one device retrying one wrong password
        assert b.failed("10.0.0.1", "sensor-1") == 0.0
    assert b.locked_for("10.0.0.1") == 0.0
    b.failed("10.0.0.1", "sensor-2")
    assert b.failed("10.0.0.1", "sensor-3") == 1.0  # a spray over names
    assert b.locked_for("10.0.0.1") > 0


def test_keys_are_bounded_oldest_evicted() -> None:
    b = LoginBackoff(max_failures=1, max_keys=100, clock=Clock())
    for i in range(1000):
        b.failed(f"user-{i}", f"name-{i}")
    assert len(b) == 100
    assert b.locked_for("user-999") > 0 and b.locked_for("user-0") == 0.0


def test_address_key() -> None:
    assert address_key("192.0.2.7:50000") == "192.0.2.7"
    assert address_key("::1:50000") == "::1"
    assert address_key("") == ""
