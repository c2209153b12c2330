"""The HMI in a real browser: Debian's chromium driven by Playwright, against
an ``edgeway run`` process with a simulated paho-mqtt device that sends a
changing temperature and answers commands.

One gateway and one browser for the module (each test gets its own browser
context: its own cookies). Screenshots go to ``tmp/artifacts/hmi/`` (or
``$EDGEWAY_ARTIFACTS/hmi/``). Skipped, with the reason, when chromium or
Playwright is not installed (``./dev test`` installs both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from admin_harness import SRC, Device

from edgeway.admin.tokens import Role
from edgeway.admin.users import UserStore

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "correct horse battery"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("EDGEWAY_ARTIFACTS", ROOT / "tmp" / "artifacts")) / "hmi"
WAIT_MS = 10_000
"""Longest wait for anything on a page (live values arrive every second)."""

playwright_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():  # pragma: no cover - depends on the machine
    pytest.skip("chromium is not installed (apt install chromium)", allow_module_level=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimDevice(Device):
    """The harness's command-answering device, plus telemetry every 0.2 s (temp rises)."""

    def __init__(self, port: int, device_id: str) -> None:
        super().__init__(port, device_id)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._publish, daemon=True)
        self.thread.start()

    def _publish(self) -> None:
        n = 0
        while not self.stop_event.wait(0.2):
            n += 1
            doc = {"temp": round(20 + n * 0.1, 2), "rpm": 1000 + (n % 7)}
            self.client.publish(f"devices/{self.device_id}/telemetry", orjson.dumps(doc), qos=1)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        super().stop()


@dataclass
class Site:
    base: str
    browser: Any
    data_dir: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("hmi")
    data_dir = tmp / "data"
    data_dir.mkdir()
    users = UserStore(data_dir / "users.db")  # the CLI's path is tested in test_hmi_api
    for name, role in (("ann", Role.ADMIN), ("olga", Role.OPERATOR), ("vic", Role.VIEWER)):
        users.add(name, role, PASSWORD)
    users.close()
    mqtt_port, admin_port = free_port(), free_port()
    config = tmp / "edgeway.yaml"
    config.write_text(
        f"""
gateway: {{id: gw-hmi, data_dir: "{data_dir}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{mqtt_port}", allow_anonymous: true}}]
sinks:
  - {{name: files, url: "file://{tmp / "out"}"}}
admin: {{listen: "127.0.0.1:{admin_port}", auth: tokens}}
"""
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeway", "run", "-c", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"),
    )  # fmt: skip
    base = f"http://127.0.0.1:{admin_port}"
    device: SimDevice | None = None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"gateway did not start: {(tmp / 'gateway.log').read_text()[-2000:]}")
        device = SimDevice(mqtt_port, "pump-1")
        assert device.ready.wait(10)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            try:
                yield Site(base, browser, data_dir)
            finally:
                browser.close()
    finally:
        if device is not None:
            device.stop()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def logged_in(site: Site, user: str) -> Any:
    """A new browser context (tablet-sized), logged in as ``user``."""
    ctx = site.browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(site.base + "/")
    page.fill("#login-user", user)
    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_selector("nav a[data-page=overview]")
    return page


def test_login_and_overview(site: Site) -> None:
    ctx = site.browser.new_context()
    page = ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(site.base + "/")
    page.fill("#login-user", "ann")
    page.fill("#login-password", "not the password")
    page.click("#login-submit")
    playwright_api.expect(page.locator("#login-message")).to_contain_text("wrong user name")
    ctx.close()

    page = logged_in(site, "ann")
    playwright_api.expect(page.locator("#who")).to_have_text("ann (admin)")
    # Figures arrive over the live channel; the rate needs two events.
    playwright_api.expect(page.locator("#ov-in")).not_to_have_text("-")
    playwright_api.expect(page.locator("#ov-sinks tbody tr")).to_have_count(1)
    playwright_api.expect(page.locator("#ov-sinks")).to_contain_text("holds")
    assert page.locator("#ov-online").inner_text().startswith("1")
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    page.context.close()


def test_device_value_changes_live(site: Site) -> None:
    page = logged_in(site, "vic")
    page.click("nav a[data-page=devices]")
    page.fill("#dev-search", "pump")
    page.locator("tr[data-device=pump-1]").click()
    cell = page.locator("td[data-metric=temp]")
    playwright_api.expect(cell).to_be_visible()
    first = cell.inner_text()
    # The device sends every 0.2 s; the live channel brings a new value each second.
    playwright_api.expect(cell).not_to_have_text(first)
    assert float(cell.inner_text()) > float(first)
    points = page.locator("#trend").get_attribute("data-points")
    assert points is not None and int(points) >= 1
    page.screenshot(path=str(ARTIFACTS / "device.png"), full_page=True)
    page.context.close()


def test_operator_sends_a_command_and_sees_its_result(site: Site) -> None:
    page = logged_in(site, "olga")
    page.goto(site.base + "/#/device/pump-1")
    page.fill("#cmd-name", "set_speed")
    page.fill("#cmd-params", '{"rpm": 1200}')
    page.click("#cmd-send")
    # A confirmation first: cancel sends nothing.
    page.click("#confirm-cancel")
    playwright_api.expect(page.locator("#cmd-result")).to_be_hidden()
    page.click("#cmd-send")
    page.click("#confirm-ok")
    result = page.locator("#cmd-result")
    playwright_api.expect(result).to_have_attribute("data-state", "succeeded")
    playwright_api.expect(result).to_contain_text('{"echo":{"rpm":1200}}')
    playwright_api.expect(page.locator("#cmd-list")).to_contain_text("user:olga")
    page.screenshot(path=str(ARTIFACTS / "command.png"), full_page=True)
    # The twin: a desired change, confirmed, shows as desired and not yet reported.
    page.fill("#twin-patch", '{"setpoint": 50}')
    page.click("#twin-send")
    page.click("#confirm-ok")
    playwright_api.expect(page.locator("#twin-message")).to_have_text("desired state changed")
    playwright_api.expect(page.locator("#twin-desired")).to_contain_text('"setpoint": 50')
    playwright_api.expect(page.locator("#twin-delta")).to_contain_text('"setpoint": 50')
    page.context.close()


def test_viewer_cannot_send_a_command(site: Site) -> None:
    page = logged_in(site, "vic")
    page.goto(site.base + "/#/device/pump-1")
    playwright_api.expect(page.locator("td[data-metric=temp]")).to_be_visible()
    playwright_api.expect(page.locator("#cmd-list")).to_be_visible()
    assert page.locator("#cmd-send").count() == 0  # no button
    playwright_api.expect(page.locator("#twin-desired")).to_be_visible()
    assert page.locator("#twin-send").count() == 0
    # The API refuses too, with the browser's own session and CSRF token.
    answer = page.evaluate(
        """async () => {
            const s = await (await fetch('/api/session')).json();
            const r = await fetch('/api/devices/pump-1/commands', {method: 'POST',
                headers: {'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf},
                body: JSON.stringify({name: 'stop'})});
            return [r.status, await r.json()];
        }"""
    )
    assert answer[0] == 403 and answer[1]["error"] == "insufficient_role"
    # The logs page needs operator: not in the viewer's menu.
    assert page.locator("nav a[data-page=logs]").count() == 0
    page.context.close()


def upload_shipped_model(page: Any, base: str) -> None:
    """The pump_health model edgeway ships, uploaded and activated through the
    API with the browser's own session (cookie and CSRF secret)."""
    import hashlib

    from edgeway import ml

    body = (Path(ml.__file__).parent / "models" / "pump_health.onnx").read_bytes()
    csrf = page.evaluate("async () => (await (await fetch('/api/session')).json()).csrf")
    r = page.request.put(
        base + "/api/models/pump_health/versions/1",
        data=body,
        headers={"X-CSRF-Token": csrf, "X-Model-SHA256": hashlib.sha256(body).hexdigest()},
    )
    assert r.status == 201, r.text()
    r = page.request.post(
        base + "/api/models/pump_health/activate",
        data=orjson.dumps({"version": "1"}),
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert r.ok, r.text()


def test_pages_render_for_an_admin(site: Site) -> None:
    page = logged_in(site, "ann")
    upload_shipped_model(page, site.base)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    for name, ready in (
        ("commands", "#commands"),
        ("sinks", "#deadletters"),
        ("config", "#config-history tbody tr"),
        ("logs", "#logs tbody tr"),
        ("models", "#models tr[data-model=pump_health]"),
    ):
        page.click(f"nav a[data-page={name}]")
        page.wait_for_selector(ready)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    playwright_api.expect(page.locator("#models")).to_contain_text("in service")
    playwright_api.expect(page.locator("#model-versions")).to_contain_text("unsigned")
    page.click("nav a[data-page=config]")
    page.click("#config-validate")
    playwright_api.expect(page.locator("#config-result")).to_have_text("valid")
    page.goto(site.base + "/api/docs")
    playwright_api.expect(page.locator("main")).to_contain_text("/api/live/devices")
    assert not errors, errors
    page.context.close()


def test_readme_screenshot(site: Site) -> None:
    """docs/img/hmi.png is made here (copied when EDGEWAY_UPDATE_SCREENSHOT=1)."""
    page = logged_in(site, "ann")
    page.goto(site.base + "/#/device/pump-1")
    playwright_api.expect(page.locator("td[data-metric=temp]")).to_be_visible()
    page.wait_for_timeout(1500)
    shot = ARTIFACTS / "hmi.png"
    page.screenshot(path=str(shot))
    if os.environ.get("EDGEWAY_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "img" / "hmi.png")
    # A tablet held upright: one column, nothing wider than the screen.
    page.set_viewport_size({"width": 768, "height": 1024})
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth") <= 768
    page.screenshot(path=str(ARTIFACTS / "tablet.png"), full_page=True)
    page.context.close()
