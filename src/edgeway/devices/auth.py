"""Authentication and authorisation interfaces for device connections.

The broker calls an :class:`Authenticator` once per CONNECT and an
:class:`Authoriser` on every PUBLISH and SUBSCRIBE. Both are pluggable: the
config file backs them now (``edgeway.devices.config_auth``); the device
registry will back them later without the broker changing.

``may_publish``/``may_subscribe`` are synchronous because they sit on the
broker's hot path; implementations cache their decisions per principal and
topic. ``authenticate`` is a coroutine because verifying an argon2 hash costs
tens of milliseconds and must run off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True, frozen=True)
class ConnectInfo:
    """What is known about a client when it sends CONNECT."""

    client_id: str
    username: str | None
    password: bytes | None
    listener: str
    """The listener's bind string, e.g. ``"127.0.0.1:1883"``."""
    remote: str
    """Peer address as ``host:port``."""
    allow_anonymous: bool
    """The listener's ``allow_anonymous`` setting."""
    cert_subject_cn: str | None = None
    """Common name of a verified TLS client certificate, if any."""


@dataclass(slots=True, frozen=True)
class Principal:
    """An authenticated client, as the authoriser sees it."""

    client_id: str
    username: str | None
    """The verified identity: a device id (credential store, certificate
    common name) or a ``mqtt.users`` name; None when anonymous."""
    anonymous: bool = False
    groups: frozenset[str] = frozenset()
    """The device's ACL groups (credential store); rules with ``group`` match these."""
    method: str = ""
    """How it was proved: ``password``, ``token``, ``certificate``, ``anonymous``,
    ``provisioning`` (for logs and the status; the ACL does not look at it)."""
    provisioning_key: str | None = None
    """Set for a client that proved a provisioning key (not a device): it may
    only ask for its enrolment (:mod:`edgeway.devices.provisioning_mqtt`)."""

    @property
    def device_id(self) -> str | None:
        """The device this client speaks for (its verified name)."""
        return None if self.anonymous or self.provisioning_key else self.username

    @property
    def identity(self) -> str:
        """Who this is, as a session's owner: ``user:<name>`` for a verified
        user name (password or certificate common name), ``anonymous``
        otherwise. Not the client id, which is only the client's claim."""
        if self.provisioning_key is not None:
            return "provisioning:" + self.provisioning_key
        if self.anonymous or self.username is None:
            return "anonymous"
        return "user:" + self.username


@dataclass(slots=True, frozen=True)
class AuthDecision:
    """The authenticator's answer. ``reason_code`` is the v5 CONNACK reason
    code used when refused (0x86 bad user name or password, 0x87 not
    authorised, 0x8A banned); the broker maps it to 3.1.1 return codes."""

    allowed: bool
    principal: Principal | None = None
    reason_code: int = 0x86
    reason: str = ""


class Authenticator(Protocol):
    async def authenticate(self, info: ConnectInfo) -> AuthDecision:
        """Decide whether a client may connect, and as whom."""
        ...


class Authoriser(Protocol):
    def may_publish(self, principal: Principal, topic: str) -> bool:
        """May this client publish to ``topic`` (a topic name)?"""
        ...

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        """May this client subscribe to ``topic_filter`` (``$share/g/`` already
        stripped)? True when some topic it matches is readable; the broker
        asks again with each topic name at delivery, so a filter overlapping
        denied topics is granted and those messages are dropped one by one."""
        ...

    def invalidate(self) -> None:
        """Forget every cached decision: rules or identities changed."""
        ...


class AllowAll:
    """Authenticator and authoriser that allow everything (tests, benchmarks)."""

    async def authenticate(self, info: ConnectInfo) -> AuthDecision:
        return AuthDecision(True, Principal(info.client_id, info.username, info.username is None))

    def may_publish(self, principal: Principal, topic: str) -> bool:
        return True

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        return True

    def invalidate(self) -> None:
        pass
