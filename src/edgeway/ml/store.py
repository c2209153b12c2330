"""The model registry on disk: versions of ONNX models, their digests and signatures.

Layout under the data directory::

    models/
      models.db                      # versions and each model's slots (SQLite)
      pump-health/3.onnx             # one file per version, never rewritten

An upload is streamed to a temporary file in chunks while its SHA-256 is
computed (a model is never held whole in memory), fsynced, checked (size
limit, digest if the uploader gave one, Ed25519 signature against the keys in
``models.keys``), then renamed into place and recorded. A crash mid-upload
leaves only a ``.part`` file, removed at the next start.

Signatures: Ed25519 over the 32 raw bytes of the file's SHA-256 digest,
prefixed with ``edgeway-model-v1:`` so a signature made for something else
cannot be replayed here. ``edgeway models sign FILE --key KEY.pem`` makes one.

Each model name has *slots*: the ``active`` version (its outputs are the
step's outputs), the ``previous`` one (what a rollback returns to), and an
optional ``candidate`` in ``shadow`` mode (runs beside the active one, outputs
only compared) or ``canary`` mode (its outputs replace the active one's for a
share of devices). The manager changes slots; the store only persists them,
so a restart resumes with the same versions in the same roles.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeway.signing import verify
from edgeway.storage.blobs import BlobError, receive, remove_parts
from edgeway.storage.sqlite import Database

SIGNATURE_CONTEXT = b"edgeway-model-v1:"
"""Prefix of the signed message (the digest follows)."""
CHUNK = 256 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Model names and versions: file-name safe, no path separators."""

CandidateMode = Literal["shadow", "canary"]

SCHEMA_V1 = """
CREATE TABLE versions(
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    signed_by TEXT,
    created_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'ready',
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY(name, version)
);
CREATE TABLE slots(
    name TEXT PRIMARY KEY,
    active TEXT,
    previous TEXT,
    candidate TEXT,
    mode TEXT,
    share REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE events(
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    name TEXT NOT NULL,
    version TEXT,
    what TEXT NOT NULL,
    by TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""

EVENTS_KEPT = 1_000
"""Lifecycle events kept per store (uploads, promotions, rollbacks)."""


class ModelError(Exception):
    """A model upload or lifecycle change refused; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, frozen=True)
class ModelVersion:
    name: str
    version: str
    sha256: str
    size: int
    signed_by: str | None
    created_at: float
    state: str
    note: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "signed_by": self.signed_by,
            "created_at": self.created_at,
            "state": self.state,
            "note": self.note,
        }


@dataclass(slots=True)
class Slots:
    name: str
    active: str | None = None
    previous: str | None = None
    candidate: str | None = None
    mode: CandidateMode | None = None
    share: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "previous": self.previous,
            "candidate": self.candidate,
            "mode": self.mode,
            "share": self.share,
        }


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ModelError(
            "invalid",
            f"{kind} {value!r}: 1-64 letters, digits, '.', '_' or '-', not starting with a dot",
        )
    return value


def signed_message(digest: bytes) -> bytes:
    """What an Ed25519 model signature signs."""
    return SIGNATURE_CONTEXT + digest


class ModelStore:
    """Model files and their records under ``DATA_DIR/models``."""

    def __init__(
        self,
        root: Path | str,
        *,
        max_size: int,
        keys: dict[str, Any] | None = None,
        require_signature: bool = False,
    ) -> None:
        self.root = Path(root)
        self.max_size = max_size
        self.keys = keys or {}
        """Trusted Ed25519 public keys by name (``models.keys``)."""
        self.require_signature = require_signature
        self.db = Database(self.root / "models.db", migrations=[SCHEMA_V1], name="models")

    async def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        remove_parts(self.root)
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    def path(self, name: str, version: str) -> Path:
        return self.root / check_name("model name", name) / f"{check_name('version', version)}.onnx"

    # -- uploads ------------------------------------------------------------

    async def add(
        self,
        name: str,
        version: str,
        chunks: AsyncIterator[bytes],
        *,
        sha256: str | None = None,
        signature: bytes | None = None,
        by: str = "api",
        note: str = "",
    ) -> ModelVersion:
        """Store one version from ``chunks``; refuse it whole if any check fails."""
        final = self.path(name, version)
        if await self.get(name, version) is not None:
            raise ModelError("exists", f"model {name} version {version} already exists")
        signer: list[str | None] = [None]

        def check(digest: bytes) -> None:
            signer[0] = self._verify(digest, signature)

        try:
            hexd, size = await receive(
                chunks, final, max_size=self.max_size, sha256=sha256, check=check, what="model"
            )
        except BlobError as e:
            raise ModelError(e.code, str(e)) from None
        signed_by = signer[0]
        record = ModelVersion(name, version, hexd, size, signed_by, time.time(), "ready", note)

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO versions(name, version, sha256, size, signed_by, created_at, state, note)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, hexd, size, signed_by, record.created_at, "ready", note),
            )
            _event(conn, name, version, "uploaded", by, f"sha256 {hexd}, {size} bytes")

        try:
            await self.db.write(insert)
        except sqlite3.IntegrityError:
            raise ModelError("exists", f"model {name} version {version} already exists") from None
        return record

    def _verify(self, digest: bytes, signature: bytes | None) -> str | None:
        if signature is None:
            if self.require_signature:
                raise ModelError(
                    "unsigned", "models.require_signature is on: a signature is needed"
                )
            return None
        if not self.keys:
            raise ModelError("unsigned", "a signature was given but models.keys holds no key")
        signer = verify(self.keys, signature, signed_message(digest))
        if signer is None:
            raise ModelError("bad_signature", "the signature matches none of models.keys")
        return signer

    # -- records ------------------------------------------------------------

    async def get(self, name: str, version: str) -> ModelVersion | None:
        def q(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                "SELECT name, version, sha256, size, signed_by, created_at, state, note"
                " FROM versions WHERE name = ? AND version = ?",
                (name, version),
            ).fetchone()

        row = await self.db.read(q)
        return None if row is None else ModelVersion(*row)

    async def versions(self, name: str | None = None) -> list[ModelVersion]:
        def q(conn: sqlite3.Connection) -> list[Any]:
            sql = "SELECT name, version, sha256, size, signed_by, created_at, state, note FROM versions"
            if name is None:
                return conn.execute(sql + " ORDER BY name, created_at").fetchall()
            return conn.execute(sql + " WHERE name = ? ORDER BY created_at", (name,)).fetchall()

        return [ModelVersion(*row) for row in await self.db.read(q)]

    async def all_slots(self) -> dict[str, Slots]:
        def q(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(
                "SELECT name, active, previous, candidate, mode, share FROM slots"
            ).fetchall()

        return {row[0]: Slots(*row) for row in await self.db.read(q)}

    async def save_slots(
        self,
        slots: Slots,
        *,
        what: str,
        by: str,
        detail: str = "",
        version: str | None = None,
        mark: tuple[str, str] | None = None,
    ) -> None:
        """Persist ``slots`` with the event that changed them; ``mark`` =
        (version, state) records a version's new state in the same commit."""

        def w(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO slots(name, active, previous, candidate, mode, share, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                " active = excluded.active, previous = excluded.previous,"
                " candidate = excluded.candidate, mode = excluded.mode, share = excluded.share,"
                " updated_at = excluded.updated_at",
                (
                    slots.name,
                    slots.active,
                    slots.previous,
                    slots.candidate,
                    slots.mode,
                    slots.share,
                    time.time(),
                ),
            )
            if mark is not None:
                conn.execute(
                    "UPDATE versions SET state = ?, note = ? WHERE name = ? AND version = ?",
                    (mark[1], detail[:500], slots.name, mark[0]),
                )
            _event(conn, slots.name, version, what, by, detail)

        await self.db.write(w)

    async def events(self, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        def q(conn: sqlite3.Connection) -> list[Any]:
            if name is None:
                return conn.execute(
                    "SELECT seq, ts, name, version, what, by, detail FROM events"
                    " ORDER BY seq DESC LIMIT ?",
                    (limit,),
                ).fetchall()
            return conn.execute(
                "SELECT seq, ts, name, version, what, by, detail FROM events WHERE name = ?"
                " ORDER BY seq DESC LIMIT ?",
                (name, limit),
            ).fetchall()

        keys = ("seq", "ts", "name", "version", "what", "by", "detail")
        return [dict(zip(keys, row, strict=True)) for row in await self.db.read(q)]

    async def remove(self, name: str, version: str, *, by: str) -> None:
        """Delete a version that no slot uses."""
        slots = (await self.all_slots()).get(name)
        if slots is not None and version in (slots.active, slots.previous, slots.candidate):
            raise ModelError("in_use", f"model {name} version {version} is in use")

        def w(conn: sqlite3.Connection) -> int:
            n = conn.execute(
                "DELETE FROM versions WHERE name = ? AND version = ?", (name, version)
            ).rowcount
            if n:
                _event(conn, name, version, "removed", by)
            return int(n)

        if not await self.db.write(w):
            raise ModelError("not_found", f"no model {name} version {version}")
        with contextlib.suppress(OSError):
            self.path(name, version).unlink()


def _event(
    conn: sqlite3.Connection, name: str, version: str | None, what: str, by: str, detail: str = ""
) -> None:
    conn.execute(
        "INSERT INTO events(ts, name, version, what, by, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), name, version, what, by, detail[:1000]),
    )
    conn.execute(
        "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (EVENTS_KEPT,)
    )
