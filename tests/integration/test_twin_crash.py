"""Twins survive kill -9 (issue 16, section 1): patches acknowledged by the
admin API while ``edgeway run`` is killed with SIGKILL and restarted on the
same data directory are all there afterwards, at the version they were
acknowledged with; none is applied twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from edgeway_process import StartGateway, free_port

CONFIG = """
mqtt:
  listeners: [{{bind: "127.0.0.1:{{port}}", allow_anonymous: true}}]
admin: {{listen: "127.0.0.1:{admin}", auth: none}}
"""
LIVES = 3


def test_acknowledged_patches_survive_sigkill(start_gateway: StartGateway, tmp_path: Path) -> None:
    admin = free_port()
    base = f"http://127.0.0.1:{admin}"
    data = tmp_path / "data"
    acked: dict[int, int] = {}  # patch number -> desired version it got
    n = 0
    for _life in range(LIVES):
        gw = start_gateway(CONFIG.format(admin=admin), data_dir=data)
        stop = threading.Event()

        def kill(gw=gw, stop=stop) -> None:  # type: ignore[no-untyped-def]
            time.sleep(0.8)
            stop.set()
            gw.process.kill()

        killer = threading.Thread(target=kill, daemon=True)
        with httpx.Client(base_url=base, timeout=5) as http:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # the admin listener comes up with the gateway
                try:
                    http.get("/livez")
                    break
                except httpx.HTTPError:
                    time.sleep(0.05)
            killer.start()
            while not stop.is_set():
                try:
                    r = http.patch("/api/devices/pump-1/twin/desired", json={f"k{n}": n})
                except httpx.HTTPError:
                    break  # killed mid-request: not acknowledged
                assert r.status_code == 200, r.text
                acked[n] = r.json()["twin"]["desired_version"]
                n += 1
        killer.join(10)
        gw.process.wait(10)
        assert gw.process.returncode == -9
    gw = start_gateway(CONFIG.format(admin=admin), data_dir=data)
    with httpx.Client(base_url=base, timeout=5) as http:
        deadline = time.monotonic() + 20
        while True:
            try:
                twin = http.get("/api/devices/pump-1/twin").json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    assert acked, "no patch was acknowledged"
    desired = twin["desired"]
    missing = [k for k in acked if desired.get(f"k{k}") != k]
    assert not missing, f"{len(missing)} acknowledged patches lost, e.g. {missing[:5]}"
    # Versions count the patches applied: each acknowledged one once, plus at
    # most one per life that committed just before its answer was cut off.
    assert len(acked) <= twin["desired_version"] <= len(acked) + LIVES
    assert sorted(acked.values()) == list(acked.values())
    assert gw.terminate() == 0
