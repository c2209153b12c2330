"""Per-device credentials in SQLite: MQTT passwords, HTTP and CoAP tokens.

The store (``DATA_DIR/credentials.db``) holds, per device id, at most one
credential of each kind (``mqtt``, ``http``, ``coap``), the device's ACL
groups and whether it is disabled; never a secret in clear::

    store = CredentialStore.open(data_dir)
    secret = store.issue("boiler-1", "mqtt")          # printed once, never stored
    store.verify("mqtt", "boiler-1", secret.encode())  # Verdict.OK, microseconds
    store.set_disabled("boiler-1", True)               # every listener revokes it

Two kinds of secret, two kinds of hash:

- Secrets the gateway generates (``issue``) are 192 random bits, beyond
  guessing, so they are stored as a fast KEYED hash: HMAC-SHA256 under the
  gateway's secret key (``DATA_DIR/gateway.key``, 32 random bytes, mode
  0600). A check costs ~2 us on the event loop, so 10,000 devices
  reconnecting after a restart are checked in tens of milliseconds; and a
  copy of the database alone (a backup) gives an attacker nothing to test
  guesses against without the key.
- Passwords a person chooses (``set_password``) keep argon2id, which makes
  each guess against a leaked hash expensive; the authenticator verifies
  them on worker threads (``Verdict.NEEDS_ARGON2``).

The store is shared between the running gateway and the CLI (``edgeway
credentials``), like the admin token store: the gateway keeps the rows in
memory and re-reads them when another connection changed the file (``PRAGMA
data_version``, a read of shared memory). :meth:`CredentialStore.changes`
reports which devices lost access and whether groups changed, which the
gateway turns into revocation (disconnects within a second) and ACL cache
invalidation. Writes are rare administrative changes made on the caller's
thread; that is why this is a plain connection (with the storage helper's
pragmas and migrations) rather than a :class:`~edgeway.storage.sqlite.Database`,
whose writer thread serves stores written on the hot path.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import sqlite3
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import argon2

from edgeway.storage.sqlite import connect, migrate

__all__ = [
    "DB_NAME",
    "KEY_NAME",
    "KINDS",
    "CredentialError",
    "CredentialStore",
    "Kind",
    "Verdict",
    "keyed_digest",
    "load_key",
]

DB_NAME = "credentials.db"
KEY_NAME = "gateway.key"
KEY_BYTES = 32
"""HMAC-SHA256 key: 256 bits, the hash's block security."""
SECRET_BYTES = 24
"""Generated secrets: 192 bits (the issue asks for at least 128), 32
characters of URL-safe base64 that fit any device's config field."""
SECRET_MAX_LENGTH = 256
"""Longer presented secrets are refused before any hashing."""
DEVICE_ID_MAX_LENGTH = 128
"""As the codecs' device id limit."""

Kind = Literal["mqtt", "http", "coap"]
KINDS: tuple[Kind, ...] = ("mqtt", "http", "coap")

_SCHEMA_V1 = """
CREATE TABLE credentials (
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('mqtt', 'http', 'coap')),
    digest TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (device_id, kind)
);
CREATE TABLE identities (
    device_id TEXT PRIMARY KEY,
    groups TEXT NOT NULL DEFAULT '',
    disabled INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
"""

_HMAC_PREFIX = "hmac-sha256:"


class CredentialError(Exception):
    """A bad argument or an unusable key file (message says which)."""


class Verdict(enum.Enum):
    OK = "ok"
    WRONG = "wrong"
    """A credential of this kind exists and the secret does not match it."""
    UNKNOWN = "unknown"
    """No credential of this kind for this device (another source may know it)."""
    DISABLED = "disabled"
    NEEDS_ARGON2 = "needs_argon2"
    """A person-chosen password: verify ``digest_of`` with argon2 off the loop."""


@dataclass(slots=True, frozen=True)
class DeviceAccess:
    """What the store knows about one device (no secrets)."""

    device_id: str
    groups: frozenset[str] = frozenset()
    disabled: bool = False
    kinds: tuple[str, ...] = ()


@dataclass(slots=True)
class Changes:
    """What changed since the last look (see :meth:`CredentialStore.changes`)."""

    revoked: set[str] = field(default_factory=set)
    """Devices disabled, or whose credential of some kind was removed or replaced."""
    groups_changed: bool = False


def load_key(data_dir: Path, *, create: bool = True) -> bytes:
    """The gateway's HMAC key, created (mode 0600, exclusively) on first use.

    Refused when readable by group or others: a key anyone on the machine can
    read makes the keyed hashes plain ones."""
    path = data_dir / KEY_NAME
    if create and not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: read theirs
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialError(
                f"{path}: readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                "chmod 600 it"
            )
        key = path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{path}: no gateway key") from None
    if len(key) < KEY_BYTES:
        raise CredentialError(f"{path}: {len(key)} bytes, expected {KEY_BYTES}")
    return key


def keyed_digest(key: bytes, kind: str, device_id: str, secret: bytes) -> str:
    """HMAC-SHA256 of a generated secret under the gateway key, as stored."""
    # Kind and device id are bound in, so a digest copied to another row
    # (another device, another protocol) does not verify there.
    msg = kind.encode() + b"\x00" + device_id.encode() + b"\x00" + secret
    return _HMAC_PREFIX + hmac.new(key, msg, hashlib.sha256).hexdigest()


def check_device_id(device_id: str) -> None:
    """Raise CredentialError unless ``device_id`` can name a device everywhere
    (an MQTT user name and topic level, an HTTP/CoAP path segment)."""
    if not device_id or len(device_id) > DEVICE_ID_MAX_LENGTH:
        raise CredentialError(f"device id must be 1-{DEVICE_ID_MAX_LENGTH} characters")
    if any(c in device_id for c in "/+#\x00") or not device_id.isprintable():
        raise CredentialError("device id must be printable and contain none of / + # NUL")


class CredentialStore:
    """The credential rows of one data directory, cached in memory."""

    def __init__(self, conn: sqlite3.Connection, key: bytes, path: Path) -> None:
        self._conn = conn
        self._key = key
        self.path = path
        self._digests: dict[tuple[str, str], str] = {}
        self._access: dict[str, DeviceAccess] = {}
        self._version = -1
        self._pending = Changes()
        self._hasher = argon2.PasswordHasher()
        self._reload()

    @classmethod
    def open(cls, data_dir: Path) -> CredentialStore:
        key = load_key(data_dir)
        path = data_dir / DB_NAME
        conn = connect(path)
        try:
            migrate(conn, [_SCHEMA_V1], str(path))
        except BaseException:
            conn.close()
            raise
        os.chmod(path, 0o600)
        return cls(conn, key, path)

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------- reading

    def _data_version(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _reload(self) -> None:
        self._version = self._data_version()
        digests: dict[tuple[str, str], str] = {}
        kinds: dict[str, list[str]] = {}
        for device_id, kind, digest in self._conn.execute(
            "SELECT device_id, kind, digest FROM credentials"
        ):
            digests[(kind, device_id)] = digest
            kinds.setdefault(device_id, []).append(kind)
        access: dict[str, DeviceAccess] = {}
        for device_id, groups, disabled in self._conn.execute(
            "SELECT device_id, groups, disabled FROM identities"
        ):
            access[device_id] = DeviceAccess(
                device_id,
                frozenset(g for g in groups.split(",") if g),
                bool(disabled),
                tuple(sorted(kinds.pop(device_id, []))),
            )
        for device_id, ks in kinds.items():
            access[device_id] = DeviceAccess(device_id, kinds=tuple(sorted(ks)))
        self._digests, self._access = digests, access

    def changes(self) -> Changes:
        """Re-read the rows if another connection (the CLI) or this one
        changed them, and say what changed since the last call: devices that
        lost access (disabled, a credential removed or replaced) and whether
        any groups changed. Cheap when nothing changed (one pragma)."""
        if self._version == -1 or self._data_version() != self._version:
            self._diff()
        out, self._pending = self._pending, Changes()
        return out

    def _own_write_seen(self) -> None:
        """After a write through this connection, lookups see it at once
        (other connections' writes are picked up by :meth:`changes`)."""
        if self._version == -1:
            self._diff()

    def _diff(self) -> None:
        old_digests, old_access = self._digests, self._access
        self._reload()
        out = self._pending
        for (kind, device_id), digest in old_digests.items():
            if self._digests.get((kind, device_id)) != digest:
                out.revoked.add(device_id)
        for device_id, a in self._access.items():
            before = old_access.get(device_id)
            if a.disabled and (before is None or not before.disabled):
                out.revoked.add(device_id)
            if (before.groups if before else frozenset()) != a.groups:
                out.groups_changed = True
        for device_id, before in old_access.items():
            if device_id not in self._access and before.groups:
                out.groups_changed = True

    def access(self, device_id: str) -> DeviceAccess | None:
        self._own_write_seen()
        return self._access.get(device_id)

    def groups(self, device_id: str) -> frozenset[str]:
        self._own_write_seen()
        a = self._access.get(device_id)
        return a.groups if a is not None else frozenset()

    def is_disabled(self, device_id: str) -> bool:
        self._own_write_seen()
        a = self._access.get(device_id)
        return a is not None and a.disabled

    def has(self, kind: str, device_id: str) -> bool:
        self._own_write_seen()
        return (kind, device_id) in self._digests

    def devices(self) -> list[DeviceAccess]:
        self._own_write_seen()
        return sorted(self._access.values(), key=lambda a: a.device_id)

    def verify(self, kind: str, device_id: str, secret: bytes) -> Verdict:
        """Check ``secret`` for ``device_id``'s credential of ``kind``. Keyed
        hashes are decided here (constant-time compare); a person-chosen
        password answers NEEDS_ARGON2 (see :meth:`verify_password`)."""
        self._own_write_seen()
        a = self._access.get(device_id)
        if a is not None and a.disabled:
            return Verdict.DISABLED
        digest = self._digests.get((kind, device_id))
        if digest is None:
            return Verdict.UNKNOWN
        if len(secret) > SECRET_MAX_LENGTH:
            return Verdict.WRONG
        if digest.startswith(_HMAC_PREFIX):
            ok = hmac.compare_digest(keyed_digest(self._key, kind, device_id, secret), digest)
            return Verdict.OK if ok else Verdict.WRONG
        return Verdict.NEEDS_ARGON2

    def digest_is_password(self, kind: str, device_id: str) -> bool:
        """True when the credential is a person-chosen password (argon2)."""
        digest = self._digests.get((kind, device_id))
        return digest is not None and not digest.startswith(_HMAC_PREFIX)

    def verify_password(self, kind: str, device_id: str, secret: bytes) -> bool:
        """argon2id check of a person-chosen password (run it off the loop)."""
        digest = self._digests.get((kind, device_id))
        if digest is None:
            return False
        try:
            return bool(self._hasher.verify(digest, secret))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False

    # ------------------------------------------------------------- writing

    def _write(self, sql: str, args: tuple[object, ...]) -> int:
        cur = self._conn.execute(sql, args)
        # data_version moves only for other connections' commits: make the
        # next changes() compare rows after our own write too.
        self._version = -1
        return cur.rowcount

    def _touch(self, device_id: str) -> None:
        self._write(
            "INSERT INTO identities(device_id, updated) VALUES (?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET updated = excluded.updated",
            (device_id, time.time()),
        )

    def issue(self, device_id: str, kind: str) -> str:
        """Generate a random secret for ``device_id``'s ``kind`` credential,
        replacing any previous one (whose holders lose access); return the
        secret, which is not stored and cannot be shown again."""
        check_device_id(device_id)
        if kind not in KINDS:
            raise CredentialError(f"kind must be one of {', '.join(KINDS)}")
        secret = secrets.token_urlsafe(SECRET_BYTES)
        self._put(device_id, kind, keyed_digest(self._key, kind, device_id, secret.encode()))
        return secret

    def issue_many(self, device_ids: list[str], kind: str) -> dict[str, str]:
        """:meth:`issue` for many devices in one transaction (bulk
        provisioning: one commit, not one fsync per device)."""
        if kind not in KINDS:
            raise CredentialError(f"kind must be one of {', '.join(KINDS)}")
        for d in device_ids:
            check_device_id(d)
        out = {d: secrets.token_urlsafe(SECRET_BYTES) for d in device_ids}
        now = time.time()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(
                "INSERT OR REPLACE INTO credentials(device_id, kind, digest, created) "
                "VALUES (?, ?, ?, ?)",
                [
                    (d, kind, keyed_digest(self._key, kind, d, s.encode()), now)
                    for d, s in out.items()
                ],
            )
            self._conn.executemany(
                "INSERT INTO identities(device_id, updated) VALUES (?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET updated = excluded.updated",
                [(d, now) for d in out],
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._version = -1
        return out

    def issue_enrolment(
        self, device_id: str, kinds: list[str], groups: list[str]
    ) -> dict[str, str]:
        """:meth:`issue` for each of ``kinds`` and ``groups`` added to the
        device's, in one transaction (an enrolment with a provisioning key:
        one commit, one fsync, on the event loop's thread)."""
        check_device_id(device_id)
        if not kinds or not set(kinds) <= set(KINDS):
            raise CredentialError(f"kinds must be some of {', '.join(KINDS)}")
        out = {k: secrets.token_urlsafe(SECRET_BYTES) for k in kinds}
        digests = {k: keyed_digest(self._key, k, device_id, s.encode()) for k, s in out.items()}
        now = time.time()
        self._own_write_seen()
        before = self._access.get(device_id)
        old_groups = before.groups if before is not None else frozenset()
        new_groups = frozenset(old_groups | set(groups))
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(
                "INSERT OR REPLACE INTO credentials(device_id, kind, digest, created) "
                "VALUES (?, ?, ?, ?)",
                [(device_id, k, d, now) for k, d in digests.items()],
            )
            self._conn.execute(
                "INSERT INTO identities(device_id, groups, updated) VALUES (?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET groups = excluded.groups, "
                "updated = excluded.updated",
                (device_id, ",".join(sorted(new_groups)), now),
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        # The rows in memory follow this write directly: re-reading every row
        # after each enrolment (what other writes do, see _write) would make a
        # burst of N enrolments cost O(N^2). A replaced secret is a revocation.
        for kind, digest in digests.items():
            if (kind, device_id) in self._digests:
                self._pending.revoked.add(device_id)
            self._digests[(kind, device_id)] = digest
        if new_groups != old_groups:
            self._pending.groups_changed = True
        self._access[device_id] = DeviceAccess(
            device_id,
            new_groups,
            before.disabled if before is not None else False,
            tuple(sorted({*(before.kinds if before is not None else ()), *digests})),
        )
        return out

    def set_password(self, device_id: str, password: str) -> None:
        """A person-chosen MQTT password for ``device_id`` (argon2id)."""
        check_device_id(device_id)
        if not password:
            raise CredentialError("empty password")
        self._put(device_id, "mqtt", self._hasher.hash(password))

    def _put(self, device_id: str, kind: str, digest: str) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._write(
                "INSERT OR REPLACE INTO credentials(device_id, kind, digest, created) "
                "VALUES (?, ?, ?, ?)",
                (device_id, kind, digest, time.time()),
            )
            self._touch(device_id)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def remove(self, device_id: str, kind: str | None = None) -> int:
        """Remove ``device_id``'s credential of ``kind`` (all kinds: None);
        returns how many were removed."""
        if kind is None:
            return self._write("DELETE FROM credentials WHERE device_id = ?", (device_id,))
        return self._write(
            "DELETE FROM credentials WHERE device_id = ? AND kind = ?", (device_id, kind)
        )

    def set_disabled(self, device_id: str, disabled: bool) -> None:
        check_device_id(device_id)
        self._write(
            "INSERT INTO identities(device_id, disabled, updated) VALUES (?, ?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET disabled = excluded.disabled, "
            "updated = excluded.updated",
            (device_id, int(disabled), time.time()),
        )

    def set_groups(self, device_id: str, groups: list[str]) -> None:
        check_device_id(device_id)
        for g in groups:
            if not g or "," in g or not g.isprintable():
                raise CredentialError(f"bad group name {g!r}")
        self._write(
            "INSERT INTO identities(device_id, groups, updated) VALUES (?, ?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET groups = excluded.groups, "
            "updated = excluded.updated",
            (device_id, ",".join(sorted(set(groups))), time.time()),
        )
