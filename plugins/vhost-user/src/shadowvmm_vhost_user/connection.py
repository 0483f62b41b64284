"""vhost-user connection: framing, fds, one request in flight, the back-end channel.

asyncio streams cannot pass file descriptors, so a :class:`Connection` drives
a non-blocking ``AF_UNIX`` socket with ``loop.add_reader`` and
``socket.sendmsg``/``recvmsg`` (``SCM_RIGHTS``). A message is read as exactly
12 header bytes and then exactly ``size`` payload bytes, so fds are always
attributed to the message they came with ("Communication": fds ride with the
first byte of the header) and never to the next one.

Every reply is checked against :data:`~.protocol.FRONTEND_SPECS`. A reply
that is wrong, late or missing leaves the byte stream in an unknown position,
so the connection then goes :attr:`Runstate.DISCONNECTED` and closes its
socket; stray fds are closed at once. A non-zero REPLY_ACK answer keeps the
stream in step and raises :class:`RequestFailed`.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import enum
import functools
import inspect
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
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

from .protocol import (
    BACKEND_SPECS,
    FRONTEND_SPECS,
    MAX_FDS,
    U64,
    VERSION,
    BackendRequest,
    FrontendRequest,
    Header,
    HeaderFlags,
    MessageSpec,
    Payload,
    ProtocolFeature,
    decode_payload,
    decode_reply,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
#: u64 answered to a back-end request that is refused (unknown, not negotiated, malformed, failed).
BACKEND_ERROR = 1
#: Back-end requests queued for handling before the channel stops reading (see BackendChannel).
MAX_PENDING = 64

_FD_ITEM = array.array("i").itemsize
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_ITEM)

Connector = Callable[[], Awaitable[socket.socket]]


class Runstate(enum.Enum):
    """Connection life cycle (like ``qemu.qmp``'s ``Runstate``)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTING = "disconnecting"
    DISCONNECTED = "disconnected"


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd in *fds*, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def unix_connector(path: str | os.PathLike[str]) -> Connector:
    """A connector opening a non-blocking stream socket to the unix socket *path*."""
    address = os.fspath(path)

    async def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


_IN_CLOEXEC = os.O_CLOEXEC
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_INOTIFY_EVENT = struct.Struct("iIII")    #: struct inotify_event: wd, mask, cookie, len (then name)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return libc


async def wait_for_path(path: str | os.PathLike[str], timeout: float) -> bool:
    """Wait until a file named *path* is created (or moved) in its directory, at most *timeout*
    seconds; True if it was. A unix socket appears when its server binds it, so a front-end can
    connect the moment a restarted back-end is back instead of at its next polling interval."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    libc = _libc()
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        await asyncio.sleep(timeout)
        return False
    loop = asyncio.get_running_loop()
    created: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        offset = 0
        while offset + _INOTIFY_EVENT.size <= len(data):
            _, _, _, length = _INOTIFY_EVENT.unpack_from(data, offset)
            start = offset + _INOTIFY_EVENT.size
            if data[start:start + length].split(b"\0", 1)[0] == os.fsencode(name) and not created.done():
                created.set_result(None)
            offset = start + length

    try:
        if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO) < 0:
            await asyncio.sleep(timeout)
            return False
        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(asyncio.shield(created), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Message:
    """One received message: header, payload bytes and the fds that came with it."""

    header: Header
    body: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds = []


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply; the caller owns (and must close) ``fds``."""

    request: FrontendRequest
    payload: Payload | None
    fds: tuple[int, ...] = ()


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            items = array.array("i")
            items.frombytes(data[:len(data) - len(data) % _FD_ITEM])
            fds.extend(items)
    return fds


_PEERCRED = struct.Struct("3i")     #: struct ucred: pid, uid, gid


def _peer_pid(sock: socket.socket) -> int | None:
    if sock.family != socket.AF_UNIX:
        return None
    try:
        pid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
    except OSError:
        return None
    return pid if pid > 0 and pid != os.getpid() else None


def process_has_memory(pid: int) -> bool | None:
    """Whether process *pid* still has an address space: False once it is exiting (its memory
    released before its fds closed), a zombie, or gone; None if that cannot be told."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return bool(maps.read(1))
    except FileNotFoundError:
        return False
    except OSError:
        return None


class _Framer:
    """Assembles messages from a non-blocking socket; call :meth:`on_readable` when readable.

    A consumer that cannot keep up sets :attr:`paused`: reading stops after the current
    message (the socket buffer, then the peer, absorb the rest).
    """

    def __init__(self, sock: socket.socket, on_message: Callable[[Message], None],
                 on_error: Callable[[BackendError], None]) -> None:
        self._sock = sock
        self._on_message = on_message
        self._on_error = on_error
        self._header: Header | None = None
        self._buf = bytearray()
        self._fds: list[int] = []
        self._closed = False
        self.paused = False

    def close(self) -> None:
        self._closed = True
        close_fds(self._fds)
        self._fds = []

    def _fail(self, exc: BackendError) -> None:
        self.close()
        self._on_error(exc)

    def on_readable(self) -> None:
        while not self._closed and not self.paused:
            size = Header.STRUCT.size if self._header is None else self._header.size
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(size - len(self._buf), _ANC_SPACE,
                                                             socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(BackendDisconnected(f"receive failed: {exc}"))
                return
            self._fds.extend(_fds_from(ancdata))
            if flags & socket.MSG_CTRUNC:
                self._fail(ProtocolError(f"peer sent more than {MAX_FDS} fds"))
                return
            if not data:
                self._fail(BackendDisconnected("peer closed the connection"))
                return
            self._buf += data
            if self._header is None:
                if len(self._buf) < Header.STRUCT.size:
                    continue
                try:
                    self._header = Header.unpack(self._buf)
                except ProtocolError as exc:
                    self._fail(exc)
                    return
                self._buf = bytearray()
            if len(self._buf) < self._header.size:
                continue
            message = Message(self._header, bytes(self._buf), self._fds)
            self._header, self._buf, self._fds = None, bytearray(), []
            self._on_message(message)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def wait_fd(fd: int, *, writable: bool = False) -> None:
    """Wait until *fd* is readable (or writable) on the running loop."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    if writable:
        loop.add_writer(fd, _wake, waiter)
    else:
        loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _send(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send *data*; *fds* go with its first byte. OSError on a broken socket."""
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    view = memoryview(data)
    while True:
        try:
            sent = sock.sendmsg([view], ancdata, socket.MSG_NOSIGNAL)
            break
        except BlockingIOError:
            await wait_fd(sock.fileno(), writable=True)
    view = view[sent:]
    while view:
        try:
            view = view[sock.send(view, socket.MSG_NOSIGNAL):]
        except BlockingIOError:
            await wait_fd(sock.fileno(), writable=True)


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
        self._framer = _Framer(sock, self._enqueue, self._on_error)
        self._worker: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self._loop.add_reader(self._sock.fileno(), self._framer.on_readable)
        self._worker = self._loop.create_task(self._work(), name=f"{self._name}-backend-channel")

    def _enqueue(self, message: Message) -> None:
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
            await self._reply(message.header.request, reply, out_fds)
        elif message.header.need_reply:
            await self._reply(message.header.request, U64(status), ())

    async def _reply(self, code: int, payload: Payload, fds: Sequence[int]) -> None:
        body = payload.pack()
        data = Header(code, VERSION | HeaderFlags.REPLY, len(body)).pack() + body
        try:
            await _send(self._sock, data, fds)
        except OSError as exc:
            self._on_error(BackendDisconnected(f"reply failed: {exc}"))


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
        self._framer: _Framer | None = None
        self._lock: asyncio.Lock | None = None
        self._pending: asyncio.Future[Message] | None = None
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
        self.peer_pid = _peer_pid(sock)
        self._framer = _Framer(sock, self._on_message, self._teardown)
        self._lock = asyncio.Lock()
        loop.add_reader(sock.fileno(), self._framer.on_readable)
        self._runstate = Runstate.RUNNING

    async def disconnect(self) -> None:
        """Close the session (idempotent): -> DISCONNECTING -> DISCONNECTED."""
        if self._runstate in (Runstate.IDLE, Runstate.DISCONNECTED):
            return
        self._runstate = Runstate.DISCONNECTING
        channel = self._channel
        self._teardown(BackendDisconnected(f"{self.name}: disconnected by the front-end"))
        self._error = None
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

    def _check_request(self, request: FrontendRequest, spec: MessageSpec, payload: Payload | None,
                       fds: Sequence[int]) -> None:
        if spec.request is None:
            if payload is not None:
                raise ArgumentTypeError(f"{request.name} takes no payload")
        elif not isinstance(payload, spec.request):
            raise ArgumentTypeError(f"{request.name} takes a {spec.request.__name__} payload, not {payload!r}")
        if payload is not None:
            payload.validate()
        if len(fds) != spec.request_fds(payload):
            raise ArgumentError(f"{request.name} carries {spec.request_fds(payload)} fds, not {len(fds)}")
        if missing := int(spec.gate) & ~int(self.protocol_features):
            raise UnsupportedError(f"{self.name}: {request.name} needs protocol feature {ProtocolFeature(missing)!r}, "
                                   "which was not negotiated")
        if missing_bits := spec.virtio_gate & ~self.features_offered:
            raise UnsupportedError(f"{self.name}: {request.name} needs feature bits {missing_bits:#x}, "
                                   "which the back-end does not offer")

    @staticmethod
    def _discard(pending: asyncio.Future[Message] | None) -> None:
        """Close the fds of a reply that arrived but will not be used."""
        if pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None:
            pending.result().close_fds()

    async def request(self, request: FrontendRequest, payload: Payload | None = None, fds: Sequence[int] = (),
                      *, timeout: float | None = None) -> Reply:
        """Send *request* and return its checked reply.

        *fds* stay owned by the caller. With REPLY_ACK negotiated every request
        without a reply body goes out with NEED_REPLY and its ack is checked
        (non-zero: :class:`RequestFailed`, connection kept). Returns a
        :class:`Reply` whose payload is ``None`` for requests without a body.
        """
        self._require((Runstate.RUNNING,), request.name)
        spec = FRONTEND_SPECS.get(request)
        if spec is None:
            raise UnsupportedError(f"{self.name}: {request.name} has no specified wire format")
        self._check_request(request, spec, payload, fds)
        acked = spec.reply is None and ProtocolFeature.REPLY_ACK in self.protocol_features
        body = payload.pack() if payload is not None else b""
        flags = VERSION | (HeaderFlags.NEED_REPLY if acked else 0)
        data = Header(request, flags, len(body)).pack() + body
        limit = self.timeout if timeout is None else timeout
        assert self._lock is not None and self._loop is not None
        async with self._lock:
            self._require((Runstate.RUNNING,), request.name)
            assert self._sock is not None
            pending = self._loop.create_future() if spec.reply is not None or acked else None
            self._pending = pending
            try:
                async with asyncio.timeout(limit):
                    await _send(self._sock, data, fds)
                    if pending is not None and self.busy_poll > 0:
                        self._poll(pending)
                    message = await pending if pending is not None else None
            except TimeoutError:
                self._discard(pending)
                timeout_error = BackendTimeout(f"{self.name}: {request.name}: no reply within {limit:g} s")
                self._teardown(timeout_error)
                raise timeout_error from None
            except BackendError:
                raise
            except OSError as exc:
                error = BackendDisconnected(f"{self.name}: {request.name}: send failed: {exc}")
                self._teardown(error)
                raise error from exc
            except BaseException:
                self._discard(pending)
                self._teardown(BackendDisconnected(f"{self.name}: {request.name} abandoned mid-request"))
                raise
            finally:
                self._pending = None
            if message is None:
                self._track(request, payload, None)
                return Reply(request, None)
            try:
                reply = decode_reply(request, spec, payload, message.header, message.body, len(message.fds), acked)
            except ProtocolError as exc:
                message.close_fds()
                self._teardown(exc)
                raise
        if acked:
            assert isinstance(reply, U64)
            if reply.value:
                raise RequestFailed(request, reply.value)
            self._track(request, payload, None)
            return Reply(request, None)
        self._track(request, payload, reply)
        return Reply(request, reply, tuple(message.fds))

    def _track(self, request: FrontendRequest, payload: Payload | None, reply: Payload | None) -> None:
        """Record negotiation results from successful requests."""
        if request is FrontendRequest.GET_FEATURES and isinstance(reply, U64):
            self.features_offered = reply.value
        elif request is FrontendRequest.GET_PROTOCOL_FEATURES and isinstance(reply, U64):
            self.protocol_features_offered = ProtocolFeature(reply.value)
        elif request is FrontendRequest.SET_PROTOCOL_FEATURES and isinstance(payload, U64):
            self.protocol_features = ProtocolFeature(payload.value)
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
