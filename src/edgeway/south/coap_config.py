"""The CoAP listener's configuration section (``coap:``; docs/protocols/coap.md)."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from edgeway.config_types import (
    Duration,
    HostPort,
    InputLimitsSection,
    Size,
    _check_codec,
    _Model,
)


class CoapSection(_Model):
    """The CoAP listener (``edgeway.south.coap``)."""

    enabled: bool = True
    """Run the CoAP listener (the section's presence turns it on)."""
    listen: HostPort = "127.0.0.1:5683"
    """``HOST:PORT`` (UDP); port 0 picks a free port (logged at start)."""
    allow_anonymous: bool = True
    """Accept requests for devices that have no CoAP token in the credential
    store, without a token. ``true`` (the default, as before per-device
    tokens): a trusted network; ``false``: only devices given a token
    (``edgeway credentials issue ID --kind coap``, sent as the Uri-Query
    ``token=...``) may post. A device that has a token must always send it."""
    max_body_size: Size = 64 * 1024
    """Largest request body accepted, after Block1 reassembly (4.13 beyond).
    64 KiB: a SenML pack of a few hundred records; a body is held in memory
    until the outbox has it, for every device uploading at once."""
    default_format: str = "json"
    """Codec for requests without a Content-Format option."""
    codec_options: dict[str, Any] = Field(default_factory=dict)
    """Options for the codec of each content format, by codec name."""
    retry_after: Duration = 5.0
    """Max-Age sent with 5.03 when the outbox refuses new readings."""
    probe_interval: Duration = 5.0
    """Seconds between the listener's checks of itself: a CoAP ping from the
    gateway to its own listener. When three pings in a row (1 s each) go
    unanswered the listener is marked not serving (``/healthz`` 503) and
    restarted. 5 s: a listener that stopped reading is noticed within about
    8 s, for one 4-byte datagram per interval. 0 turns the checks off."""
    device_data_allow_anonymous: bool = False
    """Let requests without a token read and patch a device's twin and download
    its firmware (``devices/{id}/twin...``, ``devices/{id}/firmware/...``), for
    devices that have no CoAP token in the credential store. Off even with
    ``allow_anonymous``: whoever sends such a request acts as the device
    (reads its desired state, writes its reported state)."""
    unregistered: Literal["allow", "refuse"] = "allow"
    """Devices the registry does not know: ``allow`` (listed as unregistered) or
    ``refuse`` (4.03 Forbidden). See docs/devices.md."""
    observe: Literal["allow", "deny"] = "allow"
    """Who may observe ``devices/{id}/commands``: ``allow``: clients whose
    address is in ``observe_networks`` (any address when that is empty);
    ``deny``: nobody (4.03 Forbidden; devices poll with a plain GET)."""
    observe_networks: list[str] = Field(default_factory=list)
    """Client networks (CIDR, e.g. ``10.20.0.0/16``) allowed to observe, and
    with ``commands`` on, to poll commands and post results; empty: any.
    Without DTLS the source address is the only identity CoAP offers; others
    get 4.03 Forbidden."""
    max_observations: int = Field(default=1000, ge=0)
    """Observations held at once over all clients (5.03 with Max-Age beyond).
    Each holds a task, a pipe and its request in memory (9.1 KB measured with
    tracemalloc over 2,000 observations): 1,000 is about 9 MB, a site's
    devices several times over."""
    max_observations_per_address: int = Field(default=8, ge=0)
    """Observations held at once per client IP address (5.03 with Max-Age
    beyond), so that one address cannot take the whole ``max_observations``.
    An address holds one observation per device (observing it again replaces
    the old one), so 8 is a gateway or host behind one address watching 8
    devices' commands."""
    commands: bool = False
    """Take commands to devices over this listener: devices observe (or GET)
    ``devices/{id}/commands`` and POST results to
    ``devices/{id}/commands/{command_id}/result``. Off by default: without
    DTLS a CoAP client has no credentials, so whoever can reach the port (from
    ``observe_networks``, when set) can take any device's commands. Turn it on
    on a trusted network only."""
    command_poll_wait: Duration = Field(default=1.0, gt=0, le=60)
    """Longest wait of a plain GET (no Observe) of ``devices/{id}/commands`` for
    the queue to hand it a command (2.05 with an empty payload after it). A
    queued command is handed over after one commit (a few ms); 1 s leaves room
    for a busy disk. Devices that wait longer should observe instead."""
    max_command_polls: int = Field(default=1000, ge=1)
    """Plain GETs of commands waiting at once (5.03 with Max-Age beyond): each
    holds a request and a task (a few KB) for up to ``command_poll_wait``."""
    dedup_max_entries: int = Field(default=20_000, ge=1)
    """Requests remembered at once to answer their retransmissions with the
    same response (RFC 7252 4.5, for 247 s each); beyond, the oldest are
    forgotten early and a late retransmission of one is processed as a new
    request (at worst a duplicate reading). 20,000: 80 requests/s for the whole
    247 s, and a retransmission comes within 45 s, so early forgetting starts
    beyond about 440 requests/s; about 6.5 MB."""
    dedup_max_bytes: Size = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Memory the remembered requests may hold (280 bytes each plus the
    encoded answer, plus 240 bytes per sender); the oldest are forgotten
    beyond. 8 MiB holds the 20,000 entries from up to about 14,000 addresses
    at once."""
    dedup_max_per_address: int = Field(default=2_000, ge=1)
    """Requests remembered per IPv4 address or IPv6 /64: a sender at its share
    forgets its own oldest, so one source cannot push everyone else's out. A
    device sends far fewer (one a second is 247); 2,000 leaves room for a few
    devices behind one NAT address."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this adapter (only the keys given)."""

    @field_validator("observe_networks")
    @classmethod
    def _check_observe_networks(cls, v: list[str]) -> list[str]:
        for i, net in enumerate(v):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"[{i}]: {e}") from None
        return v

    @model_validator(mode="after")
    def _check_codecs(self) -> Self:
        # So that `edgeway check` finds these, not only the adapter at start-up.
        for name, options in self.codec_options.items():
            try:
                _check_codec(name, options)
            except ValueError as e:
                raise ValueError(f"codec_options.{name}: {e}") from None
        try:
            _check_codec(self.default_format, self.codec_options.get(self.default_format, {}))
        except ValueError as e:
            raise ValueError(f"default_format: {e}") from None
        return self
