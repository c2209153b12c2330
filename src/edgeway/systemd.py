"""Running under systemd: readiness, watchdog and the shipped unit file.

The unit (``edgeway systemd-unit`` prints it) is ``Type=notify``: systemd
counts the service as started only when edgeway says ``READY=1``, which it
does once the gateway is ready (outbox open, listeners bound), so units
ordered after it, and ``systemctl start`` itself, wait for a gateway that
accepts devices. With ``WatchdogSec=``, edgeway sends ``WATCHDOG=1`` from its
event loop at half that interval: a loop that stalls (a blocking call, a
deadlock) stops the pings and systemd restarts the process.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (sd_notify(3); ``@`` starts an abstract-namespace
name). It is a few lines, so no dependency (python-systemd needs libsystemd
headers to build, which a Raspberry Pi image often lacks). Outside systemd
(no ``NOTIFY_SOCKET``) everything here does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from importlib.resources import files
from pathlib import Path

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify(3) datagrams to the service manager."""

    def __init__(self, address: str) -> None:
        # "@name" is Linux's abstract namespace: a leading NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """A notifier for ``$NOTIFY_SOCKET``, or None when not under systemd."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address or not (address.startswith(("/", "@"))):
            return None
        return cls(address)

    def send(self, *states: str) -> bool:
        """Send ``states`` (``READY=1``, ``STATUS=...``) as one datagram;
        False (logged once) when the manager is not listening. Never raises:
        the gateway's work does not depend on systemd hearing it."""
        message = "\n".join(states).encode("utf-8", "replace")
        try:
            self._sock.sendto(message, self.address)
        except OSError as e:
            if not self._failed:
                log.warning("cannot notify systemd at %r: %s", self.address, e)
                self._failed = True
            return False
        return True

    def close(self) -> None:
        self._sock.close()


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC`` (as
    sd_watchdog_enabled(3) advises), or None when the watchdog is off or meant
    for another process (``$WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


@contextlib.asynccontextmanager
async def service_notifications(
    ready: asyncio.Event, environ: Mapping[str, str] | None = None
) -> AsyncIterator[None]:
    """While the body runs (the gateway's ``run()``): ``READY=1`` once ``ready``
    is set, ``WATCHDOG=1`` pings if asked for, ``STOPPING=1`` on the way out."""
    notifier = Notifier.from_environ(environ)
    if notifier is None:
        yield
        return
    interval = watchdog_interval(environ)
    task = asyncio.create_task(_notify(notifier, ready, interval), name="systemd-notify")
    try:
        yield
    finally:
        notifier.send("STOPPING=1", "STATUS=stopping")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        notifier.close()


async def _notify(notifier: Notifier, ready: asyncio.Event, interval: float | None) -> None:
    if interval is None:
        await ready.wait()
        notifier.send("READY=1", "STATUS=ready", f"MAINPID={os.getpid()}")
        return
    # Ping while starting too: opening a large outbox may take longer than
    # the watchdog interval, and the loop is alive while it does.
    announced = False
    while True:
        if not announced and ready.is_set():
            notifier.send("READY=1", "STATUS=ready", f"MAINPID={os.getpid()}")
            announced = True
        notifier.send("WATCHDOG=1")
        if announced:
            await asyncio.sleep(interval)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), interval)


# ---------------------------------------------------------------- unit file


def unit_text(executable: str | None = None) -> str:
    """The shipped unit with ``ExecStart`` pointing at ``executable`` (default:
    the ``edgeway`` script of this installation)."""
    template = files("edgeway.deploy").joinpath("edgeway.service").read_text(encoding="utf-8")
    return template.replace("@EDGEWAY@", executable or edgeway_executable())


def edgeway_executable() -> str:
    """The absolute path of this installation's ``edgeway`` script: next to
    the interpreter (a venv's bin/), else on PATH, else ``python -m edgeway``."""
    beside = Path(sys.executable).parent / "edgeway"
    if beside.is_file():
        return str(beside)
    found = shutil.which("edgeway")
    if found:
        return str(Path(found).resolve())
    return f"{sys.executable} -m edgeway"
