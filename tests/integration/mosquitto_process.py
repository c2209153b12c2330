"""A real Mosquitto on a free loopback port, owned by one test: restartable on
the same port, with or without persistence (``persistence true`` keeps
sessions, queued QoS 1 messages and retained messages across a restart, as a
cloud broker with a disk does), killable with SIGKILL, stoppable with SIGTERM.

Used by the integration and fault-injection tests (tests/faults/) where the
"cloud" is an MQTT broker that the test must restart or cut off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from edgeway_process import free_port

MOSQUITTO = "/usr/sbin/mosquitto"
START_TIMEOUT = 10.0
"""Mosquitto listens within milliseconds; 10 s only trips when it cannot start."""


class MosquittoProcess:
    """One Mosquitto; ``start()``/``kill()``/``stop()`` any number of times."""

    def __init__(self, directory: Path, *, persistence: bool = False, extra: str = "") -> None:
        self.port = free_port()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        # max_queued_messages 0: unlimited (the default 1000 silently drops).
        # "user root": started as root, Mosquitto would switch to "mosquitto",
        # who cannot write pytest's tmp directory.
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "max_queued_messages 0",
            "set_tcp_nodelay true",
            "user root",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.dir}/",
            # Written at every change would be slow; at shutdown (SIGTERM) and
            # every second is what a cloud broker with a disk approximates.
            "autosave_interval 1",
        ]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n" + extra + "\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        log = (self.dir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log()[-2000:]}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            time.sleep(0.02)  # polling a port: there is no event to wait on
        raise TimeoutError("mosquitto did not start listening")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.dir / "mosquitto.log").read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """SIGTERM: a clean stop (persistence written out)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash (only what autosave wrote survives)."""
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: accepts TCP connections (the kernel does) but never answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.send_signal(sig)
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(START_TIMEOUT)
        self.proc = None
