"""``edgeway check`` and ``edgeway run`` refuse the same configurations, through
one ``validate()`` that builds nothing running; each error is
``file:line: key path: what was expected``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from certs import CertFiles, make_cert_files
from edgeway.cli import main as cli_main
from edgeway.config import ConfigError, parse_config
from edgeway.validate import validate

PLACEHOLDER_HASH = "$argon2id$v=19$m=65536,t=3,p=4$..."


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_cert_files(tmp_path_factory.mktemp("certs"))


def check_and_run(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run ``edgeway check`` and ``edgeway run`` on ``text``; both must refuse
    it with the same lines, and ``run`` before anything started. The lines."""
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(text, encoding="utf-8")
    capsys.readouterr()
    assert cli_main(["check", str(cfg)]) == 2
    checked = capsys.readouterr().err.splitlines()
    data = tmp_path / "data"
    argv = ["run", "-c", str(cfg), "--data-dir", str(data), "--mqtt-listen", "127.0.0.1:0"]
    if "listeners:" in text:
        argv = argv[:-2]  # the test is about the configured listeners
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.splitlines() == checked
    assert not data.exists()  # refused before the outbox or anything started
    prefix = f"error: {cfg}:"
    assert all(line.startswith(prefix) for line in checked), checked
    return [line[len(prefix) :] for line in checked]


def test_listener_certificate_file_missing(
    tmp_path: Path, certs: CertFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    text = f"""\
mqtt:
  listeners:
    - bind: "127.0.0.1:0"
      tls:
        cert: {tmp_path / "nosuch.pem"}
        key: {certs.server_key}
"""
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line.startswith("5: mqtt.listeners[0].tls.cert: cannot read TLS certificate ")
    assert "nosuch.pem: no such file or directory" in line


def test_listener_key_that_is_not_a_key(
    tmp_path: Path, certs: CertFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    text = f"""\
mqtt:
  listeners:
    - bind: "127.0.0.1:0"
      tls: {{cert: {certs.server_cert}, key: {certs.server_cert}}}
"""
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line.startswith("4: mqtt.listeners[0].tls.key: TLS key ")
    assert "not a PEM private key" in line


def test_http_ingest_ca_missing(
    tmp_path: Path, certs: CertFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    text = f"""\
http_ingest:
  listen: "127.0.0.1:0"
  tls:
    cert: {certs.server_cert}
    key: {certs.server_key}
    ca: {tmp_path / "no-ca.pem"}
    require_client_cert: true
"""
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line.startswith("6: http_ingest.tls.ca: cannot read TLS CA "), line


def test_sink_ca_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = f"""\
sinks:
  - name: cloud
    url: mqtts://127.0.0.1:8883
    options:
      ca: {tmp_path / "cloud-ca.pem"}
"""
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line.startswith("5: sinks[0].options.ca (cloud): "), line


def test_a_sink_types_own_check_names_its_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = """\
sinks:
  - name: aws
    url: mqtt://broker.example.com
    options:
      preset: aws_iot
"""
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line == "5: sinks[0].options.preset (aws): aws_iot needs an mqtts:// url"


def test_placeholder_password_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = f"""\
mqtt:
  users:
    - username: sensor-7
      password_hash: "{PLACEHOLDER_HASH}"
"""
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line == (
        "4: mqtt.users[0].password_hash: not a complete argon2 hash: no password can "
        "match it (make one with 'edgeway passwd')"
    )


def test_a_real_hash_passes() -> None:
    from edgeway.devices.config_auth import hash_password

    text = f'mqtt:\n  users:\n    - {{username: a, password_hash: "{hash_password("pw")}"}}\n'
    assert validate(text) == []


def test_route_to_an_unknown_sink_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        'sinks:\n  - {name: cloud, url: "file:///tmp/x"}\nroutes:\n  - {name: r, sinks: [clod]}\n'
    )
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line == "4: routes[0].sinks: unknown sink 'clod'; sinks: cloud"


def test_missing_sink_library_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)  # as if nats-py were not installed
    text = 'sinks:\n  - name: stream\n    url: "nats://127.0.0.1:4222"\n'
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line == ("3: sinks[0] (stream): nats-py is not installed (pip install 'edgeway[sinks]')")


def test_missing_adapter_library_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "aiocoap", None)
    (line,) = check_and_run(tmp_path, 'coap:\n  listen: "127.0.0.1:0"\n', capsys)
    assert line == "1: coap: aiocoap is not installed (pip install 'edgeway[protocols]')"


def test_adapter_settings_refused_when_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only the Modbus adapter itself knows a float32 at 65535 runs past the end.
    text = """\
modbus:
  - name: plc
    device_id: plc-1
    host: 127.0.0.1
    groups:
      - points:
          - {metric: t, address: 65535, data_type: float32}
"""
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line == "2: modbus[0]: modbus plc: t runs past address 65535"


def test_duplicate_key_is_reported_at_the_second_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = 'admin:\n  listen: "127.0.0.1:9180"\n  listen: "0.0.0.0:9180"\n'
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line == (
        "3: admin.listen: key 'listen' given twice (first on line 2); YAML would keep only this one"
    )


def test_typo_suggests_the_nearest_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = 'admin:\n  listn: "127.0.0.1:9180"\nsinks:\n  - {name: s, url: "file:///tmp/x", options: {max_recods: 5}}\n'
    assert check_and_run(tmp_path, text, capsys) == [
        "2: admin.listn: unknown key 'listn', did you mean 'listen'?",
    ]
    # Sink options are checked once the schema passes; same hint there.
    text = 'sinks:\n  - {name: s, url: "file:///tmp/x", options: {max_recods: 5}}\n'
    assert check_and_run(tmp_path, text, capsys) == [
        "2: sinks[0].options.max_recods (s): unknown key 'max_recods', did you mean 'max_records'?"
    ]


def test_typos_in_steps_and_sink_schemes_get_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = """\
sinks:
  - {name: cloud, url: "htps://ingest.example.com"}
routes:
  - name: r
    steps:
      - window: {size: 10s, aggregates: [mean], grase: 1s}
      - deadbnd: {percent: 1}
"""
    lines = validate(text, filename="t.yaml")
    assert [str(i) for i in lines] == [
        "t.yaml:6: routes[0].steps[0].window.grase: unknown key 'grase', did you mean 'grace'?",
        "t.yaml:7: routes[0].steps[1]: unknown step type 'deadbnd', did you mean 'deadband'?; "
        "types: anomaly, deadband, dedup, map, model, on_change, priority, rate_limit, rules, "
        "transform, validate, window",
    ]
    text = 'sinks:\n  - {name: cloud, url: "htps://ingest.example.com"}\n'
    (line,) = check_and_run(tmp_path, text, capsys)
    assert line.startswith(
        "2: sinks[0].url (cloud): no sink for scheme 'htps', did you mean 'https'?"
    )


def test_no_suggestion_when_nothing_is_close() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("admin:\n  zzzz: 1\n", "a.yaml")
    assert str(e.value) == "a.yaml:2: admin.zzzz: unknown key 'zzzz'"


def test_every_issue_at_once_and_text_like_file(tmp_path: Path, certs: CertFiles) -> None:
    text = f"""\
mqtt:
  listeners:
    - {{bind: "127.0.0.1:0", tls: {{cert: {tmp_path / "a.pem"}, key: {certs.server_key}}}}}
  users:
    - {{username: u, password_hash: "{PLACEHOLDER_HASH}"}}
sinks:
  - {{name: a, url: "file:///tmp/x"}}
  - {{name: a, url: "file:///tmp/y"}}
routes:
  - {{name: r, sinks: [b]}}
"""
    issues = validate(text, filename="pushed.yaml")
    assert [(i.line, i.key) for i in issues] == [
        (3, "mqtt.listeners[0].tls.cert"),
        (5, "mqtt.users[0].password_hash"),
        (8, "sinks[1].name"),
        (10, "routes[0].sinks"),
    ]
    path = tmp_path / "pushed.yaml"
    path.write_text(text, encoding="utf-8")
    from_file = validate(path)
    assert [(i.line, i.key, i.message) for i in from_file] == [
        (i.line, i.key, i.message) for i in issues
    ]
    assert all(i.file == str(path) for i in from_file)


def test_a_good_configuration_passes_check_and_names_no_issue(
    tmp_path: Path, certs: CertFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(
        f"""\
mqtt:
  listeners:
    - {{bind: "127.0.0.1:0", tls: {{cert: {certs.server_cert}, key: {certs.server_key}}}}}
sinks:
  - {{name: cloud, url: "file://{tmp_path}/out.jsonl"}}
routes:
  - {{name: r, sinks: [cloud]}}
""",
        encoding="utf-8",
    )
    assert cli_main(["check", str(cfg)]) == 0
    assert capsys.readouterr().out == f"{cfg}: ok\n"
