"""Authentication and ACL backed by the configuration file.

Example::

    mqtt:
      listeners:
        - {bind: "0.0.0.0:1883"}                       # credentials required
        - {bind: "0.0.0.0:8883", tls: {cert: server.pem, key: server.key,
                                        ca: ca.pem, require_client_cert: true}}
      users:
        - {username: sensor-7, password_hash: "$argon2id$v=19$m=65536,t=3,p=4$..."}
        - {username: dashboard, password_hash: "$argon2id$v=19$m=65536,t=3,p=4$..."}
      acl:
        - {username: dashboard, topic: "devices/#", access: subscribe}
        - {username: "*", topic: "devices/{username}/#"}
        - {topic: "$SYS/#", access: subscribe}

:class:`ConfigAuthenticator` checks CONNECT credentials against
``mqtt.users`` (argon2 hashes made with ``edgeway passwd``), or accepts the
common name of a verified TLS client certificate, or an anonymous client when
the listener allows it. :class:`ConfigAuthoriser` applies ``mqtt.acl``: the
first rule whose user/client matchers, access and topic match decides; with no
rules at all every client may do everything except publish to ``$`` topics.

See docs/security.md for the user's view of all of this.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from edgeway.devices.auth import AuthDecision, ConnectInfo, Principal
from edgeway.devices.backoff import LoginBackoff
from edgeway.south.mqtt.config import (
    ACL_PLACEHOLDER_RE as _PLACEHOLDER_RE,
)
from edgeway.south.mqtt.config import AclRule, MqttSection, validate_acl_topic

log = logging.getLogger(__name__)

__all__ = [
    "ConfigAuthenticator",
    "ConfigAuthoriser",
    "filter_intersection",
    "filter_subsumes",
    "hash_password",
    "passwd_main",
    "validate_acl_topic",
]

# --------------------------------------------------------------------------
# passwords

HASH_WORKERS = 2
"""Threads that verify argon2 hashes. Each verification with the default
parameters holds 64 MiB and ~0.1 s of CPU; two workers bound that to 128 MiB
and the machine's two cores, so a connect storm cannot exhaust memory and the
event loop's own thread keeps a core."""

MAX_PENDING_VERIFICATIONS = 64
"""CONNECTs waiting for a hash check. At ~15-20 verifications/s on two cores,
64 queued means at most ~4 s of waiting, inside the broker's default 10 s
connect timeout; beyond it clients are told "server busy" (0x89) and retry
later instead of queueing work whose answer would arrive after they gave up."""

MAX_FAILURES = 5
"""Consecutive failed logins for one user name before it is locked out (for
1 s, doubling up to 60 s; see :mod:`edgeway.devices.backoff`)."""


def _hasher() -> argon2.PasswordHasher:
    # argon2-cffi's defaults are RFC 9106's "low memory" profile (argon2id,
    # t=3, m=64 MiB, p=4): ~0.1 s per hash here.
    return argon2.PasswordHasher()


def hash_password(password: str) -> str:
    """Hash ``password`` for ``mqtt.users[].password_hash`` (argon2id)."""
    return _hasher().hash(password)


def passwd_main(argv: list[str]) -> int:
    """``edgeway passwd [--stdin]``: read a password, print its argon2 hash.

    Interactive use prompts twice on the terminal (nothing is echoed);
    ``--stdin`` reads one line from standard input (for scripts). Exit 0 with
    the hash on stdout; 1 when the two entries differ or the password is
    empty; 2 on usage errors.
    """
    parser = argparse.ArgumentParser(
        prog="edgeway passwd",
        description="Hash a password for mqtt.users[].password_hash in the configuration.",
    )
    parser.add_argument(
        "--stdin", action="store_true", help="read the password (one line) from stdin"
    )
    args = parser.parse_args(argv)
    if args.stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password.removesuffix("\r")
    else:
        if not sys.stdin.isatty():
            print(
                "error: stdin is not a terminal; use --stdin to read the password from it",
                file=sys.stderr,
            )
            return 2
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password (again): ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 1
        if password != again:
            print("error: the passwords do not match", file=sys.stderr)
            return 1
    if not password:
        print("error: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


class ConfigAuthenticator:
    """Authenticates CONNECTs against ``mqtt.users``.

    In order:

    1. A user name is given and users are configured: the password must match
       that user's argon2 hash. An unknown name is checked against a dummy
       hash with the same parameters, so it costs the same time as a wrong
       password and user names cannot be probed by timing. After
       ``max_failures`` consecutive failures a name is locked out for 1 s,
       then 2 s, 4 s ... up to 60 s, refused (0x8A) without hashing.
    2. No user name, and the listener verified a TLS client certificate
       (``ConnectInfo.cert_subject_cn`` is set only when the listener has
       ``require_client_cert``): the certificate's common name becomes the
       user name.
    3. No user name and the listener allows anonymous clients: accepted as an
       anonymous principal. So is a client that sends a user name when no
       users are configured at all (many clients always send one); its name is
       then ignored, as it was not verified.
    4. Anything else is refused: 0x86 for a bad name or password, 0x87 when
       credentials were required and none were given.

    Hash checks run on a small thread pool, never on the event loop.
    """

    def __init__(
        self,
        mqtt: MqttSection,
        *,
        max_failures: int = MAX_FAILURES,
        max_pending: int = MAX_PENDING_VERIFICATIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._users: dict[str, str] = {u.username: u.password_hash for u in mqtt.users}
        self._max_pending = max_pending
        self._pending = 0
        self._failures = LoginBackoff(max_failures=max_failures, clock=clock)
        self._executor: ThreadPoolExecutor | None = None
        self._dummy_hash: str | None = None
        self._hasher = _hasher()

    @property
    def has_users(self) -> bool:
        """Whether ``mqtt.users`` names anyone."""
        return bool(self._users)

    def close(self) -> None:
        """Stop the hashing threads (idle ones exit at once)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def authenticate(self, info: ConnectInfo) -> AuthDecision:
        if info.username is None:
            if info.cert_subject_cn:
                return AuthDecision(True, Principal(info.client_id, info.cert_subject_cn))
            if info.allow_anonymous:
                return AuthDecision(True, Principal(info.client_id, None, anonymous=True))
            return AuthDecision(False, None, 0x87, "credentials required")
        if not self._users and info.allow_anonymous:
            log.debug(
                "no users configured: client %r accepted anonymously, user name %r ignored",
                info.client_id,
                info.username,
            )
            return AuthDecision(True, Principal(info.client_id, None, anonymous=True))
        return await self._check_password(info)

    async def _check_password(self, info: ConnectInfo) -> AuthDecision:
        username = info.username
        assert username is not None
        wait = self._failures.locked_for(username)
        if wait > 0:
            # The broker logs the refusal (rate-limited); this is the detail.
            log.debug(
                "login for user %r from %s refused: locked out for %.1f s more",
                username,
                info.remote,
                wait,
            )
            return AuthDecision(False, None, 0x8A, f"too many failed logins; retry in {wait:.0f} s")
        if self._pending >= self._max_pending:
            log.debug("login for user %r refused: %d hash checks pending", username, self._pending)
            return AuthDecision(False, None, 0x89, "server busy")
        stored = self._users.get(username)
        password = info.password if info.password is not None else b""
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(HASH_WORKERS, thread_name_prefix="argon2")
            ok = await loop.run_in_executor(self._executor, self._verify, stored, password)
        finally:
            self._pending -= 1
        if ok:
            self._failures.succeeded(username)
            return AuthDecision(True, Principal(info.client_id, username))
        lock = self._failures.failed(username)
        if lock:
            log.warning(
                "user %r locked out for %.0f s after repeated failed logins", username, lock
            )
        log.debug(
            "login for user %r from %s refused: bad user name or password", username, info.remote
        )
        return AuthDecision(False, None, 0x86, "bad user name or password")

    def _verify(self, stored: str | None, password: bytes) -> bool:
        """Runs in a worker thread."""
        if stored is None:
            stored = self._dummy()
            try:
                self._hasher.verify(stored, password + b"\x00unknown-user")
            except VerificationError:
                pass
            return False
        try:
            return bool(self._hasher.verify(stored, password))
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError) as e:
            log.error("stored password hash cannot be verified: %s", e)
            return False

    def _dummy(self) -> str:
        """A hash with the configured users' parameters, for unknown names."""
        if self._dummy_hash is None:
            hasher = self._hasher
            for h in self._users.values():
                try:
                    p = argon2.extract_parameters(h)
                except InvalidHashError:
                    continue
                hasher = argon2.PasswordHasher(
                    time_cost=p.time_cost,
                    memory_cost=p.memory_cost,
                    parallelism=p.parallelism,
                    hash_len=p.hash_len,
                    salt_len=p.salt_len,
                    type=p.type,
                )
                break
            # A benign race: two threads may both compute it; either is fine.
            self._dummy_hash = hasher.hash("edgeway-dummy-password")
        return self._dummy_hash


# --------------------------------------------------------------------------
# topic filters


def _split(topic: str) -> list[str]:
    return topic.split("/")


def _dollar_conflict(a: list[str], b: list[str]) -> bool:
    """MQTT 4.7.2: a filter starting with a wildcard does not match topics
    starting with ``$``. True when one side is a ``$`` literal and the other
    starts with a wildcard."""
    a0, b0 = a[0], b[0]
    return (a0.startswith("$") and b0 in ("+", "#")) or (b0.startswith("$") and a0 in ("+", "#"))


def filter_subsumes(outer: str, inner: str) -> bool:
    """True when every topic matched by filter ``inner`` is matched by
    filter ``outer``. A topic name (no wildcards) is a filter matching only
    itself, so ``filter_subsumes(f, topic)`` is plain matching."""
    o, i = _split(outer), _split(inner)
    if _dollar_conflict(o, i):
        return False
    return _subsumes(o, i)


def _subsumes(o: list[str], i: list[str]) -> bool:
    n = 0
    while True:
        if n == len(o):
            return n == len(i)
        if o[n] == "#":
            # '#' matches any remainder, including none ("a/#" matches "a").
            return True
        if n == len(i):
            return False
        if i[n] == "#":
            # inner matches arbitrarily deep (and the parent); only '#' covers that.
            return False
        if i[n] == "+":
            if o[n] != "+":
                return False
        elif o[n] != "+" and o[n] != i[n]:
            return False
        n += 1


def filter_intersection(a: str, b: str) -> str | None:
    """The filter matching exactly the topics both ``a`` and ``b`` match, or
    ``None`` when no topic matches both. (With ``+``/``#`` the intersection of
    two filters is always a single filter.)"""
    la, lb = _split(a), _split(b)
    if _dollar_conflict(la, lb):
        return None
    out = _intersect(la, lb)
    return None if out is None else "/".join(out)


def _intersect(a: list[str], b: list[str]) -> list[str] | None:
    out: list[str] = []
    n = 0
    while True:
        a_end, b_end = n == len(a), n == len(b)
        if a_end and b_end:
            return out
        if a_end or b_end:
            other = b if a_end else a
            # One side matched exactly the parent level; the other only
            # matches it too if what remains is a lone '#'.
            return out if other[n] == "#" and n == len(other) - 1 else None
        x, y = a[n], b[n]
        if x == "#":
            return out + b[n:]
        if y == "#":
            return out + a[n:]
        if x == "+":
            out.append(y)
        elif y == "+" or x == y:
            out.append(x)
        else:
            return None
        n += 1


# --------------------------------------------------------------------------
# ACL

# Sentinels returned by ConfigAuthoriser._pattern (never valid filters, as
# they contain NUL), compared by identity.
_SKIP = "\x00skip"
_FAIL_CLOSED = "\x00fail-closed"
_UNSAFE = ("+", "#", "/", "\x00")

CACHE_MAX = 32_768
"""Cached (principal, topic) decisions per kind (publish, subscribe). Devices
publish to a handful of topics each, so this holds several per device for
10,000 devices; a miss only costs a walk over the rules (microseconds). With
CACHE_TOPIC_MAX it bounds the cache to ~32k * (256 + ~250) bytes = ~16 MiB."""
CACHE_TOPIC_MAX = 256
"""Longer topics (allowed up to 64 KiB by MQTT) are decided but not cached, so
a client cannot fill memory with long unique topic names."""


@dataclass(slots=True, frozen=True)
class _Rule:
    username: re.Pattern[str] | None
    group: str | None
    client_id: re.Pattern[str] | None
    topic: str
    has_placeholders: bool
    publish: bool
    subscribe: bool
    allow: bool


def _glob(pattern: str | None) -> re.Pattern[str] | None:
    """``*`` matches any run of characters; everything else is literal."""
    if pattern is None:
        return None
    return re.compile("^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$", re.DOTALL)


class ConfigAuthoriser:
    """Applies ``mqtt.acl`` to PUBLISH and SUBSCRIBE.

    A rule applies to a client when its ``username`` matcher matches (absent:
    everyone, anonymous clients included; ``*`` and other ``*`` globs: only
    clients with a verified user name) and its ``client_id`` matcher matches
    (absent: any; ``*`` globs allowed), and its ``access`` covers the action.
    The first applicable rule whose topic matches decides.

    Publish: the topic name matches the rule's filter.

    Subscribe: the filter is granted when some topic it can match is
    readable, that is when an allow rule overlaps it and that overlap is not
    wholly covered by an earlier deny rule; a deny rule covering the whole
    filter refuses it. A granted filter may still match denied topics (``#``
    with one deny rule anywhere): those messages are dropped one by one where
    they leave for the client, where the broker asks :meth:`may_subscribe`
    again with the topic name (for a topic name this is exactly "the first
    matching rule decides"). This is what Mosquitto and EMQX do; refusing
    the whole filter would make ``#`` useless under any deny rule. When only
    the union of several deny rules covers a filter it is granted and
    delivers nothing, which is harmless.

    Placeholders: ``{client_id}`` and ``{username}`` are replaced by the
    client's values. A value containing ``+``, ``#``, ``/`` or NUL, or an
    empty one, would widen or shift the pattern (client id ``+`` turning
    ``devices/{client_id}/#`` into ``devices/+/#``), so for such a client
    allow rules using that placeholder never match and deny rules using it
    match every topic (fail closed). A rule with ``{username}`` does not
    apply to anonymous clients, which have no user name.

    With no rules at all: everything is allowed except publishing to topics
    starting with ``$`` (reserved for the broker, e.g. ``$SYS``). With rules:
    what no rule allows is denied.
    """

    __slots__ = ("_pub_cache", "_sub_cache", "_warned", "cache_max", "rules")

    def __init__(
        self, mqtt: MqttSection | Sequence[AclRule], *, cache_max: int = CACHE_MAX
    ) -> None:
        acl = mqtt.acl if isinstance(mqtt, MqttSection) else list(mqtt)
        self.rules: list[_Rule] = []
        for n, r in enumerate(acl):
            try:
                validate_acl_topic(r.topic)
            except ValueError as e:
                raise ValueError(f"mqtt.acl[{n}].topic: {e} (got {r.topic!r})") from None
            self.rules.append(
                _Rule(
                    username=_glob(r.username if r.username is not None else r.device),
                    group=r.group,
                    client_id=_glob(r.client_id),
                    topic=r.topic,
                    has_placeholders=bool(_PLACEHOLDER_RE.search(r.topic)),
                    publish=r.access in ("publish", "all"),
                    subscribe=r.access in ("subscribe", "all"),
                    allow=r.allow,
                )
            )
        self.cache_max = cache_max
        self._pub_cache: dict[tuple[Principal, str], bool] = {}
        self._sub_cache: dict[tuple[Principal, str], bool] = {}
        self._warned: set[str] = set()

    # The two methods of the Authoriser protocol -------------------------

    def may_publish(self, principal: Principal, topic: str) -> bool:
        key = (principal, topic)
        hit = self._pub_cache.get(key)
        if hit is not None:
            return hit
        decision = self._decide_publish(principal, topic)
        self._remember(self._pub_cache, key, decision)
        return decision

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        key = (principal, topic_filter)
        hit = self._sub_cache.get(key)
        if hit is not None:
            return hit
        decision = self._decide_subscribe(principal, topic_filter)
        self._remember(self._sub_cache, key, decision)
        return decision

    # ---------------------------------------------------------------------

    def _remember(
        self, cache: dict[tuple[Principal, str], bool], key: tuple[Principal, str], v: bool
    ) -> None:
        if len(key[1]) > CACHE_TOPIC_MAX:
            return
        if len(cache) >= self.cache_max:
            # FIFO eviction: a hit stays one dict lookup (no LRU bookkeeping);
            # an evicted hot entry costs one rule walk to come back.
            del cache[next(iter(cache))]
        cache[key] = v

    def invalidate(self) -> None:
        """Forget every cached decision (the rules or an identity changed)."""
        self._pub_cache.clear()
        self._sub_cache.clear()

    def cache_size(self) -> int:
        """Entries in both decision caches (for tests and metrics)."""
        return len(self._pub_cache) + len(self._sub_cache)

    def _decide_publish(self, principal: Principal, topic: str) -> bool:
        if not self.rules:
            return not topic.startswith("$")
        for rule in self.rules:
            if not rule.publish or not self._applies(rule, principal):
                continue
            pattern = self._pattern(rule, principal)
            if pattern is _SKIP:
                continue
            if pattern is _FAIL_CLOSED:
                if rule.allow:
                    continue
                return False
            if filter_subsumes(pattern, topic):
                return rule.allow
        return False

    def _decide_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        if not self.rules:
            return True
        denied_so_far: list[str] = []
        for rule in self.rules:
            if not rule.subscribe or not self._applies(rule, principal):
                continue
            pattern = self._pattern(rule, principal)
            if pattern is _SKIP:
                continue
            if pattern is _FAIL_CLOSED:
                if rule.allow:
                    continue
                return False
            overlap = filter_intersection(pattern, topic_filter)
            if overlap is None:
                continue
            if not rule.allow:
                if filter_subsumes(pattern, topic_filter):
                    return False  # every topic of the filter is denied from here on
                denied_so_far.append(pattern)
            elif not any(filter_subsumes(d, overlap) for d in denied_so_far):
                # Some topic of the filter is readable: the subscription is
                # granted and what it must not see is dropped per message at
                # delivery (MqttConnection._may_read), as Mosquitto and EMQX do.
                return True
        return False

    def _applies(self, rule: _Rule, principal: Principal) -> bool:
        if rule.username is not None:
            if principal.anonymous or principal.username is None:
                return False
            if not rule.username.match(principal.username):
                return False
        if rule.group is not None and rule.group not in principal.groups:
            return False
        if rule.client_id is not None and not rule.client_id.match(principal.client_id):
            return False
        return True

    def _pattern(self, rule: _Rule, principal: Principal) -> str:
        """The rule's topic with placeholders filled in; ``_SKIP`` when the rule
        names a user name the client does not have; ``_FAIL_CLOSED`` when a
        value is unsafe (see the class docstring)."""
        if not rule.has_placeholders:
            return rule.topic
        unsafe = False

        def fill(m: re.Match[str]) -> str:
            nonlocal unsafe
            name = m.group(1)
            value = principal.client_id if name == "client_id" else principal.username
            # {device_id} is {username}: the verified name.
            if value is None or value == "" or any(c in value for c in _UNSAFE):
                unsafe = True
                return ""
            return value

        pattern = _PLACEHOLDER_RE.sub(fill, rule.topic)
        if unsafe:
            if ("{username}" in rule.topic or "{device_id}" in rule.topic) and (
                principal.anonymous or principal.username is None
            ):
                # Anonymous clients have no user name: the rule is about
                # some user's own topics, so it does not apply to them.
                return _SKIP
            key = f"{principal.client_id}\x00{principal.username}"
            # Warn once per client; the set is capped so hostile ids cannot grow it.
            if key not in self._warned and len(self._warned) < 1000:
                self._warned.add(key)
                log.warning(
                    "client %r (user %r): id or user name contains '+', '#', '/' or is empty; "
                    "ACL rules with placeholders deny it",
                    principal.client_id,
                    principal.username,
                )
            return _FAIL_CLOSED
        return pattern
