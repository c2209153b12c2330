"""Real MQTT peers for integration tests: a blocking paho-mqtt 2.x wrapper, the
``mosquitto_pub``/``mosquitto_sub`` command-line tools, and a raw-socket
MQTT 3.1.1 client for checking exact return codes on the wire.

Every wait is bounded (``TIMEOUT``); nothing here sleeps to wait for an event.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import struct
import subprocess
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

TIMEOUT = 10.0
"""Upper bound for any single wait on the broker; loopback round trips take
well under a millisecond, so 10 s only trips when something is broken."""


def unique(prefix: str) -> str:
    """A name no other test uses (topics and client ids on a shared gateway)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass(slots=True)
class TlsFiles:
    """Paths for a TLS client: CA to trust, and optionally a client cert/key."""

    ca: str
    cert: str | None = None
    key: str | None = None


class PahoPeer:
    """A paho-mqtt 2.x client driven from a test thread.

    Network I/O runs in paho's own thread (``loop_start``); the methods here
    block on events with a timeout. Received messages land in ``messages``.
    Automatic reconnection is off, so a refused CONNECT stays refused.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        version: int = 5,
        client_id: str | None = None,
        clean: bool = True,
        session_expiry: int | None = None,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        tls: TlsFiles | None = None,
        keepalive: int = 30,
        websocket_path: str | None = None,
    ) -> None:
        self.host, self.port, self.version = host, port, version
        self.client_id = client_id if client_id is not None else unique("paho")
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if version == 5 else clean,
            protocol=protocol,
            transport="websockets" if websocket_path is not None else "tcp",
            reconnect_on_failure=False,
        )
        if websocket_path is not None:
            self.client.ws_set_options(path=websocket_path)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain)
        if tls is not None:
            self.client.tls_set(
                ca_certs=tls.ca,
                certfile=tls.cert,
                keyfile=tls.key,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._cond = threading.Condition()
        self._connack: tuple[int, bool] | None = None
        self._disconnected = threading.Event()
        self._acks: dict[int, int] = {}
        self._subacks: dict[int, list[int]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # paho callbacks (paho's network thread)
    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        with self._cond:
            self._connack = (int(rc.value), bool(flags.session_present))
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self._disconnected.set()
        with self._cond:
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = int(rc.value)
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[Any], _p: Any) -> None:
        with self._cond:
            self._subacks[mid] = [int(rc.value) for rc in rcs]
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.messages.put(msg)

    # test-facing API
    def connect(self) -> tuple[int, bool]:
        """Connect and wait for CONNACK: (reason code as a v5 value, session present).

        paho reports 3.1.1 return codes mapped to v5 values (4 -> 0x86, 5 -> 0x87).
        """
        props = None
        kwargs: dict[str, Any] = {}
        if self.version == 5:
            kwargs["clean_start"] = self.clean
            if self.session_expiry is not None:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = self.session_expiry
        self._disconnected.clear()
        with self._cond:
            self._connack = None
        self.client.connect(
            self.host, self.port, keepalive=self.keepalive, properties=props, **kwargs
        )
        self.client.loop_start()
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._connack is not None or self._disconnected.is_set(), TIMEOUT
            ):
                raise TimeoutError(f"no CONNACK for {self.client_id}")
            if self._connack is None:
                raise ConnectionError(f"{self.client_id}: closed before CONNACK")
            return self._connack

    def subscribe(self, topic_filter: str, qos: int = 1, **options: Any) -> list[int]:
        """Subscribe and wait for SUBACK; returns its reason codes."""
        if self.version == 5:
            _, mid = self.client.subscribe(
                topic_filter, options=SubscribeOptions(qos=qos, **options)
            )
        else:
            _, mid = self.client.subscribe(topic_filter, qos)
        assert mid is not None
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, TIMEOUT):
                raise TimeoutError(f"no SUBACK for {topic_filter!r}")
            return self._subacks.pop(mid)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> int:
        """Publish and, for QoS 1/2, wait for the PUBACK/PUBCOMP; returns its
        reason code (0 for QoS 0 once written to the socket)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos == 0:
            info.wait_for_publish(TIMEOUT)
            return 0
        mid = info.mid
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, TIMEOUT):
                raise TimeoutError(f"no acknowledgement for publish to {topic!r}")
            return self._acks.pop(mid)

    def get(self, timeout: float = TIMEOUT) -> paho.MQTTMessage:
        """The next received message (raises ``queue.Empty`` after ``timeout``)."""
        return self.messages.get(timeout=timeout)

    def collect(self, n: int, timeout: float = TIMEOUT) -> list[paho.MQTTMessage]:
        """Exactly the next ``n`` messages; raises ``queue.Empty`` if they do not come."""
        return [self.get(timeout) for _ in range(n)]

    def wait_disconnected(self, timeout: float = TIMEOUT) -> bool:
        return self._disconnected.wait(timeout)

    def disconnect(self) -> None:
        """Clean DISCONNECT and stop the network thread."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (as a device losing power)."""
        sock = self.client.socket()
        self.client.loop_stop()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def connected(gw: Any, peers: list[PahoPeer], **kwargs: Any) -> PahoPeer:
    """A paho peer connected to ``gw`` (anything with ``host`` and ``port``),
    added to ``peers`` (the fixture disconnects them); CONNACK must be success."""
    peer = PahoPeer(gw.host, gw.port, **kwargs)
    peers.append(peer)
    rc, _ = peer.connect()
    assert rc == 0, f"CONNACK {rc:#x}"
    return peer


def v5_props(**values: Any) -> Properties:
    """PUBLISH properties, e.g. ``v5_props(ResponseTopic="r", CorrelationData=b"x")``."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


# ---------------------------------------------------------------------------
# mosquitto command-line clients


def mosquitto_args(host: str, port: int, version: int) -> list[str]:
    return ["-h", host, "-p", str(port), "-V", "mqttv5" if version == 5 else "mqttv311"]


def mosquitto_sub_start(
    host: str,
    port: int,
    topic: str,
    *,
    count: int,
    qos: int = 1,
    version: int = 5,
    extra: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``mosquitto_sub`` that exits after ``count`` messages (or ``-W`` timeout)."""
    args = ["mosquitto_sub", *mosquitto_args(host, port, version), "-t", topic, "-q", str(qos)]
    args += ["-C", str(count), "-W", str(int(TIMEOUT)), *(extra or [])]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def mosquitto_pub(
    host: str,
    port: int,
    topic: str,
    message: str,
    *,
    qos: int = 1,
    version: int = 5,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``mosquitto_pub`` once; returns the finished process."""
    args = ["mosquitto_pub", *mosquitto_args(host, port, version), "-t", topic, "-m", message]
    args += ["-q", str(qos), *(extra or [])]
    return subprocess.run(args, capture_output=True, timeout=TIMEOUT)


# ---------------------------------------------------------------------------
# raw MQTT 3.1.1 on a socket, for exact bytes on the wire


def _utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_connect_packet(
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 30,
    clean: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    """An MQTT 3.1.1 CONNECT packet."""
    flags = 0x02 if clean else 0
    payload = _utf8(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _utf8(topic) + _utf8(message)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload
    return b"\x10" + _remaining_length(len(body)) + body


def raw_connack(host: str, port: int, packet: bytes) -> tuple[bytes, socket.socket]:
    """Send a CONNECT and read the 4-byte CONNACK; returns it and the open socket."""
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.sendall(packet)
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        if not chunk:
            break
        data += chunk
    return data, sock


def closed_by_peer(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """Wait (bounded) for the other side to close: True on EOF or reset, False
    if bytes arrive or nothing happens within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
