"""The rule stage with real stores: rules.db and the command queue's
commands.db in a temporary directory (no network: commands stay queued)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Literal

import pytest

from edgeway.commands.service import CommandService
from edgeway.config import CommandsSection, parse_config
from edgeway.reading import Origin, Reading
from edgeway.rules.stage import RuleStage
from edgeway.rules.targets import ActionTargets

CONFIG = """
rules:
  - name: hot
    when: "t > 80"
    on_set: [{command: {name: fan, params: {speed: 100}}}]
"""


def reading(t: float) -> Reading:
    return Reading("d1", 0.0, {"t": t}, Origin("test"))


def queued(data: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(data / "commands.db") as conn:
        return list(conn.execute("SELECT name, idem_key FROM commands"))


async def open_stage(data: Path, commands: CommandService) -> RuleStage:
    stage = RuleStage(
        parse_config(CONFIG).rules, data, targets=ActionTargets(commands=commands), durability="os"
    )
    await stage.open()
    return stage


async def test_actions_stored_before_a_stop_are_carried_out_once_after_the_start(
    tmp_path: Path,
) -> None:
    commands = CommandService(tmp_path, CommandsSection(), durability="os")
    await commands.open()
    try:
        stage = await open_stage(tmp_path, commands)
        # The gateway has not started the actions yet (it stops first): the
        # transition and its action are on disk, the command is not queued.
        fut = stage.observe([reading(90)])
        assert fut is not None
        await fut
        await stage.close()
        assert queued(tmp_path) == []

        stage = await open_stage(tmp_path, commands)
        stage.start_actions()
        await stage.runner.idle()
        assert queued(tmp_path) == [("fan", "rule:hot:hot:d1:1")]
        assert stage.runner.stats.done == {"command": 1}
        # Not set again after the restart: the state said it was set.
        assert stage.observe([reading(95)]) is None
        await stage.close()

        # A crash after the command was queued but before the action was
        # marked done: carried out again, and the queue's idempotency key
        # keeps it to one command.
        with sqlite3.connect(tmp_path / "rules.db") as conn:
            assert conn.execute("SELECT done, error FROM actions").fetchall() == [(1, None)]
            conn.execute("UPDATE actions SET done = 0")
        stage = await open_stage(tmp_path, commands)
        stage.start_actions()
        await stage.runner.idle()
        assert queued(tmp_path) == [("fan", "rule:hot:hot:d1:1")]
        assert commands.stats.duplicates == 1
        await stage.close()
    finally:
        await commands.close()


async def test_an_action_without_its_target_fails_visibly(tmp_path: Path) -> None:
    stage = RuleStage(parse_config(CONFIG).rules, tmp_path, targets=ActionTargets())
    await stage.open()
    try:
        stage.start_actions()
        fut = stage.observe([reading(90)])
        assert fut is not None
        await fut
        await stage.runner.idle()
        assert stage.runner.stats.failed == {"command": 1}
        with sqlite3.connect(tmp_path / "rules.db") as conn:
            ((done, error),) = conn.execute("SELECT done, error FROM actions").fetchall()
        assert done == 1 and "commands are disabled" in error
    finally:
        await stage.close()


async def stage_and_its_connection(data: Path) -> tuple[RuleStage, sqlite3.Connection]:
    """An open stage over CONFIG with no action targets, and the event
    loop's own connection to its rules.db (to make a commit fail, or to
    write beside the store)."""
    stage = RuleStage(parse_config(CONFIG).rules, data, targets=ActionTargets())
    await stage.open()
    conn = stage.store._wconn
    assert conn is not None
    return stage, conn


async def test_a_failed_state_write_takes_the_stored_state_back(tmp_path: Path) -> None:
    """A transition whose commit failed (disk full, I/O error) is made again,
    with the same id, when the device sends again (it was not acknowledged)."""
    import asyncio
    import sqlite3 as sq

    stage, conn = await stage_and_its_connection(tmp_path)
    try:
        # The batch's commit fails in SQLite (as on a full disk): nothing of
        # it is written.
        conn.execute("PRAGMA query_only=ON")
        fut = stage.observe([reading(90)])
        assert fut is not None
        with pytest.raises(sq.OperationalError):
            await fut
        conn.execute("PRAGMA query_only=OFF")
        for _ in range(100):  # the failure's callback runs on the loop's next turns
            if stage.failed_writes and stage._resyncing is None:
                break
            await asyncio.sleep(0.01)
        assert stage.failed_writes == 1
        fut = stage.observe([reading(90)])  # the device's resend
        assert fut is not None
        await fut
        rows = await stage.store.transitions()
        assert [(r["seq"], r["state"]) for r in rows] == [(1, "set")]
    finally:
        await stage.close()


async def test_twin_action_patches_the_desired_state(tmp_path: Path) -> None:
    from edgeway.twins.model import TwinLimits
    from edgeway.twins.service import TwinService

    twins = TwinService(tmp_path, TwinLimits(65536, 8), durability="os")
    await twins.open()
    text = """
rules:
  - name: eco
    when: "t < 10"
    on_set: [{twin: {desired: {mode: eco, setpoint: 18}}}]
    on_clear: [{twin: {desired: {mode: null}}}]
"""
    stage = RuleStage(
        parse_config(text).rules, tmp_path, targets=ActionTargets(twins=twins), durability="os"
    )
    await stage.open()
    try:
        stage.start_actions()
        for t in (5.0, 20.0):
            fut = stage.observe([reading(t)])
            assert fut is not None
            await fut
            await stage.runner.idle()
            twin = await twins.get("d1")
            if t < 10:
                assert twin.desired == {"mode": "eco", "setpoint": 18}
            else:
                assert twin.desired == {"setpoint": 18}  # merge patch: null removes
        assert twin.desired_version == 2
        assert stage.runner.stats.done == {"twin": 2}
    finally:
        await stage.close()
        await twins.close()


async def test_rules_follow_the_device_twins(tmp_path: Path) -> None:
    """Twins stored before the start are loaded; a change reaches the rules
    through the twin service's listener."""
    from edgeway.twins.model import TwinLimits
    from edgeway.twins.service import TwinService

    twins = TwinService(tmp_path, TwinLimits(65536, 8), durability="os")
    await twins.open()
    await twins.patch("d1", "desired", {"limit": 50}, by="test")
    text = """
rules:
  - {name: over, when: "t > desired(limit)"}
"""
    stage = RuleStage(
        parse_config(text).rules, tmp_path, targets=ActionTargets(twins=twins), durability="os"
    )
    await stage.open()
    try:
        stage.start_actions()
        assert stage._twin_load is not None
        await stage._twin_load
        fut = stage.observe([reading(60)])
        assert fut is not None  # 60 > 50: set
        await fut
        await twins.patch("d1", "desired", {"limit": 70}, by="test")
        fut = stage.observe([reading(60)])
        assert fut is not None  # 60 < 70 now: cleared
        await fut
        rows = await stage.store.transitions()
        assert [(r["state"], r["seq"]) for r in rows] == [("clear", 2), ("set", 1)]
    finally:
        await stage.close()
        await twins.close()


async def test_rules_summary_for_the_hmi(tmp_path: Path) -> None:
    """GET /api/rules: per rule, devices active, pending (holding, waiting for
    ``for``) and cooling down, and the last firing (its latest set)."""
    rules = parse_config(
        """
rules:
  - {name: hot, when: "t > 80", cooldown: 10m}
  - {name: slow, when: "t > 50", for: 1h}
  - {name: spare, when: "t > 0", enabled: false}
"""
    ).rules
    stage = RuleStage(rules, tmp_path, targets=ActionTargets(), durability="os")
    await stage.open()
    try:
        summary = {r["name"]: r for r in await stage.rules()}
        assert summary["hot"]["last_fired"] is None and summary["hot"]["state"] == "idle"
        for device, t in (("d1", 90.0), ("d2", 60.0)):
            fut = stage.observe([Reading(device, 0.0, {"t": t}, Origin("test"))])
            if fut is not None:
                await fut
        summary = {r["name"]: r for r in await stage.rules()}
        hot, slow = summary["hot"], summary["slow"]
        assert (hot["state"], hot["active_devices"], hot["cooling_down_devices"]) == (
            "active",
            1,
            1,
        )
        assert hot["last_fired"]["device_id"] == "d1" and hot["cooldown"] == 600
        assert (slow["state"], slow["active_devices"], slow["pending_devices"]) == ("idle", 0, 2)
        assert summary["spare"]["state"] == "disabled"
    finally:
        await stage.close()


class RecordingDownlink:
    """Every device reachable; records what it is handed (confirmed at once)."""

    name = "recording"

    def __init__(self) -> None:
        import asyncio

        self.payloads: list[dict[str, object]] = []
        self.got = asyncio.Event()

    def reachable(self, command: object) -> bool:
        return True

    def deliver(self, command: Any) -> Any:
        import asyncio

        self.payloads.append(command.device_payload())
        self.got.set()
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        fut.set_result(True)
        return fut


async def stage_to_recorder(
    data: Path, config: str, durability: Literal["fsync", "os"]
) -> tuple[RuleStage, CommandService, RecordingDownlink]:
    """A rule stage over ``config`` whose commands go through a real queue to
    a :class:`RecordingDownlink`; open, actions not started yet."""
    commands = CommandService(data, CommandsSection(), durability="os")
    await commands.open()
    device = RecordingDownlink()
    commands.add_downlink(device)
    stage = RuleStage(
        parse_config(config).rules,
        data,
        targets=ActionTargets(commands=commands),
        durability=durability,
    )
    await stage.open()
    return stage, commands, device


async def test_a_rule_command_goes_out_before_the_queue_commits_and_survives_losing_it(
    tmp_path: Path,
) -> None:
    """The rules path has one commit (rules.db) before the command leaves:
    with the command queue's writer blocked, the command still reaches the
    transport. A kill before the queue's commit and the action's "done" loses
    the queue's copy; the journal in rules.db sends it again after the start,
    with the same id, flagged as a redelivery, and it is queued once."""
    import asyncio
    import threading

    commands = CommandService(tmp_path, CommandsSection(), durability="os")
    await commands.open()
    device = RecordingDownlink()
    commands.add_downlink(device)
    try:
        stage = await open_stage(tmp_path, commands)
        stage.start_actions()
        gate = threading.Event()
        commands.db.post(lambda conn: gate.wait(10))  # the queue's writer is stuck
        fut = stage.observe([reading(90)])
        assert fut is not None
        await fut
        await asyncio.wait_for(device.got.wait(), 5)
        assert queued(tmp_path) == []  # sent, not yet in commands.db
        first = device.payloads[0]
        assert "redelivery" not in first
        gate.set()
        await stage.runner.idle()
        assert queued(tmp_path) == [("fan", "rule:hot:hot:d1:1")]
        await stage.close()
        await commands.close()

        # As if killed before either commit: the queue's row and the action's
        # "done" are gone.
        with sqlite3.connect(tmp_path / "commands.db") as conn:
            conn.execute("DELETE FROM commands")
        with sqlite3.connect(tmp_path / "rules.db") as conn:
            assert conn.execute("SELECT done, error FROM actions").fetchall() == [(1, None)]
            conn.execute("UPDATE actions SET done = 0")
        device.got.clear()
        commands = CommandService(tmp_path, CommandsSection(), durability="os")
        await commands.open()
        commands.add_downlink(device)
        stage = await open_stage(tmp_path, commands)
        stage.start_actions()
        await asyncio.wait_for(device.got.wait(), 5)
        await stage.runner.idle()
        again = device.payloads[1]
        assert again["id"] == first["id"] and again["redelivery"] is True
        assert queued(tmp_path) == [("fan", "rule:hot:hot:d1:1")]
        await stage.close()
    finally:
        await commands.close()


async def test_the_command_leaves_before_the_fsync_and_the_reading_waits_for_it(
    tmp_path: Path,
) -> None:
    """With fsync durability the transition is committed to the WAL on the
    event loop and its command leaves in the same turn; the fsync follows on
    the store's thread, and the reading's future (its acknowledgement)
    resolves only after it. With the store's thread blocked (no fsync can
    happen), the command still reaches the device, the transition is in
    rules.db for any other connection, and the reading is not acknowledged."""
    import asyncio
    import threading

    stage, commands, device = await stage_to_recorder(tmp_path, CONFIG, "fsync")
    gate = threading.Event()
    try:
        stage.start_actions()
        stage.store.db.read(lambda conn: gate.wait(10))  # the store's thread is stuck
        fut = stage.observe([reading(90)])
        assert fut is not None
        await asyncio.wait_for(device.got.wait(), 5)
        assert device.payloads[0]["name"] == "fan"
        with sqlite3.connect(tmp_path / "rules.db") as conn:
            rows = conn.execute("SELECT rule, seq, state FROM transitions").fetchall()
        assert rows == [("hot", 1, "set")]
        await asyncio.sleep(0.2)
        assert not fut.done()  # not fsynced: the device is not acknowledged yet
        gate.set()
        await asyncio.wait_for(fut, 5)
    finally:
        gate.set()
        await stage.close()
        await commands.close()


async def test_a_transition_made_again_after_a_power_cut_sends_the_same_command_id(
    tmp_path: Path,
) -> None:
    """A power cut between the commit and its fsync can lose a transition
    whose command already left; the device sends its reading again (it was
    not acknowledged) and the transition is made again: its command carries
    the same id, so a device that remembers ids runs it once. A rules.db made
    afresh (another salt) gives other ids."""
    import asyncio

    async def first_command_id(data: Path) -> Any:
        commands = CommandService(data, CommandsSection(), durability="os")
        await commands.open()
        device = RecordingDownlink()
        commands.add_downlink(device)
        stage = await open_stage(data, commands)
        try:
            stage.start_actions()
            fut = stage.observe([reading(90)])
            assert fut is not None
            await fut
            await asyncio.wait_for(device.got.wait(), 5)
            await stage.runner.idle()
            return device.payloads[0]["id"]
        finally:
            await stage.close()
            await commands.close()

    first = await first_command_id(tmp_path)
    # What the power cut loses: the transition, its journal and the state, and
    # (its row never fsynced either) the queue's copy.
    with sqlite3.connect(tmp_path / "rules.db") as conn:
        conn.execute("DELETE FROM transitions")
        conn.execute("DELETE FROM rule_state")
    with sqlite3.connect(tmp_path / "commands.db") as conn:
        conn.execute("DELETE FROM commands")
    assert await first_command_id(tmp_path) == first

    other = tmp_path / "other"
    other.mkdir()
    assert await first_command_id(other) != first


async def test_a_long_turn_sends_the_first_devices_commands_before_it_ends(
    tmp_path: Path,
) -> None:
    """A write to a quiet store commits at once: its command leaves in the
    call that made the transition. Writes within BATCH_WAIT of a commit share
    a batch, committed at the end of the turn of the event loop or sooner,
    by a later write that finds the batch older than BATCH_WAIT (a burst read
    from many devices): the first devices' commands do not wait for the
    whole turn."""
    from edgeway.rules.store import BATCH_WAIT

    config = "rules:\n" + "".join(
        f'  - name: hot{d}\n    match: {{devices: ["d{d}"]}}\n    when: "t > 80"\n'
        f"    on_set: [{{command: {{name: fan, params: {{speed: {d}}}}}}}]\n"
        for d in range(4)
    )
    stage, commands, device = await stage_to_recorder(tmp_path, config, "os")
    try:
        stage.start_actions()
        # The store's clock moves only when this test moves it: a loaded
        # machine's pauses between the calls below must not count as waits.
        now = [stage.store.monotonic()]
        stage.store.monotonic = lambda: now[0]
        now[0] += BATCH_WAIT * 2  # a quiet store
        before = stage.store.commits

        def hot(d: int) -> Reading:
            return Reading(f"d{d}", 0.0, {"t": 90.0}, Origin("test"))

        def sent() -> list[int]:
            return [p["params"]["speed"] for p in device.payloads]

        futs = [stage.observe([hot(0)])]
        # Quiet: committed and sent in the call that made the transition.
        assert stage.store.commits == before + 1 and sent() == [0]
        # d1 and d2 right after that commit: one batch, nothing more sent yet.
        futs += [stage.observe([hot(1)]), stage.observe([hot(2)])]
        assert stage.store.commits == before + 1 and sent() == [0]
        # The loop held on purpose, as other devices' readings would hold it:
        now[0] += BATCH_WAIT * 2
        futs.append(stage.observe([hot(3)]))
        # d3's write committed the waiting batch and its commands left, still
        # in this turn; d3 itself follows a commit just made: batched.
        assert stage.store.commits == before + 2 and sent() == [0, 1, 2]
        for fut in futs:
            assert fut is not None
            await fut  # d3's batch at the end of the turn
        assert stage.store.commits == before + 3 and sent() == [0, 1, 2, 3]
    finally:
        await stage.close()
        await commands.close()


async def test_the_wal_is_checkpointed_when_it_outgrows_the_size_it_keeps(tmp_path: Path) -> None:
    """rules.db's WAL is folded into the database once it holds more than
    WAL_CHECKPOINT_BYTES; SQLite keeps the file at that size when it starts
    it over, so the commits after that must not checkpoint again (each
    would cost the store's thread a checkpoint and a database fsync)."""
    from edgeway.rules.store import WAL_CHECKPOINT_BYTES

    stage, conn = await stage_and_its_connection(tmp_path)
    try:
        # Another table's big write fills the WAL beyond the size it keeps.
        conn.execute("CREATE TABLE pad(x BLOB)")
        conn.execute("INSERT INTO pad VALUES (zeroblob(?))", (WAL_CHECKPOINT_BYTES + (1 << 20),))
        for t in (90, 20, 90, 20, 90, 20):
            fut = stage.observe([reading(t)])
            assert fut is not None
            await fut  # committed and synced
        assert stage.store.checkpoints == 1
        wal = tmp_path / "rules.db-wal"
        assert wal.stat().st_size == WAL_CHECKPOINT_BYTES  # started over, kept at the limit
        rows = await stage.store.transitions()
        assert [r["state"] for r in rows] == ["clear", "set"] * 3
    finally:
        await stage.close()
