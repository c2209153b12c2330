"""OPC-UA servers' configuration (``opcua:``; docs/protocols/opcua.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator

from edgeway.config_types import (
    Duration,
    InputLimitsSection,
    _Model,
)


class OpcUaNode(_Model):
    """One OPC-UA variable mapped to a metric."""

    metric: str = Field(min_length=1)
    """Metric name in the reading."""
    node_id: str | None = None
    """``ns=2;i=1001`` or ``ns=2;s=Boiler.Temp``."""
    browse_path: str | None = None
    """From the Objects folder: ``2:Boiler/2:Temperature``."""
    sampling_interval: Duration = 1.0
    """How often the server samples the variable."""
    deadband: float | None = Field(default=None, ge=0)
    """Report only changes larger than this (none: every change)."""
    deadband_type: Literal["absolute", "percent"] = "absolute"
    """``percent`` is of the variable's EURange."""
    writable: bool = False
    """Allow ``write()`` commands to this node."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("give exactly one of 'node_id' and 'browse_path'")
        return self


class OpcUaMethod(_Model):
    """A method that commands may call."""

    name: str = Field(min_length=1)
    """Name that ``call()`` uses."""
    object: str
    """Node id or browse path of the object that owns the method."""
    method: str
    """Node id of the method, or its browse name relative to ``object`` (``2:Reset``)."""


class OpcUaSecurity(_Model):
    policy: Literal["None", "Basic256Sha256"] = "None"
    """Security policy of the secure channel."""
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    """Message security mode with a policy other than None."""
    certificate: Path | None = None
    """Our client certificate (DER or PEM); required with Basic256Sha256."""
    private_key: Path | None = None
    """Key of ``certificate`` (PEM or DER, unencrypted)."""
    server_certificate: Path | None = None
    """Pin the server's certificate; absent: take the one the endpoint offers."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if self.policy != "None" and (self.certificate is None or self.private_key is None):
            raise ValueError(f"policy {self.policy} needs 'certificate' and 'private_key'")
        return self


class OpcUaServerConfig(_Model):
    """One OPC-UA server subscribed to by ``edgeway.south.opcua``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name (logs, state, commands)."""
    enabled: bool = True
    """Subscribe to this server."""
    device_id: str = Field(min_length=1, max_length=128)
    """Device id of the readings."""
    endpoint: str = Field(pattern=r"^opc\.tcp://")
    """Server endpoint URL, ``opc.tcp://host:port/path``."""
    username: str | None = None
    """User name token; absent: anonymous."""
    password: str | None = None
    """Password of ``username``."""
    security: OpcUaSecurity = Field(default_factory=OpcUaSecurity)
    """Secure channel policy, mode and certificates."""
    publishing_interval: Duration = 1.0
    """Subscription publishing interval."""
    timeout: Duration = 5.0
    """Request timeout; connecting may take three times this."""
    nodes: list[OpcUaNode] = Field(min_length=1)
    """Variables monitored, one metric each."""
    methods: list[OpcUaMethod] = Field(default_factory=list)
    """Methods commands may call."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this server (only the keys given):
    string values and source timestamps come from the server."""
