"""The embedded MQTT broker as a component: the broker and its listeners.

Configuration (``mqtt:``; docs/protocols/mqtt-broker.md)::

    mqtt:
      listeners:
        - {bind: "127.0.0.1:1883", allow_anonymous: true}
      telemetry_topics: ["devices/{device_id}/telemetry"]

:class:`EmbeddedBroker` is what the gateway starts and stops like any other
:class:`~edgeway.runtime.component.Component`: ``start()`` loads the broker's
sessions and retained messages and binds every listener (a port in use raises
:class:`~edgeway.south.mqtt.listeners.ListenerError`, nothing left open);
``stop()`` stops accepting, then disconnects clients and saves the sessions.
The two halves of ``stop`` are also separate (:meth:`close_listeners`,
:meth:`stop_broker`) because the gateway lets receipts settle in between.
A reload opens and closes single listeners through :attr:`listeners`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from edgeway.config_types import is_loopback, parse_host_port
from edgeway.devices.auth import Authenticator, Authoriser
from edgeway.ingest import Ingest
from edgeway.runtime.component import Health
from edgeway.south.mqtt.broker import Broker
from edgeway.south.mqtt.config import MqttSection
from edgeway.south.mqtt.listeners import RunningListener, start_listeners
from edgeway.south.mqtt.stats import BrokerStats

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """The broker devices connect to, and the listeners they connect through."""

    def __init__(
        self,
        config: MqttSection,
        *,
        ingest: Ingest,
        authenticator: Authenticator,
        authoriser: Authoriser,
        data_dir: Path,
        gateway_id: str,
        credentials_from_config: bool = True,
        devices_have_credentials: Callable[[], bool] = lambda: False,
        on_broker_started: Callable[[Broker], None] | None = None,
    ) -> None:
        self.config = config
        self.broker = Broker(
            config,
            ingest=ingest,
            authenticator=authenticator,
            authoriser=authoriser,
            data_dir=data_dir,
            gateway_id=gateway_id,
        )
        self.listeners: list[RunningListener] = []
        """The bound listeners; a reload adds and removes entries in place."""
        self._credentials_from_config = credentials_from_config
        """False when identities were given in code (tests, embedding): then
        an empty ``mqtt.users`` does not mean nobody can log in."""
        self._devices_have_credentials = devices_have_credentials
        """Whether some device has credentials of its own (the device registry)."""
        self._on_broker_started = on_broker_started
        """Called with the broker once its state is loaded, before the listeners
        open (the device registry attaches to it)."""

    @property
    def name(self) -> str:
        return "mqtt"

    async def start(self) -> None:
        """Load the broker's state and bind every listener (all or none)."""
        await self.broker.start()
        if self._on_broker_started is not None:
            self._on_broker_started(self.broker)
        try:
            self.listeners[:] = await start_listeners(
                self.config.listeners,
                self.broker.protocol_factory,
                connect_timeout=self.config.limits.connect_timeout,
            )
        except BaseException:
            await self.broker.stop()
            raise
        for lst in self.listeners:
            self._log_access(lst)

    def _log_access(self, lst: RunningListener) -> None:
        """Say who may connect where it is not obvious: anonymous clients
        (a warning off loopback), or a listener nobody can log in to."""
        host, _ = parse_host_port(lst.config.bind)
        if lst.config.allow_anonymous:
            if is_loopback(host):
                log.info(
                    "anonymous MQTT clients are allowed on loopback listener %s:%d", *lst.bound
                )
            else:
                log.warning(
                    "anonymous MQTT clients are allowed on %s:%d, which is not loopback",
                    *lst.bound,
                )
        elif (
            self._credentials_from_config
            and not self.config.users
            and not self._devices_have_credentials()
            and not (lst.config.tls is not None and lst.config.tls.require_client_cert)
        ):
            # Credentials required, none configured: nobody can connect.
            # Without this line the only trace is each refused client.
            log.warning(
                "MQTT listener %s:%d requires credentials but mqtt.users is empty and no "
                "device has credentials: no client can connect (add users, "
                "'edgeway credentials issue ID', TLS client certificates, or "
                "allow_anonymous on a trusted network)",
                *lst.bound,
            )

    async def close_listeners(self) -> None:
        """Stop accepting new connections (established ones stay)."""
        for lst in self.listeners:
            with contextlib.suppress(Exception):
                await lst.close()

    async def stop_broker(self, grace: float) -> None:
        """Disconnect every client and save the sessions; the connections get
        ``grace`` seconds to end."""
        await self.broker.stop(grace)

    async def stop(self, grace: float) -> None:
        """Stop accepting, then disconnect clients and save the sessions."""
        await self.close_listeners()
        await self.stop_broker(grace)

    def health(self) -> Health:
        """Healthy while started: a listener that fails takes the broker down
        with it (start-up or reload fails), so there is no half state."""
        return Health()

    def stats(self) -> BrokerStats:
        """The broker's levels and counters."""
        return self.broker.stats()
