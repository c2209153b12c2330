"""HMI benchmarks: the devices page with 10,000 devices, a 7-day 1 Hz trend,
``/metrics`` with 10,000 devices, and gateway CPU with 5 browsers watching live.

Usage::

    .venv/bin/python bench/hmi.py [--runs 5] [--watch 20] [--json FILE]

Browser: Debian's chromium (``/usr/bin/chromium``) driven by Playwright.

- **devices page**: a gateway (in this process, its own thread and loop)
  whose recent-values store holds 10,000 devices (3 metrics each) and whose
  device registry holds the same 10,000 (CSV import through the API; 10
  groups, 2 tags); a logged-in browser opens ``/#/devices`` (the registry's
  page); timed from navigation start until the first 100 rows are in the
  table (server-side keyset paging), ``--runs`` times; again with a group
  filter (1,000 matches). The registry API is timed alone for each filter
  and for a page deep in the list.
- **trend**: one device with 604,800 points (7 days at 1 Hz) in its ring; the
  device page is opened with range "all"; timed from navigation until the
  chart is drawn (the server reduces it to <= 2,000 min/max points). The
  trend API call alone is timed too.
- **/metrics**: 50 scrapes with a bearer token, same gateway (10,000 devices
  in the store; the exposition has no per-device series, by design).
- **tap**: what feeding the store costs per reading on the ingest path.
- **CPU**: ``edgeway run`` as a subprocess with 20 paho devices sending at
  1 Hz; its CPU time is sampled over ``--watch`` seconds with no browser, then
  with 5 browser contexts each showing a device page (live values over SSE,
  trend refreshed every 5 s). Reported: % of one core, and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from edgeway.admin.recent import Ring  # noqa: E402
from edgeway.admin.tokens import Role, TokenStore  # noqa: E402
from edgeway.admin.users import UserStore  # noqa: E402
from edgeway.config import parse_config  # noqa: E402
from edgeway.gateway import Gateway  # noqa: E402
from edgeway.reading import Origin, Reading  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "bench password 1"
DEVICES = 10_000
WEEK = 604_800


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(data_dir: Path, mqtt_port: int, admin_port: int) -> str:
    return f"""
gateway: {{id: gw-bench, data_dir: "{data_dir}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{mqtt_port}", allow_anonymous: true}}]
sinks:
  - {{name: files, url: "file://{data_dir / "out"}"}}
admin: {{listen: "127.0.0.1:{admin_port}", auth: tokens}}
"""


def prepare_credentials(data_dir: Path, role: Role = Role.VIEWER) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    users = UserStore(data_dir / "users.db")
    users.add("bench", Role.ADMIN, PASSWORD)
    users.close()
    tokens = TokenStore(data_dir / "tokens.db")
    _, token = tokens.create("bench", role)
    tokens.close()
    return token


def register(http: httpx.Client) -> float:
    """The 10,000 devices of the store in the registry (one CSV import)."""
    csv = "id,name,type,tags,groups\n" + "".join(
        f"sensor-{i:05d},Sensor {i},{'th' if i % 3 else 'co2'},{'east' if i % 2 else 'west'},"
        f"line-{i % 10}\n"
        for i in range(DEVICES)
    )
    t0 = time.perf_counter()
    r = http.post("/api/devices/import", content=csv, headers={"Content-Type": "text/csv"})
    assert r.status_code == 200 and r.json()["created"] == DEVICES, r.text
    return time.perf_counter() - t0


REGISTRY_QUERIES = {
    "first_page": "limit=100",
    "group": "group=line-3&limit=100",
    "tag": "tag=east&limit=100",
    "status": "status=offline&limit=100",
    "prefix": "prefix=sensor-05&limit=100",
    "deep_page": "after=sensor-09000&limit=100",
}


class ThreadGateway:
    """A gateway running in a thread of its own (its own event loop)."""

    def __init__(self, text: str) -> None:
        self.gw = Gateway(parse_config(text))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.gw.run(),))
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.gw.ready.is_set():
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.05)

    def call(self, fn: Any) -> None:
        """Run ``fn()`` on the gateway's loop and wait for it."""
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.gw.request_stop)
        self.thread.join(20)


def fill(gw: Gateway) -> None:
    assert gw.admin is not None
    recent = gw.admin.recent
    now = time.time()
    recent.record(
        [
            Reading(
                f"sensor-{i:05d}",
                now - (i % 300),
                {"temp": 20 + i % 10, "humidity": 40.5, "ok": True},
                Origin("mqtt" if i % 3 else "coap"),
            )
            for i in range(DEVICES)
        ]
    )
    # One device with a week at 1 Hz: a ring sized for it (the default keeps an hour).
    recent.record([Reading("trend-7d", now, {"temp": 0.0}, Origin("modbus"))])
    ring = Ring(WEEK)
    start = now - WEEK
    import math

    for k in range(WEEK):
        ring.append(start + k, 20 + 5 * math.sin(k / 3600) + (15 if k == 400_000 else 0))
    recent.devices["trend-7d"].rings["temp"] = ring


def login(ctx: Any, base: str) -> None:
    r = ctx.request.post(f"{base}/api/login", data={"user": "bench", "password": PASSWORD})
    assert r.ok, r.text()


def time_page(ctx: Any, url: str, ready: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_selector(ready, timeout=30_000)
        out.append((time.perf_counter() - t0) * 1000)
        page.close()
    return out


def in_process(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        data_dir = Path(d) / "data"
        token = prepare_credentials(data_dir, Role.OPERATOR)
        tg = ThreadGateway(config_text(data_dir, free_port(), free_port()))
        try:
            t0 = time.perf_counter()
            tg.call(lambda: fill(tg.gw))
            fill_s = time.perf_counter() - t0
            assert tg.gw.admin is not None and tg.gw.admin.bound is not None
            base = f"http://127.0.0.1:{tg.gw.admin.bound[1]}"
            auth = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
                import_s = register(http)
            results: dict[str, Any] = {"fill_s": round(fill_s, 2), "import_s": round(import_s, 2)}
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
                ctx = browser.new_context(viewport={"width": 1280, "height": 800})
                login(ctx, base)
                time_page(ctx, f"{base}/#/overview", "#ov-sinks", 1)  # warm the cache
                devices = time_page(
                    ctx, f"{base}/#/devices", "#registry tbody tr:nth-child(100)", runs
                )
                grouped = time_page(
                    ctx, f"{base}/#/devices?group=line-3", "#registry tbody tr:nth-child(100)", runs
                )
                trend = time_page(ctx, f"{base}/#/device/trend-7d", "#trend[data-points]", runs)
                page = ctx.new_page()
                page.goto(f"{base}/#/device/trend-7d")
                page.wait_for_selector("#trend[data-points]", timeout=30_000)
                drawn = int(page.get_attribute("#trend", "data-points") or 0)
                page.close()
                browser.close()
            with httpx.Client(base_url=base, headers=auth) as http:
                registry: dict[str, Any] = {}
                for name, query in REGISTRY_QUERIES.items():
                    times = []
                    for _ in range(runs):
                        t0 = time.perf_counter()
                        r = http.get(f"/api/devices?{query}")
                        times.append((time.perf_counter() - t0) * 1000)
                        assert r.status_code == 200 and len(r.json()["devices"]) == 100, query
                    registry[name] = _stats(times)
                api = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    doc = http.get(
                        "/api/live/devices/trend-7d/trend?metric=temp&points=2000"
                    ).json()
                    api.append((time.perf_counter() - t0) * 1000)
                assert doc["total"] == WEEK and len(doc["t"]) <= 2000
                assert max(doc["v"]) > 29.0  # the one-second spike (sine tops at 25) survived
                metrics = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    r = http.get("/metrics")
                    metrics.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200
            results.update(
                devices_page_ms=_stats(devices),
                devices_page_group_filter_ms=_stats(grouped),
                registry_api_ms=registry,
                trend_page_ms=_stats(trend),
                trend_points_drawn=drawn,
                trend_api_ms=_stats(api),
                metrics_ms=_stats(metrics),
            )
            return results
        finally:
            tg.stop()


def _stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "median": round(statistics.median(values), 1),
        "p99": round(values[min(len(values) - 1, int(len(values) * 0.99))], 1),
        "max": round(values[-1], 1),
    }


class Devices:
    """20 paho devices sending one reading a second each."""

    def __init__(self, port: int, n: int = 20) -> None:
        self.stop_event = threading.Event()
        self.clients = []
        for i in range(n):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pump-{i}")
            c.connect("127.0.0.1", port)
            c.loop_start()
            self.clients.append(c)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        k = 0
        while not self.stop_event.wait(1.0):
            k += 1
            for i, c in enumerate(self.clients):
                doc = {"temp": 20 + (k + i) % 10, "rpm": 1000 + k % 50}
                c.publish(f"devices/pump-{i}/telemetry", orjson.dumps(doc), qos=1)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def cpu_percent(proc: psutil.Process, seconds: float) -> float:
    t0 = proc.cpu_times()
    w0 = time.monotonic()
    time.sleep(seconds)
    t1 = proc.cpu_times()
    used = (t1.user + t1.system) - (t0.user + t0.system)
    return round(100 * used / (time.monotonic() - w0), 2)


def cpu_watch(watch: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        data_dir = Path(d) / "data"
        prepare_credentials(data_dir)
        mqtt_port, admin_port = free_port(), free_port()
        cfg = Path(d) / "edgeway.yaml"
        cfg.write_text(config_text(data_dir, mqtt_port, admin_port))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeway", "run", "-c", str(cfg)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{admin_port}"
        devices = None
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            devices = Devices(mqtt_port)
            ps = psutil.Process(proc.pid)
            time.sleep(3)  # devices connected, first readings in
            idle = cpu_percent(ps, watch)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
                pages = []
                for i in range(5):
                    ctx = browser.new_context()
                    login(ctx, base)
                    page = ctx.new_page()
                    page.goto(f"{base}/#/device/pump-{i}")
                    page.wait_for_selector("td[data-metric=temp]", timeout=30_000)
                    pages.append(page)
                time.sleep(2)
                watched = cpu_percent(ps, watch)
                browser.close()
            return {
                "devices": 20,
                "browsers": 5,
                "watch_s": watch,
                "cpu_idle_pct": idle,
                "cpu_watched_pct": watched,
                "cpu_above_idle_pct": round(watched - idle, 2),
            }
        finally:
            if devices is not None:
                devices.stop()
            proc.terminate()
            proc.wait(10)


def tap_cost() -> dict[str, float]:
    """What the recent-values tap adds per reading on the ingest path (3 metrics),
    against a dict store per metric on the same machine as a yardstick."""
    from edgeway.admin.recent import RecentValues

    out: dict[str, float] = {}
    origin = Origin("mqtt")
    for devices in (500, 10_000):  # 1,500 series (all trended); 30,000 (2,000 trended)
        store = RecentValues()
        batch = [
            Reading(f"d{i % devices}", time.time(), {"temp": 21.5, "hum": 40.0, "on": True}, origin)
            for i in range(10_000)
        ]
        store.record(batch)
        t0 = time.perf_counter()
        for _ in range(10):
            store.record(batch)
        out[f"us_per_reading_{devices}_devices"] = round(
            (time.perf_counter() - t0) / 100_000 * 1e6, 2
        )
    d: dict[int, int] = {}
    t0 = time.perf_counter()
    for i in range(300_000):
        d[i % 1000] = i
    out["yardstick_ns_per_dict_store"] = round((time.perf_counter() - t0) / 300_000 * 1e9, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--watch", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {
        "tap": tap_cost(),
        "in_process": in_process(args.runs),
        "cpu": cpu_watch(args.watch),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
