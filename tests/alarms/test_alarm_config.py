"""The ``alarms:`` section: errors name the file, line and key; a change
needs a restart (a reload says so instead of ignoring it)."""

from __future__ import annotations

import pytest

from edgeway.config import ConfigError, parse_config
from edgeway.runtime.reload import plan


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("alarms:\n  max_shelve: -5m\n", "alarms.max_shelve", 2),
        ("alarms:\n  flood_threshold: 0\n", "alarms.flood_threshold", 2),
        ("alarms:\n  types:\n    overheat: {latch: true}\n", "alarms.types.overheat.latch", 3),
        ("alarms:\n  defaults: {require_confirm: maybe}\n", "alarms.defaults.require_confirm", 2),
    ],
)
def test_bad_alarm_settings_name_file_line_and_key(text: str, key: str, line: int) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "gw.yaml")
    issues = [str(i) for i in e.value.issues]
    assert any(key in i and f"gw.yaml:{line}" in i for i in issues), issues


def test_an_alarms_change_needs_a_restart() -> None:
    old = parse_config("alarms: {max_shelve: 8h}\n")
    new = parse_config("alarms: {max_shelve: 2h}\n")
    assert plan(old, new).restart_needed == ["alarms"]
    assert not plan(old, parse_config("alarms: {max_shelve: 8h}\n")).restart_needed
