"""south.base.Backoff: capped exponential backoff with full jitter, never giving up
(issue 5: every adapter that holds a connection reconnects forever)."""

from __future__ import annotations

import random

from edgeway.south.base import Backoff


def test_delays_double_up_to_the_cap_with_full_jitter() -> None:
    random.seed(5)
    b = Backoff(initial=0.5, maximum=30.0)
    caps = [min(30.0, 0.5 * 2**n) for n in range(12)]
    assert caps[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    for cap in caps:
        assert 0.0 <= b.next_delay() <= cap
    # Forever: after many failures the delay stays capped, never stops or grows.
    late = [b.next_delay() for _ in range(2000)]
    assert max(late) <= 30.0
    assert max(late) > 25.0 and min(late) < 5.0  # spread over [0, cap]: full jitter
    b.reset()
    assert b.next_delay() <= 0.5
    assert b.attempt == 1


def test_forever_means_forever() -> None:
    # A peer down for days: thousands of attempts (2**1024 overflows a float,
    # which once made next_delay raise after ~4 h of a device being offline).
    b = Backoff(initial=0.5, maximum=30.0)
    for _ in range(5000):
        assert 0.0 <= b.next_delay() <= 30.0
    assert b.attempt == 5000
