"""BTHome v2 decoding (published example frames) and the BLE adapter without a radio."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ingest_doubles import RecordingIngest

from edgeway.codecs.base import DecodeError, get_codec
from edgeway.codecs.bthome import SERVICE_UUID, BTHomeCodec, decode_bthome
from edgeway.config import BleSection, parse_config
from edgeway.ingest import IngestStatus
from edgeway.reading import Origin
from edgeway.south.ble import BleAdapter, BleUnavailable

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocols" / "ble.md"


def frame(hex_objects: str, info: int = 0x40) -> bytes:
    return bytes([info]) + bytes.fromhex(hex_objects)


# The per-object examples of the BTHome format documentation (bthome.io/format):
# object bytes -> (property, value).
FORMAT_EXAMPLES = [
    ("0161", "battery", 97),
    ("02CA09", "temperature", 25.06),
    ("03BF13", "humidity", 50.55),
    ("04138A01", "pressure", 1008.83),
    ("05138A14", "illuminance", 13460.67),
    ("065E1F", "mass", 80.3),
    ("08CA06", "dewpoint", 17.38),
    ("0960", "count", 96),
    ("0A138A14", "energy", 1346.067),
    ("0B021B00", "power", 69.14),
    ("0C020C", "voltage", 3.074),
    ("0D120C", "pm2_5", 3090),
    ("12E204", "co2", 1250),
    ("14020C", "moisture", 30.74),
    ("2E23", "humidity", 35),
    ("3D0960", "count", 24585),
    ("3F020C", "rotation", 307.4),
    ("400C00", "distance", 12),
    ("414E00", "distance_m", 7.8),
    ("424E3400", "duration", 13.39),
    ("434E34", "current", 13.39),
    ("451301", "temperature", 27.5),
    ("4D12138A14", "energy", 344593.17),
    ("4A020C", "voltage", 307.4),
    ("5DE9FF", "current", -0.023),
    ("1101", "opening", True),
    ("2D00", "window", False),
    ("3A04", "button", "long_press"),
]


@pytest.mark.parametrize(("objects", "name", "value"), FORMAT_EXAMPLES)
def test_format_documentation_examples(objects: str, name: str, value: object) -> None:
    packet = decode_bthome(frame(objects))
    assert packet.metrics == {name: pytest.approx(value) if isinstance(value, float) else value}


def test_full_advertisements() -> None:
    # A thermometer (answer on the bthome-ble issue tracker, #118):
    # packet id 63, battery 94 %, 21.78 °C, 60.60 %, 2.947 V.
    p = decode_bthome(bytes.fromhex("40003f015e02820803ac170c830b"))
    assert p.packet_id == 63
    assert p.metrics == {"battery": 94, "temperature": 21.78, "humidity": 60.6, "voltage": 2.947}
    assert p.units == {"battery": "%", "temperature": "Cel", "humidity": "%", "voltage": "V"}
    # Shelly BLU H&T Display (bthome-ble test vectors): packet 46, battery 100 %,
    # light on, humidity 52 % (uint8), 27.8 °C (sint16 x 0.1).
    p = decode_bthome(b"\x40\x00\x2e\x01\x64\x1e\x01\x2e\x34\x45\x16\x01")
    assert p.packet_id == 46
    assert p.metrics == {"battery": 100, "light": True, "humidity": 52, "temperature": 27.8}
    # trigger-based device (info bit 2) with a dimmer event and a firmware version
    p = decode_bthome(frame("3C0203F100010204", info=0x44))
    assert p.trigger_based
    assert p.metrics == {"dimmer": "rotate_right", "dimmer_steps": 3, "firmware_version": "4.2.1.0"}
    # two objects of one kind, text and raw
    p = decode_bthome(frame("02CA0902C409530548656C6C6F5403010203"))
    assert p.metrics == {
        "temperature": 25.06,
        "temperature_2": 25.0,
        "text": "Hello",
        "raw": "010203",
    }


def test_refusals() -> None:
    cases = {
        b"": "empty",
        b"\x41\xa4\x72\x66\xc9\x5f\x73\x00\x11\x22\x33\x78\x23\x72\x14": "encrypted",
        b"\xe1\x02\x00\x0c\x04\x04\x13\x8a\x01": "unsupported_version",  # version 7
        b"\x20\x02\xca\x09": "unsupported_version",  # version 1
        frame("02CA"): "truncated",
        frame("53"): "truncated",
        frame("0161FE00"): "unknown_object",
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeError) as e:
            decode_bthome(data)
        assert e.value.reason == reason, data.hex()


@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_a_decode_error_or_a_packet(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_bthome(data)


def test_codec_registration_and_units() -> None:
    codec = get_codec("bthome")
    assert isinstance(codec, BTHomeCodec)
    (r,) = codec.decode(frame("02CA09"), device_id="t1", origin=Origin("mqtt"), now=5.0)
    assert (
        r.metrics == {"temperature": 25.06}
        and r.tags == {"unit:temperature": "Cel"}
        and r.ts == 5.0
    )
    with pytest.raises(DecodeError):
        codec.decode(frame("02CA09"), device_id=None, origin=Origin("mqtt"), now=5.0)


# ---------------------------------------------------------------- adapter


async def test_adapter_maps_devices_dedups_and_counts() -> None:
    ingest = RecordingIngest()
    cfg = BleSection(devices=[{"address": "a4:c1:38:8d:18:b2", "device_id": "kitchen"}])
    adapter = BleAdapter(cfg, ingest=ingest)
    adv = {SERVICE_UUID: bytes.fromhex("40003f015e02820803ac170c830b")}
    assert adapter.handle_advertisement("A4:C1:38:8D:18:B2", adv, 100.0) is not None
    assert adapter.handle_advertisement("A4:C1:38:8D:18:B2", adv, 100.5) is None  # repeat
    assert adapter.duplicates == 1
    adv2 = {SERVICE_UUID: bytes.fromhex("400040015e02830803ac17")}
    assert adapter.handle_advertisement("A4:C1:38:8D:18:B2", adv2, 101.0) is not None
    # another device is not configured
    assert adapter.handle_advertisement("11:22:33:44:55:66", adv, 101.0) is None
    assert adapter.ignored == 1
    # no BTHome service data at all
    assert (
        adapter.handle_advertisement(
            "A4:C1:38:8D:18:B2", {"0000180f-0000-1000-8000-00805f9b34fb": b"\x50"}, 1.0
        )
        is None
    )
    # encrypted: counted, never submitted
    enc = {SERVICE_UUID: b"\x41\xa4\x72\x66\xc9\x5f\x73\x00\x11\x22\x33\x78\x23\x72\x14"}
    assert adapter.handle_advertisement("A4:C1:38:8D:18:B2", enc, 102.0) is None
    assert adapter.decode_errors.counts[("kitchen", "encrypted")] == 1
    await asyncio.sleep(0)  # let the done callbacks of the ingest futures run
    first, second = ingest.readings
    assert first.device_id == "kitchen" and first.ts == 100.0
    assert first.metrics["temperature"] == 21.78 and second.metrics["temperature"] == 21.79
    assert first.origin == Origin("ble", address="A4:C1:38:8D:18:B2")
    assert first.tags["unit:temperature"] == "Cel"
    assert adapter.state.readings == 2 and adapter.state.errors == 1


async def test_allow_unknown_and_rejections() -> None:
    ingest = RecordingIngest(status=IngestStatus.REJECTED_FULL)
    adapter = BleAdapter(BleSection(allow_unknown=True), ingest=ingest)
    r = adapter.handle_advertisement("54:48:E6:8F:80:A5", {SERVICE_UUID: frame("02CA09")}, 1.0)
    assert r is not None and r.device_id == "bthome-5448e68f80a5"
    await asyncio.sleep(0)
    assert adapter.state.rejected == 1 and adapter.state.readings == 0


async def test_no_bluetooth_adapter_is_one_clear_line() -> None:
    # This machine has no Bluetooth adapter (and no BlueZ): start-up must fail
    # with one line that says so, not a traceback from D-Bus.
    pytest.importorskip("bleak", reason="needs the ble extra (pip install 'edgeway[ble]')")
    adapter = BleAdapter(BleSection(adapter="hci7"), ingest=RecordingIngest())
    with pytest.raises(BleUnavailable) as e:
        await asyncio.wait_for(adapter.run(), 20)
    message = str(e.value)
    assert message.startswith("ble: no usable Bluetooth adapter (hci7)")
    assert "\n" not in message
    assert not adapter.state.connected


async def test_without_bleak_start_up_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a gateway without the ble extra says (None in sys.modules makes the
    # import fail as if bleak were not installed).
    monkeypatch.setitem(sys.modules, "bleak", None)
    adapter = BleAdapter(BleSection(), ingest=RecordingIngest())
    with pytest.raises(BleUnavailable, match=r"pip install 'edgeway\[ble\]'"):
        await asyncio.wait_for(adapter.run(), 20)
    assert not adapter.state.connected


def test_docs_example_parses() -> None:
    block = DOCS.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config(block, str(DOCS))
    assert cfg.ble is not None and cfg.ble.devices
