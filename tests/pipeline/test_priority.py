"""The ``priority`` step beyond its docs example: failures of ``when``, never
lowering a priority, and configuration errors naming the key."""

from __future__ import annotations

import pytest
from pipeline_harness import MakeHarness, rd

from edgeway.config import ConfigError, parse_config


async def test_when_that_cannot_be_evaluated_counts_an_error(harness: MakeHarness) -> None:
    h = await harness(
        "routes:\n  - name: r\n    steps:\n"
        "      - priority: {level: 3, when: 'temperature / pressure > 1'}\n"
        "      - priority: {level: 1}\n"
    )
    await h.send(rd("d", 1.0, {"temperature": 5}))  # pressure missing: error, level 1 only
    await h.send(rd("d", 2.0, {"temperature": 5, "pressure": 0}))  # division by zero
    await h.send(rd("d", 3.0, {"temperature": 5, "pressure": 1}))  # 3, not lowered to 1
    got = sorted((r.ts, r.priority) for r in await h.take())
    assert got == [(1.0, 1), (2.0, 1), (3.0, 3)]
    steps = h.stats()["routes"][0]["steps"]
    assert steps[0]["errors"] == 2 and steps[1].get("errors", 0) == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{when: 'open(1)'}", "routes[0].steps[0].priority.when"),
        ("{level: 0}", "routes[0].steps[0].priority.level"),
        ("{urgent: true}", "routes[0].steps[0].priority.urgent"),
    ],
)
def test_bad_parameters_name_the_key(params: str, message: str) -> None:
    text = f"routes:\n  - name: r\n    steps:\n      - priority: {params}\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text, "gw.yaml")
    assert any(message in str(i) and "gw.yaml:4" in str(i) for i in e.value.issues), [
        str(i) for i in e.value.issues
    ]
