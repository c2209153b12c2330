"""``edgeway command send|list|show|cancel``: commands through a running
gateway's admin API (``--admin URL``, token from ``$EDGEWAY_TOKEN``).

Exit status: 0 when the request was taken (with ``send --wait``: only when the
device reported success), 1 for a command that ended otherwise or a request
the API refused, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from typing import Any

import orjson

from edgeway.admin.client import (
    TIMEOUT,
    AdminClientError,
    add_admin_arguments,
    client_from_args,
)
from edgeway.config import Config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
WAIT_DEFAULT = 60.0
"""Seconds ``send --wait`` waits when no number is given."""


def add_command_arguments(p: argparse.ArgumentParser) -> None:
    """The ``edgeway command`` sub-commands."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    send = sub.add_parser("send", help="queue a command for a device")
    send.add_argument("device", help="device id")
    send.add_argument("name", help="command name (e.g. stop, write, reboot)")
    send.add_argument("--params", default="{}", help="parameters as a JSON object")
    send.add_argument("--ttl", help="how long it may wait for the device (e.g. 5m)")
    send.add_argument("--timeout", help="time for the device's result after delivery (e.g. 30s)")
    send.add_argument("--idempotency-key", help="a repeat with the same key is not queued again")
    send.add_argument(
        "--wait",
        nargs="?",
        type=float,
        const=WAIT_DEFAULT,
        metavar="SECONDS",
        help=f"wait for the result (default {WAIT_DEFAULT:g} s); exit 0 only on success",
    )
    lst = sub.add_parser("list", help="commands, newest first")
    lst.add_argument("--device", help="only this device's")
    lst.add_argument("--state", help="only in this state (queued, sent, succeeded, ...)")
    lst.add_argument("--limit", type=int, default=50)
    show = sub.add_parser("show", help="one command")
    show.add_argument("id")
    cancel = sub.add_parser("cancel", help="cancel an unfinished command")
    cancel.add_argument("id")
    for q in (send, lst, show, cancel):
        add_admin_arguments(q)
        q.add_argument("--json", action="store_true", help="print the API's JSON")


def _line(c: dict[str, Any]) -> str:
    extra = ""
    if c.get("error"):
        extra = f"  error: {c['error']}"
    elif c.get("result") is not None:
        extra = f"  result: {orjson.dumps(c['result']).decode()}"
    return f"{c['id']}  {c['device_id']}  {c['name']}  {c['state']}{extra}"


def command_main(args: argparse.Namespace, cfg: Config) -> int:
    wait = getattr(args, "wait", None)
    timeout = TIMEOUT + wait if wait else TIMEOUT
    try:
        with client_from_args(args, cfg, timeout) as client:
            if args.action == "send":
                try:
                    params = orjson.loads(args.params)
                except orjson.JSONDecodeError as e:
                    print(f"error: --params is not JSON: {e}", file=sys.stderr)
                    return EXIT_USAGE
                body: dict[str, Any] = {"name": args.name, "params": params}
                for key in ("ttl", "timeout", "idempotency_key"):
                    if getattr(args, key) is not None:
                        body[key] = getattr(args, key)
                path = f"/api/devices/{urllib.parse.quote(args.device, safe='')}/commands"
                if args.wait:
                    path += f"?wait={args.wait}"
                doc = client.post_json(path, body)
                cmd = doc["command"]
                print(orjson.dumps(doc).decode() if args.json else _line(cmd))
                if args.wait:
                    return EXIT_OK if cmd["state"] == "succeeded" else EXIT_FAILED
                return EXIT_OK
            if args.action == "list":
                query = {"limit": str(args.limit)}
                if args.device:
                    query["device_id"] = args.device
                if args.state:
                    query["state"] = args.state
                doc = client.get_json("/api/commands?" + urllib.parse.urlencode(query))
                if args.json:
                    print(orjson.dumps(doc).decode())
                else:
                    for c in doc["commands"]:
                        print(_line(c))
                return EXIT_OK
            cid = urllib.parse.quote(args.id, safe="")
            if args.action == "show":
                doc = client.get_json(f"/api/commands/{cid}")
            else:
                doc = client.post_json(f"/api/commands/{cid}/cancel", {})
            print(orjson.dumps(doc).decode() if args.json else _line(doc["command"]))
            return EXIT_OK
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
