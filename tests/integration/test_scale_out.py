"""Scale-out (issue 19, section 1): three gateways in MQTT client mode on one
shared subscription of a real Mosquitto, each with its own data directory,
while one of them is killed with SIGKILL every few seconds and restarted:
nothing the broker acknowledged to the publisher is lost at the cloud.

The rig is bench/scale_out.py (its long version: 2,000 messages/s for 90 s,
a kill every 30 s); this is the CI-sized run of the same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import scale_out  # noqa: E402


def test_three_gateways_one_killed_every_few_seconds_lose_nothing() -> None:
    r = scale_out.kills(gateways=3, rate=800, seconds=12, kill_every=4, restart_after=0.5)
    assert r["kills"] >= 2, r
    assert r["acked_by_broker"] == r["published"] >= 9000, r
    assert r["lost"] == 0, r
    assert r["delivered_unique"] == r["published"], r
    # Duplicates happen (a sink batch sent again, or a message the broker
    # redelivered after the gateway stored it but died before its PUBACK);
    # they are counted, never silent, and since the payloads carry the
    # device's time, a redelivered message keeps its record ids on whichever
    # gateway stores it again (edgeway.record_ids): a cloud dropping repeated
    # ids drops every duplicate.
    assert r["device_time"] is True
    assert r["duplicates_same_id"] <= 0.05 * r["published"], r
    assert r["duplicates_new_id"] == 0, r


def test_load_is_shared_by_every_gateway() -> None:
    r = scale_out.throughput(gateways=3, seconds=3, warmup=2)
    assert r["records_per_s"] > 0, r
    assert all(n > 0 for n in r["shares"].values()), r


def test_nats_cluster_partitioned_gateways_survive_a_node_kill() -> None:
    """A 3-node NATS cluster (MQTT 3.1.1 backed by JetStream) has no shared
    subscriptions: each gateway takes its own partition of the devices
    (``devices/p<N>/{device_id}/telemetry``) on its own node. The node of the
    third gateway is killed with SIGKILL mid-run and restarted.

    Per-device order holds, except for the messages that were in flight on
    the killed node's connection: NATS redelivers those after its MQTT
    ack_wait (30 s by default), behind later ones (0 or hundreds, depending
    on what was in flight at the kill), and for those the cluster itself
    put out of order (a plain QoS 0 subscriber on a surviving node saw them
    inverted too, or the broker acknowledged the late message to the
    publisher after the later one: it stored them in that order). CI once saw
    92 prompt inversions on a loaded machine, never reproduced here. The test
    checks that every inversion is one of these, none made by a gateway."""
    r = scale_out.nats_partitioned(
        gateways=3, rate=400, seconds=10, kill_node_at=3, restart_after=3
    )
    assert r["kills"] == 1, r
    assert r["acked_by_broker"] == r["published"] >= 3500, r
    assert r["lost"] == 0, r
    # One gateway per partition and device: per-device order holds but for
    # the late redeliveries.
    assert r["inversions_unexplained"] == 0, (r["unexplained_examples"], r)
    assert r["duplicates_new_id"] == 0, r
