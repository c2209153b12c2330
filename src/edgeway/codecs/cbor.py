"""CBOR (RFC 8949) telemetry: the same reading objects as the JSON codec, in CBOR.

Example::

    codec: cbor
    codec_options:
      timestamp: t
      timestamp_unit: s

The options are those of the ``json`` codec (field mapping with JMESPath,
timestamps, flattening). A CBOR date/time (tag 0 or 1) is accepted as a
timestamp. Byte strings, tags other than date/time, and map keys that are not
text are rejected (``bad_value``/``bad_key``): a sink cannot store them as a
metric. Bytes after the first complete CBOR item are an error
(``trailing_data``), so two items glued together are not half-read.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from edgeway.codecs.base import DecodeError, register_codec
from edgeway.codecs.json import JsonCodec
from edgeway.reading import Origin, Reading

MAX_CBOR_DEPTH = 64
"""Nesting limit while decoding. The mapper flattens at most 8 levels; 64 leaves
room for envelopes and keeps a hostile payload far from Python's recursion limit."""


def loads_cbor(payload: bytes) -> Any:
    """Decode exactly one CBOR item; :class:`DecodeError` ``cbor_error`` or ``trailing_data``."""
    if not payload:
        raise DecodeError("cbor_error", "empty payload")
    fp = io.BytesIO(payload)
    try:
        doc = cbor2.CBORDecoder(fp, max_depth=MAX_CBOR_DEPTH).decode()
    except Exception as e:  # cbor2 raises many types (ValueError, OverflowError, ...)
        # Any failure inside the decoder is a property of the payload.
        raise DecodeError("cbor_error", f"{type(e).__name__}: {str(e)[:200]}") from None
    if fp.tell() != len(payload):
        raise DecodeError("trailing_data", f"{len(payload) - fp.tell()} bytes after the CBOR item")
    return doc


@register_codec
class CborCodec(JsonCodec):
    """CBOR reading objects (or arrays of them) with the JSON codec's options and mapping."""

    name = "cbor"
    content_types = ("application/cbor",)
    coap_formats = (60,)

    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        return self.mapper.map(loads_cbor(payload), device_id=device_id, origin=origin, now=now)
