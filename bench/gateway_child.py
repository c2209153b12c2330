"""``edgeway run`` as a child process of a benchmark, from a config text.

Shared by ``auth_storm.py`` and ``acl_ingest.py``::

    port, admin = free_port(), free_port()
    with GatewayChild(work, config_text, admin) as gw:   # healthy when entered
        ...  gw.pid, gw.start_s, cpu_seconds(gw.pid)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
"""Seconds a gateway may take to answer /healthz (a loaded machine, 10,000 rows)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GatewayChild:
    """Writes ``work/edgeway.yaml``, starts ``edgeway run`` on it (this
    tree's code, or the tree at ``src`` for a reference run), and waits until
    ``/healthz`` on ``admin_port`` says 200; stops it on exit. Its output goes
    to ``work/edgeway.log``."""

    def __init__(
        self, work: Path, config: str, admin_port: int, *, src: Path = ROOT / "src"
    ) -> None:
        self.work = work
        self.src = src
        self.config = config
        self.admin_port = admin_port
        self.log_path = work / "edgeway.log"
        self.start_s = 0.0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def __enter__(self) -> GatewayChild:
        cfg = self.work / "edgeway.yaml"
        cfg.write_text(self.config)
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeway", "run", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        t = time.monotonic()
        url = f"http://127.0.0.1:{self.admin_port}/healthz"
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(self.log_tail())
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t > READY_TIMEOUT:
                self.__exit__(None, None, None)
                raise SystemExit(f"edgeway not healthy in {READY_TIMEOUT:.0f} s")
            time.sleep(0.02)
        self.start_s = time.monotonic() - t
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
