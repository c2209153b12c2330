"""``edgeway devices add|list|show|update|disable|enable|remove|import|export``:
the device registry through a running gateway's admin API (``--admin URL``,
token from ``$EDGEWAY_TOKEN``; reading needs role viewer, changes operator).
``edgeway devices issue-cert ID`` writes a device's certificate bundle from
the gateway's CA, offline (``edgeway ca issue-cert``'s code).

Exit status: 0 done, 1 refused by the API (or an import with refused rows),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from edgeway.admin.client import (
    AdminClient,
    AdminClientError,
    add_admin_arguments,
    client_from_args,
)
from edgeway.config import Config
from edgeway.devices.registry import STATUSES

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
IMPORT_TIMEOUT = 300.0
"""Seconds an import may take: 100,000 rows are a few seconds of work; the
rest is room for a slow disk."""


def _fields_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name")
    p.add_argument("--type")
    p.add_argument("--tags", help="comma-separated (replaces the device's tags)")
    p.add_argument("--groups", help="comma-separated (replaces the device's groups)")
    p.add_argument("--credentials", help="comma-separated credential references (never secrets)")
    p.add_argument("--firmware")
    p.add_argument("--metadata", help="a JSON object")


def add_devices_arguments(p: argparse.ArgumentParser) -> None:
    """The ``edgeway devices`` sub-commands."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="register a device")
    add.add_argument("id")
    _fields_arguments(add)
    lst = sub.add_parser("list", help="devices in id order, one page")
    lst.add_argument("--status", choices=STATUSES)
    lst.add_argument("--type")
    lst.add_argument("--tag")
    lst.add_argument("--group")
    lst.add_argument("--protocol")
    lst.add_argument("--prefix", help="ids starting with this")
    lst.add_argument("--limit", type=int, default=100)
    lst.add_argument("--after", help="the last id of the previous page")
    show = sub.add_parser("show", help="one device")
    show.add_argument("id")
    update = sub.add_parser("update", help="change a registered device's fields")
    update.add_argument("id")
    _fields_arguments(update)
    actions = [add, lst, show, update]
    for name, text in (
        ("disable", "refuse a device (its connections end at once)"),
        ("enable", "accept a disabled device again"),
        ("remove", "delete a device's record"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("id")
        actions.append(q)
    cert = sub.add_parser(
        "issue-cert",
        help="a TLS client certificate bundle for a device from the gateway's CA (offline; "
        "the same as 'edgeway ca issue-cert')",
    )
    cert.add_argument("id")
    cert.add_argument("--out", type=Path, help="bundle file (default ./ID.pem)")
    cert.add_argument("--days", type=int, help="validity (default: the CA's)")
    cert.add_argument("--data-dir", type=Path, help="the gateway's data directory")
    imp = sub.add_parser("import", help="register the devices of a CSV file")
    imp.add_argument("file", type=Path)
    exp = sub.add_parser("export", help="every device as CSV (to stdout)")
    exp.add_argument("--status", choices=STATUSES)
    for q in (*actions, imp, exp):
        add_admin_arguments(q)
    for q in actions:
        q.add_argument("--json", action="store_true", help="print the API's JSON")
    imp.add_argument("--json", action="store_true", help="print the API's JSON")


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key in ("name", "type", "firmware"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    for key in ("tags", "groups", "credentials"):
        value = getattr(args, key)
        if value is not None:
            body[key] = [v.strip() for v in value.split(",") if v.strip()]
    if args.metadata is not None:
        try:
            body["metadata"] = orjson.loads(args.metadata)
        except orjson.JSONDecodeError as e:
            raise _Usage(f"--metadata is not JSON: {e}") from None
    return body


class _Usage(Exception):
    pass


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def _line(d: dict[str, Any]) -> str:
    reason = (
        f" ({d['disconnect_reason']})" if d.get("disconnect_reason") and not d["online"] else ""
    )
    protocols = ",".join(d.get("protocols") or []) or "-"
    return (
        f"{d['id']:<24} {d['status']:<12} {d.get('type') or '-':<12} {protocols:<12} "
        f"last seen {_when(d.get('last_seen'))}{reason}"
    )


def _show(d: dict[str, Any]) -> str:
    lines = [_line(d)]
    for key in ("name", "tags", "groups", "credentials", "firmware", "metadata"):
        value = d.get(key)
        if value:
            text = ", ".join(value) if isinstance(value, list) else value
            if isinstance(value, dict):
                text = orjson.dumps(value).decode()
            lines.append(f"  {key}: {text}")
    for key in ("last_connect", "last_disconnect", "created", "updated"):
        lines.append(f"  {key}: {_when(d.get(key))}")
    if d.get("last_error"):
        lines.append(f"  last_error: {d['last_error']} at {_when(d.get('last_error_at'))}")
    return "\n".join(lines)


def _path(device_id: str, suffix: str = "") -> str:
    return f"/api/devices/{urllib.parse.quote(device_id, safe='')}{suffix}"


def _request_for(action: str, args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, JSON body) of the one-device actions."""
    if action == "add":
        return "POST", "/api/devices", {"id": args.id, **_body(args)}
    if action == "update":
        return "PATCH", _path(args.id), _body(args)
    if action in ("disable", "enable"):
        return "POST", _path(args.id, "/" + action), {}
    return ("DELETE" if action == "remove" else "GET"), _path(args.id), None


def devices_main(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "issue-cert":
        # Works on the CA's files, offline: the same code as `edgeway ca issue-cert`.
        from edgeway.devices.ca_cli import ca_main

        argv = ["issue-cert", args.id]
        if args.out is not None:
            argv += ["--out", str(args.out)]
        if args.days is not None:
            argv += ["--days", str(args.days)]
        return ca_main(argv, args.data_dir or Path(cfg.gateway.data_dir))
    timeout = IMPORT_TIMEOUT if args.action in ("import", "export") else None
    try:
        client = client_from_args(args, cfg, timeout) if timeout else client_from_args(args, cfg)
        with client:
            return _run(client, args)
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


def _run(client: AdminClient, args: argparse.Namespace) -> int:
    action = args.action
    if action == "list":
        query = {"limit": str(args.limit)}
        for key in ("status", "type", "tag", "group", "protocol", "prefix", "after"):
            if getattr(args, key):
                query[key] = getattr(args, key)
        doc = client.get_json("/api/devices?" + urllib.parse.urlencode(query))
        if args.json:
            print(orjson.dumps(doc).decode())
            return EXIT_OK
        for d in doc["devices"]:
            print(_line(d))
        more = f"; next page: --after {doc['next_after']}" if doc.get("next_after") else ""
        total = f" of {doc['total']}" if doc.get("total") is not None else ""
        print(f"({len(doc['devices'])}{total}{more})", file=sys.stderr)
        return EXIT_OK
    if action == "export":
        query = {"format": "csv"}
        if args.status:
            query["status"] = args.status
        status, text = client.request_text("GET", "/api/devices?" + urllib.parse.urlencode(query))
        sys.stdout.write(text)
        return EXIT_OK if status == 200 else EXIT_FAILED
    if action == "import":
        try:
            data = args.file.read_bytes()
        except OSError as e:
            raise _Usage(f"cannot read {args.file}: {e.strerror}") from None
        status, doc = client.request_raw("POST", "/api/devices/import", data)
        if status != 200:
            print(f"error: {doc.get('message', status)}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            print(orjson.dumps(doc).decode())
        else:
            print(f"created {doc['created']}, refused {doc['refused']}")
            for r in doc["refused_rows"]:
                print(f"  row {r['row']} ({r['id']}): {r['reason']}")
        return EXIT_OK if not doc["refused"] else EXIT_FAILED
    method, path, body = _request_for(action, args)
    status, doc = client.request_raw(method, path, None if body is None else orjson.dumps(body))
    if status >= 400:
        print(f"error: {doc.get('message', status)}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(orjson.dumps(doc).decode())
    elif "device" in doc:
        print(_show(doc["device"]) if action == "show" else _line(doc["device"]))
    else:
        print(f"removed {doc.get('removed')}")
    return EXIT_OK
