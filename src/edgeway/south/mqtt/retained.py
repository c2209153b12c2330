"""Retained messages: the last retained PUBLISH per topic.

Configuration: none of its own (kept under ``gateway.data_dir`` by the
broker's persistence)::

    gateway: {data_dir: ./edgeway-data}

A retained PUBLISH with an empty payload clears its topic (MQTT 3.3.1.3). A
retained message with a v5 message expiry interval disappears when it
expires; expiry is checked lazily when the message would be delivered.

Lookup by a filter without wildcards is a dict lookup; a filter with
wildcards scans the stored topics. Sites keep hundreds to a few thousand
retained topics and subscriptions with wildcards are rare next to publishes,
so a scan is cheaper to keep correct than a second trie.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edgeway.south.mqtt.packets import Properties
from edgeway.south.mqtt.topics import topic_matches


@dataclass(slots=True)
class Message:
    """An application message as the broker routes it.

    ``expires_at`` is wall-clock seconds (``time.time()``) so that it keeps
    its meaning across a restart; ``None`` means it never expires.
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


class RetainedStore:
    """Retained messages by topic, with change tracking for persistence."""

    __slots__ = ("_by_topic", "dirty")

    def __init__(self) -> None:
        self._by_topic: dict[str, Message] = {}
        self.dirty: dict[str, Message | None] = {}
        """Topics changed since the last save: the message, or None if cleared."""

    def __len__(self) -> int:
        return len(self._by_topic)

    def set(self, msg: Message) -> None:
        """Store ``msg`` as its topic's retained message, or clear the topic
        if the payload is empty."""
        if msg.payload:
            self._by_topic[msg.topic] = msg
            self.dirty[msg.topic] = msg
        elif self._by_topic.pop(msg.topic, None) is not None:
            self.dirty[msg.topic] = None

    def load(self, msg: Message) -> None:
        """Add a message read from storage (not marked dirty)."""
        self._by_topic[msg.topic] = msg

    def get(self, topic: str) -> Message | None:
        msg = self._by_topic.get(topic)
        if msg is not None and msg.expired(time.time()):
            self._drop(topic)
            return None
        return msg

    def matching(self, topic_filter: str) -> list[Message]:
        """Unexpired retained messages whose topic matches ``topic_filter``."""
        if "+" not in topic_filter and "#" not in topic_filter:
            msg = self.get(topic_filter)
            return [msg] if msg is not None else []
        now = time.time()
        out: list[Message] = []
        expired: list[str] = []
        for topic, msg in self._by_topic.items():
            if topic_matches(topic_filter, topic):
                if msg.expired(now):
                    expired.append(topic)
                else:
                    out.append(msg)
        for topic in expired:
            self._drop(topic)
        return out

    def _drop(self, topic: str) -> None:
        del self._by_topic[topic]
        self.dirty[topic] = None

    def __iter__(self) -> Iterator[Message]:
        return iter(list(self._by_topic.values()))
