"""A small local "cloud": an HTTP receiver that counts and stores what arrives.

Example (the demo points an HTTP sink at it)::

    cloud = CloudReceiver("127.0.0.1", 0, store_path=Path("cloud.jsonl"))
    await cloud.start()                  # cloud.url -> http://127.0.0.1:PORT/ingest
    # sinks: [{name: cloud, url: <cloud.url>}]
    await cloud.outage(30)               # down for 30 s, then up again
    cloud.stats.unique, cloud.stats.duplicates
    await cloud.stop()

It accepts the HTTP sink's body (``{"gateway_id", "records": [...]}``, gzip or
not) on any path and answers 200 once the records are counted (and written to
``store_path`` as JSON lines, if given). Duplicates are records whose ``id``
it has seen before: the gateway delivers at least once, so after an outage a
few are expected, and a cloud drops them by id.

``take_down()`` makes it unreachable until ``bring_up()``. Two ways, like the
two ways a cloud is down in practice: ``"refuse"`` closes the listening
socket and every open connection (connection refused, as when the service
is gone), ``"503"`` keeps listening and answers 503 with ``Retry-After``
(as a load balancer in front of a failed service does).

Per device it also keeps the set of ``seq`` metrics received (the
simulator's per-device message counter), so a caller can prove which
messages arrived; and the delay from a record's ``ts`` to its arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

OutageMode = Literal["refuse", "503"]

LATENCY_SAMPLES_MAX = 1_000_000
"""Delays kept for percentiles (8 bytes each: 8 MB at most); later ones are
counted but not kept, so a long run cannot grow memory without bound."""


@dataclass(slots=True)
class CloudStats:
    """What the receiver has seen."""

    requests: int = 0
    records: int = 0
    unique: int = 0
    duplicates: int = 0
    resent: int = 0
    """Unique records carrying a device ``seq`` already received from that device
    (the device sent the message again; a cloud can drop it by device and seq)."""
    refused: int = 0
    """Requests answered 503 while down (connections refused are not seen)."""
    bad_requests: int = 0
    first_at: float | None = None
    last_at: float | None = None
    seqs: dict[str, set[int]] = field(default_factory=dict)
    """Per device id, the ``seq`` metric values received."""
    latencies: list[float] = field(default_factory=list)
    """Seconds from each unique record's ``ts`` to its arrival."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "records": self.records,
            "unique": self.unique,
            "duplicates": self.duplicates,
            "resent": self.resent,
            "refused": self.refused,
            "bad_requests": self.bad_requests,
            "devices": len(self.seqs),
        }


class CloudReceiver:
    """The bundled cloud endpoint (aiohttp)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        store_path: Path | None = None,
        retry_after: float = 1.0,
        keep_latencies: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.store_path = store_path
        self.retry_after = retry_after
        self.keep_latencies = keep_latencies
        self.stats = CloudStats()
        self.down = False
        self._seen: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._store: IO[bytes] | None = None
        self._mode: OutageMode = "503"
        self.changed = asyncio.Event()
        """Set whenever records arrive (tests wait on it instead of sleeping)."""

    @property
    def url(self) -> str:
        """The URL to give an HTTP sink."""
        return f"http://{self.host}:{self.port}/ingest"

    async def start(self) -> None:
        """Listen; with port 0 a free port is taken and ``port`` updated."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/{tail:.*}", self._handle_post)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        if self.store_path is not None:
            self.store_path.parent.mkdir(parents=True, exist_ok=True)
            self._store = open(self.store_path, "ab")  # noqa: ASYNC230 - appended per batch, closed in stop()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close the store."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._store is not None:
            self._store.close()
            self._store = None

    async def take_down(self, mode: OutageMode = "503") -> None:
        """Become unreachable: refuse connections, or answer 503 (see module doc)."""
        self.down = True
        self._mode = mode
        if mode == "refuse" and self._site is not None:
            # Closes the listener and every open keep-alive connection.
            await self._site.stop()
            self._site = None
        log.info("cloud receiver down (%s)", mode)

    async def bring_up(self) -> None:
        """Accept records again (on the same port)."""
        if self._site is None and self._runner is not None:
            await self._listen()
        self.down = False
        log.info("cloud receiver up")

    async def outage(self, seconds: float, mode: OutageMode = "503") -> None:
        """Be down for ``seconds``, then come back."""
        await self.take_down(mode)
        try:
            await asyncio.sleep(seconds)
        finally:
            await self.bring_up()

    def received_seqs(self, device_id: str) -> set[int]:
        """The ``seq`` values received from ``device_id`` (empty if none)."""
        return self.stats.seqs.get(device_id, set())

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_dict())

    async def _handle_post(self, request: web.Request) -> web.Response:
        if self.down:
            self.stats.refused += 1
            return web.Response(
                status=503,
                headers={"Retry-After": f"{self.retry_after:g}", "Connection": "close"},
                text="cloud receiver is down (simulated outage)",
            )
        # aiohttp undoes Content-Encoding: gzip on request bodies.
        body = await request.read()
        try:
            doc = orjson.loads(body)
            records = doc["records"] if isinstance(doc, dict) else doc
            if not isinstance(records, list):
                raise TypeError("records is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            self.stats.bad_requests += 1
            return web.json_response({"error": f"bad body: {e}"}, status=400)
        self._count(records)
        if self._store is not None and records:
            self._store.write(b"".join(orjson.dumps(r) + b"\n" for r in records))
            self._store.flush()
        return web.json_response({"accepted": len(records)})

    def _count(self, records: list[Any]) -> None:
        now = time.time()
        st = self.stats
        st.requests += 1
        st.records += len(records)
        if st.first_at is None:
            st.first_at = now
        st.last_at = now
        for r in records:
            if not isinstance(r, dict):
                continue
            rid = r.get("id")
            if isinstance(rid, str):
                if rid in self._seen:
                    st.duplicates += 1
                    continue
                self._seen.add(rid)
            st.unique += 1
            metrics = r.get("metrics")
            dev = r.get("device_id")
            if isinstance(metrics, dict) and isinstance(dev, str):
                seq = metrics.get("seq")
                if isinstance(seq, int) and not isinstance(seq, bool):
                    got = st.seqs.setdefault(dev, set())
                    if seq in got:
                        st.resent += 1
                    got.add(seq)
            ts = r.get("ts")
            if (
                self.keep_latencies
                and isinstance(ts, int | float)
                and len(st.latencies) < LATENCY_SAMPLES_MAX
            ):
                st.latencies.append(now - float(ts))
        self.changed.set()
        self.changed.clear()


@contextlib.asynccontextmanager
async def running_cloud(**kwargs: Any) -> Any:
    """``async with running_cloud() as cloud:`` start and always stop a receiver."""
    cloud = CloudReceiver(**kwargs)
    await cloud.start()
    try:
        yield cloud
    finally:
        await cloud.stop()
