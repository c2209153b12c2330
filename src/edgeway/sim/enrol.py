"""Simulated devices enrol with a provisioning key, the way real ones do.

Example (what ``edgeway simulate --provision-key site-a:SECRET`` does before
its devices start)::

    creds = await enrol_devices(
        ["sim-0000", "sim-0001"], key="site-a:SECRET", kind="mqtt",
        via="mqtt", host="127.0.0.1", port=1883,
    )
    creds["sim-0000"]          # its own MQTT password (user name: its id)

Over MQTT each device connects as ``$provision:ID`` (gmqtt, MQTT 5), asks on
``$edgeway/provision/{client id}/request`` and reads the answer in its own
namespace; over HTTP it posts to ``/provision`` (aiohttp). A refusal the
gateway says to retry (``rate_limited``, ``locked``, ``busy``) waits and
tries again, within :data:`ENROL_ATTEMPTS`; others (a wrong key, an id that
exists) end the enrolment with :class:`EnrolError`, which names the device.
See docs/devices.md#auto-provisioning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

__all__ = ["EnrolError", "enrol_devices", "load_credentials", "save_credentials"]

log = logging.getLogger(__name__)

ENROL_CONCURRENCY = 16
"""Devices enrolling at once: enough to enrol a thousand in seconds, few
enough not to look like a flood to the key's rate limit and backoff."""
ENROL_ATTEMPTS = 30
"""Tries per device for refusals the gateway says to retry (rate limit):
with a key of 60 a minute, 1,000 devices need ~16 minutes anyway."""
ENROL_TIMEOUT = 10.0
RETRYABLE = frozenset({"rate_limited", "locked", "busy"})


class EnrolError(Exception):
    """An enrolment refused for good (the message says which device and why)."""


def _split(key: str) -> tuple[str, str]:
    key_id, sep, secret = key.partition(":")
    if not sep or not key_id or not secret:
        raise EnrolError("a provisioning key is given as ID:SECRET")
    return key_id, secret


async def _over_http(session: Any, base: str, key: str, device_id: str, kind: str) -> Any:
    async with session.post(
        f"{base}/provision",
        data=orjson.dumps({"device_id": device_id, "kinds": [kind]}),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=ENROL_TIMEOUT,
    ) as r:
        doc = orjson.loads(await r.read() or b"{}")
        if r.status == 201:
            return doc
        retry = float(r.headers.get("Retry-After", "1"))
        return {"error": doc.get("error", str(r.status)), "message": doc.get("detail", ""),
                "retry_after": retry}  # fmt: skip


async def _over_mqtt(host: str, port: int, key: str, device_id: str, kind: str) -> Any:
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50

    key_id, secret = _split(key)
    client_id = "provision-" + secrets.token_hex(6)
    ns = f"$edgeway/provision/{client_id}/"
    answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_message(_c: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
        if topic.startswith(ns) and not answer.done():
            try:
                answer.set_result(orjson.loads(payload))
            except orjson.JSONDecodeError:
                answer.set_result({"error": "invalid", "message": "unreadable answer"})
        return 0

    client = gmqtt.Client(client_id, clean_session=True, logger=log)
    client.set_auth_credentials(f"$provision:{key_id}", secret)
    client.on_message = on_message
    client.set_config({"reconnect_retries": 0})
    try:
        async with asyncio.timeout(ENROL_TIMEOUT):
            try:
                await client.connect(host, port, version=MQTTv50, keepalive=30)
            except gmqtt.mqtt.handler.MQTTConnectError as e:
                code = int(getattr(e, "_code", 0) or 0)
                return _connack_refusal(code)
            # no_local: its own request is not echoed back to it.
            client.subscribe(gmqtt.Subscription(ns + "+", qos=1, no_local=True))
            client.publish(
                ns + "request", orjson.dumps({"device_id": device_id, "kinds": [kind]}), qos=1
            )
            return await answer
    except TimeoutError:
        return {"error": "busy", "message": "no answer", "retry_after": 1.0}
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 2.0)


def _connack_refusal(code: int) -> dict[str, Any]:
    """A refused provisioning CONNECT as the HTTP endpoint would say it."""
    if code == 0x8A:
        return {"error": "locked", "message": "too many failed attempts", "retry_after": 2.0}
    if code == 0x87:
        return {"error": "forbidden", "message": "the key is revoked, expired or used up"}
    return {"error": "unauthorized", "message": f"unknown key or wrong secret (CONNACK {code:#x})"}


async def enrol_devices(
    device_ids: Sequence[str],
    *,
    key: str,
    kind: str,
    via: str,
    host: str,
    port: int,
    concurrency: int = ENROL_CONCURRENCY,
) -> dict[str, str]:
    """Enrol each device (over ``via``: ``mqtt`` or ``http`` at host:port)
    asking for a ``kind`` credential; returns device id -> its secret."""
    _split(key)
    gate = asyncio.Semaphore(concurrency)
    out: dict[str, str] = {}
    session: Any = None
    if via == "http":
        import aiohttp

        session = aiohttp.ClientSession()
    base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    async def one(device_id: str) -> None:
        for _ in range(ENROL_ATTEMPTS):
            async with gate:
                if via == "http":
                    doc = await _over_http(session, base, key, device_id, kind)
                else:
                    doc = await _over_mqtt(host, port, key, device_id, kind)
            if "credentials" in doc:
                out[device_id] = doc["credentials"][kind]
                return
            if doc.get("error") not in RETRYABLE:
                raise EnrolError(f"{device_id}: enrolment refused: {doc.get('error')}: "
                                 f"{doc.get('message', '')}")  # fmt: skip
            await asyncio.sleep(float(doc.get("retry_after", 1.0)))
        raise EnrolError(f"{device_id}: still refused after {ENROL_ATTEMPTS} tries")

    try:
        async with asyncio.TaskGroup() as tg:
            for d in device_ids:
                tg.create_task(one(d))
    except* EnrolError as eg:
        raise eg.exceptions[0] from None
    finally:
        if session is not None:
            await session.close()
    return out


def load_credentials(path: Path | None) -> dict[str, str]:
    """Credentials kept from an earlier run (a device keeps what it was given)."""
    if path is None or not path.exists():
        return {}
    doc = orjson.loads(path.read_bytes())
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def save_credentials(path: Path | None, creds: dict[str, str]) -> None:
    """Write ``creds`` to ``path`` (mode 0600: they are secrets)."""
    if path is None:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(creds, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
