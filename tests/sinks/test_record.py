"""Records as the outbox hands them to sinks: built from the stored text,
id and device id cut out of it, the rest parsed on first use."""

from __future__ import annotations

import copy

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeway.outbox.store import record_text
from edgeway.reading import Reading
from edgeway.sinks.base import Record, stored_records


def full(seq: int, prio: int, text: bytes) -> Record:
    d = orjson.loads(text)
    return Record(d["id"], seq, d["device_id"], d["ts"], d["metrics"], d.get("tags") or {}, prio)


names = st.text(min_size=1, max_size=20)
metric_values = st.one_of(
    st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), st.booleans()
)


@given(
    gateway=names,
    device=names,
    ts=st.floats(0, 4e9),
    metrics=st.dictionaries(names, metric_values, min_size=1, max_size=5),
    tags=st.dictionaries(names, names, max_size=3),
    prio=st.integers(0, 9),
    seq=st.integers(1, 2**40),
)
def test_stored_record_equals_the_parsed_one(
    gateway: str,
    device: str,
    ts: float,
    metrics: dict[str, int | float | bool],
    tags: dict[str, str],
    prio: int,
    seq: int,
) -> None:
    # Quotes, backslashes and control characters in ids take the slow path;
    # everything else is cut out of the text. Both must give the same record.
    r = Reading(device, ts, metrics, tags=tags, priority=prio)
    text = record_text(r, f"{gateway}:{seq}")
    (lazy,) = stored_records([seq], [prio], [text])
    want = full(seq, prio, text)
    assert lazy.id == want.id and lazy.device_id == want.device_id
    assert lazy == want
    assert lazy.to_json_bytes() == text
    assert orjson.dumps(lazy.to_json_obj()) == text


def test_only_what_is_used_is_parsed() -> None:
    text = record_text(Reading("dev-1", 1.5, {"t": 2}, tags={"site": "a"}), "gw:7")
    (r,) = stored_records([7], [0], [text])
    assert (r.id, r.seq, r.device_id, r.priority, r.json) == ("gw:7", 7, "dev-1", 0, text)
    with pytest.raises(AttributeError):
        object.__getattribute__(r, "metrics")  # not parsed yet
    assert r.metrics == {"t": 2}
    assert r.ts == 1.5 and r.tags == {"site": "a"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        r.nope  # noqa: B018
    assert copy.copy(r) == r


def test_escaped_device_id_and_unicode() -> None:
    texts = [
        record_text(Reading('dev"quoted', 1.0, {"a": 1}), "gw:1"),
        record_text(Reading("dev\\back", 1.0, {"a": 1}), "gw:2"),
        record_text(Reading("Kühlraum-3", 1.0, {"a": 1}), "gw:3"),
        record_text(Reading("d", 1.0, {"a": 1}), 'g"w:4'),
    ]
    recs = stored_records([1, 2, 3, 4], [0, 0, 0, 0], texts)
    assert [r.device_id for r in recs] == ['dev"quoted', "dev\\back", "Kühlraum-3", "d"]
    assert recs[3].id == 'g"w:4'
    assert [r.to_json_bytes() for r in recs] == texts
