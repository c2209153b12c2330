"""One identity model for every protocol: who is talking, resolved once.

The gateway builds one :class:`DeviceAccessControl` from the configuration
and its data directory. It answers, for every listener:

- MQTT (:class:`DeviceAuthenticator`, the broker's authenticator): a
  CONNECT's user name and password are checked against the credential store
  (:mod:`edgeway.devices.credentials`) first, then against ``mqtt.users``
  (:class:`~edgeway.devices.config_auth.ConfigAuthenticator`); a verified TLS
  client certificate's common name is the device id. The result is a
  :class:`~edgeway.devices.auth.Principal` carrying the device id, its ACL
  groups and the method; the ACL and the session's owner see only that.
- HTTP and CoAP ingest (:meth:`DeviceAccessControl.check_token`): the
  device id of the request's path and its bearer / CoAP token.

A device disabled in the store is refused everywhere, whatever proved it.

Revocation: :meth:`DeviceAccessControl.revoke_device` (what the device
registry calls when a device is disabled or removed), a credential removed
or replaced, or groups changed, by this process or by ``edgeway
credentials`` in another: a watch every :data:`WATCH_INTERVAL` seconds sees
the change (``PRAGMA data_version``), disconnects the device's MQTT clients,
and forgets every cached ACL decision, so it takes effect within a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from edgeway.devices.auth import AuthDecision, ConnectInfo, Principal
from edgeway.devices.backoff import LoginBackoff
from edgeway.devices.config_auth import MAX_FAILURES, ConfigAuthenticator, ConfigAuthoriser
from edgeway.devices.credentials import CredentialStore, Verdict
from edgeway.devices.provisioning import Provisioner, ProvisioningKeys
from edgeway.devices.provisioning_mqtt import (
    ProvisioningAuthoriser,
    ProvisioningMqtt,
    is_provisioning_user,
)
from edgeway.devices.provisioning_mqtt import authenticate as provisioning_login

if TYPE_CHECKING:
    from edgeway.config import Config
    from edgeway.south.mqtt.broker import Broker

__all__ = ["WATCH_INTERVAL", "DeviceAccessControl", "DeviceAuthenticator"]

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.25
"""Seconds between looks at the credential store for changes made elsewhere
(one pragma each): revocation by the CLI reaches connected clients within
this plus the disconnect, well inside the 1 s the issue asks."""
ARGON2_WORKERS = 2
"""Threads for person-chosen passwords in the store (64 MiB, ~0.1 s each):
the machine's two cores, as for ``mqtt.users``."""


class DeviceAuthenticator:
    """The broker's authenticator: credential store, then ``mqtt.users``."""

    def __init__(self, access: DeviceAccessControl, fallback: ConfigAuthenticator) -> None:
        self._access = access
        self._fallback = fallback
        self._failures = LoginBackoff(max_failures=MAX_FAILURES)
        self._executor: ThreadPoolExecutor | None = None

    def replace_fallback(self, fallback: ConfigAuthenticator) -> None:
        """New ``mqtt.users`` (a reload)."""
        old, self._fallback = self._fallback, fallback
        old.close()

    def close(self) -> None:
        self._fallback.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def authenticate(self, info: ConnectInfo) -> AuthDecision:
        store = self._access.store
        name = info.username
        if is_provisioning_user(name):
            return await provisioning_login(self._access.provisioner, info)
        if name is None and info.cert_subject_cn:
            name = info.cert_subject_cn
            if store.is_disabled(name):
                return _disabled(info, name)
            return AuthDecision(
                True, self._access.principal(info.client_id, name, method="certificate")
            )
        if name is not None and not store.has("mqtt", name) and not self._fallback.has_users:
            if not info.allow_anonymous:
                # Nobody else could vouch for this name: refused at once, without
                # the dummy argon2 check ConfigAuthenticator spends on unknown
                # names (which here would only tell apart store devices by time).
                self._failures.failed(name)
                return AuthDecision(False, None, 0x86, "bad user name or password")
        if name is None or not store.has("mqtt", name):
            decision = await self._fallback.authenticate(info)
            p = decision.principal
            if decision.allowed and p is not None and p.username is not None:
                if store.is_disabled(p.username):
                    return _disabled(info, p.username)
                return AuthDecision(
                    True, self._access.principal(p.client_id, p.username, method="password")
                )
            return decision
        wait = self._failures.locked_for(name)
        if wait > 0:
            return AuthDecision(False, None, 0x8A, f"too many failed logins; retry in {wait:.0f} s")
        secret = info.password if info.password is not None else b""
        verdict = store.verify("mqtt", name, secret)
        if verdict is Verdict.NEEDS_ARGON2:
            loop = asyncio.get_running_loop()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(ARGON2_WORKERS, thread_name_prefix="argon2")
            ok = await loop.run_in_executor(
                self._executor, store.verify_password, "mqtt", name, secret
            )
            verdict = Verdict.OK if ok else Verdict.WRONG
        if verdict is Verdict.DISABLED:
            return _disabled(info, name)
        if verdict is not Verdict.OK:
            self._failures.failed(name)
            log.debug("login for device %r from %s refused: wrong secret", name, info.remote)
            return AuthDecision(False, None, 0x86, "bad user name or password")
        self._failures.succeeded(name)
        method = "token" if not store.digest_is_password("mqtt", name) else "password"
        return AuthDecision(True, self._access.principal(info.client_id, name, method=method))


def _disabled(info: ConnectInfo, device_id: str) -> AuthDecision:
    log.debug("login for device %r from %s refused: disabled", device_id, info.remote)
    # Told apart from a wrong secret only in our log, not on the wire.
    return AuthDecision(False, None, 0x86, "bad user name or password")


class DeviceAccessControl:
    """Identities, credentials, authorisation and revocation (see the module)."""

    def __init__(self, config: Config, data_dir: Path) -> None:
        self.store = CredentialStore.open(data_dir)
        self.provisioning_keys = ProvisioningKeys.open(data_dir)
        self.provisioner: Provisioner | None = Provisioner(
            self.provisioning_keys, self.store, data_dir
        )
        """Enrolments with provisioning keys (MQTT, HTTP ``POST /provision``)."""
        self._provisioning_mqtt: ProvisioningMqtt | None = None
        self.authoriser = ProvisioningAuthoriser(ConfigAuthoriser(config.mqtt))
        self.authenticator = DeviceAuthenticator(self, ConfigAuthenticator(config.mqtt))
        self.broker: Broker | None = None
        self.on_revoked: list[Callable[[str], None]] = []
        """Called with each device id that lost access (after the broker)."""
        self.on_auth_failed: list[Callable[[str, str, str, str], None]] = []
        """Called with (device id, protocol, remote address, reason) for each
        request an HTTP or CoAP listener refused for its credentials (the
        registry's ``auth_failed`` lifecycle event; MQTT reports its own)."""
        self.revocations = 0
        self._watch: asyncio.TimerHandle | None = None
        self._crls = _crl_paths(config)

    def reconfigure(self, config: Config) -> None:
        """A reload: ``mqtt.users`` and ``mqtt.acl`` from ``config``; the
        caller tells the broker (``acl_changed``), which forgets cached
        decisions."""
        self.authoriser = ProvisioningAuthoriser(ConfigAuthoriser(config.mqtt))
        self.authenticator.replace_fallback(ConfigAuthenticator(config.mqtt))
        self._crls = {p: self._crls.get(p, m) for p, m in _crl_paths(config).items()}

    def principal(self, client_id: str, device_id: str, *, method: str) -> Principal:
        return Principal(client_id, device_id, groups=self.store.groups(device_id), method=method)

    # ------------------------------------------------------------ lifecycle

    def attach(self, broker: Broker | None) -> None:
        """Start watching the store; revocations reach ``broker``'s clients."""
        self.broker = broker
        if broker is not None and self.provisioner is not None and self._provisioning_mqtt is None:
            self._provisioning_mqtt = ProvisioningMqtt(broker, self.provisioner)
            self._provisioning_mqtt.attach()
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._tick)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._provisioning_mqtt is not None:
            self._provisioning_mqtt.detach()
            self._provisioning_mqtt = None
        self.authenticator.close()
        self.provisioning_keys.close()
        self.store.close()

    def _tick(self) -> None:
        try:
            self.apply_changes()
        except Exception:
            log.exception("credential store: checking for changes failed")
        self._watch = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._tick)

    # ------------------------------------------------------------ decisions

    def check_token(self, kind: str, device_id: str, token: str | None) -> Verdict:
        """An HTTP bearer or CoAP token for ``device_id``: OK, WRONG (a store
        credential exists and this is not it, or none was given), DISABLED,
        or UNKNOWN (the store has no credential of this kind: the listener's
        own rules decide)."""
        if token is None:
            if self.store.is_disabled(device_id):
                return Verdict.DISABLED
            return Verdict.WRONG if self.store.has(kind, device_id) else Verdict.UNKNOWN
        verdict = self.store.verify(kind, device_id, token.encode("utf-8", "surrogateescape"))
        if verdict is Verdict.NEEDS_ARGON2:
            return Verdict.WRONG  # only MQTT takes person-chosen passwords
        return verdict

    def auth_failed(self, device_id: str, protocol: str, remote: str, reason: str) -> None:
        """A listener refused a request's credentials (see ``on_auth_failed``)."""
        for hook in self.on_auth_failed:
            hook(device_id, protocol, remote, reason)

    def may_ingest(self, device_id: str, *, verified: bool) -> bool:
        """The ACL for an HTTP or CoAP upload: may the caller publish to the
        device's telemetry topic, ``devices/{device_id}/telemetry``, under the
        same rules as an MQTT client (no rules: allowed)? ``verified``: a
        token proved the device id; otherwise the request came in anonymously
        and is judged as an anonymous client (rules about devices, groups and
        ``{device_id}`` do not apply to it)."""
        if verified:
            p = self.principal(device_id, device_id, method="token")
        else:
            p = Principal(device_id, None, anonymous=True, method="anonymous")
        return self.authoriser.may_publish(p, f"devices/{device_id}/telemetry")

    # ------------------------------------------------------------ revocation

    def revoke_device(self, device_id: str) -> None:
        """Disable ``device_id`` everywhere, now: stored as disabled (so it
        stays refused after a restart), its MQTT clients disconnected, every
        cached decision forgotten. The device registry calls this when a
        device is disabled or removed."""
        self.store.set_disabled(device_id, True)
        self.apply_changes()

    def apply_changes(self) -> None:
        """Act on what changed in the store since the last look, and on
        updated CRLs of the MQTT listeners."""
        self._check_crls()
        changes = self.store.changes()
        if not changes.revoked and not changes.groups_changed:
            return
        broker = self.broker
        if changes.groups_changed:
            self.authoriser.invalidate()
            if broker is not None:
                broker.acl_changed()
        for device_id in sorted(changes.revoked):
            self.revocations += 1
            closed = broker.revoke(device_id) if broker is not None else 0
            log.warning(
                "device %r lost access (disabled, or a credential removed or replaced): "
                "%d MQTT connection(s) closed",
                device_id,
                closed,
            )
            for hook in self.on_revoked:
                hook(device_id)

    def _check_crls(self) -> None:
        """A listener's CRL file changed: disconnect open connections whose
        client certificate it revokes (the listener refuses new handshakes
        with them itself; see ``listeners.CrlWatch``)."""
        for path, seen in list(self._crls.items()):
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if mtime == seen:
                continue
            self._crls[path] = mtime
            if self.broker is None:
                continue
            try:
                from cryptography import x509

                crl = x509.load_pem_x509_crl(path.read_bytes())
            except (OSError, ValueError) as e:
                log.error("TLS CRL %s cannot be read: %s", path, e)
                continue
            closed = self.broker.revoke_certificates({r.serial_number for r in crl})
            if closed:
                log.warning("CRL %s: %d MQTT connection(s) with a revoked certificate closed",
                            path, closed)  # fmt: skip


def _crl_paths(config: Config) -> dict[Path, float]:
    """The MQTT listeners' CRL files and their modification times now."""
    out: dict[Path, float] = {}
    for lst in config.mqtt.listeners:
        if lst.tls is not None and lst.tls.crl is not None:
            try:
                out[lst.tls.crl] = lst.tls.crl.stat().st_mtime
            except OSError:
                out[lst.tls.crl] = 0.0
    return out
