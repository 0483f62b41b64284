"""A scripted vhost-user back-end for tests (the plugin's and the core's).

:class:`FakeBackend` serves each session on its own thread over one end of a
socketpair (blocking sockets, independent of the code under test). By
default it answers like libvhost-user; ``script`` maps a request code to an
action that replaces the default answer once per matching request:
:class:`Send` (arbitrary reply bytes, flags and fds), :data:`SILENT` (no
reply), :data:`CLOSE` (drop the connection) or a callable returning one of
those (or ``None`` for the default). Every received message is recorded in
``received`` and every fd the fake received is closed by the fake.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HDR = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
CONFIG = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHH4x")
REPLY = 0x5
NEED_REPLY = 0x8

QSD_FEATURES = 0x175007E46
QSD_PROTOCOL_FEATURES = 0x8F2B


@dataclass
class Received:
    """One message the fake received (its fds are already closed)."""

    request: int
    flags: int
    payload: bytes
    nfds: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)


@dataclass
class Send:
    """Reply with exactly these header fields, payload and fds (``size`` defaults to ``len(payload)``).

    ``close_after``: the fake closes ``fds`` once sent; ``hangup``: it then drops the session.
    """

    request: int
    payload: bytes = b""
    flags: int = REPLY
    fds: Sequence[int] = ()
    size: int | None = None
    close_after: bool = False
    hangup: bool = False


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SILENT = _Marker("SILENT")
CLOSE = _Marker("CLOSE")
Action = Send | _Marker | Callable[[Received], "Send | _Marker | None"]


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        data, anc, _, _ = sock.recvmsg(size - len(buf), socket.CMSG_SPACE(64 * 4))
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                items = array.array("i")
                items.frombytes(blob[:len(blob) - len(blob) % items.itemsize])
                fds.extend(items)
        if not data:
            return None
        buf += data
    return bytes(buf)


def _send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


@dataclass
class FakeBackend:
    """A well-behaved vhost-user back-end with scripted misbehaviour."""

    features: int = QSD_FEATURES
    protocol_features: int = QSD_PROTOCOL_FEATURES
    queue_num: int = 2
    max_mem_slots: int = 32
    config: bytearray = field(default_factory=lambda: bytearray(60))
    state: bytes = b""
    script: dict[int, list[Action]] = field(default_factory=dict)
    acks: dict[int, int] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    vring_base: dict[int, int] = field(default_factory=dict)
    loaded: bytes | None = None
    status: int = 0
    acked_protocol_features: int = 0
    backend_channel: socket.socket | None = None

    def __post_init__(self) -> None:
        self._state_fd = -1
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.done = threading.Event()

    def on(self, request: int, *actions: Action) -> FakeBackend:
        """Queue *actions* for the next requests with code *request* (one action per request)."""
        self.script.setdefault(int(request), []).extend(actions)
        return self

    async def connector(self) -> socket.socket:
        """Connector for :class:`Connection`: a new socketpair served by a new thread."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        with self._lock:
            self._socks.append(theirs)
            thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
            self._threads.append(thread)
        thread.start()
        return ours

    def stop(self) -> None:
        """Close every session and the back-end channel, join the threads."""
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        for sock in socks:
            sock.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None

    def requests(self) -> list[int]:
        return [m.request for m in self.received]

    def backend_request(self, request: int, payload: bytes = b"", *, need_reply: bool = True,
                        fds: Sequence[int] = (), timeout: float = 2.0) -> tuple[int, int, bytes, int] | None:
        """Send a back-end request on the back-end channel; return the reply (request, flags, payload, nfds)."""
        sock = self.backend_channel
        assert sock is not None, "no SET_BACKEND_REQ_FD received"
        sock.settimeout(timeout)
        _send(sock, HDR.pack(request, 0x1 | (NEED_REPLY if need_reply else 0), len(payload)) + payload, fds)
        if not need_reply:
            return None
        fds_in: list[int] = []
        header = _recv_exact(sock, HDR.size, fds_in)
        assert header is not None
        code, flags, size = HDR.unpack(header)
        body = _recv_exact(sock, size, fds_in) if size else b""
        for fd in fds_in:
            os.close(fd)
        return code, flags, body or b"", len(fds_in)

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                fds: list[int] = []
                header = _recv_exact(sock, HDR.size, fds)
                if header is None:
                    break
                request, flags, size = HDR.unpack(header)
                payload = _recv_exact(sock, size, fds) if size else b""
                if payload is None:
                    break
                message = Received(request, flags, payload, len(fds))
                self.received.append(message)
                try:
                    action = self._action(message)
                    if action is CLOSE:
                        break
                    if action is SILENT:
                        continue
                    if action is None:
                        action = self._default(message, fds)
                    if action is None:
                        continue
                    assert isinstance(action, Send)
                    size = len(action.payload) if action.size is None else action.size
                    _send(sock, HDR.pack(action.request, action.flags, size) + action.payload, action.fds)
                    if action.close_after:
                        for fd in action.fds:
                            os.close(fd)
                    if action.hangup:
                        break
                    self._after(message, sock)
                finally:
                    for fd in fds:
                        os.close(fd)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            self.done.set()

    def _action(self, message: Received) -> Send | _Marker | None:
        queued = self.script.get(message.request)
        if not queued:
            return None
        action = queued.pop(0)
        if callable(action) and not isinstance(action, (Send, _Marker)):
            return action(message)
        return action

    def _default(self, message: Received, fds: list[int]) -> Send | None:
        code, payload = message.request, message.payload

        def u64(value: int) -> Send:
            return Send(code, U64.pack(value))

        if code == 1:
            return u64(self.features)
        if code == 15:
            return u64(self.protocol_features)
        if code == 16:
            self.acked_protocol_features = U64.unpack(payload)[0]
        elif code == 17:
            return u64(self.queue_num)
        elif code == 36:
            return u64(self.max_mem_slots)
        elif code == 10:
            index, num = STATE.unpack(payload)
            self.vring_base[index] = num
        elif code == 11:
            index, _ = STATE.unpack(payload)
            return Send(code, STATE.pack(index, self.vring_base.get(index, 0)))
        elif code == 21:
            self.backend_channel = socket.socket(fileno=fds.pop(0))
        elif code == 24:
            offset, size, flags = CONFIG.unpack_from(payload)
            if offset + size > len(self.config):
                return Send(code, b"")
            return Send(code, CONFIG.pack(offset, size, flags) + bytes(self.config[offset:offset + size]))
        elif code == 25:
            offset, size, _ = CONFIG.unpack_from(payload)
            self.config[offset:offset + size] = payload[CONFIG.size:]
        elif code == 39:
            self.status = U64.unpack(payload)[0]
        elif code == 40:
            return u64(self.status)
        elif code == 6:
            return u64(struct.unpack_from("<Q", payload)[0])
        elif code == 31:
            _, _, num_queues, queue_size = INFLIGHT.unpack(payload)
            size = num_queues * ((16 * queue_size + 16 + 63) // 64 * 64)
            memfd = os.memfd_create("fake-inflight", os.MFD_CLOEXEC)
            os.ftruncate(memfd, size)
            return Send(code, INFLIGHT.pack(size, 0, num_queues, queue_size), fds=[memfd], close_after=True)
        elif code == 42:
            self._state_fd = fds.pop(0)
            return u64(0x100)
        elif code == 43:
            return u64(0)
        if message.need_reply:
            return u64(self.acks.get(code, 0))
        return None

    def _after(self, message: Received, sock: socket.socket) -> None:
        """Work done after replying (the device-state stream)."""
        if message.request != 42 or self._state_fd < 0:
            return
        direction, _ = STATE.unpack(message.payload)
        fd = self._state_fd
        self._state_fd = -1
        with os.fdopen(fd, "wb" if direction == 0 else "rb") as stream:
            if direction == 0:
                stream.write(self.state)
            else:
                self.loaded = stream.read()
