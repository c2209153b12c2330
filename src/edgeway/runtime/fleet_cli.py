"""``edgeway fleet keygen|sign``: make the key and sign configurations to push
to gateways (offline: nothing here talks to a gateway; see docs/fleet.md).

::

    edgeway fleet keygen --key fleet.pem              # prints the public key for fleet.keys
    edgeway fleet sign site.yaml --version 7 --key fleet.pem [--gateway gw-3]

``sign`` prints the cloud request to send through a command downlink (the MQTT
sink's ``commands_topic`` and so on): ``{"id", "device_id", "name":
"config.apply", "params": {"version", "config", "signature"}}``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import orjson


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair; prints the public key")
    keygen.add_argument("--key", type=Path, required=True, help="where to write the private key")
    sign = sub.add_parser("sign", help="sign a configuration; prints the config.apply request")
    sign.add_argument("config", type=Path)
    sign.add_argument("--version", type=int, required=True, help="above every version sent before")
    sign.add_argument("--key", type=Path, required=True, help="the private key (PEM)")
    sign.add_argument("--gateway", help="the gateway id the request is for (its device_id)")


def fleet_main(args: argparse.Namespace) -> int:
    from edgeway.runtime.fleet import signed_message
    from edgeway.signing import generate, sign

    try:
        if args.action == "keygen":
            print(generate(args.key))
            return 0
        if args.version < 1:
            print("error: --version must be 1 or more", file=sys.stderr)
            return 2
        text = args.config.read_text(encoding="utf-8")
        signature = sign(args.key, signed_message(args.version, text))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(text.encode()).hexdigest()
    request: dict[str, object] = {
        "id": f"fleet-v{args.version}-{digest[:12]}",
        "name": "config.apply",
        "params": {"version": args.version, "config": text, "signature": signature},
    }
    if args.gateway:
        request["device_id"] = args.gateway
    print(orjson.dumps(request).decode())
    return 0
