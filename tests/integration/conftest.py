"""Fixtures that run the real ``edgeway run`` process for integration tests.

``start_gateway`` is a factory: each call starts ``python -m edgeway run`` as a
subprocess on a free loopback port with its own data directory, waits (bounded)
until the MQTT port accepts connections, and returns a :class:`GatewayProcess`.
Every gateway it started is stopped when the test ends (SIGTERM, then SIGKILL
after 5 s), whatever the test did. ``gateway`` is the common case: one gateway
on embedded defaults (anonymous clients allowed on the loopback listener).

Example::

    def test_something(start_gateway):
        gw = start_gateway(config_text=\"\"\"
            mqtt:
              listeners: [{bind: "127.0.0.1:{port}", allow_anonymous: false}]
              users: [{username: alice, password_hash: "$argon2id$..."}]
        \"\"\")
        client.connect(gw.host, gw.port)

In ``config_text`` the literal ``{port}`` is replaced by the chosen free port
(other braces, such as ACL placeholders, are left alone). When the config text
names ``{port}``, no ``--mqtt-listen`` flag is passed, so the file's listeners
(with their TLS and anonymous settings) are the ones that run.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 20.0
"""Seconds to wait for the MQTT port to accept. Start-up is well under a second
when the machine is quiet; the bound is generous because CI machines are shared."""
STOP_TIMEOUT = 5.0
"""The gateway promises to exit within 5 s of SIGTERM; after that we SIGKILL."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False on timeout or if
    ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


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
        workdir = self._tmp.mktemp("gateway")
        host = "127.0.0.1"
        port = free_port(host) if port is None else port
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
        if wait and not wait_port(host, port, STARTUP_TIMEOUT, proc):
            code = proc.poll()
            state = f"exited with {code}" if code is not None else "never opened the port"
            pytest.fail(
                f"edgeway run {state} ({' '.join(args[1:])}); output:\n{gw.output()[-4000:]}"
            )
        return gw

    def stop_all(self) -> None:
        for gw in self.started:
            gw.terminate()


@pytest.fixture
def start_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartGateway]:
    """Factory fixture: ``start_gateway(config_text=None, *, port=None, data_dir=None,
    extra_args=(), listen=None, wait=True, env=None) -> GatewayProcess``.

    - ``config_text``: YAML written to a temp file and passed with ``--config``;
      ``{port}`` in it is replaced by the port.
    - ``port``: reuse a port (restart tests, second-gateway tests); default a free one.
    - ``data_dir``: reuse a data directory (restart tests); default a fresh temp dir.
      ``False`` passes no ``--data-dir`` (embedded default ``./edgeway-data`` in
      the process's temp working directory).
    - ``listen``: pass ``--mqtt-listen 127.0.0.1:PORT`` (default: yes, unless the
      config text names ``{port}``).
    - ``wait``: wait until the port accepts; if the process exits or the port
      never opens, fail the test with the process output.

    Every gateway started is terminated at the end of the test.
    """
    launcher = GatewayLauncher(tmp_path_factory)
    try:
        yield launcher.start
    finally:
        launcher.stop_all()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway on embedded defaults shared by a whole test module (saves a
    process start per test). Tests using it must use unique topics and client
    ids (``mqtt_peers.unique``)."""
    launcher = GatewayLauncher(tmp_path_factory)
    try:
        yield launcher.start()
    finally:
        launcher.stop_all()


@pytest.fixture
def gateway(start_gateway: StartGateway) -> GatewayProcess:
    """One ``edgeway run`` on embedded defaults, listening on a free loopback port."""
    return start_gateway()
