"""``edgeway init`` and ``edgeway systemd-unit``: files an installation starts from.

``edgeway init [FILE]`` writes a commented starter configuration (as
``telegraf config`` does): it runs as written (a loopback MQTT listener, a
local file sink), says what each section is for, and shows the production
settings commented out. ``-`` writes it to stdout. An existing file is never
overwritten without ``--force``.

``edgeway systemd-unit`` prints the shipped unit with ``ExecStart`` pointing at
this installation (docs/install.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from importlib.resources import files
from pathlib import Path

EXIT_OK = 0
EXIT_EXISTS = 1


def add_deploy_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``init`` and ``systemd-unit`` on the main parser."""
    init = sub.add_parser(
        "init",
        help="write a commented starter configuration",
        description="Write a commented starter configuration that runs as written "
        "(loopback MQTT, a local file sink) and shows production settings commented out.",
    )
    init.add_argument(
        "file", nargs="?", default="edgeway.yaml", help="where to write it ('-': stdout)"
    )
    init.add_argument(
        "--data-dir",
        default="./edgeway-data",
        help="the gateway.data_dir written (default ./edgeway-data; /var/lib/edgeway "
        "for the systemd unit)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    unit = sub.add_parser(
        "systemd-unit",
        help="print the systemd unit for this installation",
        description="Print the shipped systemd unit (Type=notify, hardening, restart "
        "policy) with ExecStart pointing at this installation. See docs/install.md.",
    )
    unit.add_argument(
        "--executable", help="ExecStart's program (default: this installation's edgeway)"
    )


def starter_config(data_dir: str, gateway_id: str | None = None) -> str:
    """The starter configuration text for ``data_dir``."""
    template = files("edgeway.deploy").joinpath("starter.yaml").read_text(encoding="utf-8")
    gid = gateway_id or _safe_id(socket.gethostname())
    return (
        template.replace("@GATEWAY_ID@", gid)
        .replace("@DATA_DIR_ABS@", str(Path(data_dir).absolute()))
        .replace("@DATA_DIR@", data_dir)
    )


def _safe_id(name: str) -> str:
    """A host name as a plain YAML scalar (host names are [A-Za-z0-9.-])."""
    kept = "".join(c for c in name if c.isalnum() or c in ".-_")
    return kept or "edgeway"


def run_deploy_command(args: argparse.Namespace) -> int:
    """Run ``init`` or ``systemd-unit`` (``args`` from :func:`add_deploy_commands`)."""
    if args.command == "systemd-unit":
        from edgeway.systemd import unit_text

        sys.stdout.write(unit_text(args.executable))
        return EXIT_OK
    text = starter_config(args.data_dir)
    if args.file == "-":
        sys.stdout.write(text)
        return EXIT_OK
    path = Path(args.file)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        # 0640: the file may come to hold credentials (mqtt users, sink passwords).
        fd = os.open(path, flags, 0o640)
    except FileExistsError:
        print(f"error: {path} exists (--force overwrites it)", file=sys.stderr)
        return EXIT_EXISTS
    except OSError as e:
        print(f"error: cannot write {path}: {e.strerror}", file=sys.stderr)
        return EXIT_EXISTS
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}; check it with: edgeway check {path}", file=sys.stderr)
    return EXIT_OK
