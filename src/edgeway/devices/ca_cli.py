"""``edgeway ca``: the gateway's certificate authority (see docs/ca.md).

    edgeway ca init [--name NAME]
    edgeway ca issue-cert ID [--out FILE] [--days N]   # device bundle: key, cert, CA
    edgeway ca server-cert HOST [HOST...] [--out FILE] # the MQTT listener's own
    edgeway ca revoke ID                               # CRL updated, open connections closed
    edgeway ca crl                                     # a fresh CRL (run monthly)

Every change is recorded in the audit log. Exit 0 done, 1 refused, 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeway.audit import cli_actor, record_offline
from edgeway.devices.ca import CERT_DAYS, CaError, GatewayCa

__all__ = ["ca_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeway ca", description="The gateway's own CA.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create the CA under DATA_DIR/ca")
    init.add_argument("--name", default="edgeway gateway CA", help="the CA's common name")
    issue = sub.add_parser("issue-cert", help="a device certificate bundle (CN = ID)")
    issue.add_argument("device")
    issue.add_argument("--out", type=Path, help="bundle file (default ./ID.pem)")
    issue.add_argument("--days", type=int, default=CERT_DAYS)
    server = sub.add_parser("server-cert", help="a certificate for the MQTT TLS listener")
    server.add_argument("hosts", nargs="+", help="DNS names and IP addresses it answers on")
    server.add_argument("--out", type=Path, help="bundle file (default DATA_DIR/ca/server.pem)")
    server.add_argument("--days", type=int, default=CERT_DAYS)
    revoke = sub.add_parser("revoke", help="revoke every certificate of a device")
    revoke.add_argument("device")
    sub.add_parser("crl", help="write a fresh CRL (its next update is 30 days on)")
    return p


def ca_main(argv: list[str], data_dir: Path) -> int:
    args = _parser().parse_args(argv)
    ca = GatewayCa(Path(data_dir))
    target = ""
    detail: dict[str, object] = {}
    try:
        if args.action == "init":
            ca.init(args.name)
            print(f"CA created: {ca.cert_path} (key {ca.key_path}, CRL {ca.crl_path})")
        elif args.action == "issue-cert":
            out = args.out or Path(f"{args.device}.pem")
            issued = ca.issue(args.device, out, days=args.days)
            target = args.device
            detail = {"serial": format(issued.serial, "x"), "not_after": str(issued.not_after)}
            print(f"{out}: key, certificate (CN={args.device}, until {issued.not_after:%Y-%m-%d})"
                  " and CA certificate; keep it secret")  # fmt: skip
        elif args.action == "server-cert":
            out = args.out or ca.dir / "server.pem"
            key_out = out.with_suffix(".key")
            issued = ca.issue(
                args.hosts[0], out, days=args.days, server_names=args.hosts, key_out=key_out
            )
            target = args.hosts[0]
            detail = {"serial": format(issued.serial, "x"), "hosts": args.hosts}
            print(f"{out} (certificate and CA) and {key_out} (key, mode 0600): the listener's "
                  "tls.cert and tls.key")  # fmt: skip
        elif args.action == "revoke":
            n = ca.revoke(args.device)
            if not n:
                print(f"error: {args.device} has no certificate to revoke", file=sys.stderr)
                return 1
            target = args.device
            detail = {"certificates": n}
            print(f"revoked {n} certificate(s) of {args.device}; {ca.crl_path} updated")
        else:
            ca.write_crl()
            print(f"{ca.crl_path} written")
    except (CaError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    record_offline(Path(data_dir), who=cli_actor(), action=f"ca {args.action}", target=target,
                   detail=detail)  # fmt: skip
    return 0
