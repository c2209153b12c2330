"""Twins over the CoAP listener (the device's side; the listener in
:mod:`edgeway.south.coap` routes ``devices/{id}/twin...`` here after checking
that the request's token is the device's).

Resources (``{id}`` is the device id):

``GET /devices/{id}/twin``
    The whole twin (``{"desired", "desired_version", "reported",
    "reported_version", "delta", "timestamps", "updated_at"}``).
``GET /devices/{id}/twin/desired``
    The desired document itself. **Observable** (RFC 7641): a notification
    follows each change of desired; a device that observes again (after a
    reboot, a lost observation, a night away) gets the document at the latest
    version as the first answer: ONE consolidated state, however many patches
    it missed.
``GET /devices/{id}/twin/reported`` and ``GET /devices/{id}/twin/delta``
    The reported document; the delta (what desired asks that reported does
    not show yet). Both observable too.
``PUT`` or ``PATCH /devices/{id}/twin/reported``
    A JSON merge patch (RFC 7396) of the reported document. ``If-Match`` with
    the reported ETag makes it conditional: 4.12 Precondition Failed when the
    document changed since. 2.04 Changed with the new ETag.

ETags are the versions, so a device can compare them without parsing
anything: the ETag of ``desired`` and ``reported`` is that document's version
as an unsigned big-endian integer of 1-8 bytes (version 7 is ``0x07``, as
CoAP's own uint options); the ETag of ``twin`` and ``delta`` is 8 bytes, the
desired and the reported version as two 32-bit integers.

Content formats: JSON (50) and CBOR (60) both ways; a patch may also be
``application/merge-patch+json`` (52) or have no Content-Format (JSON). GETs
answer in the format of their Accept option (JSON without one; 4.06 for
another). A CBOR patch must hold only what JSON can (text keys, no byte
strings, no tags, finite numbers): the twin is stored as JSON.

Large documents go out in Block2 blocks (RFC 7959, at most 1024 bytes, or
smaller when the device asks with its Block2 size), each block rendered from
the current twin: with the ETag in every block, a device that sees it change
mid-transfer starts again (RFC 7959 2.4), and nothing is kept between blocks.

Refusals: 4.00 with a diagnostic for a patch that is not a JSON object, does
not decode, nests deeper than ``twins.max_depth``, or a malformed If-Match;
4.13 (Size1 = ``twins.max_bytes``) when the document would be too large;
4.15 for another Content-Format; 4.05 for another method. All are counted in
the adapter's ``refusals`` (``twin_<reason>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.twins.model import Doc, Twin, TwinError, parse_patch

if TYPE_CHECKING:
    from edgeway.twins.service import Section, TwinService

CF_JSON = 50
CF_MERGE_PATCH_JSON = 52
CF_CBOR = 60
PATCH_FORMATS = (None, CF_JSON, CF_MERGE_PATCH_JSON, CF_CBOR)
BLOCK_SZX = 6
"""The largest block: 2 ** (6 + 4) = 1024 bytes (RFC 7959 2.2)."""

VIEWS = ("twin", "desired", "reported", "delta")
"""What ``devices/{id}/twin[/<view>]`` names (``twin`` for the bare path)."""

Respond = Callable[..., Any]
"""The listener's ``_respond(code, text, **options)``: a counted response."""
Refuse = Callable[[str, str, object], None]
"""The listener's ``count_refusal(reason, detail, remote)``."""


def version_etag(version: int) -> bytes:
    """A document's ETag: its version as a big-endian unsigned integer, 1-8 bytes."""
    v = version & 0xFFFF_FFFF_FFFF_FFFF
    return v.to_bytes(max(1, (v.bit_length() + 7) // 8), "big")


def view_etag(twin: Twin, view: str) -> bytes:
    """The ETag of ``view`` of ``twin`` (see the module docstring)."""
    if view == "desired":
        return version_etag(twin.desired_version)
    if view == "reported":
        return version_etag(twin.reported_version)
    d, r = twin.desired_version & 0xFFFF_FFFF, twin.reported_version & 0xFFFF_FFFF
    return d.to_bytes(4, "big") + r.to_bytes(4, "big")


def view_doc(twin: Twin, view: str) -> Doc:
    if view == "desired":
        return twin.desired
    if view == "reported":
        return twin.reported
    if view == "delta":
        return twin.delta
    return twin.to_json()


def if_match_version(values: list[bytes]) -> int | None:
    """The reported version an ``If-Match`` names, None without a condition
    (no option, or an empty value: "if it exists", and a twin always does);
    TwinError(invalid) for more than one value or one longer than 8 bytes."""
    if not values or any(len(v) == 0 for v in values):
        return None
    if len(values) > 1:
        raise TwinError("invalid", "give one If-Match (the reported ETag)")
    if len(values[0]) > 8:
        raise TwinError("invalid", "If-Match is the reported ETag: 1-8 bytes")
    return int.from_bytes(values[0], "big")


def decode_patch(payload: bytes, fmt: int | None) -> Any:
    """A patch body as JSON values (TwinError(invalid) when it does not decode)."""
    if fmt == CF_CBOR:
        from edgeway.codecs.base import DecodeError
        from edgeway.codecs.cbor import loads_cbor

        try:
            value = loads_cbor(payload)
        except DecodeError as e:
            raise TwinError("invalid", f"not CBOR: {e.detail}") from None
        _check_json_like(value, 0)
        return value
    return parse_patch(payload)


_JSON_LIKE_DEPTH = 64
"""Deeper than any twin may be (``twins.max_depth`` is at most 64); the CBOR
decoder stops at 64 levels already."""


def _check_json_like(value: Any, depth: int) -> None:
    """TwinError(invalid) for a CBOR value JSON cannot hold (it would not come
    back the same from the store)."""
    if depth > _JSON_LIKE_DEPTH:
        raise TwinError("too_deep", f"nesting deeper than {_JSON_LIKE_DEPTH}")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TwinError("invalid", "CBOR map keys must be text strings")
            _check_json_like(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json_like(v, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise TwinError("invalid", "numbers must be finite")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**64:
            raise TwinError("invalid", "integers must fit in 64 bits")
    elif value is not None and not isinstance(value, str | bool):
        raise TwinError("invalid", f"CBOR {type(value).__name__} has no JSON equivalent")


def encode(doc: Doc, fmt: int) -> bytes:
    if fmt == CF_CBOR:
        import cbor2

        return bytes(cbor2.dumps(doc))
    return orjson.dumps(doc)


@dataclass(slots=True, eq=False)
class _Observer:
    device_id: str
    view: str
    observation: Any
    etag: bytes | None = None
    """The ETag of the last representation rendered for it (first answer or
    notification): a change that leaves it as it was sends nothing."""


class TwinCoap:
    """Renders the twin resources and notifies their observers."""

    def __init__(self, service: TwinService, respond: Respond, refuse: Refuse) -> None:
        self.service = service
        self._respond = respond
        self._refuse = refuse
        self._observers: dict[str, list[_Observer]] = {}
        self._by_request: dict[int, _Observer] = {}
        """Observers by id() of the request that opened them: aiocoap renders
        every notification from that same request."""

    def attach(self) -> None:
        self.service.add_listener(self._changed)

    def detach(self) -> None:
        self.service.remove_listener(self._changed)

    # -- observations -------------------------------------------------------

    def observer_count(self, device_id: str) -> int:
        return len(self._observers.get(device_id, ()))

    def observed(
        self, device_id: str, view: str, request: Any, observation: Any
    ) -> Callable[[], None]:
        """Follow an accepted observation; returns what to call when it ends."""
        obs = _Observer(device_id, view, observation)
        self._observers.setdefault(device_id, []).append(obs)
        self._by_request[id(request)] = obs

        def ended() -> None:
            left = [o for o in self._observers.get(device_id, ()) if o is not obs]
            if left:
                self._observers[device_id] = left
            else:
                self._observers.pop(device_id, None)
            if self._by_request.get(id(request)) is obs:
                del self._by_request[id(request)]

        return ended

    def _changed(self, twin: Twin, _section: Section) -> None:
        for obs in self._observers.get(twin.device_id, ()):
            if view_etag(twin, obs.view) != obs.etag:
                # Rendered again by aiocoap (from the store, so the latest
                # version); triggers before that render are merged into it.
                obs.observation.trigger()

    # -- requests -----------------------------------------------------------

    async def render(self, request: Any, device_id: str, view: str) -> Any:
        from aiocoap import Code

        if request.code == Code.GET:
            return await self._get(request, device_id, view)
        if view == "reported" and request.code in (Code.PUT, Code.PATCH):
            return await self._patch(request, device_id)
        allowed = "PUT, PATCH or GET" if view == "reported" else "GET"
        return self._respond(Code.METHOD_NOT_ALLOWED, f"use {allowed}")

    async def _get(self, request: Any, device_id: str, view: str) -> Any:
        from aiocoap import Code, Message
        from aiocoap.optiontypes import BlockOption

        accept = request.opt.accept
        fmt = CF_JSON if accept is None else int(accept)
        if fmt not in (CF_JSON, CF_CBOR):
            return self._bad(request, "not_acceptable", "Accept 50 (JSON) or 60 (CBOR)")
        twin = await self.service.get(device_id)
        etag = view_etag(twin, view)
        obs = self._by_request.get(id(request))
        if obs is not None:
            obs.etag = etag
        body = encode(view_doc(twin, view), fmt)
        block2 = request.opt.block2
        szx = BLOCK_SZX if block2 is None else min(block2.size_exponent, BLOCK_SZX)
        number = 0 if block2 is None else block2.block_number
        size = 1 << (szx + 4)
        start = number * size
        if number and start >= len(body):
            return self._bad(
                request, "bad_block", f"block {number} is past the end ({len(body)} bytes)"
            )
        # A copy, also of a body that fits in one block: orjson's output keeps
        # a 4 KiB allocation however short it is, and aiocoap holds each
        # response for 247 s to answer a retransmitted request (tracemalloc:
        # 7.4 KB retained per GET of a 2-byte document without the copy).
        msg = Message(code=Code.CONTENT, payload=memoryview(body)[start : start + size].tobytes())
        msg.opt.content_format = fmt
        msg.opt.etag = etag
        if block2 is not None or len(body) > size:
            more = start + size < len(body)
            msg.opt.block2 = BlockOption.BlockwiseTuple(number, more, szx)
            if number == 0:
                msg.opt.size2 = len(body)
        return msg

    async def _patch(self, request: Any, device_id: str) -> Any:
        from aiocoap import Code, Message

        fmt = request.opt.content_format
        fmt = None if fmt is None else int(fmt)
        if fmt not in PATCH_FORMATS:
            self._count(request, "twin_unsupported_format", str(fmt))
            return self._respond(
                Code.UNSUPPORTED_CONTENT_FORMAT, "Content-Format 50, 52 (JSON) or 60 (CBOR)"
            )
        limits = self.service.limits
        try:
            if len(request.payload) > limits.max_bytes:
                raise TwinError("too_large", f"patch over {limits.max_bytes} bytes")
            version = if_match_version(list(request.opt.if_match))
            twin = await self.service.patch(
                device_id,
                "reported",
                decode_patch(request.payload, fmt),
                if_match=version,
                by=f"coap:{device_id}",
            )
        except TwinError as e:
            self._count(request, f"twin_{e.code}", str(e))
            if e.code == "conflict":
                return self._respond(
                    Code.PRECONDITION_FAILED,
                    str(e),
                    etag=version_etag(int(e.extra.get("version", 0))),
                )
            if e.code == "too_large":
                return self._respond(
                    Code.REQUEST_ENTITY_TOO_LARGE, str(e)[:200], size1=limits.max_bytes
                )
            return self._respond(Code.BAD_REQUEST, f"{e.code}: {e}"[:200])
        msg = Message(code=Code.CHANGED)
        msg.opt.etag = version_etag(twin.reported_version)
        return msg

    def _bad(self, request: Any, reason: str, text: str) -> Any:
        from aiocoap import Code

        self._count(request, f"twin_{reason}", text)
        code = Code.NOT_ACCEPTABLE if reason == "not_acceptable" else Code.BAD_REQUEST
        return self._respond(code, text)

    def _count(self, request: Any, reason: str, detail: str) -> None:
        self._refuse(reason, detail, request.remote.hostinfo)
