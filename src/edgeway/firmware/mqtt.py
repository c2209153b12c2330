"""Firmware images in chunks over the embedded MQTT broker (docs/firmware.md).

A device asks for one chunk at a time (or a few: at most :data:`MAX_PENDING`
unanswered), so a download cut off resumes at the offset it stopped at::

    devices/{id}/firmware/get     (the device publishes, any QoS)
        {"image": "<image id>", "offset": 0, "size": 32768}
    devices/{id}/firmware/chunk   (the gateway answers, QoS 0; or on the
                                   request's MQTT 5 response topic, under
                                   devices/{id}/, with its correlation data)
        2 bytes: length N of the header (big-endian), N bytes of JSON header,
        then the chunk's bytes.
        header {"image", "offset", "size", "total"}  (size: bytes that follow;
        0 at or past the end), or {"image", "offset", "error", "message"}
        with no bytes after it.

The same payload for MQTT 3.1.1 and 5 (3.1.1 has no user properties, and a
device then parses one format). Errors: ``invalid`` (a request that is not
``{"image", "offset"[, "size"]}``), ``not_found`` (no such image for this
device: only a device whose update command for the image is out may read
it, as for the HTTP download), ``busy`` (more than :data:`MAX_PENDING`
requests unanswered or a chunk still waiting to be written to it: ask again
later), ``too_small`` (its maximum packet size leaves no room for a chunk).

Only the device itself may ask (``Broker.speaks_for``); a request from
another client is dropped and counted. Chunks are QoS 0: the request/response
is the acknowledgement, and a device that does not get its chunk within its
own timeout asks again for the same offset.

Bounded work and memory: a chunk is at most ``firmware.mqtt_chunk_max``
(and fits the client's maximum packet size); it is read from disk with one
``pread`` in a worker thread, at most :data:`MAX_READS` at once for all
devices; per device at most :data:`MAX_PENDING` chunks are being read and a
new one is refused while its connection still has one waiting to be sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.south.mqtt.device_requests import DeviceRequests
from edgeway.south.mqtt.packets import Properties

if TYPE_CHECKING:
    from edgeway.firmware.service import FirmwareService
    from edgeway.south.mqtt.broker import Broker
    from edgeway.south.mqtt.session import Session

log = logging.getLogger(__name__)

MAX_PENDING = 2
"""Chunk requests of one device being read at once (two: the next is read
while the previous one travels)."""
MAX_READS = 16
"""Disk reads of all devices at once (each in a worker thread)."""
MAX_REQUEST = 512
"""Bytes of a request's payload."""
PACKET_OVERHEAD = 16
"""Bytes of a PUBLISH besides its topic, properties and payload (fixed header,
length fields), rounded up."""


def _topic_device(topic: str) -> str | None:
    """``devices/{id}/firmware/get`` -> id."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == "devices" and parts[2:] == ["firmware", "get"] and parts[1]:
        return parts[1]
    return None


def encode_chunk(header: dict[str, Any], data: bytes = b"") -> bytes:
    """A chunk answer's payload: header length, JSON header, bytes."""
    head = orjson.dumps(header)
    return struct.pack(">H", len(head)) + head + data


def decode_chunk(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, bytes) of a chunk answer; ValueError if it is not one."""
    if len(payload) < 2:
        raise ValueError("shorter than its header length")
    (n,) = struct.unpack_from(">H", payload)
    if len(payload) < 2 + n:
        raise ValueError("shorter than its header")
    header = orjson.loads(payload[2 : 2 + n])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, payload[2 + n :]


def _pread(path: str, offset: int, size: int) -> tuple[int, bytes]:
    """(the file's size, up to ``size`` bytes at ``offset``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        total = os.fstat(fd).st_size
        return total, os.pread(fd, max(0, min(size, total - offset)), offset)
    finally:
        os.close(fd)


class FirmwareMqtt(DeviceRequests):
    """A BrokerObserver serving firmware chunks (see the module docstring)."""

    what = "firmware chunk request"

    def __init__(self, broker: Broker, service: FirmwareService, chunk_max: int) -> None:
        super().__init__(broker, MAX_PENDING)
        self.service = service
        self.chunk_max = chunk_max
        self._reads = asyncio.Semaphore(MAX_READS)
        self.errors: dict[str, int] = {}
        """Error answers by code."""
        self.chunks = 0
        self.bytes = 0

    def published(
        self, topic: str, payload: bytes, properties: Properties | None, sender: str
    ) -> None:
        device = _topic_device(topic)
        if device is None:
            return
        if not self.admit(sender, device):
            return
        reply = self._reply_topic(device, properties)
        request = _parse(payload)
        if isinstance(request, str):
            self._error(reply, {"image": None, "offset": None}, "invalid", request)
            return
        image_id, offset, size = request
        head = {"image": image_id, "offset": offset}
        if not self.service.may_download(image_id, device):
            self._error(reply, head, "not_found", "no such image for this device")
            return
        session = self.broker.sessions.get(device)
        room = self._room(session, reply[0], reply[1], head)
        if room < 64:
            self._error(reply, head, "too_small", "the maximum packet size leaves no room")
            return
        if (session is not None and session.queue) or not self.take(device):
            self._error(reply, head, "busy", "too many chunks unanswered: ask again later")
            return
        self.spawn(self._send(device, reply, image_id, offset, min(size, room)))

    # -- work --------------------------------------------------------------------

    def _reply_topic(self, device: str, props: Properties | None) -> tuple[str, Properties | None]:
        if props is not None and props.response_topic:
            rt = props.response_topic
            if rt.startswith(f"devices/{device}/") and "+" not in rt and "#" not in rt:
                return rt, Properties(correlation_data=props.correlation_data)
        return f"devices/{device}/firmware/chunk", None

    def _room(
        self, session: Session | None, topic: str, props: Properties | None, head: dict[str, Any]
    ) -> int:
        """Bytes of chunk data that fit the client's maximum packet size and
        ``chunk_max``."""
        conn = session.conn if session is not None else None
        limit = getattr(conn, "max_out_packet", 0) or 0
        if not limit:
            return self.chunk_max
        cd = props.correlation_data if props is not None else None
        header = 2 + len(orjson.dumps({**head, "size": 10**12, "total": 10**12}))
        used = PACKET_OVERHEAD + 2 + len(topic.encode()) + header + (3 + len(cd) if cd else 0)
        return min(self.chunk_max, limit - used)

    async def _send(
        self,
        device: str,
        reply: tuple[str, Properties | None],
        image_id: str,
        offset: int,
        size: int,
    ) -> None:
        head: dict[str, Any] = {"image": image_id, "offset": offset}
        try:
            async with self._reads:
                total, data = await asyncio.get_running_loop().run_in_executor(
                    None, _pread, str(self.service.path(image_id)), offset, size
                )
            head |= {"size": len(data), "total": total}
            self.chunks += 1
            self.bytes += len(data)
            self.broker.publish(reply[0], encode_chunk(head, data), qos=0, properties=reply[1])
        except OSError as e:
            log.warning("firmware chunk of %s for %s: %s", image_id, device, e)
            self._error(reply, head, "not_found", "the image cannot be read")
        finally:
            self.release(device)

    def _error(
        self, reply: tuple[str, Properties | None], head: dict[str, Any], code: str, message: str
    ) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        body = {**head, "error": code, "message": message}
        self.broker.publish(reply[0], encode_chunk(body), qos=0, properties=reply[1])


def _parse(payload: bytes) -> tuple[str, int, int] | str:
    """(image, offset, size) of a request, or what is wrong with it."""
    if len(payload) > MAX_REQUEST:
        return f"a request is at most {MAX_REQUEST} bytes"
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "a request is JSON"
    if not isinstance(body, dict):
        return 'a request is {"image", "offset", "size"}'
    image, offset, size = body.get("image"), body.get("offset", 0), body.get("size", 1 << 30)
    if not isinstance(image, str) or not image or len(image) > 200:
        return "image: an image id"
    for name, v in (("offset", offset), ("size", size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{name}: a whole number, 0 or more"
    if size == 0:
        return "size: above 0"
    return image, offset, size
