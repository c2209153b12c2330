"""The CLI's side of the admin API: commands that act on a running gateway.

``--admin URL`` picks the gateway (default: the configured ``admin.listen``,
with a wildcard address turned into loopback); the token comes from
``EDGEWAY_TOKEN``. Commands build an :class:`AdminClient` with
:func:`client_from_args` and get typed errors (:class:`AdminClientError`)
that say what to do, never a traceback::

    client = client_from_args(args, cfg)
    status = client.get_json("/api/status")

``edgeway status`` is the first such command; ``command send`` and
``reload`` are meant to follow the same shape.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import orjson

from edgeway.config import Config, parse_host_port

TOKEN_ENV = "EDGEWAY_TOKEN"
TIMEOUT = 10.0
"""Seconds for one admin request: the API answers from memory in
milliseconds; a gateway that takes longer is stuck, and the CLI should say so."""


class AdminClientError(Exception):
    """A request to the admin API failed; the message says what to do."""


def add_admin_arguments(p: argparse.ArgumentParser) -> None:
    """``--admin URL`` for a command that talks to a running gateway."""
    p.add_argument(
        "--admin",
        metavar="URL",
        help="the gateway's admin API (default: http:// + the configured admin.listen); "
        f"the token comes from ${TOKEN_ENV}",
    )


def default_admin_url(cfg: Config) -> str:
    """``http://HOST:PORT`` of the configured admin listener."""
    if cfg.admin is None or not cfg.admin.enabled:
        raise AdminClientError(
            "no admin API configured (admin.listen): pass --admin URL or give --config"
        )
    host, port = parse_host_port(cfg.admin.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class AdminClient:
    """Synchronous JSON requests to one gateway's admin API."""

    def __init__(self, base_url: str, token: str | None, timeout: float = TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_json(self, path: str) -> Any:
        return self._request("GET", path)

    def post_json(self, path: str, body: object) -> Any:
        return self._request("POST", path, content=orjson.dumps(body))

    def put_file(self, path: str, file: Path, headers: dict[str, str]) -> tuple[int, Any]:
        """Stream ``file`` as the body of a PUT (never read whole into memory);
        ``(status, JSON body)`` like :meth:`request_raw`."""

        def chunks() -> Iterator[bytes]:
            with open(file, "rb") as f:
                while chunk := f.read(256 * 1024):
                    yield chunk

        size = file.stat().st_size
        r = self._send("PUT", path, chunks(), {**headers, "Content-Length": str(size)})
        if r.status_code in (401, 403) or (r.status_code >= 500 and r.status_code != 503):
            self._raise_for(r, path)
        return r.status_code, self._json(r.content or b"{}", path)

    def request_raw(self, method: str, path: str, content: bytes | None = None) -> tuple[int, Any]:
        """A request whose refusals (4xx other than 401/403) the caller reads:
        ``(status, JSON body)``. Connection problems and missing or weak
        tokens still raise :class:`AdminClientError`."""
        r = self._send(method, path, content)
        if r.status_code in (401, 403) or (r.status_code >= 500 and r.status_code != 503):
            self._raise_for(r, path)
        return r.status_code, self._json(r.content or b"{}", path)

    def request_text(self, method: str, path: str) -> tuple[int, str]:
        """A request whose answer is text, not JSON (a CSV export):
        ``(status, text)``; an error status raises :class:`AdminClientError`."""
        r = self._send(method, path, None)
        if r.status_code >= 400:
            self._raise_for(r, path)
        return r.status_code, r.text

    def _raise_for(self, r: httpx.Response, path: str) -> NoReturn:
        message = _error_message(r)
        if r.status_code == 401:
            hint = (
                f"set {TOKEN_ENV} (make one with 'edgeway tokens create --name NAME --role viewer')"
                if "Authorization" not in self._http.headers
                else f"the token in {TOKEN_ENV} is unknown or revoked"
            )
            raise AdminClientError(f"{self.base_url}{path}: 401 {message}; {hint}")
        raise AdminClientError(f"{self.base_url}{path}: {r.status_code} {message}")

    def _request(self, method: str, path: str, content: bytes | None = None) -> Any:
        headers = {"Content-Type": "application/json"} if content is not None else None
        r = self._send(method, path, content, headers)
        if r.status_code >= 400:
            self._raise_for(r, path)
        return self._json(r.content, path)

    def _send(
        self,
        method: str,
        path: str,
        content: bytes | Iterator[bytes] | None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One request; a connection problem becomes an :class:`AdminClientError`."""
        try:
            return self._http.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as e:
            raise AdminClientError(
                f"cannot reach the admin API at {self.base_url}: {e or type(e).__name__} "
                "(is the gateway running with admin.listen there?)"
            ) from None

    def _json(self, content: bytes, path: str) -> Any:
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            raise AdminClientError(f"{self.base_url}{path}: the answer is not JSON") from None


def _error_message(r: httpx.Response) -> str:
    try:
        body = orjson.loads(r.content)
    except orjson.JSONDecodeError:
        return r.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return r.reason_phrase


def client_from_args(
    args: argparse.Namespace, cfg: Config, timeout: float = TIMEOUT
) -> AdminClient:
    """The client for ``--admin`` (or the configured listener) and ``$EDGEWAY_TOKEN``;
    ``timeout`` longer than the default for requests that wait on purpose."""
    url = args.admin or default_admin_url(cfg)
    return AdminClient(url, os.environ.get(TOKEN_ENV) or None, timeout)


# --------------------------------------------------------------------------
# edgeway status


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    add_admin_arguments(p)
    p.add_argument("--json", action="store_true", help="print /api/status as it came")


def status_main(args: argparse.Namespace, cfg: Config) -> int:
    """``edgeway status``: a running gateway's state, from its admin API."""
    try:
        with client_from_args(args, cfg) as client:
            st = client.get_json("/api/status")
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode())
        return 0
    build = st.get("build") or {}
    print(
        f"gateway {st.get('gateway_id')}: {'ready' if st.get('ready') else 'not ready'}, "
        f"up {float(st.get('uptime_s') or 0):.0f} s, edgeway {build.get('version')} "
        f"(Python {build.get('python')})"
    )
    for sink, c in sorted((st.get("outbox") or {}).items()):
        print(
            f"  sink {sink}: {c.get('pending', 0)} pending, {c.get('delivered', 0)} delivered, "
            f"{c.get('dropped', 0)} dropped"
        )
    return 0


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    add_admin_arguments(p)
    p.add_argument("--limit", type=int, default=50, help="entries, newest first (default 50)")
    p.add_argument("--before", type=int, help="entries older than this id (paging)")
    p.add_argument("--action", help="only actions starting with this (e.g. 'POST /api/config')")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def audit_main(args: argparse.Namespace, cfg: Config) -> int:
    """``edgeway audit``: the audit log, from a running gateway's admin API."""
    import time
    import urllib.parse

    query = {"limit": str(args.limit)}
    if args.before is not None:
        query["before"] = str(args.before)
    if args.action:
        query["action"] = args.action
    try:
        with client_from_args(args, cfg) as client:
            body = client.get_json("/api/audit?" + urllib.parse.urlencode(query))
    except AdminClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for entry in body.get("entries") or []:
        if args.json:
            print(orjson.dumps(entry).decode())
            continue
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(entry.get("at") or 0)))
        status = entry.get("status")
        print(
            f"{entry.get('id')}\t{when}\t{entry.get('who')}\t{entry.get('source') or '-'}\t"
            f"{entry.get('action')}\t{entry.get('target') or '-'}\t{status if status else '-'}"
            f"\t{entry.get('reason') or '-'}"
        )
    return 0
