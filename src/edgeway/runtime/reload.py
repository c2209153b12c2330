"""Live reconfiguration: what a new configuration changes, and the history of
applied configurations.

:func:`plan` compares two validated configurations without touching
anything running and says which parts of the gateway a reload must replace
(see docs/reload.md):

==================  =====================================================
part                how a change is applied
==================  =====================================================
``sinks``,          the data path is re-opened: new readings are held for
``routes``,         the moment it takes (milliseconds; devices stay
``pipeline``,       connected, their acknowledgements wait), sink runners
``outbox``,         stop, the pipeline's open windows are journaled, the
``receipts``,       outbox re-opens with the new sinks and limits, the
``rules``           pipeline with the new routes (windows of unchanged
                    steps continue) and rules (a rule keeps its durable
                    state under its name), runners start again. Nothing
                    acknowledged is lost: pending readings of a sink whose
                    URL changed go to the new URL; a removed sink's pending
                    readings stay stored and counted (``edgeway outbox
                    purge SINK`` drops them on purpose).
south adapters      per entry (section and name): an unchanged entry keeps
                    running; a changed one is stopped, then its new
                    version started; a new one started; a removed one
                    stopped.
MQTT listeners      per ``bind``: unchanged listeners and their clients stay;
                    a removed or changed listener closes with its clients
                    (v5: DISCONNECT 0x8B) and the new one opens.
MQTT users, ACL     new connections are checked against the new ones.
``input_limits``    the broker decodes the next PUBLISH with the new ones
                    (top level or ``mqtt.input_limits``); other adapters
                    get theirs as a changed entry.
``commands``        limits apply at once (``enabled`` needs a restart).
``log.level``       at once.
``fleet``           at once (its keys are read at each pushed configuration).
everything else     needs a restart: the reload is refused, naming the keys
                    (``models`` included; any section this table does not
                    name, so none is reported applied while still unused).
==================  =====================================================

:class:`ConfigHistory` keeps the last :data:`HISTORY_KEEP` applied
configurations under ``DATA_DIR/config/`` with their time, source and a
SHA-256 of the text.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeway.config import Config

HISTORY_KEEP = 20
"""Applied configurations kept (the issue asks for the last 20)."""

DATA_PATH_KEYS = ("sinks", "routes", "pipeline", "outbox", "receipts", "rules")
"""Top-level keys whose change re-opens the data path."""
RESTART_KEYS = ("gateway", "admin")
"""Top-level keys that need a restart."""
MQTT_LIVE_KEYS = frozenset({"listeners", "users", "acl", "input_limits"})
"""Keys of ``mqtt`` a reload applies; any other ``mqtt`` change needs a restart."""
LIVE_SETTINGS = ("fleet",)
"""Top-level keys whose users read the configuration in force each time
(``fleet.keys`` at each pushed configuration): a change takes effect once the
new configuration is in force, nothing to restart."""
PLANNED_KEYS = frozenset(
    {*DATA_PATH_KEYS, *RESTART_KEYS, *LIVE_SETTINGS, "mqtt", "commands", "log", "input_limits"}
)
"""Top-level keys :func:`plan` knows (besides the south adapters' sections);
a change of any other key needs a restart, so that no section is ever
reported as applied while the running parts still use the old values."""


class ReloadError(Exception):
    """A configuration that was not applied; the running one is still in force."""

    def __init__(self, message: str, *, rolled_back: bool = False) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back
        self.issues: list[Any] = []
        """For a configuration that does not validate: its ConfigIssues."""


@dataclass(slots=True)
class ReloadPlan:
    """What applying a new configuration changes (see the module docstring)."""

    data_path: list[str] = field(default_factory=list)
    """Top-level keys among DATA_PATH_KEYS that changed."""
    adapters_added: list[tuple[str, str]] = field(default_factory=list)
    adapters_removed: list[tuple[str, str]] = field(default_factory=list)
    adapters_changed: list[tuple[str, str]] = field(default_factory=list)
    listeners_added: list[str] = field(default_factory=list)
    listeners_removed: list[str] = field(default_factory=list)
    listeners_changed: list[str] = field(default_factory=list)
    mqtt_auth: bool = False
    mqtt_input_limits: bool = False
    """The broker's ``input_limits`` (also a top-level ``input_limits`` change):
    the next PUBLISH is decoded with the new ones."""
    commands: bool = False
    log: bool = False
    settings: list[str] = field(default_factory=list)
    """Changed keys among LIVE_SETTINGS."""
    restart_needed: list[str] = field(default_factory=list)
    """Keys whose change this gateway cannot apply while running."""

    @property
    def empty(self) -> bool:
        return not self.changes()

    def changes(self) -> list[str]:
        """One short line per change, for logs and the API's answer."""
        out = [f"data path ({', '.join(self.data_path)})"] if self.data_path else []
        out += [f"adapter {s}:{n} added" for s, n in self.adapters_added]
        out += [f"adapter {s}:{n} removed" for s, n in self.adapters_removed]
        out += [f"adapter {s}:{n} changed" for s, n in self.adapters_changed]
        out += [f"mqtt listener {b} added" for b in self.listeners_added]
        out += [f"mqtt listener {b} removed" for b in self.listeners_removed]
        out += [f"mqtt listener {b} changed" for b in self.listeners_changed]
        if self.mqtt_auth:
            out.append("mqtt users/acl")
        if self.mqtt_input_limits:
            out.append("mqtt input_limits")
        if self.commands:
            out.append("commands")
        if self.log:
            out.append("log")
        out += self.settings
        return out


def adapter_entries(cfg: Config) -> dict[tuple[str, str], Any]:
    """Every enabled south adapter entry by (section, name)."""
    from edgeway.south.base import registered_sections

    out: dict[tuple[str, str], Any] = {}
    for section in registered_sections():
        value = getattr(cfg, section, None)
        entries = value if isinstance(value, list) else ([] if value is None else [value])
        for e in entries:
            if getattr(e, "enabled", True) is False:
                continue
            out[(section, str(getattr(e, "name", section)))] = e
    return out


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def plan(old: Config, new: Config) -> ReloadPlan:
    """What applying ``new`` over the running ``old`` changes."""
    p = ReloadPlan()
    for key in RESTART_KEYS:
        if _dump(getattr(old, key)) != _dump(getattr(new, key)):
            p.restart_needed.append(key)
    if old.commands.enabled != new.commands.enabled:
        p.restart_needed.append("commands.enabled")
    elif _dump(old.commands) != _dump(new.commands):
        p.commands = True
    old_mqtt, new_mqtt = _dump(old.mqtt), _dump(new.mqtt)
    for key in sorted(set(old_mqtt) | set(new_mqtt)):
        if old_mqtt.get(key) == new_mqtt.get(key):
            continue
        if key not in MQTT_LIVE_KEYS:
            p.restart_needed.append(f"mqtt.{key}")
        elif key in ("users", "acl"):
            p.mqtt_auth = True
        elif key == "input_limits":
            p.mqtt_input_limits = True
    old_l = {lst.bind: _dump(lst) for lst in old.mqtt.listeners} if old.mqtt.enabled else {}
    new_l = {lst.bind: _dump(lst) for lst in new.mqtt.listeners} if new.mqtt.enabled else {}
    p.listeners_added = [b for b in new_l if b not in old_l]
    p.listeners_removed = [b for b in old_l if b not in new_l]
    p.listeners_changed = [b for b in new_l if b in old_l and new_l[b] != old_l[b]]
    for key in DATA_PATH_KEYS:
        if _dump_all(getattr(old, key)) != _dump_all(getattr(new, key)):
            p.data_path.append(key)
    old_a, new_a = adapter_entries(old), adapter_entries(new)
    p.adapters_added = [k for k in new_a if k not in old_a]
    p.adapters_removed = [k for k in old_a if k not in new_a]
    p.adapters_changed = [k for k in new_a if k in old_a and _dump(new_a[k]) != _dump(old_a[k])]
    if _dump(old.log) != _dump(new.log):
        if old.log.format != new.log.format:
            p.restart_needed.append("log.format")
        else:
            p.log = True
    from edgeway.south.base import registered_sections

    planned = PLANNED_KEYS | set(registered_sections())
    for key in type(new).model_fields:
        if _dump_all(getattr(old, key)) == _dump_all(getattr(new, key)):
            continue
        if key in LIVE_SETTINGS:
            p.settings.append(key)
        elif key not in planned:
            p.restart_needed.append(key)
    return p


def _dump_all(value: Any) -> Any:
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return _dump(value)


# --------------------------------------------------------------------------
# history


@dataclass(slots=True, frozen=True)
class HistoryEntry:
    """One applied configuration."""

    number: int
    applied_at: float
    sha256: str
    source: str
    path: Path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "applied_at": self.applied_at,
            "sha256": self.sha256,
            "source": self.source,
        }


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ConfigHistory:
    """The last applied configurations, one file each plus an index line.

    ``DATA_DIR/config/NNNNNN.yaml`` holds the text; ``index.jsonl`` one JSON
    line per entry (number, time, hash, source). Written atomically (a
    temporary file renamed), so a crash leaves the previous state."""

    def __init__(self, data_dir: Path, keep: int = HISTORY_KEEP) -> None:
        self.dir = Path(data_dir) / "config"
        self.keep = keep

    def entries(self) -> list[HistoryEntry]:
        """Newest first."""
        index = self.dir / "index.jsonl"
        try:
            lines = index.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                d = json.loads(line)
                out.append(
                    HistoryEntry(
                        int(d["number"]),
                        float(d["applied_at"]),
                        str(d["sha256"]),
                        str(d.get("source", "")),
                        self.dir / f"{int(d['number']):06d}.yaml",
                    )
                )
            except (ValueError, KeyError, TypeError):
                continue
        out.sort(key=lambda e: e.number, reverse=True)
        return out

    def current(self) -> HistoryEntry | None:
        entries = self.entries()
        return entries[0] if entries else None

    def get(self, number: int) -> HistoryEntry | None:
        return next((e for e in self.entries() if e.number == number), None)

    def record(self, text: str, source: str, now: float | None = None) -> HistoryEntry:
        """Add ``text`` as the configuration now in force (unless it already is)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        digest = text_hash(text)
        entries = self.entries()
        if entries and entries[0].sha256 == digest:
            return entries[0]
        number = entries[0].number + 1 if entries else 1
        path = self.dir / f"{number:06d}.yaml"
        _atomic_write(path, text)
        entry = HistoryEntry(number, time.time() if now is None else now, digest, source, path)
        kept = [entry, *entries][: self.keep]
        _atomic_write(
            self.dir / "index.jsonl",
            "".join(json.dumps(e.to_json()) + "\n" for e in reversed(kept)),
        )
        for old in entries[self.keep - 1 :]:
            try:
                old.path.unlink()
            except FileNotFoundError:
                pass
        return entry


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
