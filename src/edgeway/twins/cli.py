"""``edgeway twin show|patch|set``: device twins through a running gateway's
admin API (``--admin URL``, token from ``$EDGEWAY_TOKEN``; role operator to
change desired state, viewer to look).

::

    edgeway twin show pump-1
    edgeway twin patch pump-1 '{"setpoint": 42, "mode": null}' [--if-match 7]
    edgeway twin set pump-1 schedule.start '"06:00"'      # one key; the value is JSON (else a string)

Exit status: 0 done, 1 refused (a conflict, a limit) or failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from typing import Any

import orjson

from edgeway.admin.client import AdminClientError, add_admin_arguments, client_from_args
from edgeway.config import Config


def add_twin_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="a device's twin: desired, reported, delta, versions")
    show.add_argument("device")
    patch = sub.add_parser("patch", help="merge a JSON patch into the desired state")
    patch.add_argument("device")
    patch.add_argument("patch", help="a JSON object; null deletes a key")
    set_ = sub.add_parser("set", help="set one key of the desired state (dotted path)")
    set_.add_argument("device")
    set_.add_argument("key", help="a.b.c")
    set_.add_argument("value", help='JSON (42, true, null, "text"); other text is a string')
    for q in (patch, set_):
        q.add_argument("--if-match", type=int, help="apply only if desired is at this version")
    for q in (show, patch, set_):
        add_admin_arguments(q)


def twin_main(args: argparse.Namespace, cfg: Config) -> int:
    device = urllib.parse.quote(args.device, safe="")
    if args.action == "show":
        method, body = "GET", None
    else:
        try:
            doc = _patch_of(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        method, body = "PATCH", orjson.dumps(doc)
    path = f"/api/devices/{device}/twin" + ("" if method == "GET" else "/desired")
    try:
        with client_from_args(args, cfg) as client:
            if method == "PATCH" and args.if_match is not None:
                client._http.headers["If-Match"] = str(args.if_match)
            status, answer = client.request_raw(method, path, body)
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if status >= 400:
        print(f"error: {answer.get('message', answer)}", file=sys.stderr)
        return 1
    twin = answer.get("twin", answer)
    print(orjson.dumps(twin, option=orjson.OPT_INDENT_2).decode())
    return 0


def _patch_of(args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "patch":
        try:
            doc = orjson.loads(args.patch)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"the patch is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("the patch must be a JSON object")
        return doc
    try:
        value: Any = orjson.loads(args.value)
    except orjson.JSONDecodeError:
        value = args.value
    keys = [k for k in args.key.split(".") if k]
    if not keys:
        raise ValueError("an empty key")
    out: dict[str, Any] = {keys[-1]: value}
    for k in reversed(keys[:-1]):
        out = {k: out}
    return out
