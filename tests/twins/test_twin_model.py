"""Twin documents: RFC 7396 merge patch, the delta, the limits."""

from __future__ import annotations

from typing import Any

import pytest

from edgeway.twins.model import TwinError, TwinLimits, check_doc, check_patch, delta, merge_patch

# RFC 7396, appendix A: (target, patch, result)
RFC_CASES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_CASES)
def test_rfc7396_examples(target: Any, patch: Any, result: Any) -> None:
    before = repr(target)
    assert merge_patch(target, patch) == result
    assert repr(target) == before  # the target is not modified


def test_delta_is_what_desired_asks_that_reported_lacks() -> None:
    desired = {"setpoint": 42, "mode": "auto", "schedule": {"start": "06:00", "stop": "18:00"}}
    reported = {"setpoint": 40, "mode": "auto", "schedule": {"start": "06:00"}, "rpm": 1400}
    assert delta(desired, reported) == {"setpoint": 42, "schedule": {"stop": "18:00"}}
    assert delta(desired, desired) == {}
    assert delta({"a": {"b": 1}}, {"a": 5}) == {"a": {"b": 1}}


def test_limits() -> None:
    limits = TwinLimits(max_bytes=100, max_depth=3)
    with pytest.raises(TwinError) as e:
        check_patch([1], limits)
    assert e.value.code == "invalid"
    with pytest.raises(TwinError) as e:
        check_patch({"a": {"b": {"c": {"d": 1}}}}, limits)
    assert e.value.code == "too_deep"
    with pytest.raises(TwinError) as e:
        check_doc({"a": "x" * 200}, limits, "desired")
    assert e.value.code == "too_large"
    assert check_doc({"a": {"b": {"c": 1}}}, limits, "desired") == b'{"a":{"b":{"c":1}}}'
