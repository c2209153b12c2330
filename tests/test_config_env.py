"""``${VAR}`` references in configuration values (edgeway.config_env)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgeway.config import ConfigError, parse_config_lines
from edgeway.config_env import MAX_EXPANDED, construct, expand_tree

TEXT = """\
gateway:
  id: ${GW_ID:-site-a}
  data_dir: /var/lib/edgeway
sinks:
  - name: cloud
    url: https://ingest.example.com/v1/telemetry
    options:
      headers: {Authorization: "Bearer ${CLOUD_TOKEN}"}
"""


def _parse(text: str, env: dict[str, str]) -> object:
    return parse_config_lines(text, "edgeway.yaml", env)[0]


def test_reference_and_default_are_expanded() -> None:
    cfg = parse_config_lines(TEXT, "edgeway.yaml", {"CLOUD_TOKEN": "s3cret"})[0]
    assert cfg.gateway.id == "site-a"
    assert cfg.sinks[0].options["headers"] == {"Authorization": "Bearer s3cret"}
    cfg = parse_config_lines(TEXT, "edgeway.yaml", {"CLOUD_TOKEN": "t", "GW_ID": "gw-9"})[0]
    assert cfg.gateway.id == "gw-9"


def test_missing_variable_names_file_line_and_key() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_lines(TEXT, "edgeway.yaml", {})
    (issue,) = e.value.issues
    assert (issue.file, issue.line, issue.key) == (
        "edgeway.yaml",
        8,
        "sinks[0].options.headers.Authorization",
    )
    assert "CLOUD_TOKEN is not set" in issue.message
    assert str(issue).startswith("edgeway.yaml:8: sinks[0].options.headers.Authorization: ")


def test_every_missing_variable_is_reported() -> None:
    text = "gateway:\n  id: ${A}\n  data_dir: ${B}/x\n"
    with pytest.raises(ConfigError) as e:
        parse_config_lines(text, "f.yaml", {})
    assert [(i.line, i.key) for i in e.value.issues] == [(2, "gateway.id"), (3, "gateway.data_dir")]


def test_empty_value_takes_colon_default_but_not_plain_default() -> None:
    text = "gateway:\n  id: ${A:-x}\n  data_dir: /d${B-/y}\n"
    cfg = parse_config_lines(text, "f", {"A": "", "B": ""})[0]
    assert cfg.gateway.id == "x"
    assert str(cfg.gateway.data_dir) == "/d"
    cfg = parse_config_lines(text, "f", {})[0]
    assert str(cfg.gateway.data_dir) == "/d/y"


def test_plain_value_is_typed_quoted_value_stays_text() -> None:
    root = yaml.compose("a: ${N}\nb: '${N}'\nc: ${T}\n", Loader=yaml.SafeLoader)
    assert expand_tree(root, {"N": "1234", "T": "true"}) == []
    assert construct(root) == {"a": 1234, "b": "1234", "c": True}
    cfg = parse_config_lines("outbox:\n  max_bytes: ${N}\n", "f", {"N": "1234"})[0]
    assert cfg.outbox.max_bytes == 1234


def test_value_cannot_inject_structure() -> None:
    # A variable holding YAML stays one string: the result is not parsed again.
    text = "gateway:\n  id: ${X}\n"
    cfg = parse_config_lines(text, "f", {"X": "a\nlog: {level: debug}"})[0]
    assert cfg.gateway.id == "a\nlog: {level: debug}"
    assert cfg.log.level == "info"


def test_escape_and_bare_dollar_are_literal() -> None:
    text = "gateway:\n  id: 'p$$ss$${X}'\n"
    cfg = parse_config_lines(text, "f", {"X": "no"})[0]
    assert cfg.gateway.id == "p$$ss${X}"


def test_expansion_is_not_recursive_even_through_aliases() -> None:
    # A value that contains "${" is used as it is, also where an alias repeats it.
    text = "gateway:\n  id: &v ${X}\nlog:\n  level: info\nsinks: []\nx_alias: *v\n"
    with pytest.raises(ConfigError) as e:  # x_alias is an unknown key: the schema still runs
        parse_config_lines(text, "f", {"X": "${HOME}"})
    assert [i.key for i in e.value.issues] == ["x_alias"]
    cfg = parse_config_lines("gateway:\n  id: ${X}\n", "f", {"X": "${HOME}"})[0]
    assert cfg.gateway.id == "${HOME}"


def test_malformed_reference_is_an_error() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_lines("gateway:\n  id: ${not valid}\n", "f", {})
    assert e.value.issues[0].line == 2
    assert "malformed reference" in e.value.issues[0].message


def test_expanded_value_is_bounded() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_lines("gateway:\n  id: ${X}\n", "f", {"X": "a" * (MAX_EXPANDED + 1)})
    assert "once expanded" in e.value.issues[0].message


def test_keys_are_not_expanded() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_lines("${SECTION}:\n  id: a\n", "f", {"SECTION": "gateway"})
    assert "unknown key '${SECTION}'" in e.value.issues[0].message


def test_edgeway_check_reads_the_process_environment(tmp_path: Path) -> None:
    path = tmp_path / "edgeway.yaml"
    path.write_text(TEXT, encoding="utf-8")
    base = [sys.executable, "-m", "edgeway", "check", str(path)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    bad = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0
    assert (
        f"{path}:8: sinks[0].options.headers.Authorization: environment variable"
        in bad.stderr + bad.stdout
    )
    good = subprocess.run(
        base, capture_output=True, text=True, env={**env, "CLOUD_TOKEN": "t"}, timeout=60
    )
    assert good.returncode == 0, good.stderr
