"""Input limits (edgeway.limits): the codecs and the broker's own telemetry decoder
apply the same rules; flattening stops within the limit; configuration."""

from __future__ import annotations

import time
from typing import Any

import cbor2
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgeway.codecs.base import DecodeError, get_codec
from edgeway.config import InputLimitsSection, parse_config
from edgeway.limits import VALUE_SIZE, FlattenBudget, InputLimits
from edgeway.reading import Origin, Reading
from edgeway.south.mqtt.telemetry import decode_telemetry

SMALL = InputLimits(
    max_readings_per_message=4,
    max_metrics_per_reading=6,
    max_name_length=12,
    max_string_length=10,
    max_flattened_size=120,
)
LONG_STRINGS = InputLimits(
    max_readings_per_message=4,
    max_metrics_per_reading=6,
    max_name_length=12,
    max_flattened_size=120,
)
"""Strings may be as long as a payload here, so the broker's decoder judges by the
payload's length (``check_readings``' ``text_bound``) instead of reading each value."""
LIMIT_REASONS = {
    "too_many_readings",
    "too_many_metrics",
    "name_too_long",
    "value_too_long",
    "too_large",
    "timestamp_out_of_range",
}


def broker_decode(payload: bytes, limits: InputLimits = SMALL) -> list[Reading]:
    return decode_telemetry(payload, "d", "devices/d/telemetry", "c", limits=limits)


def codec_decode(payload: bytes, limits: InputLimits = SMALL, now: float | None = None) -> Any:
    codec = get_codec("json", limits=limits)
    return codec.decode(
        payload, device_id="d", origin=Origin("http"), now=time.time() if now is None else now
    )


def within(readings: list[Reading], limits: InputLimits) -> bool:
    size = 0
    for r in readings:
        if len(r.metrics) > limits.max_metrics_per_reading:
            return False
        for name, v in r.metrics.items():
            if len(name) > limits.max_name_length:
                return False
            if isinstance(v, str) and len(v) > limits.max_string_length:
                return False
            size += len(name) + (len(v) if isinstance(v, str) else VALUE_SIZE)
    return len(readings) <= limits.max_readings_per_message and size <= limits.max_flattened_size


# Metric objects without the keys either decoder reads specially (ts, msg_id, tags,
# device_id, metrics) and without arrays (the codec skips them, the broker refuses).
keys = st.text(alphabet="abcxyz", min_size=1, max_size=15).filter(
    lambda k: k not in ("ts", "msg_id", "tags", "device_id", "metrics")
)
leaves = st.one_of(
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=14),
)
objects = st.recursive(
    st.dictionaries(keys, leaves, min_size=1, max_size=8),
    lambda inner: st.dictionaries(keys, st.one_of(leaves, inner), min_size=1, max_size=8),
    max_leaves=40,
)
messages = st.one_of(objects, st.lists(objects, min_size=1, max_size=6))


@pytest.mark.parametrize("limits", [SMALL, LONG_STRINGS])
@settings(max_examples=300, deadline=None)
@given(doc=messages)
def test_codec_and_broker_apply_the_same_limits(limits: InputLimits, doc: Any) -> None:
    """The JSON codec (HTTP, CoAP, client mode) and the embedded broker's decoder
    accept the same messages, with the same metrics, and what they accept keeps
    within every limit; what they refuse, they refuse for a limit."""
    payload = orjson.dumps(doc)
    outcomes = []
    for decode in (codec_decode, broker_decode):
        try:
            readings = decode(payload, limits)
        except DecodeError as e:
            assert e.reason in LIMIT_REASONS, e
            outcomes.append(None)
        else:
            assert within(readings, limits)
            outcomes.append([r.metrics for r in readings])
    assert outcomes[0] == outcomes[1]


def outcome(decode: Any, payload: bytes) -> list[dict[str, Any]] | str:
    """The metrics of each reading, or the refusal's reason."""
    try:
        readings = decode(payload)
    except DecodeError as e:
        return e.reason
    assert within(readings, SMALL)
    return [r.metrics for r in readings]


@settings(max_examples=200, deadline=None)
@given(messages)
def test_cbor_codec_applies_the_same_limits_as_json(doc: Any) -> None:
    cbor = get_codec("cbor", limits=SMALL)

    def cbor_decode(payload: bytes) -> list[Reading]:
        return cbor.decode(payload, device_id="d", origin=Origin("coap"), now=time.time())

    assert outcome(cbor_decode, cbor2.dumps(doc)) == outcome(codec_decode, orjson.dumps(doc))


senml_records = st.lists(
    st.fixed_dictionaries(
        {"n": st.from_regex(r"[a-z][a-z:./_-]{0,15}", fullmatch=True)},
        optional={
            "v": st.integers(-1000, 1000),
            "vs": st.text(max_size=14),
            "t": st.integers(-100, 0),
            "bn": st.sampled_from(["dev1:", "dev2:"]),
        },
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(senml_records)
def test_senml_codec_keeps_within_the_limits(pack: list[dict[str, Any]]) -> None:
    """SenML packs group records into readings per device and time: whatever
    that gives keeps within the limits, or is refused for one (or for SenML's rules)."""
    codec = get_codec("senml+json", limits=SMALL)
    result = outcome(
        lambda p: codec.decode(p, device_id=None, origin=Origin("coap"), now=time.time()),
        orjson.dumps(pack),
    )
    if isinstance(result, str):
        assert result in LIMIT_REASONS or result.startswith(("senml_", "no_", "bad_")), result


@settings(max_examples=300, deadline=None)
@given(objects)
def test_small_payloads_cannot_break_a_limit(doc: Any) -> None:
    """The broker's fast path skips the per-metric check for payloads up to
    ``unchecked_payload_size`` bytes: no such payload can break a limit."""
    for limits in (SMALL, InputLimits()):
        payload = orjson.dumps(doc)
        if len(payload) <= limits.unchecked_payload_size:
            broker_decode(payload, limits)  # raises nothing


flat_objects = st.dictionaries(
    st.text(max_size=40),
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(), st.text(max_size=40)),
    max_size=12,
)


@settings(max_examples=500, deadline=None)
@given(flat_objects, st.booleans())
@example({"k" * 21: 0, "a": 0}, False)  # a name one over, in the tightest payload
@example({"k" * 21: 0, "": 0, "a": 0}, False)
def test_flat_object_within_never_passes_what_the_full_check_refuses(
    obj: dict[str, Any], spaced: bool
) -> None:
    """The broker's fast path judges a flat object by its payload's length
    (``flat_object_within``): whenever that says yes, the full check agrees."""
    import json

    payload = json.dumps(obj).encode() if spaced else orjson.dumps(obj)
    for limits in (SMALL, LONG_STRINGS, InputLimits(max_name_length=20)):
        if limits.flat_object_within(obj, len(payload)):
            limits.check_readings([Reading("d", 0.0, obj)], 0.0)


def test_unchecked_payload_size_is_derived_from_the_limits() -> None:
    assert InputLimits().unchecked_payload_size == 256
    assert SMALL.unchecked_payload_size == 10
    assert InputLimits(max_flattened_size=100).unchecked_payload_size < 30


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**63), 2**63 - 1))
def test_timestamps_outside_the_plausible_range_are_refused(ts: float) -> None:
    now = 1_800_000_000.0
    payload = b'{"v": 1, "ts": %s}' % orjson.dumps(ts)
    try:
        [r] = codec_decode(payload, InputLimits(), now)
    except DecodeError as e:
        assert e.reason in ("bad_timestamp", "timestamp_out_of_range")
    else:
        assert now - 3650 * 86400 <= r.ts <= now + 3600


@pytest.mark.parametrize("decode", [codec_decode, broker_decode])
def test_timestamp_reasons(decode: Any) -> None:
    now = time.time()
    for ts, reason in [
        (1e300, "bad_timestamp"),  # beyond year 9999: not a time at all
        (-1, "bad_timestamp"),
        (1, "timestamp_out_of_range"),  # 1970: a clock never set
        (now + 7200, "timestamp_out_of_range"),
        (now - 11 * 365 * 86400, "timestamp_out_of_range"),
    ]:
        with pytest.raises(DecodeError) as e:
            decode(orjson.dumps({"v": 1, "ts": ts}), InputLimits())
        assert e.value.reason == reason, ts
    [r] = decode(orjson.dumps({"v": 1, "ts": now + 600}), InputLimits())
    assert r.ts == pytest.approx(now + 600)


def test_nested_blowup_stops_while_flattening(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: nested objects whose names repeat a long prefix on every leaf.
    80 KB in would flatten to ~2 MB (stored and sent to every sink); it is
    refused after about max_flattened_size of work, long before the end."""
    prefix = {"k" * 120: {"k" * 120: {f"a{i:03}": i for i in range(1000)}}}
    payload = orjson.dumps([prefix] * 8)
    assert len(payload) < 100_000
    spent = []
    original = FlattenBudget.spend

    def counting(self: FlattenBudget, name: str, value: object) -> None:
        spent.append(len(name))
        original(self, name, value)

    monkeypatch.setattr(FlattenBudget, "spend", counting)
    for decode in (codec_decode, broker_decode):
        spent.clear()
        with pytest.raises(DecodeError) as e:
            decode(payload, InputLimits())
        assert e.value.reason == "too_large"
        # 8,000 leaves of 246-character names; stopped within the 1 MiB budget.
        assert sum(spent) <= (1 << 20) + 246 + VALUE_SIZE
        assert len(spent) < 4300


def test_a_long_prefix_is_refused_at_the_first_leaf() -> None:
    """Keys longer than a metric name may be are refused before the object is walked."""
    deep: Any = {f"a{i}": 1 for i in range(4000)}
    for _ in range(8):
        deep = {"k" * 500: deep}
    payload = orjson.dumps(deep)  # ~40 KB that flattened to 4000 names of 4000 characters
    for decode in (codec_decode, broker_decode):
        with pytest.raises(DecodeError) as e:
            decode(payload, InputLimits())
        assert e.value.reason == "name_too_long"


def test_each_limit_alone() -> None:
    for doc, reason in [
        ([{"v": 1}] * 5, "too_many_readings"),
        ({f"m{i}": 1 for i in range(7)}, "too_many_metrics"),
        ({"m" * 13: 1}, "name_too_long"),
        ({"a": {"b" * 11: 1}}, "name_too_long"),
        ({"v": "x" * 11}, "value_too_long"),
        ([{"abcdefghij": "0123456789", "k": "0123456789"}] * 4, "too_large"),  # 4 x 31
    ]:
        for decode in (codec_decode, broker_decode):
            with pytest.raises(DecodeError) as e:
                decode(orjson.dumps(doc))
            assert e.value.reason == reason, (doc, decode)


def test_judging_by_payload_length_still_counts_every_number() -> None:
    """The broker's decoder bounds string values by the payload's length; numbers
    still count VALUE_SIZE each: 15 one-digit metrics are 135 characters flattened
    from an 84-byte payload."""
    payload = orjson.dumps([{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}] * 3)
    assert len(payload) < LONG_STRINGS.max_flattened_size
    for decode in (codec_decode, broker_decode):
        with pytest.raises(DecodeError) as e:
            decode(payload, LONG_STRINGS)
        assert e.value.reason == "too_large"
    [r] = broker_decode(b'{"s": "' + b"x" * 90 + b'"}', LONG_STRINGS)  # 1 + 90 characters
    assert len(r.metrics["s"]) == 90


def test_refusal_details_cannot_forge_a_log_line() -> None:
    """Names from the payload appear in refusal details (logged) escaped."""
    for doc in [
        {"x\nWARNING forged" + "y" * 20: 1},  # name_too_long
        {"v": 1, "tags": {"site\nWARNING forged": [1]}},  # bad_tags
        {"v": 1, "tags": {"site\nWARNING forged": "x" * 300}},
        {"a\nWARNING forged": [1]},  # unsupported_value
    ]:
        with pytest.raises(DecodeError) as e:
            broker_decode(orjson.dumps(doc))
        assert "\n" not in str(e.value), doc


def test_config_top_level_and_per_adapter_override() -> None:
    config = parse_config(
        """
input_limits:
  max_string_length: 100
  max_timestamp_ahead: 5m
http_ingest:
  listen: "127.0.0.1:0"
  input_limits: {max_readings_per_message: 7}
coap:
  listen: "127.0.0.1:0"
"""
    )
    http = config.http_ingest
    assert http is not None and http.input_limits is not None
    assert http.input_limits.build() == InputLimits(
        max_readings_per_message=7, max_string_length=100, max_timestamp_ahead=300.0
    )
    assert config.coap is not None and config.coap.input_limits is not None
    assert config.coap.input_limits.build() == InputLimits(
        max_string_length=100, max_timestamp_ahead=300.0
    )
    assert config.mqtt.input_limits is not None
    assert config.mqtt.input_limits.max_flattened_size == 1 << 20
    assert InputLimitsSection(max_flattened_size="64KiB").build().max_flattened_size == 65536


def test_listeners_turned_on_from_the_command_line_get_the_top_level_limits() -> None:
    from edgeway.config import apply_overrides

    config = parse_config("input_limits: {max_string_length: 100}\n")
    cfg = apply_overrides(config, coap_listen="127.0.0.1:0", http_listen="127.0.0.1:0")
    for section in (cfg.coap, cfg.http_ingest):
        assert section is not None and section.input_limits is not None
        assert section.input_limits.build().max_string_length == 100


def test_config_errors_name_the_key() -> None:
    from edgeway.config import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_config("input_limits:\n  max_name_length: 0\n")
    assert "input_limits.max_name_length" in str(e.value)


def test_docs_examples_parse() -> None:
    """The YAML examples in docs/limits.md and docs/configuration.md's section load."""
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    limits_page = (docs / "limits.md").read_text()
    config_page = (docs / "configuration.md").read_text()
    section = config_page.split("## `input_limits`", 1)[1].split("\n## ", 1)[0]
    for text in (limits_page, section):
        (example,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
        config = parse_config(example)
        assert config.http_ingest is not None and config.http_ingest.input_limits is not None
        assert config.http_ingest.input_limits.max_readings_per_message == 100
