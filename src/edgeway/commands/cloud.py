"""Commands from the cloud: what a sink's downlink receives, and how it is queued.

Every cloud transport carries the same JSON object::

    {"id": "c-8812", "device_id": "pump-1", "name": "stop",
     "params": {"reason": "maintenance"}, "ttl": "5m", "timeout": "30s"}

``id`` is the cloud's own id for the request and is **required**: it becomes
the command's idempotency key (``cloud:<id>``), so a request the cloud sends
again (it did not get the acknowledgement, a JetStream redelivery, a broker
retry) is queued once. A transport whose address names the device or the
command (an MQTT topic ``.../commands/{device_id}/{name}``) may leave those
fields out.

The cloud is acknowledged only once the command is on disk (the MQTT PUBACK,
the NATS reply, the HTTP poll's acknowledgement), with::

    {"request_id": "c-8812", "id": "<command id>", "state": "queued"}

or ``{"request_id": ..., "error": "invalid" | "queue_full" | ..., "message": ...}``
for a request refused for good (it is acknowledged too: sending it again
would not help). What became of the command goes up through the outbox like
every other state change; those records carry ``request_id`` so the cloud can
match them to its request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.config_types import _parse_duration

if TYPE_CHECKING:
    from edgeway.commands.service import CommandService

log = logging.getLogger(__name__)

CLOUD_KEY_PREFIX = "cloud:"
REQUEST_MAX_BYTES = 256 * 1024
"""Largest cloud command request parsed (params are capped at
``commands.max_params_bytes`` anyway)."""
_FIELDS = frozenset({"id", "device_id", "name", "params", "ttl", "timeout"})


class CloudRequestError(ValueError):
    """A cloud request that cannot become a command (the message says why)."""


def parse_request(
    payload: bytes, *, device_id: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """The fields of a cloud command request; raises CloudRequestError."""
    if len(payload) > REQUEST_MAX_BYTES:
        raise CloudRequestError(f"request larger than {REQUEST_MAX_BYTES} bytes")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise CloudRequestError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CloudRequestError("a command request must be a JSON object")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise CloudRequestError(f"unknown fields: {', '.join(sorted(unknown))}")
    rid = doc.get("id")
    if not isinstance(rid, str) or not rid:
        raise CloudRequestError("'id' (the cloud's request id) is required")
    out: dict[str, Any] = {
        "request_id": rid,
        "device_id": doc.get("device_id", device_id),
        "name": doc.get("name", name),
        "params": doc.get("params"),
    }
    for key in ("ttl", "timeout"):
        value = doc.get(key)
        try:
            out[key] = None if value is None else float(_parse_duration(value))
        except ValueError as e:
            raise CloudRequestError(f"{key}: {e}") from None
    return out


async def accept(
    service: CommandService,
    payload: bytes,
    source: str,
    *,
    device_id: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Queue a cloud request; the answer to send back (see the module docstring).

    Returns once the command is committed (or refused for good); raises only
    for a failure worth retrying (the queue's database), so the transport
    does not acknowledge and the cloud sends the request again."""
    from edgeway.commands.service import CommandError

    try:
        req = parse_request(payload, device_id=device_id, name=name)
    except CloudRequestError as e:
        log.warning("cloud command refused (%s): %s", source, e)
        return {"error": "invalid", "message": str(e)}
    try:
        cmd, _new = await service.submit(
            req["device_id"],
            req["name"],
            req["params"],
            ttl=req["ttl"],
            result_timeout=req["timeout"],
            idempotency_key=CLOUD_KEY_PREFIX + req["request_id"],
            source=source,
        )
    except CommandError as e:
        if e.code == "disabled":
            raise  # stopping: let the cloud send it again to the next run
        return {"request_id": req["request_id"], "error": e.code, "message": str(e)}
    return {"request_id": req["request_id"], "id": cmd.id, "state": cmd.state.value}
