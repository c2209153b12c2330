"""The model registry's configuration section (``models:``; docs/models.md)."""

from __future__ import annotations

from pydantic import Field

from edgeway.config_types import Duration, PublicKeys, Size, _Model


class ModelsSection(_Model):
    """The model registry and the inference thread (``edgeway.ml``, docs/models.md)."""

    enabled: bool = True
    """Keep a model registry and run ``model`` steps (needs the ``ml`` extra:
    onnxruntime). Off: ``model`` steps pass readings through unscored."""
    max_size: Size = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest model file accepted by an upload."""
    keys: PublicKeys = Field(default_factory=dict)
    """Trusted Ed25519 public keys by name (PEM text, or base64 of the 32 raw
    bytes); an upload's signature must match one of them."""
    require_signature: bool = False
    """Refuse uploads without a valid signature."""
    queue: int = Field(default=1000, ge=1, le=1_000_000)
    """Inference jobs (one per step batch) waiting for the inference thread;
    beyond it rows are not scored and are counted (``dropped``)."""
    window: int = Field(default=200, ge=10, le=100_000)
    """Calls each version's budget is judged over."""
    min_calls: int = Field(default=20, ge=1)
    """Calls a version makes before it is judged."""
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    """Share of failed calls (an exception, a NaN or infinite output) over which a
    version is taken out of service (an active one rolled back)."""
    max_latency: Duration = Field(default=0.05, gt=0)
    """p99 of a version's call latency over which it is taken out of service."""
    agree_within: float = Field(default=0.05, ge=0)
    """Shadow comparison: outputs that differ by at most this count as agreeing."""
