"""Admin API bearer tokens: roles, the token store, ``edgeway tokens``.

A token is ``ewt_<id>_<secret>``: a 12-hex-digit id that names the token in
lists, logs and ``edgeway tokens revoke``, and a 256-bit random secret. The
store (``DATA_DIR/tokens.db``, SQLite in WAL mode) keeps the id, a name, the
role, the SHA-256 of the secret, when it was created, last used and revoked;
never the secret, which ``edgeway tokens create`` prints once.

SHA-256 and not a slow password hash (argon2, as for MQTT passwords): a slow
hash protects low-entropy secrets that people choose against guessing once
the hashes leak. A 256-bit random secret cannot be guessed, so one fast hash
is as safe, and it keeps each request's check at microseconds instead of the
tens of milliseconds (and megabytes) that argon2 costs per call.

The store is shared between the running gateway and the CLI. The gateway
keeps its rows in memory and asks SQLite on every check whether another
connection changed the file (``PRAGMA data_version``: a read of shared
memory, no disk access); a revoke or a new token is seen by the next
request. ``last used`` is kept in memory and written at most once a minute.

Roles are ordered, each including the ones below: ``viewer`` (read status and
metrics) < ``operator`` < ``engineer`` < ``admin``. Each admin API route
declares the least role it needs (see :mod:`edgeway.admin.access`).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import hashlib
import hmac
import os
import secrets
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson

from edgeway.storage.sqlite import StorageError, connect, migrate

DB_NAME = "tokens.db"
TOKEN_PREFIX = "ewt"
ID_HEX_DIGITS = 12
"""48 bits: ids are not secret, only unique; 12 digits stay readable in a list."""
SECRET_BYTES = 32
"""256 bits of randomness, as the issue asks: beyond guessing, so no slow hash."""
TOKEN_MAX_LENGTH = 128
"""Longer bearer values are refused before any work (a real token is 60 characters)."""
NAME_MAX_LENGTH = 64
"""Names show in lists and log lines; one line of a terminal."""
LAST_USED_FLUSH = 60.0
"""Seconds between writes of ``last used``: a minute's precision is enough to
tell an unused token from a used one, and a request must not cost a write."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL,
    revoked REAL
)
"""


class Role(enum.IntEnum):
    """Admin API roles, least to most powerful; each includes the ones below."""

    VIEWER = 1
    OPERATOR = 2
    ENGINEER = 3
    ADMIN = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            names = ", ".join(r.label for r in cls)
            raise ValueError(f"unknown role {text!r}; roles: {names}") from None


@dataclass(slots=True, frozen=True)
class TokenRecord:
    """A token as the store describes it (never its secret)."""

    id: str
    name: str
    role: Role
    created: float
    last_used: float | None
    revoked: float | None

    def to_json_obj(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.label,
            "created": self.created,
            "last_used": self.last_used,
            "revoked": self.revoked,
        }


class _Entry(NamedTuple):
    record: TokenRecord
    secret_sha256: str


class TokenStoreError(Exception):
    """The token store cannot be read or written (the admin API answers 503)."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def open_private_db(path: Path, busy_timeout: float, schema: str, name: str) -> sqlite3.Connection:
    """A small credential store's SQLite file, created readable by its owner
    only (only hashes inside, but names and roles are nobody else's business),
    with the shared helper's pragmas (WAL, synchronous=NORMAL) and migrations
    (a newer file is refused: StorageError). Not its writer thread: the CLI and
    the gateway both write here, synchronously. Usable from a worker thread
    (log-in checks)."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    db = connect(path, "os", busy_timeout=busy_timeout, foreign_keys=False)
    try:
        migrate(db, [schema], f"{path}: {name}")
    except BaseException:
        db.close()
        raise
    return db


def split_token(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token, else None (no store access)."""
    if len(token) > TOKEN_MAX_LENGTH:
        return None
    prefix, _, rest = token.partition("_")
    token_id, sep, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not sep or len(token_id) != ID_HEX_DIGITS or not secret:
        return None
    if any(c not in "0123456789abcdef" for c in token_id):
        return None
    return token_id, secret


class TokenStore:
    """The tokens in ``DATA_DIR/tokens.db``; see the module docstring.

    ``busy_timeout`` is how long a write waits for another writer: the CLI
    waits (5 s), the gateway passes 0 so that no request ever blocks the event
    loop on a lock (a ``last used`` write that finds the file busy is retried
    at the next flush).
    """

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        try:
            self._db = open_private_db(self.path, busy_timeout, _SCHEMA, "tokens")
        except (sqlite3.Error, StorageError) as e:
            raise TokenStoreError(
                str(e) if isinstance(e, StorageError) else f"{self.path}: {e}"
            ) from e
        self._entries: dict[str, _Entry] = {}
        self._data_version: int | None = None
        self._used: dict[str, float] = {}
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(TokenStoreError):
            self.flush_last_used()
        self._db.close()

    # -- CLI side ---------------------------------------------------------

    def create(self, name: str, role: Role) -> tuple[TokenRecord, str]:
        """A new token; returns its record and the token text (shown once)."""
        if not name or len(name) > NAME_MAX_LENGTH or not name.isprintable():
            raise ValueError(
                f"a token name is 1-{NAME_MAX_LENGTH} printable characters, got {name!r}"
            )
        token_id = secrets.token_hex(ID_HEX_DIGITS // 2)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        record = TokenRecord(token_id, name, role, time.time(), None, None)
        try:
            self._db.execute(
                "INSERT INTO tokens (id, name, role, secret_sha256, created) VALUES (?,?,?,?,?)",
                (token_id, name, role.label, _hash(secret), record.created),
            )
        except sqlite3.Error as e:
            raise TokenStoreError(f"{self.path}: {e}") from e
        return record, f"{TOKEN_PREFIX}_{token_id}_{secret}"

    def list(self) -> list[TokenRecord]:
        """Every token, oldest first, revoked ones included."""
        self._reload()
        return sorted((e.record for e in self._entries.values()), key=lambda r: r.created)

    def revoke(self, token_id: str) -> bool:
        """Revoke a token; False when no live token has that id."""
        try:
            cur = self._db.execute(
                "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (time.time(), token_id),
            )
        except sqlite3.Error as e:
            raise TokenStoreError(f"{self.path}: {e}") from e
        return cur.rowcount == 1

    # -- gateway side -----------------------------------------------------

    def verify(self, token: str) -> TokenRecord | None:
        """The live token ``token`` is, or None (malformed, unknown, revoked,
        wrong secret). Raises :class:`TokenStoreError` when the store cannot
        be read: the caller refuses the request rather than guess."""
        parts = split_token(token)
        if parts is None:
            return None
        token_id, secret = parts
        self._refresh()
        entry = self._entries.get(token_id)
        # Compare in constant time even for an unknown id, so the time taken
        # tells nothing about which ids exist.
        expected = entry.secret_sha256 if entry is not None else "0" * 64
        if not hmac.compare_digest(_hash(secret), expected) or entry is None:
            return None
        if entry.record.revoked is not None:
            return None
        now = time.time()
        self._used[token_id] = now
        if time.monotonic() - self._flushed_at >= LAST_USED_FLUSH:
            with contextlib.suppress(TokenStoreError):
                self.flush_last_used()
        return entry.record

    def flush_last_used(self) -> None:
        """Write the ``last used`` times gathered since the previous flush."""
        self._flushed_at = time.monotonic()
        if not self._used:
            return
        used, self._used = self._used, {}
        try:
            self._db.executemany(
                "UPDATE tokens SET last_used = ? WHERE id = ?",
                [(t, i) for i, t in used.items()],
            )
        except sqlite3.Error as e:
            # Busy (a CLI is writing): keep them for the next flush.
            for i, t in used.items():
                self._used.setdefault(i, t)
            raise TokenStoreError(f"{self.path}: {e}") from e

    def _refresh(self) -> None:
        """Reload the rows when another connection committed since the last look."""
        try:
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error as e:
            raise TokenStoreError(f"{self.path}: {e}") from e
        if version != self._data_version:
            self._reload()
            self._data_version = version

    def _reload(self) -> None:
        try:
            rows = self._db.execute(
                "SELECT id, name, role, secret_sha256, created, last_used, revoked FROM tokens"
            ).fetchall()
        except sqlite3.Error as e:
            raise TokenStoreError(f"{self.path}: {e}") from e
        entries: dict[str, _Entry] = {}
        for token_id, name, role, digest, created, last_used, revoked in rows:
            with contextlib.suppress(ValueError):  # a role from a newer edgeway: not usable
                record = TokenRecord(token_id, name, Role.parse(role), created, last_used, revoked)
                entries[token_id] = _Entry(record, digest)
        self._entries = entries


# --------------------------------------------------------------------------
# edgeway tokens create|list|revoke


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeway tokens",
        description="Bearer tokens for the admin API, kept in DATA_DIR/tokens.db. Works while "
        "the gateway runs: a new or revoked token counts from the next request.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--name", required=True, help="what the token is for (shown in lists)")
    create.add_argument(
        "--role",
        required=True,
        choices=[r.label for r in Role],
        help="least to most: viewer (read-only, monitoring), operator, engineer, admin",
    )
    lst = sub.add_parser("list", help="list tokens (never their secrets)")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id")
    return p


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t is not None else "-"


def _audit(data_dir: Path, action: str, target: str, detail: dict[str, str] | None) -> None:
    from edgeway.audit import cli_actor, record_offline

    record_offline(Path(data_dir), who=cli_actor(), action=action, target=target, detail=detail)


def tokens_main(argv: list[str], data_dir: Path) -> int:
    """``edgeway tokens create|list|revoke``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        store = TokenStore(Path(data_dir) / DB_NAME)
    except (OSError, TokenStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if args.action == "create":
            record, token = store.create(args.name, Role.parse(args.role))
            _audit(data_dir, "tokens create", record.id, {"name": record.name, "role": args.role})
            print(token)
            print(
                f"token {record.id} ({record.role.label}, {record.name!r}) created; this is the "
                "only time it is shown: store it now (for the CLI: export EDGEWAY_TOKEN=...)",
                file=sys.stderr,
            )
            return 0
        if args.action == "list":
            records = store.list()
            for r in records:
                if args.json:
                    print(orjson.dumps(r.to_json_obj()).decode())
                else:
                    state = f"revoked {_when(r.revoked)}" if r.revoked is not None else "active"
                    print(
                        f"{r.id}\t{r.role.label}\t{r.name!r}\tcreated {_when(r.created)}\t"
                        f"last used {_when(r.last_used)}\t{state}"
                    )
            if not args.json:
                print(f"{len(records)} token(s)", file=sys.stderr)
            return 0
        if store.revoke(args.id):
            _audit(data_dir, "tokens revoke", args.id, None)
            print(f"revoked {args.id}")
            return 0
        print(f"error: no active token with id {args.id!r}", file=sys.stderr)
        return 1
    except (ValueError, TokenStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
