"""The YAML configuration: schema (pydantic) and loading with precise errors.

Every error names the file, the line and the key path, and what was expected::

    edgeway.yaml:12: mqtt.listeners[0].bind: expected HOST:PORT, got '1883'

Unknown keys are errors (``extra="forbid"`` everywhere). ``edgeway check FILE``
runs :func:`load_config` and prints these errors without starting anything.

This module is the root of the schema and its loading. Each component owns its
section's model in a module next to it (``south/modbus_config.py``,
``south/mqtt/config.py``, ``outbox/config.py``, ...) that imports only the
shared value types of :mod:`edgeway.config_types`; adding a section is its model
there and one field of :class:`Config` here.

Example (every key is optional; this is close to the embedded defaults)::

    gateway:
      id: site-a-gw1
      data_dir: ./edgeway-data
    log: {level: info, format: text}
    mqtt:
      listeners:
        - {bind: "127.0.0.1:1883", allow_anonymous: true}
      telemetry_topics: ["devices/{device_id}/telemetry"]
    outbox: {durability: fsync}
    sinks:
      - {name: cloud, url: "https://ingest.example.com/v1/telemetry"}
"""

from __future__ import annotations

import difflib
import socket
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

# Each component owns its section's model, in a module that imports only
# edgeway.config_types (so reading a configuration loads no component code);
# the shared value types live in that leaf module. All are re-exported
# (__all__ at the end) for the code that imports them from here.
from edgeway.admin.config import AdminSection
from edgeway.alarms.config import AlarmsSection, AlarmTypeSection
from edgeway.commands.config import CommandsMqttSection, CommandsSection
from edgeway.config_types import (
    Duration,
    InputLimitsSection,
    PublicKeys,
    Size,
    TlsConfig,
    _Model,
    input_limits,
    is_loopback,
    parse_host_port,
)
from edgeway.devices.config import DevicesSection
from edgeway.firmware.config import FirmwareSection
from edgeway.ml.config import ModelsSection
from edgeway.outbox.config import OutboxSection
from edgeway.pipeline.config import PipelineSection, RouteConfig, RouteMatch
from edgeway.rules.config import RuleConfig, check_rules
from edgeway.runtime.fleet_config import FleetSection
from edgeway.sinks.config import SinkConfig
from edgeway.south.ble_config import BleDevice, BleSection
from edgeway.south.coap_config import CoapSection
from edgeway.south.http_config import HttpIngestSection
from edgeway.south.modbus_config import (
    ModbusDataType,
    ModbusDeviceConfig,
    ModbusFunction,
    ModbusGroup,
    ModbusPoint,
)
from edgeway.south.mqtt.config import (
    AclRule,
    ListenerConfig,
    MqttEventLog,
    MqttLimits,
    MqttSection,
    MqttUser,
)
from edgeway.south.mqtt_client_config import MqttClientConfig, MqttClientSubscription, MqttClientTls
from edgeway.south.opcua_config import OpcUaMethod, OpcUaNode, OpcUaSecurity, OpcUaServerConfig
from edgeway.south.serial_config import SerialCsv, SerialPortConfig
from edgeway.twins.config import TwinsSection


class GatewaySection(_Model):
    id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    """This gateway's id; part of every record id, so a cloud can tell gateways apart."""
    data_dir: Path = Path("./edgeway-data")
    """Outbox, retained messages, sessions and window state live here."""
    health_interval: Duration = 0.0
    """Send a health summary record of the gateway to every sink this often
    (``record_type: health``, see edgeway/health_report.py). 0: off."""


class LogSection(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level written."""
    format: Literal["text", "json"] = "text"
    """``text`` for people, ``json`` for one JSON object per line (log shippers)."""


class ReceiptsSection(_Model):
    enabled: bool = False
    """Publish a receipt once every sink a reading was routed to confirmed it."""
    topic: str = "devices/{device_id}/receipts"
    """Where receipts go; ``{device_id}`` is replaced."""


class Config(_Model):
    """The whole configuration file: one section per key (all optional)."""

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    """This gateway's identity and where it keeps its data."""
    log: LogSection = Field(default_factory=LogSection)
    """Log level and format."""
    mqtt: MqttSection = Field(default_factory=MqttSection)
    """The embedded MQTT broker devices connect to (docs/protocols/mqtt-broker.md, docs/security.md)."""
    outbox: OutboxSection = Field(default_factory=OutboxSection)
    """The durable store-and-forward queue between the pipeline and the sinks (docs/outbox.md)."""
    sinks: list[SinkConfig] = Field(default_factory=list)
    """Where readings go: one entry per cloud endpoint; each type's options are in the tables below (docs/sinks/)."""
    receipts: ReceiptsSection = Field(default_factory=ReceiptsSection)
    """Tell devices when the cloud has their readings (MQTT receipt messages)."""
    commands: CommandsSection = Field(default_factory=CommandsSection)
    """Commands to devices: the durable queue and its limits (docs/commands.md)."""
    models: ModelsSection = Field(default_factory=ModelsSection)
    """Edge ML: the model registry, inference budgets and rollback (docs/models.md)."""
    twins: TwinsSection = Field(default_factory=TwinsSection)
    """Device twins: desired/reported documents with versions (docs/twins.md)."""
    firmware: FirmwareSection = Field(default_factory=FirmwareSection)
    """Firmware images and update campaigns (docs/firmware.md)."""
    fleet: FleetSection = Field(default_factory=FleetSection)
    """Signed configurations pushed from the cloud through the command downlink (docs/fleet.md)."""
    alarms: AlarmsSection = Field(default_factory=AlarmsSection)
    """Alarms: latching, confirmation, shelving limits, health figures (docs/alarms.md)."""
    devices: DevicesSection = Field(default_factory=DevicesSection)
    """The device registry and device status (docs/devices.md)."""
    admin: AdminSection | None = None
    """The local admin API: health, status, metrics (docs/admin-api.md). Absent: off."""
    coap: CoapSection | None = None
    """The CoAP listener (docs/protocols/coap.md). Absent: off."""
    modbus: list[ModbusDeviceConfig] = Field(default_factory=list)
    """Modbus TCP/RTU devices polled by the gateway (docs/protocols/modbus.md)."""
    opcua: list[OpcUaServerConfig] = Field(default_factory=list)
    """OPC-UA servers subscribed to (docs/protocols/opcua.md)."""
    serial: list[SerialPortConfig] = Field(default_factory=list)
    """Serial line devices read line by line (docs/protocols/serial.md)."""
    ble: BleSection | None = None
    """BTHome Bluetooth LE advertisements (docs/protocols/ble.md). Absent: off."""
    http_ingest: HttpIngestSection | None = None
    """The HTTP ingest listener (docs/protocols/http.md). Absent: off."""
    mqtt_client: list[MqttClientConfig] = Field(default_factory=list)
    """External MQTT brokers the gateway subscribes to (docs/protocols/mqtt-client.md)."""
    routes: list[RouteConfig] = Field(default_factory=list)
    """Edge processing: which readings go where, through which steps (docs/pipeline.md)."""
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    """Settings of the pipeline itself (docs/pipeline.md)."""
    rules: Annotated[list[RuleConfig], AfterValidator(check_rules)] = Field(default_factory=list)
    """Local decisions: conditions over readings and the actions they take (docs/rules.md)."""
    input_limits: InputLimitsSection = Field(default_factory=InputLimitsSection)
    """What one device message may turn into, for every adapter (docs/limits.md)."""

    @model_validator(mode="after")
    def _resolve_input_limits(self) -> Self:
        # Each adapter gets the whole set: the top level with its own keys on top.
        top = self.input_limits
        sections: list[Any] = [self.mqtt, self.http_ingest, self.coap]
        sections += [*self.mqtt_client, *self.serial, *self.opcua]
        for section in sections:
            if section is not None:
                own = section.input_limits
                section.input_limits = top if own is None else own.over(top)
        return self


# --------------------------------------------------------------------------
# loading with file/line/key errors


@dataclass(slots=True, frozen=True)
class ConfigIssue:
    """One problem in a configuration file."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """Raised when a configuration is invalid; carries every issue found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Walk the composed YAML node tree along ``loc``; return the 1-based line
    of the deepest node reached (the key itself when the key exists)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == part:
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        else:
            return line
    return line


def unknown_key(name: object, known: Iterable[str]) -> str:
    """``unknown key 'listn', did you mean 'listen'?``: the message for a key
    no model has, with the nearest known key when one is close (difflib)."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"unknown key {str(name)!r}{hint}"


def _types_at(tp: Any, part: int | str) -> list[Any]:
    """The types that ``part`` (a key or an index) of a value of type ``tp`` may have."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _types_at(args[0], part)
    if origin in (typing.Union, types.UnionType):
        return [t for a in args for t in _types_at(a, part)]
    if origin in (list, tuple) and isinstance(part, int) and args:
        return [args[0]]
    if origin is dict and isinstance(part, str) and len(args) == 2:
        return [args[1]]
    if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
        field = tp.model_fields.get(part)
        return [field.annotation] if field is not None else []
    return []


def known_keys(loc: tuple[int | str, ...], root: type[BaseModel] | None = None) -> list[str]:
    """The keys the schema allows in the mapping at ``loc`` (empty if it is
    not a section, e.g. a free-form ``options`` mapping)."""
    current: list[Any] = [Config if root is None else root]
    for part in loc:
        current = [t for tp in current for t in _types_at(tp, part)]
    keys: set[str] = set()
    for tp in current:
        for model in _models(tp):
            keys.update(model.model_fields)
    return sorted(keys)


def _models(tp: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _models(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _models(a)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return []


def _keys_beside(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed next to the unknown one at ``loc``: from the schema,
    or, inside a route step (``routes[0].steps[1].window.sise``), from that
    step type's parameter model."""
    keys = known_keys(loc[:-1])
    if keys or "steps" not in loc:
        return keys
    at = loc.index("steps") + 2  # routes, i, steps, j, <type>, ...
    if at < len(loc) - 1 and isinstance(loc[at], str):
        from edgeway.pipeline.registry import step_types

        step = step_types().get(str(loc[at]))
        if step is not None:
            return known_keys(loc[at + 1 : -1], root=step.Params)
    return []


def _clean_message(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        loc = tuple(err.get("loc", ()))
        return unknown_key(loc[-1], _keys_beside(loc)) if loc else "unknown key"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "missing":
        return "required key is missing"
    got = err.get("input")
    if (
        kind != "model_type"
        and "got" not in msg
        and not isinstance(got, dict | list)
        and got is not None
    ):
        return f"{msg} (got {got!r})"
    return msg


@dataclass(slots=True, frozen=True)
class KeyLines:
    """Where the keys of one parsed configuration are: file name and the
    composed YAML tree, so later checks report ``file:line: key: message``."""

    filename: str
    root: yaml.Node | None = None

    def line(self, loc: tuple[int | str, ...]) -> int | None:
        """The 1-based line of ``loc`` (a key path), or None without a file."""
        return _line_of(self.root, loc)

    def issue(
        self, loc: tuple[int | str, ...], message: str, key: str | None = None
    ) -> ConfigIssue:
        """A :class:`ConfigIssue` for ``loc``; ``key`` overrides the shown key path."""
        return ConfigIssue(
            self.filename, self.line(loc), _key_path(loc) if key is None else key, message
        )


def _duplicate_keys(
    node: yaml.Node | None, loc: tuple[int | str, ...], lines: KeyLines
) -> list[ConfigIssue]:
    """Keys given twice in one mapping: YAML keeps the last silently, so a
    setting someone believes in is ignored. Reported at the second one."""
    out: list[ConfigIssue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                line = k.start_mark.line + 1
                if k.value in first:
                    out.append(
                        ConfigIssue(
                            lines.filename,
                            line,
                            _key_path((*loc, k.value)),
                            f"key {k.value!r} given twice (first on line {first[k.value]}); "
                            "YAML would keep only this one",
                        )
                    )
                else:
                    first[k.value] = line
                out += _duplicate_keys(v, (*loc, k.value), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, (*loc, i), lines)
    return out


def locate_key(filename: str, loc: tuple[int | str, ...]) -> int | None:
    """The line of ``loc`` (a key path) in a YAML file, or None if unknown."""
    try:
        root = yaml.compose(Path(filename).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError, ValueError):
        return None
    return _line_of(root, loc) if root is not None else None


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Parse and validate YAML text; raise :class:`ConfigError` on any problem."""
    return parse_config_lines(text, filename)[0]


def parse_config_lines(
    text: str, filename: str = "<config>", environ: Mapping[str, str] | None = None
) -> tuple[Config, KeyLines]:
    """:func:`parse_config`, also returning where each key is (for later checks).

    ``${VAR}`` references in values are expanded from ``environ`` (default:
    the process environment; see :mod:`edgeway.config_env`)."""
    from edgeway.config_env import construct, expand_tree

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        unset = expand_tree(root, environ)
        if unset:
            raise ConfigError(
                [
                    ConfigIssue(filename, n.start_mark.line + 1, _key_path(loc), m)
                    for loc, n, m in unset
                ]
            )
        data = construct(root) if root is not None else {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigIssue(filename, line, "", f"YAML syntax error: {e.problem or e}")]
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError([ConfigIssue(filename, None, "", f"YAML error: {e}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                ConfigIssue(
                    filename, 1, "", f"expected a mapping of sections, got {type(data).__name__}"
                )
            ]
        )
    lines = KeyLines(filename, root)
    issues = _duplicate_keys(root, (), lines)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        issues += [lines.issue(tuple(err["loc"]), _clean_message(dict(err))) for err in e.errors()]
        raise ConfigError(sorted(issues, key=lambda i: i.line or 0)) from None
    if issues:
        raise ConfigError(issues)
    return config, lines


def load_config(path: Path | str | None) -> Config:
    """Load a configuration file; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigIssue(str(p), None, "", f"cannot read: {e.strerror}")]) from None
    return parse_config(text, str(p))


# --------------------------------------------------------------------------
# command-line overrides


def apply_overrides(
    config: Config,
    *,
    data_dir: Path | None = None,
    mqtt_listen: Sequence[str] = (),
    sinks: Sequence[str] = (),
    log_level: str | None = None,
    log_format: str | None = None,
    gateway_id: str | None = None,
    coap_listen: str | None = None,
    http_listen: str | None = None,
    admin_listen: str | None = None,
) -> Config:
    """Apply command-line overrides to a loaded configuration.

    ``--mqtt-listen`` replaces the configured listeners with plain TCP ones;
    anonymous clients are allowed on a loopback address when the config file
    defines no users, never on another address. ``--sink URL`` adds a sink
    named ``sink1``, ``sink2``, ... after the configured ones. ``--coap-listen``
    and ``--http-listen`` turn those listeners on at the given address.
    """
    cfg = config.model_copy(deep=True)
    if data_dir is not None:
        cfg.gateway.data_dir = data_dir
    if gateway_id:
        cfg.gateway.id = gateway_id
    if mqtt_listen:
        listeners = []
        for bind in mqtt_listen:
            host, _ = parse_host_port(bind)
            listeners.append(
                ListenerConfig(bind=bind, allow_anonymous=is_loopback(host) and not cfg.mqtt.users)
            )
        cfg.mqtt.listeners = listeners
    taken = {s.name for s in cfg.sinks}
    n = 0
    for url in sinks:
        n += 1
        while f"sink{n}" in taken:
            n += 1
        cfg.sinks.append(SinkConfig(name=f"sink{n}", url=url))
        taken.add(f"sink{n}")
    if coap_listen:
        parse_host_port(coap_listen)
        if cfg.coap is None:
            cfg.coap = CoapSection(listen=coap_listen, input_limits=cfg.input_limits)
        else:
            cfg.coap.listen = coap_listen
            cfg.coap.enabled = True
    if http_listen:
        parse_host_port(http_listen)
        if cfg.http_ingest is None:
            # Same rule as --mqtt-listen: anonymous on loopback only.
            host, _ = parse_host_port(http_listen)
            cfg.http_ingest = HttpIngestSection(
                listen=http_listen,
                allow_anonymous=is_loopback(host),
                input_limits=cfg.input_limits,  # as the file's own sections get them
            )
        else:
            cfg.http_ingest.listen = http_listen
            cfg.http_ingest.enabled = True
    if admin_listen:
        # Keep the section's other keys (auth, allowed_hosts) and check them
        # again against the new address: auth none stays loopback-only.
        base = cfg.admin.model_dump() if cfg.admin is not None else {}
        cfg.admin = AdminSection.model_validate({**base, "listen": admin_listen, "enabled": True})
    if log_level:
        cfg.log.level = log_level  # type: ignore[assignment]
    if log_format:
        cfg.log.format = log_format  # type: ignore[assignment]
    return cfg


__all__ = [
    "AclRule",
    "AdminSection",
    "AlarmTypeSection",
    "AlarmsSection",
    "BleDevice",
    "BleSection",
    "CoapSection",
    "CommandsMqttSection",
    "CommandsSection",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DevicesSection",
    "Duration",
    "FirmwareSection",
    "FleetSection",
    "GatewaySection",
    "HttpIngestSection",
    "InputLimitsSection",
    "KeyLines",
    "ListenerConfig",
    "LogSection",
    "ModbusDataType",
    "ModbusDeviceConfig",
    "ModbusFunction",
    "ModbusGroup",
    "ModbusPoint",
    "ModelsSection",
    "MqttClientConfig",
    "MqttClientSubscription",
    "MqttClientTls",
    "MqttEventLog",
    "MqttLimits",
    "MqttSection",
    "MqttUser",
    "OpcUaMethod",
    "OpcUaNode",
    "OpcUaSecurity",
    "OpcUaServerConfig",
    "OutboxSection",
    "PipelineSection",
    "PublicKeys",
    "ReceiptsSection",
    "RouteConfig",
    "RouteMatch",
    "SerialCsv",
    "SerialPortConfig",
    "SinkConfig",
    "Size",
    "TlsConfig",
    "TwinsSection",
    "apply_overrides",
    "input_limits",
    "is_loopback",
    "known_keys",
    "load_config",
    "locate_key",
    "parse_config",
    "parse_config_lines",
    "parse_host_port",
    "unknown_key",
]
