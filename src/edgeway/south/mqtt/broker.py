"""The embedded MQTT broker (MQTT 3.1.1 and 5.0).

Configuration (``mqtt:`` section; every key optional)::

    mqtt:
      listeners:
        - {bind: "127.0.0.1:1883", allow_anonymous: true}
      telemetry_topics: ["devices/{device_id}/telemetry"]
      limits:
        max_packet_size: 1MiB
        receive_maximum: 64
        max_queued_messages: 10000
        max_queued_bytes: 8MiB
        max_retained_messages: 100000
        max_retained_bytes: 64MiB
        max_persistent_sessions: 10000
        max_subscriptions_per_client: 1000
        max_subscription_chars: 256000
        max_connections: 100000
        connect_timeout: 10s
        packet_timeout: 60s
        max_keepalive: 65535
        max_session_expiry: 7d
        topic_alias_maximum: 64

Built by the gateway and driven by the listeners::

    broker = Broker(cfg.mqtt, ingest=outbox, authenticator=a, authoriser=z,
                    data_dir=Path("edgeway-data"), gateway_id="gw1")
    await broker.start()
    server = await loop.create_server(broker.protocol_factory(listener_cfg), host, port)
    ...
    await broker.stop()

Parts: :mod:`.connection` (one ``asyncio.Protocol`` per client), :mod:`.session`
(state per client id), :mod:`.topics` (subscription tree), :mod:`.retained`,
:mod:`.persistence` (SQLite under ``data_dir/broker.db``; what is saved when is
described there) and :mod:`.telemetry` (which publishes become readings).

Choices worth knowing:

- Inbound QoS 2 is routed when the PUBLISH is accepted, not at PUBREL (as
  Mosquitto does); the packet id is remembered until PUBREL so a re-sent
  PUBLISH is acknowledged without being delivered again.
- Telemetry publishes are routed when ingest accepts them (a publish refused
  with quota exceeded is not routed); a telemetry payload that cannot be
  decoded is still routed (and answered 0x99 in v5).
- Overlapping subscriptions of one client: one delivery with the highest QoS
  and every matching subscription identifier (MQTT 3.3.4, the option the
  spec allows).
- Offline persistent sessions queue QoS 1/2 messages, not QoS 0 (Mosquitto's
  default); an online client whose socket is full queues every QoS.
- Shared subscriptions: each message goes to exactly one member of each
  group, round-robin over online members (an offline persistent member only
  when nobody in the group is online).
- Retained messages owed to a SUBSCRIBE are found by walking a topic trie
  and sent a bounded slice per event-loop turn after the SUBACK (see
  :mod:`.retained` and ``MqttConnection._send_retained``); live messages to
  that client wait behind them.
- One periodic sweep (:data:`SWEEP_INTERVAL`) enforces keep alive (1.5x),
  the connect timeout, the packet timeout, session expiry, delayed wills and
  autosave, instead of a timer per connection.
- On :meth:`Broker.stop` wills of connected clients are not published (the
  server going away is not the client failing).
- A session belongs to the identity that created it (``Session.owner``);
  another identity claiming its client id is refused (CONNACK 0x85). Every
  PUBLISH leaving for a client is checked against that client's read ACL.
- Session expiry, will delay and message expiry run on the broker's own
  clock (:mod:`.clock`), which a wall-clock jump does not move.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgeway.config_types import input_limits
from edgeway.devices.auth import Authenticator, Authoriser, Principal
from edgeway.devices.backoff import LoginBackoff, address_key
from edgeway.ingest import Ingest
from edgeway.logs import EventLog
from edgeway.south.mqtt.clock import BrokerClock
from edgeway.south.mqtt.config import ListenerConfig, MqttSection
from edgeway.south.mqtt.connection import CLOSED, CONNECTED, MAX_BATCH, MqttConnection
from edgeway.south.mqtt.listeners import client_cert_serial
from edgeway.south.mqtt.packets import MQTT_5, Properties, Will
from edgeway.south.mqtt.persistence import AUTOSAVE_INTERVAL, BrokerStore
from edgeway.south.mqtt.retained import Message, RetainedStore
from edgeway.south.mqtt.session import NEVER_EXPIRES, Delivery, Session
from edgeway.south.mqtt.stats import BrokerStats
from edgeway.south.mqtt.telemetry import TelemetryError, TelemetryTopics
from edgeway.south.mqtt.topics import SubEntry, SubscriptionTree

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.5
"""Seconds between sweeps over connections and sessions. Keep alive is
enforced at 1.5x the client's value, so 0.5 s of slack is within the spirit of
MQTT 3.1.2.10; one sweep costs ~1 ms per 10,000 connections."""

STOP_TIMEOUT = 1.5
"""Seconds :meth:`Broker.stop` waits for authentication tasks; the gateway
allows the broker 2 s in all."""

ERROR_LOG_INTERVAL = 10.0
"""Seconds between log lines about bad telemetry payloads (per reason): a
misbehaving device must not flood the log; the counters have every case."""

SATURATION_POLL = 0.05
"""Seconds between checks of ``ingest.is_saturated()`` while 3.1.1 clients
are paused (no event is offered for "not saturated any more")."""


class BrokerObserver(Protocol):
    """Something in the gateway that follows device sessions and reads the
    PUBLISHes that are not telemetry (the command downlink does). Called on
    the loop's thread, synchronously: keep each call short, never block."""

    def session_online(self, session: Session) -> None:
        """A client connected (its resumed subscriptions are in place)."""

    def session_offline(self, session: Session) -> None:
        """A client's connection ended (its session may persist)."""

    def subscribed(self, session: Session, topic_filter: str) -> None:
        """A client's subscription was added or replaced."""

    def published(
        self, topic: str, payload: bytes, properties: Properties | None, sender: str
    ) -> None:
        """A client's PUBLISH that is not telemetry was accepted for routing."""


class Broker:
    """The embedded MQTT broker; see the module docstring."""

    def __init__(
        self,
        config: MqttSection,
        *,
        ingest: Ingest,
        authenticator: Authenticator,
        authoriser: Authoriser,
        data_dir: Path,
        gateway_id: str,
        clock: BrokerClock | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or BrokerClock()
        """Session expiry, will delay and message expiry run on it
        (``clock.py``), not on the wall clock."""
        self.limits = config.limits
        self.input_limits = input_limits(config.input_limits)
        """What one telemetry PUBLISH may turn into (``input_limits``)."""
        self.ingest = ingest
        self.batch_max = MAX_BATCH if ingest.batchable else 1
        """Telemetry PUBLISHes stored with one submit at most: one each when
        the ingest answers each device message on its own (fixed by then: a
        pipeline's routes are built with it)."""
        self.authenticator = authenticator
        self.authoriser = authoriser
        self.data_dir = Path(data_dir)
        self.gateway_id = gateway_id
        self.telemetry: TelemetryTopics | None = (
            TelemetryTopics(config.telemetry_topics) if config.telemetry_topics else None
        )
        self.tree: SubscriptionTree[Session] = SubscriptionTree()
        self.retained = RetainedStore(
            config.limits.max_retained_messages, config.limits.max_retained_bytes, self.clock.now
        )
        self.sessions: dict[str, Session] = {}
        self._persistent: set[Session] = set()
        """Sessions that outlive their connection (``max_persistent_sessions``)."""
        self.connections: set[MqttConnection] = set()
        self._per_address: dict[str, int] = {}
        """Open connections per source address (entries only while > 0)."""
        self.login_backoff = LoginBackoff(max_failures=self.limits.max_failed_logins_per_address)
        """Failed logins per source address (the authenticator keeps its own
        per user name)."""
        self.store: BrokerStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._store_handle: asyncio.Handle | None = None
        self._saturation_handle: asyncio.TimerHandle | None = None
        self._saturated: set[MqttConnection] = set()
        self._dirty: list[MqttConnection] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_autosave = 0.0
        self._error_logged: dict[str, float] = {}
        self._will_principal: dict[str, Principal | None] = {}
        """Who connected with a delayed will, for the ACL check when it is sent."""
        self._stopped = False
        self._started = False
        self._connected = 0
        self.observers: list[BrokerObserver] = []
        """Followers of sessions and non-telemetry PUBLISHes (see BrokerObserver)."""
        self.receiving = 0
        """Nesting depth of protocol callbacks; writes are flushed when it returns to 0."""
        # Counters (plain ints: they sit on the hot path).
        self.messages_in = 0
        self.messages_out = 0
        self.readings_in = 0
        self.counters: dict[str, int] = {}
        self.events = EventLog(
            log,
            per_second=config.event_log.lines_per_second,
            burst=config.event_log.burst,
        )
        """Connect, disconnect, refused login, denied publish/subscribe lines."""
        self.dropped: dict[str, int] = {}
        self.decode_errors: dict[str, int] = {}

    def set_ingest_batching(self, batchable: bool) -> None:
        """The ingest behind the broker changed (a reload replaced the pipeline):
        submit a read's telemetry together only if it may be (see ``batch_max``)."""
        self.batch_max = MAX_BATCH if batchable else 1

    # ------------------------------------------------------------ lifecycle

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def start(self) -> None:
        """Load retained messages and persistent sessions; start the sweep."""
        self._loop = asyncio.get_running_loop()
        self.store = BrokerStore(self.data_dir / "broker.db")
        state = self.store.load()
        self.clock.resume(state.clock, self.limits.session_downtime_credit)
        now = self.clock.now()
        for msg in state.retained:
            self.retained.load(msg)
        for s in state.sessions:
            if s.disconnected_at is None:
                s.disconnected_at = now
            self.sessions[s.client_id] = s
            self._persistent.add(s)
            for entry in s.subscriptions.values():
                self.tree.subscribe(s, entry)
                s.subscription_chars += len(entry.topic_filter)
        self._started = True
        self._sweep_handle = self._loop.call_later(SWEEP_INTERVAL, self._sweep)
        log.info(
            "MQTT broker started",
            extra={
                "fields": {
                    "retained": len(self.retained),
                    "sessions": len(self.sessions),
                    "db": str(self.store.path),
                    "downtime_counted_s": round(self.clock.credited, 1),
                }
            },
        )

    def protocol_factory(self, listener: ListenerConfig) -> Callable[[], asyncio.Protocol]:
        """A factory for ``loop.create_server`` (or the WebSocket adapter)."""

        def factory() -> asyncio.Protocol:
            return MqttConnection(self, listener)

        return factory

    async def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """Disconnect every client (v5: DISCONNECT 0x8B), save state, close the
        store; the connections' tasks get ``grace`` seconds to end."""
        if self._stopped:
            return
        self._stopped = True
        for h in (self._sweep_handle, self._flush_handle, self._saturation_handle):
            if h is not None:
                h.cancel()
        now = self.clock.now()
        conns = list(self.connections)
        for conn in conns:
            session = conn.session
            if session is not None and session.conn is conn:
                session.conn = None
                session.disconnected_at = now
                if not session.persistent:
                    self._drop_session(session)
            try:
                conn.server_shutdown()
            except Exception:
                log.exception("error closing MQTT connection %s", conn.client_id)
        self.connections.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        store = self.store
        if store is not None:
            try:
                store.retained_changed(self.retained.dirty)
                self.retained.dirty = {}
                store.clock_saved(self.clock.stamp())
                persistent = [s for s in self.sessions.values() if s.persistent]
                for s in persistent:
                    store.session_saved(s)
                store.messages_saved(persistent)
            except Exception:
                log.exception("could not save MQTT broker state")
            finally:
                self.store = None
                # Off the loop: the writer may still be busy for a moment.
                await asyncio.to_thread(store.close)
        # Clients told "server shutting down" had the time above to read it.
        for conn in conns:
            tr = conn.transport
            if tr is not None and not tr.is_closing():
                tr.close()
        log.info("MQTT broker stopped")

    # ------------------------------------------------------------- counters

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def count_drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def telemetry_error(self, e: TelemetryError, topic: str) -> None:
        reason = e.reason
        self.decode_errors[reason] = self.decode_errors.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._error_logged.get(reason, -ERROR_LOG_INTERVAL) >= ERROR_LOG_INTERVAL:
            self._error_logged[reason] = now
            log.warning(
                "telemetry payload refused on %s: %s (%d so far with this reason)",
                topic,
                e,
                self.decode_errors[reason],
            )

    def stats(self) -> BrokerStats:
        """Levels and counters; each field of :class:`BrokerStats` says how it is exported."""
        sessions = self.sessions.values()
        return BrokerStats(
            connections=len(self.connections),
            clients_connected=self._connected,
            sessions=len(self.sessions),
            persistent_sessions=len(self._persistent),
            subscriptions=len(self.tree),
            retained=len(self.retained),
            retained_bytes=self.retained.bytes,
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            readings_in=self.readings_in,
            dropped=sum(self.dropped.values()),
            decode_errors=sum(self.decode_errors.values()),
            queued=sum(len(s.queue) for s in sessions),
            queued_bytes=sum(s.queued_bytes for s in sessions),
            inflight=sum(len(s.inflight) for s in sessions),
            log_lines_suppressed=self.events.suppressed_total,
            events=dict(self.counters),
            dropped_by_reason=dict(self.dropped),
            decode_errors_by_reason=dict(self.decode_errors),
        )

    # ------------------------------------------------------- connection hooks

    def connection_made(self, conn: MqttConnection) -> None:
        if self._stopped:
            conn.close()
            return
        cap = self.limits.max_connections_per_address
        host = address_key(conn.remote)
        held = self._per_address.get(host, 0)
        if cap and held >= cap:
            self.count_drop("max_connections_per_address")
            self.events.emit(
                "connection_refused",
                logging.WARNING,
                "MQTT connection from %s refused: %d open from that address (limit %d)",
                conn.remote,
                held,
                cap,
            )
            conn.close()
            return
        self._per_address[host] = held + 1
        self.connections.add(conn)
        self.count("connections_total")

    # ---------------------------------------------------- access changes

    def acl_changed(self) -> int:
        """The ACL changed (reload, a device's rules or groups edited): forget
        every cached decision, the authoriser's and every connection's
        (publish verdicts, the telemetry fast path's topics, read verdicts),
        so the next message of every client is decided under the new rules;
        disconnect clients holding a subscription the new rules refuse
        (v5: DISCONNECT 0x87 not authorised; their queued messages are
        filtered at delivery anyway). Returns the number of clients
        disconnected."""
        self.authoriser.invalidate()
        closed = 0
        for conn in list(self.connections):
            conn.forget_acl()
            principal = conn.principal
            session = conn.session
            if principal is None or session is None or conn.state != CONNECTED:
                continue
            for flt in session.subscriptions:
                real = flt.split("/", 2)[2] if flt.startswith("$share/") else flt
                if not self.authoriser.may_subscribe(principal, real):
                    conn.close(0x87, f"ACL changed: may no longer subscribe to {flt}")
                    closed += 1
                    break
        return closed

    def revoke(self, username: str) -> int:
        """Identity ``username`` (a device id: a user name or a certificate's
        common name) lost its access: disconnect its clients now (v5:
        DISCONNECT 0x98 administrative action), drop their pending wills, and forget cached
        decisions. Returns the number of clients disconnected."""
        self.authoriser.invalidate()
        owner = "user:" + username
        closed = 0
        for conn in list(self.connections):
            conn.forget_acl()
            p = conn.principal
            if p is not None and not p.anonymous and p.username == username:
                conn.revoke("identity revoked")
                closed += 1
        for session in self.sessions.values():
            if session.owner == owner and session.will is not None:
                session.will = None
                session.will_at = None
                self._will_principal.pop(session.client_id, None)
        if closed:
            self.count("clients_revoked", closed)
            self.flush_writes_soon()
        return closed

    def revoke_certificates(self, serials: set[int]) -> int:
        """Disconnect clients whose TLS client certificate's serial number is
        in ``serials`` (a CRL was updated: new handshakes are refused by the
        listener, open connections end here). Returns how many."""
        closed = 0
        for conn in list(self.connections):
            t = conn.transport
            if t is not None and client_cert_serial(t) in serials:
                conn.revoke("client certificate revoked")
                closed += 1
        if closed:
            self.count("clients_revoked", closed)
            self.flush_writes_soon()
        return closed

    def connected_count(self) -> int:
        return self._connected

    def track_task(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def assign_client_id(self) -> str:
        while True:
            cid = f"edgeway-{secrets.token_hex(8)}"
            if cid not in self.sessions:
                return cid

    def connection_lost(self, conn: MqttConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            host = address_key(conn.remote)
            held = self._per_address.get(host, 1) - 1
            if held > 0:
                self._per_address[host] = held
            else:
                self._per_address.pop(host, None)
        self.release(conn)

    def release(self, conn: MqttConnection) -> None:
        """``conn`` is done with its session (it closed, or lingers closing)."""
        self._saturated.discard(conn)
        session = conn.session
        conn.session = None
        if self._stopped or session is None:
            return
        if session.conn is not conn:
            return
        self._connected -= 1
        session.conn = None
        self._detach(session, conn)
        for obs in self.observers:
            obs.session_offline(session)

    def _detach(self, session: Session, conn: MqttConnection) -> None:
        """The session's connection ended (closed, lost or taken over)."""
        now = self.clock.now()
        will = conn.will if conn.sends_will else None
        if not session.persistent:
            if will is not None:
                self._publish_will(will, conn.client_id, conn.principal)
            self._drop_session(session)
            return
        session.disconnected_at = now
        if will is not None:
            delay = (will.properties.will_delay_interval or 0) if conn.level == MQTT_5 else 0
            if delay <= 0:
                self._publish_will(will, conn.client_id, conn.principal)
            else:
                session.will = will
                session.will_at = now + min(delay, session.expiry_interval)
                self._will_principal[session.client_id] = conn.principal
        if self.store is not None:
            self.store.session_saved(session)
            self.schedule_store_flush()

    def session_owner(self, client_id: str) -> str | None:
        """The identity owning the session of ``client_id`` (None: no session,
        or an owner not recorded)."""
        s = self.sessions.get(client_id)
        return s.owner if s is not None else None

    def attach_session(
        self, conn: MqttConnection, clean_start: bool, expiry: int
    ) -> tuple[Session, bool]:
        """Give ``conn`` its session (new or resumed); returns (session, present).

        The caller has checked that ``conn``'s identity may have it
        (:meth:`session_owner`): a session is never handed to another identity."""
        cid = conn.client_id
        old = self.sessions.get(cid)
        if old is not None and old.conn is not None:
            prev = old.conn
            old.conn = None
            self._connected -= 1
            prev.taken_over()
            prev.session = None
            self._detach(old, prev)
            old = self.sessions.get(cid)
        if old is not None and clean_start:
            self._end_session(old)
            old = None
        if old is None:
            session = Session(cid, conn.level, expiry)
            self.sessions[cid] = session
            present = False
        else:
            session = old
            present = True
            # Reconnected in time: the delayed will is not sent (MQTT 3.1.3.2.2).
            session.will = None
            session.will_at = None
            self._will_principal.pop(cid, None)
            session.protocol_level = conn.level
            session.expiry_interval = expiry
        if session.persistent:
            self._persistent.add(session)
        else:
            self._persistent.discard(session)
        session.conn = conn
        if conn.principal is not None:
            session.owner = conn.principal.identity
        session.disconnected_at = None
        self._connected += 1
        for obs in self.observers:
            obs.session_online(session)
        store = self.store
        if store is not None:
            if session.persistent:
                if not session.persisted:
                    for entry in session.subscriptions.values():
                        store.subscription_saved(cid, entry)
                store.session_saved(session)
                self.schedule_store_flush()
            elif session.persisted:
                store.session_deleted(cid)
                session.persisted = False
                self.schedule_store_flush()
        return session, present

    def _end_session(self, session: Session) -> None:
        """The session ends (expired or replaced): a pending will goes out now."""
        if session.will is not None:
            will, session.will = session.will, None
            session.will_at = None
            self._publish_will(
                will, session.client_id, self._will_principal.pop(session.client_id, None)
            )
        self._drop_session(session)

    def may_keep_session(self, client_id: str) -> bool:
        """Whether a CONNECT asking for a persistent session may have one:
        resuming or replacing its own always may; a new one only below
        ``max_persistent_sessions``."""
        cap = self.limits.max_persistent_sessions
        if not cap or len(self._persistent) < cap:
            return True
        old = self.sessions.get(client_id)
        return old is not None and old in self._persistent

    def _drop_session(self, session: Session) -> None:
        self._persistent.discard(session)
        for flt in session.subscriptions:
            self.tree.unsubscribe(session, flt)
        session.subscriptions.clear()
        session.subscription_chars = 0
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if session.persisted and self.store is not None:
            self.store.session_deleted(session.client_id)
            session.persisted = False
            self.schedule_store_flush()

    def _publish_will(self, will: Will, client_id: str, principal: Principal | None) -> None:
        if principal is not None and not self.authoriser.may_publish(principal, will.topic):
            self.count_drop("will_not_authorised")
            self.events.emit(
                "publish_denied",
                logging.WARNING,
                "MQTT client %s (user %s) may not publish its will to %s: dropped",
                client_id,
                None if principal.anonymous else principal.username,
                will.topic,
            )
            return
        props = will.properties
        fwd: Properties | None = None
        expires_at: float | None = None
        if (
            props.payload_format_indicator is not None
            or props.content_type is not None
            or props.response_topic is not None
            or props.correlation_data is not None
            or props.user_properties
        ):
            fwd = Properties(
                payload_format_indicator=props.payload_format_indicator,
                content_type=props.content_type,
                response_topic=props.response_topic,
                correlation_data=props.correlation_data,
                user_properties=list(props.user_properties),
            )
        if props.message_expiry_interval is not None:
            expires_at = self.clock.now() + props.message_expiry_interval
        self.count("wills_published")
        self.route(
            Message(will.topic, will.payload, will.qos, will.retain, fwd, expires_at, client_id)
        )
        self.flush_writes_soon()

    # ---------------------------------------------------------- subscriptions

    def subscribe(self, session: Session, entry: SubEntry) -> bool:
        """Add a subscription; True if it replaced one with the same filter."""
        existed = self.tree.subscribe(session, entry)
        if entry.topic_filter not in session.subscriptions:
            session.subscription_chars += len(entry.topic_filter)
        session.subscriptions[entry.topic_filter] = entry
        for obs in self.observers:
            obs.subscribed(session, entry.topic_filter)
        if session.persistent and self.store is not None:
            self.store.subscription_saved(session.client_id, entry)
            self.schedule_store_flush()
        return existed

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        session.subscription_chars -= len(topic_filter)
        self.tree.unsubscribe(session, topic_filter)
        if session.persistent and self.store is not None:
            self.store.subscription_deleted(session.client_id, topic_filter)
            self.schedule_store_flush()
        return True

    # ---------------------------------------------------------------- routing

    def speaks_for(self, client_id: str, device_id: str) -> bool:
        """Whether the connected client ``client_id`` may act as device
        ``device_id`` (report its twin, answer its commands): its client id
        is the device id, and a client that proved an identity (a device
        credential, a certificate, an ``mqtt.users`` name) proved that one:
        a client id alone is only a claim. An anonymous client (a listener
        with ``allow_anonymous``) is taken at its client id."""
        if client_id != device_id:
            return False
        session = self.sessions.get(client_id)
        conn = session.conn if session is not None else None
        principal = getattr(conn, "principal", None)
        if principal is None or principal.anonymous:
            return True
        return bool(principal.device_id == device_id)

    def may_answer_on(self, client_id: str, topic: str) -> bool:
        """Whether the gateway may publish an answer to client ``client_id``'s
        request on ``topic``, the request's MQTT 5 response topic: only where
        that client could publish itself (its ACL), so a response topic never
        makes the gateway publish for a client where it may not (another
        device's command topic). No wildcards, no ``$`` topics."""
        if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
            return False
        session = self.sessions.get(client_id)
        principal = getattr(session.conn if session is not None else None, "principal", None)
        if principal is None:
            return False
        return bool(self.authoriser.may_publish(principal, topic))

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        on_ack: Callable[[str], None] | None = None,
    ) -> None:
        """Publish a gateway-originated message (receipts, commands).

        ``on_ack`` is called with the client id of every subscriber that
        completes a QoS 1/2 delivery of it (see ``Message.on_ack``).

        Call it on the event loop's thread. It is routed like a device's
        message (retained if asked, queued for offline persistent sessions)
        but is not telemetry: it never enters the pipeline.
        """
        expires_at = None
        if properties is not None and properties.message_expiry_interval is not None:
            expires_at = self.clock.now() + properties.message_expiry_interval
        self.messages_in += 1
        self.route(Message(topic, payload, qos, retain, properties, expires_at, None, on_ack))
        self.flush_writes_soon()

    def has_subscribers(self, topic: str) -> bool:
        """Whether a message on ``topic`` would be delivered to anyone now."""
        m = self.tree.match(topic)
        return bool(m.direct or m.shared)

    def route_publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None,
        expires_at: float | None,
        sender: str | None,
    ) -> None:
        """:meth:`route` for the hot path: no Message is built when nobody
        subscribes and nothing is retained."""
        if not retain and not self.has_subscribers(topic):
            if sender is not None:
                for obs in self.observers:
                    obs.published(topic, payload, properties, sender)
            return
        self.route(Message(topic, payload, qos, retain, properties, expires_at, sender))

    def route(self, msg: Message) -> None:
        """Deliver ``msg`` to every matching subscription (and retain it)."""
        sender = msg.sender
        if sender is not None:
            for obs in self.observers:
                obs.published(msg.topic, msg.payload, msg.properties, sender)
        if msg.retain:
            if not self.retained.set(msg):
                # Over max_retained_*: routed, not retained (a v5 publisher
                # that asked for an acknowledgement was refused before this).
                self.count_drop("retained_full")
                msg.retain = False
            self.schedule_store_flush()
        m = self.tree.match(msg.topic)
        direct = m.direct
        shared = m.shared
        if not direct and not shared:
            return
        cache: dict[Any, Any] = {}
        mqos = msg.qos
        mretain = msg.retain
        for session, entries in direct:
            if len(entries) == 1:
                e = entries[0]
                if e.no_local and sender == session.client_id:
                    continue
                qos = e.qos if e.qos < mqos else mqos
                sid = e.subscription_id
                d = Delivery(msg, qos, mretain and e.retain_as_published, (sid,) if sid else ())
            else:
                qos = -1
                rap = False
                ids: list[int] = []
                for e in entries:
                    if e.no_local and sender == session.client_id:
                        continue
                    if e.qos > qos:
                        qos = e.qos
                    rap = rap or e.retain_as_published
                    if e.subscription_id:
                        ids.append(e.subscription_id)
                if qos < 0:
                    continue
                d = Delivery(msg, min(qos, mqos), mretain and rap, tuple(sorted(ids)))
            conn = session.conn
            if conn is not None:
                try:
                    conn.deliver(d, cache)
                except Exception:
                    self._delivery_failed(conn)
            elif d.qos and session.persistent:
                self.queue_offline(session, d)
        for group in shared:
            picked = group.pick(_online)
            if picked is None:
                continue
            session, e = picked
            sid = e.subscription_id
            d = Delivery(
                msg,
                e.qos if e.qos < mqos else mqos,
                mretain and e.retain_as_published,
                (sid,) if sid else (),
            )
            conn = session.conn
            if conn is not None:
                try:
                    conn.deliver(d, cache)
                except Exception:
                    self._delivery_failed(conn)
            elif d.qos and session.persistent:
                self.queue_offline(session, d)

    def queue_offline(self, session: Session, d: Delivery) -> int:
        """Queue ``d`` for ``session`` within its limits (messages, bytes);
        what is dropped to make room is counted. Returns how many."""
        limits = self.limits
        dropped, _ = session.enqueue(d, limits.max_queued_messages, limits.max_queued_bytes)
        if dropped:
            self.count_drop("queue_full", dropped)
        return dropped

    def _delivery_failed(self, conn: MqttConnection) -> None:
        # A bug while sending to one subscriber closes that subscriber only,
        # never the publisher or the other subscribers.
        log.exception("error delivering to MQTT client %s; closing it", conn.client_id)
        self.count("delivery_errors")
        try:
            conn.close(0x83)
        except Exception:
            log.exception("error closing MQTT client %s", conn.client_id)

    # ----------------------------------------------------------------- output

    def mark_dirty(self, conn: MqttConnection) -> None:
        self._dirty.append(conn)
        if not self.receiving and self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self.flush_writes()

    def flush_writes_soon(self) -> None:
        if self._dirty and self._flush_handle is None and not self.receiving:
            self._flush_handle = self.loop.call_soon(self._flush_soon)

    def flush_writes(self) -> None:
        """Write every connection's collected output (one write per connection)."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for conn in dirty:
            try:
                conn.flush()
            except Exception:
                log.exception("error writing to MQTT client %s", conn.client_id)

    def schedule_store_flush(self) -> None:
        if self._store_handle is None and self.store is not None:
            self._store_handle = self.loop.call_soon(self._store_flush)

    def _store_flush(self) -> None:
        self._store_handle = None
        store = self.store
        if store is None:
            return
        try:
            if self.retained.dirty:
                store.retained_changed(self.retained.dirty)
                self.retained.dirty = {}
            store.flush()
        except Exception:
            log.exception("could not save MQTT broker state")

    # ------------------------------------------------------------- saturation

    def watch_saturation(self, conn: MqttConnection) -> None:
        self._saturated.add(conn)
        if self._saturation_handle is None:
            self._saturation_handle = self.loop.call_later(SATURATION_POLL, self._check_saturation)

    def _check_saturation(self) -> None:
        self._saturation_handle = None
        if self.ingest.is_saturated():
            self._saturation_handle = self.loop.call_later(SATURATION_POLL, self._check_saturation)
            return
        conns, self._saturated = self._saturated, set()
        for conn in conns:
            conn.resume_reading(2)

    # ------------------------------------------------------------------ sweep

    def _sweep(self) -> None:
        """Keep alive, connect timeout, session expiry, delayed wills, autosave."""
        loop = self.loop
        try:
            now = loop.time()
            connect_timeout = self.limits.connect_timeout
            packet_timeout = self.limits.packet_timeout
            linger = self.limits.disconnect_linger
            for conn in list(self.connections):
                if conn.state == CLOSED:
                    if conn.lingering_since and now - conn.lingering_since > linger:
                        conn.linger_expired()
                    continue
                if packet_timeout and conn.packet_stalled(now, packet_timeout):
                    conn.packet_timed_out()
                    continue
                if conn.rx:
                    conn.rx = False
                    conn.last_rx = now
                    continue
                if conn.held:
                    # We stopped reading it (back-pressure): its packets, its
                    # PINGREQs too, wait in the socket. Held time is not
                    # idleness; keep alive counts again once we read again.
                    conn.last_rx = now
                    continue
                if conn.state == CONNECTED:
                    ka = conn.keepalive
                    if ka and now - conn.last_rx > ka * 1.5:
                        conn.keepalive_expired()
                elif conn.state != CLOSED and now - conn.accepted_at > connect_timeout:
                    self.count("connect_timeouts")
                    conn.close()
            self.expire_sessions()
            t = self.clock.now()
            if self.store is not None and t - self._last_autosave >= AUTOSAVE_INTERVAL:
                self._last_autosave = t
                self.store.clock_saved(self.clock.stamp())
                dirty = [s for s in self.sessions.values() if s.dirty and s.persistent]
                if dirty:
                    self.store.messages_saved(dirty)  # flushes the clock too
                else:
                    self.store.flush()
            self.events.report_suppressed()
            self.flush_writes()
        except Exception:
            log.exception("MQTT broker sweep failed")
        finally:
            if not self._stopped:
                self._sweep_handle = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def expire_sessions(self) -> None:
        """Send delayed wills that are due and end expired sessions, by the
        broker clock (part of the sweep; tests call it after moving a clock)."""
        now = self.clock.now()
        expired: list[Session] = []
        for s in self.sessions.values():
            if s.conn is not None:
                continue
            if s.will_at is not None and now >= s.will_at and s.will is not None:
                will, s.will, s.will_at = s.will, None, None
                self._publish_will(will, s.client_id, self._will_principal.pop(s.client_id, None))
            if (
                s.disconnected_at is not None
                and s.expiry_interval != NEVER_EXPIRES
                and now >= s.disconnected_at + s.expiry_interval
            ):
                expired.append(s)
        for s in expired:
            self.count("sessions_expired")
            self._end_session(s)


def _online(session: Session) -> bool:
    return session.conn is not None
