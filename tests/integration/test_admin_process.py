"""The admin API's access rules on a real ``edgeway run`` process: tokenless
on a loopback listener (and said so in the log), tokens required anywhere
else, tokens made and revoked by the CLI while the process runs."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from edgeway_process import STARTUP_TIMEOUT, StartGateway, edgeway_only, free_port, wait_listening


def _tokens(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeway", "tokens", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=os.environ.copy(),
    )


def test_embedded_defaults_on_loopback_need_no_token_and_log_it(
    start_gateway: StartGateway,
) -> None:
    edgeway_only()
    admin_port = free_port()
    gw = start_gateway(extra_args=["--admin-listen", f"127.0.0.1:{admin_port}"])
    assert wait_listening(gw.process, admin_port, STARTUP_TIMEOUT)
    r = httpx.get(f"http://127.0.0.1:{admin_port}/api/status", timeout=10)
    assert r.status_code == 200 and r.json()["build"]["version"]
    assert "no tokens needed on loopback listener" in gw.output()


def test_any_other_bind_requires_tokens_made_while_running(start_gateway: StartGateway) -> None:
    edgeway_only()
    admin_port = free_port("0.0.0.0")
    gw = start_gateway(extra_args=["--admin-listen", f"0.0.0.0:{admin_port}"])
    assert wait_listening(gw.process, admin_port, STARTUP_TIMEOUT)
    assert "requires tokens and none exists yet" in gw.output()
    with httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", timeout=10) as http:
        assert http.get("/readyz").status_code == 200
        assert http.get("/api/status").status_code == 401
        made = _tokens("create", "--name", "ci", "--role", "viewer", "--data-dir", str(gw.data_dir))
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        assert http.get("/api/status", headers=auth).status_code == 200
        revoked = _tokens("revoke", token.split("_")[1], "--data-dir", str(gw.data_dir))
        assert revoked.returncode == 0, revoked.stderr
        assert http.get("/api/status", headers=auth).status_code == 401
    assert "refused GET /api/status" in gw.output()
