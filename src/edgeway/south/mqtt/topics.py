"""The subscription tree: which sessions want a message published on a topic.

Configuration: none of its own; the broker (``mqtt:`` section) owns it::

    mqtt:
      limits: {max_topic_levels: 32}

A trie keyed by topic level. ``+`` and ``#`` are children like any other
level, so matching a topic walks at most three branches per level. Shared
subscriptions (``$share/{group}/{filter}``) sit at the node of their filter, as
one :class:`SharedGroup` per group name; a message matching the filter goes to
exactly one member of each group.

The rule of MQTT 4.7.2: a topic starting with ``$`` is not matched by a filter
starting with a wildcard (``#`` or ``+/...``).

Matches are cached per topic (telemetry topics repeat): the cache is dropped
whole on any (un)subscribe, which is rare next to publishes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

MATCH_CACHE_MAX = 50_000
"""Topics whose matches are cached. Each entry is a few hundred bytes; 50,000
covers 10,000 devices with a handful of topics each. Beyond it the cache is
cleared, not evicted one by one (cheaper, and refills in one pass)."""

CACHED_TOPIC_MAX = 512
"""Longest topic (characters) kept as a key of the broker's per-topic caches
(these matches, telemetry patterns, a connection's ACL decisions). Device
topics are tens of characters; a topic may be 65,535, and without this bound
a client publishing to many distinct long topics could make the caches hold
their maximum count of them (this one: 3 GiB). Longer topics are worked out
each time."""

SHARE_PREFIX = "$share/"


@dataclass(slots=True)
class SubEntry:
    """One subscription of one session, with its options."""

    topic_filter: str
    """The filter as the client sent it (``$share/g/...`` included)."""
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_id: int | None = None
    share_group: str | None = None


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``"$share/g/a/b"`` -> ``("g", "a/b")``; other filters -> ``(None, filter)``.

    The filter is assumed valid (the codec validated it).
    """
    if topic_filter.startswith(SHARE_PREFIX):
        group, _, real = topic_filter[len(SHARE_PREFIX) :].partition("/")
        return group, real
    return None, topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` (a topic name) matches ``topic_filter`` (no ``$share``)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


@dataclass(slots=True)
class SharedGroup(Generic[K]):
    """Members of one ``$share/{group}/{filter}``; picks one member per message."""

    name: str
    topic_filter: str
    members: dict[K, SubEntry] = field(default_factory=dict)
    _next: int = 0

    def pick(self, is_online: Callable[[K], bool]) -> tuple[K, SubEntry] | None:
        """Round-robin over online members; if none is online, over all
        members (a persistent session queues it), so the message is not lost."""
        items = list(self.members.items())
        n = len(items)
        if n == 0:
            return None
        start = self._next % n
        for k in range(n):
            key, entry = items[(start + k) % n]
            if is_online(key):
                self._next = start + k + 1
                return key, entry
        self._next = start + 1
        return items[start]


class _Node(Generic[K]):
    __slots__ = ("children", "shared", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.subs: dict[K, SubEntry] | None = None
        self.shared: dict[str, SharedGroup[K]] | None = None

    def empty(self) -> bool:
        return not self.children and not self.subs and not self.shared


@dataclass(slots=True)
class Matches(Generic[K]):
    """The result of matching one topic.

    ``direct`` groups the matching non-shared subscriptions by subscriber (a
    subscriber with overlapping filters appears once, with all its entries);
    ``shared`` lists the matching share groups, each to be given the message
    once.
    """

    direct: list[tuple[K, tuple[SubEntry, ...]]]
    shared: list[SharedGroup[K]]


class SubscriptionTree(Generic[K]):
    """Subscriptions of all sessions, matched against topic names."""

    __slots__ = ("_cache", "_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[K] = _Node()
        self._cache: dict[str, Matches[K]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def subscribe(self, key: K, entry: SubEntry) -> bool:
        """Add or replace ``key``'s subscription to ``entry.topic_filter``.

        Returns True if it existed before (v5 retain handling 1 needs that).
        """
        group, real = split_shared(entry.topic_filter)
        entry.share_group = group
        node = self._root
        for level in real.split("/"):
            nxt = node.children.get(level)
            if nxt is None:
                nxt = node.children[level] = _Node()
            node = nxt
        self._cache.clear()
        if group is None:
            if node.subs is None:
                node.subs = {}
            existed = key in node.subs
            node.subs[key] = entry
        else:
            if node.shared is None:
                node.shared = {}
            sg = node.shared.get(group)
            if sg is None:
                sg = node.shared[group] = SharedGroup(group, real)
            existed = key in sg.members
            sg.members[key] = entry
        if not existed:
            self._count += 1
        return existed

    def unsubscribe(self, key: K, topic_filter: str) -> bool:
        """Remove ``key``'s subscription; returns False if there was none."""
        group, real = split_shared(topic_filter)
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        for level in real.split("/"):
            nxt = node.children.get(level)
            if nxt is None:
                return False
            path.append((node, level))
            node = nxt
        if group is None:
            if not node.subs or key not in node.subs:
                return False
            del node.subs[key]
        else:
            sg = node.shared.get(group) if node.shared else None
            if sg is None or key not in sg.members:
                return False
            del sg.members[key]
            if not sg.members:
                assert node.shared is not None
                del node.shared[group]
        self._count -= 1
        self._cache.clear()
        # Prune nodes left empty so a churn of unique filters does not leak.
        for parent, level in reversed(path):
            child = parent.children[level]
            if not child.empty():
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> Matches[K]:
        """Subscriptions matching ``topic`` (cached until the next change)."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        by_key: dict[K, list[SubEntry]] = {}
        shared: list[SharedGroup[K]] = []
        levels = topic.split("/")
        dollar = topic.startswith("$")
        self._walk(self._root, levels, 0, dollar, by_key, shared)
        result = Matches([(k, tuple(v)) for k, v in by_key.items()], shared)
        if len(topic) > CACHED_TOPIC_MAX:
            return result
        if len(self._cache) >= MATCH_CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _walk(
        self,
        node: _Node[K],
        levels: list[str],
        i: int,
        dollar: bool,
        by_key: dict[K, list[SubEntry]],
        shared: list[SharedGroup[K]],
    ) -> None:
        wild_ok = not (dollar and i == 0)
        if wild_ok:
            multi = node.children.get("#")
            if multi is not None:
                self._collect(multi, by_key, shared)
        if i == len(levels):
            self._collect(node, by_key, shared)
            return
        if wild_ok:
            single = node.children.get("+")
            if single is not None:
                self._walk(single, levels, i + 1, dollar, by_key, shared)
        exact = node.children.get(levels[i])
        if exact is not None:
            self._walk(exact, levels, i + 1, dollar, by_key, shared)

    @staticmethod
    def _collect(
        node: _Node[K], by_key: dict[K, list[SubEntry]], shared: list[SharedGroup[K]]
    ) -> None:
        if node.subs:
            for k, e in node.subs.items():
                lst = by_key.get(k)
                if lst is None:
                    by_key[k] = [e]
                else:
                    lst.append(e)
        if node.shared:
            shared.extend(node.shared.values())

    def entries(self) -> Iterator[tuple[K, SubEntry]]:
        """Every (subscriber, subscription) pair (for diagnostics and tests)."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.subs:
                yield from node.subs.items()
            if node.shared:
                for sg in node.shared.values():
                    yield from sg.members.items()
            stack.extend(node.children.values())
