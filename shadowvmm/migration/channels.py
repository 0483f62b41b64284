"""Byte pipes a migration stream runs over: sockets (duplex) and files (one-way).

Endpoints are written ``tcp:HOST:PORT``, ``unix:PATH`` or ``file:PATH``
(:class:`Endpoint`). Sockets are duplex (the destination answers READY and
RESULT); a file is one-way.

A ``unix:`` listener replaces only a stale socket at its path (anything
else is refused, never unlinked), creates the socket with mode 0600 (and
missing directories with 0700), and accepts only a peer whose SO_PEERCRED
uid is its own or the one the caller allows; the connecting side checks
the listener's uid the same way (unix(7) SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

from ..errors import ArgumentError, StreamError

log = logging.getLogger(__name__)

class Channel(Protocol):
    """A byte pipe the stream runs over."""

    duplex: bool

    async def send(self, data: bytes) -> None: ...

    async def recv_exactly(self, size: int) -> bytes:
        """*size* bytes; raises :class:`StreamError` if the peer ends first."""

    async def close(self) -> None: ...

    async def abort(self) -> None:
        """Close without waiting for the peer to take what is unsent (a failed migration)."""


class SocketChannel:
    """A connected stream socket (TCP or unix), through asyncio streams."""

    duplex = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise StreamError(f"migration stream broken while sending: {exc}") from exc

    async def recv_exactly(self, size: int) -> bytes:
        try:
            return await self.reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise StreamError(f"migration stream truncated: {len(exc.partial)} of {size} bytes") from None
        except (ConnectionError, OSError) as exc:
            raise StreamError(f"migration stream broken while receiving: {exc}") from exc

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def abort(self) -> None:
        """Close at once, dropping what the peer has not taken (a peer that stopped reading
        would otherwise hold the socket open until it reads)."""
        self.writer.transport.abort()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class FileChannel:
    """A file: written by the source, read by the destination (one-way)."""

    duplex = False

    def __init__(self, path: str, mode: str) -> None:
        if mode not in ("rb", "wb"):
            raise ArgumentError(f"file channel mode {mode!r}")
        self.path = path
        self._file = open(path, mode)

    async def send(self, data: bytes) -> None:
        if self._file.closed:
            raise StreamError(f"{self.path}: the migration stream file is closed")
        try:
            self._file.write(data)
        except OSError as exc:
            raise StreamError(f"{self.path}: write failed: {exc}") from exc

    async def recv_exactly(self, size: int) -> bytes:
        if self._file.closed:
            raise StreamError(f"{self.path}: the migration stream file is closed")
        data = self._file.read(size)
        if len(data) != size:
            raise StreamError(f"{self.path}: migration stream truncated: {len(data)} of {size} bytes")
        return data

    async def abort(self) -> None:
        await self.close()

    async def close(self) -> None:
        if not self._file.closed:
            if self._file.writable():
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()


@dataclass(frozen=True)
class Endpoint:
    """``tcp:HOST:PORT``, ``unix:PATH`` or ``file:PATH``."""

    kind: str
    address: str
    port: int = 0

    KINDS: ClassVar = ("tcp", "unix", "file")

    @classmethod
    def parse(cls, text: str) -> Self:
        kind, sep, rest = text.partition(":")
        if not sep or kind not in cls.KINDS or not rest:
            raise StreamError(f"bad migration endpoint {text!r}: use tcp:HOST:PORT, unix:PATH or file:PATH")
        if kind == "tcp":
            host, sep, port = rest.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise StreamError(f"bad TCP endpoint {text!r}: use tcp:HOST:PORT")
            return cls(kind, host.strip("[]"), int(port))
        return cls(kind, rest)

    def __str__(self) -> str:
        return f"tcp:{self.address}:{self.port}" if self.kind == "tcp" else f"{self.kind}:{self.address}"

    async def connect(self, timeout: float = 10.0, *, peer_uid: int | None = None) -> Channel:
        """The source side: connect (sockets) or create the file.

        ``unix:``: the listener's uid must be *peer_uid* (default: ours), or the
        connection is closed and refused.
        """
        if self.kind == "file":
            return FileChannel(self.address, "wb")
        last: BaseException | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        if self.kind == "tcp":
                            reader, writer = await asyncio.open_connection(self.address, self.port)
                            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        else:
                            reader, writer = await asyncio.open_unix_connection(self.address)
                        break
                    except (ConnectionRefusedError, FileNotFoundError) as exc:
                        last = exc
                        await asyncio.sleep(0.05)
        except OSError as exc:
            raise StreamError(f"cannot connect to {self}: {exc}") from exc
        except TimeoutError:
            raise StreamError(f"cannot connect to {self} within {timeout} s: {last}") from last
        channel = SocketChannel(reader, writer)
        if self.kind == "unix":
            refusal = PeerCredentials.of(writer.get_extra_info("socket")).refusal(_expected_uid(peer_uid))
            if refusal is not None:
                await channel.close()
                raise StreamError(f"{self}: the listening process is {refusal}; not sending the migration to it")
        return channel

    async def listen(self, *, peer_uid: int | None = None) -> Listener:
        """The destination side: listen (sockets) or open the file.

        ``unix:``: only a peer of uid *peer_uid* (default: ours) is accepted.
        """
        listener = Listener(self, peer_uid=peer_uid)
        await listener.start()
        return listener


def _expected_uid(peer_uid: int | None) -> int:
    return os.geteuid() if peer_uid is None else peer_uid


@dataclass(frozen=True)
class PeerCredentials:
    """The other end of a unix socket (SO_PEERCRED: ``struct ucred`` pid, uid, gid)."""

    STRUCT: ClassVar = struct.Struct("iII")

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> Self:
        return cls(*cls.STRUCT.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, cls.STRUCT.size)))

    def refusal(self, uid: int) -> str | None:
        """Why this peer is refused when only *uid* may connect (None: it may)."""
        if self.uid == uid:
            return None
        return f"pid {self.pid} uid {self.uid}, and only uid {uid} is allowed"


class Listener:
    """Accepts exactly one migration connection (or opens the stream file).

    A ``unix:`` listener only accepts peers of uid *peer_uid* (default: the
    process's effective uid); other peers are closed at once and named in
    :meth:`accept`'s timeout error.
    """

    #: Socket and directory modes of a ``unix:`` listener.
    SOCKET_MODE = 0o600
    DIRECTORY_MODE = 0o700

    def __init__(self, endpoint: Endpoint, *, peer_uid: int | None = None) -> None:
        self.endpoint = endpoint
        self.peer_uid = _expected_uid(peer_uid)
        #: Peers refused for their credentials (unix), most recent last.
        self.refused: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._accepted: asyncio.Queue[SocketChannel] = asyncio.Queue(maxsize=1)
        self._taken = False
        self._socket_id: tuple[int, int] | None = None
        self._created_dirs: list[str] = []

    async def start(self) -> None:
        ep = self.endpoint
        try:
            if ep.kind == "tcp":
                self._server = await asyncio.start_server(self._on_client, ep.address, ep.port,
                                                          reuse_address=True)
            elif ep.kind == "unix":
                sock = self._bind_unix(ep.address)
                try:
                    self._server = await asyncio.start_unix_server(self._on_client, sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except OSError as exc:
            self._remove_unix()
            raise StreamError(f"cannot listen on {ep}: {exc}") from exc

    def _bind_unix(self, path: str) -> socket.socket:
        """A listening socket at *path*, mode 0600; only a socket already there is replaced."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISSOCK(st.st_mode):
            raise StreamError(f"cannot listen on unix:{path}: it exists and is not a socket "
                              f"({_file_kind(st.st_mode)}); refusing to replace it")
        if st is not None:
            os.unlink(path)
        else:
            self._make_parents(os.path.dirname(os.path.abspath(path)))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), self.SOCKET_MODE)   # the bound inode takes the socket's mode
            sock.bind(path)
            os.chmod(path, self.SOCKET_MODE)            # in case the umask took bits: before listen()
            bound = os.lstat(path)
            self._socket_id = (bound.st_dev, bound.st_ino)
            sock.listen()
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _make_parents(self, directory: str) -> None:
        missing = []
        while directory and not os.path.isdir(directory):
            missing.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
        for path in reversed(missing):
            os.mkdir(path, self.DIRECTORY_MODE)
            os.chmod(path, self.DIRECTORY_MODE)
            self._created_dirs.append(path)

    def _remove_unix(self) -> None:
        """Unlink our socket (only if the path still is it) and the directories we created."""
        if self._socket_id is not None:
            try:
                st = os.lstat(self.endpoint.address)
                if (st.st_dev, st.st_ino) == self._socket_id:
                    os.unlink(self.endpoint.address)
            except FileNotFoundError:
                pass
            self._socket_id = None
        for path in reversed(self._created_dirs):
            try:
                os.rmdir(path)
            except OSError:
                break
        self._created_dirs = []

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channel = SocketChannel(reader, writer)
        if sock is not None and sock.family == socket.AF_UNIX:
            refusal = PeerCredentials.of(sock).refusal(self.peer_uid)
            if refusal is not None:
                self.refused.append(refusal)
                log.warning("%s: refused a connection from %s", self.endpoint, refusal)
                await channel.close()
                return
        if self._taken or self._accepted.full():
            log.warning("%s: refused a second migration connection", self.endpoint)
            await channel.close()
            return
        self._accepted.put_nowait(channel)

    async def accept(self, timeout: float | None = None) -> Channel:
        if self.endpoint.kind == "file":
            try:
                return FileChannel(self.endpoint.address, "rb")
            except OSError as exc:
                raise StreamError(f"cannot open {self.endpoint}: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                channel = await self._accepted.get()
        except TimeoutError:
            refused = f" (refused: {'; '.join(self.refused)})" if self.refused else ""
            raise StreamError(f"no migration connection on {self.endpoint} within {timeout} s{refused}") from None
        self._taken = True
        return channel

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        while not self._accepted.empty():
            await self._accepted.get_nowait().close()
        if self.endpoint.kind == "unix":
            self._remove_unix()


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO")):
        if test(mode):
            return name
    return f"file type {stat.S_IFMT(mode):#o}"
