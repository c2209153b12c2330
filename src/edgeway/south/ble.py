"""BLE advertisements (bleak): BTHome v2 sensors heard directly by the gateway.

Example (needs the ``ble`` extra and a Bluetooth adapter; on Linux, BlueZ)::

    ble:
      adapter: hci0
      scanning_mode: active
      devices:
        - {address: "A4:C1:38:8D:18:B2", device_id: kitchen-thermometer}
        - {address: "54:48:E6:8F:80:A5", device_id: bathroom-ht}
      allow_unknown: false

Each advertisement with BTHome service data (UUID 0xFCD2) from a listed
device (or from any device with ``allow_unknown``) becomes one reading.
BTHome devices repeat each packet several times; a repeat of the last packet
id from the same device is dropped. Encrypted BTHome is refused and counted.
Without a usable Bluetooth adapter the gateway stops at start-up with one
line saying so. Devices behind a BLE-to-MQTT bridge (Shelly, ESPHome,
Theengs) reach edgeway through the MQTT client adapter instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from edgeway.codecs.base import DecodeError
from edgeway.codecs.bthome import SERVICE_UUID, decode_bthome
from edgeway.ingest import Ingest, IngestStatus
from edgeway.reading import Origin, Reading
from edgeway.south.base import SouthAdapter, register_adapter
from edgeway.south.ble_config import BleSection
from edgeway.south.decode_errors import DecodeErrorCounter

log = logging.getLogger(__name__)

MAX_TRACKED_DEVICES = 1000
"""Devices whose last packet id is remembered for de-duplication. With
``allow_unknown`` every passing phone could add one; beyond the bound the
oldest is forgotten (a forgotten device may produce one duplicate)."""


class BleUnavailable(RuntimeError):
    """No usable Bluetooth adapter (or bleak is not installed)."""


@register_adapter
class BleAdapter(SouthAdapter):
    """Scans for BTHome advertisements; see the module docstring."""

    section = "ble"
    config_model = BleSection
    config: BleSection

    def __init__(
        self,
        config: BleSection,
        *,
        ingest: Ingest,
        gateway_id: str = "",
        data_dir: Path = Path(),
    ) -> None:
        super().__init__(config, ingest=ingest, gateway_id=gateway_id, data_dir=data_dir)
        self.decode_errors = DecodeErrorCounter()
        self._ids = {d.address.upper(): d.device_id for d in config.devices}
        self._last_packet: dict[str, int] = {}
        self.duplicates = 0
        self.ignored = 0
        """Advertisements from devices that are not configured."""
        self._pending: set[asyncio.Future[IngestStatus]] = set()

    def device_id_for(self, address: str) -> str | None:
        """The configured device id, ``bthome-<address>`` for unknown devices
        when ``allow_unknown``, else None."""
        addr = address.upper()
        dev = self._ids.get(addr)
        if dev is None and self.config.allow_unknown:
            dev = "bthome-" + addr.replace(":", "").lower()
        return dev

    def handle_advertisement(
        self, address: str, service_data: dict[str, bytes], now: float
    ) -> Reading | None:
        """Decode one advertisement and submit its reading (sans radio: tests call it)."""
        data = service_data.get(SERVICE_UUID)
        if data is None:
            return None
        device_id = self.device_id_for(address)
        if device_id is None:
            self.ignored += 1
            return None
        try:
            packet = decode_bthome(bytes(data))
        except DecodeError as e:
            self.decode_errors.record(self.state, device_id, e.reason, e.detail)
            return None
        if packet.packet_id is not None:
            if self._last_packet.get(device_id) == packet.packet_id:
                self.duplicates += 1
                return None
            self._last_packet.pop(device_id, None)
            self._last_packet[device_id] = packet.packet_id
            while len(self._last_packet) > MAX_TRACKED_DEVICES:
                self._last_packet.pop(next(iter(self._last_packet)))
        if not packet.metrics:
            return None
        reading = Reading(
            device_id=device_id,
            ts=now,
            metrics=packet.metrics,
            origin=Origin("ble", address=address.upper()),
            tags={f"unit:{k}": v for k, v in packet.units.items()},
        )
        fut = self.ingest.submit([reading])
        self._pending.add(fut)
        fut.add_done_callback(self._submitted)
        return reading

    def _submitted(self, fut: asyncio.Future[IngestStatus]) -> None:
        self._pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            self.state.record_error("ingest failed")
        elif fut.result() is IngestStatus.ACCEPTED:
            self.state.record_readings(1)
        else:
            self.state.rejected += 1

    def _on_detection(self, device: Any, adv: Any) -> None:
        self.handle_advertisement(str(device.address), dict(adv.service_data or {}), time.time())

    def _scanner_kwargs(self) -> dict[str, Any]:
        bluez: dict[str, Any] = {}
        if self.config.adapter:
            bluez["adapter"] = self.config.adapter
        if self.config.scanning_mode == "passive":
            # BlueZ only scans passively with a filter ("or_patterns"): match
            # service data for the 16-bit UUID 0xFCD2 (little-endian d2 fc).
            from bleak.args.bluez import OrPattern
            from bleak.assigned_numbers import AdvertisementDataType

            bluez["or_patterns"] = [
                OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\xd2\xfc")
            ]
        kwargs: dict[str, Any] = {"scanning_mode": self.config.scanning_mode}
        if bluez:
            kwargs["bluez"] = bluez
        return kwargs

    async def run(self) -> None:
        """Scan until cancelled. No adapter: :class:`BleUnavailable` with one line."""
        try:
            from bleak import BleakScanner
        except ImportError:
            raise BleUnavailable(
                "ble: bleak is not installed (pip install 'edgeway[ble]')"
            ) from None
        try:
            scanner = BleakScanner(self._on_detection, **self._scanner_kwargs())
            await scanner.start()
        except Exception as e:
            # BlueZ absent (no D-Bus socket), no hciN, adapter powered off: all
            # local and permanent until someone fixes the machine.
            if isinstance(e, FileNotFoundError):
                reason = "BlueZ is not reachable (no D-Bus system bus socket)"
            else:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            adapter = self.config.adapter or "default adapter"
            raise BleUnavailable(
                f"ble: no usable Bluetooth adapter ({adapter}): {reason}"
            ) from None
        self.state.connected = True
        self.ready.set()
        log.info("ble scanning (%s)", self.config.scanning_mode)
        try:
            await asyncio.Future()
        finally:
            self.state.connected = False
            with contextlib.suppress(Exception):
                await scanner.stop()
