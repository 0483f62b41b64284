"""The back-end request channel ("Back-end communication" in QEMU's
``docs/interop/vhost-user.rst``; formerly the slave channel), front-end side.

The front-end creates a socketpair and hands one end to the back-end with
SET_BACKEND_REQ_FD; the back-end then sends its own requests on it
(:data:`~.protocol.BACKEND_SPECS`) and the front-end answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shadowvmm.errors import ArgumentError, BackendDisconnected, BackendError, ProtocolError

from .framing import Framer, Message, request_name, send_message
from .protocol import (
    BACKEND_SPECS,
    U64,
    VERSION,
    BackendRequest,
    Header,
    HeaderFlags,
    MessageSpec,
    Payload,
    ProtocolFeature,
    decode_payload,
)

__all__ = ["BACKEND_ERROR", "MAX_PENDING", "BackendChannel", "BackendHandler", "BackendMessage", "HandlerResult"]

log = logging.getLogger(__name__)

#: u64 answered to a back-end request that is refused (unknown, not negotiated, malformed, failed).
BACKEND_ERROR = 1
#: Back-end requests queued for handling before the channel stops reading (see BackendChannel).
MAX_PENDING = 64

@dataclass(frozen=True, slots=True)
class BackendMessage:
    """A back-end request handed to a handler; ``fds`` are closed after the handler returns."""

    request: BackendRequest
    payload: Payload | None
    fds: tuple[int, ...]
    need_reply: bool


#: A handler returns a status (0 = success) or ``(status, fds to send back)``; it may be async.
HandlerResult = int | tuple[int, Sequence[int]]
BackendHandler = Callable[[BackendMessage], HandlerResult | Awaitable[HandlerResult]]


class BackendChannel:
    """Front-end side of the back-end request channel ("Back-end communication").

    Requests are decoded from :data:`~.protocol.BACKEND_SPECS` and handled one
    at a time. A request that is unknown, not negotiated, malformed or has no
    handler is never acted on: it is answered with status
    :data:`BACKEND_ERROR` when the back-end asked for a reply (NEED_REPLY, or
    a request with a defined reply), and otherwise only logged. A framing
    error closes this channel; the front-end channel carries on.

    At most :data:`MAX_PENDING` requests wait to be handled: past that the channel stops
    reading until the handler caught up, so a back-end that floods it is slowed down by its
    own socket buffer instead of growing the front-end's memory and event-loop lag.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 handlers: Mapping[BackendRequest, BackendHandler],
                 negotiated: Callable[[], tuple[ProtocolFeature, int]], name: str) -> None:
        self._sock = sock
        self._loop = loop
        self._handlers = handlers
        self._negotiated = negotiated
        self._name = name
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._framer = Framer(sock, self._enqueue, self._on_error)
        self._worker: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._framer.on_readable)
        self._worker = self._loop.create_task(self._work(), name=f"{self._name}-backend-channel")
        log.info("%s: back-end channel open", self._name)

    def _enqueue(self, message: Message) -> None:
        if log.isEnabledFor(logging.DEBUG):
            message.received = time.perf_counter()
            header = message.header
            log.debug("%s: back-end channel recv %s flags=%#x size=%d fds=%d", self._name,
                      request_name(BackendRequest, header.request), header.flags, header.size, len(message.fds))
        self._queue.put_nowait(message)
        if self._queue.qsize() >= MAX_PENDING and not self._framer.paused:
            self._framer.paused = True
            self._loop.remove_reader(self._sock.fileno())

    def _on_error(self, exc: BackendError) -> None:
        log.warning("%s: back-end channel closed: %s", self._name, exc)
        self.close()

    def close(self) -> None:
        """Stop reading, close the socket and drop queued requests (their fds too)."""
        if self.closed:
            return
        self.closed = True
        self._framer.close()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self._worker is not None and self._worker is not asyncio.current_task(self._loop):
            self._worker.cancel()
        while not self._queue.empty():
            self._queue.get_nowait().close_fds()

    async def aclose(self) -> None:
        self.close()
        if self._worker is not None and self._worker is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _work(self) -> None:
        while not self.closed:
            message = await self._queue.get()
            try:
                await self._handle(message)
            finally:
                message.close_fds()
            if self._framer.paused and self._queue.qsize() <= MAX_PENDING // 2 and not self.closed:
                self._framer.paused = False
                self._loop.add_reader(self._sock.fileno(), self._framer.on_readable)

    def _refusal(self, message: Message) -> tuple[BackendRequest | None, MessageSpec | None, Payload | None, str]:
        """Decode and gate-check *message*; a non-empty string says why it is refused."""
        header = message.header
        if header.is_reply:
            return None, None, None, "unexpected reply flag"
        try:
            request = BackendRequest(header.request)
        except ValueError:
            return None, None, None, f"unknown request code {header.request}"
        spec = BACKEND_SPECS.get(request)
        if spec is None:
            return request, None, None, "request has no specified wire format"
        protocol, virtio = self._negotiated()
        if int(spec.gate) & ~int(protocol) or spec.virtio_gate & ~virtio:
            return request, spec, None, "needs a feature that was not negotiated"
        if message.fds and ProtocolFeature.BACKEND_SEND_FD not in protocol:
            return request, spec, None, "fds sent without BACKEND_SEND_FD"
        try:
            payload = decode_payload(spec.request, message.body)
        except ProtocolError as exc:
            return request, spec, None, str(exc)
        if len(message.fds) != spec.request_fds(payload):
            return request, spec, payload, f"{len(message.fds)} fds, expected {spec.request_fds(payload)}"
        if request not in self._handlers:
            return request, spec, payload, "no handler installed"
        return request, spec, payload, ""

    async def _handle(self, message: Message) -> None:
        request, spec, payload, refusal = self._refusal(message)
        status, out_fds = BACKEND_ERROR, ()
        label = request.name if request is not None else str(message.header.request)
        if refusal:
            log.warning("%s: refusing back-end request %s: %s", self._name, label, refusal)
        else:
            assert request is not None
            try:
                result: Any = self._handlers[request](
                    BackendMessage(request, payload, tuple(message.fds), message.header.need_reply))
                if inspect.isawaitable(result):
                    result = await result
                status, out_fds = (result, ()) if isinstance(result, int) else (result[0], tuple(result[1]))
                if not 0 <= status < 1 << 64:
                    raise ArgumentError(f"status {status} does not fit a u64")
            except Exception:
                log.exception("%s: handler for back-end request %s failed", self._name, label)
                status, out_fds = BACKEND_ERROR, ()
        if spec is not None and spec.reply is not None:
            reply = spec.reply.unpack(U64(status).pack())
            if spec.reply_fd_count(reply) != len(out_fds):
                reply, out_fds = spec.reply.unpack(U64(status or BACKEND_ERROR).pack()), ()
            await self._reply(message, reply, out_fds)
        elif message.header.need_reply:
            await self._reply(message, U64(status), ())

    async def _reply(self, message: Message, payload: Payload, fds: Sequence[int]) -> None:
        body = payload.pack()
        header = Header(message.header.request, VERSION | HeaderFlags.REPLY, len(body))
        data = header.pack() + body
        if log.isEnabledFor(logging.DEBUG):
            latency = (time.perf_counter() - message.received) * 1e6 if message.received else 0.0
            log.debug("%s: back-end channel send %s reply flags=%#x size=%d fds=%d latency=%.0fus", self._name,
                      request_name(BackendRequest, header.request), header.flags, header.size, len(fds), latency)
        try:
            await send_message(self._sock, data, fds)
        except OSError as exc:
            self._on_error(BackendDisconnected(f"reply failed: {exc}"))
