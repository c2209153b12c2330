"""Configuration loading: defaults, precise errors, `edgeway check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeway.cli import main
from edgeway.config import (
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    parse_config,
    parse_host_port,
)


def test_embedded_defaults() -> None:
    cfg = Config()
    assert [lst.bind for lst in cfg.mqtt.listeners] == ["127.0.0.1:1883"]
    assert cfg.mqtt.listeners[0].allow_anonymous is True
    assert cfg.gateway.data_dir == Path("edgeway-data")
    assert cfg.outbox.durability == "fsync"
    assert cfg.mqtt.telemetry_topics == ["devices/{device_id}/telemetry"]


def test_empty_file_is_defaults() -> None:
    assert parse_config("", "e.yaml") == Config(gateway=Config().gateway)


def test_unknown_key_names_file_line_and_path() -> None:
    text = "gateway:\n  id: gw\nmqtt:\n  limits:\n    max_packet_sise: 10\n"
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "site.yaml")
    (issue,) = ei.value.issues
    assert issue.file == "site.yaml"
    assert issue.line == 5
    assert issue.key == "mqtt.limits.max_packet_sise"
    assert "unknown key" in issue.message
    assert str(issue).startswith("site.yaml:5: mqtt.limits.max_packet_sise: unknown key")


def test_bad_value_in_list_names_index_and_expectation() -> None:
    text = "mqtt:\n  listeners:\n    - bind: 127.0.0.1:1883\n    - bind: nonsense\n"
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "f.yaml")
    (issue,) = ei.value.issues
    assert (issue.line, issue.key) == (4, "mqtt.listeners[1].bind")
    assert "HOST:PORT" in issue.message and "nonsense" in issue.message


def test_several_errors_are_all_reported() -> None:
    text = "outbox:\n  durability: sometimes\n  max_bytes: lots\nlog:\n  level: loud\n"
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "f.yaml")
    keys = {(i.line, i.key) for i in ei.value.issues}
    assert keys == {(2, "outbox.durability"), (3, "outbox.max_bytes"), (5, "log.level")}


def test_yaml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config("mqtt:\n  listeners: [\n  - a\n", "f.yaml")
    assert ei.value.issues[0].line is not None
    assert "YAML" in ei.value.issues[0].message


def test_durations_and_sizes() -> None:
    cfg = parse_config(
        "mqtt:\n  limits:\n    connect_timeout: 250ms\n    max_packet_size: 256KiB\n"
        "outbox:\n  max_age: 7d\n  max_bytes: 2GiB\n"
    )
    assert cfg.mqtt.limits.connect_timeout == pytest.approx(0.25)
    assert cfg.mqtt.limits.max_packet_size == 256 * 1024
    assert cfg.outbox.max_age == 7 * 86400
    assert cfg.outbox.max_bytes == 2 * 1024**3


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config("/nonexistent/edgeway.yaml")
    assert "cannot read" in str(ei.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1883", ("127.0.0.1", 1883)),
        ("[::1]:8883", ("::1", 8883)),
        (":1883", ("0.0.0.0", 1883)),
    ],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("bad", ["1883", "host:", "host:99999", "host:abc"])
def test_host_port_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(bad)


def test_overrides_replace_listeners_and_add_sinks(tmp_path: Path) -> None:
    cfg = apply_overrides(
        Config(),
        data_dir=tmp_path,
        mqtt_listen=["127.0.0.1:18830", "0.0.0.0:18831"],
        sinks=["http://127.0.0.1:9/ingest", "file:///tmp/x"],
    )
    assert cfg.gateway.data_dir == tmp_path
    assert [(lst.bind, lst.allow_anonymous) for lst in cfg.mqtt.listeners] == [
        ("127.0.0.1:18830", True),
        ("0.0.0.0:18831", False),
    ]
    assert [(s.name, s.url) for s in cfg.sinks] == [
        ("sink1", "http://127.0.0.1:9/ingest"),
        ("sink2", "file:///tmp/x"),
    ]


def test_coap_and_http_listen_overrides(tmp_path: Path) -> None:
    # No section: the flag creates one; HTTP is anonymous on loopback only.
    cfg = apply_overrides(Config(), coap_listen="127.0.0.1:5684", http_listen="127.0.0.1:8081")
    assert cfg.coap is not None and cfg.coap.listen == "127.0.0.1:5684"
    assert cfg.http_ingest is not None
    assert (cfg.http_ingest.listen, cfg.http_ingest.allow_anonymous) == ("127.0.0.1:8081", True)
    wide = apply_overrides(Config(), http_listen="0.0.0.0:8081")
    assert wide.http_ingest is not None and wide.http_ingest.allow_anonymous is False
    # A configured (even disabled) section keeps its settings and is turned on at the new address.
    text = (
        "coap: {enabled: false, listen: '127.0.0.1:5683', max_body_size: 2048}\n"
        "http_ingest: {enabled: false, tokens: {d1: token-of-d1-0123456789}}\n"
    )
    cfg = apply_overrides(
        parse_config(text), coap_listen="127.0.0.1:5690", http_listen="0.0.0.0:8090"
    )
    assert cfg.coap is not None and cfg.http_ingest is not None
    assert (cfg.coap.enabled, cfg.coap.listen, cfg.coap.max_body_size) == (
        True,
        "127.0.0.1:5690",
        2048,
    )
    assert (cfg.http_ingest.enabled, cfg.http_ingest.listen) == (True, "0.0.0.0:8090")
    assert cfg.http_ingest.tokens == {"d1": "token-of-d1-0123456789"}
    assert cfg.http_ingest.allow_anonymous is False
    with pytest.raises(ValueError):
        apply_overrides(Config(), coap_listen="nonsense")


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("gateway:\n  id: gw1\n")
    assert main(["check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway:\n  id: gw1\n  colour: red\n")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: gateway.colour: unknown key" in err


def test_check_finds_bad_coap_codecs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "coap.yaml"
    bad.write_text("coap:\n  default_format: plain\n")
    assert main(["check", str(bad)]) == 2
    assert (
        f"{bad}:1: coap: default_format: codec 'plain' options: metric" in capsys.readouterr().err
    )
    bad.write_text("coap:\n  codec_options:\n    json: {timestamp: {field: ts}}\n")
    assert main(["check", str(bad)]) == 2
    assert "coap: codec_options.json: codec 'json' options: timestamp" in capsys.readouterr().err
    bad.write_text("coap:\n  default_format: plain\n  codec_options:\n    plain: {metric: t}\n")
    assert main(["check", str(bad)]) == 0


def test_config_reference_page_is_current() -> None:
    """docs/config-reference.md is generated from the schema; regenerate it with
    `python -m edgeway.config_doc > docs/config-reference.md` after changing config.py."""
    from edgeway.config_doc import render_reference

    page = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
    assert page.read_text(encoding="utf-8") == render_reference()


def _reference_rows() -> dict[str, tuple[str, str, str]]:
    """``{key: (type, default, meaning)}`` of the rendered reference, per table
    (sink option keys are prefixed with their table's first scheme)."""
    from edgeway.config_doc import render_reference

    rows: dict[str, tuple[str, str, str]] = {}
    prefix = ""
    for line in render_reference().splitlines():
        if line.startswith("## `sinks[].options` for `"):
            prefix = line.split("`")[3].removesuffix("://") + ":"
        if line.startswith("| `"):
            key, typ, default, meaning = (c.strip() for c in line.strip("|").split(" | "))
            rows[prefix + key.strip("`")] = (typ, default, meaning)
    return rows


def test_config_reference_gives_every_key_a_meaning() -> None:
    missing = [key for key, (_, _, meaning) in _reference_rows().items() if not meaning]
    assert missing == [], f"keys without a docstring in their config model: {missing}"
    sections = [name for name, info in Config.model_fields.items() if not info.description]
    assert sections == [], f"sections without a docstring in Config: {sections}"


def test_config_reference_shows_defaults_as_yaml() -> None:
    rows = _reference_rows()
    assert rows["mqtt.enabled"][1] == "`true`"
    assert rows["mqtt.listeners[].tls.require_client_cert"][1] == "`false`"
    assert rows["mqtt.limits.max_packet_size"][1] == "`1MiB`"
    assert rows["mqtt.limits.max_session_expiry"][1] == "`7d`"
    assert rows["mqtt.limits.connect_timeout"][1] == "`10s`"
    assert rows["log.level"][1] == "`info`"
    assert rows["mqtt.listeners[]"][1] == "`[{bind: '127.0.0.1:1883', allow_anonymous: true}]`"
    assert rows["mqtt.telemetry_topics"][1] == "`['devices/{device_id}/telemetry']`"


def test_yaml_defaults_read_back_as_the_same_values() -> None:
    from edgeway.config_doc import format_duration, format_size
    from edgeway.config_types import _parse_duration, _parse_size

    for seconds in (0.0, 0.001, 0.25, 0.5, 1.0, 1.5, 10.0, 60.0, 90.0, 3600.0, 86400.0, 7 * 86400):
        assert _parse_duration(format_duration(seconds)) == pytest.approx(seconds)
    for size in (0, 1, 1000, 1024, 4096, 65536, 1024**2, 3 * 1024**2 + 1, 2 * 1024**3):
        assert _parse_size(format_size(size)) == size


def test_config_reference_has_a_table_per_sink_type() -> None:
    rows = _reference_rows()
    for scheme in ("http", "file", "mqtt", "nats", "amqp", "postgresql"):
        assert f"{scheme}:options.max_records" in rows, scheme
    assert rows["http:options.max_records"][1] == "`2000`"
    assert rows["http:options.tls.verify"][1] == "`true`"
    assert rows["file:options.max_file_bytes"][1] == "`64MiB`"
    assert rows["mqtt:options.session_expiry"][1] == "`1d`"
