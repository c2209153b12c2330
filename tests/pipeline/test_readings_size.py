"""The batch size estimate equals the per-reading one it replaces on the hot path."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeway.pipeline.core import reading_size, readings_size
from edgeway.reading import Reading

_names = st.text(min_size=1, max_size=12)
_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=20),
)
_readings = st.builds(
    Reading,
    device_id=st.text(max_size=20),
    ts=st.floats(0, 2e9),
    metrics=st.dictionaries(_names, _values, min_size=1, max_size=6),
    tags=st.dictionaries(_names, st.text(max_size=10), max_size=3),
)


@given(st.lists(_readings, max_size=20))
def test_readings_size_is_the_sum_of_reading_sizes(readings: list[Reading]) -> None:
    assert readings_size(readings) == sum(map(reading_size, readings))
