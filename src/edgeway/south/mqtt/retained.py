"""Retained messages: the last retained PUBLISH per topic.

Configuration: none of its own (kept under ``gateway.data_dir`` by the
broker's persistence)::

    gateway: {data_dir: ./edgeway-data}

A retained PUBLISH with an empty payload clears its topic (MQTT 3.3.1.3). A
retained message with a v5 message expiry interval disappears when it
expires; expiry is checked lazily when the message would be delivered.

Retained messages are kept in a topic trie: a filter with wildcards walks
only the branches it can match (``a/+/c`` visits the children of ``a`` and one
child of each), never every stored topic. A SUBSCRIBE does not collect its
matches at once: :meth:`RetainedStore.cursor` gives a :class:`RetainedCursor`
that finds them a bounded number of trie nodes at a time, so ``#`` over
100,000 retained messages is sent in slices between other clients' work.
A plain topic is a dict lookup.

The store is bounded (``mqtt.limits.max_retained_messages`` and
``max_retained_bytes``, counted as topic + payload + :data:`RETAINED_OVERHEAD`):
:meth:`RetainedStore.set` refuses a message that does not fit, and the
broker decides what the publisher is told.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edgeway.south.mqtt.packets import Properties

RETAINED_OVERHEAD = 200
"""Bytes a retained message costs beyond its topic and payload (the Message,
its trie node and dict entries), for ``max_retained_bytes``."""


@dataclass(slots=True)
class Message:
    """An application message as the broker routes it.

    ``expires_at`` is seconds on the broker clock (``clock.py``: it does not
    jump with the wall clock and keeps its meaning across a restart); ``None``
    means it never expires.
    ``sender`` is the publishing client id (for no-local), or ``None`` for
    messages the gateway itself publishes.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties | None = None
    expires_at: float | None = None
    sender: str | None = None
    on_ack: Callable[[str], None] | None = None
    """Gateway-originated messages only (commands): called with the client id
    of each subscriber whose PUBACK/PUBCOMP completes its delivery. Not
    persisted: after a restart the command queue sends again instead."""

    def remaining_expiry(self, now: float) -> int | None:
        """Seconds left, rounded up; 0 once expired; None if it never expires."""
        if self.expires_at is None:
            return None
        left = self.expires_at - now
        if left <= 0:
            return 0
        return int(left) + (0 if left == int(left) else 1)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def retained_size(msg: Message) -> int:
    """What one retained message counts against ``max_retained_bytes``."""
    return len(msg.topic) + len(msg.payload) + RETAINED_OVERHEAD


class _Node:
    """One topic level in the trie: the retained message ending here, if any."""

    __slots__ = ("children", "msg")

    def __init__(self) -> None:
        self.children: dict[str, _Node] | None = None
        self.msg: Message | None = None


class RetainedCursor:
    """The retained messages matching one filter, found a slice at a time.

    A depth-first walk of the trie that can stop after any node and go on
    later. Each node's children are copied when the walk enters it (a C-speed
    list copy), so messages set or cleared meanwhile never break the walk: a
    message set on a topic the walk has not reached yet is found with its new
    value, one cleared is skipped. Expired messages are dropped on the way.
    """

    __slots__ = ("_levels", "_stack", "_store")

    def __init__(self, store: RetainedStore, topic_filter: str) -> None:
        self._store = store
        self._levels = topic_filter.split("/")
        # Frames: (nodes still to visit, filter level to match at each; -1:
        # everything below a ``#``).
        self._stack: list[tuple[Iterator[_Node], int]] = [(iter((store._root,)), 0)]

    @property
    def done(self) -> bool:
        return not self._stack

    def take(self, max_nodes: int) -> tuple[list[Message], int]:
        """The next matches, and the trie nodes visited (at most ``max_nodes``)."""
        out: list[Message] = []
        stack = self._stack
        levels = self._levels
        n = len(levels)
        visited = 0
        while stack and visited < max_nodes:
            nodes, i = stack[-1]
            node = next(nodes, None)
            if node is None:
                stack.pop()
                continue
            visited += 1
            if node.msg is not None and (i < 0 or i == n or (levels[i] == "#" and i > 0)):
                # Below a "#", at the filter's end, or "a/#" matching "a" itself.
                out.append(node.msg)
            children = node.children
            if not children or i == n:
                continue
            if i < 0:
                stack.append((iter(list(children.values())), -1))
                continue
            level = levels[i]
            if level == "#" or level == "+":
                if i == 0:
                    # MQTT 4.7.2: a wildcard first level does not match "$..." topics.
                    kids = [c for k, c in children.items() if not k.startswith("$")]
                else:
                    kids = list(children.values())
                stack.append((iter(kids), -1 if level == "#" else i + 1))
            else:
                child = children.get(level)
                if child is not None:
                    stack.append((iter((child,)), i + 1))
        if any(m.expires_at is not None for m in out):
            store = self._store
            now = store.clock()
            live: list[Message] = []
            for m in out:
                if m.expired(now):
                    store._drop(m.topic)
                else:
                    live.append(m)
            out = live
        return out, visited


class RetainedStore:
    """Retained messages by topic (a dict and a trie), with change tracking
    for persistence."""

    __slots__ = ("_by_topic", "_root", "bytes", "clock", "dirty", "max_bytes", "max_messages")

    def __init__(
        self, max_messages: int = 0, max_bytes: int = 0, clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        """What ``expires_at`` is measured on (the broker passes its own clock)."""
        self._by_topic: dict[str, Message] = {}
        self._root = _Node()
        self.max_messages = max_messages
        """At most this many topics retained (0: no limit)."""
        self.max_bytes = max_bytes
        """At most this many bytes (:func:`retained_size`) retained (0: no limit)."""
        self.bytes = 0
        """Sum of :func:`retained_size` over the stored messages."""
        self.dirty: dict[str, Message | None] = {}
        """Topics changed since the last save: the message, or None if cleared."""

    def __len__(self) -> int:
        return len(self._by_topic)

    def fits(self, topic: str, payload_size: int) -> bool:
        """Whether a retained message of ``payload_size`` bytes on ``topic``
        may be stored now (replacing the topic's current one, if any)."""
        old = self._by_topic.get(topic)
        if old is None:
            if self.max_messages and len(self._by_topic) >= self.max_messages:
                return False
            freed = 0
        else:
            freed = retained_size(old)
        size = len(topic) + payload_size + RETAINED_OVERHEAD
        return not self.max_bytes or self.bytes - freed + size <= self.max_bytes

    def set(self, msg: Message) -> bool:
        """Store ``msg`` as its topic's retained message, or clear the topic
        if the payload is empty. False: refused, it does not :meth:`fits`."""
        if msg.payload:
            if not self.fits(msg.topic, len(msg.payload)):
                return False
            self._store(msg)
            self.dirty[msg.topic] = msg
        elif msg.topic in self._by_topic:
            self._drop(msg.topic)
        return True

    def load(self, msg: Message) -> None:
        """Add a message read from storage (not marked dirty). Not refused
        when over the limits (they may have been lowered): nothing stored is
        thrown away, new ones are refused until it is under them again."""
        self._store(msg)

    def get(self, topic: str) -> Message | None:
        msg = self._by_topic.get(topic)
        if msg is not None and msg.expired(self.clock()):
            self._drop(topic)
            return None
        return msg

    def cursor(self, topic_filter: str) -> RetainedCursor:
        """A walk over the messages matching ``topic_filter`` (no ``$share``)."""
        return RetainedCursor(self, topic_filter)

    def matching(self, topic_filter: str) -> list[Message]:
        """Unexpired retained messages whose topic matches ``topic_filter``, all
        at once (unbounded work: the broker uses :meth:`cursor`)."""
        if "+" not in topic_filter and "#" not in topic_filter:
            msg = self.get(topic_filter)
            return [msg] if msg is not None else []
        cursor = self.cursor(topic_filter)
        out: list[Message] = []
        while not cursor.done:
            out += cursor.take(1 << 30)[0]
        return out

    def _store(self, msg: Message) -> None:
        node = self._root
        for level in msg.topic.split("/"):
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(level)
            if child is None:
                child = children[level] = _Node()
            node = child
        old = node.msg
        if old is not None:
            self.bytes -= retained_size(old)
        node.msg = msg
        self.bytes += retained_size(msg)
        self._by_topic[msg.topic] = msg

    def _drop(self, topic: str) -> None:
        self.bytes -= retained_size(self._by_topic.pop(topic))
        self.dirty[topic] = None
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic.split("/"):
            assert node.children is not None
            path.append((node, level))
            node = node.children[level]
        node.msg = None
        # Prune the levels left empty, so a churn of unique topics does not leak.
        for parent, level in reversed(path):
            assert parent.children is not None
            child = parent.children[level]
            if child.msg is not None or child.children:
                break
            del parent.children[level]
            if not parent.children:
                parent.children = None

    def __iter__(self) -> Iterator[Message]:
        return iter(list(self._by_topic.values()))
