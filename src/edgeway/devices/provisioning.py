"""Auto-provisioning: a device enrols itself with a provisioning key.

Local and offline, in the spirit of AWS IoT fleet provisioning and Azure
DPS: an operator makes a key for a group of devices (a factory batch, a
site) and puts it in their firmware; each device presents it once, over
MQTT or HTTP, and receives credentials of its own (see
docs/devices.md#auto-provisioning)::

    keys = ProvisioningKeys.open(data_dir)
    secret = keys.add("site-a", groups=["site-a"], template={"type": "pump"},
                      id_pattern="pump-*", rate_per_minute=30, max_uses=500)
    # shown once: the device presents "site-a:" + secret
    provisioner = Provisioner(keys, credential_store, data_dir)
    result = await provisioner.enrol("site-a", secret, {"device_id": "pump-17"},
                                     remote="10.0.0.7", protocol="http")
    result.credentials      # {"mqtt": "<its own secret>"}, never stored in clear

Keys live in ``DATA_DIR/provisioning.db``: per key its id, a keyed hash of
its secret (HMAC-SHA256 under the gateway key, as device secrets: a copy of
the file gives nothing to guess against), the groups and template the new
device joins, an optional device-id pattern, a rate limit, an optional
expiry and maximum number of uses, and whether an id that exists already may
enrol again (``reprovision``). ``edgeway provisioning`` and the admin API
change them; the gateway re-reads the file when another process changed it
(``PRAGMA data_version``, as the credential store).

Rotation: :meth:`ProvisioningKeys.rotate` makes a new secret; the old one
keeps working for a grace period (:data:`DEFAULT_GRACE`, one day, chosen per
rotation) so devices flashed with it but not yet switched on can still enrol;
after it, only the new one. Revocation refuses the key at once (both
secrets); devices that enrolled with it keep their own credentials.

What an enrolment checks, in this order, each refusal counted and logged
(rate-limited): the key's secret (failed attempts back off per key id and
per source address like logins: :mod:`edgeway.devices.backoff`), revoked,
expired, uses left, the key's rate limit (a token bucket per key: at most
``rate_per_minute`` enrolments a minute, one minute's worth at once), the
device id (the registry's rules: no ``/ + #``, spaces or control
characters; then the key's glob pattern), whether it exists (refused unless
the key allows re-provisioning; a disabled device is always refused, or an
enrolment would enable it again), and that no other enrolment of the same id
is in progress. Then: registered in the registry (groups, type, tags,
metadata with ``provisioned_by``), credentials issued, ACL groups set, an
audit entry written (who: ``provisioning-key:ID``), and the registry's
``registered`` lifecycle event.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from edgeway.devices.backoff import LoginBackoff, address_key
from edgeway.devices.credentials import (
    KINDS,
    SECRET_BYTES,
    SECRET_MAX_LENGTH,
    CredentialStore,
    keyed_digest,
    load_key,
)
from edgeway.logs import EventLog
from edgeway.storage.sqlite import connect, migrate

if TYPE_CHECKING:
    from edgeway.devices.presence import DevicePresence
    from edgeway.devices.registry import DeviceRegistry

__all__ = [
    "DB_NAME",
    "DEFAULT_GRACE",
    "Enrolment",
    "Provisioner",
    "ProvisioningError",
    "ProvisioningKey",
    "ProvisioningKeys",
    "split_presented",
]

log = logging.getLogger(__name__)

DB_NAME = "provisioning.db"
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A key id: short, printable, no ``:`` (the device presents ``ID:SECRET``)."""
DEFAULT_GRACE = 86_400.0
"""Seconds the old secret keeps working after a rotation, unless the operator
says otherwise (``--grace``; 0: at once). One day: long enough for devices
flashed with the old key and switched on that day, short enough that a leaked
key stops working soon after it is replaced."""
MAX_GRACE = 30 * 86_400.0
DEFAULT_RATE = 60.0
"""Enrolments per minute per key unless chosen: one a second, far above a
technician switching devices on, far below what bulk guessing of ids needs."""
MAX_RATE = 10_000.0
MAX_PATTERN = 128
MAX_USES = 1_000_000_000
"""Far above any batch; keeps the count inside SQLite's integers."""
MAX_LIFETIME = 10 * 365 * 86_400.0
"""A key's expiry is at most ten years away (a finite number SQLite and JSON keep)."""
MAX_PENDING = 256
"""Enrolments being worked on at once, all keys together (each holds a few
hundred bytes and waits on two writes): beyond it the answer is ``busy``."""
MAX_FAILURES = 5
"""Wrong secrets per key id, and per source address, before a lockout (1 s
doubling to 60 s, as logins: :mod:`edgeway.devices.backoff`)."""
GENERATED_ID_PREFIX = "dev-"
PROVISIONING_WHO = "provisioning-key:"
LOG_LINES_PER_SECOND = 0.2
LOG_BURST = 5

_SCHEMA_V1 = """
CREATE TABLE provisioning_keys (
    key_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    old_digest TEXT,
    old_until REAL,
    groups TEXT NOT NULL DEFAULT '[]',
    template TEXT NOT NULL DEFAULT '{}',
    id_pattern TEXT,
    rate_per_minute REAL NOT NULL,
    expires REAL,
    max_uses INTEGER,
    uses INTEGER NOT NULL DEFAULT 0,
    reprovision INTEGER NOT NULL DEFAULT 0,
    revoked REAL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""
MIGRATIONS = [_SCHEMA_V1]


class ProvisioningError(Exception):
    """A request refused. ``code`` is stable (the API's and the device's
    answer); ``status`` the HTTP status that goes with it."""

    STATUS = {
        "invalid": 400,
        "unauthorized": 401,
        "locked": 429,
        "rate_limited": 429,
        "busy": 503,
        "not_found": 404,
        "exists": 409,
        "forbidden": 403,
    }

    def __init__(self, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self.STATUS.get(self.code, 400)


@dataclass(slots=True, frozen=True)
class ProvisioningKey:
    """One key as stored, without its secret."""

    key_id: str
    groups: tuple[str, ...]
    template: dict[str, Any]
    id_pattern: str | None
    rate_per_minute: float
    expires: float | None
    max_uses: int | None
    uses: int
    reprovision: bool
    revoked: float | None
    old_until: float | None
    created: float
    updated: float

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.template.get("kinds") or ("mqtt",))

    def state(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "used_up"
        return "active"

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "state": self.state(time.time() if now is None else now),
            "groups": list(self.groups),
            "template": self.template,
            "id_pattern": self.id_pattern,
            "rate_per_minute": self.rate_per_minute,
            "expires": self.expires,
            "max_uses": self.max_uses,
            "uses": self.uses,
            "reprovision": self.reprovision,
            "revoked": self.revoked,
            "old_secret_until": self.old_until,
            "created": self.created,
            "updated": self.updated,
        }


def split_presented(value: str) -> tuple[str, str]:
    """``ID:SECRET`` -> (id, secret); ProvisioningError ``invalid`` otherwise."""
    key_id, sep, secret = value.partition(":")
    if not sep or not key_id or not secret:
        raise ProvisioningError("invalid", "a provisioning key is presented as ID:SECRET")
    return key_id, secret


def check_template(template: Mapping[str, Any]) -> dict[str, Any]:
    """A key's template, checked: ``type``, ``tags``, ``metadata`` (the
    registry's rules) and ``kinds`` (which credentials a device gets)."""
    from edgeway.devices.registry import DeviceError, parse_fields

    unknown = set(template) - {"type", "tags", "metadata", "kinds"}
    if unknown:
        raise ProvisioningError("invalid", f"template: unknown fields {', '.join(sorted(unknown))}")
    fields = {k: v for k, v in template.items() if k != "kinds"}
    try:
        out: dict[str, Any] = parse_fields(fields, partial=True)
    except DeviceError as e:
        raise ProvisioningError("invalid", f"template: {e}") from None
    if "tags" in out:
        out["tags"] = list(out["tags"])
    kinds = template.get("kinds", ["mqtt"])
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    if (
        not isinstance(kinds, list)
        or not kinds
        or not all(isinstance(k, str) for k in kinds)
        or not set(kinds) <= set(KINDS)
    ):
        raise ProvisioningError("invalid", f"template.kinds: a list of {', '.join(KINDS)}")
    out["kinds"] = sorted(set(kinds))
    return out


def check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    from edgeway.devices.registry import DeviceError, parse_fields

    try:
        return tuple(parse_fields({"groups": list(groups)}, partial=True).get("groups", ()))
    except DeviceError as e:
        raise ProvisioningError("invalid", str(e)) from None


def _pattern(value: str | None) -> re.Pattern[str] | None:
    """A key's id pattern: a glob (``*``, ``?``, ``[...]``), matched whole
    and case-sensitively. Not a regular expression: a device chooses the id a
    pattern is run against, and a glob cannot backtrack catastrophically."""
    if value is None:
        return None
    return re.compile(fnmatch.translate(value))


def _row_key(row: Sequence[Any]) -> ProvisioningKey:
    return ProvisioningKey(
        key_id=row[0],
        groups=tuple(orjson.loads(row[1])),
        template=orjson.loads(row[2]),
        id_pattern=row[3],
        rate_per_minute=float(row[4]),
        expires=row[5],
        max_uses=row[6],
        uses=int(row[7]),
        reprovision=bool(row[8]),
        revoked=row[9],
        old_until=row[10],
        created=row[11],
        updated=row[12],
    )


_COLS = (
    "key_id, groups, template, id_pattern, rate_per_minute, expires, max_uses, uses, "
    "reprovision, revoked, old_until, created, updated"
)


class ProvisioningKeys:
    """The keys of one data directory (``provisioning.db``), cached in memory
    and re-read when another process changed the file. Written on the
    caller's thread: writes are rare (an operator; one ``uses`` bump per
    enrolment, which the rate limit bounds)."""

    def __init__(self, conn: sqlite3.Connection, hmac_key: bytes, path: Path) -> None:
        self._conn = conn
        self._hmac_key = hmac_key
        self.path = path
        self._version = -1
        self._keys: dict[str, ProvisioningKey] = {}
        self._digests: dict[str, tuple[str, str | None]] = {}

    @classmethod
    def open(cls, data_dir: Path) -> ProvisioningKeys:
        hmac_key = load_key(data_dir)
        path = data_dir / DB_NAME
        conn = connect(path)
        try:
            migrate(conn, MIGRATIONS, str(path))
        except BaseException:
            conn.close()
            raise
        os.chmod(path, 0o600)
        return cls(conn, hmac_key, path)

    def close(self) -> None:
        self._conn.close()

    def _fresh(self) -> None:
        version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        if version == self._version:
            return
        keys: dict[str, ProvisioningKey] = {}
        digests: dict[str, tuple[str, str | None]] = {}
        for row in self._conn.execute(f"SELECT {_COLS}, digest, old_digest FROM provisioning_keys"):
            key = _row_key(row)
            keys[key.key_id] = key
            digests[key.key_id] = (row[13], row[14])
        self._keys, self._digests, self._version = keys, digests, version

    def _digest(self, key_id: str, secret: str) -> str:
        return keyed_digest(self._hmac_key, "provisioning", key_id, secret.encode())

    def get(self, key_id: str) -> ProvisioningKey | None:
        self._fresh()
        return self._keys.get(key_id)

    def list(self) -> list[ProvisioningKey]:
        self._fresh()
        return sorted(self._keys.values(), key=lambda k: k.key_id)

    def verify(self, key_id: str, secret: str, now: float) -> ProvisioningKey | None:
        """The key when ``secret`` is its current secret, or its previous one
        within the grace period after a rotation; None otherwise (constant
        time per comparison)."""
        import hmac

        self._fresh()
        key = self._keys.get(key_id)
        digests = self._digests.get(key_id)
        if key is None or digests is None or len(secret) > SECRET_MAX_LENGTH:
            return None
        given = self._digest(key_id, secret)
        if hmac.compare_digest(given, digests[0]):
            return key
        old = digests[1]
        if old is not None and key.old_until is not None and now < key.old_until:
            if hmac.compare_digest(given, old):
                return key
        return None

    # ------------------------------------------------------------- writing

    def _commit(self, sql: str, args: tuple[object, ...]) -> int:
        cur = self._conn.execute(sql, args)
        self._version = -1
        return cur.rowcount

    def add(
        self,
        key_id: str,
        *,
        groups: Sequence[str] = (),
        template: Mapping[str, Any] | None = None,
        id_pattern: str | None = None,
        rate_per_minute: float = DEFAULT_RATE,
        expires: float | None = None,
        max_uses: int | None = None,
        reprovision: bool = False,
    ) -> str:
        """Make a key; returns its secret (shown once, never stored)."""
        if not KEY_ID.fullmatch(key_id):
            raise ProvisioningError(
                "invalid", "key id: 1 to 64 letters, digits, _ . - (not first), no ':'"
            )
        tmpl = check_template(template or {})
        grp = check_groups(groups)
        if id_pattern is not None and (
            not id_pattern or len(id_pattern) > MAX_PATTERN or not id_pattern.isprintable()
        ):
            raise ProvisioningError(
                "invalid", f"id pattern: 1 to {MAX_PATTERN} printable characters"
            )
        if not 0 < rate_per_minute <= MAX_RATE:
            raise ProvisioningError("invalid", f"rate: above 0, at most {MAX_RATE:g} a minute")
        if max_uses is not None and not 1 <= max_uses <= MAX_USES:
            raise ProvisioningError("invalid", f"max uses: 1 to {MAX_USES:,}")
        if (
            expires is not None
            and not time.time() - MAX_LIFETIME < expires < time.time() + MAX_LIFETIME
        ):
            raise ProvisioningError("invalid", "expires: within ten years")
        secret = secrets.token_urlsafe(SECRET_BYTES)
        now = time.time()
        try:
            self._commit(
                "INSERT INTO provisioning_keys(key_id, digest, groups, template, id_pattern, "
                "rate_per_minute, expires, max_uses, reprovision, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id, self._digest(key_id, secret), orjson.dumps(list(grp)).decode(),
                    orjson.dumps(tmpl).decode(), id_pattern, float(rate_per_minute), expires,
                    max_uses, int(reprovision), now, now,
                ),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise ProvisioningError("exists", f"provisioning key {key_id!r} exists") from None
        return secret

    def rotate(self, key_id: str, grace: float = DEFAULT_GRACE) -> str:
        """A new secret for ``key_id``; the current one keeps working for
        ``grace`` seconds (0: stops now). Returns the new secret (shown once)."""
        if not 0 <= grace <= MAX_GRACE:
            raise ProvisioningError("invalid", f"grace: 0 to {MAX_GRACE:g} seconds")
        key = self.get(key_id)
        if key is None:
            raise ProvisioningError("not_found", f"no provisioning key {key_id!r}")
        if key.revoked is not None:
            raise ProvisioningError("invalid", f"provisioning key {key_id!r} is revoked")
        secret = secrets.token_urlsafe(SECRET_BYTES)
        now = time.time()
        self._commit(
            "UPDATE provisioning_keys SET old_digest = CASE WHEN ? > 0 THEN digest END, "
            "old_until = CASE WHEN ? > 0 THEN ? END, digest = ?, updated = ? WHERE key_id = ?",
            (grace, grace, now + grace, self._digest(key_id, secret), now, key_id),
        )
        return secret

    def revoke(self, key_id: str) -> None:
        """Refuse the key from now on (both secrets); devices it enrolled keep
        their own credentials."""
        now = time.time()
        n = self._commit(
            "UPDATE provisioning_keys SET revoked = ?, old_digest = NULL, old_until = NULL, "
            "updated = ? WHERE key_id = ? AND revoked IS NULL",
            (now, now, key_id),
        )
        if n == 0 and self.get(key_id) is None:
            raise ProvisioningError("not_found", f"no provisioning key {key_id!r}")

    def take_use(self, key_id: str) -> bool:
        """Count one enrolment; False when the key has no use left (one
        statement: two gateways' processes cannot both take the last use)."""
        return (
            self._commit(
                "UPDATE provisioning_keys SET uses = uses + 1 WHERE key_id = ? "
                "AND (max_uses IS NULL OR uses < max_uses)",
                (key_id,),
            )
            == 1
        )

    def give_back_use(self, key_id: str) -> None:
        """An enrolment that took a use failed after all."""
        self._commit(
            "UPDATE provisioning_keys SET uses = uses - 1 WHERE key_id = ? AND uses > 0", (key_id,)
        )


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass(slots=True, frozen=True)
class Enrolment:
    """What a device receives, once."""

    device_id: str
    credentials: dict[str, str]
    """Kind (mqtt, http, coap) -> its secret: the MQTT password with the
    device id as user name, the HTTP bearer token, the CoAP ``token=``."""
    groups: tuple[str, ...]
    reprovisioned: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "credentials": self.credentials,
            "groups": list(self.groups),
            "reprovisioned": self.reprovisioned,
        }


@dataclass(slots=True)
class ProvisioningStats:
    enrolled: int = 0
    refused: dict[str, int] = field(default_factory=dict)


class Provisioner:
    """Enrolments over any protocol (see the module docstring)."""

    def __init__(
        self,
        keys: ProvisioningKeys,
        store: CredentialStore,
        data_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        audit: bool = True,
    ) -> None:
        self.keys = keys
        self.store = store
        self.data_dir = data_dir
        self.clock = clock
        self.registry: DeviceRegistry | None = None
        """Set when the registry is on (``DeviceService.link_access``)."""
        self.presence: DevicePresence | None = None
        self.audit = audit
        self.stats = ProvisioningStats()
        self.by_key = LoginBackoff(max_failures=MAX_FAILURES)
        self.by_address = LoginBackoff(max_failures=MAX_FAILURES)
        self._buckets: dict[str, _Bucket] = {}
        self._in_progress: set[str] = set()
        self._events = EventLog(log, per_second=LOG_LINES_PER_SECOND, burst=LOG_BURST)

    def _refuse(self, code: str, message: str, key_id: str, remote: str, **kw: Any) -> NoReturn:
        self.stats.refused[code] = self.stats.refused.get(code, 0) + 1
        self._events.emit(
            "provisioning_refused",
            logging.WARNING,
            "provisioning with key %r from %s refused: %s",
            key_id[:64],
            remote,
            message,
        )
        raise ProvisioningError(code, message, **kw)

    def check_key(self, key_id: str, secret: str, remote: str) -> ProvisioningKey:
        """The key, if ``secret`` proves it and it may be used now; counts a
        failure against the key id and the address otherwise."""
        host = address_key(remote)
        if not KEY_ID.fullmatch(key_id):
            # Not a key id at all: counted against the address only, so the
            # per-key table never holds attacker-made strings (64 KiB user names).
            wait = self.by_address.locked_for(host)
            if wait <= 0:
                self.by_address.failed(host)
            self._refuse("unauthorized", "unknown provisioning key or wrong secret", "?", remote)
        wait = max(self.by_key.locked_for(key_id), self.by_address.locked_for(host))
        if wait > 0:
            self._refuse(
                "locked", f"too many failed attempts; retry in {wait:.0f} s", key_id, remote,
                retry_after=wait,
            )  # fmt: skip
        now = self.clock()
        key = self.keys.verify(key_id, secret, now)
        if key is None:
            self.by_key.failed(key_id)
            self.by_address.failed(host)
            self._refuse("unauthorized", "unknown provisioning key or wrong secret", key_id, remote)
        assert key is not None
        self.by_key.succeeded(key_id)
        state = key.state(now)
        if state != "active":
            self._refuse(
                "forbidden", f"provisioning key is {state.replace('_', ' ')}", key_id, remote
            )
        return key

    def _rate_ok(self, key: ProvisioningKey) -> bool:
        now = self.clock()
        per_second = key.rate_per_minute / 60.0
        burst = max(1.0, key.rate_per_minute)
        b = self._buckets.get(key.key_id)
        if b is None:
            b = self._buckets[key.key_id] = _Bucket(burst, now)
        b.tokens = min(burst, b.tokens + (now - b.stamp) * per_second)
        b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        return False

    def _device_id(self, key: ProvisioningKey, body: Mapping[str, Any], remote: str) -> str:
        from edgeway.devices.registry import DEVICE_ID

        device_id = body.get("device_id")
        if device_id is None:
            device_id = GENERATED_ID_PREFIX + secrets.token_hex(8)
        if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
            self._refuse(
                "invalid",
                "device_id: 1 to 128 characters: letters, digits and _ . : @ - "
                "(not first), no spaces or / + #",
                key.key_id,
                remote,
            )
        assert isinstance(device_id, str)
        pattern = _pattern(key.id_pattern)
        if pattern is not None and not pattern.fullmatch(device_id):
            self._refuse(
                "forbidden", "device_id does not match the key's id pattern", key.key_id, remote
            )
        return device_id

    async def enrol(
        self,
        key_id: str,
        secret: str,
        body: Mapping[str, Any],
        *,
        remote: str,
        protocol: str,
        proved: bool = False,
    ) -> Enrolment:
        """Enrol the device ``body`` names (``device_id``; absent: one is
        made up) with key ``key_id`` and its ``secret``; ``proved`` when the
        secret was checked already (an MQTT connection proved it at
        CONNECT). Raises :class:`ProvisioningError`."""
        unknown = set(body) - {"device_id", "kinds"}
        if unknown:
            self._refuse("invalid", f"unknown fields: {', '.join(sorted(unknown))}", key_id, remote)
        if not proved:
            key = self.check_key(key_id, secret, remote)
        else:
            found = self.keys.get(key_id)  # revoked or used up since the CONNECT?
            if found is None or found.state(self.clock()) != "active":
                self._refuse("forbidden", "provisioning key is no longer active", key_id, remote)
            key = found
        kinds = key.kinds
        asked = body.get("kinds")
        if asked is not None:
            if (
                not isinstance(asked, list)
                or not asked
                or not all(isinstance(k, str) for k in asked)
                or not set(asked) <= set(kinds)
            ):
                self._refuse(
                    "invalid", f"kinds: a list of the key's kinds ({', '.join(kinds)})",
                    key_id, remote,
                )  # fmt: skip
            kinds = tuple(sorted(set(asked)))
        device_id = self._device_id(key, body, remote)
        if len(self._in_progress) >= MAX_PENDING:
            self._refuse("busy", "too many enrolments at once; retry later", key_id, remote)
        if device_id in self._in_progress:
            self._refuse("exists", f"device {device_id!r} is being provisioned", key_id, remote)
        if not self._rate_ok(key):
            self._refuse(
                "rate_limited", f"over {key.rate_per_minute:g} enrolments a minute", key_id,
                remote, retry_after=60.0 / key.rate_per_minute,
            )  # fmt: skip
        self._in_progress.add(device_id)
        try:
            return await self._enrol(key, device_id, kinds, remote, protocol)
        finally:
            self._in_progress.discard(device_id)

    async def _enrol(
        self,
        key: ProvisioningKey,
        device_id: str,
        kinds: Sequence[str],
        remote: str,
        protocol: str,
    ) -> Enrolment:
        from edgeway.devices.registry import DeviceError

        access = self.store.access(device_id)
        if access is not None and access.disabled:
            self._refuse("forbidden", f"device {device_id!r} is disabled", key.key_id, remote)
        registry = self.registry
        flags = await registry.flags(device_id) if registry is not None else None
        if flags is not None and flags.registered and not flags.enabled:
            self._refuse("forbidden", f"device {device_id!r} is disabled", key.key_id, remote)
        exists = bool(access is not None and access.kinds) or bool(
            flags is not None and flags.registered
        )
        if exists and not key.reprovision:
            self._refuse("exists", f"device {device_id!r} exists", key.key_id, remote)
        if not self.keys.take_use(key.key_id):
            self._refuse("forbidden", "provisioning key is used up", key.key_id, remote)
        try:
            if registry is not None and not (flags is not None and flags.registered):
                fields: dict[str, Any] = {
                    "id": device_id,
                    "groups": list(key.groups),
                    "metadata": {**key.template.get("metadata", {}), "provisioned_by": key.key_id},
                }
                for name in ("type", "tags"):
                    if name in key.template:
                        fields[name] = key.template[name]
                try:
                    await registry.add(fields)
                except DeviceError as e:
                    if e.code != "exists" or not key.reprovision:
                        raise ProvisioningError(
                            "exists" if e.code == "exists" else "invalid", str(e)
                        ) from None
        except BaseException:
            self.keys.give_back_use(key.key_id)
            raise
        credentials = self.store.issue_enrolment(device_id, list(kinds), list(key.groups))
        self.stats.enrolled += 1
        if exists and self.presence is not None:
            self.presence.event(device_id, "registered", reason="re-provisioned", protocol=protocol)
        log.info(
            "device %r provisioned with key %r over %s from %s%s",
            device_id, key.key_id, protocol, remote, " (again)" if exists else "",
        )  # fmt: skip
        if self.audit:
            detail: dict[str, Any] = {
                "protocol": protocol,
                "kinds": list(kinds),
                "groups": list(key.groups),
            }
            if exists:
                detail["reprovisioned"] = True
            await self._audit(key.key_id, device_id, remote, detail)
        return Enrolment(device_id, credentials, key.groups, exists)

    async def _audit(
        self, key_id: str, device_id: str, remote: str, detail: dict[str, Any]
    ) -> None:
        from edgeway.audit import record_offline

        try:
            await asyncio.to_thread(
                record_offline,
                self.data_dir,
                who=PROVISIONING_WHO + key_id,
                action="device provision",
                target=device_id,
                source=remote,
                detail=detail,
            )
        except Exception:
            # The device has its credentials; a missing audit line must be seen.
            log.exception("provisioning of %r: the audit entry could not be written", device_id)
