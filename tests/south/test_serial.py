"""Serial adapter: line framing, line formats, NMEA, and a real port (a pseudo-terminal)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("serial_asyncio")

from ingest_doubles import RecordingIngest, wait_until

from edgeway.codecs.base import DecodeError
from edgeway.config import InputLimitsSection, SerialCsv, SerialPortConfig, parse_config
from edgeway.south.nmea import checksum, parse_sentence
from edgeway.south.serial import LineFramer, SerialAdapter, parse_csv, parse_kv

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocols" / "serial.md"

GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"
GGA_SIRF = "$GPGGA,002153.000,3342.6618,N,11751.3858,W,1,10,1.2,27.0,M,-34.2,M,,0000*5E"


def nmea(body: str) -> str:
    return f"${body}*{checksum(body):02X}"


# ---------------------------------------------------------------- sans-IO


def test_framer_splits_joins_and_bounds_lines() -> None:
    f = LineFramer(max_line=10)
    assert f.feed(b"a=1\r\nb=") == [b"a=1"]
    assert f.feed(b"2\n\n") == [b"b=2", b""]
    # over-long: reported once as None, discarded up to its newline
    assert f.feed(b"x" * 8) == []
    assert f.feed(b"x" * 8) == [None]
    assert f.feed(b"x" * 50) == []
    assert f.feed(b"xx\nc=3\n") == [b"c=3"]
    assert f.feed(b"y" * 11 + b"\n") == [None]


def test_kv_and_csv() -> None:
    assert parse_kv("temp=21.5 hum=40, ok=true;state=idle") == {
        "temp": 21.5,
        "hum": 40,
        "ok": True,
        "state": "idle",
    }
    with pytest.raises(DecodeError) as e:
        parse_kv("temp 21.5")
    assert e.value.reason == "bad_kv"
    with pytest.raises(DecodeError) as e:
        parse_kv("temp=nan")
    assert e.value.reason == "bad_value"
    csv = SerialCsv(columns=["temperature", "", "pressure"], header=True)
    assert parse_csv("21.5,junk,1013", csv) == {"temperature": 21.5, "pressure": 1013}
    assert parse_csv("temperature,,pressure", csv) is None
    assert parse_csv("21.5,x,", csv) == {"temperature": 21.5}
    with pytest.raises(DecodeError) as e:
        parse_csv("1,2", csv)
    assert e.value.reason == "bad_csv"


def test_nmea_published_examples() -> None:
    gga = parse_sentence(GGA)
    assert gga is not None and gga.sentence == "GGA"
    assert gga.metrics == {
        "fix_quality": 1,
        "satellites": 8,
        "hdop": 0.9,
        "latitude": pytest.approx(48.1173),
        "longitude": pytest.approx(11.516667),
        "altitude": 545.4,
    }
    rmc = parse_sentence(RMC)
    assert rmc is not None and rmc.metrics["fix_valid"] is True
    assert rmc.metrics["speed_knots"] == 22.4 and rmc.metrics["course"] == 84.4
    assert rmc.ts == dt.datetime(1994, 3, 23, 12, 35, 19, tzinfo=dt.UTC).timestamp()
    sirf = parse_sentence(GGA_SIRF)
    assert sirf is not None
    assert sirf.metrics["latitude"] == pytest.approx(33.71103)
    assert sirf.metrics["longitude"] == pytest.approx(-117.856430)


def test_nmea_checksum_no_fix_and_other_sentences() -> None:
    with pytest.raises(DecodeError) as e:
        parse_sentence(GGA[:-2] + "48")
    assert e.value.reason == "bad_checksum"
    with pytest.raises(DecodeError) as e:
        parse_sentence(GGA.replace("4807.038", "4807.039"))
    assert e.value.reason == "bad_checksum"
    with pytest.raises(DecodeError):
        parse_sentence("GPGGA,1,2,3")
    no_fix = parse_sentence(nmea("GPGGA,123519,,,,,0,00,99.9,,M,,M,,"))
    assert no_fix is not None and no_fix.metrics == {
        "fix_quality": 0,
        "satellites": 0,
        "hdop": 99.9,
    }
    void = parse_sentence(nmea("GNRMC,123519,V,,,,,,,230394,,,N"))
    assert void is not None and void.metrics == {"fix_valid": False} and void.ts is None
    assert (
        parse_sentence(nmea("GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00"))
        is None
    )
    south_west = parse_sentence(nmea("GNGGA,0,3351.000,S,15112.000,W,1,5,1.0,10,M,,M,,"))
    assert south_west is not None
    assert south_west.metrics["latitude"] == pytest.approx(-33.85)
    assert south_west.metrics["longitude"] == pytest.approx(-151.2)


@given(st.text(max_size=120))
def test_nmea_never_raises_anything_but_decode_error(line: str) -> None:
    with contextlib.suppress(DecodeError):
        parse_sentence(line)


@given(st.text(max_size=120))
def test_nmea_with_valid_checksum_never_crashes(body: str) -> None:
    if "*" in body:
        return
    with contextlib.suppress(DecodeError):
        parse_sentence(nmea("GPGGA," + body))
    with contextlib.suppress(DecodeError):
        parse_sentence(nmea("GPRMC," + body))


@given(st.binary(max_size=200))
def test_line_decoders_never_raise_anything_but_decode_error(raw: bytes) -> None:
    for fmt in ("kv", "nmea", "json"):
        adapter = SerialAdapter(
            SerialPortConfig(name="s", device_id="d", port="/dev/null", format=fmt),
            ingest=RecordingIngest(),
        )
        with contextlib.suppress(DecodeError):
            adapter.decode_line(raw, 1.0)


def test_docs_example_parses() -> None:
    block = DOCS.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config(block, str(DOCS))
    assert {s.format for s in cfg.serial} == {"json", "csv", "kv", "nmea"}


# ---------------------------------------------------------------- a real port


@contextlib.contextmanager
def pty_pair() -> Iterator[tuple[int, str]]:
    """The test writes the master; the adapter opens the slave by name."""
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo or line editing before the adapter opens it
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


@contextlib.asynccontextmanager
async def running(adapter: SerialAdapter) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(adapter.run())
    try:
        async with asyncio.timeout(10):
            await adapter.ready.wait()
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def port_config(port: str, **kw: Any) -> SerialPortConfig:
    return SerialPortConfig.model_validate(
        {"name": "s1", "device_id": "dev-s", "port": port, "baudrate": 115200, **kw}
    )


async def test_json_lines_through_a_pty() -> None:
    with pty_pair() as (master, port):
        ingest = RecordingIngest()
        adapter = SerialAdapter(port_config(port, format="json"), ingest=ingest)
        async with running(adapter):
            os.write(master, b'{"temperature": 21.5}\n{"temp')
            os.write(master, b'erature": 22.0, "ok": true}\r\n{broken\n')
            await ingest.wait_readings(2)
            await wait_until(lambda: adapter.state.errors == 1)
        assert [r.metrics for r in ingest.readings] == [
            {"temperature": 21.5},
            {"temperature": 22.0, "ok": True},
        ]
        assert ingest.readings[0].device_id == "dev-s"
        assert ingest.readings[0].origin.address == port
        assert adapter.decode_errors.counts[("dev-s", "invalid_json")] == 1


async def test_csv_and_kv_through_a_pty() -> None:
    with pty_pair() as (m1, p1), pty_pair() as (m2, p2):
        ingest = RecordingIngest()
        csv = SerialAdapter(
            port_config(
                p1,
                format="csv",
                csv={"columns": ["t", "h"], "header": True},
                stopbits=2,  # (a Linux pty refuses parity and 7 bits when pyserial-asyncio reconfigures it)
            ),
            ingest=ingest,
        )
        kv = SerialAdapter(
            port_config(p2, name="s2", device_id="dev-kv", format="kv"), ingest=ingest
        )
        async with running(csv), running(kv):
            os.write(m1, b"t,h\n20.5,41\n1,2,3\n")
            os.write(m2, b"power=1200 state=on\n")
            await ingest.wait_readings(2)
            await wait_until(lambda: csv.state.errors == 1)
        by_dev = {r.device_id: r.metrics for r in ingest.readings}
        assert by_dev == {"dev-s": {"t": 20.5, "h": 41}, "dev-kv": {"power": 1200, "state": "on"}}
        assert csv.ignored == 1  # the header line
        assert csv.decode_errors.counts[("dev-s", "bad_csv")] == 1


async def test_nmea_through_a_pty() -> None:
    with pty_pair() as (master, port):
        ingest = RecordingIngest()
        # The RMC sentence is the classic 1994 example: older than the default
        # input_limits.max_timestamp_age allows, so this port allows 40 years.
        config = port_config(
            port,
            format="nmea",
            baudrate=9600,
            input_limits=InputLimitsSection(max_timestamp_age=40 * 365 * 86400.0),
        )
        adapter = SerialAdapter(config, ingest=ingest)
        async with running(adapter):
            gsv = nmea("GPGSV,1,1,01,03,03,111,00")
            bad = GGA[:-2] + "00"
            os.write(master, f"{gsv}\r\n{bad}\r\n{GGA}\r\n{RMC}\r\n".encode())
            await ingest.wait_readings(2)
            await wait_until(lambda: adapter.lines == 4)
        gga, rmc = ingest.readings
        assert gga.metrics["altitude"] == 545.4
        assert rmc.ts == dt.datetime(1994, 3, 23, 12, 35, 19, tzinfo=dt.UTC).timestamp()
        assert adapter.ignored == 1
        assert adapter.decode_errors.counts[("dev-s", "bad_checksum")] == 1


async def test_port_gone_is_recorded_and_retried_without_stopping() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    port = os.ttyname(slave)
    ingest = RecordingIngest()
    adapter = SerialAdapter(port_config(port, format="kv"), ingest=ingest)
    task = asyncio.create_task(adapter.run())
    try:
        async with asyncio.timeout(10):
            await adapter.ready.wait()
        os.write(master, b"a=1\n")
        await ingest.wait_readings(1)
        os.close(slave)
        os.close(master)  # the device disappears (hang-up)
        await wait_until(lambda: adapter.state.errors >= 1 and not adapter.state.connected)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_missing_port_is_a_startup_error() -> None:
    adapter = SerialAdapter(
        port_config("/dev/does-not-exist-42", format="kv"), ingest=RecordingIngest()
    )
    with pytest.raises(FileNotFoundError, match="no such port /dev/does-not-exist-42"):
        await adapter.run()
