"""``edgeway reload`` and ``edgeway config show|history|apply|rollback``:
configuration changes through a running gateway's admin API (``--admin URL``,
token from ``$EDGEWAY_TOKEN``; role engineer, viewer for ``history``).

Exit status: 0 applied (or nothing to change), 1 refused or rolled back (the
previous configuration is in force; the reason is printed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from edgeway.admin.client import AdminClientError, add_admin_arguments, client_from_args
from edgeway.config import Config

RELOAD_TIMEOUT = 60.0
"""Seconds a reload request may take: it waits for the health gate (2 s) and
for new adapters to start (up to 5 s), more on a loaded machine."""


def add_reload_arguments(p: argparse.ArgumentParser) -> None:
    add_admin_arguments(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the configuration in force")
    history = sub.add_parser("history", help="the last applied configurations")
    apply = sub.add_parser("apply", help="apply a configuration file to the running gateway")
    apply.add_argument("file", type=Path)
    rollback = sub.add_parser("rollback", help="apply an earlier configuration again")
    rollback.add_argument(
        "number", nargs="?", type=int, help="history number (default: the one before)"
    )
    for q in (show, history, apply, rollback):
        add_reload_arguments(q)


def _print_answer(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(doc).decode())
        return
    changes = doc.get("changes") or []
    if not changes:
        print("applied: nothing changed")
    else:
        print("applied: " + "; ".join(changes))


def _post(args: argparse.Namespace, cfg: Config, path: str, body: bytes | None) -> int:
    try:
        with client_from_args(args, cfg, RELOAD_TIMEOUT) as client:
            status, doc = client.request_raw("POST", path, body)
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if status == 200:
        _print_answer(doc, args.json)
        return 0
    if args.json:
        print(orjson.dumps(doc).decode())
    print(f"error: {doc.get('message', status)}", file=sys.stderr)
    for issue in doc.get("issues") or []:
        print(f"  {issue}", file=sys.stderr)
    return 1


def reload_main(args: argparse.Namespace, cfg: Config) -> int:
    """``edgeway reload``: read the configuration file again and apply it."""
    return _post(args, cfg, "/api/config/reload", b"")


def config_main(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "apply":
        try:
            text = args.file.read_bytes()
        except OSError as e:
            print(f"error: cannot read {args.file}: {e.strerror}", file=sys.stderr)
            return 2
        return _post(args, cfg, "/api/config", text)
    if args.action == "rollback":
        body = orjson.dumps({"number": args.number} if args.number is not None else {})
        return _post(args, cfg, "/api/config/rollback", body)
    try:
        with client_from_args(args, cfg) as client:
            if args.action == "show":
                doc = client.get_json("/api/config")
                if args.json:
                    print(orjson.dumps(doc).decode())
                elif doc.get("text") is None:
                    print("# built from command-line flags only (no configuration file)")
                else:
                    print(doc["text"], end="" if doc["text"].endswith("\n") else "\n")
                return 0
            doc = client.get_json("/api/config/history")
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(doc).decode())
        return 0
    for entry in doc["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["applied_at"]))
        print(f"{entry['number']:>4}  {when}  {entry['sha256'][:12]}  {entry['source']}")
    return 0
