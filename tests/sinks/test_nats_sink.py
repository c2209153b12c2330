"""The NATS JetStream sink against the local nats-server (and one of our own for outages)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

nats = pytest.importorskip("nats")

from edgeway.config import SinkConfig  # noqa: E402
from edgeway.sinks.base import Record, RetryableSinkError, create_sink  # noqa: E402
from edgeway.sinks.nats import NatsSink  # noqa: E402

SHARED_URL = "nats://127.0.0.1:4222"
NATS_SERVER = "/usr/sbin/nats-server"
TIMEOUT = 10.0
"""Bound for any wait on a local server (loopback answers in well under 1 ms)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def records(n: int, start: int = 0, devices: int = 3) -> list[Record]:
    return [
        Record(
            id=f"gw1:{i}",
            seq=i,
            device_id=f"dev{i % devices}",
            ts=1_700_000_000.0 + i,
            metrics={"temp": 20.0 + i / 10, "ok": True},
        )
        for i in range(start, start + n)
    ]


def make_sink(url: str, **options: Any) -> NatsSink:
    sink = create_sink(SinkConfig(name="js", url=url, options=options), "gw1")
    assert isinstance(sink, NatsSink)
    return sink


@pytest.fixture
async def stream() -> AsyncIterator[tuple[str, str]]:
    """A unique (stream name, subject prefix) on the shared server, deleted afterwards."""
    name = f"T{uuid.uuid4().hex[:12]}"
    prefix = f"t{uuid.uuid4().hex[:12]}"
    nc = await nats.connect(SHARED_URL)
    try:
        yield name, prefix
    finally:
        try:
            await nc.jetstream().delete_stream(name)
        except Exception:  # the test may have failed before creating it
            pass
        await nc.close()


async def fetch_all(url: str, stream_name: str) -> list[Any]:
    """Every message in ``stream_name``, in stream order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream_name)
        n = info.state.messages
        out = []
        for seq in range(info.state.first_seq, info.state.first_seq + n):
            out.append(await js.get_msg(stream_name, seq))
        return out
    finally:
        await nc.close()


async def test_every_record_stored_once_with_subject_and_msg_id(
    stream: tuple[str, str],
) -> None:
    name, prefix = stream
    sink = make_sink(
        SHARED_URL,
        subject=prefix + ".{gateway_id}.{device_id}",
        stream=name,
        create_stream=True,
    )
    assert sink.stream_subjects() == [f"{prefix}.gw1.*"]
    batch = records(500)
    try:
        await sink.start()
        await sink.send_batch(batch)
        # The same batch again (a retry after a lost ack): JetStream de-duplicates by Nats-Msg-Id.
        await sink.send_batch(batch)
        await sink.send_batch(records(10, 500))
    finally:
        await sink.close()
    msgs = await fetch_all(SHARED_URL, name)
    assert len(msgs) == 510
    for m, r in zip(msgs, batch + records(10, 500), strict=True):
        assert m.subject == f"{prefix}.gw1.{r.device_id}"
        assert m.headers["Nats-Msg-Id"] == r.id
        assert json.loads(m.data) == r.to_json_obj()


async def test_device_ids_cannot_add_subject_tokens(stream: tuple[str, str]) -> None:
    name, prefix = stream
    sink = make_sink(SHARED_URL, subject=prefix + ".{device_id}", stream=name, create_stream=True)
    odd = Record(id="gw1:1", seq=1, device_id="a.b *>c", ts=1.0, metrics={"v": 1})
    try:
        await sink.send_batch([odd])
    finally:
        await sink.close()
    (m,) = await fetch_all(SHARED_URL, name)
    assert m.subject == f"{prefix}.a_b___c"


async def test_missing_stream_is_retryable(stream: tuple[str, str]) -> None:
    _name, prefix = stream
    sink = make_sink(SHARED_URL, subject=prefix + ".{device_id}", ack_timeout=3)
    try:
        with pytest.raises(RetryableSinkError, match="refused"):
            await sink.send_batch(records(3))
        assert sink.state.connected  # the server answered; only the stream is missing
    finally:
        await sink.close()


class NatsServer:
    """Our own nats-server with JetStream on a free port; restartable on the same port and store."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.store = directory / "js"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "nats-server exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)  # polling a port that has no event to wait on
        raise TimeoutError("nats-server did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self.proc = None


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_server_down_then_back(own_server: NatsServer) -> None:
    sink = make_sink(own_server.url, stream="OUT", create_stream=True, connect_timeout=1)
    try:
        await sink.send_batch(records(100))
        assert sink.state.connected
        own_server.kill()
        for _ in range(3):
            with pytest.raises(RetryableSinkError):
                await sink.send_batch(records(100, 100))
        assert not sink.state.connected
        own_server.start()  # same port, same store: the stream survives
        await sink.send_batch(records(100, 100))
        assert sink.state.connected
    finally:
        await sink.close()
    msgs = await fetch_all(own_server.url, "OUT")
    assert [m.headers["Nats-Msg-Id"] for m in msgs] == [f"gw1:{i}" for i in range(200)]


@pytest.mark.parametrize(
    ("options", "url", "key"),
    [
        ({"colour": "red"}, "nats://h:4222", "options.colour"),
        ({"subject": "x.{nope}"}, "nats://h:4222", "options.subject"),
        ({"create_stream": True}, "nats://h:4222", "options.stream"),
        ({"stream": "a.b"}, "nats://h:4222", "options.stream"),
        ({"ca": "/nonexistent/ca.pem"}, "nats://h:4222", "options.ca"),
        ({}, "http://h:4222", "url"),
        ({}, "nats://h:99999", "url"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], url: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        NatsSink(SinkConfig(name="c", url=url, options=options), "gw1")
