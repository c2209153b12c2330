"""Run ``edgeway run`` as a subprocess for integration tests (used by the
fixtures in ``conftest.py``; importable by any test as ``edgeway_process``).

:class:`GatewayLauncher` starts ``python -m edgeway run`` on a free loopback
port with its own data directory, waits (bounded) until the MQTT port accepts,
and :meth:`GatewayLauncher.stop_all` stops every process it started (SIGTERM,
then SIGKILL after 5 s).

With ``EDGEWAY_ITEST_BROKER=mosquitto`` in the environment, tests that need no
edgeway-specific configuration run against ``/usr/sbin/mosquitto`` instead: a
reference run showing that a test encodes standard MQTT behaviour.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

STARTUP_TIMEOUT = 20.0
"""Seconds to wait for the MQTT port to accept. Start-up is well under a second
when the machine is quiet; the bound is generous because CI machines are shared."""
PORT_ATTEMPTS = 3
"""Tries with a fresh free port when the one we picked was taken meanwhile."""
STOP_TIMEOUT = 5.0
"""The gateway promises to exit within 5 s of SIGTERM; after that we SIGKILL."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Poll until ``proc`` itself has a listening TCP socket on ``port``;
    False on timeout or if it exits first. (Merely connecting to the port
    could reach some other process that grabbed the port meanwhile.)"""
    deadline = time.monotonic() + timeout
    ps = psutil.Process(proc.pid)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            sockets = ps.net_connections(kind="tcp")
        except psutil.Error:
            return False
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets):
            return True
        time.sleep(0.05)
    return False


def edgeway_only() -> None:
    """Skip the calling test in a Mosquitto reference run: it checks behaviour
    edgeway defines beyond MQTT (telemetry reason codes, CLI messages)."""
    if os.environ.get("EDGEWAY_ITEST_BROKER") == "mosquitto":
        pytest.skip("edgeway-specific behaviour (EDGEWAY_ITEST_BROKER=mosquitto)")


@dataclass(slots=True)
class GatewayProcess:
    """A running ``edgeway run`` subprocess."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    workdir: Path
    """The process's working directory (``./edgeway-data`` resolves inside it)."""
    config_path: Path | None
    output_path: Path
    """stdout and stderr of the process, combined."""
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        try:
            return self.output_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the process to exit; its code, or None."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code
        (negative: killed by that signal)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            code = self.wait_exit(timeout)
            if code is not None:
                return code
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        return self.process.wait(timeout=10)


StartGateway = Callable[..., GatewayProcess]


class GatewayLauncher:
    """Starts ``edgeway run`` processes and remembers them, so that
    :meth:`stop_all` stops every one (see :func:`start_gateway` for arguments)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self.started: list[GatewayProcess] = []

    def start(
        self,
        config_text: str | None = None,
        *,
        port: int | None = None,
        data_dir: Path | bool | None = None,
        extra_args: Sequence[str] = (),
        listen: bool | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> GatewayProcess:
        """Start one gateway; see :func:`conftest.start_gateway` for the arguments."""
        # A port found free can be taken by someone else before the gateway
        # binds it (tests run in parallel on shared machines): then the
        # gateway exits 1 naming the port, and we try another one.
        for _ in range(PORT_ATTEMPTS - 1 if port is None else 0):
            chosen = free_port()
            gw = self._start(config_text, chosen, data_dir, extra_args, listen, wait, env)
            if gw.process.poll() != 1 or not self._port_taken(gw):
                return self._checked(gw, wait)
        return self._checked(
            self._start(
                config_text,
                free_port() if port is None else port,
                data_dir,
                extra_args,
                listen,
                wait,
                env,
            ),
            wait,
        )

    @staticmethod
    def _port_taken(gw: GatewayProcess) -> bool:
        return str(gw.port) in gw.output()

    def _checked(self, gw: GatewayProcess, wait: bool) -> GatewayProcess:
        if wait and gw.process.poll() is not None:
            pytest.fail(
                f"edgeway run exited with {gw.process.returncode} ({' '.join(gw.args[1:])}); "
                f"output:\n{gw.output()[-4000:]}"
            )
        return gw

    def _start(
        self,
        config_text: str | None,
        port: int,
        data_dir: Path | bool | None,
        extra_args: Sequence[str],
        listen: bool | None,
        wait: bool,
        env: dict[str, str] | None,
    ) -> GatewayProcess:
        workdir = self._tmp.mktemp("gateway")
        host = "127.0.0.1"
        args = [sys.executable, "-m", "edgeway", "run", "--log-level", "info"]
        config_path: Path | None = None
        if os.environ.get("EDGEWAY_ITEST_BROKER") == "mosquitto":
            # Reference run: the same client tests against Mosquitto, to check
            # that a test encodes standard MQTT behaviour. Only for tests that
            # need no edgeway-specific configuration.
            if config_text is not None or extra_args or data_dir is not None:
                pytest.skip("edgeway-specific test (EDGEWAY_ITEST_BROKER=mosquitto)")
            config_path = workdir / "mosquitto.conf"
            config_path.write_text(
                f"listener {port} {host}\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 100000\n",
                encoding="utf-8",
            )
            args = ["/usr/sbin/mosquitto", "-c", str(config_path)]
            data_path = workdir
        elif config_text is not None:
            config_path = workdir / "edgeway.yaml"
            config_path.write_text(
                textwrap.dedent(config_text).replace("{port}", str(port)), encoding="utf-8"
            )
            args += ["--config", str(config_path)]
        if args[0] != "/usr/sbin/mosquitto":
            if listen is None:
                listen = config_text is None or "{port}" not in config_text
            if listen:
                args += ["--mqtt-listen", f"{host}:{port}"]
            if data_dir is None:
                data_path = workdir / "data"
                args += ["--data-dir", str(data_path)]
            elif data_dir is False:
                data_path = workdir / "edgeway-data"
            else:
                assert isinstance(data_dir, Path)
                data_path = data_dir
                args += ["--data-dir", str(data_path)]
            args += list(extra_args)
        proc_env = {k: v for k, v in os.environ.items() if k != "EDGEWAY_CONFIG"}
        proc_env["PYTHONUNBUFFERED"] = "1"
        if env:
            proc_env.update(env)
        output_path = workdir / "output.log"
        with output_path.open("wb") as out:
            proc = subprocess.Popen(
                args, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=proc_env
            )
        gw = GatewayProcess(host, port, proc, data_path, workdir, config_path, output_path, args)
        self.started.append(gw)
        if wait and not wait_listening(proc, port, STARTUP_TIMEOUT) and proc.poll() is None:
            pytest.fail(
                f"edgeway run never opened port {port} ({' '.join(args[1:])}); "
                f"output:\n{gw.output()[-4000:]}"
            )
        if wait and proc.poll() is not None:
            proc.wait()
        return gw

    def stop_all(self) -> None:
        for gw in self.started:
            gw.terminate()
