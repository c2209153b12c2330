"""Receipts: tell devices when the cloud has their readings.

Configuration (defaults shown)::

    receipts:
      enabled: false
      topic: devices/{device_id}/receipts

Once every sink a reading was routed to confirmed it, the outbox reports it
(:meth:`edgeway.outbox.Outbox.add_confirmed_listener`); :class:`ReceiptSender`
groups a confirmation batch by device and hands one receipt per device to
every downlink that can carry it (:class:`edgeway.downlink.ReceiptDownlink`):
the embedded broker (QoS 1 on ``topic``; queued for an offline persistent
session) and each MQTT client-mode connection that has heard from the device
(QoS 1 on the external broker, on the subscription's ``receipt_topic`` or
``topic``). The payload::

    {"confirmed_seq": 42, "ids": ["gw1:41", "gw1:42"], "msg_ids": ["m-1"]}

(``ids`` are the record ids: in MQTT client mode a message that identifies
itself has UUIDs there, :mod:`edgeway.record_ids`.)

Receipts are not queued on disk: a receipt that could not go out (the
client-mode connection was down) is not sent again, and the next receipt
names a higher ``confirmed_seq``. Devices that need every message id should
use MQTT 5 persistent sessions on the embedded broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from edgeway.downlink import ReceiptDownlink
from edgeway.runtime.component import counter

if TYPE_CHECKING:
    from edgeway.outbox.store import Confirmed

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReceiptStats:
    """Counters of receipts (admin API, metrics)."""

    sent: dict[str, int] = field(
        default_factory=dict,
        metadata=counter(
            "receipts_sent", "Receipts handed to a downlink's transport", label="downlink"
        ),
    )
    """Receipts handed to each downlink's transport, by downlink name."""
    unreachable: int = field(
        default=0, metadata=counter("receipts_unreachable", "Receipts no downlink could send")
    )
    """Receipts no downlink could send (device unknown, connection down)."""


@dataclass(slots=True)
class _Pending:
    seq: int = 0
    ids: list[str] = field(default_factory=list)
    msg_ids: list[str] = field(default_factory=list)


class ReceiptSender:
    """Builds receipts from outbox confirmations and hands them to the downlinks."""

    def __init__(self, topic: str, targets: Callable[[], Iterable[ReceiptDownlink]]) -> None:
        """``targets`` is asked at every batch: a reload may have replaced adapters."""
        self.topic = topic
        self.targets = targets
        self.stats = ReceiptStats()

    def confirmed(self, confirmed: Sequence[Confirmed]) -> None:
        """Outbox listener: one receipt per device of the batch."""
        latest: dict[str, _Pending] = {}
        for c in confirmed:
            entry = latest.get(c.device_id)
            if entry is None:
                entry = latest[c.device_id] = _Pending()
            entry.seq = max(entry.seq, c.seq)
            entry.ids.append(c.record_id)
            if c.message_id is not None:
                entry.msg_ids.append(c.message_id)
        if not latest:
            return
        targets = list(self.targets())
        sent = self.stats.sent
        for device_id, entry in latest.items():
            payload = orjson.dumps(
                {"confirmed_seq": entry.seq, "ids": entry.ids, "msg_ids": entry.msg_ids}
            )
            taken = False
            for target in targets:
                if target.send_receipt(device_id, payload, self.topic):
                    sent[target.name] = sent.get(target.name, 0) + 1
                    taken = True
            if not taken:
                self.stats.unreachable += 1


def receipt_topic(template: str, device_id: str) -> str:
    """Fill ``{device_id}`` in a receipt topic template. Device ids cannot add
    levels or wildcards: codecs refuse ids with ``/``, ``+``, ``#`` or NUL
    (:func:`edgeway.codecs.base.check_device_id`)."""
    return template.replace("{device_id}", device_id)
