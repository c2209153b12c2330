"""Session state of one MQTT client id, kept apart from any socket (sans-IO).

Configuration (the limits that bound a session)::

    mqtt:
      limits:
        receive_maximum: 64          # our inflight window towards a client
        max_queued_messages: 10000   # per session, beyond it the oldest is dropped
        max_queued_bytes: 8MiB       # the same, counted in bytes
        max_session_expiry: 7d

A session outlives its connection when it is persistent (3.1.1
``clean_session=0``, v5 session expiry interval > 0). It holds the
subscriptions, the outbound messages in flight (sent, not yet acknowledged)
and the queue of messages waiting for the window or for the client to come
back, plus the inbound QoS 2 packet ids between PUBLISH and PUBREL (exactly
once: a re-sent PUBLISH with such an id is acknowledged, not delivered again).

A clean, QoS-0-only client's session is one small object with empty
containers created lazily where it matters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeway.south.mqtt.packets import Will
from edgeway.south.mqtt.retained import Message, RetainedCursor
from edgeway.south.mqtt.topics import SubEntry

if TYPE_CHECKING:
    from edgeway.south.mqtt.connection import MqttConnection


NEVER_EXPIRES = 0xFFFFFFFF
"""v5 session expiry interval meaning "never" (MQTT 3.1.2.11.2)."""


_NO_QUEUE: deque[Any] = deque()
"""Shared empty queue, never appended to: most sessions (clean, QoS 0, keeping
up) never queue, and a deque of their own costs ~600 bytes each."""
_NO_IDS: set[int] = set()
"""Shared empty set of inbound QoS 2 ids, never added to (see ``remember_qos2``)."""

QUEUED_OVERHEAD = 100
"""Bytes a queued delivery costs beyond its topic and payload (the Delivery,
its queue slot, a share of the Message), for ``max_queued_bytes``."""

NOTHING_DROPPED = (0, False)
"""What :meth:`Session.enqueue` returns when the queue had room."""


def queued_size(d: Delivery) -> int:
    """What one queued delivery counts against ``max_queued_bytes``."""
    msg = d.msg
    return len(msg.payload) + len(msg.topic) + QUEUED_OVERHEAD


@dataclass(slots=True)
class Delivery:
    """One message bound for one session, with the per-subscriber options."""

    msg: Message
    qos: int
    retain: bool
    sub_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class RetainedWalk:
    """One granted filter's retained messages, still being sent."""

    cursor: RetainedCursor
    qos: int
    sub_ids: tuple[int, ...]


@dataclass(slots=True)
class RetainedBacklog:
    """Retained messages owed after SUBACKs, sent a slice per event-loop turn
    (``MqttConnection._send_retained``). Live messages wait in the session
    queue behind them, so a retained message is never sent after a newer live
    one on its topic. Kept with the session, so a persistent session whose
    connection ends halfway gets the rest when it comes back (while the
    gateway runs: it is not saved to disk)."""

    walks: deque[RetainedWalk]
    ready: deque[Delivery]
    """Found by a walk, not sent yet (the window or the turn's budget is full)."""


@dataclass(slots=True)
class Inflight:
    """An outbound QoS 1/2 message sent and not yet completed."""

    packet_id: int
    delivery: Delivery
    released: bool = False
    """QoS 2: PUBREC received and PUBREL sent; waiting for PUBCOMP."""


class Session:
    """State of one client id; see the module docstring."""

    __slots__ = (
        "_next_pid",
        "client_id",
        "conn",
        "dirty",
        "disconnected_at",
        "dropped",
        "expiry_interval",
        "in_qos2",
        "inflight",
        "owner",
        "persisted",
        "protocol_level",
        "qos0_queued",
        "queue",
        "queued_bytes",
        "retained",
        "subscription_chars",
        "subscriptions",
        "will",
        "will_at",
    )

    def __init__(self, client_id: str, protocol_level: int, expiry_interval: int = 0) -> None:
        self.client_id = client_id
        self.owner: str | None = None
        """The identity (:attr:`Principal.identity`) that created the session;
        only it may resume or take it over (None: not known, a session saved
        before owners were recorded; the next identity to resume it owns it)."""
        self.protocol_level = protocol_level
        self.expiry_interval = expiry_interval
        """Seconds the session outlives its connection (0 = it ends with it)."""
        self.subscriptions: dict[str, SubEntry] = {}
        self.subscription_chars = 0
        """Characters of the filters in ``subscriptions`` (the broker keeps it)."""
        self.inflight: dict[int, Inflight] = {}
        self.queue: deque[Delivery] = _NO_QUEUE
        self.queued_bytes = 0
        """Sum of :func:`queued_size` over ``queue``."""
        self.qos0_queued = 0
        self.retained: RetainedBacklog | None = None
        """Retained messages still owed to SUBSCRIBEs (sent before the queue)."""
        self.in_qos2: set[int] = _NO_IDS
        self.conn: MqttConnection | None = None
        self.disconnected_at: float | None = None
        """When the last connection ended, on the broker clock (``clock.py``:
        monotonic, kept across restarts); None while connected."""
        self.will: Will | None = None
        """A will waiting for its v5 will delay interval to elapse."""
        self.will_at: float | None = None
        """When the delayed will is due, on the broker clock."""
        self.dropped = 0
        self._next_pid = 1
        self.dirty = False
        """Queue or inflight changed since the last save (persistent sessions)."""
        self.persisted = False
        """A row for this session exists in the store."""

    @property
    def persistent(self) -> bool:
        return self.expiry_interval > 0

    def next_packet_id(self) -> int:
        """A packet id not in use by an outbound message in flight."""
        pid = self._next_pid
        inflight = self.inflight
        # The window (<= 65535) is always smaller than the id space, so this ends.
        while pid in inflight:
            pid = pid + 1 if pid < 65535 else 1
        self._next_pid = pid + 1 if pid < 65535 else 1
        return pid

    def enqueue(self, delivery: Delivery, max_queued: int, max_bytes: int = 0) -> tuple[int, bool]:
        """Queue a delivery; while the queue is over ``max_queued`` messages or
        ``max_bytes`` (0: no byte limit), drop its oldest QoS 0 message, else
        its oldest message (the new one too, if it alone is too large).

        Returns how many were dropped and whether one of them was QoS 1/2.
        """
        queue = self.queue
        if queue is _NO_QUEUE:
            queue = self.queue = deque()
        queue.append(delivery)
        self.queued_bytes += queued_size(delivery)
        if delivery.qos == 0:
            self.qos0_queued += 1
        self.dirty = True
        if len(queue) <= max_queued and (not max_bytes or self.queued_bytes <= max_bytes):
            return NOTHING_DROPPED
        dropped = 0
        lost_qos = False
        while queue and (len(queue) > max_queued or (max_bytes and self.queued_bytes > max_bytes)):
            if self.qos0_queued:
                for i, d in enumerate(queue):
                    if d.qos == 0:
                        del queue[i]
                        break
            else:
                d = queue.popleft()
                lost_qos = True
            self._forget(d)
            dropped += 1
        self.dropped += dropped
        return dropped, lost_qos

    def _forget(self, d: Delivery) -> None:
        """``d`` left the queue: update the counts."""
        self.queued_bytes -= queued_size(d)
        if d.qos == 0:
            self.qos0_queued -= 1

    def remember_qos2(self, packet_id: int) -> None:
        """An inbound QoS 2 PUBLISH was accepted; its id is kept until PUBREL."""
        if self.in_qos2 is _NO_IDS:
            self.in_qos2 = set()
        self.in_qos2.add(packet_id)

    def dequeue(self) -> Delivery:
        d = self.queue.popleft()
        self._forget(d)
        self.dirty = True
        return d

    def clear_messages(self) -> None:
        self.queue = _NO_QUEUE
        self.qos0_queued = 0
        self.queued_bytes = 0
        self.retained = None
        self.inflight.clear()
        self.in_qos2 = _NO_IDS
        self.dirty = True

    def snapshot(self) -> dict[str, Any]:
        """Small summary for diagnostics."""
        return {
            "client_id": self.client_id,
            "owner": self.owner,
            "online": self.conn is not None,
            "subscriptions": len(self.subscriptions),
            "inflight": len(self.inflight),
            "queued": len(self.queue),
            "queued_bytes": self.queued_bytes,
            "dropped": self.dropped,
        }
