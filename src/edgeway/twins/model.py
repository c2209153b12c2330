"""Twin documents: JSON merge patch (RFC 7396), limits, the delta.

Pure functions, no I/O: the store applies them inside its write transaction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import orjson

Doc = dict[str, Any]


class TwinError(ValueError):
    """A twin change refused; ``code``: invalid, too_large, too_deep, conflict, not_found."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


@dataclass(slots=True, frozen=True)
class TwinLimits:
    max_bytes: int = 64 * 1024
    """Largest JSON encoding of one document (desired or reported)."""
    max_depth: int = 8
    """Deepest nesting of objects in a document."""


@dataclass(slots=True)
class Twin:
    """One device's twin as stored."""

    device_id: str
    desired: Doc = field(default_factory=dict)
    desired_version: int = 0
    reported: Doc = field(default_factory=dict)
    reported_version: int = 0
    desired_ts: dict[str, float] = field(default_factory=dict)
    """Last change time per top-level key of ``desired`` (kept for deleted keys
    until the key comes back)."""
    reported_ts: dict[str, float] = field(default_factory=dict)
    updated_at: float = 0.0

    @property
    def delta(self) -> Doc:
        return delta(self.desired, self.reported)

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "desired": self.desired,
            "desired_version": self.desired_version,
            "reported": self.reported,
            "reported_version": self.reported_version,
            "delta": self.delta,
            "timestamps": {"desired": self.desired_ts, "reported": self.reported_ts},
            "updated_at": self.updated_at,
        }


def if_match(header: str | None) -> int | None:
    """The version an ``If-Match`` header names (``7`` or ``"7"``), None
    without one; ValueError for anything else."""
    if header is None:
        return None
    return int(header.strip().strip('"'))


def parse_patch(raw: bytes) -> Any:
    """A patch body as JSON, or TwinError(invalid)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise TwinError("invalid", f"not JSON: {e}") from None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: ``patch`` applied to ``target`` (neither is modified)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def depth(value: Any) -> int:
    """Nesting depth of objects and arrays (a scalar is 0, ``{}`` is 1)."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def check_patch(patch: Any, limits: TwinLimits) -> Doc:
    """A patch must be a JSON object within the limits (a first, cheap check:
    the result is checked again after merging)."""
    if not isinstance(patch, dict):
        raise TwinError("invalid", "a twin patch is a JSON object (RFC 7396 merge patch)")
    if depth(patch) > limits.max_depth:
        raise TwinError("too_deep", f"nesting deeper than {limits.max_depth}")
    return patch


def check_doc(doc: Doc, limits: TwinLimits, what: str) -> bytes:
    """The document's JSON, or TwinError when it breaks a limit."""
    if depth(doc) > limits.max_depth:
        raise TwinError("too_deep", f"{what}: nesting deeper than {limits.max_depth}")
    raw = orjson.dumps(doc)
    if len(raw) > limits.max_bytes:
        raise TwinError(
            "too_large", f"{what}: {len(raw)} bytes, over the limit of {limits.max_bytes}"
        )
    return raw


def delta(desired: Any, reported: Any) -> Doc:
    """What ``desired`` asks that ``reported`` does not show yet: per key, the
    desired value where it differs (objects compared key by key)."""
    if not isinstance(desired, dict):
        return {}
    rep = reported if isinstance(reported, dict) else {}
    out: Doc = {}
    for key, want in desired.items():
        have = rep.get(key, _MISSING)
        if isinstance(want, dict) and isinstance(have, dict):
            sub = delta(want, have)
            if sub:
                out[key] = sub
        elif have is _MISSING or have != want:
            out[key] = want
    return out


_MISSING = object()
