"""Build our Dockerfile without a Docker daemon and check the container it makes.

Usage::

    .venv/bin/python bench/container_image.py            # base (cached), image, run, checks
    .venv/bin/python bench/container_image.py --rebuild-base --json

Needs (Debian): ``apt-get install buildah podman debootstrap runc`` and root.
No image registry is needed, only Debian's packages and PyPI:

1. **base image** ``localhost/edgeway-base:bookworm``: ``debootstrap --variant=minbase``
   of Debian 12 with ``python3``, ``python3-venv`` and ``ca-certificates``, put
   in an image ``FROM scratch`` (kept between runs; ``--rebuild-base``);
2. **our image**: ``buildah bud --format docker --isolation chroot`` of the
   repository's Dockerfile with ``--build-arg BASE=`` that base (the
   Dockerfile's default is ``python:3.11-slim``); the host's pip settings
   and CA bundle are mounted read-only into the build's RUN steps, so pip
   reaches the package index the host reaches (nothing of them stays in
   the image);
3. **the container**, with podman: non-root user, data volume, the image's
   own configuration with ``EDGEWAY_MQTT_PASSWORD_HASH`` from the
   environment, no network (its admin API and MQTT listener are on the
   container's own loopback); until the image's HEALTHCHECK passes
   (``podman healthcheck run``); then a device reading over MQTT (a small
   MQTT 3.1.1 client run inside the container with ``podman exec``) must
   reach the file sink on the volume, and ``podman stop`` (SIGTERM) must
   end it with exit code 0.

Where the kernel refuses ``setrlimit`` inside a container (this sandbox,
Firecracker: crun and runc both fail on the OCI spec's rlimits, and crun
refuses the hybrid cgroup layout) the containers run through a runc wrapper
that drops ``process.rlimits`` from the spec; ``--no-wrapper`` turns that off.

Figures (printed): base and image build seconds, image size, seconds from
``podman run`` to healthy, to the reading in the sink, and for ``podman stop``.
tests/integration/test_container_image.py runs this when
``EDGEWAY_CONTAINER_TEST=1`` (it takes minutes: not in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/edgeway-base:bookworm"
IMAGE = "localhost/edgeway:bench"
TOOLS = ("buildah", "podman", "debootstrap", "runc")
STORAGE = ["--storage-driver", "vfs"]

RUNC_WRAPPER = r"""#!/bin/sh
# runc without the OCI spec's rlimits (bundle config.json, exec process.json):
# setrlimit is refused inside a container here, even for the current values.
prev=""
for a in "$@"; do
  case "$prev" in
    --bundle|-b) f="$a/config.json" ;;
    --process|-p) f="$a" ;;
    *) f="" ;;
  esac
  if [ -n "$f" ] && [ -f "$f" ]; then
    python3 - "$f" <<'PY'
import json, sys
p = sys.argv[1]
d = json.load(open(p))
(d["process"] if "process" in d else d).pop("rlimits", None)
json.dump(d, open(p, "w"))
PY
  fi
  prev="$a"
done
exec RUNC "$@"
"""

MQTT_PUBLISH = r"""
import socket, struct, sys
def s(b): return struct.pack("!H", len(b)) + b
def rl(n):
    out = b""
    while True:
        n, d = divmod(n, 128)
        out += bytes([d | (128 if n else 0)])
        if not n: return out
user, pw, topic, payload = (a.encode() for a in sys.argv[1:5])
c = socket.create_connection(("127.0.0.1", 1883), timeout=10)
var = s(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30)
body = var + s(b"container-check") + s(user) + s(pw)
c.sendall(bytes([0x10]) + rl(len(body)) + body)
assert c.recv(4) == b"\x20\x02\x00\x00", "CONNACK refused"
body = s(topic) + struct.pack("!H", 7) + payload
c.sendall(bytes([0x32]) + rl(len(body)) + body)
assert c.recv(4) == b"\x40\x02\x00\x07", "no PUBACK"
c.sendall(b"\xe0\x00")
print("PUBACK")
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(
    argv: list[str], timeout: float = 900, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ...: {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def _image_exists(name: str) -> bool:
    return _run(["buildah", *STORAGE, "images", "-q", name], check=False).stdout.strip() != ""


def build_base(work: Path) -> float:
    """debootstrap Debian 12 minbase with Python into ``BASE``; seconds taken."""
    t0 = time.monotonic()
    rootfs = work / "rootfs"
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
            "http://deb.debian.org/debian",
        ],
        timeout=1800,
    )
    _run(["tar", "-C", str(rootfs), "-cf", str(work / "rootfs.tar"), "."])
    shutil.rmtree(rootfs)
    (work / "Containerfile").write_text(
        'FROM scratch\nADD rootfs.tar /\nENV LANG=C.UTF-8\nCMD ["python3"]\n'
    )
    _run(
        ["buildah", *STORAGE, "bud", "--isolation", "chroot", "-t", BASE, str(work)],
        timeout=900,
    )
    return time.monotonic() - t0


def build_image(base: str = BASE) -> float:
    """Our Dockerfile on ``base``; seconds taken."""
    mounts = []
    for f in ("/etc/pip.conf", "/etc/ssl/certs/ca-certificates.crt"):
        if Path(f).is_file():
            mounts += ["-v", f"{f}:{f}:ro"]
    t0 = time.monotonic()
    _run(
        [
            "buildah",
            *STORAGE,
            "bud",
            "--format",
            "docker",  # OCI images have no HEALTHCHECK
            "--isolation",
            "chroot",
            *mounts,
            "--build-arg",
            f"BASE={base}",
            "-t",
            IMAGE,
            str(ROOT),
        ],
        timeout=1800,
    )
    return time.monotonic() - t0


class Podman:
    """podman on the vfs storage buildah wrote to, through the runc wrapper if asked."""

    def __init__(self, work: Path, wrapper: bool) -> None:
        self.argv = ["podman", *STORAGE]
        if wrapper:
            runc = work / "rt" / "runc"  # named runc: podman keys runtime features by name
            runc.parent.mkdir(parents=True, exist_ok=True)
            runc.write_text(RUNC_WRAPPER.replace("RUNC", shutil.which("runc") or "runc"))
            runc.chmod(0o755)
            self.argv += ["--cgroup-manager", "cgroupfs", "--runtime", str(runc)]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return _run([*self.argv, *args], timeout=timeout, check=check).stdout.strip()


def password_hash(password: str) -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from edgeway.devices.config_auth import hash_password

    return hash_password(password)


def check_container(work: Path, wrapper: bool) -> dict[str, Any]:
    """Run the image and check it; figures in seconds."""
    podman = Podman(work, wrapper)
    name = f"edgeway-check-{uuid.uuid4().hex[:8]}"
    volume = name + "-data"
    out: dict[str, Any] = {}
    podman("volume", "create", volume)
    try:
        t0 = time.monotonic()
        podman(
            "run", "-d", "--name", name, "--network", "none",
            "-v", f"{volume}:/var/lib/edgeway",
            "-e", f"EDGEWAY_MQTT_PASSWORD_HASH={password_hash('pw')}",
            IMAGE,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            if _run([*podman.argv, "healthcheck", "run", name], check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("never healthy:\n" + podman("logs", name)[-3000:])
            time.sleep(1)
        out["healthy_s"] = round(time.monotonic() - t0, 1)
        out["health"] = podman("inspect", name, "--format", "{{.State.Health.Status}}")
        out["uid"] = podman("exec", name, "id", "-u")
        reading = '{"temp": 21.5, "ts": 1765000000}'
        t1 = time.monotonic()
        out["publish"] = podman(
            "exec", name, "python", "-c", MQTT_PUBLISH,
            "device", "pw", "devices/pump-1/telemetry", reading,
        )  # fmt: skip
        while True:
            export = podman(  # the file sink writes <sink name>.jsonl: "local"
                "exec", name, "cat", "/var/lib/edgeway/export/local.jsonl", check=False
            )
            if "pump-1" in export:
                break
            if time.monotonic() - t1 > 60:
                raise TimeoutError("the reading never reached the file sink")
            time.sleep(0.5)
        out["reading_in_sink_s"] = round(time.monotonic() - t1, 1)
        out["record"] = json.loads(export.splitlines()[0])
        t2 = time.monotonic()
        podman("stop", "-t", "30", name, timeout=60)
        out["stop_s"] = round(time.monotonic() - t2, 1)
        out["exit_code"] = int(podman("inspect", name, "--format", "{{.State.ExitCode}}"))
        size = podman("image", "inspect", IMAGE, "--format", "{{.Size}}")
        out["image_mb"] = round(int(size) / 1e6)
    finally:
        podman("rm", "-f", name, check=False)
        podman("volume", "rm", "-f", volume, check=False)
    return out


def run(rebuild_base: bool = False, wrapper: bool = True) -> dict[str, Any]:
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"missing: {', '.join(missing)} (apt-get install {' '.join(TOOLS)})")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgeway-image-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        if rebuild_base or not _image_exists(BASE):
            result["base_build_s"] = round(build_base(work), 1)
        else:
            result["base_build_s"] = "cached"
        result["image_build_s"] = round(build_image(), 1)
        result.update(check_container(work, wrapper))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rebuild-base", action="store_true")
    ap.add_argument("--no-wrapper", action="store_true", help="run containers with plain runc")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("BUILDAH_ISOLATION", "chroot")
    result = run(args.rebuild_base, wrapper=not args.no_wrapper)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(", ".join(f"{k}={v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
