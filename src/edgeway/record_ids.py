"""Record ids that are the same on every gateway: a hash of the message, as a UUID.

A record's id is normally ``gateway_id:sequence`` (the outbox numbers what it
stores), which is unique but says nothing about the message: when a shared
subscription's broker redelivers a message to another gateway (the first one
died after storing it, before its PUBACK), the copy gets another gateway's id
and a cloud that drops repeated ids keeps both.

In MQTT client mode a message that identifies itself (its payload carries a
device timestamp, a message id or the subscription's ``sequence_metric``)
gets a *message key*: SHA-256 over the connection's ``name``, the topic and
the payload bytes (:func:`message_key`). Every reading made from it carries
the key in its :class:`~edgeway.reading.Origin`, through the pipeline, and
the outbox gives it the id :func:`keyed_record_id`: SHA-256 over the key, the
device id, the reading's timestamp (unless it is the receive time, which
differs from gateway to gateway) and its metrics, as an RFC 9562 version 8
UUID. The same message therefore gives the same ids on any gateway, and two
readings of one message differ in id as soon as they differ in device,
device time or any metric value.

What is merged, and why that is right: two readings get one id only when
they come from byte-identical payloads on the same topic of the same
connection and carry the same device, time and metrics. A payload that
carries a device timestamp, a message id or a sequence number and is
byte-identical to another *is* the same message sent twice. A payload that
carries none of them (a bare ``21.5``, Tasmota's SENSOR) gets no key: two
such identical payloads a minute apart are two readings, and only the
gateway's own numbering tells them apart, so they keep ``gateway_id:sequence``
(and a broker redelivery of one can still reach the cloud under two ids).
"""

from __future__ import annotations

import hashlib

import orjson

from edgeway.reading import Reading


def message_key(connection: str, topic: str, payload: bytes) -> str:
    """The key of one message: hex SHA-256 of the connection's name, the topic
    and the payload (128 bits are kept: the key only has to tell messages apart)."""
    return hashlib.sha256(
        b"%s\0%s\0%s" % (connection.encode(), topic.encode(), payload)
    ).hexdigest()[:32]


def keyed_record_id(r: Reading, key: str) -> str:
    """The record id of ``r``, a reading of the message keyed ``key``: a UUID
    (version 8, RFC 9562) of SHA-256 over the key, the device id, the
    device's timestamp (left out when it is the receive time) and the metrics."""
    ts = b"" if r.ts == r.origin.received else repr(r.ts).encode()
    metrics = orjson.dumps(r.metrics, option=orjson.OPT_SORT_KEYS)
    d = bytearray(
        hashlib.sha256(
            b"%s\0%s\0%s\0%s" % (key.encode(), r.device_id.encode(), ts, metrics)
        ).digest()[:16]
    )
    d[6] = (d[6] & 0x0F) | 0x80  # version 8: custom (here SHA-256 based)
    d[8] = (d[8] & 0x3F) | 0x80  # the RFC variant
    h = d.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"  # str(uuid.UUID(bytes=d))
