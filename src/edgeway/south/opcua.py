"""OPC-UA client (asyncua): subscriptions with monitored items in, readings out.

Example::

    opcua:
      - name: line-3-plc
        device_id: line-3
        endpoint: opc.tcp://10.0.3.5:4840/
        security:
          policy: Basic256Sha256       # or None
          mode: SignAndEncrypt         # or Sign
          certificate: /etc/edgeway/opcua/client-cert.der
          private_key: /etc/edgeway/opcua/client-key.pem
          server_certificate: /etc/edgeway/opcua/server-cert.der   # optional pin
        username: edgeway              # optional
        password: secret
        publishing_interval: 1s
        nodes:
          - {metric: temperature, node_id: "ns=2;s=Oven.Temperature", sampling_interval: 500ms, deadband: 0.5}
          - {metric: speed, browse_path: "2:Line3/2:Conveyor/2:Speed", deadband: 2, deadband_type: percent}
          - {metric: setpoint, node_id: "ns=2;i=2001", writable: true}
        methods:
          - {name: reset, object: "2:Line3", method: "2:Reset"}

One subscription per server; each node is a monitored item with its
sampling interval and an optional data-change deadband (absolute, or percent
of the variable's EURange). Every data change becomes one reading with the
item's source timestamp. Commands: :meth:`OpcUaAdapter.write` and
:meth:`OpcUaAdapter.call`. The connection is re-established forever with
backoff (asyncua's own reconnect is off so that every adapter behaves the
same and reports the same state).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeway.codecs.base import DecodeError, metric_value
from edgeway.config_types import input_limits
from edgeway.downlink import Downlink, DownlinkEvents
from edgeway.ingest import Ingest, IngestStatus
from edgeway.reading import MetricValue, Origin, Reading
from edgeway.south.base import Backoff, SouthAdapter, register_adapter
from edgeway.south.cancel import cancel_requested
from edgeway.south.decode_errors import DecodeErrorCounter
from edgeway.south.opcua_config import OpcUaNode, OpcUaServerConfig

log = logging.getLogger(__name__)

_NODE_ID_PREFIXES = ("ns=", "i=", "s=", "g=", "b=", "nsu=")

QUEUE_SIZE = 10
"""Values the server queues per monitored item between publishes. Enough to
keep every sample of a fast item across one slow publish cycle without
letting a stalled gateway make the server hold much for us."""


def is_node_id(ref: str) -> bool:
    """True for ``ns=2;s=X``-style node ids, False for browse paths (``2:A/2:B``)."""
    return ref.startswith(_NODE_ID_PREFIXES)


def to_metric(value: Any, name: str) -> MetricValue:
    """An OPC-UA variant value as a metric value; :class:`DecodeError` when it has none."""
    if isinstance(value, _dt.datetime):
        when: _dt.datetime = value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
        return when.timestamp()
    if isinstance(value, bool | int | float | str):
        return metric_value(value, name)
    raise DecodeError(
        "bad_value", f"{name!r}: {type(value).__name__} is not a number, bool or string"
    )


def _timestamp(data_value: Any) -> float:
    for attr in ("SourceTimestamp", "ServerTimestamp"):
        ts = getattr(data_value, attr, None)
        if isinstance(ts, _dt.datetime):
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=_dt.UTC)
            return ts.timestamp()
    return time.time()


def _application_uri(cert_path: Path) -> str | None:
    """The URI in the certificate's subjectAltName: OPC-UA servers check that
    the client's application URI matches it."""
    from cryptography import x509

    data = cert_path.read_bytes()
    cert = (
        x509.load_pem_x509_certificate(data)
        if data.startswith(b"-----")
        else x509.load_der_x509_certificate(data)
    )
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            return str(uris[0])
    return None


class _Handler:
    """asyncua subscription handler: forwards data changes to the adapter."""

    def __init__(self, adapter: OpcUaAdapter, lost: asyncio.Event) -> None:
        self.adapter = adapter
        self.lost = lost

    async def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        await self.adapter.handle_change(
            data.subscription_data.client_handle, val, data.monitored_item.Value
        )

    async def status_change_notification(self, status: Any) -> None:
        # BadShutdown / BadTimeout: the subscription is gone; reconnect and resubscribe.
        self.adapter.state.record_error(f"subscription status {status.Status}")
        self.lost.set()


@register_adapter
class OpcUaAdapter(SouthAdapter):
    """Subscribes to one OPC-UA server; see the module docstring."""

    section = "opcua"
    config_model = OpcUaServerConfig
    config: OpcUaServerConfig

    def __init__(
        self,
        config: OpcUaServerConfig,
        *,
        ingest: Ingest,
        gateway_id: str = "",
        data_dir: Path = Path(),
    ) -> None:
        super().__init__(config, ingest=ingest, gateway_id=gateway_id, data_dir=data_dir)
        self.decode_errors = DecodeErrorCounter()
        self._limits = input_limits(config.input_limits)
        self._client: Any = None
        self._nodes: dict[str, Any] = {}
        """Resolved asyncua nodes by metric name, for writes."""
        self._origin = Origin("opcua", address=config.endpoint)
        self.subscribed = 0
        """Monitored items created on the current connection."""

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, subscribe, wait for a loss; reconnect forever with backoff."""
        backoff = Backoff()
        while True:
            lost = asyncio.Event()
            client = self._make_client(lost)
            try:
                async with asyncio.timeout(self.config.timeout * 3):
                    await self._configure(client)
                    await client.connect()
                self._client = client
                await self._subscribe(client, lost)
                self.state.connected = True
                self.ready.set()
                backoff.reset()
                log.info("opcua %s: connected to %s", self.name, self.config.endpoint)
                await lost.wait()
                raise ConnectionError("connection lost")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a misbehaving server never stops the gateway
                if cancel_requested():
                    raise asyncio.CancelledError from e
                self.state.record_error(e)
                log.warning("opcua %s: %s; reconnecting", self.name, e)
            finally:
                self._client = None
                self._nodes = {}
                self.subscribed = 0
                self.state.connected = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 2.0)
            await backoff.wait()

    def _make_client(self, lost: asyncio.Event) -> Any:
        from asyncua.client.client import Client

        client = Client(self.config.endpoint, timeout=self.config.timeout, watchdog_intervall=1.0)

        async def on_lost(exc: Exception) -> None:
            self.state.record_error(exc)
            lost.set()

        client.connection_lost_callback = on_lost
        return client

    async def _configure(self, client: Any) -> None:
        from asyncua import ua
        from asyncua.crypto import security_policies

        c = self.config
        if c.username is not None:
            client.set_user(c.username)
        if c.password is not None:
            client.set_password(c.password)
        sec = c.security
        if sec.policy == "None":
            return
        assert sec.certificate is not None and sec.private_key is not None  # config checks it
        uri = _application_uri(sec.certificate)
        if uri:
            client.application_uri = uri
        policy = getattr(security_policies, f"SecurityPolicy{sec.policy}")
        await client.set_security(
            policy,
            certificate=str(sec.certificate),
            private_key=str(sec.private_key),
            server_certificate=str(sec.server_certificate) if sec.server_certificate else None,
            mode=getattr(ua.MessageSecurityMode, sec.mode),
        )

    async def resolve(self, client: Any, ref: str) -> Any:
        """A node from a node id or a browse path below the Objects folder."""
        if is_node_id(ref):
            return client.get_node(ref)
        return await client.nodes.objects.get_child([p for p in ref.split("/") if p])

    async def _subscribe(self, client: Any, lost: asyncio.Event) -> None:
        from asyncua import ua

        requests = []
        nodes = self.config.nodes
        for handle, item in enumerate(nodes, start=1):
            ref = item.node_id or item.browse_path or ""
            try:
                node = await self.resolve(client, ref)
            except Exception as e:
                # A wrong node in the map loses that metric, not the others.
                self.state.record_error(f"{item.metric}: cannot resolve {ref}: {e}")
                log.warning("opcua %s: %s: cannot resolve %s: %s", self.name, item.metric, ref, e)
                continue
            self._nodes[item.metric] = node
            requests.append(self._monitor_request(ua, node, handle, item))
        sub = await client.create_subscription(
            self.config.publishing_interval * 1000, _Handler(self, lost)
        )
        results = await sub.create_monitored_items(requests) if requests else []
        for req, res in zip(requests, results, strict=True):
            if isinstance(res, ua.StatusCode):
                item = nodes[req.RequestedParameters.ClientHandle - 1]
                self.state.record_error(f"{item.metric}: monitored item refused: {res.name}")
            else:
                self.subscribed += 1

    @staticmethod
    def _monitor_request(ua: Any, node: Any, handle: int, item: OpcUaNode) -> Any:
        params = ua.MonitoringParameters()
        params.ClientHandle = handle
        params.SamplingInterval = item.sampling_interval * 1000
        params.QueueSize = QUEUE_SIZE
        params.DiscardOldest = True
        if item.deadband is not None:
            flt = ua.DataChangeFilter()
            flt.Trigger = ua.DataChangeTrigger.StatusValue
            flt.DeadbandType = 1 if item.deadband_type == "absolute" else 2
            flt.DeadbandValue = float(item.deadband)
            params.Filter = flt
        rv = ua.ReadValueId()
        rv.NodeId = node.nodeid
        rv.AttributeId = ua.AttributeIds.Value
        req = ua.MonitoredItemCreateRequest()
        req.ItemToMonitor = rv
        req.MonitoringMode = ua.MonitoringMode.Reporting
        req.RequestedParameters = params
        return req

    # ------------------------------------------------------------------ data

    async def handle_change(self, handle: int, value: Any, data_value: Any) -> None:
        """One data change of monitored item ``handle`` (1-based index into ``nodes``)."""
        item = self.config.nodes[handle - 1]
        device = self.config.device_id
        status = getattr(data_value, "StatusCode", None)
        if status is not None and not status.is_good():
            self.decode_errors.record(
                self.state, device, "bad_status", f"{item.metric}: {status.name}"
            )
            return
        try:
            metric = to_metric(value, item.metric)
        except DecodeError as e:
            self.decode_errors.record(self.state, device, e.reason, e.detail)
            return
        reading = Reading(
            device_id=device,
            ts=_timestamp(data_value),
            metrics={item.metric: metric},
            origin=Origin("opcua", address=item.node_id or item.browse_path or ""),
        )
        try:
            # A String node's value and the source timestamp are the server's.
            self._limits.check_readings([reading], time.time())
        except DecodeError as e:
            self.decode_errors.record(self.state, device, e.reason, e.detail)
            return
        result = await self.ingest.submit([reading])
        if result is IngestStatus.ACCEPTED:
            self.state.record_readings(1)
        else:
            self.state.rejected += 1

    # ------------------------------------------------------------------ commands

    def _connected_client(self) -> Any:
        if self._client is None or not self.state.connected:
            raise ConnectionError(f"opcua {self.config.name} is not connected")
        return self._client

    def downlink(self, events: DownlinkEvents) -> Downlink | None:
        """Commands ``write`` (and, for OPC-UA, ``call``/method names); see
        :mod:`edgeway.south.write_downlink`."""
        from edgeway.south.write_downlink import WriteDownlink

        return WriteDownlink(self, self.config.device_id, events)

    def writable_point(self, metric: str) -> OpcUaNode:
        """The node a write of ``metric`` goes to: KeyError for an unknown
        metric, PermissionError for one not configured ``writable``."""
        item = next((n for n in self.config.nodes if n.metric == metric), None)
        if item is None:
            raise KeyError(f"no node {metric!r} on opcua server {self.config.name}")
        if not item.writable:
            raise PermissionError(f"{metric} is not writable (set writable: true)")
        return item

    async def write(self, metric: str, value: MetricValue) -> None:
        """Write ``value`` to a ``writable`` node, converted to the node's data type.

        :class:`KeyError` for an unknown metric, :class:`PermissionError` when the
        node is not marked writable, :class:`ConnectionError` when disconnected;
        the server's refusal raises asyncua's ``UaStatusCodeError``.
        """
        from asyncua import ua

        self.writable_point(metric)
        self._connected_client()
        node = self._nodes.get(metric)
        if node is None:
            raise KeyError(f"{metric}: node was not resolved on this server")
        vtype = await node.read_data_type_as_variant_type()
        await node.write_value(ua.DataValue(ua.Variant(_coerce(value, vtype, ua), vtype)))

    async def call(self, name: str, *args: Any) -> Sequence[Any] | Any:
        """Call a configured method with ``args``; returns its output argument(s)."""
        method = next((m for m in self.config.methods if m.name == name), None)
        if method is None:
            raise KeyError(f"no method {name!r} on opcua server {self.config.name}")
        client = self._connected_client()
        obj = await self.resolve(client, method.object)
        if is_node_id(method.method):
            meth = client.get_node(method.method)
        else:  # a browse path relative to the object
            meth = await obj.get_child([p for p in method.method.split("/") if p])
        return await obj.call_method(meth, *args)


def _coerce(value: MetricValue, vtype: Any, ua: Any) -> Any:
    """Python value for a variant type (a JSON command gives 1 for a Double)."""
    if vtype == ua.VariantType.Boolean:
        return bool(value)
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        return float(value)
    if vtype == ua.VariantType.String:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number for {vtype.name}, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer for {vtype.name}, got {value!r}")
    return int(value)
