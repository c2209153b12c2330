"""The HMI in a real browser: Debian's chromium driven by Playwright, against
an ``edgeway run`` process with a simulated paho-mqtt device that sends a
changing temperature and answers commands, a rule that raises an alarm when
it runs hot, the device registry, firmware, and an HTTP "cloud" that refuses
its first batch for good (dead letters to replay).

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
    cloud: Cloud


class Cloud:
    """A real HTTP endpoint for the ``cloud`` sink: refuses the first batch
    with 400 (a permanent error: dead letters), takes every later one."""

    def __init__(self) -> None:
        import http.server

        self.batches = 0
        self.records = 0
        cloud = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                cloud.batches += 1
                ok = cloud.batches > 1
                if ok:
                    cloud.records += body.count(b'"device_id"')
                self.send_response(200 if ok else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
    cloud = Cloud()
    config = tmp / "edgeway.yaml"
    config.write_text(
        f"""
gateway: {{id: gw-hmi, data_dir: "{data_dir}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{mqtt_port}", allow_anonymous: true}}]
sinks:
  - {{name: files, url: "file://{tmp / "out"}"}}
  - {{name: cloud, url: "http://127.0.0.1:{cloud.port}/ingest"}}
admin: {{listen: "127.0.0.1:{admin_port}", auth: tokens}}
devices: {{enabled: true}}
alarms: {{enabled: true}}
firmware: {{enabled: true, require_signature: false}}
rules:
  - name: hot
    when: "temp > 21"
    on_set:
      - alarm: {{type: overheat, severity: 700, message: "{{device_id}} runs hot"}}
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
                yield Site(base, browser, data_dir, cloud)
            finally:
                browser.close()
    finally:
        cloud.stop()
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
    playwright_api.expect(page.locator("#ov-sinks tbody tr")).to_have_count(2)
    playwright_api.expect(page.locator("#ov-sinks")).to_contain_text("holds")
    assert page.locator("#ov-online").inner_text().startswith("1")
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    page.context.close()


def test_device_value_changes_live(site: Site) -> None:
    page = logged_in(site, "vic")
    page.click("nav a[data-page=devices]")
    page.fill("#reg-search", "pump")  # the registry lists it (seen, unregistered)
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


def session_fetch(
    page: Any, method: str, path: str, body: Any = None, reason: str | None = None
) -> tuple[int, Any]:
    """A request with the browser's own session cookie and CSRF secret."""
    return tuple(  # type: ignore[return-value]
        page.evaluate(
            """async ([method, path, body, reason]) => {
                const s = await (await fetch('/api/session')).json();
                const headers = {'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf};
                if (reason) headers['X-Edgeway-Reason'] = encodeURIComponent(reason);
                const r = await fetch(path, {method, headers,
                    body: body === null ? undefined : JSON.stringify(body)});
                let doc = null;
                try { doc = await r.json(); } catch { doc = null; }
                return [r.status, doc];
            }""",
            [method, path, body, reason],
        )
    )


def confirm_with_reason(page: Any, reason: str) -> None:
    playwright_api.expect(page.locator("#confirm-reason")).to_be_visible()
    page.fill("#confirm-reason", reason)
    page.click("#confirm-ok")


def audit_reasons(page: Any, action: str) -> list[tuple[str, str | None]]:
    from urllib.parse import quote

    status, doc = session_fetch(page, "GET", f"/api/audit?action={quote(action)}")
    assert status == 200, doc
    return [(e["who"], e["reason"]) for e in doc["entries"]]


def test_alarm_raised_by_a_rule_is_acknowledged_in_the_browser(site: Site) -> None:
    """The rule 'hot' raises pump-1/overheat (the device's temperature rises
    past 21). A viewer sees it unacknowledged, has no button, and the API
    refuses his acknowledge; the operator acknowledges it with a reason; the
    API shows it acknowledged by her, the journal and the audit keep the
    reason, and the viewer's list turns acknowledged without a reload."""
    viewer = logged_in(site, "vic")
    viewer.click("nav a[data-page=alarms]")
    seen = viewer.locator('tr[data-alarm="pump-1/overheat"]')
    playwright_api.expect(seen).to_have_attribute("data-acked", "0")
    playwright_api.expect(seen).to_contain_text("pump-1 runs hot")
    playwright_api.expect(seen.locator(".sev-high")).to_have_text("medium high 700")
    assert seen.locator("button").count() == 0
    # The header's alarm summary, on every page.
    viewer.click("nav a[data-page=commands]")
    indicator = viewer.locator("#alarm-indicator")
    playwright_api.expect(indicator).to_have_text("1 unacknowledged alarm")
    playwright_api.expect(indicator).to_have_class("abnormal")
    viewer.click("nav a[data-page=alarms]")
    status, doc = session_fetch(viewer, "POST", "/api/alarms/pump-1/overheat/ack", {})
    assert status == 403 and doc["error"] == "insufficient_role"

    page = logged_in(site, "olga")
    page.click("nav a[data-page=alarms]")
    row = page.locator('tr[data-alarm="pump-1/overheat"]')
    playwright_api.expect(row).to_have_attribute("data-acked", "0")
    row.locator("button[data-action=ack]").click()
    page.click("#confirm-cancel")  # cancelled: nothing sent
    playwright_api.expect(row).to_have_attribute("data-acked", "0")
    row.locator("button[data-action=ack]").click()
    confirm_with_reason(page, "checked on site: valve 3")
    playwright_api.expect(row).to_have_attribute("data-acked", "1")
    status, doc = session_fetch(page, "GET", "/api/alarms/pump-1/overheat")
    assert status == 200 and doc["alarm"]["acked"] and doc["alarm"]["acked_by"] == "olga"
    _, hist = session_fetch(page, "GET", "/api/alarms/pump-1/overheat/history")
    assert (hist["transitions"][0]["action"], hist["transitions"][0]["by"]) == ("ack", "olga")
    assert hist["transitions"][0]["comment"] == "checked on site: valve 3"
    assert audit_reasons(page, "POST /api/alarms/pump-1/overheat/ack") == [
        ("user:olga (operator)", "checked on site: valve 3")
    ]
    # The viewer's page follows over the live channel.
    playwright_api.expect(seen).to_have_attribute("data-acked", "1")
    playwright_api.expect(indicator).to_have_text("1 active alarm")
    page.screenshot(path=str(ARTIFACTS / "alarms.png"), full_page=True)
    # Shelved for 15 minutes: gone from the list shown, listed under shelved.
    row.locator("button[data-action=shelve]").click()
    confirm_with_reason(page, "maintenance until noon")
    playwright_api.expect(row).to_have_count(0)
    page.select_option("#alarm-filter", "shelved")
    playwright_api.expect(row.locator(".alarm-state")).to_contain_text("shelved until")
    row.locator("button[data-action=comment]").click()
    page.fill("#confirm-reason", "fitter called")
    page.press("#confirm-reason", "Enter")  # Enter confirms
    row.locator("button[data-action=unshelve]").click()
    confirm_with_reason(page, "back")
    playwright_api.expect(row).to_have_count(0)
    _, hist = session_fetch(page, "GET", "/api/alarms/pump-1/overheat/history")
    assert [t["action"] for t in hist["transitions"][:3]] == ["unshelve", "comment", "shelve"]
    viewer.context.close()
    page.context.close()


def test_devices_page_on_the_registry(site: Site) -> None:
    """250 registered devices (CSV import through the API): the devices page
    filters by group, status and id prefix and pages on the server; the
    device page shows the registry's record, and an operator disables a
    device with a reason that the audit keeps; a viewer has no button."""
    page = logged_in(site, "ann")
    csv = "id,name,type,tags,groups\n" + "".join(
        f"reg-{i:04d},Pump {i},pump,{'east' if i % 2 else 'west'},line-{1 + i % 2}\n"
        for i in range(250)
    )
    csrf = page.evaluate("async () => (await (await fetch('/api/session')).json()).csrf")
    r = page.request.post(
        site.base + "/api/devices/import",
        data=csv,
        headers={"X-CSRF-Token": csrf, "Content-Type": "text/csv"},
    )
    assert r.ok and r.json()["created"] == 250, r.text()
    page.click("nav a[data-page=devices]")
    page.fill("#reg-group", "line-2")
    info = page.locator("#reg-info")
    playwright_api.expect(info).to_have_text("1-100 of 125")
    playwright_api.expect(page.locator("#registry tbody tr")).to_have_count(100)
    page.click("#reg-next")
    playwright_api.expect(info).to_have_text("101-125 of 125")
    assert page.locator("#reg-next").is_disabled()
    page.click("#reg-prev")
    playwright_api.expect(info).to_have_text("1-100 of 125")
    page.fill("#reg-group", "")
    page.fill("#reg-tag", "east")
    page.fill("#reg-search", "reg-00")
    playwright_api.expect(info).to_have_text("1-50 of 50")  # reg-0001, reg-0003, ... reg-0099
    page.fill("#reg-tag", "")
    page.fill("#reg-search", "")
    page.select_option("#reg-status", "unregistered")
    playwright_api.expect(page.locator("tr[data-device=pump-1] [data-status]")).to_have_class(
        "abnormal"
    )
    page.select_option("#reg-status", "")
    page.fill("#reg-search", "reg-0007")
    page.locator("tr[data-device=reg-0007]").click()
    playwright_api.expect(page.locator("#no-readings")).to_be_visible()
    playwright_api.expect(page.locator("#reg-detail")).to_contain_text("line-2")
    playwright_api.expect(page.locator("#reg-status-cell")).to_have_text("offline")
    page.click("#reg-toggle")
    confirm_with_reason(page, "stolen from line 2")
    playwright_api.expect(page.locator("#reg-status-cell")).to_have_text("disabled")
    status, doc = session_fetch(page, "GET", "/api/devices/reg-0007")
    assert status == 200 and doc["device"]["enabled"] is False
    assert audit_reasons(page, "POST /api/devices/reg-0007/disable") == [
        ("user:ann (admin)", "stolen from line 2")
    ]
    page.screenshot(path=str(ARTIFACTS / "registry-device.png"), full_page=True)
    page.context.close()
    viewer = logged_in(site, "vic")
    viewer.goto(site.base + "/#/device/reg-0007")
    playwright_api.expect(viewer.locator("#reg-status-cell")).to_have_text("disabled")
    assert viewer.locator("#reg-toggle").count() == 0
    status, doc = session_fetch(viewer, "POST", "/api/devices/reg-0007/enable")
    assert status == 403 and doc["error"] == "insufficient_role"
    viewer.context.close()


def test_rules_firmware_and_dead_letters(site: Site) -> None:
    """The rules page shows 'hot' active with its last firing; the firmware
    page a campaign's waves and devices, paused by an engineer (an operator
    is refused); the sinks page replays the cloud's dead letters while the
    gateway runs, and the cloud then has them."""
    import hashlib

    page = logged_in(site, "ann")
    page.click("nav a[data-page=models]")
    hot = page.locator("tr[data-rule=hot]")
    playwright_api.expect(hot).to_contain_text("active")
    playwright_api.expect(hot).to_contain_text("(pump-1)")

    image = b"\x7fELF firmware 2.0" * 64
    csrf = page.evaluate("async () => (await (await fetch('/api/session')).json()).csrf")
    r = page.request.put(
        site.base + "/api/firmware/images?hardware=pump-ctl&version=2.0",
        data=image,
        headers={"X-CSRF-Token": csrf, "X-Image-SHA256": hashlib.sha256(image).hexdigest()},
    )
    assert r.status == 201, r.text()
    status, doc = session_fetch(
        page,
        "POST",
        "/api/firmware/campaigns",
        {"image": r.json()["image"]["id"], "groups": {"line-9": ["ghost-1", "ghost-2", "ghost-3"]},
         "canary_share": 0.34},
    )  # fmt: skip
    assert status == 201, doc
    cid = doc["campaign"]["id"]
    page.click("nav a[data-page=firmware]")
    row = page.locator(f'tr[data-campaign="{cid}"]')
    playwright_api.expect(row.locator(".fw-state")).to_have_text("running")
    row.click()
    playwright_api.expect(page.locator("#fw-waves tbody tr")).to_have_count(2)
    playwright_api.expect(page.locator("#fw-waves tr[data-wave=canary]")).to_be_visible()
    playwright_api.expect(page.locator("#fw-devices tbody tr")).to_have_count(3)
    row.locator("button[data-action=pause]").click()
    confirm_with_reason(page, "line 9 is producing")
    playwright_api.expect(row.locator(".fw-state")).to_have_text("paused")
    page.screenshot(path=str(ARTIFACTS / "firmware.png"), full_page=True)
    operator = logged_in(site, "olga")
    status, doc = session_fetch(operator, "POST", f"/api/firmware/campaigns/{cid}/resume")
    assert status == 403 and doc["error"] == "insufficient_role"
    operator.goto(site.base + "/#/firmware")
    playwright_api.expect(operator.locator(f'tr[data-campaign="{cid}"]')).to_be_visible()
    assert operator.locator("button[data-action=resume]").count() == 0
    operator.context.close()

    page.click("nav a[data-page=sinks]")
    letters = page.locator("#deadletters tbody tr[data-dl]")
    playwright_api.expect(letters.first).to_be_visible()
    n = letters.count()
    before = site.cloud.records
    page.check("#dl-all")
    page.click("#dl-replay")
    confirm_with_reason(page, "cloud fixed its schema")
    playwright_api.expect(page.locator("#dl-message")).to_have_text(f"{n} replayed, 0 left")
    playwright_api.expect(letters).to_have_count(0)
    deadline = time.monotonic() + WAIT_MS / 1000
    while site.cloud.records < before + n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert site.cloud.records >= before + n
    _, status_doc = session_fetch(page, "GET", "/api/status")
    c = status_doc["outbox"]["cloud"]
    assert c["accepted"] == c["delivered"] + c["pending"] + c["dropped"]
    assert audit_reasons(page, "POST /api/deadletters/replay") == [
        ("user:ann (admin)", "cloud fixed its schema")
    ]
    page.context.close()
