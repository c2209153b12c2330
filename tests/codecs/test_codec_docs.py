"""The configuration example in docs/codecs.md loads, and each codec in it builds."""

from __future__ import annotations

import re
from pathlib import Path

from edgeway.codecs.base import get_codec
from edgeway.config import parse_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "codecs.md"


def test_docs_example_loads_and_codecs_build() -> None:
    text = DOCS.read_text(encoding="utf-8")
    [block] = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    cfg = parse_config(block, str(DOCS))
    subs = cfg.mqtt_client[0].subscriptions
    assert {s.codec for s in subs} == {"json", "senml+json", "binary", "plain", "sparkplug_b"}
    for s in subs:
        assert get_codec(s.codec, s.codec_options).name == s.codec
