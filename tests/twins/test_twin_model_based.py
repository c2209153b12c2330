"""A model-based test of the twin store: random interleavings of desired and
reported patches (conditional or not, some over the limits), gets and
restarts, checked after every step against a reference model written
independently of edgeway.twins.model (issue 16: 10,000 interleaved steps)."""

from __future__ import annotations

import asyncio
import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgeway.twins.model import TwinError, TwinLimits
from edgeway.twins.service import TwinService

DEVICES = ["a", "b", "c"]
KEYS = ["x", "y", "z"]
LIMITS = TwinLimits(max_bytes=300, max_depth=3)

values = st.one_of(st.integers(-5, 5), st.booleans(), st.text("ab", max_size=3), st.none())
patches = st.recursive(
    values,
    lambda inner: st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
    max_leaves=6,
).filter(lambda p: isinstance(p, dict))


def ref_merge(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2's pseudo-code, written out again."""
    if isinstance(patch, dict):
        result = copy.deepcopy(target) if isinstance(target, dict) else {}
        for name, value in patch.items():
            if value is None:
                if name in result:
                    del result[name]
            else:
                result[name] = ref_merge(result.get(name), value)
        return result
    return copy.deepcopy(patch)


def ref_depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max([ref_depth(x) for x in v.values()] or [0])
    if isinstance(v, list):
        return 1 + max([ref_depth(x) for x in v] or [0])
    return 0


def ref_delta(desired: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, want in desired.items():
        if k not in reported:
            out[k] = want
        elif isinstance(want, dict) and isinstance(reported[k], dict):
            sub = ref_delta(want, reported[k])
            if sub:
                out[k] = sub
        elif reported[k] != want:
            out[k] = want
    return out


class TwinMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.loop = asyncio.new_event_loop()
        self.svc = self._open()
        self.model: dict[str, dict[str, Any]] = {
            d: {"desired": {}, "reported": {}, "desired_v": 0, "reported_v": 0} for d in DEVICES
        }

    def _open(self) -> TwinService:
        svc = TwinService(self.dir, LIMITS, durability="os")
        self.loop.run_until_complete(svc.open())
        return svc

    def teardown(self) -> None:
        if hasattr(self, "svc"):
            self.loop.run_until_complete(self.svc.close())
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        device=st.sampled_from(DEVICES),
        section=st.sampled_from(["desired", "reported"]),
        patch=patches,
        stale=st.sampled_from([None, 0, -1]),
    )
    def patch(self, device: str, section: str, patch: dict[str, Any], stale: int | None) -> None:
        m = self.model[device]
        version = m[f"{section}_v"]
        if_match = None if stale is None else version + stale  # current, or one behind
        expected_doc = ref_merge(m[section], patch)
        refused = (
            (if_match is not None and if_match != version)
            or ref_depth(patch) > LIMITS.max_depth
            or ref_depth(expected_doc) > LIMITS.max_depth
            or len(orjson.dumps(expected_doc)) > LIMITS.max_bytes
        )
        try:
            twin = self.loop.run_until_complete(
                self.svc.patch(device, section, patch, if_match=if_match, by="model")  # type: ignore[arg-type]
            )
        except TwinError as e:
            assert refused, f"refused ({e.code}: {e}) but the model accepts it"
            return
        assert not refused, "accepted but the model refuses it"
        m[section] = expected_doc
        m[f"{section}_v"] = version + 1
        assert getattr(twin, f"{section}_version") == version + 1

    @rule(device=st.sampled_from(DEVICES))
    def get(self, device: str) -> None:
        twin = self.loop.run_until_complete(self.svc.get(device))
        m = self.model[device]
        assert twin.desired == m["desired"] and twin.reported == m["reported"]
        assert (twin.desired_version, twin.reported_version) == (m["desired_v"], m["reported_v"])
        assert twin.delta == ref_delta(m["desired"], m["reported"])

    @precondition(lambda self: hasattr(self, "svc"))
    @rule()
    def restart(self) -> None:
        self.loop.run_until_complete(self.svc.close())
        self.svc = self._open()

    @invariant()
    def stored_versions_are_the_models(self) -> None:
        # After every step, not only when a get is drawn: a patch refused
        # late (after a partial write) would show here at once.
        if not hasattr(self, "svc"):
            return
        for d in DEVICES:
            twin = self.loop.run_until_complete(self.svc.get(d))
            m = self.model[d]
            assert (twin.desired_version, twin.reported_version) == (
                m["desired_v"],
                m["reported_v"],
            )


TwinMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=100, deadline=None)
test_twin_store_against_a_reference_model = TwinMachine.TestCase
