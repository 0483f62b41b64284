"""vhost-user connection: one front-end session, one request in flight.

Framing and fd passing live in :mod:`.framing`, the back-end request channel in
:mod:`.channel`, reaching the socket in :mod:`.endpoint` and the peer's identity
in :mod:`.peer`; their names are re-exported here.

Every reply is checked against :data:`~.protocol.FRONTEND_SPECS`. A reply
that is wrong, late or missing leaves the byte stream in an unknown position,
so the connection then goes :attr:`Runstate.DISCONNECTED` and closes its
socket; stray fds are closed at once. A non-zero REPLY_ACK answer keeps the
stream in step and raises :class:`RequestFailed`.

Tracing: every message is logged at DEBUG (request, flags, payload size, fds,
and for a reply its latency in microseconds), lifecycle transitions at INFO
(connected, protocol features negotiated, closed) and a lost session at WARNING.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from shadowvmm.errors import (
    ArgumentError,
    ArgumentTypeError,
    BackendDisconnected,
    BackendError,
    BackendTimeout,
    DeviceStateError,
    ProtocolError,
    RequestFailed,
    UnsupportedError,
)

from .channel import BACKEND_ERROR, MAX_PENDING, BackendChannel, BackendHandler, BackendMessage, HandlerResult
from .endpoint import Connector, unix_connector, wait_for_path
from .framing import Framer, Message, close_fds, send_nowait, send_rest, wait_fd
from .peer import listener_pid, process_has_memory
from .protocol import (
    FRONTEND_SPECS,
    U64,
    VERSION,
    BackendRequest,
    FrontendRequest,
    Header,
    HeaderFlags,
    MessageSpec,
    Payload,
    ProtocolFeature,
    decode_reply,
)

__all__ = [
    "BACKEND_ERROR", "DEFAULT_TIMEOUT", "MAX_PENDING", "BackendChannel", "BackendHandler", "BackendMessage",
    "Connection", "Connector", "HandlerResult", "Message", "Reply", "RequestFailed", "Runstate", "close_fds",
    "process_has_memory", "require", "unix_connector", "wait_fd", "wait_for_path",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
_FLAGS = VERSION
_FLAGS_ACKED = VERSION | int(HeaderFlags.NEED_REPLY)
_HEADER_PACK = Header.STRUCT.pack


class Runstate(enum.Enum):
    """Connection life cycle (like ``qemu.qmp``'s ``Runstate``)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"



@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply; the caller owns (and must close) ``fds``."""

    request: FrontendRequest
    payload: Payload | None
    fds: tuple[int, ...] = ()



#: Requests whose success :meth:`Connection._track` records.
_TRACKED = frozenset({FrontendRequest.GET_FEATURES, FrontendRequest.GET_PROTOCOL_FEATURES,
                      FrontendRequest.SET_PROTOCOL_FEATURES, FrontendRequest.SET_FEATURES})


#: The reply of each request that has no reply body (frozen, so shared).
_EMPTY_REPLIES: Mapping[FrontendRequest, Reply] = {request: Reply(request, None) for request in FrontendRequest}


class _Turn:
    """A FIFO mutex whose uncontended take is a plain call (an :class:`asyncio.Lock` costs
    two coroutines per request): one request on the socket at a time, callers in arrival order."""

    __slots__ = ("held", "_waiters")

    def __init__(self) -> None:
        self.held = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        """Take the turn if nobody holds it or waits for it."""
        if self.held or self._waiters:
            return False
        self.held = True
        return True

    async def take(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            self._waiters.remove(waiter)
            if waiter.done() and not waiter.cancelled() and not self.held:
                self._wake()    # woken, then cancelled: the next one gets the turn
            raise
        self._waiters.remove(waiter)
        self.held = True

    def release(self) -> None:
        self.held = False
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                return


P = ParamSpec("P")
R = TypeVar("R")


Method = Callable[Concatenate["Connection", P], Coroutine[Any, Any, R]]


def require(*states: Runstate) -> Callable[[Method[P, R]], Method[P, R]]:
    """Guard a coroutine method: the connection must be in one of *states*."""

    def decorate(method: Method[P, R]) -> Method[P, R]:
        @functools.wraps(method)
        async def guarded(self: Connection, /, *args: P.args, **kwargs: P.kwargs) -> R:
            self._require(states, method.__name__)
            return await method(self, *args, **kwargs)

        return guarded

    return decorate


_ACK_SIZE = U64.STRUCT.size


@functools.cache
def _reply_size(spec: MessageSpec) -> int:
    """The reply body *spec* promises at most (read with the reply's header at once)."""
    return spec.reply.max_size() if spec.reply is not None else 0


class Connection:
    """Front-end end of one vhost-user session.

    *connector* returns a connected socket (see :func:`unix_connector`);
    *timeout* bounds connecting and every request (per-call override);
    *loop* defaults to the running loop at :meth:`connect`. Negotiated state
    is tracked from the messages themselves: ``features_offered`` (last
    GET_FEATURES), ``features_acked`` (last SET_FEATURES),
    ``protocol_features_offered`` and ``protocol_features`` (acknowledged).
    """

    def __init__(self, connector: Connector, *, timeout: float = DEFAULT_TIMEOUT,
                 loop: asyncio.AbstractEventLoop | None = None, name: str = "vhost-user",
                 backend_handlers: Mapping[BackendRequest, BackendHandler] | None = None) -> None:
        self._connector = connector
        self.timeout = timeout
        self._loop = loop
        self.name = name
        self._handlers: dict[BackendRequest, BackendHandler] = dict(backend_handlers or {})
        self._runstate = Runstate.IDLE
        self._sock: socket.socket | None = None
        self._framer: Framer | None = None
        self._turn = _Turn()
        self._pending: asyncio.Future[Message] | None = None
        #: The reply awaited now: its deadline (loop time), request and time limit.
        self._awaited: tuple[float, FrontendRequest, float] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._channel: BackendChannel | None = None
        self._error: BaseException | None = None
        #: Seconds to busy-poll for each reply before sleeping (0: never); see :meth:`_poll`.
        self.busy_poll = 0.0
        #: Called with the error when the session dies on its own (hang-up, receive or send
        #: error, reply timeout, an unsolicited or malformed message), never on :meth:`disconnect`.
        self.on_lost: Callable[[BaseException], None] | None = None
        #: The pid SO_PEERCRED reports for the peer (whoever called listen()), if any.
        self.peer_pid: int | None = None
        self._reset_negotiation()

    def _reset_negotiation(self) -> None:
        self.features_offered = 0
        self.features_acked = 0
        self.protocol_features_offered = ProtocolFeature(0)
        self.protocol_features = ProtocolFeature(0)
        self._protocol_bits = 0
        self._reply_ack = False
        #: Requests whose gates the negotiation so far lets through (see :meth:`_admit`).
        self._admitted: dict[FrontendRequest, MessageSpec] = {}

    @property
    def runstate(self) -> Runstate:
        return self._runstate

    @property
    def error(self) -> BaseException | None:
        """Why the connection went DISCONNECTED (None after a clean disconnect)."""
        return self._error

    @property
    def backend_channel(self) -> BackendChannel | None:
        return self._channel

    @property
    def socket(self) -> socket.socket | None:
        """The session's socket while RUNNING (to identify the peer), else None."""
        return self._sock if self._runstate is Runstate.RUNNING else None

    def _require(self, states: tuple[Runstate, ...], what: str) -> None:
        if self._runstate in states:
            return
        if self._runstate is Runstate.DISCONNECTED:
            raise BackendDisconnected(f"{self.name}: {what}: connection is disconnected") from self._error
        allowed = ", ".join(state.name for state in states)
        raise DeviceStateError(f"{self.name}: {what} needs runstate {allowed}, not {self._runstate.name}")

    async def __aenter__(self) -> Connection:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    @require(Runstate.IDLE, Runstate.DISCONNECTED)
    async def connect(self) -> None:
        """Open the socket: IDLE/DISCONNECTED -> CONNECTING -> RUNNING."""
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        self._reset_negotiation()
        self._error = None
        self._runstate = Runstate.CONNECTING
        try:
            async with asyncio.timeout(self.timeout):
                sock = await self._connector()
        except TimeoutError:
            self._runstate = Runstate.DISCONNECTED
            raise BackendTimeout(f"{self.name}: connect did not finish within {self.timeout:g} s") from None
        except OSError as exc:
            self._runstate = Runstate.DISCONNECTED
            raise BackendDisconnected(f"{self.name}: cannot connect: {exc}") from exc
        except BaseException:
            self._runstate = Runstate.DISCONNECTED
            raise
        sock.setblocking(False)
        self._sock = sock
        self.peer_pid = listener_pid(sock)
        self._framer = Framer(sock, self._on_message, self._teardown)
        self._turn = _Turn()
        loop.add_reader(sock.fileno(), self._framer.on_readable)
        self._runstate = Runstate.RUNNING
        log.info("%s: connected (listener pid %s)", self.name, self.peer_pid if self.peer_pid is not None else "?")

    async def disconnect(self) -> None:
        """Close the session (idempotent): -> DISCONNECTING -> DISCONNECTED."""
        if self._runstate in (Runstate.IDLE, Runstate.DISCONNECTED):
            return
        self._runstate = Runstate.DISCONNECTING
        channel = self._channel
        self._teardown(BackendDisconnected(f"{self.name}: disconnected by the front-end"))
        self._error = None
        log.info("%s: closed", self.name)
        if channel is not None:
            await channel.aclose()

    def _teardown(self, exc: BaseException) -> None:
        """Drop the socket after *exc*; fail the request in flight with it."""
        if self._runstate is Runstate.DISCONNECTED:
            return
        lost = self._runstate is not Runstate.DISCONNECTING
        if lost:
            log.warning("%s: connection lost: %s", self.name, exc)
        self._error = exc
        self._runstate = Runstate.DISCONNECTED
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._framer is not None:
            self._framer.close()
        if self._sock is not None:
            assert self._loop is not None
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        pending = self._pending
        if pending is not None and not pending.done():
            pending.set_exception(exc)
            pending.exception()
        if lost and self.on_lost is not None:
            self.on_lost(exc)

    def _poll(self, pending: asyncio.Future[Message]) -> None:
        """Spin on the socket for the reply for up to :attr:`busy_poll` seconds.

        Saves the wake-up of a sleeping event loop (about half a round trip on a
        virtualized host) at the price of holding the loop meanwhile; a reply that
        is late is left to the reader as usual.
        """
        framer = self._framer
        assert framer is not None
        clock = time.perf_counter
        deadline = clock() + self.busy_poll
        while not pending.done() and clock() < deadline:
            framer.on_readable()

    def _on_message(self, message: Message) -> None:
        pending = self._pending
        if pending is None or pending.done():
            message.close_fds()
            self._teardown(ProtocolError(
                f"{self.name}: unsolicited message from the back-end (request {message.header.request})"))
            return
        pending.set_result(message)

    def set_backend_handler(self, request: BackendRequest, handler: BackendHandler | None) -> None:
        """Install (or with ``None`` remove) the handler of back-end request *request*."""
        if handler is None:
            self._handlers.pop(request, None)
        else:
            self._handlers[request] = handler

    def _admit(self, request: FrontendRequest) -> MessageSpec:
        """*request*'s spec once its gates pass for this negotiation (cached until it changes)."""
        spec = FRONTEND_SPECS.get(request)
        if spec is None:
            raise UnsupportedError(f"{self.name}: {request.name} has no specified wire format")
        if missing := int(spec.gate) & ~self._protocol_bits:
            raise UnsupportedError(f"{self.name}: {request.name} needs protocol feature {ProtocolFeature(missing)!r}, "
                                   "which was not negotiated")
        if missing_bits := spec.virtio_gate & ~self.features_offered:
            raise UnsupportedError(f"{self.name}: {request.name} needs feature bits {missing_bits:#x}, "
                                   "which the back-end does not offer")
        self._admitted[request] = spec
        return spec

    @staticmethod
    def _encode(request: FrontendRequest, spec: MessageSpec, payload: Payload | None, fds: Sequence[int]) -> bytes:
        """Check a request against its spec; its payload bytes."""
        if spec.request is None:
            if payload is not None:
                raise ArgumentTypeError(f"{request.name} takes no payload")
            body = b""
        elif not isinstance(payload, spec.request):
            raise ArgumentTypeError(f"{request.name} takes a {spec.request.__name__} payload, not {payload!r}")
        else:
            body = payload.pack()    # validates
        if len(fds) != (spec.fds if spec.fds is not None else spec.request_fds(payload)):
            raise ArgumentError(f"{request.name} carries {spec.request_fds(payload)} fds, not {len(fds)}")
        return body

    @staticmethod
    def _discard(pending: asyncio.Future[Message] | None) -> None:
        """Close the fds of a reply that arrived but will not be used."""
        if pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None:
            pending.result().close_fds()

    async def request(self, request: FrontendRequest, payload: Payload | None = None, fds: Sequence[int] = (),
                      *, timeout: float | None = None, ack: bool | None = None) -> Reply:
        """Send *request* and return its checked reply.

        *fds* stay owned by the caller. With REPLY_ACK negotiated a request without a reply
        body goes out with NEED_REPLY when its spec says ``ack`` (*ack* overrides that) and
        its ack is checked (non-zero: :class:`RequestFailed`, connection kept). Any other
        request without a reply body is only written: requests pipeline, and a back-end that
        failed one shows it at the next reply (an ack, a GET_*, GET_VRING_BASE) or by closing
        the session. Returns a :class:`Reply` whose payload is ``None`` for requests without a body.
        """
        if self._runstate is not Runstate.RUNNING:
            self._require((Runstate.RUNNING,), request.name)
        spec = self._admitted.get(request) or self._admit(request)
        body = self._encode(request, spec, payload, fds)
        acked = spec.reply is None and self._reply_ack and (spec.ack if ack is None else ack)
        turn = self._turn
        if not acked and spec.reply is None and not log.isEnabledFor(logging.DEBUG) and turn.try_take():
            # Nothing to wait for and nobody else on the socket: written at once if it fits,
            # without a coroutine for the exchange (most ring set-up and stop messages).
            try:
                data = _HEADER_PACK(request, _FLAGS, len(body)) + body
                sent = self._send(request, data, fds)
                if sent < len(data):
                    await self._send_rest(request, data, sent, fds, self.timeout if timeout is None else timeout)
            finally:
                turn.release()
            if request in _TRACKED:
                self._track(request, payload, None)
            return _EMPTY_REPLIES[request]
        if not turn.try_take():
            await turn.take(self._loop or asyncio.get_running_loop())
        try:
            if self._runstate is not Runstate.RUNNING:
                self._require((Runstate.RUNNING,), request.name)
            limit = self.timeout if timeout is None else timeout
            message = await self._exchange(request, _FLAGS_ACKED if acked else _FLAGS, body, fds,
                                           spec.reply is not None or acked, limit,
                                           _ACK_SIZE if acked else _reply_size(spec))
            if message is None:
                if request in _TRACKED:
                    self._track(request, payload, None)
                return _EMPTY_REPLIES[request]
            try:
                reply = decode_reply(request, spec, payload, message.header, message.body, len(message.fds), acked)
            except ProtocolError as exc:
                message.close_fds()
                self._teardown(exc)
                raise
        finally:
            turn.release()
        if acked:
            assert isinstance(reply, U64)
            if reply.value:
                raise RequestFailed(request, reply.value)
            if request in _TRACKED:
                self._track(request, payload, None)
            return _EMPTY_REPLIES[request]
        if request in _TRACKED:
            self._track(request, payload, reply)
        return Reply(request, reply, tuple(message.fds))

    async def _exchange(self, request: FrontendRequest, flags: int, body: bytes, fds: Sequence[int],
                        wants_reply: bool, limit: float, reply_size: int = 0) -> Message | None:
        """Send one message and wait for its reply (if *wants_reply*) within *limit* seconds;
        any failure but a typed one from the reader tears the session down. The common case,
        a message the socket takes at once, arms no timer: the reply's deadline is checked by
        the session's watchdog (:meth:`_watch`). *reply_size*: the reply body expected (read
        with its header in one receive, :attr:`Framer.expect_body`)."""
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + limit
        pending = loop.create_future() if wants_reply else None
        self._pending = pending
        framer = self._framer
        if pending is not None and framer is not None:
            framer.expect_body = reply_size
        sent_at = self._trace_send(request, flags, len(body), len(fds)) if log.isEnabledFor(logging.DEBUG) else 0.0
        data = _HEADER_PACK(request, flags, len(body)) + body
        try:
            sent = self._send(request, data, fds)
            if sent < len(data):
                await self._send_rest(request, data, sent, fds, limit)
            if pending is None:
                return None
            if self.busy_poll > 0:
                self._poll(pending)
            if not pending.done():
                self._awaited = (deadline, request, limit)
                if self._watchdog is None or self._watchdog.when() > deadline:
                    self._arm(deadline)
            message = await pending
        except BackendError:
            raise
        except BaseException:
            self._discard(pending)
            self._teardown(BackendDisconnected(f"{self.name}: {request.name} abandoned mid-request"))
            raise
        finally:
            self._pending = None
            self._awaited = None
            if framer is not None:
                framer.expect_body = 0
        if sent_at:
            reply = message.header
            log.debug("%s: recv %s reply flags=%#x size=%d fds=%d latency=%.0fus", self.name, request.name,
                      reply.flags, reply.size, len(message.fds), (time.perf_counter() - sent_at) * 1e6)
        return message

    def _send(self, request: FrontendRequest, data: bytes, fds: Sequence[int]) -> int:
        """Write what the socket takes of *data* now (the bytes sent); a send error loses the session."""
        assert self._sock is not None
        try:
            return send_nowait(self._sock, data, fds)
        except OSError as exc:
            error = BackendDisconnected(f"{self.name}: {request.name}: send failed: {exc}")
            self._teardown(error)
            raise error from exc

    async def _send_rest(self, request: FrontendRequest, data: bytes, sent: int, fds: Sequence[int],
                         limit: float) -> None:
        """Finish a write the socket took only part of (its buffer is full: rare) within *limit*
        seconds; a timeout or send error loses the session (the stream is cut mid-message)."""
        try:
            async with asyncio.timeout(limit):
                await send_rest(self._sock, data, sent, fds)   # type: ignore[arg-type]
        except TimeoutError:
            error: BackendError = BackendTimeout(f"{self.name}: {request.name}: not sent within {limit:g} s")
            self._teardown(error)
            raise error from None
        except OSError as exc:
            error = BackendDisconnected(f"{self.name}: {request.name}: send failed: {exc}")
            self._teardown(error)
            raise error from exc
        except BaseException:
            self._teardown(BackendDisconnected(f"{self.name}: {request.name} abandoned mid-send"))
            raise

    def _arm(self, when: float) -> None:
        assert self._loop is not None
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_at(when, self._watch)

    def _watch(self) -> None:
        """The watchdog: a reply awaited past its deadline loses the session (the waiter gets
        the error); one awaited since, with a later deadline, re-arms it. One timer per session
        instead of one armed and cancelled per request (about 1.3 µs each)."""
        self._watchdog = None
        awaited = self._awaited
        if awaited is None or self._runstate is not Runstate.RUNNING:
            return
        deadline, request, limit = awaited
        assert self._loop is not None
        if self._loop.time() >= deadline:
            self._teardown(BackendTimeout(f"{self.name}: {request.name}: no reply within {limit:g} s"))
        else:
            self._arm(deadline)

    def _trace_send(self, request: FrontendRequest, flags: int, size: int, nfds: int) -> float:
        """Log an outgoing message (DEBUG); returns the send time for the reply's latency."""
        log.debug("%s: send %s flags=%#x size=%d fds=%d", self.name, request.name, flags, size, nfds)
        return time.perf_counter()

    def _track(self, request: FrontendRequest, payload: Payload | None, reply: Payload | None) -> None:
        """Record negotiation results from successful requests."""
        if request is FrontendRequest.GET_FEATURES and isinstance(reply, U64):
            self.features_offered = reply.value
            self._admitted.clear()
        elif request is FrontendRequest.GET_PROTOCOL_FEATURES and isinstance(reply, U64):
            self.protocol_features_offered = ProtocolFeature(reply.value)
        elif request is FrontendRequest.SET_PROTOCOL_FEATURES and isinstance(payload, U64):
            self.protocol_features = ProtocolFeature(payload.value)
            self._protocol_bits = payload.value
            self._admitted.clear()
            self._reply_ack = ProtocolFeature.REPLY_ACK in self.protocol_features
            log.info("%s: protocol features negotiated: %#x (%s)", self.name, payload.value,
                     "|".join(flag.name or "?" for flag in self.protocol_features) or "none")
        elif request is FrontendRequest.SET_FEATURES and isinstance(payload, U64):
            self.features_acked = payload.value

    @require(Runstate.RUNNING)
    async def open_backend_channel(self) -> None:
        """Create the back-end channel and hand its far end over with SET_BACKEND_REQ_FD."""
        assert self._loop is not None
        if self._channel is not None:
            raise DeviceStateError(f"{self.name}: the back-end channel is already open")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        channel = BackendChannel(ours, self._loop, self._handlers,
                                 lambda: (self.protocol_features, self.features_acked), self.name)
        channel.start()
        try:
            await self.request(FrontendRequest.SET_BACKEND_REQ_FD, None, [theirs.fileno()])
        except BaseException:
            await channel.aclose()
            raise
        finally:
            theirs.close()
        if self._runstate is Runstate.RUNNING:
            self._channel = channel
        else:
            await channel.aclose()
