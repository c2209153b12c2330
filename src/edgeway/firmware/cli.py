"""``edgeway firmware ...``: images and campaigns through a running gateway's
admin API (``--admin URL``, token from ``$EDGEWAY_TOKEN``); ``sign`` works offline.

::

    edgeway firmware sign pump-ctl 2.1 image.bin --key release.pem     # prints the signature
    edgeway firmware upload pump-ctl 2.1 image.bin --signature SIG
    edgeway firmware images
    edgeway firmware campaign IMAGE_ID --group line-1=pump-1,pump-2 --group line-2=pump-3 \\
        [--canary 0.1] [--pace 60] [--success 0.9] [--errors 0.2]
    edgeway firmware campaign IMAGE_ID --group line-1 --group line-2 [--tag beta] [--type pump]
        # the device registry's groups as waves, resolved now
    edgeway firmware campaigns | show ID | pause ID | resume ID | abort ID

The key pair is made with ``edgeway models keygen --key release.pem`` (the
same Ed25519 keys; its public half goes in ``firmware.keys``).
Exit status: 0 done, 1 refused or failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from edgeway.admin.client import AdminClientError, add_admin_arguments, client_from_args
from edgeway.config import Config


def add_firmware_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sign = sub.add_parser("sign", help="sign an image (offline); prints the signature")
    upload = sub.add_parser("upload", help="upload an image")
    for q in (sign, upload):
        q.add_argument("hardware")
        q.add_argument("version")
        q.add_argument("file", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the private key (PEM)")
    upload.add_argument("--signature", help="base64 Ed25519 signature (see 'sign')")
    upload.add_argument("--note", default="")
    sub.add_parser("images", help="uploaded images")
    camp = sub.add_parser("campaign", help="start a campaign")
    camp.add_argument("image", help="image id (see 'images')")
    camp.add_argument(
        "--group", action="append", default=[], metavar="NAME[=DEV,DEV]",
        help="a wave, in order; repeat for each group: NAME=DEV,DEV names its devices, "
        "NAME alone takes the device registry's group NAME",
    )  # fmt: skip
    camp.add_argument("--tag", action="append", default=[], help="registry devices with this tag")
    camp.add_argument("--type", help="registry devices of this type")
    camp.add_argument("--canary", type=float, default=0.1, help="share of devices first")
    camp.add_argument("--pace", type=float, default=60, help="devices started per minute")
    camp.add_argument("--success", type=float, default=0.9, help="success threshold per wave")
    camp.add_argument("--errors", type=float, default=0.2, help="error threshold that halts")
    sub.add_parser("campaigns", help="campaigns and their counts")
    acts = {}
    for name in ("show", "pause", "resume", "abort"):
        acts[name] = sub.add_parser(name, help=f"{name} a campaign")
        acts[name].add_argument("id")
    for q in (upload, camp, sub.choices["images"], sub.choices["campaigns"], *acts.values()):
        add_admin_arguments(q)


def firmware_main(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "sign":
        from edgeway.firmware.service import signed_message
        from edgeway.signing import sign

        try:
            digest = _sha256(args.file)
            print(sign(args.key, signed_message(args.hardware, args.version, digest)))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        with client_from_args(args, cfg, timeout=300.0) as client:
            status, body = _request(client, args)
    except (AdminClientError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if status >= 400:
        print(f"error: {body.get('message', body)}", file=sys.stderr)
        return 1
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    return 0


def _request(client: Any, args: argparse.Namespace) -> tuple[int, Any]:
    a = args.action
    if a == "upload":
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Image-SHA256": _sha256(args.file).hex(),
        }
        if args.signature:
            headers["X-Image-Signature"] = args.signature
        q = urllib.parse.urlencode(
            {"hardware": args.hardware, "version": args.version, "note": args.note}
        )
        return client.put_file(f"/api/firmware/images?{q}", args.file, headers)  # type: ignore[no-any-return]
    if a == "images":
        return 200, client.get_json("/api/firmware/images")
    if a == "campaigns":
        return 200, client.get_json("/api/firmware/campaigns")
    if a == "campaign":
        named = [g for g in args.group if "=" in g]
        body: dict[str, Any]
        if named:
            if len(named) < len(args.group) or args.tag or args.type:
                raise ValueError(
                    "--group NAME=DEV,... names devices: not with registry groups, --tag or --type"
                )
            groups: dict[str, list[str]] = {}
            for g in named:
                name, _, devices = g.partition("=")
                if not name or not devices:
                    raise ValueError(f"--group {g!r}: NAME=DEV,DEV,...")
                groups[name] = [d for d in devices.split(",") if d]
            body = {"groups": groups}
        elif args.group or args.tag or args.type:
            body = {"groups": args.group, "tags": args.tag, "type": args.type}
        else:
            raise ValueError("a campaign needs --group, --tag or --type")
        body |= {
            "image": args.image,
            "canary_share": args.canary,
            "pace": args.pace,
            "success_threshold": args.success,
            "error_threshold": args.errors,
        }
        return client.request_raw("POST", "/api/firmware/campaigns", orjson.dumps(body))  # type: ignore[no-any-return]
    cid = urllib.parse.quote(args.id, safe="")
    if a == "show":
        return client.request_raw("GET", f"/api/firmware/campaigns/{cid}")  # type: ignore[no-any-return]
    return client.request_raw("POST", f"/api/firmware/campaigns/{cid}/{a}", b"")  # type: ignore[no-any-return]


def _sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()
