"""The ``edgeway`` command line as a user types it.

``stats`` and ``deadletter`` hand their own options on to their own parsers;
the common options (``--data-dir``, ``--config``) and theirs (``--json``) are
accepted in any order, as ``edgeway --help`` and docs/outbox.md show them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from edgeway.cli import main as cli_main
from edgeway.config import OutboxSection
from edgeway.outbox import Outbox


async def _empty_outbox(data_dir: Path) -> None:
    ob = Outbox(data_dir / "outbox.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    await ob.open()
    await ob.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", "--json", "--data-dir", "{d}"],
        ["stats", "--data-dir", "{d}", "--json"],
        ["stats", "--json"],  # --data-dir comes from the config file
    ],
)
def test_stats_json_in_any_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    (tmp_path / "stats.json").write_bytes(orjson.dumps({"at": 1.0, "sinks": {}}))
    cfg = tmp_path / "edgeway.yaml"
    cfg.write_text(f"gateway:\n  data_dir: {tmp_path}\n", encoding="utf-8")
    args = [a.replace("{d}", str(tmp_path)) for a in argv]
    assert cli_main([*args, "--config", str(cfg)]) == 0
    assert orjson.loads(capsys.readouterr().out)["at"] == 1.0


def test_stats_without_figures_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["stats", "--json", "--data-dir", str(tmp_path)]) == 1
    assert "no figures" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["deadletter", "--data-dir", "{d}", "list"],
        ["deadletter", "list", "--data-dir", "{d}"],
        ["deadletter", "list", "--json", "--data-dir", "{d}"],
        ["deadletter", "--data-dir", "{d}", "list", "--sink", "a", "--json"],
    ],
)
def test_deadletter_common_options_in_any_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    asyncio.run(_empty_outbox(tmp_path))
    assert cli_main([a.replace("{d}", str(tmp_path)) for a in argv]) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err


def test_deadletter_names_a_missing_outbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["deadletter", "list", "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_unknown_option_is_still_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["run", "--no-such-option"])
    assert e.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["deadletter", "list", "--no-such-option"])
    assert e.value.code == 2


def test_sink_url_with_unknown_scheme_is_refused_before_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--data-dir", str(tmp_path / "d"), "--mqtt-listen", "127.0.0.1:0"]
    assert cli_main([*argv, "--sink", "ftp://example/x"]) == 2
    err = capsys.readouterr().err
    assert "no sink for scheme 'ftp'" in err and "http" in err and "postgresql" in err
    assert not (tmp_path / "d").exists()  # nothing was started or created


ROUTES = """\
sinks:
  - {name: cloud, url: "file:///nonexistent/x"}
routes:
  - name: r
    sinks: [nosuch, cloud]
  - name: r
    steps:
      - validate: {required: [t], quarantine: quar}
pipeline:
  default_sinks: [gone]
"""


def test_check_names_route_problems_with_their_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(ROUTES, encoding="utf-8")
    assert cli_main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"error: {cfg}:6: routes[1].name: route 'r' defined twice" in err
    # An error, not a warning: `run` refuses it too (unless --sink adds one).
    assert f"error: {cfg}:5: routes[0].sinks: unknown sink 'nosuch'; sinks: cloud" in err, err
    assert any(f"{cfg}:8: routes[1].steps[0].validate.quarantine:" in x for x in err), err
    assert any(f"{cfg}:10: pipeline.default_sinks:" in x for x in err), err


def test_run_refuses_unknown_route_sinks_in_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("routes:\n  - name: r\n    sinks: [sink2]\n", encoding="utf-8")
    argv = ["run", "-c", str(cfg), "--data-dir", str(tmp_path / "d")]
    assert cli_main([*argv, "--mqtt-listen", "127.0.0.1:0", "--sink", "file:///x"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {cfg}:3: routes[0].sinks: unknown sink 'sink2'; sinks: sink1\n"
    assert not (tmp_path / "d").exists()  # refused before anything started


def test_sink_defined_twice_is_refused_by_check_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        'sinks:\n  - {name: a, url: "file:///x"}\n  - {name: a, url: "file:///y"}\n',
        encoding="utf-8",
    )
    want = f"error: {cfg}:3: sinks[1].name: sink 'a' defined twice\n"
    assert cli_main(["check", str(cfg)]) == 2
    assert capsys.readouterr().err == want
    argv = [
        "run",
        "-c",
        str(cfg),
        "--data-dir",
        str(tmp_path / "d"),
        "--mqtt-listen",
        "127.0.0.1:0",
    ]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err == want


def test_check_with_sink_accepts_routes_to_the_sinks_run_would_add(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("routes:\n  - name: r\n    sinks: [sink1]\n", encoding="utf-8")
    assert cli_main(["check", str(cfg)]) == 2
    assert "routes[0].sinks: unknown sink 'sink1'; sinks: none" in capsys.readouterr().err
    assert cli_main(["check", str(cfg), "--sink", f"file://{tmp_path}/out.jsonl"]) == 0
    assert capsys.readouterr().out == f"{cfg}: ok\n"
