"""Reaching a vhost-user back-end's unix socket: the connector, and waiting for a restarted
back-end's socket to show up again (inotify)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import struct
from collections.abc import Awaitable, Callable

__all__ = ["Connector", "unix_connector", "wait_for_path"]

#: Returns a connected, non-blocking stream socket to the back-end.
Connector = Callable[[], Awaitable[socket.socket]]


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
