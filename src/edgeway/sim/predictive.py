"""The demo's predictive-maintenance chain: anomaly -> alarm -> rule -> command -> result.

``edgeway demo`` (``--fault-after S``, default 20; 0: off) picks the first
simulated MQTT machine and, S seconds after the devices start, lets a bearing
fault develop on it (:class:`~edgeway.sim.signals.MachineSignal`: vibration
rising over :data:`FAULT_RAMP` seconds). What the gateway is configured with
(:func:`add_predictive`, added to the demo's Config in code)::

    routes:
      - name: machine-health
        match: {devices: [mqtt-0002]}
        steps:
          - anomaly: {metrics: [vibration], warmup: 10, threshold: 5}
          - rules: {names: [bearing-fault]}
    rules:
      - name: bearing-fault
        match: {devices: [mqtt-0002]}
        when: "anomaly_score >= 5 and running == 1"
        on_set:
          - alarm: {type: bearing_fault, severity: 800, message: "..."}
          - command: {name: write, params: {running: false}}

The ``anomaly`` step (rolling z-score of the machine's vibration) flags the
fault; the rule, evaluated after it in the route, raises an alarm (journaled,
to the cloud in the priority lane) and sends the machine a command through the
command queue over its own MQTT connection; the simulated machine stops
(``running`` false) and answers. :class:`PredictiveChain` prints each step as
it happens: the anomaly score, the alarm's id, the command and its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeway.config import Config, parse_config
from edgeway.sim.devices import VirtualDevice
from edgeway.sim.signals import MachineSignal

RULE = "bearing-fault"
ALARM_TYPE = "bearing_fault"
FAULT_RAMP = 30.0
"""Seconds from a healthy bearing to a failed one (quadratic: a tenth of the
way, +0.9 mm/s of vibration, after about 9.5 s)."""
WARMUP = 10
"""Vibration values before the z-score judges (10 s at the demo's 1 reading/s)."""
THRESHOLD = 5.0
"""``|z|`` that flags: the machine's vibration noise is 0.15 mm/s, so a
fault is flagged about 0.75 mm/s above normal, and a healthy machine at a
steady load practically never."""
STEP_WAIT = 20.0
"""Seconds each step of the chain may take before the demo says it did not happen."""


@dataclass(slots=True)
class PredictiveResult:
    """What the chain did (the summary and tests read it)."""

    device_id: str = ""
    fault_at: float | None = None
    anomaly_score: float | None = None
    alarm_id: str | None = None
    command_id: str | None = None
    command_state: str | None = None
    command_result: Any = None
    machine_running: bool | None = None
    """The simulated machine's own state at the end (False: it executed the stop)."""


def machine_id(devices: Sequence[VirtualDevice]) -> str | None:
    """The first machine among ``devices`` (None without one)."""
    return next((d.device_id for d in devices if d.kind == "machine"), None)


def add_predictive(cfg: Config, device_id: str) -> None:
    """Add the route and the rule of the chain for ``device_id`` to ``cfg``."""
    text = f"""
routes:
  - name: machine-health
    match: {{devices: ["{device_id}"]}}
    steps:
      - anomaly: {{metrics: [vibration], warmup: {WARMUP}, threshold: {THRESHOLD}}}
      - rules: {{names: [{RULE}]}}
rules:
  - name: {RULE}
    match: {{devices: ["{device_id}"]}}
    when: "anomaly_score >= {THRESHOLD} and running == 1"
    on_set:
      - alarm: {{type: {ALARM_TYPE}, severity: 800, message: "{{device_id}}: bearing vibration far above its baseline"}}
      - command: {{name: write, params: {{running: false}}}}
"""
    extra = parse_config(text, "<demo: predictive maintenance>")
    cfg.routes = [*cfg.routes, *extra.routes]
    cfg.rules = [*cfg.rules, *extra.rules]


class PredictiveChain:
    """Injects the fault and prints the chain's steps as the gateway takes them."""

    def __init__(
        self,
        gateway: Any,
        device: VirtualDevice,
        write: Callable[[str], None],
        *,
        fault_after: float,
    ) -> None:
        self.gateway = gateway
        self.device = device
        self.write = write
        self.fault_after = fault_after
        self.result = PredictiveResult(device_id=device.device_id)
        self._raised: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        signal = device.signal
        assert isinstance(signal, MachineSignal)
        self.signal = signal
        # Running at a steady load until the fault: the only change is the fault.
        signal.running, signal.halted, signal.fault_start = True, False, None
        signal.next_load_change = time.time() + 24 * 3600
        if gateway.alarms is not None:
            gateway.alarms.add_listener(self._alarm)

    def _alarm(self, t: Any) -> None:
        alarm = t.alarm
        if (alarm.source, alarm.type) == (self.device.device_id, ALARM_TYPE) and alarm.active:
            if not self._raised.done():
                self._raised.set_result(t)

    async def run(self, ending: asyncio.Event) -> None:
        """The fault after ``fault_after`` seconds, then each step as it comes
        (until ``ending``)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ending.wait(), self.fault_after)
            return
        dev = self.device.device_id
        self.signal.fault_start = time.time()
        self.signal.fault_duration = FAULT_RAMP
        self.result.fault_at = self.signal.fault_start
        self.write(
            f"--- bearing fault injected on {dev}: vibration rises over {FAULT_RAMP:g} s "
            "(predictive maintenance: anomaly -> alarm -> rule -> command)"
        )
        try:
            await self._follow(dev)
        finally:
            self.result.machine_running = not self.signal.halted

    async def _follow(self, dev: str) -> None:
        try:
            t = await asyncio.wait_for(asyncio.shield(self._raised), STEP_WAIT + FAULT_RAMP)
        except TimeoutError:
            self.write(f"anomaly  {dev}: not flagged within {STEP_WAIT + FAULT_RAMP:g} s")
            return
        alarm = t.alarm
        score = alarm.values.get("anomaly_score")
        self.result.anomaly_score = float(score) if isinstance(score, int | float) else None
        self.result.alarm_id = alarm.id
        took = time.time() - (self.result.fault_at or time.time())
        self.write(
            f"anomaly  {dev}  anomaly_score {score} (z-score of vibration, flags at "
            f"{THRESHOLD:g}) {took:.1f} s after the fault began"
        )
        self.write(
            f"alarm    {dev}  {ALARM_TYPE} raised by rule {RULE}: id {alarm.id}, "
            f"severity {alarm.severity}, {alarm.message!r}"
        )
        commands = self.gateway.commands
        if commands is None:
            return
        cmd = await self._rule_command(commands, dev)
        if cmd is None:
            self.write(f"command  {dev}: none from rule {RULE} within {STEP_WAIT:g} s")
            return
        self.result.command_id = cmd.id
        self.write(f"command  {dev}  {cmd.name} {cmd.params} from rule {RULE}: id {cmd.id}")
        done = await commands.wait(cmd.id, STEP_WAIT)
        self.result.command_state = done.state.value
        self.result.command_result = done.result if done.error is None else done.error
        self.write(
            f"result   {dev}  {done.state.value}: {self.result.command_result} "
            f"(the machine {'stopped' if self.signal.halted else 'still runs'})"
        )

    async def _rule_command(self, commands: Any, dev: str) -> Any:
        loop = asyncio.get_running_loop()
        end = loop.time() + STEP_WAIT
        while loop.time() < end:
            for cmd in await commands.list(device_id=dev, limit=20):
                if cmd.source == f"rule:{RULE}":
                    return cmd
            await asyncio.sleep(0.1)
        return None


def predictive_summary(r: PredictiveResult) -> str:
    """The summary's line for the chain."""
    if r.fault_at is None:
        return "no fault injected (the demo ended first)"
    if r.alarm_id is None:
        return f"fault on {r.device_id} not flagged"
    return (
        f"fault on {r.device_id}: anomaly_score {r.anomaly_score}, alarm {r.alarm_id}, "
        f"command {r.command_id} {r.command_state}, machine "
        f"{'stopped' if r.machine_running is False else 'running'}"
    )
