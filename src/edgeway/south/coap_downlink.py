"""Commands to CoAP devices: observe the commands resource, take each command
as a confirmable notification, POST the result back.

Configuration (``coap``; see docs/protocols/coap.md)::

    coap:
      commands: true             # off by default: CoAP without DTLS has no credentials
      command_poll_wait: 1s      # how long a plain GET waits for a queued command
      max_command_polls: 1000    # plain GETs waiting at once (5.03 beyond)

A device observes ``GET /devices/{device_id}/commands`` (RFC 7641). The first
answer is an empty 2.05; while the observation lasts the device is
*reachable*. Each command goes out as a **confirmable** notification whose
payload is the command's JSON (``{"id", "name", "params", "expires_at"[,
"redelivery": true]}``, Content-Format 50): the device's ACK of that
notification makes it DELIVERED. If the notification is not acknowledged
(the device answers RST, aiocoap's retransmissions give up, or the
observation ends first) the delivery resolves False and the queue sends the
command again, flagged as a redelivery, once the device observes again.

A command larger than one block (1024 bytes) is sent as its first Block2
block with Size2 and an ETag (RFC 7959 3.4); the device fetches the other
blocks with plain GETs carrying Block2, from the address it observes from.
Such a command is DELIVERED when its last block has been sent.

A plain ``GET`` (no Observe) is a short poll: it waits up to
``command_poll_wait`` for the queue to hand it the next command and answers
2.05 with the command, or 2.05 with an empty payload when there is none. The
command counts as delivered once that response is sent (or, for a response
sent as a separate confirmable message, acknowledged).

The device answers with ``POST /devices/{device_id}/commands/{command_id}/result``
and a JSON (Content-Format 50 or none) or CBOR (60) object ``{"status": "ok" |
"error", "result"?, "error"?}``: 2.04 Changed when taken, 4.04 when no
command of that device waits for a result (unknown, finished, another
device's), 4.00 for a payload that is not such an object.

Who: CoAP without DTLS has no credentials, so the adapter's only notion of a
client is its source address (``observe_networks``, which gates every
commands request when set). A device cannot answer another device's command
(the path's device id must be the command's), and command ids are random
(128 bits) and known only to the device that took the command - and to
whoever can read the network, which is why commands are off unless
``coap.commands`` turns them on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from edgeway.commands.model import CommandResult
from edgeway.downlink import DownlinkEvents

if TYPE_CHECKING:
    from edgeway.commands.model import Command

log = logging.getLogger(__name__)

BLOCK_SZX = 6
"""Block2 size exponent of command bodies: 2 ** (6 + 4) = 1024 bytes, the
largest regular block (RFC 7959 2.2). A block with its CoAP header fits in
the IPv6 minimum MTU (1280 bytes), so a notification is never fragmented;
a device may ask for smaller blocks in its follow-up GETs."""

CONTENT_FORMAT_JSON = 50
CONTENT_FORMAT_CBOR = 60


def _address_key(sockaddr: Any) -> tuple[str, int]:
    """(host, port) of a socket address, the part that names a CoAP endpoint."""
    return str(sockaddr[0]), int(sockaddr[1])


@dataclass(slots=True, eq=False)
class _Transfer:
    """One command being handed to a device: its body, and who may fetch it."""

    command_id: str
    body: bytes
    etag: bytes
    client_ip: str
    delivered: asyncio.Future[bool]
    observation: Any = None
    """The observation it was notified on (None: a plain GET took it)."""
    messages: dict[int, Any] = field(default_factory=dict)
    """Messages built for it and not yet sent, by id()."""
    ack_keys: list[tuple[tuple[str, int], int]] = field(default_factory=list)
    """(endpoint, message id) of its confirmable messages awaiting an ACK."""

    def block(self, number: int, szx: int) -> tuple[bytes, bool] | None:
        """Block ``number`` of size ``2 ** (szx + 4)`` and whether more follow;
        None when it starts past the end."""
        size = 1 << (min(szx, BLOCK_SZX) + 4)
        start = number * size
        if start >= len(self.body):
            return None
        end = min(start + size, len(self.body))
        return self.body[start:end], end < len(self.body)


@dataclass(slots=True, eq=False)
class _Poll:
    """A plain GET waiting for the queue to hand it a command."""

    client_ip: str
    szx: int
    answer: asyncio.Future[Any]
    """Resolves with the response message, or None (nothing to send)."""


@dataclass(slots=True, eq=False)
class _Sending:
    """A message of a transfer that has not gone out yet."""

    transfer: _Transfer
    completes: bool
    """Its delivery completes the transfer (the whole body or its last block)."""
    needs_ack: bool
    """Complete only on the device's ACK (a notification)."""


@dataclass(slots=True)
class CoapCommandStats:
    """Counters of the CoAP downlink (adapter status)."""

    notified: int = 0
    """Commands sent as notifications."""
    polled: int = 0
    """Commands answered to plain GETs."""
    acknowledged: int = 0
    """Notifications the device acknowledged."""
    not_acknowledged: int = 0
    """Deliveries that ended without the device's confirmation."""
    blocks_served: int = 0
    """Follow-up Block2 GETs answered."""
    results: int = 0
    results_refused: int = 0


class CoapDownlink:
    """The CoAP listener's :class:`~edgeway.downlink.Downlink`; see the module docstring."""

    name = "coap"

    def __init__(self, events: DownlinkEvents, *, poll_wait: float, max_polls: int) -> None:
        self.events = events
        self.poll_wait = poll_wait
        self.max_polls = max_polls
        self.stats = CoapCommandStats()
        self._observations: dict[str, list[tuple[Any, str]]] = {}
        """device id -> (observation, client ip), newest last."""
        self._polls: dict[str, _Poll] = {}
        self._transfers: dict[str, _Transfer] = {}
        """device id -> the command being handed to it (one at a time: the
        queue waits for its delivery before the next)."""
        self._sending: dict[int, _Sending] = {}
        self._awaiting_ack: dict[tuple[tuple[str, int], int], _Transfer] = {}
        self._late_acks: dict[tuple[tuple[str, int], int], tuple[str, Any]] = {}
        """Notifications still retransmitted after the queue stopped waiting
        for them: (device id, observation). A few per observation at most (its
        notifications in flight, ~93 s of them); dropped when it ends."""

    # --------------------------------------------------------------- Downlink

    def reachable(self, command: Command) -> bool:
        device = command.device_id
        return device in self._observations or device in self._polls

    def deliver(self, command: Command) -> asyncio.Future[bool]:
        from aiocoap import Message

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        device = command.device_id
        poll = self._polls.pop(device, None)
        observers = self._observations.get(device)
        if poll is None and not observers:
            fut.set_result(False)
            return fut
        body = orjson.dumps(command.device_payload())
        etag = hashlib.blake2b(body, digest_size=8).digest()
        if poll is not None:
            transfer = _Transfer(command.id, body, etag, poll.client_ip, fut)
            szx = poll.szx
        else:
            assert observers
            observation, client_ip = observers[-1]
            transfer = _Transfer(command.id, body, etag, client_ip, fut, observation)
            szx = BLOCK_SZX
        old = self._transfers.get(device)
        if old is not None and not old.delivered.done():
            old.delivered.set_result(False)
        self._transfers[device] = transfer
        fut.add_done_callback(lambda _f: self._transfer_done(device, transfer))
        msg: Message = self._block_message(transfer, 0, szx, first=True)
        if poll is not None:
            self.stats.polled += 1
            self._track(msg, transfer, needs_ack=False)
            poll.answer.set_result(msg)
        else:
            from aiocoap import Reliable

            self.stats.notified += 1
            msg.transport_tuning = Reliable  # a CON: the device's ACK confirms it
            self._track(msg, transfer, needs_ack=True)
            transfer.observation.trigger(msg)
        return fut

    # ------------------------------------------------------- from the adapter

    def observed(self, device_id: str, observation: Any, client_ip: str) -> None:
        """An accepted observation of ``device_id``'s commands: queued commands go out."""
        self._observations.setdefault(device_id, []).append((observation, client_ip))
        self.events.device_reachable(device_id)

    def observation_ended(self, device_id: str, observation: Any) -> None:
        """The observation is gone (cancelled, replaced, or a notification went
        unacknowledged): a command notified on it and not confirmed is not delivered."""
        observers = self._observations.get(device_id)
        if observers is not None:
            observers[:] = [(o, ip) for o, ip in observers if o is not observation]
            if not observers:
                del self._observations[device_id]
        if self._late_acks:
            for key in [k for k, (_, o) in self._late_acks.items() if o is observation]:
                del self._late_acks[key]
        transfer = self._transfers.get(device_id)
        if (
            transfer is not None
            and transfer.observation is observation
            and not transfer.delivered.done()
        ):
            transfer.delivered.set_result(False)
        if device_id in self._observations:
            # Another observation of the device (from another address) may take it.
            self.events.device_reachable(device_id)

    def observer_count(self, device_id: str) -> int:
        return len(self._observations.get(device_id, ()))

    async def poll(self, device_id: str, client_ip: str, block2: Any) -> Any:
        """Answer a plain GET: a follow-up block of the device's command, the
        next command (waiting up to ``poll_wait``), or an empty 2.05."""
        from aiocoap import Code, Message

        if block2 is not None and block2.block_number > 0:
            return self._next_block(device_id, client_ip, block2)
        szx = BLOCK_SZX if block2 is None else min(block2.size_exponent, BLOCK_SZX)
        old = self._polls.get(device_id)
        if old is None and len(self._polls) >= self.max_polls:
            return None  # the adapter answers 5.03
        if old is not None and not old.answer.done():
            old.answer.set_result(None)  # a newer poll of the device takes its place
        poll = _Poll(client_ip, szx, asyncio.get_running_loop().create_future())
        self._polls[device_id] = poll
        try:
            self.events.device_reachable(device_id)
            try:
                async with asyncio.timeout(self.poll_wait):
                    msg = await asyncio.shield(poll.answer)
            except TimeoutError:
                msg = None
        except BaseException:
            # Cancelled (the client lost interest): a command handed to this
            # poll will not be sent.
            if poll.answer.done() and poll.answer.result() is not None:
                self._untrack(poll.answer.result())
            raise
        finally:
            if self._polls.get(device_id) is poll:
                del self._polls[device_id]
            if not poll.answer.done():
                poll.answer.set_result(None)
        if msg is None:
            return Message(code=Code.CONTENT, payload=b"")
        return msg

    def result(
        self, device_id: str, command_id: str, payload: bytes, content_format: int | None
    ) -> tuple[Any, str]:
        """Take a device's answer; returns the response code (2.04, 4.04, 4.00
        or 4.15) and a diagnostic."""
        from aiocoap import Code

        from edgeway.codecs.base import DecodeError
        from edgeway.codecs.cbor import loads_cbor

        doc: Any
        try:
            if content_format is None or content_format == CONTENT_FORMAT_JSON:
                doc = orjson.loads(payload) if payload else {}
            elif content_format == CONTENT_FORMAT_CBOR:
                doc = loads_cbor(payload)
            else:
                self.stats.results_refused += 1
                return Code.UNSUPPORTED_CONTENT_FORMAT, "a result is JSON (50) or CBOR (60)"
            result = CommandResult.from_payload(device_id, doc, command_id)
        except (ValueError, DecodeError) as e:  # orjson.JSONDecodeError is a ValueError
            self.stats.results_refused += 1
            return Code.BAD_REQUEST, f"invalid_payload: {e}"[:512]
        if not self.events.report(result):
            self.stats.results_refused += 1
            return Code.NOT_FOUND, "no command of this device waits for a result"
        self.stats.results += 1
        return Code.CHANGED, ""

    # ------------------------------------------------------ from the transport

    def message_sent(self, message: Any) -> None:
        """The transport put ``message`` on the wire (first transmission or a
        retransmission)."""
        from aiocoap import CON

        sending = self._sending.pop(id(message), None)
        if sending is None:
            return
        transfer = sending.transfer
        transfer.messages.pop(id(message), None)
        if transfer.delivered.done() or not sending.completes:
            return
        if message.mtype is CON:
            key = (_address_key(message.remote.sockaddr), int(message.mid))
            transfer.ack_keys.append(key)
            self._awaiting_ack[key] = transfer
        elif not sending.needs_ack:
            transfer.delivered.set_result(True)

    def empty_received(self, sockaddr: Any, mid: int, *, reset: bool) -> None:
        """An empty ACK (or RST) from ``sockaddr`` for message id ``mid``."""
        key = (_address_key(sockaddr), mid)
        late = self._late_acks.pop(key, None)
        if late is not None:
            device_id, observation = late
            if not reset and any(
                o is observation for o, _ in self._observations.get(device_id, ())
            ):
                self.events.device_reachable(device_id)
            return
        transfer = self._awaiting_ack.pop(key, None)
        if transfer is None or transfer.delivered.done():
            return
        if reset:
            # The device does not want it (aiocoap ends the observation too).
            transfer.delivered.set_result(False)
        else:
            self.stats.acknowledged += 1
            transfer.delivered.set_result(True)

    # ---------------------------------------------------------------- helpers

    def _block_message(self, transfer: _Transfer, number: int, szx: int, *, first: bool) -> Any:
        from aiocoap import Code, Message

        block = transfer.block(number, szx)
        assert block is not None
        chunk, more = block
        msg = Message(code=Code.CONTENT, payload=chunk)
        msg.opt.content_format = CONTENT_FORMAT_JSON
        msg.opt.etag = transfer.etag
        if more or number > 0:
            msg.opt.block2 = (number, more, min(szx, BLOCK_SZX))
            if first:
                msg.opt.size2 = len(transfer.body)
        return msg

    def _next_block(self, device_id: str, client_ip: str, block2: Any) -> Any:
        from aiocoap import Code, Message

        transfer = self._transfers.get(device_id)
        if transfer is None or transfer.delivered.done() or transfer.client_ip != client_ip:
            # Nothing being handed to this device from this address (any more).
            return Message(code=Code.REQUEST_ENTITY_INCOMPLETE, payload=b"no transfer in progress")
        szx = min(block2.size_exponent, BLOCK_SZX)
        block = transfer.block(block2.block_number, szx)
        if block is None:
            return Message(code=Code.BAD_REQUEST, payload=b"block out of range")
        self.stats.blocks_served += 1
        msg = self._block_message(transfer, block2.block_number, szx, first=False)
        if not block[1]:
            self._track(msg, transfer, needs_ack=False, completes=True)  # the last block
        return msg

    def _track(
        self, msg: Any, transfer: _Transfer, *, needs_ack: bool, completes: bool | None = None
    ) -> None:
        if completes is None:
            completes = msg.opt.block2 is None  # the whole command in one message
        self._sending[id(msg)] = _Sending(transfer, completes, needs_ack)
        transfer.messages[id(msg)] = msg  # keeps id(msg) unique while tracked

    def _untrack(self, msg: Any) -> None:
        sending = self._sending.pop(id(msg), None)
        if sending is not None:
            sending.transfer.messages.pop(id(msg), None)
            if not sending.transfer.delivered.done():
                sending.transfer.delivered.set_result(False)

    def _transfer_done(self, device_id: str, transfer: _Transfer) -> None:
        fut = transfer.delivered
        if fut.cancelled() or not fut.result():
            self.stats.not_acknowledged += 1
        if self._transfers.get(device_id) is transfer:
            del self._transfers[device_id]
        for key in transfer.messages:
            self._sending.pop(key, None)
        transfer.messages.clear()
        late = fut.cancelled() and transfer.observation is not None
        for ack_key in transfer.ack_keys:
            if self._awaiting_ack.get(ack_key) is transfer:
                del self._awaiting_ack[ack_key]
                if late:
                    # The queue stopped waiting (the command's result timeout
                    # can be shorter than aiocoap's ~93 s of retransmissions)
                    # while the notification is still being retransmitted.
                    # If the device acknowledges it after all, it is alive and
                    # observing: the command goes out again then (a
                    # redelivery, promptly acknowledged) instead of staying
                    # SENT until the device registers again.
                    self._late_acks[ack_key] = (device_id, transfer.observation)
        transfer.ack_keys.clear()

    def close(self) -> None:
        """The listener stopped: nothing in flight will be confirmed."""
        for transfer in list(self._transfers.values()):
            if not transfer.delivered.done():
                transfer.delivered.set_result(False)
        for poll in self._polls.values():
            if not poll.answer.done():
                poll.answer.set_result(None)
        self._observations.clear()
        self._late_acks.clear()
