"""The ``edgeway`` command line.

``edgeway run``      run the gateway (embedded defaults without a config file)
``edgeway check F``  validate a configuration file without starting anything
``edgeway passwd``   hash a password for the ``mqtt.users`` section
``edgeway deadletter list|replay|purge``  inspect the outbox's dead letters
``edgeway tokens create|list|revoke``  bearer tokens for the admin API
``edgeway users add|list|remove|passwd``  people who log in to the HMI
``edgeway status``   a running gateway's state, through its admin API
``edgeway demo``     gateway + simulated devices + a local cloud, in one command
``edgeway simulate`` simulated devices against a gateway (MQTT, CoAP, HTTP, Modbus, OPC-UA)
``edgeway init``     write a commented starter configuration
``edgeway systemd-unit``  print the systemd unit for this installation
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from edgeway import __version__
from edgeway.config import Config, ConfigError, ConfigIssue, KeyLines, load_config

log = logging.getLogger("edgeway.cli")

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("EDGEWAY_CONFIG") or None,
        help="YAML configuration file (default: $EDGEWAY_CONFIG, else embedded defaults)",
    )
    p.add_argument("--data-dir", type=Path, help="directory for the outbox and broker state")
    p.add_argument("--log-format", choices=["text", "json"], help="log line format (default text)")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeway",
        description="edgeway: an IoT edge gateway with an embedded MQTT broker and "
        "durable store-and-forward to the cloud.",
    )
    parser.add_argument("--version", action="version", version=f"edgeway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the gateway",
        description="Run the gateway. Without a configuration it starts on embedded defaults: "
        "MQTT on 127.0.0.1:1883 (anonymous clients allowed on that loopback listener only), "
        "data under ./edgeway-data.",
    )
    _add_common(run)
    run.add_argument(
        "--mqtt-listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="MQTT listener address; repeatable; replaces the configured listeners",
    )
    run.add_argument(
        "--sink",
        action="append",
        default=[],
        metavar="URL",
        help="add a sink; the scheme picks the type (http, https, mqtt, mqtts, nats, amqp, "
        "postgresql, file); repeatable",
    )
    run.add_argument("--gateway-id", help="this gateway's id (default: the host name)")
    run.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="serve /healthz, /api/status and /metrics at this address",
    )
    run.add_argument(
        "--coap-listen", metavar="HOST:PORT", help="turn on the CoAP listener at this address"
    )
    run.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="turn on the HTTP ingest listener at this address",
    )

    check = sub.add_parser("check", help="validate a configuration file and exit (0 ok, 2 errors)")
    check.add_argument("file", type=Path)
    check.add_argument(
        "--sink",
        action="append",
        default=[],
        metavar="URL",
        help="check as 'edgeway run --sink URL' would run it (routes may name sink1, ...)",
    )

    passwd = sub.add_parser("passwd", help="hash a password for mqtt.users[].password_hash")
    passwd.add_argument("--stdin", action="store_true", help="read the password from stdin")

    dl = sub.add_parser(
        "deadletter",
        help="list, replay or purge dead-lettered batches",
        description="Batches a sink refused for good (an HTTP 4xx, say). replay and purge "
        "need the gateway stopped; list works at any time. See docs/outbox.md.",
    )
    _add_common(dl)
    dl.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="ACTION ...",
        help="list [--sink NAME] [--limit N] [--json] | replay [ID ...] [--sink NAME] | "
        "purge (ID ... | --all) [--sink NAME]; 'edgeway deadletter ACTION --help' for more",
    )

    ob = sub.add_parser(
        "outbox",
        help="purge what a removed sink still had pending (gateway stopped)",
        description="edgeway outbox purge SINK: a sink removed from the configuration keeps "
        "its pending readings until purged on purpose. Needs the gateway stopped. "
        "See docs/reload.md.",
    )
    _add_common(ob)
    ob.add_argument("rest", nargs=argparse.REMAINDER, metavar="purge SINK")

    from edgeway.sim.demo import add_demo_arguments
    from edgeway.sim.runner import add_simulate_arguments

    demo = sub.add_parser(
        "demo",
        help="run a gateway, simulated devices and a local cloud receiver, and watch data flow",
        description="One command, no configuration: the gateway, simulated MQTT/CoAP/HTTP/"
        "Modbus/OPC-UA devices and a local cloud receiver, with live figures. Ctrl-C stops.",
    )
    add_demo_arguments(demo)
    simulate = sub.add_parser(
        "simulate",
        help="run simulated devices against a gateway",
        description="Virtual devices with realistic signals. MQTT/CoAP/HTTP devices send to "
        "--target; for Modbus and OPC-UA the simulator is the server the gateway polls.",
    )
    add_simulate_arguments(simulate)

    stats = sub.add_parser(
        "stats", help="bandwidth report: readings and bytes in from devices vs out to sinks"
    )
    _add_common(stats)
    stats.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="--json", help="print the raw figures as JSON"
    )

    _add_admin_commands(sub)
    from edgeway.deploy.init import add_deploy_commands

    add_deploy_commands(sub)
    sub.add_parser("version", help="print the version")
    return parser


def _add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tokens`` (the token store, offline or while running) and the commands
    that talk to a running gateway's admin API (``status``)."""
    from edgeway.admin.client import add_status_arguments

    tokens = sub.add_parser(
        "tokens",
        help="create, list or revoke admin API bearer tokens",
        description="Tokens live in DATA_DIR/tokens.db and work at once, also while the "
        "gateway runs. See docs/admin-api.md.",
    )
    _add_common(tokens)
    tokens.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="ACTION ...",
        help="create --name NAME --role viewer|operator|engineer|admin | list [--json] | "
        "revoke ID; 'edgeway tokens ACTION --help' for more",
    )
    users = sub.add_parser(
        "users",
        help="add, list or remove the people who log in to the HMI, or set a password",
        description="Users live in DATA_DIR/users.db (argon2id hashes) and work at once, also "
        "while the gateway runs. See docs/hmi.md.",
    )
    _add_common(users)
    users.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="ACTION ...",
        help="add NAME --role viewer|operator|engineer|admin [--password-stdin] | list [--json] "
        "| remove NAME | passwd NAME [--password-stdin]",
    )
    credentials = sub.add_parser(
        "credentials",
        help="per-device MQTT passwords, HTTP/CoAP tokens, groups, disable (audit-logged)",
        description="Per-device credentials in DATA_DIR/credentials.db; work at once, also "
        "while the gateway runs. See docs/security.md.",
    )
    _add_common(credentials)
    credentials.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="ACTION ...",
        help="issue ID [--kind mqtt|http|coap] | set-password ID | groups ID G1,G2 | "
        "disable ID | enable ID | remove ID [--kind K] | list [--json]",
    )
    provisioning = sub.add_parser(
        "provisioning",
        help="provisioning keys devices enrol with: add, list, rotate, revoke (audit-logged)",
        description="Provisioning keys in DATA_DIR/provisioning.db; work at once, also while "
        "the gateway runs. See docs/devices.md.",
    )
    _add_common(provisioning)
    provisioning.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="ACTION ...",
        help="add ID [--groups G] [--type T] [--kinds mqtt,http] [--pattern GLOB] [--rate N] "
        "[--expires 30d] [--max-uses N] [--reprovision] | list [--json] | rotate ID "
        "[--grace 24h] | revoke ID",
    )
    ca = sub.add_parser(
        "ca",
        help="the gateway's certificate authority: init, issue-cert ID, server-cert, revoke ID",
        description="Device certificates from the gateway's own CA (DATA_DIR/ca). See docs/ca.md.",
    )
    _add_common(ca)
    ca.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="ACTION ...",
        help="init | issue-cert ID [--out FILE] | server-cert HOST... | revoke ID | crl",
    )
    from edgeway.admin.client import add_audit_arguments

    audit = sub.add_parser(
        "audit",
        help="the audit log of administrative changes, from a running gateway's admin API",
    )
    _add_admin_config(audit)
    add_audit_arguments(audit)
    status = sub.add_parser(
        "status",
        help="a running gateway's state, from its admin API (token: $EDGEWAY_TOKEN)",
    )
    _add_admin_config(status)
    add_status_arguments(status)
    from edgeway.commands.cli import add_command_arguments

    command = sub.add_parser(
        "command",
        help="send, list, show or cancel commands to devices (through the admin API)",
        description="Commands to devices through a running gateway's admin API "
        "(--admin URL; token from $EDGEWAY_TOKEN). See docs/commands.md.",
    )
    _add_admin_config(command)
    add_command_arguments(command)
    from edgeway.alarms.cli import add_alarm_arguments

    alarms = sub.add_parser(
        "alarms",
        help="list, acknowledge, shelve, clear ... alarms (through the admin API)",
        description="Alarms of a running gateway through its admin API (--admin URL; token "
        "from $EDGEWAY_TOKEN; actions need role operator). See docs/alarms.md.",
    )
    _add_admin_config(alarms)
    add_alarm_arguments(alarms)
    from edgeway.devices.cli import add_devices_arguments

    devices = sub.add_parser(
        "devices",
        help="add, list, show, update, disable, enable, remove, import or export devices",
        description="The device registry through a running gateway's admin API "
        "(--admin URL; token from $EDGEWAY_TOKEN). See docs/devices.md.",
    )
    _add_admin_config(devices)
    add_devices_arguments(devices)
    from edgeway.runtime.cli import add_config_arguments, add_reload_arguments

    reload = sub.add_parser(
        "reload",
        help="make a running gateway read its configuration file again and apply it",
        description="What SIGHUP does, through the admin API (role engineer). Exit 0 when "
        "applied, 1 when refused or rolled back (the previous configuration stays). "
        "See docs/reload.md.",
    )
    config = sub.add_parser(
        "config",
        help="show, apply, list or roll back a running gateway's configuration",
        description="Configuration changes through the admin API. See docs/reload.md.",
    )
    for q in (reload, config):
        _add_admin_config(q)
    add_reload_arguments(reload)
    add_config_arguments(config)
    from edgeway.firmware.cli import add_firmware_arguments

    firmware = sub.add_parser(
        "firmware",
        help="firmware images and update campaigns (through the admin API)",
        description="Signed firmware images and campaigns through a running gateway's admin API "
        "(--admin URL; token from $EDGEWAY_TOKEN). See docs/firmware.md.",
    )
    _add_admin_config(firmware)
    add_firmware_arguments(firmware)
    from edgeway.twins.cli import add_twin_arguments

    twin = sub.add_parser(
        "twin",
        help="show or change device twins (desired state) through the admin API",
        description="Device twins through a running gateway's admin API (--admin URL; token "
        "from $EDGEWAY_TOKEN). See docs/twins.md.",
    )
    _add_admin_config(twin)
    add_twin_arguments(twin)
    from edgeway.runtime.fleet_cli import add_fleet_arguments

    fleet = sub.add_parser(
        "fleet",
        help="make the fleet key and sign configurations to push to gateways (offline)",
        description="Pushed configurations are signed with Ed25519 and sent as config.apply "
        "commands through a cloud downlink. See docs/fleet.md.",
    )
    add_fleet_arguments(fleet)
    from edgeway.ml.cli import add_models_arguments

    models = sub.add_parser(
        "models",
        help="upload, activate, shadow, canary, promote or roll back edge ML models",
        description="The model registry of a running gateway (admin API, role engineer for "
        "changes); 'keygen' and 'sign' work offline. See docs/models.md.",
    )
    _add_admin_config(models)
    add_models_arguments(models)


def _add_admin_config(p: argparse.ArgumentParser) -> None:
    """``--config`` for a command that talks to a running gateway: the file
    whose ``admin.listen`` says where (``--admin URL`` overrides it)."""
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("EDGEWAY_CONFIG") or None,
        help="configuration whose admin.listen to use (default: $EDGEWAY_CONFIG)",
    )


# The subcommands that read the configuration file before anything else.
_CONFIG_COMMANDS = frozenset(
    (
        "stats",
        "outbox",
        "deadletter",
        "tokens",
        "credentials",
        "provisioning",
        "ca",
        "audit",
        "status",
        "command",
        "reload",
        "config",
        "models",
        "twin",
        "users",
        "firmware",
        "alarms",
        "devices",
    )
)


def _cmd_with_config(args: argparse.Namespace) -> int:
    """Every subcommand of ``_CONFIG_COMMANDS``: load the configuration once
    (printing its errors), then hand it to the subcommand."""
    try:
        cfg = _load(args.config)
    except ConfigError as e:
        _print_config_errors(e.issues)
        return EXIT_CONFIG
    if args.command == "stats":
        from edgeway.pipeline import stats_main

        return stats_main(list(args.rest), args.data_dir or Path(cfg.gateway.data_dir))
    if args.command == "outbox":
        from edgeway.outbox.purge import outbox_main

        data_dir = args.data_dir or Path(cfg.gateway.data_dir)
        return outbox_main(list(args.rest), data_dir, {s.name for s in cfg.sinks})
    if args.command == "deadletter":
        from edgeway.outbox import deadletter_main

        return deadletter_main(list(args.rest), args.data_dir or Path(cfg.gateway.data_dir))
    if args.command == "command":
        from edgeway.commands.cli import command_main

        return command_main(args, cfg)
    if args.command == "firmware":
        from edgeway.firmware.cli import firmware_main

        return firmware_main(args, cfg)
    if args.command == "twin":
        from edgeway.twins.cli import twin_main

        return twin_main(args, cfg)
    if args.command == "models":
        from edgeway.ml.cli import models_main

        return models_main(args, cfg)
    if args.command == "alarms":
        from edgeway.alarms.cli import alarms_main

        return alarms_main(args, cfg)
    if args.command == "devices":
        from edgeway.devices.cli import devices_main

        return devices_main(args, cfg)
    if args.command == "reload":
        from edgeway.runtime.cli import reload_main

        return reload_main(args, cfg)
    if args.command == "config":
        from edgeway.runtime.cli import config_main

        return config_main(args, cfg)
    if args.command == "tokens":
        from edgeway.admin.tokens import tokens_main

        return tokens_main(list(args.rest), args.data_dir or Path(cfg.gateway.data_dir))
    if args.command == "users":
        from edgeway.admin.users import users_main

        return users_main(list(args.rest), args.data_dir or Path(cfg.gateway.data_dir))
    if args.command == "credentials":
        from edgeway.devices.credentials_cli import credentials_main

        return credentials_main(list(args.rest), args.data_dir or Path(cfg.gateway.data_dir))
    if args.command == "provisioning":
        from edgeway.devices.provisioning_cli import provisioning_main

        return provisioning_main(list(args.rest), args.data_dir or Path(cfg.gateway.data_dir))
    if args.command == "ca":
        from edgeway.devices.ca_cli import ca_main

        return ca_main(list(args.rest), args.data_dir or Path(cfg.gateway.data_dir))
    if args.command == "audit":
        from edgeway.admin.client import audit_main

        return audit_main(args, cfg)
    from edgeway.admin.client import status_main

    return status_main(args, cfg)


def _load(path: Path | None) -> Config:
    return load_config(path)


def _print_config_errors(issues: list[ConfigIssue]) -> None:
    for issue in issues:
        print(f"error: {issue}", file=sys.stderr)


def cmd_check(path: Path, sinks: list[str] | None = None) -> int:
    """``edgeway check FILE [--sink URL]...``: every problem ``edgeway run``
    would refuse, each as ``file:line: key path: what was expected`` (see
    :mod:`edgeway.validate`)."""
    from edgeway.validate import validate

    issues = validate(path, sink_urls=sinks or ())
    _print_config_errors(issues)
    if issues:
        return EXIT_CONFIG
    print(f"{path}: ok")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from edgeway.config import apply_overrides
    from edgeway.gateway import Gateway
    from edgeway.logs import configure_logging
    from edgeway.validate import check_config, read_config

    try:
        cfg, lines = read_config(args.config) if args.config else (Config(), KeyLines("--sink"))
    except ConfigError as e:
        _print_config_errors(e.issues)
        return EXIT_CONFIG

    def overrides(c: Config) -> Config:
        """The command-line flags, applied at start and to every reload."""
        return apply_overrides(
            c,
            data_dir=args.data_dir,
            mqtt_listen=args.mqtt_listen,
            sinks=args.sink,
            log_level=args.log_level,
            log_format=args.log_format,
            gateway_id=args.gateway_id,
            coap_listen=args.coap_listen,
            http_listen=args.http_listen,
            admin_listen=args.admin_listen,
        )

    try:
        cfg = overrides(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # The same checks as `edgeway check`, after the overrides (--sink adds sinks).
    issues = check_config(cfg, lines)
    if issues:
        _print_config_errors(issues)
        return EXIT_CONFIG
    configure_logging(cfg.log.level, cfg.log.format)
    if args.config is None:
        log.info("no configuration file: running on embedded defaults")

    gateway = Gateway(cfg, tune_gc=True)
    gateway.config_overrides = overrides
    if args.config is not None:
        gateway.config_path = Path(args.config)
        with contextlib.suppress(OSError):
            gateway.config_text = Path(args.config).read_text(encoding="utf-8")
    return _run_async(gateway)


def cmd_sim(args: argparse.Namespace) -> int:
    """``edgeway demo`` and ``edgeway simulate`` (they handle Ctrl-C themselves)."""
    from edgeway.logs import configure_logging

    configure_logging("warning", "text")
    # gmqtt logs every reconnect attempt of every device at warning level.
    logging.getLogger("edgeway.sim.gmqtt").setLevel(logging.ERROR)
    logging.getLogger("gmqtt").setLevel(logging.ERROR)
    # asyncua warns that the simulated OPC-UA server runs without security
    # (loopback demo), and logs tracebacks while its server is still starting;
    # the OPC-UA adapter reports real connection problems in one line.
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)

    def write(line: str) -> None:
        print(line, flush=True)

    async def main() -> int:
        if args.command == "demo":
            from edgeway.sim.demo import options_from_args, run_demo

            result = await run_demo(options_from_args(args), write)
            return EXIT_OK if result.lost == 0 else EXIT_RUNTIME
        from edgeway.sim.runner import run_simulation

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_simulation(args, write, stop)

    try:
        with _new_runner() as runner:
            return runner.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_RUNTIME


GIL_SWITCH_INTERVAL = 0.001
"""Seconds a thread holds the GIL before one that waits for it may take it."""


def _run_async(gateway: object) -> int:
    from edgeway.gateway import Gateway, StartupError
    from edgeway.south.mqtt.listeners import ListenerError
    from edgeway.storage.sqlite import StorageError
    from edgeway.systemd import service_notifications

    assert isinstance(gateway, Gateway)
    # The event loop hands the GIL to the stores' writer threads (and takes it
    # back) on every SQLite call; with Python's default 5 ms switch interval a
    # thread that wants it back can wait that long behind a busy one. 1 ms
    # halved the p99 of a rule's reading -> command at 1,000 readings/s
    # (bench/results/rules-2026-12-07-scan.md) and changed no throughput.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gateway.request_stop)
        loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
        try:
            async with service_notifications(gateway.ready):
                await gateway.run()
        except (ListenerError, StartupError, StorageError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_RUNTIME
        except BaseExceptionGroup as eg:
            expected, other = eg.split((ListenerError, StartupError, StorageError, OSError))
            if other is not None:
                raise
            assert expected is not None
            for leaf in _leaves(expected):
                print(f"error: {leaf}", file=sys.stderr)
            return EXIT_RUNTIME
        return EXIT_OK

    runner = _new_runner()
    with runner:
        return runner.run(main())


def _leaves(eg: BaseException) -> list[BaseException]:
    if isinstance(eg, BaseExceptionGroup):
        return [leaf for sub in eg.exceptions for leaf in _leaves(sub)]
    return [eg]


def _new_runner() -> asyncio.Runner:
    """An asyncio runner on uvloop when it is installed (falls back silently)."""
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a default dependency on Linux
        return asyncio.Runner()


def _take_common_options(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """Pick ``--config``/``--data-dir``/``--log-*`` out of a sub-command's own
    arguments and return the others.

    ``stats`` and ``deadletter`` hand their arguments on to their own parsers;
    argparse's REMAINDER keeps everything after the action (``deadletter list
    --data-dir D``) and refuses an option in first place (``stats --json``), so
    without this a user would have to know the one order that works.
    """
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", "-c", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--log-format")
    p.add_argument("--log-level")
    found, others = p.parse_known_args(rest)
    for key, value in vars(found).items():
        setattr(args, key, value)
    return others


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command in (
        "stats", "deadletter", "tokens", "users", "outbox", "credentials", "ca", "provisioning",
    ):  # fmt: skip
        args.rest = _take_common_options(args, [*args.rest, *extras])
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    if args.command == "version":
        print(f"edgeway {__version__}")
        return EXIT_OK
    if args.command == "check":
        return cmd_check(args.file, args.sink)
    if args.command == "run":
        with contextlib.suppress(KeyboardInterrupt):
            return cmd_run(args)
        return EXIT_OK
    if args.command in ("demo", "simulate"):
        return cmd_sim(args)
    if args.command in ("init", "systemd-unit"):
        from edgeway.deploy.init import run_deploy_command

        return run_deploy_command(args)
    if args.command == "passwd":
        from edgeway.devices.config_auth import passwd_main

        return passwd_main(["--stdin"] if args.stdin else [])
    if args.command == "fleet":
        from edgeway.runtime.fleet_cli import fleet_main

        return fleet_main(args)
    if args.command in _CONFIG_COMMANDS:
        return _cmd_with_config(args)
    parser.error(f"unknown command {args.command!r}")
    return EXIT_CONFIG  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
