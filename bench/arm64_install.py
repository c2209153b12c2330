"""Install edgeway on Debian 12 arm64 (a Raspberry Pi's 64-bit OS) and run it, under qemu.

Usage (root; ``apt-get install debootstrap qemu-user-static binfmt-support``)::

    .venv/bin/python bench/arm64_install.py                 # about 15 minutes under emulation
    .venv/bin/python bench/arm64_install.py --rootfs /var/tmp/arm64-rootfs --json

No ARM hardware here: the arm64 programs run through qemu-user (binfmt_misc),
which proves that the install works from wheels and that the gateway starts
and stores a reading on arm64, not how fast a board is.

1. ``debootstrap --arch=arm64 --variant=minbase bookworm`` with ``python3``,
   ``python3-venv`` and ``ca-certificates`` (Raspberry Pi OS 12 has the same
   Python 3.11), unless ``--rootfs`` names one already made;
2. on the host, ``pip download --only-binary=:all: --platform
   manylinux*_aarch64`` of our wheel with the ``all`` extra: every
   dependency must exist as an aarch64 (or pure Python) wheel on the index,
   nothing is compiled;
3. in the arm64 root (chroot): a venv, ``pip install --no-index`` of those
   wheels, ``edgeway --version``, the compiled modules imported, ``edgeway
   init`` and ``edgeway check`` on its output;
4. ``edgeway run`` there (loopback shared with the host, free ports): a
   reading published over MQTT by paho on the host reaches the file sink;
   SIGTERM ends it with exit code 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ["manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64"]
COMPILED = "orjson, pydantic_core, cryptography, argon2, uvloop, yaml, asyncpg, numpy, onnxruntime"


def _run(argv: list[str], timeout: float = 1800) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:8])} ...: {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing() -> list[str]:
    out = [t for t in ("debootstrap", "chroot") if shutil.which(t) is None]
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        out.append("binfmt qemu-aarch64 (qemu-user-static, binfmt-support)")
    return out


def make_rootfs(rootfs: Path) -> float:
    t0 = time.monotonic()
    _run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
            "http://deb.debian.org/debian",
        ],
        timeout=3600,
    )
    return time.monotonic() - t0


def download_wheels(dest: Path) -> list[str]:
    """Our wheel and every dependency of ``edgeway[all]`` for aarch64, from the index."""
    dist = dest / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)])
    (wheel,) = dist.glob("edgeway-*.whl")
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    _run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
            "--python-version", "3.11", "--implementation", "cp", *plats,
            "-d", str(dest / "wheels"), f"edgeway[all] @ {wheel.as_uri()}",
        ]
    )  # fmt: skip
    return sorted(p.name for p in (dest / "wheels").glob("*.whl"))


class Chroot:
    """Commands in the arm64 root, with /proc and /dev bound while it is open."""

    def __init__(self, rootfs: Path) -> None:
        self.rootfs = rootfs

    def __enter__(self) -> Chroot:
        for d in ("proc", "dev"):
            target = self.rootfs / d
            if not target.is_mount():
                _run(["mount", "--bind", f"/{d}", str(target)])
        return self

    def __exit__(self, *exc: object) -> None:
        for d in ("dev", "proc"):
            subprocess.run(["umount", "-l", str(self.rootfs / d)], check=False)

    def argv(self, *cmd: str) -> list[str]:
        return ["chroot", str(self.rootfs), *cmd]

    def __call__(self, *cmd: str, timeout: float = 1800) -> str:
        return _run(self.argv(*cmd), timeout=timeout)


def install_and_run(rootfs: Path, wheels: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shutil.rmtree(rootfs / "opt" / "edgeway", ignore_errors=True)  # a clean install each run
    inside = rootfs / "tmp" / "wheels"
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(wheels, inside)
    with Chroot(rootfs) as ch:
        out["machine"] = ch("uname", "-m")
        t0 = time.monotonic()
        ch("python3", "-m", "venv", "/opt/edgeway")
        ch(
            "/opt/edgeway/bin/pip", "install", "-q", "--no-index",
            "--find-links", "/tmp/wheels", "edgeway[all]",
        )  # fmt: skip
        out["install_s"] = round(time.monotonic() - t0, 1)
        out["version"] = ch("/opt/edgeway/bin/edgeway", "--version")
        out["imports"] = ch(
            "/opt/edgeway/bin/python", "-c",
            f"import {COMPILED}, platform; print(platform.machine())",
        )  # fmt: skip
        ch(
            "/opt/edgeway/bin/edgeway", "init", "--force",
            "--data-dir", "/var/lib/edgeway-init", "/etc/edgeway-init.yaml",
        )  # fmt: skip
        out["init_check"] = ch(
            "/opt/edgeway/bin/edgeway", "check", "/etc/edgeway-init.yaml"
        ).splitlines()[-1:]
        out.update(_run_gateway(ch, rootfs))
    return out


def _run_gateway(ch: Chroot, rootfs: Path) -> dict[str, Any]:
    """edgeway run in the arm64 root; paho on the host publishes one reading."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    mqtt_port, admin_port = _free_port(), _free_port()
    data = rootfs / "var" / "lib" / "edgeway-arm"
    shutil.rmtree(data, ignore_errors=True)
    (rootfs / "etc" / "edgeway-arm.yaml").write_text(
        f"""
gateway: {{id: arm64, data_dir: /var/lib/edgeway-arm}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{mqtt_port}", allow_anonymous: true}}]
sinks:
  - {{name: local, url: "file:///var/lib/edgeway-arm/export"}}
admin: {{listen: "127.0.0.1:{admin_port}"}}
"""
    )
    out: dict[str, Any] = {}
    log = open(rootfs / "tmp" / "edgeway-arm.log", "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ch.argv("/opt/edgeway/bin/edgeway", "run", "--config", "/etc/edgeway-arm.yaml"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        logfile = rootfs / "tmp" / "edgeway-arm.log"
        while b"edgeway ready" not in logfile.read_bytes():
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError("not ready:\n" + logfile.read_text()[-3000:])
            time.sleep(0.5)
        out["ready_s"] = round(time.monotonic() - t0, 1)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="arm-check")
        client.connect("127.0.0.1", mqtt_port)
        client.loop_start()
        info = client.publish("devices/pi-1/telemetry", b'{"temp": 19.5, "ts": 1765000000}', qos=1)
        info.wait_for_publish(60)
        client.disconnect()
        client.loop_stop()
        export = data / "export" / "local.jsonl"  # the sink's name
        deadline = time.monotonic() + 120
        while not (export.exists() and b"pi-1" in export.read_bytes()):
            if time.monotonic() > deadline:
                raise TimeoutError("the reading never reached the file sink")
            time.sleep(0.5)
        out["record"] = json.loads(export.read_text().splitlines()[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out["exit_code"] = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit_code"] = proc.wait()
    return out


def run(rootfs: Path | None = None) -> dict[str, Any]:
    absent = missing()
    if absent:
        raise RuntimeError("missing: " + ", ".join(absent))
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgeway-arm64-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        if rootfs is None:
            rootfs = work / "rootfs"
            result["debootstrap_s"] = round(make_rootfs(rootfs), 1)
        wheels = download_wheels(work)
        result["wheels"] = len(wheels)
        result["compiled_wheels"] = [w for w in wheels if "aarch64" in w]
        result.update(install_and_run(rootfs, work / "wheels"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rootfs", type=Path, help="an arm64 Debian root made before")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = run(args.rootfs)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
