"""The registry and device status as one gateway component.

The gateway builds one from its configuration and asks it for the three
things it puts in front of the data path: the ingest the adapters submit to
(:meth:`DeviceService.ingest_for`), the MQTT authenticator
(:meth:`DeviceService.authenticator_for`), and the broker's session follower
(:meth:`DeviceService.attach_broker`)::

    devices = DeviceService(data_dir, cfg, emit=outbox.submit)
    await devices.open()
    ingest = devices.ingest_for(switch)
    ...
    task = tg.create_task(devices.run())     # the status flusher
    ...
    await devices.close()

See :mod:`edgeway.devices.registry` (the records) and
:mod:`edgeway.devices.presence` (status, events, gates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeway.devices.auth import Authenticator
from edgeway.devices.presence import (
    BrokerPresence,
    DeviceIngest,
    DevicePresence,
    PresenceEvents,
    RegistryAuthenticator,
)
from edgeway.devices.registry import DB_NAME, DeviceRegistry
from edgeway.downlink import DownlinkEvents
from edgeway.ingest import Ingest
from edgeway.reading import Reading

if TYPE_CHECKING:
    from edgeway.config import Config
    from edgeway.devices.identity import DeviceAccessControl
    from edgeway.devices.provisioning import ProvisioningStats
    from edgeway.south.base import SouthAdapter
    from edgeway.south.mqtt.broker import Broker


class DeviceService:
    """Owns ``devices.db``, the status flusher and the gates."""

    def __init__(
        self,
        data_dir: Path,
        config: Config,
        *,
        emit: Callable[[Sequence[Reading]], Any] | None = None,
        live: Callable[[], Config] | None = None,
    ) -> None:
        section = config.devices
        self.config = config
        self._live = live or (lambda: config)
        """The configuration in force (the gateway's, which a reload replaces):
        the listeners' ``unregistered`` policies are read from it when asked."""
        self.registry = DeviceRegistry(
            data_dir / DB_NAME,
            durability=config.outbox.durability,
            max_unregistered=section.max_unregistered,
        )
        self.presence = DevicePresence(
            self.registry,
            flush_interval=section.flush_interval,
            offline_after=section.offline_after,
            emit=emit if section.events else None,
            events_per_second=section.events_per_second,
        )
        self.broker_presence: BrokerPresence | None = None
        self._ingest: DeviceIngest | None = None
        self._provisioning: ProvisioningStats | None = None
        """Enrolments and refusals by code (``/api/status`` -> devices.provisioning)."""
        self.registry.on_change(self.presence.registry_changed)

    async def open(self) -> None:
        await self.registry.open()
        # Whatever the file says, nobody is connected to a gateway that is
        # only starting (the last run may have ended with a kill -9).
        await self.registry.mark_all_offline("shutdown")

    def ingest_for(self, inner: Ingest) -> Ingest:
        """What adapters and the broker submit to, in front of ``inner``."""
        if self._ingest is None or self._ingest.inner is not inner:
            self._ingest = DeviceIngest(inner, self.presence, self.registry, self._gate_policy)
        return self._ingest

    def _gate_policy(self, adapter: str) -> bool | None:
        """For an HTTP or CoAP reading: whether its listener refuses
        unregistered devices; None for the others (not gated)."""
        cfg = self._live()
        section = cfg.http_ingest if adapter == "http" else cfg.coap if adapter == "coap" else None
        return None if section is None else section.unregistered == "refuse"

    def _refuses_unregistered(self, bind: str) -> bool:
        return any(
            lst.bind == bind and lst.unregistered == "refuse" for lst in self._live().mqtt.listeners
        )

    def authenticator_for(self, inner: Authenticator) -> Authenticator:
        """``inner`` behind the registry's checks (start-up, and a reload that
        replaces ``mqtt.users``)."""
        return RegistryAuthenticator(
            inner, self.registry, self.presence, self._refuses_unregistered
        )

    def attach_broker(self, broker: Broker) -> None:
        bp = BrokerPresence(broker, self.presence)
        bp.attach()
        self.registry.on_change(bp.registry_changed)
        self.broker_presence = bp

    def downlink_events(self, inner: DownlinkEvents, section: str) -> DownlinkEvents:
        """What an adapter's downlink reports to: ``inner`` (the command
        service), noting the devices heard on the way."""
        protocol = "http" if section == "http_ingest" else section
        return PresenceEvents(inner, self.presence, protocol)

    def link_access(self, access: DeviceAccessControl) -> None:
        """Keep the credential store's view in step with the registry: a
        device disabled or removed here is revoked there (stored as disabled,
        its connections closed, cached decisions forgotten); enabled here, it
        is enabled there again."""

        def changed(device_id: str, change: str) -> None:
            if change in ("disabled", "removed"):
                access.revoke_device(device_id)
            elif change == "enabled":
                access.store.set_disabled(device_id, False)

        self.registry.on_change(changed)
        access.on_auth_failed.append(self.presence.auth_failed)
        if access.provisioner is not None:
            # Enrolled devices are registered here, with a `registered` event.
            access.provisioner.registry = self.registry
            access.provisioner.presence = self.presence
            self._provisioning = access.provisioner.stats

    def watch(self, adapters: Callable[[], Iterable[SouthAdapter]]) -> None:
        """Follow the pollers among ``adapters()`` (the running ones)."""
        self.presence.watch_pollers(adapters)

    async def run(self) -> None:
        await self.presence.run()

    async def close(self) -> None:
        if self._ingest is not None:
            await self._ingest.close()
        await self.presence.flush()
        await self.registry.close()

    def status(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.presence.stats)
        out["unregistered"] = self.registry.unregistered
        out["unregistered_refused"] = self.registry.unregistered_refused
        out["refused_requests"] = self._ingest.refused if self._ingest is not None else 0
        if self._provisioning is not None:
            out["provisioning"] = dataclasses.asdict(self._provisioning)
        return out
