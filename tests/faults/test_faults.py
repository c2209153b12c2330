"""The fault-injection suite, CI-sized (bench/faults.py runs the long
versions). Each scenario ends with exact accounting: sent, acknowledged,
refused, delivered, duplicates, order inversions per device, and the outbox's
conservation law (see tests/faults/harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import scenarios


def test_sigkill_loop(tmp_path: Path) -> None:
    report = scenarios.sigkill_loop(tmp_path, kills=3)
    report.check()
    assert report.gateway_lives == 4


def test_sigkill_loop_sending_only_what_is_stored(tmp_path: Path) -> None:
    """``forward_early: false``: sinks send only committed readings, so the
    ids at the cloud are exactly the readings the outbox accepted."""
    report = scenarios.sigkill_loop(
        tmp_path, kills=3, outbox="{durability: fsync, forward_early: false}"
    )
    assert not report.forward_early
    report.check()
    assert report.gateway_lives == 4


def test_sink_outage(tmp_path: Path) -> None:
    scenarios.cloud_away(tmp_path, "down").check()


def test_flapping_sink(tmp_path: Path) -> None:
    scenarios.flapping_sink(tmp_path, cycles=8).check()


def test_sink_accepts_and_never_answers(tmp_path: Path) -> None:
    report, hung = scenarios.sink_never_answers(tmp_path, seconds=2.5)
    report.check()
    assert hung >= 2, "the sink never retried a request that got no answer"


def test_slow_sink(tmp_path: Path) -> None:
    scenarios.slow_sink(tmp_path, acks=300, delay=0.3).check()


def test_failing_sink(tmp_path: Path) -> None:
    scenarios.cloud_away(tmp_path, "error", acks_during=150).check()


def test_sigstop_sigcont(tmp_path: Path) -> None:
    report = scenarios.sigstop_sigcont(tmp_path, seconds=3.0)
    report.check()
    assert report.resent > 0, "no device went without a PUBACK: the gateway was not frozen"


def test_half_open_sink_connections(tmp_path: Path) -> None:
    scenarios.half_open(tmp_path, "sink", seconds=2.0).check()


def test_half_open_device_connections(tmp_path: Path) -> None:
    scenarios.half_open(tmp_path, "devices", seconds=2.0).check()


def test_timestamps_far_in_the_past_or_future(tmp_path: Path) -> None:
    report = scenarios.odd_timestamps(tmp_path)
    report.check()
    assert report.refused >= 10 and report.notes["refusal codes"] == [0x99]


@pytest.mark.parametrize("persistence", [True, False], ids=["persistent", "volatile"])
def test_cloud_broker_restarted(tmp_path: Path, persistence: bool) -> None:
    scenarios.cloud_broker_restart(tmp_path, persistence, restarts=2).check()


def test_disk_full(tmp_path: Path) -> None:
    with scenarios.small_disk(tmp_path) as disk:
        if disk is None:
            pytest.skip("mounting a tmpfs needs root (and the permission to mount)")
        report = scenarios.disk_full(tmp_path, disk)
    report.check()
    assert report.refused >= 20 and report.notes["refusal codes"] == [0x97]
