"""Route matching: which routes take a reading, and which of its metrics.

Example::

    routes:
      - name: boilers
        match:
          devices: ["boiler-*"]          # globs on the device id
          tags: {site: plant-a}           # tags the reading carries (values may be globs)
          device_types: [thermometer]     # globs on the reading's ``type`` tag
          metrics: ["temp*"]              # only these metrics enter the route
          adapters: [mqtt]                # origin adapter
          topics: ["plant/+/boilers/#"]   # MQTT filter on the origin address
        sinks: [cloud]

Every given criterion must hold; several routes may take the same reading.
A route with ``metrics`` takes only those metrics; metrics of a reading that
no matching route takes go to the default sinks, as do readings no route takes.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence

from edgeway.pipeline.config import RouteMatch
from edgeway.reading import Reading

MAX_MATCH_CACHE = 100_000
"""Entries of a route's (device, adapter, address) -> bool cache. A site has at
most tens of thousands of devices; a device sending on many addresses must not
grow it without bound, so it is cleared when full."""


def compile_globs(patterns: Sequence[str]) -> Callable[[str], bool]:
    """A predicate true for names matching any of ``patterns`` (``*``, ``?``, ``[...]``)."""
    if not patterns:
        return lambda _name: False
    if "*" in patterns:
        return lambda _name: True
    exact = {p for p in patterns if not any(c in p for c in "*?[")}
    globbed = [p for p in patterns if p not in exact]
    if not globbed:
        return exact.__contains__
    rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in globbed))
    match = rx.match

    def pred(name: str) -> bool:
        return name in exact or match(name) is not None

    return pred


def topic_filter_regex(flt: str) -> str:
    """An MQTT filter (``+`` one level, ``#`` the rest) as a regular expression."""
    parts: list[str] = []
    for level in flt.split("/"):
        if level == "#":
            # '#' is the last level and also matches its parent ("a/#" matches "a").
            return "/".join(parts) + "(?:/.*)?" if parts else ".*"
        parts.append("[^/]*" if level == "+" else re.escape(level))
    return "/".join(parts)


class RouteMatcher:
    """Compiled ``match:`` criteria of one route."""

    def __init__(self, match: RouteMatch) -> None:
        self.devices = compile_globs(match.devices) if match.devices else None
        self.types = compile_globs(match.device_types) if match.device_types else None
        self.tags = [(k, compile_globs([v])) for k, v in match.tags.items()]
        self.metrics = compile_globs(match.metrics) if match.metrics else None
        self.adapters = frozenset(match.adapters) if match.adapters else None
        self.topics = (
            re.compile("|".join(f"(?:{topic_filter_regex(t)})" for t in match.topics) + r"\Z")
            if match.topics
            else None
        )
        # Device, adapter and address decide most matches and repeat for every
        # message of a device: cache that part (tags can change per reading).
        self._cache: dict[tuple[str, str, str], bool] = {}
        self.takes_all = (
            self.devices is None
            and self.types is None
            and not self.tags
            and self.metrics is None
            and self.adapters is None
            and self.topics is None
        )

    def _static(self, r: Reading) -> bool:
        key = (r.device_id, r.origin.adapter, r.origin.address)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ok = (
            (self.devices is None or self.devices(r.device_id))
            and (self.adapters is None or r.origin.adapter in self.adapters)
            and (self.topics is None or self.topics.match(r.origin.address) is not None)
        )
        if len(self._cache) >= MAX_MATCH_CACHE:
            self._cache.clear()
        self._cache[key] = ok
        return ok

    def matches(self, r: Reading) -> bool:
        """True if the route takes ``r`` (before the metric filter)."""
        if self.takes_all:
            return True
        if not self._static(r):
            return False
        if self.types is not None and not self.types(r.tags.get("type", "")):
            return False
        for k, pred in self.tags:
            v = r.tags.get(k)
            if v is None or not pred(v):
                return False
        return True
