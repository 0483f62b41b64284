"""vhost-user framing over a non-blocking ``AF_UNIX`` socket, with fd passing.

asyncio streams cannot pass file descriptors, so messages are read with
``socket.recvmsg`` from a ``loop.add_reader`` callback and written with
``socket.sendmsg`` (``SCM_RIGHTS``). A message is read as exactly 12 header
bytes and then exactly ``size`` payload bytes, so fds are always attributed
to the message they came with ("Communication": fds ride with the first byte
of the header) and never to the next one. A front-end awaiting its one reply
reads the header and the body it expects in one receive (:attr:`Framer.expect_body`):
nothing else may follow that reply.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shadowvmm.errors import BackendDisconnected, BackendError, ProtocolError

from .protocol import MAX_FDS, Header

__all__ = ["Framer", "Message", "close_fds", "request_name", "send_message", "send_nowait", "send_rest", "wait_fd"]

_FD_ITEM = array.array("i").itemsize
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_ITEM)
# Plain ints: ``flags & socket.MSG_CTRUNC`` (an IntFlag) costs two enum calls per receive.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_HEADER_SIZE = Header.STRUCT.size


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd in *fds*, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def request_name(kind: type[enum.IntEnum], code: int) -> str:
    """*code*'s name in *kind*, or the number when it has none (message traces)."""
    try:
        return kind(code).name
    except ValueError:
        return str(code)


@dataclass(slots=True)
class Message:
    """One received message: header, payload bytes and the fds that came with it."""

    header: Header
    body: bytes
    fds: list[int] = field(default_factory=list)
    #: ``time.perf_counter()`` at receipt, set only while messages are traced (reply latency).
    received: float = 0.0

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds = []


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            items = array.array("i")
            items.frombytes(data[:len(data) - len(data) % _FD_ITEM])
            fds.extend(items)
    return fds


class Framer:
    """Assembles messages from a non-blocking socket; call :meth:`on_readable` when readable
    (a level-triggered reader: each call delivers at most one message).

    A consumer that cannot keep up sets :attr:`paused`: reading stops after the current
    message (the socket buffer, then the peer, absorb the rest).
    """

    def __init__(self, sock: socket.socket, on_message: Callable[[Message], None],
                 on_error: Callable[[BackendError], None]) -> None:
        #: Body bytes read together with the next header (one receive instead of two): set by a
        #: front-end awaiting a reply of known size. Only its own reply may be in the socket then,
        #: so bytes past that reply's end are an unsolicited message, refused as one.
        self.expect_body = 0
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
        sock = self._sock
        header_size = _HEADER_SIZE
        while not self._closed and not self.paused:
            header = self._header
            size = header_size + self.expect_body if header is None else header.size
            try:
                data, ancdata, flags, _ = sock.recvmsg(size - len(self._buf), _ANC_SPACE, _MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(BackendDisconnected(f"receive failed: {exc}"))
                return
            if ancdata:
                self._fds.extend(_fds_from(ancdata))
            if flags & _MSG_CTRUNC:
                self._fail(ProtocolError(f"peer sent more than {MAX_FDS} fds"))
                return
            if not data:
                self._fail(BackendDisconnected("peer closed the connection"))
                return
            if self._buf:
                self._buf += data
                data = bytes(self._buf)
            if header is None:
                if len(data) < header_size:
                    if not self._buf:
                        self._buf += data
                    continue
                try:
                    header = Header.unpack(data[:header_size])
                except ProtocolError as exc:
                    self._fail(exc)
                    return
                data = data[header_size:]
                if len(data) > header.size:
                    self._fail(ProtocolError(f"{len(data) - header.size} bytes of another message came "
                                             "right after a reply: an unsolicited message"))
                    return
                self._buf.clear()
                if len(data) < header.size:
                    self._header = header
                    self._buf += data
                    continue
            elif len(data) < size:
                if not self._buf:
                    self._buf += data
                continue
            self._buf.clear()
            message = Message(header, data, self._fds)
            self._header, self._fds = None, []
            self._on_message(message)
            # One message per call: the reader is level-triggered, so a next message already
            # queued brings the next call, and a lone reply costs no extra EAGAIN receive.
            return


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


def send_nowait(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
    """Send what the socket takes of *data* now, *fds* with its first byte; the bytes sent
    (0: nothing, fds not sent either). OSError on a broken socket."""
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        return sock.sendmsg([data], ancdata, socket.MSG_NOSIGNAL)
    except BlockingIOError:
        return 0


async def send_rest(sock: socket.socket, data: bytes, sent: int, fds: Sequence[int]) -> None:
    """Finish sending *data* of which *sent* bytes went out (with *fds*, when *sent* > 0)."""
    view = memoryview(data)
    while not sent:
        await wait_fd(sock.fileno(), writable=True)
        sent = send_nowait(sock, data, fds)
    view = view[sent:]
    while view:
        try:
            view = view[sock.send(view, socket.MSG_NOSIGNAL):]
        except BlockingIOError:
            await wait_fd(sock.fileno(), writable=True)


async def send_message(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send *data*; *fds* go with its first byte. OSError on a broken socket."""
    sent = send_nowait(sock, data, fds)
    if sent < len(data):
        await send_rest(sock, data, sent, fds)
