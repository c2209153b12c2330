"""Who may call which admin API route: the Host check, bearer tokens, roles.

Every request passes, in order:

1. **Host check** (DNS rebinding): a web page on ``evil.example`` whose name
   its owner re-points at 127.0.0.1 can make a browser on the gateway's
   network call the admin API with the page's own origin. Such a request
   carries ``Host: evil.example``; only the listener's own address, localhost
   names, IP literals (which cannot be re-pointed) the listener answers on, and
   ``admin.allowed_hosts`` are accepted; anything else gets ``421``.
2. **Origin check** (cross-site requests): a browser adds ``Origin`` to
   cross-origin requests other than plain GETs; a form on any web site can
   POST to ``http://127.0.0.1:9180`` with the right ``Host``, and under
   ``admin.auth: none`` nothing else would stop it. A request whose
   ``Origin`` names a host the Host check would refuse (or ``null``) gets
   ``403``.
3. **Route access**: each handler declares the least role it needs with
   :func:`requires` or :func:`public`. A handler that declares nothing is
   refused to everyone (fail closed); an unknown path needs ``viewer`` before
   it gets its 404, so probing paths reveals nothing without a token.
4. **Bearer token** (``Authorization: Bearer ewt_...``), checked against the
   :class:`~edgeway.admin.tokens.TokenStore`: ``401`` without a valid token,
   ``403`` when the token's role is below the route's. With ``admin.auth:
   none`` (loopback only) every request has every role.

Refusals are logged at warning level, at most :data:`REFUSALS_LOGGED` lines
per :data:`REFUSAL_LOG_WINDOW` seconds (then one line counting the rest);
values that came from the client are escaped so that they cannot forge lines.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from aiohttp import web

from edgeway.admin.errors import error
from edgeway.admin.sessions import COOKIE, CSRF_HEADER, Session, SessionStore, csrf_ok
from edgeway.admin.tokens import Role, TokenRecord, TokenStore, TokenStoreError
from edgeway.admin.users import UserStore, UserStoreError

log = logging.getLogger("edgeway.admin")

REFUSALS_LOGGED = 10
"""Refusal lines per window: enough to see who is knocking, not enough for a
client that retries in a loop to fill the disk."""
REFUSAL_LOG_WINDOW = 60.0
"""Seconds per window of :data:`REFUSALS_LOGGED` lines."""
LOGGED_VALUE_MAX = 80
"""Characters of a client-supplied value (path, Host, user agent) in a log line."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])

PUBLIC: Final = "public"
_ACCESS_ATTR = "__edgeway_admin_access__"

WILDCARDS = frozenset({"0.0.0.0", "::"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing: no CSRF token needed."""


def requires(role: Role) -> Callable[[H], H]:
    """Declare the least role a route handler needs."""

    def mark(handler: H) -> H:
        setattr(handler, _ACCESS_ATTR, role)
        return handler

    return mark


def public(handler: H) -> H:
    """Declare a route that needs no token (health probes)."""
    setattr(handler, _ACCESS_ATTR, PUBLIC)
    return handler


def declared_access(handler: object) -> Role | str | None:
    """What a handler declared: a :class:`Role`, :data:`PUBLIC`, or None."""
    return getattr(handler, _ACCESS_ATTR, None)


def escape_for_log(value: str) -> str:
    """A client-supplied value made safe for one log line: control characters
    (newlines included) and non-ASCII escaped, cut to LOGGED_VALUE_MAX."""
    cut = value[:LOGGED_VALUE_MAX]
    text = cut.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(value) > LOGGED_VALUE_MAX else "")


def split_host_header(value: str) -> str:
    """The host part of a ``Host`` header, lower case, without port or brackets."""
    host = value.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(slots=True, frozen=True)
class HostPolicy:
    """Which ``Host`` header values the admin listener accepts (see module docstring)."""

    listen_host: str
    allowed_hosts: tuple[str, ...] = ()

    def allows(self, header: str | None) -> bool:
        if header is None:
            # HTTP/1.0 probes (haproxy's httpchk) send none; browsers always
            # send one, so a rebinding attack cannot come without it.
            return True
        host = split_host_header(header)
        if host == "localhost" or host.endswith(".localhost"):
            return True  # RFC 6761: always loopback, browsers resolve it themselves
        ip = _ip(host)
        if ip is not None:
            if ip.is_loopback:
                return True
            if self.listen_host in WILDCARDS:
                # Answers on every address the machine has (they may change
                # with DHCP); an address cannot be re-pointed like a name.
                return True
            listen_ip = _ip(self.listen_host)
            if listen_ip is not None and ip == listen_ip:
                return True
        elif host == self.listen_host.lower():
            return True
        return self._allowed_name(host)

    def allows_origin(self, origin: str) -> bool:
        """Whether a browser ``Origin`` header names a host :meth:`allows`."""
        try:
            parts = urllib.parse.urlsplit(origin.strip())
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (sandboxed frames, file://) and anything odd
        return self.allows(parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]")

    def _allowed_name(self, host: str) -> bool:
        return any(
            host == allowed
            or (allowed.startswith(".") and (host.endswith(allowed) or host == allowed[1:]))
            for allowed in self.allowed_hosts
        )


@dataclass(slots=True)
class RefusalLog:
    """Logs refused requests, at most REFUSALS_LOGGED lines per window."""

    clock: Callable[[], float] = time.monotonic
    _window_start: float = float("-inf")
    _logged: int = 0
    _suppressed: int = 0

    def refused(self, request: web.Request, status: int, reason: str, who: str = "") -> None:
        now = self.clock()
        if now - self._window_start >= REFUSAL_LOG_WINDOW:
            if self._suppressed:
                log.warning(
                    "admin API: %d more refused requests not logged in the last %.0f s",
                    self._suppressed,
                    now - self._window_start,
                )
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged >= REFUSALS_LOGGED:
            self._suppressed += 1
            return
        self._logged += 1
        peer = request.remote or "?"
        log.warning(
            "admin API: refused %s %s from %s: %d %s%s (Host %s)",
            request.method,
            escape_for_log(request.rel_url.raw_path),
            peer,
            status,
            reason,
            f" ({who})" if who else "",
            escape_for_log(request.headers.get("Host", "-")),
        )


@dataclass(slots=True, frozen=True)
class Principal:
    """Who made a request: a token, a logged-in user, or nobody under
    ``admin.auth: none``."""

    role: Role
    token: TokenRecord | None = None
    user: str | None = None
    session: Session | None = None

    def describe(self) -> str:
        """For log lines and audit: ``token ID, role R`` or ``user NAME, role R``."""
        if self.token is not None:
            return f"token {self.token.id}, role {self.role.label}"
        if self.user is not None:
            return f"user {self.user}, role {self.role.label}"
        return f"no authentication, role {self.role.label}"

    @property
    def source(self) -> str:
        """Who to name as a command's source or a change's author."""
        if self.token is not None:
            return f"api:{self.token.name}"
        if self.user is not None:
            return f"user:{self.user}"
        return "api"


ANONYMOUS_ADMIN: Final = Principal(Role.ADMIN)
"""Every request under ``admin.auth: none`` (loopback only)."""

PRINCIPAL: Final = web.RequestKey("principal", Principal)
"""Where a handler finds who called it: ``request[PRINCIPAL]``."""


_Refuse = Callable[..., None]


def _no_log(*args: object, **kwargs: object) -> None:
    """A refusal not worth a log line (a live channel re-checking its caller)."""


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


@dataclass(slots=True)
class AccessControl:
    """The aiohttp middleware applying the Host check, tokens and roles.

    ``tokens`` is None under ``admin.auth: none``. ``metrics_public`` lifts the
    token requirement from ``/metrics`` alone.
    """

    hosts: HostPolicy
    tokens: TokenStore | None
    metrics_public: bool = False
    refusals: RefusalLog = field(default_factory=RefusalLog)
    users: UserStore | None = None
    """People who may log in (with ``tokens``); None: bearer tokens only."""
    sessions: SessionStore = field(default_factory=SessionStore)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.hosts.allows(request.headers.get("Host")):
            self.refusals.refused(request, 421, "Host not allowed")
            return error(
                421,
                "misdirected_request",
                "this admin API does not answer to that Host name; "
                "add it to admin.allowed_hosts if it is yours",
            )
        origin = request.headers.get("Origin")
        if origin is not None and not self.hosts.allows_origin(origin):
            self.refusals.refused(request, 403, f"cross-origin ({escape_for_log(origin)})")
            return error(
                403,
                "cross_origin",
                "requests from web pages of other sites are refused; "
                "add the site's host to admin.allowed_hosts if it is yours",
            )
        needed = self._needed(request)
        if needed == PUBLIC:
            return await handler(request)
        if needed is None:
            self.refusals.refused(request, 403, "the route declares no access rule (a bug)")
            return error(403, "forbidden", "this route declares no access rule")
        assert isinstance(needed, Role)
        who = self.identify(request)
        if isinstance(who, web.Response):
            return who
        if who.role < needed:
            return self._insufficient(request, who, needed)
        if who.session is not None and request.method not in SAFE_METHODS:
            if not csrf_ok(who.session, request.headers.get(CSRF_HEADER)):
                self.refusals.refused(request, 403, "no or wrong CSRF token", who.describe())
                return error(
                    403,
                    "csrf",
                    f"a write from a browser session needs the {CSRF_HEADER} header "
                    "(GET /api/session gives it)",
                )
        request[PRINCIPAL] = who
        return await handler(request)

    def identify(
        self, request: web.Request, *, log_refusal: bool = True
    ) -> Principal | web.Response:
        """Who is calling: a bearer token, else a session cookie; or the
        refusal to send (401, 503). Live channels call it again on every
        event, so a revoked token or an ended session stops them too."""
        if self.tokens is None:
            return ANONYMOUS_ADMIN
        refused = self.refusals.refused if log_refusal else _no_log
        token = _bearer(request)
        if not token and self.users is not None:
            sid = request.cookies.get(COOKIE)
            if sid:
                return self._session_principal(request, sid, refused)
        if not token:
            refused(request, 401, "no bearer token")
            return error(
                401,
                "unauthorized",
                "this endpoint needs a bearer token (edgeway tokens create) or a log-in",
                **{"WWW-Authenticate": 'Bearer realm="edgeway"'},
            )
        try:
            record = self.tokens.verify(token)
        except TokenStoreError as e:
            refused(request, 503, f"token store unreadable: {e}")
            return error(503, "unavailable", "the token store cannot be read")
        if record is None:
            refused(request, 401, "invalid or revoked token")
            return error(
                401,
                "invalid_token",
                "the token is unknown, malformed or revoked",
                **{"WWW-Authenticate": 'Bearer realm="edgeway", error="invalid_token"'},
            )
        return Principal(record.role, record)

    def _session_principal(
        self, request: web.Request, sid: str, refused: _Refuse
    ) -> Principal | web.Response:
        assert self.users is not None
        session = self.sessions.get(sid)
        try:
            user = self.users.get(session.user) if session is not None else None
            if user is not None and session is not None and user.changed > session.created:
                user = None  # a new password ends the sessions opened with the old one
        except UserStoreError as e:
            refused(request, 503, f"user store unreadable: {e}")
            return error(503, "unavailable", "the user store cannot be read")
        if user is None or session is None:
            refused(request, 401, "session unknown or ended")
            return error(401, "session_ended", "the session has ended: log in again")
        return Principal(user.role, None, user.name, session)

    def _insufficient(self, request: web.Request, who: Principal, needed: Role) -> web.Response:
        self.refusals.refused(request, 403, f"needs {needed.label}", who.describe())
        holder = "the token" if who.token is not None else "you"
        verb = "has" if who.token is not None else "have"
        return error(
            403,
            "insufficient_role",
            f"this endpoint needs role {needed.label}; {holder} {verb} {who.role.label}",
            **{"WWW-Authenticate": 'Bearer realm="edgeway", error="insufficient_scope"'},
        )

    def _needed(self, request: web.Request) -> Role | str | None:
        match = request.match_info
        if match.http_exception is not None:
            return Role.VIEWER  # unknown path or method: a token before the 404
        resource = match.route.resource
        if self.metrics_public and resource is not None and resource.canonical == "/metrics":
            return PUBLIC
        return declared_access(match.handler)
