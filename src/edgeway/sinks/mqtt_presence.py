"""Gateway birth and death on an MQTT sink's broker (``options.status_topic``).

Example::

    sinks:
      - name: cloud
        url: mqtts://broker.example.com:8883
        options:
          status_topic: "edgeway/{gateway_id}/status"

A fleet needs to know which gateways are alive without polling each one. On
its own connection (client id ``<sink client id>-status``), the sink keeps a
retained message on ``status_topic``:

- on connect, the **birth**: ``{"gateway_id", "state": "online", "seq", "ts",
  "version"}``, retained, QoS 1;
- the connection's **will** (set in CONNECT): the same with ``"state":
  "offline", "reason": "connection lost"``. The broker publishes it, retained,
  when the connection ends without a DISCONNECT: a crash, a SIGKILL (the
  kernel closes the socket, so at once), a power cut or a cut cable (after
  1.5 keep-alive intervals);
- on a clean stop, the **death**: ``"state": "offline", "reason": "stopped"``,
  published before the DISCONNECT (a DISCONNECT discards the will).

``seq`` is the connection's start in milliseconds since the epoch: the birth
and the will of one connection carry the same one, so a consumer can drop a
stale death (a broker that takes a session over publishes the old
connection's will, possibly after the new birth) by ignoring an ``offline``
whose ``seq`` is lower than the last ``online``'s. Sparkplug B's ``bdSeq``
does the same.

The connection is separate from the publishing one because that one connects
only while there is data to send; presence must hold while the gateway is
idle. It reconnects forever with backoff and publishes a new birth each time.
The periodic health summary travels as records through the outbox to every
sink (see :mod:`edgeway.health_report`), not on this connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from gmqtt import Message
from gmqtt.mqtt.constants import MQTTv50

from edgeway import __version__

if TYPE_CHECKING:
    from edgeway.sinks.mqtt import MqttSink

logger = logging.getLogger(__name__)


def presence_payload(gateway_id: str, state: str, seq: int, reason: str | None = None) -> bytes:
    """The JSON of a birth (``online``) or a death (``offline`` with a reason)."""
    body: dict[str, Any] = {
        "gateway_id": gateway_id,
        "state": state,
        "seq": seq,
        "ts": round(time.time(), 3),
        "version": __version__,
    }
    if reason is not None:
        body["reason"] = reason
    return orjson.dumps(body)


class MqttPresence:
    """Keeps the gateway's birth (or its will) retained on ``topic``; see the module docstring."""

    def __init__(self, sink: MqttSink, topic: str) -> None:
        self.sink = sink
        self.topic = topic
        self.name = f"{sink.name}:status"
        self.client_id = f"{sink.client_id}-status"
        self.online = asyncio.Event()
        """Set while the birth of the current connection has been sent."""
        self.births = 0

    async def run(self) -> None:
        """Connect, announce, hold; reconnect with backoff until cancelled."""
        from edgeway.sinks.mqtt import reconnect_forever

        await reconnect_forever(self._session, self.sink, "status", self.online.clear)

    async def _session(self, backoff: Any) -> None:
        from edgeway.sinks.mqtt import (
            _AckWindow,
            _Connection,
            _NoReconnectClient,
            connect_side_client,
        )

        sink = self.sink
        seq = time.time_ns() // 1_000_000
        will = Message(
            self.topic,
            presence_payload(sink.gateway_id, "offline", seq, "connection lost"),
            qos=1,
            retain=True,
        )
        props: dict[str, Any] = {}
        if sink.protocol == MQTTv50:
            props["session_expiry_interval"] = 0
        client = _NoReconnectClient(self.client_id, clean_session=True, will_message=will, **props)
        ended = asyncio.Event()

        def on_disconnect(_c: Any, _packet: Any, _exc: Any = None) -> None:
            ended.set()

        client.on_disconnect = on_disconnect
        announced = False
        try:
            await connect_side_client(sink, client)
            client.publish(
                self.topic, presence_payload(sink.gateway_id, "online", seq), qos=1, retain=True
            )
            announced = True
            self.births += 1
            self.online.set()
            backoff.reset()
            logger.info("sink %s: gateway status online on %s", sink.name, self.topic)
            await ended.wait()
            raise ConnectionError("status connection to the broker lost")
        finally:
            self.online.clear()
            if announced and not ended.is_set():
                # A clean stop: say so, then DISCONNECT (which discards the
                # will). The broker handles our packets in order, so the death
                # is retained before the connection ends.
                with contextlib.suppress(Exception):
                    client.publish(
                        self.topic,
                        presence_payload(sink.gateway_id, "offline", seq, "stopped"),
                        qos=1,
                        retain=True,
                    )
            await _Connection(client, _AckWindow(), 1, False).close()
