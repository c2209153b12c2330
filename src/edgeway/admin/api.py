"""The local admin API: health probes, status and Prometheus metrics.

Configuration (off unless configured; ``--admin-listen HOST:PORT`` turns it on)::

    admin:
      listen: "127.0.0.1:9180"
      auth: tokens            # absent: none on loopback, tokens elsewhere
      metrics_public: false
      allowed_hosts: [gw1.example.com]

Endpoints (the reference with examples is docs/admin-api.md):

``GET /livez``  (no token)
    ``200 {"status": "alive"}`` while the process answers at all.
``GET /readyz``  (no token)
    ``200 {"status": "ready"}`` once started, ``503`` while starting or stopping.
``GET /healthz``  (no token)
    ``200 {"status": "ok"}`` once the gateway is ready, ``503 {"status":
    "starting"}`` before; ``503 {"status": "degraded", "problems": [...]}``
    while a part has stopped serving (a device listener that is down or
    restarting).
``GET /api/status``  (role viewer)
    One JSON document: gateway id, uptime, build (version, Python), process
    CPU and memory, broker counters, outbox counters per sink (``accepted =
    delivered + pending + dropped``), sink and adapter states.
``GET /metrics``  (role viewer, or no token with ``admin.metrics_public``)
    The same figures in the Prometheus text format (``edgeway_*``, plus the
    standard ``process_*``), built at scrape time from the live objects by a
    custom collector, so there is no per-message cost for metrics.

Who may call what is :mod:`edgeway.admin.access`; tokens are
:mod:`edgeway.admin.tokens`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import ssl
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from edgeway.admin.access import AccessControl, HostPolicy, public, requires
from edgeway.admin.alarms_api import AlarmRoutes, alarm_metrics
from edgeway.admin.audit_api import AuditRoutes
from edgeway.admin.build import BuildInfo, build_info, process_figures
from edgeway.admin.commands_api import CommandRoutes
from edgeway.admin.config_api import ConfigRoutes
from edgeway.admin.devices_api import DeviceRoutes
from edgeway.admin.errors import json_errors
from edgeway.admin.firmware_api import FirmwareRoutes
from edgeway.admin.hmi import HmiRoutes, RecentLogs
from edgeway.admin.models_api import ModelRoutes
from edgeway.admin.openapi import build_openapi
from edgeway.admin.provisioning_api import ProvisioningRoutes
from edgeway.admin.recent import RecentValues
from edgeway.admin.rules_api import RuleRoutes
from edgeway.admin.tokens import DB_NAME, Role, TokenStore, TokenStoreError
from edgeway.admin.twins_api import TwinRoutes
from edgeway.admin.users import DB_NAME as USERS_DB_NAME
from edgeway.admin.users import UserStore, UserStoreError
from edgeway.audit import AuditLog
from edgeway.config_types import is_loopback, parse_host_port
from edgeway.runtime.component import METRIC_PREFIX, MetricKind, Sample

if TYPE_CHECKING:
    from edgeway.admin.config import AdminSection
    from edgeway.alarms.service import AlarmService
    from edgeway.commands.service import CommandService
    from edgeway.devices.service import DeviceService
    from edgeway.firmware.service import FirmwareService
    from edgeway.ml.manager import ModelManager
    from edgeway.outbox.store import Outbox
    from edgeway.rules.stage import RuleStage
    from edgeway.twins.service import TwinService

log = logging.getLogger(__name__)

StatusSource = Callable[[], dict[str, Any]]
SampleSource = Callable[[], Iterable[Sample]]
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")
"""Characters a metric name cannot hold (a reason key may bring them)."""


class SampleCollector:
    """A prometheus-client collector over the components' typed stats, read on
    scrape: each :class:`~edgeway.runtime.component.Sample` names its metric,
    type, help and labels (declared on the stats dataclass field), so nothing
    here knows a figure by name. Samples of one metric form one family."""

    def __init__(self, samples: SampleSource) -> None:
        self._samples = samples

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for sample in self._samples():
            spec = sample.spec
            family = families.get(spec.name)
            if family is None:
                kind = CounterMetricFamily if spec.kind is MetricKind.COUNTER else GaugeMetricFamily
                name = _METRIC_NAME.sub("_", METRIC_PREFIX + spec.name)
                labels = [label for label, _ in sample.labels]
                family = families[spec.name] = kind(name, spec.help, labels=labels)
            family.add_metric([value for _, value in sample.labels], sample.value)
        yield from families.values()


class AlarmCollector:
    """The alarm service's and the device registry's figures, from the status
    document on scrape. Neither is a component with typed stats yet; when they
    are, their figures move to :class:`SampleCollector`."""

    def __init__(self, status: StatusSource) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        status = self._status()
        yield from alarm_metrics(status.get("alarms"))
        yield from _device_metrics(status.get("devices"))


def _device_metrics(devices: dict[str, Any] | None) -> Iterator[Any]:
    """Devices by registry status (as of the last status flush) and the
    lifecycle events held back by the limiter."""
    if not devices:
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    by_status = GaugeMetricFamily(
        "edgeway_devices", "Devices in the registry by status", labels=["status"]
    )
    for status, n in sorted((devices.get("by_status") or {}).items()):
        by_status.add_metric([str(status)], float(n))
    yield by_status
    suppressed = CounterMetricFamily(
        "edgeway_device_events_suppressed", "Lifecycle events over events_per_second"
    )
    suppressed.add_metric([], float(devices.get("events_suppressed", 0)))
    yield suppressed


class BuildInfoCollector:
    """``edgeway_build_info{version,python,implementation} 1``: the usual
    Prometheus idiom, so a dashboard can join any series with the version."""

    def __init__(self, info: BuildInfo) -> None:
        self._info = info

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily(
            "edgeway_build_info",
            "edgeway version and the Python running it (value always 1)",
            labels=["version", "python", "implementation"],
        )
        g.add_metric([self._info.version, self._info.python, self._info.implementation], 1.0)
        yield g


class AdminServer:
    """Serves the admin endpoints on one address.

    ``status`` gives the gateway's figures (``/api/status``), ``samples`` the
    same as metric samples (``/metrics``), ``ready`` whether start-up is
    done, ``stopping`` whether shutdown began (``/readyz`` turns 503 so a
    load balancer stops sending). ``access`` decides who may call what.
    """

    def __init__(
        self,
        host: str,
        port: int,
        status: StatusSource,
        ready: Callable[[], bool],
        *,
        access: AccessControl,
        stopping: Callable[[], bool] = lambda: False,
        problems: Callable[[], list[str]] = list,
        ssl_context: ssl.SSLContext | None = None,
        data_dir: Path | None = None,
        recent: RecentValues | None = None,
        samples: SampleSource = tuple,
    ) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.host = host
        self.port = port
        self._status = status
        self._ready = ready
        self._problems = problems
        self._stopping = stopping
        self.access = access
        self.build = build_info()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SampleCollector(samples))
        self._registry.register(AlarmCollector(status))
        self._registry.register(BuildInfoCollector(self.build))
        # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux /proc)
        ProcessCollector(registry=self._registry)
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None
        self.config_control: Any = None
        """The running gateway's configuration operations (Gateway), for
        :mod:`edgeway.admin.config_api`."""
        self.commands: CommandService | None = None
        """The gateway's command queue, when commands are enabled (routes in
        :mod:`edgeway.admin.commands_api`)."""
        self.firmware: FirmwareService | None = None
        """Firmware images and campaigns (routes in :mod:`edgeway.admin.firmware_api`)."""
        self.twins: TwinService | None = None
        """The gateway's twins, when enabled (routes in :mod:`edgeway.admin.twins_api`)."""
        self.models: ModelManager | None = None
        """The gateway's model registry, when models are enabled (routes in
        :mod:`edgeway.admin.models_api`)."""
        self.ssl_context = ssl_context
        self.data_dir = data_dir
        """Where the gateway keeps its stores (provisioning keys are read there)."""
        self.recent = recent if recent is not None else RecentValues()
        """Each device's latest values and short trends for the HMI; the
        gateway feeds it from the ingest switch (:mod:`edgeway.admin.recent`)."""
        self.logs = RecentLogs()
        self.hmi = HmiRoutes(
            access, status, self.recent, self.logs, lambda: data_dir,
            secure_cookie=ssl_context is not None, outbox=lambda: self.outbox(),
        )  # fmt: skip
        self._openapi: bytes | None = None
        self.alarms: AlarmService | None = None
        """The gateway's alarms (routes in :mod:`edgeway.admin.alarms_api`)."""
        self.audit: AuditLog | None = None
        """Where change requests are recorded (:mod:`edgeway.admin.audit_api`);
        opened by :meth:`start`."""
        self.devices: DeviceService | None = None
        """The device registry, when enabled (routes in :mod:`edgeway.admin.devices_api`)."""
        self.outbox: Callable[[], Outbox | None] = lambda: None
        """The running outbox (a reload may open another): dead letters
        replayed from the HMI."""
        self.rules: Callable[[], RuleStage | None] = lambda: None
        """The running pipeline's rules (a reload replaces them): the rules page."""

    @classmethod
    def from_config(
        cls,
        config: AdminSection,
        data_dir: Path,
        status: StatusSource,
        ready: Callable[[], bool],
        stopping: Callable[[], bool] = lambda: False,
        problems: Callable[[], list[str]] = list,
        samples: SampleSource = tuple,
    ) -> AdminServer:
        """The server ``config`` describes; opens ``data_dir/tokens.db`` when
        tokens are required. Raises ValueError naming ``admin.auth`` when
        tokens are off on an address that is not loopback."""
        host, port = parse_host_port(config.listen)
        tokens: TokenStore | None = None
        users: UserStore | None = None
        if config.tokens_required:
            try:
                tokens = TokenStore(data_dir / DB_NAME, busy_timeout=0)
            except TokenStoreError as e:
                raise ValueError(f"admin.auth: tokens: cannot open the token store: {e}") from e
            try:
                users = UserStore(data_dir / USERS_DB_NAME, busy_timeout=0)
            except UserStoreError as e:
                tokens.close()
                raise ValueError(f"admin.auth: tokens: cannot open the user store: {e}") from e
        elif not is_loopback(host):
            # The config schema refuses this too; a programmatic Config may not.
            raise ValueError(
                f"admin.auth: none is only allowed on a loopback admin.listen, got {config.listen!r}"
            )
        access = AccessControl(
            HostPolicy(host, tuple(config.allowed_hosts)),
            tokens,
            metrics_public=config.metrics_public,
            users=users,
        )
        ssl_context = None
        if config.tls is not None:
            from edgeway.south.mqtt.listeners import build_server_ssl_context

            try:
                ssl_context = build_server_ssl_context(config.tls)
            except (OSError, ValueError) as e:
                raise ValueError(f"admin.tls: {e}") from e
        server = cls(
            host, port, status, ready, access=access, stopping=stopping, problems=problems,
            ssl_context=ssl_context, data_dir=data_dir, samples=samples,
            recent=RecentValues(
                points_per_series=config.trend_points, max_series=config.trend_series
            ),
        )  # fmt: skip
        server.audit = AuditLog(data_dir)
        return server

    def _app(self) -> web.Application:
        audit = AuditRoutes(lambda: self.audit)
        app = web.Application(middlewares=[json_errors, self.access.middleware, audit.middleware])
        audit.add_to(app)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/metrics", self._metrics)
        DeviceRoutes(lambda: self.devices).add_to(app)
        ProvisioningRoutes(self.data_dir).add_to(app)
        CommandRoutes(lambda: self.commands).add_to(app)
        AlarmRoutes(lambda: self.alarms).add_to(app)
        ConfigRoutes(lambda: self.config_control).add_to(app)
        ModelRoutes(lambda: self.models).add_to(app)
        RuleRoutes(lambda: self.rules()).add_to(app)
        TwinRoutes(lambda: self.twins).add_to(app)
        self.hmi.add_to(app)
        app.router.add_get("/api/openapi.json", self._openapi_doc)
        FirmwareRoutes(lambda: self.firmware).add_to(app)
        return app

    async def start(self) -> None:
        if self.audit is not None:
            await self.audit.open()
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context
        )
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise OSError(
                f"cannot listen on {self.host}:{self.port} (admin API): {e.strerror}"
            ) from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.bound = sockets[0].getsockname()[:2] if sockets else (self.host, self.port)
        logging.getLogger().addHandler(self.logs)
        scheme = "https" if self.ssl_context is not None else "http"
        log.info("admin API and HMI on %s://%s:%d/", scheme, *self.bound)
        tokens = self.access.tokens
        if tokens is None:
            log.info(
                "admin API: no tokens needed on loopback listener %s:%d (admin.auth); "
                "anyone who can reach it may use every endpoint",
                *self.bound,
            )
        else:
            try:
                active = sum(1 for t in tokens.list() if t.revoked is None)
            except TokenStoreError:
                active = 0
            if not active:
                log.warning(
                    "admin API requires tokens and none exists yet: create one with "
                    "'edgeway tokens create --name NAME --role viewer' (works while running)"
                )
            users = self.access.users
            with contextlib.suppress(UserStoreError):
                if users is not None and not users.list():
                    log.warning(
                        "the HMI has no users yet: create the first administrator with "
                        "'edgeway users add NAME --role admin' (works while running)"
                    )

    async def close(self) -> None:
        logging.getLogger().removeHandler(self.logs)
        self.hmi.closing.set()  # live channels end, so the runner need not wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.access.tokens is not None:
            self.access.tokens.close()
        if self.access.users is not None:
            self.access.users.close()
        if self.audit is not None:
            await self.audit.close()

    @public
    async def _livez(self, request: web.Request) -> web.Response:
        """Liveness: 200 while the process answers at all."""
        return web.json_response({"status": "alive"})

    @public
    async def _readyz(self, request: web.Request) -> web.Response:
        """Readiness: 200 once started, 503 while starting or stopping."""
        if self._stopping():
            return web.json_response({"status": "stopping"}, status=503)
        if self._ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    @public
    async def _healthz(self, request: web.Request) -> web.Response:
        """Health: 200 ok, or 503 starting / degraded with the problems."""
        if not self._ready():
            return web.json_response({"status": "starting"}, status=503)
        problems = self._problems()
        if problems:
            return web.json_response({"status": "degraded", "problems": problems}, status=503)
        return web.json_response({"status": "ok"})

    @requires(Role.VIEWER)
    async def _openapi_doc(self, request: web.Request) -> web.Response:
        """This API described in OpenAPI 3.1 (built from the routes)."""
        if self._openapi is None:
            self._openapi = orjson.dumps(build_openapi(request.app))
        return web.Response(body=self._openapi, content_type="application/json")

    @requires(Role.VIEWER)
    async def _api_status(self, request: web.Request) -> web.Response:
        """Every part's counters and state, with build and process figures."""
        status = {
            **self._status(),
            "build": dataclasses.asdict(self.build),
            "process": dataclasses.asdict(process_figures()),
        }
        body = orjson.dumps(status, default=str, option=orjson.OPT_NON_STR_KEYS)
        return web.Response(body=body, content_type="application/json")

    @requires(Role.VIEWER)
    async def _metrics(self, request: web.Request) -> web.Response:
        """The figures in the Prometheus text format (edgeway_*, process_*)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(
            body=generate_latest(self._registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
