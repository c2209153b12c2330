"""Virtual devices: what each one measures, its outgoing buffer, its commands.

Example::

    fleet = make_devices(100, prefix="sim", seed=7, fault_fraction=0.2)
    dev = fleet[0]
    payload = dev.next_message(time.time())   # bytes: {"ts", "msg_id", "seq", metrics...}
    dev.buffer.confirm(["sim-0000-1"])        # a receipt frees the buffer

A device is protocol-free: the runners in :mod:`edgeway.sim.runner` move its
messages over MQTT, CoAP or HTTP, or expose its values as Modbus registers and
OPC-UA variables.

Every message carries ``seq`` (1, 2, 3, ... per device, as a metric) and
``msg_id`` (``<device id>-<seq>``). ``msg_id`` comes back in the gateway's
receipts (``devices/{id}/receipts``); ``seq`` travels to the cloud inside the
record's metrics, so the demo can prove for each device which messages
arrived and that none was lost.

Commands arrive as JSON objects ``{"id", "name", "params"[, "redelivery"]}``
(the gateway's command queue sends them over MQTT or an HTTP long-poll, see
docs/commands.md) and get an answer with the same ``id``::

    {"id": "c1", "name": "ping"}                         -> {"id": "c1", "status": "ok", "result": {"pong": ts}}
    {"id": "c2", "name": "set_rate", "params": {"rate": 5}}   # messages per second from now on
    {"id": "c3", "name": "reset_fault"}                  # machines only
    {"id": "c4", "name": "get_state"}
    {"id": "c5", "name": "write", "params": {"running": false}}   # a writable point (WRITABLE)
    {"id": "c6", "name": "reboot"}                       -> {"id": "c6", "status": "error", "error": "unknown command 'reboot'"}

A device remembers the answers to its last ANSWERED_MAX command ids: a
command that comes again with an id it has answered (a redelivery after a
lost PUBACK or a gateway restart) gets the same answer again and is not run
twice.

Writable points (``WRITABLE``): what a Modbus register write, an OPC-UA
variable write or a ``write`` command may change, and what the device then
reports: a machine's ``running`` (false stops it: rpm 0 until started again),
a meter's ``parts`` counter (a preset, e.g. 0 at a shift change).
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from edgeway.reading import MetricValue
from edgeway.sim.signals import DAY, Bursts, EnvironmentSignal, MachineSignal, MeterSignal

DeviceKind = Literal["env", "machine", "meter"]

BUFFER_MAX = 10_000
"""Messages a device keeps while waiting for receipts. A real sensor has a few
hundred KiB of flash; 10,000 ~120-byte messages is about 1 MiB, and at one
message per second it covers almost three hours without the gateway. Beyond
it the oldest message is dropped and counted (``dropped``), like a ring buffer
in firmware."""

ANSWERED_MAX = 256
"""Command ids (with their answers) a device remembers. A redelivery comes
after a reconnect or a gateway restart, behind at most the device's few
unfinished commands; a few hundred ids cover that many times over at
~100 bytes each (docs/commands.md: "the last few hundred are enough")."""

WRITABLE: dict[str, tuple[str, ...]] = {
    "env": (),
    "machine": ("running",),
    "meter": ("parts",),
}
"""Per device kind, the metrics that can be written from outside."""

PARTS_MAX = 2**32 - 1
"""A parts counter is a 32-bit register (two Modbus registers)."""

MAX_RATE = 1000.0
"""Highest per-device rate a command may set (messages/s): above that one
simulated device would starve the others in the same event loop."""


@dataclass(slots=True)
class Pending:
    """A message in a device's buffer."""

    seq: int
    payload: bytes
    sent: bool = False
    sent_at: float = 0.0
    """Loop time of the last hand-over to a connection."""


@dataclass(slots=True)
class OutgoingBuffer:
    """Messages a device has produced and nobody has confirmed yet.

    A message stays until a receipt names its ``msg_id`` (MQTT) or the gateway
    acknowledged it (CoAP 2.04, HTTP 2xx: the reading is on the gateway's
    disk). While the gateway is unreachable it only grows; ``unsent()`` is
    what must go out when the link is back.
    """

    limit: int = BUFFER_MAX
    items: OrderedDict[str, Pending] = field(default_factory=OrderedDict)
    dropped: int = 0
    confirmed: int = 0
    emptied: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a confirmation leaves the buffer empty (a stop waits on it)."""

    def add(self, msg_id: str, seq: int, payload: bytes) -> None:
        """Keep a new message; drop the oldest when full (counted)."""
        self.items[msg_id] = Pending(seq, payload)
        while len(self.items) > self.limit:
            self.items.popitem(last=False)
            self.dropped += 1

    def unsent(self) -> list[tuple[str, Pending]]:
        """Messages not handed to a connection yet, oldest first."""
        return [(k, p) for k, p in self.items.items() if not p.sent]

    def mark_sent(self, msg_id: str, at: float = 0.0) -> None:
        p = self.items.get(msg_id)
        if p is not None:
            p.sent = True
            p.sent_at = at

    def requeue_sent_before(self, t: float) -> int:
        """Mark messages sent before loop time ``t`` unsent again; how many."""
        n = 0
        for p in self.items.values():
            if p.sent and p.sent_at < t:
                p.sent = False
                n += 1
        return n

    def mark_unsent(self, msg_id: str) -> None:
        """The link failed before the gateway took it: send it again later."""
        p = self.items.get(msg_id)
        if p is not None:
            p.sent = False

    def confirm(self, msg_ids: list[str] | tuple[str, ...]) -> int:
        """Free confirmed messages; returns how many were in the buffer."""
        n = 0
        for m in msg_ids:
            if self.items.pop(m, None) is not None:
                n += 1
        self.confirmed += n
        if not self.items:
            self.emptied.set()
        return n

    def seqs(self) -> set[int]:
        """Sequence numbers still held (not confirmed)."""
        return {p.seq for p in self.items.values()}

    def __len__(self) -> int:
        return len(self.items)


@dataclass(slots=True)
class VirtualDevice:
    """One simulated device: an id, a kind, its signal, its buffer and counters."""

    device_id: str
    kind: DeviceKind
    signal: EnvironmentSignal | MachineSignal | MeterSignal
    bursts: Bursts
    rate: float = 1.0
    """Messages per second (before bursts)."""
    seq: int = 0
    buffer: OutgoingBuffer = field(default_factory=OutgoingBuffer)
    commands_answered: int = 0
    """Commands run (each id once)."""
    commands_repeated: int = 0
    """Commands that came again with an id already answered: answered again, not run."""
    answered: OrderedDict[str, bytes] = field(default_factory=OrderedDict)
    """The last ANSWERED_MAX command ids and their answers."""
    last_metrics: dict[str, MetricValue] = field(default_factory=dict)

    def sample(self, now: float) -> dict[str, MetricValue]:
        """Current metrics without producing a message (pollers read these)."""
        self.last_metrics = self.signal.sample(now)
        return self.last_metrics

    def next_message(self, now: float) -> tuple[str, bytes]:
        """Produce the next message, keep it in the buffer, return (msg_id, payload)."""
        self.seq += 1
        msg_id = f"{self.device_id}-{self.seq}"
        body: dict[str, Any] = {"ts": round(now, 3), "msg_id": msg_id, "seq": self.seq}
        body.update(self.sample(now))
        payload = orjson.dumps(body)
        self.buffer.add(msg_id, self.seq, payload)
        return msg_id, payload

    def interval(self, now: float) -> float:
        """Seconds until the next message (shorter during a burst)."""
        return 1.0 / (self.rate * self.bursts.rate_factor(now))

    def write(self, metric: str, value: Any) -> None:
        """Change a writable point (``WRITABLE``), as a register or variable
        write does; later samples show it. KeyError for a point that cannot be
        written, ValueError for a value it cannot hold."""
        self.apply_write(metric, self.checked_write(metric, value))

    def checked_write(self, metric: str, value: Any) -> bool | int:
        """``value`` as ``metric`` would take it; KeyError / ValueError as :meth:`write`."""
        if metric not in WRITABLE[self.kind]:
            raise KeyError(f"{metric} is not writable on {self.kind} devices")
        if metric == "running":
            if value not in (True, False, 0, 1):  # 1 == True: 0/1 registers pass
                raise ValueError(f"running: expected true/false or 0/1, got {value!r}")
            return bool(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value != int(value)
            or not 0 <= value <= PARTS_MAX
        ):
            raise ValueError(f"{metric}: expected a whole number 0-{PARTS_MAX}, got {value!r}")
        return int(value)

    def apply_write(self, metric: str, value: bool | int) -> None:
        """Set a value :meth:`checked_write` returned."""
        sig = self.signal
        if isinstance(sig, MachineSignal):
            sig.set_running(bool(value))
        elif isinstance(sig, MeterSignal):
            sig.preset_parts(int(value))

    def handle_command(self, raw: bytes, now: float) -> bytes:
        """Answer a command payload; malformed commands get an error answer.
        A command id answered before gets the same answer, without running
        the command again."""
        try:
            cmd = orjson.loads(raw)
            if not isinstance(cmd, dict):
                raise ValueError("expected a JSON object")
        except (orjson.JSONDecodeError, ValueError) as e:
            return orjson.dumps({"id": None, "status": "error", "error": f"bad command: {e}"})
        cid = cmd.get("id")
        if isinstance(cid, str) and cid in self.answered:
            self.commands_repeated += 1
            self.answered.move_to_end(cid)
            return self.answered[cid]
        answer = self._run_command(cid, cmd.get("name"), cmd.get("params") or {}, now)
        if isinstance(cid, str):
            self.answered[cid] = answer
            while len(self.answered) > ANSWERED_MAX:
                self.answered.popitem(last=False)
        return answer

    def _run_command(self, cid: Any, name: Any, params: Any, now: float) -> bytes:
        if not isinstance(params, dict):
            return _error(cid, "params must be a JSON object")
        result: dict[str, Any]
        if name == "ping":
            result = {"pong": round(now, 3)}
        elif name == "set_rate":
            rate = params.get("rate")
            if (
                not isinstance(rate, int | float)
                or isinstance(rate, bool)
                or not 0 < rate <= MAX_RATE
            ):
                return _error(cid, f"set_rate needs 0 < rate <= {MAX_RATE:g}")
            self.rate = float(rate)
            result = {"rate": self.rate}
        elif name == "reset_fault" and isinstance(self.signal, MachineSignal):
            self.signal.fault_start = None
            result = {"fault": False}
        elif name == "get_state":
            result = {
                "kind": self.kind,
                "rate": self.rate,
                "seq": self.seq,
                "buffered": len(self.buffer),
                "metrics": self.last_metrics,
            }
        elif name == "write":
            if not params:
                return _error(cid, "write needs params: {point: value}")
            try:  # all checked before any is written
                checked = {m: self.checked_write(m, v) for m, v in params.items()}
            except (KeyError, ValueError) as e:
                return _error(cid, str(e.args[0]))
            for metric, value in checked.items():
                self.apply_write(metric, value)
            result = {"written": checked}
        else:
            return _error(cid, f"unknown command {name!r}")
        self.commands_answered += 1
        return orjson.dumps({"id": cid, "status": "ok", "result": result})


def _error(cid: Any, message: str) -> bytes:
    return orjson.dumps({"id": cid, "status": "error", "error": message})


def make_devices(
    n: int,
    *,
    prefix: str = "sim",
    seed: int | None = None,
    rate: float = 1.0,
    kinds: tuple[DeviceKind, ...] = ("env", "env", "machine", "meter"),
    fault_fraction: float = 0.2,
    bursts_per_hour: float = 2.0,
    day_length: float = DAY,
    now: float = 0.0,
) -> list[VirtualDevice]:
    """``n`` devices named ``{prefix}-0000``...; kinds cycle through ``kinds``;
    ``fault_fraction`` of the machines develop a bearing fault."""
    master = random.Random(seed)
    out: list[VirtualDevice] = []
    width = max(4, len(str(max(n - 1, 0))))
    for i in range(n):
        rng = random.Random(master.getrandbits(64))
        kind = kinds[i % len(kinds)]
        signal: EnvironmentSignal | MachineSignal | MeterSignal
        if kind == "env":
            signal = EnvironmentSignal.random(rng, day_length=day_length)
        elif kind == "machine":
            signal = MachineSignal.random(rng, fault=rng.random() < fault_fraction, now=now)
        else:
            signal = MeterSignal.random(rng)
        out.append(
            VirtualDevice(
                device_id=f"{prefix}-{i:0{width}d}",
                kind=kind,
                signal=signal,
                bursts=Bursts(rng, per_hour=bursts_per_hour),
                rate=rate,
            )
        )
    return out
