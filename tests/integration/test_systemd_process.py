"""``edgeway run`` under a service manager: sd_notify over ``$NOTIFY_SOCKET``.

The test plays systemd's part: it binds the AF_UNIX datagram socket, starts
the real process with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set, and reads
what the gateway says: ``READY=1`` only once devices can connect, watchdog
pings at half the interval, ``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgeway_process import StartGateway, edgeway_only

TIMEOUT = 20.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield sock, str(path)
    finally:
        sock.close()


def _messages(sock: socket.socket, until: str, timeout: float = TIMEOUT) -> list[str]:
    """Datagrams received until one contains the line ``until`` (bounded)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        got.append(data.decode())
        if until in data.decode().splitlines():
            return got
    raise AssertionError(f"no {until!r} within {timeout} s; got {got}")


def test_ready_watchdog_and_stopping_are_announced(
    start_gateway: StartGateway, notify_socket: tuple[socket.socket, str]
) -> None:
    edgeway_only()
    sock, path = notify_socket
    gw = start_gateway(wait=False, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    before_ready = _messages(sock, "READY=1")
    ready = before_ready[-1].splitlines()
    assert f"MAINPID={gw.pid}" in ready
    # READY=1 means devices can connect now, not "soon".
    with socket.create_connection((gw.host, gw.port), timeout=2):
        pass
    # Pings every 0.2 s (half of WATCHDOG_USEC): a few in one second.
    t0 = time.monotonic()
    pings = 0
    while time.monotonic() - t0 < 1.0:
        pings += sum("WATCHDOG=1" in m.splitlines() for m in _messages(sock, "WATCHDOG=1", 1.0))
    assert 3 <= pings <= 7, pings
    assert gw.terminate() == 0
    assert "STOPPING=1" in "\n".join(_messages(sock, "STOPPING=1", 1.0))


def test_without_notify_socket_nothing_is_sent(
    start_gateway: StartGateway, notify_socket: tuple[socket.socket, str]
) -> None:
    # The same start without NOTIFY_SOCKET: the socket hears nothing, and the
    # gateway runs normally.
    edgeway_only()
    sock, _ = notify_socket
    gw = start_gateway()
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    assert gw.terminate() == 0


def test_a_listener_that_is_gone_does_not_stop_the_gateway(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    # NOTIFY_SOCKET naming nothing (the manager went away): logged once, no crash.
    edgeway_only()
    gw = start_gateway(env={"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    with socket.create_connection((gw.host, gw.port), timeout=2):
        pass
    assert gw.terminate() == 0
    assert gw.output().count("cannot notify systemd") == 1
