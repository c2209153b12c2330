"""``edgeway provisioning``: provisioning keys devices enrol with.

Works offline and while the gateway runs (it re-reads ``provisioning.db``
when it changed); every change is in the audit log (who: the OS user; never
the secret). See docs/devices.md#auto-provisioning::

    edgeway provisioning add site-a --groups site-a --type pump --kinds mqtt,http \\
        --pattern 'pump-*' --rate 30 --expires 30d --max-uses 500   # prints ID:SECRET once
    edgeway provisioning list [--json]
    edgeway provisioning rotate site-a [--grace 24h]   # prints the new ID:SECRET once
    edgeway provisioning revoke site-a

Exit status: 0 done, 1 refused (bad value, unknown key), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from edgeway.audit import cli_actor, record_offline
from edgeway.devices.credentials import CredentialError
from edgeway.devices.provisioning import (
    DEFAULT_GRACE,
    DEFAULT_RATE,
    ProvisioningError,
    ProvisioningKeys,
)

__all__ = ["provisioning_main"]


def _duration(value: str) -> float:
    from edgeway.config_types import _parse_duration

    try:
        return float(_parse_duration(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_provisioning_arguments(p: argparse.ArgumentParser) -> None:
    """The ``edgeway provisioning`` actions (also reached as ``edgeway devices
    provisioning`` through the main parser's pass-through)."""
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="make a provisioning key and print ID:SECRET (once)")
    add.add_argument("key_id")
    add.add_argument("--groups", type=_list, default=[], help="groups new devices join (G1,G2)")
    add.add_argument("--type", help="the new devices' type")
    add.add_argument("--tags", type=_list, help="the new devices' tags")
    add.add_argument("--metadata", help="a JSON object put in the new devices' metadata")
    add.add_argument(
        "--kinds", type=_list, default=["mqtt"], help="credentials issued (mqtt,http,coap)"
    )
    add.add_argument("--pattern", help="glob the device ids must match, e.g. 'pump-*'")
    add.add_argument(
        "--rate", type=float, default=DEFAULT_RATE, help="enrolments a minute (default 60)"
    )
    add.add_argument("--expires", type=_duration, help="valid for this long (e.g. 30d)")
    add.add_argument("--max-uses", type=int, help="enrolments allowed in all")
    add.add_argument(
        "--reprovision",
        action="store_true",
        help="a device id that exists may enrol again (its old credentials stop working)",
    )
    rotate = sub.add_parser("rotate", help="a new secret; the old one works for --grace")
    rotate.add_argument("key_id")
    rotate.add_argument(
        "--grace", type=_duration, default=DEFAULT_GRACE, help="old secret's grace (default 24h)"
    )
    revoke = sub.add_parser("revoke", help="refuse the key from now on")
    revoke.add_argument("key_id")
    lst = sub.add_parser("list", help="the keys (no secrets)")
    lst.add_argument("--json", action="store_true")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeway provisioning",
        description="Provisioning keys in DATA_DIR/provisioning.db (see docs/devices.md).",
    )
    add_provisioning_arguments(p)
    return p


def provisioning_main(argv: list[str], data_dir: Path) -> int:
    args = _parser().parse_args(argv)
    try:
        keys = ProvisioningKeys.open(Path(data_dir))
    except (OSError, CredentialError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return _run(args, keys, Path(data_dir))
    except ProvisioningError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        keys.close()


def key_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :meth:`ProvisioningKeys.add` from a JSON
    body (the admin API) or the CLI's options: unknown fields refused."""
    allowed = {
        "groups", "template", "id_pattern", "rate_per_minute", "expires_in", "max_uses",
        "reprovision",
    }  # fmt: skip
    unknown = set(body) - allowed - {"id"}
    if unknown:
        raise ProvisioningError("invalid", f"unknown fields: {', '.join(sorted(unknown))}")
    out = {k: v for k, v in body.items() if k in allowed and v is not None}
    for name in ("rate_per_minute", "expires_in", "max_uses"):
        if isinstance(out.get(name), bool):  # JSON true is no number of anything
            raise ProvisioningError("invalid", f"{name}: a number")
    expires_in = out.pop("expires_in", None)
    if expires_in is not None:
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            raise ProvisioningError("invalid", "expires_in: seconds above 0")
        out["expires"] = time.time() + float(expires_in)
    for name, kind in (("groups", list), ("template", dict), ("reprovision", bool)):
        if name in out and not isinstance(out[name], kind):
            raise ProvisioningError("invalid", f"{name}: must be a {kind.__name__}")
    if "id_pattern" in out and not isinstance(out["id_pattern"], str):
        raise ProvisioningError("invalid", "id_pattern: a string")
    if "rate_per_minute" in out and not isinstance(out["rate_per_minute"], int | float):
        raise ProvisioningError("invalid", "rate_per_minute: a number")
    if "max_uses" in out and not isinstance(out["max_uses"], int):
        raise ProvisioningError("invalid", "max_uses: an integer")
    return out


def _run(args: argparse.Namespace, keys: ProvisioningKeys, data_dir: Path) -> int:
    if args.action == "list":
        now = time.time()
        for k in keys.list():
            row = k.to_json(now)
            if args.json:
                print(orjson.dumps(row).decode())
            else:
                uses = f"{k.uses}/{k.max_uses}" if k.max_uses else str(k.uses)
                print(
                    f"{k.key_id}\t{row['state']}\t{','.join(k.groups) or '-'}\t"
                    f"{k.id_pattern or '*'}\t{k.rate_per_minute:g}/min\tuses {uses}"
                )
        return 0
    detail: dict[str, Any] = {}
    if args.action == "add":
        template: dict[str, Any] = {"kinds": args.kinds}
        if args.type is not None:
            template["type"] = args.type
        if args.tags is not None:
            template["tags"] = args.tags
        if args.metadata is not None:
            try:
                template["metadata"] = orjson.loads(args.metadata)
            except orjson.JSONDecodeError as e:
                raise ProvisioningError("invalid", f"--metadata is not JSON: {e}") from None
        secret = keys.add(
            args.key_id,
            groups=args.groups,
            template=template,
            id_pattern=args.pattern,
            rate_per_minute=args.rate,
            expires=time.time() + args.expires if args.expires else None,
            max_uses=args.max_uses,
            reprovision=args.reprovision,
        )
        detail = {"groups": args.groups, "template": template, "pattern": args.pattern}
    elif args.action == "rotate":
        secret = keys.rotate(args.key_id, args.grace)
        detail = {"grace": args.grace}
    else:  # revoke
        keys.revoke(args.key_id)
        secret = ""
    record_offline(
        data_dir,
        who=cli_actor(),
        action=f"provisioning {args.action}",
        target=args.key_id,
        detail=detail,
    )
    if secret:
        print(f"{args.key_id}:{secret}")
        print(
            f"provisioning key {args.key_id}: this is the only time its secret is shown",
            file=sys.stderr,
        )
    else:
        print(f"{args.action}: {args.key_id}", file=sys.stderr)
    return 0
