"""``edgeway alarms list|show|history|raise|ack|confirm|reset|clear|shelve|
unshelve|suppress|unsuppress|out-of-service|in-service``: alarms through a running
gateway's admin API (``--admin URL``, token from ``$EDGEWAY_TOKEN``).

Every action carries a comment (``-m TEXT``) and is recorded with the token's
name (or, on a loopback API without tokens, ``--user``, default ``$USER``).

Exit status: 0 when the gateway took the action, 1 when it refused it (an
illegal transition says why) or could not be reached.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
import urllib.parse
from typing import Any

import orjson

from edgeway.admin.client import AdminClientError, add_admin_arguments, client_from_args
from edgeway.config import Config

EXIT_OK = 0
EXIT_FAILED = 1

ACTIONS = (
    ("raise", "raise a manual alarm (--severity 1-1000 or low ... high)"),
    ("ack", "acknowledge an alarm"),
    ("confirm", "confirm an acknowledged alarm (types with require_confirm)"),
    ("reset", "reset a latched alarm whose condition cleared"),
    ("clear", "declare the alarm's condition normal"),
    ("shelve", "shelve an alarm for a time (--for 1h) or until it clears (--one-shot)"),
    ("unshelve", "end a shelving"),
    ("suppress", "suppress an alarm by design (hidden, still recorded)"),
    ("unsuppress", "end a suppression"),
    ("out-of-service", "take an alarm out of service (maintenance)"),
    ("in-service", "return an alarm to service"),
)


def add_alarm_arguments(p: argparse.ArgumentParser) -> None:
    """The ``edgeway alarms`` sub-commands."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    lst = sub.add_parser("list", help="alarms, most severe first")
    lst.add_argument(
        "--state",
        default="shown",
        help="shown (default), all, active, unacked, shelved, suppressed, out_of_service",
    )
    lst.add_argument("--source", help="only this source's")
    lst.add_argument("--limit", type=int, default=100)
    show = sub.add_parser("show", help="one alarm")
    history = sub.add_parser("history", help="an alarm's transitions: who, when, why")
    history.add_argument("--limit", type=int, default=50)
    parsers = [lst, show, history]
    for p2 in (show, history):
        _key_arguments(p2)
    for name, help_text in ACTIONS:
        q = sub.add_parser(name, help=help_text)
        _key_arguments(q)
        q.add_argument("-m", "--comment", default="", help="why (recorded with the action)")
        q.add_argument(
            "--user",
            default=None,
            help="who (recorded when the API has no tokens; default $USER)",
        )
        if name == "raise":
            q.add_argument("--severity", required=True, help="1-1000, or low ... high")
        if name == "shelve":
            how = q.add_mutually_exclusive_group(required=True)
            how.add_argument("--for", dest="duration", metavar="TIME", help="e.g. 30m, 2h")
            how.add_argument("--one-shot", action="store_true", help="until it next clears")
        parsers.append(q)
    for q in parsers:
        add_admin_arguments(q)
        q.add_argument("--json", action="store_true", help="print the API's JSON")


def _key_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="the alarm's source (a device id)")
    p.add_argument("type", help="the alarm's type (e.g. high_temperature)")


def _path(args: argparse.Namespace) -> str:
    q = urllib.parse.quote
    return f"/api/alarms/{q(args.source, safe='')}/{q(args.type, safe='')}"


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _line(a: dict[str, Any]) -> str:
    flags = ["ACTIVE" if a["active"] else "inactive"]
    if a["latched"]:
        flags.append("latched")
    flags.append("acked" if a["acked"] else "UNACKED")
    if not a["confirmed"]:
        flags.append("unconfirmed")
    if a["shelved"]:
        sh = a["shelved"]
        flags.append("shelved" + (f" until {_when(sh['until'])}" if sh["until"] else " (one-shot)"))
    if a["suppressed"]:
        flags.append("suppressed")
    if a["out_of_service"]:
        flags.append("out of service")
    return (
        f"{a['source']}  {a['type']}  {a['severity']} ({a['band']})  {', '.join(flags)}  "
        f"since {_when(a['active_since'])}  {a['message']}"
    )


def _transition(t: dict[str, Any]) -> str:
    comment = f'  "{t["comment"]}"' if t["comment"] else ""
    return f"{_when(t['at'])}  {t['action']}  by {t['by']}{comment}"


def _login() -> str:
    """The login name, for ``--user``'s default (``cli`` where there is none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def alarms_main(args: argparse.Namespace, cfg: Config) -> int:
    try:
        with client_from_args(args, cfg) as client:
            if args.action == "list":
                query = {"state": args.state, "limit": str(args.limit)}
                if args.source:
                    query["source"] = args.source
                doc = client.get_json("/api/alarms?" + urllib.parse.urlencode(query))
                lines = [_line(a) for a in doc["alarms"]]
            elif args.action == "show":
                doc = client.get_json(_path(args))
                lines = [_line(doc["alarm"])]
            elif args.action == "history":
                doc = client.get_json(_path(args) + f"/history?limit={args.limit}")
                lines = [_transition(t) for t in doc["transitions"]]
            else:
                body: dict[str, Any] = {
                    "comment": args.comment,
                    "user": args.user or _login(),
                }
                if args.action == "raise":
                    body = {"severity": args.severity, "message": args.comment, **body}
                if args.action == "shelve":
                    if args.one_shot:
                        body["one_shot"] = True
                    else:
                        body["duration"] = args.duration
                doc = client.post_json(f"{_path(args)}/{args.action}", body)
                lines = [_line(doc["alarm"])]
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(orjson.dumps(doc).decode())
    else:
        for line in lines:
            print(line)
    return EXIT_OK
