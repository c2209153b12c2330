"""People who log in to the HMI: names, roles, argon2id passwords, ``edgeway users``.

Tokens (:mod:`edgeway.admin.tokens`) are for machines; users are for people
in a browser. A user has a name, a role (the same four as tokens: viewer <
operator < engineer < admin) and an argon2id hash of a password they chose.
The store is ``DATA_DIR/users.db`` (SQLite, WAL), shared by the running
gateway and the CLI: a user added, removed or given a new password counts
from the next request (``PRAGMA data_version``, as the token store does), and
a removed user's browser sessions stop working at once.

argon2id here and not the tokens' single SHA-256: a password a person chose
has little entropy, so a leaked hash must be slow to guess. The price (tens
of ms of CPU per check) is paid once per log-in, in a thread, never per
request: the browser then holds a session (:mod:`edgeway.admin.sessions`).

First run: ``edgeway users add NAME --role admin`` creates the first
administrator (the gateway logs how to while no user exists).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from edgeway.admin.tokens import Role, open_private_db
from edgeway.storage.sqlite import StorageError

DB_NAME = "users.db"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
"""A user name: 1-64 characters that need no quoting in a log line or a URL."""
PASSWORD_MIN = 8
"""Shortest password taken: NIST SP 800-63B's minimum for a chosen secret."""
PASSWORD_MAX = 1024
"""Longest password taken: argon2 hashes any length, but a megabyte of
"password" per log-in attempt is work an attacker should not get for free."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL,
    changed REAL NOT NULL
)
"""

_HASHER = PasswordHasher()  # argon2id, RFC 9106's second recommended parameters
_DUMMY_HASH = _HASHER.hash("edgeway-no-such-user")
"""Verified against for unknown names, so that the time taken does not tell
which names exist."""


class UserStoreError(Exception):
    """The user store cannot be read or written."""


@dataclass(slots=True, frozen=True)
class UserRecord:
    """A user as the store describes it (never the hash)."""

    name: str
    role: Role
    created: float
    changed: float

    def to_json_obj(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role.label,
            "created": self.created,
            "changed": self.changed,
        }


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"a user name is 1-64 letters, digits or ._@- (starting with a letter or digit), "
            f"got {name!r}"
        )
    return name


def check_password(password: str) -> str:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise ValueError(f"a password is {PASSWORD_MIN}-{PASSWORD_MAX} characters")
    return password


class UserStore:
    """The users in ``DATA_DIR/users.db``; see the module docstring."""

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        try:
            self._db = open_private_db(self.path, busy_timeout, _SCHEMA, "users")
        except (sqlite3.Error, StorageError) as e:
            raise UserStoreError(
                str(e) if isinstance(e, StorageError) else f"{self.path}: {e}"
            ) from e
        self._users: dict[str, tuple[UserRecord, str]] = {}
        self._data_version: int | None = None

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: tuple[object, ...]) -> int:
        try:
            return self._db.execute(sql, args).rowcount
        except sqlite3.IntegrityError as e:
            raise ValueError(f"user {args[0]!r} exists already") from e
        except sqlite3.Error as e:
            raise UserStoreError(f"{self.path}: {e}") from e

    def add(self, name: str, role: Role, password: str) -> UserRecord:
        """A new user (ValueError when the name is taken or a value is bad)."""
        check_name(name)
        digest = _HASHER.hash(check_password(password))
        now = time.time()
        self._write(
            "INSERT INTO users (name, role, password_hash, created, changed) VALUES (?,?,?,?,?)",
            (name, role.label, digest, now, now),
        )
        return UserRecord(name, role, now, now)

    def set_password(self, name: str, password: str) -> bool:
        """A new password; False when there is no such user."""
        digest = _HASHER.hash(check_password(password))
        n = self._write(
            "UPDATE users SET password_hash = ?, changed = ? WHERE name = ?",
            (digest, time.time(), name),
        )
        return n == 1

    def remove(self, name: str) -> bool:
        return self._write("DELETE FROM users WHERE name = ?", (name,)) == 1

    def list(self) -> list[UserRecord]:
        self._refresh()
        return sorted((u for u, _ in self._users.values()), key=lambda u: u.name)

    def get(self, name: str) -> UserRecord | None:
        """The user now (a removed user is None; a changed role shows at once)."""
        self._refresh()
        entry = self._users.get(name)
        return entry[0] if entry is not None else None

    def changed_since(self, name: str, when: float) -> bool:
        """Whether ``name``'s password changed (or the user went) after ``when``."""
        self._refresh()
        entry = self._users.get(name)
        return entry is None or entry[0].changed > when

    def verify(self, name: str, password: str) -> UserRecord | None:
        """The user when the password is right, else None. Slow (argon2):
        call it in a thread."""
        self._refresh()
        entry = self._users.get(name)
        digest = entry[1] if entry is not None else _DUMMY_HASH
        try:
            _HASHER.verify(digest, password[:PASSWORD_MAX])
        except (VerificationError, InvalidHashError):
            return None
        return entry[0] if entry is not None else None

    def _refresh(self) -> None:
        try:
            (version,) = self._db.execute("PRAGMA data_version").fetchone()
            if version == self._data_version:
                return
            rows = self._db.execute(
                "SELECT name, role, password_hash, created, changed FROM users"
            ).fetchall()
        except sqlite3.Error as e:
            raise UserStoreError(f"{self.path}: {e}") from e
        users: dict[str, tuple[UserRecord, str]] = {}
        for name, role, digest, created, changed in rows:
            with contextlib.suppress(ValueError):  # a role from a newer edgeway: not usable
                users[name] = (UserRecord(name, Role.parse(role), created, changed), digest)
        self._users = users
        self._data_version = version


# --------------------------------------------------------------------------
# edgeway users add|list|remove|passwd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeway users",
        description="People who log in to the HMI, kept in DATA_DIR/users.db (argon2id "
        "password hashes). Works while the gateway runs.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("name")
    add.add_argument(
        "--role",
        required=True,
        choices=[r.label for r in Role],
        help="least to most: viewer (read-only), operator (commands), engineer "
        "(configuration), admin",
    )
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    lst = sub.add_parser("list", help="list users (never their hashes)")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    rm = sub.add_parser("remove", help="remove a user (their sessions end at once)")
    rm.add_argument("name")
    pw = sub.add_parser("passwd", help="set a user's password (their sessions end)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    return p


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise ValueError("the two passwords differ")
    return first


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def users_main(argv: list[str], data_dir: Path) -> int:
    """``edgeway users add|list|remove|passwd``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        store = UserStore(Path(data_dir) / DB_NAME)
    except (OSError, UserStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if args.action == "add":
            check_name(args.name)
            user = store.add(args.name, Role.parse(args.role), _read_password(args.password_stdin))
            print(f"user {user.name!r} ({user.role.label}) added", file=sys.stderr)
        elif args.action == "list":
            for u in store.list():
                if args.json:
                    print(orjson.dumps(u.to_json_obj()).decode())
                else:
                    print(f"{u.name}\t{u.role.label}\tcreated {_when(u.created)}")
        elif args.action == "remove":
            if not store.remove(args.name):
                print(f"error: no user {args.name!r}", file=sys.stderr)
                return 1
            print(f"user {args.name!r} removed", file=sys.stderr)
        elif not store.set_password(args.name, _read_password(args.password_stdin)):
            print(f"error: no user {args.name!r}", file=sys.stderr)
            return 1
        else:
            print(f"password of {args.name!r} changed", file=sys.stderr)
        return 0
    except (ValueError, UserStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
