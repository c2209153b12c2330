"""Subscription tree: matching with +, #, the $-rule, overlaps, shared groups."""

from __future__ import annotations

import pytest

from edgeway.south.mqtt.topics import SubEntry, SubscriptionTree, split_shared, topic_matches


@pytest.mark.parametrize(
    ("flt", "topic", "want"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a/", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$SYS/+", "$SYS/x", True),
        ("+/+", "/x", True),
        ("+", "/x", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matches(flt: str, topic: str, want: bool) -> None:
    assert topic_matches(flt, topic) is want
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.subscribe("c", SubEntry(flt))
    got = [k for k, _ in tree.match(topic).direct]
    assert (got == ["c"]) is want


def test_overlapping_subscriptions_grouped_per_subscriber() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.subscribe("c1", SubEntry("a/+", qos=0, subscription_id=1))
    tree.subscribe("c1", SubEntry("a/#", qos=2, subscription_id=2))
    tree.subscribe("c2", SubEntry("a/b", qos=1))
    m = tree.match("a/b")
    by = dict(m.direct)
    assert sorted(by) == ["c1", "c2"]
    assert sorted(e.subscription_id or 0 for e in by["c1"]) == [1, 2]
    assert len(tree) == 3


def test_resubscribe_replaces_and_reports_existing() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    assert tree.subscribe("c", SubEntry("x/y", qos=0)) is False
    assert tree.subscribe("c", SubEntry("x/y", qos=1)) is True
    ((_k, entries),) = tree.match("x/y").direct
    assert entries[0].qos == 1
    assert len(tree) == 1


def test_unsubscribe_invalidates_cache_and_prunes() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.subscribe("c", SubEntry("a/b/c"))
    assert tree.match("a/b/c").direct
    assert tree.unsubscribe("c", "a/b/c") is True
    assert tree.match("a/b/c").direct == []
    assert tree.unsubscribe("c", "a/b/c") is False
    assert tree._root.children == {}
    assert len(tree) == 0


def test_shared_groups_round_robin_and_exactly_one() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.subscribe("a", SubEntry("$share/g/t/+"))
    tree.subscribe("b", SubEntry("$share/g/t/+"))
    tree.subscribe("c", SubEntry("$share/h/t/x"))
    m = tree.match("t/x")
    assert m.direct == []
    assert sorted(g.name for g in m.shared) == ["g", "h"]
    g = next(g for g in m.shared if g.name == "g")
    picks = [g.pick(lambda k: True) for _ in range(4)]
    assert [p[0] for p in picks if p] == ["a", "b", "a", "b"]
    # Offline members are skipped while someone is online.
    picks = [g.pick(lambda k: k == "b") for _ in range(3)]
    assert [p[0] for p in picks if p] == ["b", "b", "b"]
    # Nobody online: still exactly one member (it queues the message).
    p = g.pick(lambda k: False)
    assert p is not None
    tree.unsubscribe("a", "$share/g/t/+")
    tree.unsubscribe("b", "$share/g/t/+")
    assert [s.name for s in tree.match("t/x").shared] == ["h"]


def test_split_shared() -> None:
    assert split_shared("$share/g/a/b") == ("g", "a/b")
    assert split_shared("a/b") == (None, "a/b")


def test_shared_respects_dollar_rule() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.subscribe("a", SubEntry("$share/g/#"))
    assert tree.match("$SYS/x").shared == []
    assert len(tree.match("x").shared) == 1
