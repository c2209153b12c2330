"""Check an alarm journal: every transition legal from the state before it,
never two open occurrences of one (source, type).

The stress test and ``bench/alarms_stress.py`` run it over the journal many
concurrent producers wrote; it reads only the journal, so it judges what was
stored, not what the service believes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from edgeway.alarms.model import Action, Alarm, legal_actions


@dataclass(slots=True)
class JournalReport:
    """What :func:`check_journal` found."""

    transitions: int = 0
    keys: int = 0
    occurrences: int = 0
    """Distinct alarm ids (each one occurrence)."""
    problems: list[str] = field(default_factory=list)


def _rows(conn: sqlite3.Connection) -> Iterator[tuple[str, str, int, str, str, Alarm]]:
    for source, type_, seq, action, by, state in conn.execute(
        "SELECT source, type, seq, action, by, state FROM transitions ORDER BY source, type, seq"
    ):
        yield source, type_, seq, action, by, Alarm.from_json(orjson.loads(state))


def check_journal(conn: sqlite3.Connection, max_problems: int = 20) -> JournalReport:
    """Replay the journal per key and report what no legal machine could
    have written (at most ``max_problems`` lines)."""
    report = JournalReport()
    ids: set[str] = set()
    key: tuple[str, str] | None = None
    prev: Alarm | None = None
    for source, type_, seq, action_s, by, s in _rows(conn):
        report.transitions += 1
        if (source, type_) != key:
            key, prev = (source, type_), None
            report.keys += 1
        action = Action(action_s)
        problem = _illegal(prev, action, by, s)
        if problem is not None and len(report.problems) < max_problems:
            report.problems.append(f"{source}/{type_} #{seq} {action_s}: {problem}")
        if s.id:
            ids.add(s.id)
        prev = None if s.forgettable else s
    report.occurrences = len(ids)
    _check_current(conn, report, max_problems)
    return report


def _illegal(prev: Alarm | None, action: Action, by: str, s: Alarm) -> str | None:
    """Why ``prev`` -> ``s`` by ``action`` is illegal, or None."""
    p_active = prev is not None and prev.active
    p_latched = prev is not None and prev.latched
    if action is Action.RAISE:
        if not s.active or s.latched:
            return "a raise left the alarm inactive or latched"
        if p_active and not p_latched:
            return "raised while already active: a duplicate alarm"
        opens = prev is None or prev.normal or not prev.id
        if opens and (s.count != 1 or (prev is not None and s.id == prev.id)):
            return "a new occurrence without a new id"
        if not opens and prev is not None and s.id != prev.id:
            return "a second occurrence while one was open"
        return None
    if prev is not None and prev.id and s.id != prev.id:
        return "the occurrence id changed without a raise"
    if action is Action.SEVERITY:
        return None if p_active and not p_latched else "severity change of an inactive alarm"
    if action is Action.CLEAR:
        return None if p_active and not p_latched else "cleared an alarm that was not active"
    if action is Action.UNSHELVE and by == "system":
        # The end of a timed shelving, or of a one-shot one as the alarm went
        # inactive (the transition right after a clear or reset).
        return None if prev is not None and prev.shelving is not None else "unshelved nothing"
    if action not in legal_actions(prev):
        return "not allowed from " + ("normal" if prev is None else "its state")
    return None


def _check_current(conn: sqlite3.Connection, report: JournalReport, max_problems: int) -> None:
    """The ``alarms`` table must hold the last state of every kept key."""
    last: dict[tuple[str, str], Alarm] = {}
    for source, type_, _seq, _a, _b, s in _rows(conn):
        last[(source, type_)] = s
    stored = {
        (src, typ): Alarm.from_json(orjson.loads(state))
        for src, typ, state in conn.execute("SELECT source, type, state FROM alarms")
    }
    for k, s in last.items():
        want = None if s.forgettable else s
        if stored.get(k) != want and len(report.problems) < max_problems:
            report.problems.append(f"{k[0]}/{k[1]}: current state differs from its last transition")
    for k in stored.keys() - last.keys():
        if len(report.problems) < max_problems:
            report.problems.append(f"{k[0]}/{k[1]}: kept without a transition")
