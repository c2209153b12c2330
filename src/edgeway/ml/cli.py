"""``edgeway models ...``: the model registry of a running gateway (admin API),
and two offline helpers to sign models.

::

    edgeway models keygen --key signing.pem        # prints the public key for models.keys
    edgeway models sign model.onnx --key signing.pem   # prints the signature (base64)
    edgeway models upload pump-health 2 model.onnx [--signature B64] [--activate]
    edgeway models list | show NAME
    edgeway models activate NAME VERSION
    edgeway models shadow NAME VERSION
    edgeway models canary NAME VERSION --share 0.1
    edgeway models promote NAME | rollback NAME [--reason TEXT] | clear NAME
    edgeway models remove NAME VERSION

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

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = sub.add_parser("keygen", help="make an Ed25519 signing key (offline)")
    keygen.add_argument(
        "--key", type=Path, required=True, help="where to write the private key (PEM)"
    )
    sign = sub.add_parser("sign", help="sign a model file (offline); prints the signature")
    sign.add_argument("file", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the private key (PEM)")
    upload = sub.add_parser("upload", help="upload a model version")
    upload.add_argument("name")
    upload.add_argument("version")
    upload.add_argument("file", type=Path)
    upload.add_argument("--signature", help="Ed25519 signature, base64 (see 'sign')")
    upload.add_argument("--note", default="")
    upload.add_argument("--activate", action="store_true", help="make it active once uploaded")
    lst = sub.add_parser("list", help="models, their versions and figures")
    lst.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one model")
    show.add_argument("name")
    activate = sub.add_parser("activate", help="make a version active")
    shadow = sub.add_parser("shadow", help="run a version beside the active one, outputs compared")
    canary = sub.add_parser("canary", help="let a version score a share of the devices")
    canary.add_argument("--share", type=float, required=True, help="0 < share <= 1")
    for q in (activate, shadow, canary):
        q.add_argument("name")
        q.add_argument("version")
    promote = sub.add_parser("promote", help="make the candidate active")
    rollback = sub.add_parser("rollback", help="return to the previous version")
    rollback.add_argument("--reason", default="")
    clear = sub.add_parser("clear", help="drop the candidate")
    for q in (promote, rollback, clear):
        q.add_argument("name")
    remove = sub.add_parser("remove", help="delete a version no slot uses")
    remove.add_argument("name")
    remove.add_argument("version")
    for q in (upload, lst, show, activate, shadow, canary, promote, rollback, clear, remove):
        add_admin_arguments(q)


def models_main(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "keygen":
        return _keygen(args.key)
    if args.action == "sign":
        return _sign(args.file, args.key)
    try:
        with client_from_args(args, cfg, timeout=120.0) as client:
            status, body = _request(client, args)
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if status >= 400:
        print(f"error: {body.get('message', body)}", file=sys.stderr)
        return EXIT_FAILED
    if args.action == "list" and not args.json:
        _print_list(body)
    else:
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK


def _request(client: Any, args: argparse.Namespace) -> tuple[int, Any]:
    a = args.action
    if a == "list":
        return 200, client.get_json("/api/models")
    name = urllib.parse.quote(args.name, safe="")
    base = f"/api/models/{name}"
    if a == "show":
        return client.request_raw("GET", base)  # type: ignore[no-any-return]
    if a == "upload":
        headers = {"Content-Type": "application/octet-stream"}
        headers["X-Model-SHA256"] = _sha256(args.file)
        if args.signature:
            headers["X-Model-Signature"] = args.signature
        version = urllib.parse.quote(args.version, safe="")
        note = urllib.parse.quote(args.note)
        status, body = client.put_file(f"{base}/versions/{version}?note={note}", args.file, headers)
        if status < 400 and args.activate:
            return client.request_raw(  # type: ignore[no-any-return]
                "POST", f"{base}/activate", orjson.dumps({"version": args.version})
            )
        return status, body
    if a == "remove":
        version = urllib.parse.quote(args.version, safe="")
        return client.request_raw("DELETE", f"{base}/versions/{version}")  # type: ignore[no-any-return]
    if a == "activate":
        payload: dict[str, Any] = {"version": args.version}
        return client.request_raw("POST", f"{base}/activate", orjson.dumps(payload))  # type: ignore[no-any-return]
    if a in ("shadow", "canary"):
        payload = {"version": args.version, "mode": a}
        if a == "canary":
            payload["share"] = args.share
        return client.request_raw("POST", f"{base}/candidate", orjson.dumps(payload))  # type: ignore[no-any-return]
    if a == "clear":
        return client.request_raw("DELETE", f"{base}/candidate")  # type: ignore[no-any-return]
    if a == "promote":
        return client.request_raw("POST", f"{base}/promote", b"{}")  # type: ignore[no-any-return]
    payload = {"reason": args.reason}
    return client.request_raw("POST", f"{base}/rollback", orjson.dumps(payload))  # type: ignore[no-any-return]


def _print_list(body: dict[str, Any]) -> None:
    models = body.get("models") or {}
    if not models:
        print("no models")
    for name, m in sorted(models.items()):
        line = f"{name}: active {m.get('active')}"
        if m.get("candidate"):
            line += f", candidate {m['candidate']} ({m.get('mode')})"
        stats = m.get("active_stats") or {}
        if stats:
            line += (
                f", {stats.get('calls', 0)} calls, p99 {stats.get('latency_p99_ms')} ms, "
                f"{stats.get('errors', 0)} errors"
            )
        if m.get("silent"):
            line += f", SILENT: {m['silent']}"
        print(line)
    print(f"queue {body.get('queue')}/{body.get('queue_max')}, dropped {body.get('dropped')}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _keygen(path: Path) -> int:
    from edgeway.signing import generate

    try:
        print(generate(path))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _sign(file: Path, key_path: Path) -> int:
    from edgeway.ml.store import signed_message
    from edgeway.signing import sign

    digest = bytes.fromhex(_sha256(file))
    try:
        print(sign(key_path, signed_message(digest)))
    except (OSError, ValueError) as e:
        print(f"error: {key_path}: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
