"""``DATA_DIR/rules.db``: rule state, transitions and their actions.

What is kept, and why it is enough for "a SIGKILL neither loses nor repeats a
transition":

- ``rule_state``: per (rule, device) whether it is active, since when the
  condition towards the other state holds (a ``for:`` in progress), the
  transition count and the cooldown's end. Times are on the rule clock.
- ``transitions`` and ``actions``: a transition is stored with the new state
  and its actions in one transaction, before any action is carried out.
  After a kill the state says the transition happened (it is not made
  again) and the actions not marked done are carried out at the next start
  (carried out, not lost; a command keeps its idempotency key, so the
  command queue does not queue it twice).
- ``clock``: the rule clock and the wall clock at the last commit, from which
  the clock resumes (:class:`~edgeway.outbox.ageclock.AgeClock`): a ``for:``
  deadline fires at its time after a restart, counting the downtime, while a
  wall-clock jump within a run changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from edgeway.outbox.ageclock import AgeClock
from edgeway.rules.engine import RuleOutput, RuleState
from edgeway.rules.outputs import Action, SendCommand, action_from_json, action_to_json
from edgeway.storage.sqlite import Database

DB_NAME = "rules.db"
HISTORY_KEEP = 7 * 86400.0
"""Seconds finished transitions are kept (``edgeway`` reads them for
debugging; the sinks have the records)."""

SCHEMA_V1 = """
CREATE TABLE rule_state(
    rule TEXT NOT NULL,
    device_id TEXT NOT NULL,
    active INTEGER NOT NULL,
    since REAL,
    seq INTEGER NOT NULL,
    cooldown_until REAL NOT NULL,
    PRIMARY KEY (rule, device_id)
) WITHOUT ROWID;
CREATE TABLE transitions(
    id INTEGER PRIMARY KEY,
    rule TEXT NOT NULL,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    doc BLOB NOT NULL,
    UNIQUE (rule, device_id, seq)
);
CREATE TABLE actions(
    id INTEGER PRIMARY KEY,
    transition INTEGER NOT NULL REFERENCES transitions(id) ON DELETE CASCADE,
    doc BLOB NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX actions_waiting ON actions(done) WHERE done = 0;
CREATE TABLE clock(id INTEGER PRIMARY KEY CHECK (id = 1), clock REAL NOT NULL, wall REAL NOT NULL);
"""


@dataclass(slots=True, frozen=True)
class StoredAction:
    """An action as stored: its row id (to mark it done) and what it asks."""

    id: int
    transition_id: str
    action: Action
    replay: bool = False
    """Taken back at start: it may have been carried out before the kill."""


@dataclass(slots=True)
class Loaded:
    """What the store held at start."""

    states: list[tuple[str, str, RuleState]]
    waiting: list[StoredAction]
    clock: float | None
    wall: float | None


class RuleStore:
    """The rules' durable state; one :class:`Database` (writer thread, group commit)."""

    def __init__(self, data_dir: Path, durability: Literal["fsync", "os"] = "fsync") -> None:
        self.db = Database(
            Path(data_dir) / DB_NAME, migrations=[SCHEMA_V1], durability=durability, name="rules"
        )
        self.clock: AgeClock | None = None

    async def open(self) -> Loaded:
        await self.db.open()
        loaded = await self.db.read(_load)
        self.clock, _ = AgeClock.resume(loaded.clock, loaded.wall, math.inf)
        return loaded

    async def close(self) -> None:
        await self.db.close()

    def write(self, out: RuleOutput) -> asyncio.Future[list[StoredAction]]:
        """Store ``out`` (states, transitions, actions, the clock) in the next
        group commit; the future gives the actions to carry out."""
        assert self.clock is not None
        now, wall = self.clock.now(), self.clock.wall()
        states = [
            (rule, dev, int(s.active), s.since, s.seq, s.cooldown_until)
            for rule, dev, s in out.states
        ]
        transitions = []
        for t in out.transitions:
            actions = [_with_command_id(a) for a in t.actions]
            docs = [orjson.dumps(action_to_json(a)) for a in actions]
            transitions.append(
                (t, orjson.dumps(t.to_json()), list(zip(actions, docs, strict=True)))
            )

        def run(conn: sqlite3.Connection) -> list[StoredAction]:
            conn.executemany(
                "INSERT INTO rule_state(rule, device_id, active, since, seq, cooldown_until) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rule, device_id) DO UPDATE SET "
                "active = excluded.active, since = excluded.since, seq = excluded.seq, "
                "cooldown_until = excluded.cooldown_until",
                states,
            )
            stored: list[StoredAction] = []
            for t, doc, actions in transitions:
                tid = conn.execute(
                    "INSERT INTO transitions(rule, device_id, seq, state, at, doc) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (t.rule, t.device_id, t.seq, t.state, t.at, doc),
                ).lastrowid
                for a, adoc in actions:
                    aid = conn.execute(
                        "INSERT INTO actions(transition, doc) VALUES (?, ?)", (tid, adoc)
                    ).lastrowid
                    assert aid is not None
                    stored.append(StoredAction(aid, t.id, a))
            _save_clock(conn, now, wall)
            return stored

        return self.db.write(run)

    def mark_done(self, action_id: int, error: str | None) -> asyncio.Future[None]:
        """The action was carried out (``error``: it failed for good)."""
        return self.db.write(
            lambda conn: (
                conn.execute(
                    "UPDATE actions SET done = 1, error = ? WHERE id = ?", (error, action_id)
                ),
                None,
            )[1]
        )

    def checkpoint_clock(self) -> asyncio.Future[None]:
        """Store the clock (at close: the next start resumes from here)."""
        assert self.clock is not None
        now, wall = self.clock.now(), self.clock.wall()
        return self.db.write(lambda conn: _save_clock(conn, now, wall))

    def transitions(self, limit: int = 1000) -> asyncio.Future[list[dict[str, Any]]]:
        """The latest transitions, newest first (tests, debugging)."""

        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT doc FROM transitions ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
            return [orjson.loads(r[0]) for r in rows]

        return self.db.read(run)


def last_firings(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """Each rule's latest ``set`` transition kept: ``{rule: {device_id, at}}``
    (the rules page of the HMI)."""
    rows = conn.execute(
        "SELECT t.rule, t.device_id, t.at FROM transitions t JOIN "
        "(SELECT MAX(id) AS id FROM transitions WHERE state = 'set' GROUP BY rule) m "
        "ON t.id = m.id"
    ).fetchall()
    return {rule: {"device_id": device_id, "at": at} for rule, device_id, at in rows}


def _with_command_id(a: Action) -> Action:
    """A command gets its id when journaled: carried out again after a kill,
    it reaches the device with the same id (edgeway.rules.actions)."""
    if isinstance(a, SendCommand) and a.command_id is None:
        return dataclasses.replace(a, command_id=uuid.uuid4().hex)
    return a


def _save_clock(conn: sqlite3.Connection, now: float, wall: float) -> None:
    conn.execute(
        "INSERT INTO clock(id, clock, wall) VALUES (1, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET clock = excluded.clock, wall = excluded.wall",
        (now, wall),
    )


def load_states(conn: sqlite3.Connection) -> list[tuple[str, str, RuleState]]:
    """Every stored (rule, device, state)."""
    return [
        (rule, dev, RuleState(bool(active), since, seq, cooldown))
        for rule, dev, active, since, seq, cooldown in conn.execute(
            "SELECT rule, device_id, active, since, seq, cooldown_until FROM rule_state"
        )
    ]


def _load(conn: sqlite3.Connection) -> Loaded:
    states = load_states(conn)
    waiting = []
    for aid, doc, rule, dev, seq in conn.execute(
        "SELECT a.id, a.doc, t.rule, t.device_id, t.seq FROM actions a "
        "JOIN transitions t ON t.id = a.transition WHERE a.done = 0 ORDER BY a.id"
    ):
        waiting.append(
            StoredAction(
                aid, f"{rule}:{dev}:{seq}", action_from_json(orjson.loads(doc)), replay=True
            )
        )
    row = conn.execute("SELECT clock, wall FROM clock WHERE id = 1").fetchone()
    return Loaded(states, waiting, row[0] if row else None, row[1] if row else None)


def purge_history(conn: sqlite3.Connection, before_wall: float) -> int:
    """Delete transitions older than ``before_wall`` whose actions are all done."""
    cur = conn.execute(
        "DELETE FROM transitions WHERE at < ? AND NOT EXISTS "
        "(SELECT 1 FROM actions a WHERE a.transition = transitions.id AND a.done = 0)",
        (before_wall,),
    )
    return cur.rowcount
