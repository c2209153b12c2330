"""``edgeway credentials``: per-device secrets, groups and disabling.

Works offline and while the gateway runs (the gateway sees a change within
a second and disconnects what lost access). Every change is recorded in the
audit log (who: the OS user; never the secret)::

    edgeway credentials issue boiler-1 --kind mqtt      # prints the secret once
    edgeway credentials set-password boiler-1 --stdin   # a person-chosen password
    edgeway credentials groups boiler-1 hall-a,boilers
    edgeway credentials disable boiler-1                # refused everywhere, now
    edgeway credentials enable boiler-1
    edgeway credentials remove boiler-1 [--kind http]
    edgeway credentials list [--json]

Exit status: 0 done, 1 refused (bad id, unknown device), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from edgeway.audit import cli_actor, record_offline
from edgeway.devices.credentials import KINDS, CredentialError, CredentialStore

__all__ = ["credentials_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeway credentials",
        description="Per-device credentials in DATA_DIR/credentials.db (see docs/security.md).",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = sub.add_parser("issue", help="generate a secret for a device and print it (once)")
    issue.add_argument("device")
    issue.add_argument("--kind", choices=KINDS, default="mqtt", help="protocol (default mqtt)")
    pw = sub.add_parser("set-password", help="a person-chosen MQTT password (argon2id)")
    pw.add_argument("device")
    pw.add_argument("--stdin", action="store_true", help="read it from stdin (one line)")
    groups = sub.add_parser("groups", help="set a device's ACL groups (comma separated)")
    groups.add_argument("device")
    groups.add_argument("groups", help="e.g. hall-a,boilers ('' for none)")
    for name, text in (("disable", "refuse the device everywhere"), ("enable", "undo disable")):
        sub.add_parser(name, help=text).add_argument("device")
    remove = sub.add_parser("remove", help="remove a device's credential(s)")
    remove.add_argument("device")
    remove.add_argument("--kind", choices=KINDS, help="only this kind (default: all)")
    lst = sub.add_parser("list", help="devices with credentials, groups, state (no secrets)")
    lst.add_argument("--json", action="store_true")
    return p


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Password (again): "):
        raise CredentialError("the passwords do not match")
    return first


def credentials_main(argv: list[str], data_dir: Path) -> int:
    args = _parser().parse_args(argv)
    try:
        store = CredentialStore.open(Path(data_dir))
    except (OSError, CredentialError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return _run(args, store, Path(data_dir))
    except CredentialError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _run(args: argparse.Namespace, store: CredentialStore, data_dir: Path) -> int:
    if args.action == "list":
        for a in store.devices():
            row = {
                "device_id": a.device_id,
                "kinds": list(a.kinds),
                "groups": sorted(a.groups),
                "disabled": a.disabled,
            }
            if args.json:
                print(orjson.dumps(row).decode())
            else:
                state = "disabled" if a.disabled else "enabled"
                print(
                    f"{a.device_id}\t{','.join(a.kinds) or '-'}\t"
                    f"{','.join(sorted(a.groups)) or '-'}\t{state}"
                )
        return 0
    device = args.device
    detail: dict[str, object] = {}
    if args.action == "issue":
        secret = store.issue(device, args.kind)
        print(secret)
        print(
            f"{args.kind} secret for {device} issued; this is the only time it is shown",
            file=sys.stderr,
        )
        detail["kind"] = args.kind
    elif args.action == "set-password":
        store.set_password(device, _read_password(args.stdin))
        detail["kind"] = "mqtt"
    elif args.action == "groups":
        names = [g.strip() for g in args.groups.split(",") if g.strip()]
        store.set_groups(device, names)
        detail["groups"] = names
    elif args.action in ("disable", "enable"):
        store.set_disabled(device, args.action == "disable")
    else:  # remove
        n = store.remove(device, args.kind)
        if not n:
            print(f"error: {device} has no such credential", file=sys.stderr)
            return 1
        detail["kind"] = args.kind or "all"
        detail["removed"] = n
    record_offline(
        data_dir,
        who=cli_actor(),
        action=f"credentials {args.action}",
        target=device,
        detail=detail,
    )
    if args.action != "issue":
        print(f"{args.action}: {device}", file=sys.stderr)
    return 0
