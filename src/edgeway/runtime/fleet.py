"""Fleet configuration: signed, versioned configurations pushed by the cloud.

The gateway is one more device on the command downlink: a command whose
``device_id`` is the gateway's own id (``gateway.id``) and whose name is one
of these is handled here instead of by an adapter::

    config.apply   {"version": 7, "config": "<the whole YAML>", "signature": "<base64>"}
    config.status  {}

so a configuration reaches a gateway through whatever cloud downlink it has
(the MQTT sink's ``commands_topic``, the NATS sink's subject, the HTTP sink's
long-poll), durably queued like any command, and its outcome goes back up
through the outbox as the command's result record (``record_type: command``):

- ``succeeded`` with ``{"version", "sha256", "changes"}``: validated, applied
  with the runtime's reload (start what is new before stopping what is
  replaced, wait for health, roll back on failure: :mod:`edgeway.runtime.apply`)
  and healthy for the reload's grace period;
- ``failed`` with ``{"version", "error", "message"[, "issues"]}``, ``error``
  one of ``bad_signature``, ``stale`` (a version not above the one applied),
  ``invalid`` (does not validate; ``issues`` as ``edgeway check`` prints them),
  ``rolled_back`` (started but failed, or was not healthy: the previous
  configuration is back), ``not_applied`` (a change that needs a restart),
  ``locked_out`` (the new configuration would drop every ``fleet.keys`` key, so
  the next one could never be verified).

Signature: Ed25519 over ``edgeway-config-v1:<version>:`` followed by the 32
bytes of the SHA-256 of the YAML text (``edgeway fleet sign`` makes it); the
version is part of what is signed, so a signed old configuration cannot be
replayed as a new version. Versions only go up: the last applied one is kept
in ``DATA_DIR/fleet.json``; the same version and text again (the cloud sent
it twice, a redelivery after a crash) succeeds without applying anything.

Never blocking the next one: a failed version leaves nothing behind (no
pending state, no lock): the previous configuration runs, and the next
``config.apply`` with a higher version is handled like any other. The cloud's
rollout (canary first, then the rest) reads the results; ``bench``-free proof
is tests/integration/test_fleet.py (ten gateway processes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from edgeway.commands.model import Command, CommandResult
from edgeway.downlink import GatewayHandled
from edgeway.signing import load_public_key, verify

if TYPE_CHECKING:
    from edgeway.config import Config
    from edgeway.downlink import DownlinkEvents

log = logging.getLogger(__name__)

CONTEXT = b"edgeway-config-v1:"
STATE_FILE = "fleet.json"
COMMANDS = frozenset({"config.apply", "config.status"})


def signed_message(version: int, text: str) -> bytes:
    """What a fleet configuration's signature signs."""
    return CONTEXT + str(version).encode() + b":" + hashlib.sha256(text.encode()).digest()


class Applier(Protocol):
    """What the fleet handler needs of the running gateway (Gateway implements it)."""

    config: Config

    async def apply_text(self, text: str, source: str, filename: str = "<api>") -> list[str]: ...


@dataclass(slots=True)
class FleetState:
    version: int = 0
    sha256: str | None = None
    applied_at: float | None = None

    @classmethod
    def load(cls, path: Path) -> FleetState:
        try:
            doc = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, orjson.JSONDecodeError) as e:
            raise RuntimeError(
                f"{path}: unreadable fleet state ({e}); remove it to start over"
            ) from None
        return cls(int(doc.get("version", 0)), doc.get("sha256"), doc.get("applied_at"))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(
                orjson.dumps(
                    {"version": self.version, "sha256": self.sha256, "applied_at": self.applied_at}
                )
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class _Refused(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


class GatewayDownlink(GatewayHandled):
    """The downlink that reaches the gateway itself (see the module docstring)."""

    name = "gateway"

    def __init__(
        self, gateway: Applier, gateway_id: str, data_dir: Path, events: DownlinkEvents
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.gateway_id = gateway_id
        self.path = Path(data_dir) / STATE_FILE
        self.events = events
        self.state = FleetState.load(self.path)
        self._lock = asyncio.Lock()
        self.applied = 0
        self.refused = 0

    def reachable(self, command: Command) -> bool:
        return command.device_id == self.gateway_id and command.name in COMMANDS

    async def handle(self, command: Command) -> None:
        if command.name == "config.status":
            self._report(command, True, self._status())
            return
        params = command.params
        version = params.get("version")
        try:
            result = await self._apply(params)
        except _Refused as e:
            self.refused += 1
            log.warning(
                "fleet configuration version %s refused: %s: %s",
                version,
                e.code,
                e,
                extra={"fields": {"version": version, "error": e.code}},
            )
            self._report(
                command,
                False,
                {"version": version, "error": e.code, "message": str(e), **e.extra},
                f"{e.code}: {e}",
            )
            return
        except Exception as e:  # never leave a command without its result
            log.exception("fleet configuration version %s failed", version)
            self._report(command, False, {"version": version, "error": "internal"}, repr(e))
            return
        self._report(command, True, result)

    def _status(self) -> dict[str, Any]:
        from edgeway.runtime.reload import text_hash

        text = getattr(self.gateway, "config_text", None)
        return {
            "version": self.state.version,
            "sha256": self.state.sha256,
            "applied_at": self.state.applied_at,
            "in_force_sha256": text_hash(text) if text is not None else None,
        }

    async def _apply(self, params: dict[str, Any]) -> dict[str, Any]:
        from edgeway.runtime.reload import ReloadError

        version, text, signature = self._parse(params)
        keys = {n: load_public_key(k) for n, k in self.gateway.config.fleet.keys.items()}
        if not keys:
            raise _Refused(
                "bad_signature", "fleet.keys holds no key: pushed configurations are refused"
            )
        signer = verify(keys, signature, signed_message(version, text))
        if signer is None:
            raise _Refused("bad_signature", "the signature matches none of fleet.keys")
        sha = hashlib.sha256(text.encode()).hexdigest()
        async with self._lock:
            if version == self.state.version and sha == self.state.sha256:
                return {"version": version, "sha256": sha, "changes": [], "already_applied": True}
            if version <= self.state.version:
                raise _Refused(
                    "stale",
                    f"version {version} is not above the applied version {self.state.version}",
                )
            self._check_keys_kept(text)
            try:
                changes = await self.gateway.apply_text(
                    text, f"fleet:v{version}", f"<fleet v{version}>"
                )
            except ReloadError as e:
                if e.issues:
                    raise _Refused("invalid", str(e), issues=[str(i) for i in e.issues]) from None
                raise _Refused("rolled_back" if e.rolled_back else "not_applied", str(e)) from None
            self.state = FleetState(version, sha, time.time())
            await asyncio.to_thread(self.state.save, self.path)
            self.applied += 1
        log.info(
            "fleet configuration version %d applied (signed by %s): %d changes",
            version,
            signer,
            len(changes),
            extra={"fields": {"version": version, "signer": signer, "sha256": sha}},
        )
        return {"version": version, "sha256": sha, "changes": changes, "signed_by": signer}

    @staticmethod
    def _parse(params: dict[str, Any]) -> tuple[int, str, bytes]:
        unknown = set(params) - {"version", "config", "signature"}
        if unknown:
            raise _Refused("invalid", f"unknown parameters: {', '.join(sorted(unknown))}")
        version, text, sig = params.get("version"), params.get("config"), params.get("signature")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _Refused("invalid", "'version' must be an integer >= 1")
        if not isinstance(text, str) or not text.strip():
            raise _Refused("invalid", "'config' must be the configuration's YAML text")
        if not isinstance(sig, str):
            raise _Refused("bad_signature", "'signature' (base64 Ed25519) is missing")
        try:
            signature = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            raise _Refused("bad_signature", "'signature' is not base64") from None
        return version, text, signature

    def _check_keys_kept(self, text: str) -> None:
        """Refuse a configuration after which no pushed one could be verified."""
        from edgeway.config import ConfigError, parse_config

        try:
            new = parse_config(text, "<fleet>")
        except ConfigError as e:
            raise _Refused(
                "invalid", "the configuration does not validate", issues=[str(i) for i in e.issues]
            ) from None
        old = self.gateway.config.fleet
        kept = set(new.fleet.keys.values()) & set(old.keys.values())
        if not new.fleet.enabled or not kept:
            raise _Refused(
                "locked_out",
                "the configuration turns fleet off or keeps none of the current fleet.keys: "
                "no later configuration could be verified",
            )

    def _report(
        self, command: Command, success: bool, result: Any, error: str | None = None
    ) -> None:
        self.events.report(
            CommandResult(command.id, command.device_id, success, result=result, error=error)
        )
