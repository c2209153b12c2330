"""Commands under faults (issue 14, section 5; guarantee 7 of DESIGN.md).

10,000 commands for 100 paho-mqtt devices go in through the admin API while
``edgeway run`` is killed with SIGKILL every few seconds and restarted on the
same data directory, and some devices keep disconnecting and coming back.
The submitter retries a request whose answer it did not get, with the same
idempotency key. At the end:

- every command whose key was sent exists once (no key queued twice, none lost)
  and ended SUCCEEDED;
- every device ran each of its commands exactly once (the devices dedupe by
  id), and got no other device's command;
- a command a device saw a second time was flagged ``redelivery``: the gateway
  never sent a command again without knowing it had been sent.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import pytest
from edgeway_process import StartGateway, free_port
from paho.mqtt.enums import CallbackAPIVersion

DEVICES = 100
COMMANDS = int(os.environ.get("EDGEWAY_TEST_COMMANDS", "10000"))
KILL_EVERY = 3.0
"""Seconds between SIGKILLs while commands are being submitted."""
FLAPPING = 10
"""Devices that disconnect and reconnect all the time."""
DEADLINE = 240.0
"""Seconds for the whole test before it gives up."""

CONFIG = """
mqtt:
  listeners: [{{bind: "127.0.0.1:{{port}}", allow_anonymous: true}}]
admin: {{listen: "127.0.0.1:{admin}", auth: none}}
commands: {{result_timeout: 10m, default_ttl: 1h}}
"""


class Fleet:
    """100 devices in this process; each dedupes by command id."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.executed: Counter[str] = Counter()
        self.seen: dict[str, int] = {}
        self.unflagged_repeats: list[str] = []
        self.foreign: list[str] = []
        self.clients: list[mqtt.Client] = []

    def start(self) -> None:
        for i in range(DEVICES):
            device = f"d{i}"
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device)
            c.user_data_set(device)
            c.on_connect = lambda cl, dev, *a: cl.subscribe(f"devices/{dev}/commands/+", 1)
            c.on_message = self._on_message
            c.reconnect_delay_set(0.1, 0.5)
            c.connect_async("127.0.0.1", self.port, keepalive=10)
            c.loop_start()
            self.clients.append(c)

    def _on_message(self, client: mqtt.Client, device: str, msg: mqtt.MQTTMessage) -> None:
        doc = orjson.loads(msg.payload)
        cid = doc["id"]
        with self.lock:
            if msg.topic.split("/")[1] != device:
                self.foreign.append(cid)
                return
            n = self.seen.get(cid, 0)
            self.seen[cid] = n + 1
            if n == 0:
                self.executed[cid] += 1
            elif not doc.get("redelivery"):
                self.unflagged_repeats.append(cid)
        answer = {"id": cid, "status": "ok", "result": {"by": device}}
        client.publish(msg.topic + "/result", orjson.dumps(answer), qos=1)

    def flap(self, stop: threading.Event) -> None:
        rnd = random.Random(7)
        while not stop.is_set():
            c = self.clients[rnd.randrange(FLAPPING)]
            c.disconnect()
            time.sleep(rnd.uniform(0.2, 0.8))
            reconnect(c)
            time.sleep(rnd.uniform(0.1, 0.5))

    def stop(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()


def reconnect(c: mqtt.Client) -> None:
    """Reconnect a client its own code disconnected (paho's network thread
    ends with a disconnect asked for; bounded: the gateway may be between two
    lives)."""
    c.loop_stop()
    for _ in range(100):
        try:
            c.reconnect()
            break
        except OSError:
            time.sleep(0.1)
    c.loop_start()


def submit_all(base: str, accepted: dict[str, str], stop: threading.Event) -> None:
    """Queue every command; retry each until the API answers, same key."""
    with httpx.Client(base_url=base, timeout=5) as http:
        for i in range(COMMANDS):
            key = f"k{i}"
            while not stop.is_set():
                try:
                    r = http.post(
                        f"/api/devices/d{i % DEVICES}/commands",
                        json={"name": "set", "params": {"n": i}, "idempotency_key": key},
                    )
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                if r.status_code in (200, 202):
                    accepted[key] = r.json()["command"]["id"]
                    break
                time.sleep(0.05)  # 503 while starting


def states(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM commands GROUP BY state"))
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_commands_survive_sigkill_and_flapping_devices(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    data = tmp_path / "data"
    config = CONFIG.format(admin=admin)
    base = f"http://127.0.0.1:{admin}"
    gw = start_gateway(config, port=port, data_dir=data)
    fleet = Fleet(port)
    fleet.start()
    accepted: dict[str, str] = {}
    stop = threading.Event()
    submitter = threading.Thread(target=submit_all, args=(base, accepted, stop))
    flapper = threading.Thread(target=fleet.flap, args=(stop,))
    deadline = time.monotonic() + DEADLINE
    kills = 0
    try:
        submitter.start()
        flapper.start()
        while submitter.is_alive() and time.monotonic() < deadline:
            submitter.join(KILL_EVERY)
            if not submitter.is_alive():
                break
            gw.process.send_signal(signal.SIGKILL)
            gw.process.wait(10)
            kills += 1
            gw = start_gateway(config, port=port, data_dir=data)
        assert not submitter.is_alive(), f"submitting took too long ({len(accepted)} queued)"
        # One more kill once everything is queued, then let it finish.
        gw.process.send_signal(signal.SIGKILL)
        gw.process.wait(10)
        kills += 1
        gw = start_gateway(config, port=port, data_dir=data)
        stop.set()
        flapper.join()
        for c in fleet.clients[:FLAPPING]:
            if not c.is_connected():
                reconnect(c)
        counts: dict[str, Any] = {}
        t_drain = time.monotonic()
        while time.monotonic() < deadline:
            counts = states(data / "commands.db")
            if counts.get("succeeded", 0) == COMMANDS:
                break
            time.sleep(0.5)
        drained = time.monotonic() - t_drain
    finally:
        stop.set()
        fleet.stop()
    assert kills >= 3, f"only {kills} kills: the test did not exercise crashes"
    assert len(accepted) == COMMANDS
    if counts != {"succeeded": COMMANDS}:
        conn = sqlite3.connect(data / "commands.db")
        stuck = conn.execute(
            "SELECT device_id, state, COUNT(*), MIN(attempts), MAX(attempts) FROM commands "
            "WHERE state != 'succeeded' GROUP BY device_id, state"
        ).fetchall()
        conn.close()
        connected = {c._client_id.decode(): c.is_connected() for c in fleet.clients}
        print("stuck:", stuck)
        print("connected:", {d: connected.get(d) for d, *_ in stuck})
        print(gw.output()[-5000:])
    assert counts == {"succeeded": COMMANDS}, counts
    conn = sqlite3.connect(data / "commands.db")
    rows = dict(conn.execute("SELECT idem_key, id FROM commands"))
    conn.close()
    assert rows == accepted  # one command per key, the one the API named
    with fleet.lock:
        assert fleet.foreign == []
        assert set(fleet.executed) == set(accepted.values())
        assert max(fleet.executed.values()) == 1
        assert fleet.unflagged_repeats == []
        repeats = sum(1 for n in fleet.seen.values() if n > 1)
    print(f"kills={kills} redelivered={repeats} of {COMMANDS}, drained in {drained:.1f} s")
