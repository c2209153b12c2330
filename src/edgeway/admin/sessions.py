"""Browser sessions for the HMI: the cookie, CSRF, and the log-in rate limit.

A successful ``POST /api/login`` creates a session: a 256-bit random id sent
as the ``edgeway_session`` cookie (``HttpOnly``: no script can read it;
``SameSite=Strict``: no other site's page makes the browser send it;
``Secure`` when the admin listener serves HTTPS), and a separate CSRF
secret the page's script gets in the log-in answer and from
``GET /api/session``. A write (anything but GET/HEAD/OPTIONS)
authenticated by the cookie must carry that secret in ``X-CSRF-Token``:
SameSite already stops cross-site requests in current browsers, the header
stops them in older ones and on a same-site sibling host. Bearer-token
requests need no CSRF secret: a browser never adds a bearer token by itself.

Sessions live in memory: a restart logs everybody out, which is acceptable
for a technician's screen and means no session secret is ever on disk.
Each request re-reads the user (:class:`~edgeway.admin.users.UserStore`),
so a removed user, a new password or a lowered role counts at once.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "edgeway_session"
CSRF_HEADER = "X-CSRF-Token"
SESSIONS_MAX = 1000
"""Sessions kept; the oldest goes first beyond it. A site has tens of
technicians; the bound stops a log-in loop from growing memory."""
IDLE_TIMEOUT = 8 * 3600.0
"""A session unused this long ends (a shift)."""
ABSOLUTE_TIMEOUT = 24 * 3600.0
"""A session ends this long after log-in, used or not."""
LOGIN_BURST = 5
"""Failed log-in attempts a client address may make at once..."""
LOGIN_PER_MINUTE = 5.0
"""...and how fast its allowance comes back: 5 guesses a minute make a
dictionary attack on one gateway take years, and a technician who mistypes
twice never notices."""
LOGIN_CLIENTS_MAX = 4096
"""Client addresses whose attempts are remembered (least recent forgotten)."""
LOGIN_CONCURRENT = 2
"""argon2 checks running at once: each takes ~50 ms of CPU and 64 MiB; more
would let a flood of log-ins from many addresses starve the gateway."""


@dataclass(slots=True)
class Session:
    """One browser's log-in."""

    user: str
    csrf: str
    created: float
    last_seen: float


class SessionStore:
    """Sessions by id, bounded and expiring (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, user: str) -> tuple[str, Session]:
        now = self._clock()
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), now, now)
        self._sessions[sid] = session
        while len(self._sessions) > SESSIONS_MAX:
            self._sessions.popitem(last=False)
        return sid, session

    def get(self, sid: str) -> Session | None:
        """The live session ``sid`` names (touching it), or None."""
        if len(sid) > 64:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > IDLE_TIMEOUT or now - session.created > ABSOLUTE_TIMEOUT:
            del self._sessions[sid]
            return None
        session.last_seen = now
        return session

    def end(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def end_user(self, user: str) -> None:
        for sid in [s for s, v in self._sessions.items() if v.user == user]:
            del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)


def csrf_ok(session: Session, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(session.csrf, header)


class LoginLimiter:
    """A token bucket per client address for log-in attempts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """0 when ``client`` may try now, else the seconds until it may."""
        now = self._clock()
        tokens, at = self._buckets.pop(client, (float(LOGIN_BURST), now))
        tokens = min(float(LOGIN_BURST), tokens + (now - at) * LOGIN_PER_MINUTE / 60.0)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) * 60.0 / LOGIN_PER_MINUTE
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > LOGIN_CLIENTS_MAX:
            self._buckets.popitem(last=False)
        return wait

    def succeeded(self, client: str) -> None:
        """A log-in worked: give its attempt back, so only failures count
        (a shared tablet logging in per shift never waits)."""
        entry = self._buckets.get(client)
        if entry is not None:
            self._buckets[client] = (min(float(LOGIN_BURST), entry[0] + 1.0), entry[1])
