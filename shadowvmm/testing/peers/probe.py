"""Probes of a vhost-user peer's socket: is anything listening, does it answer GET_FEATURES.

Only the header of ``VHOST_USER_GET_FEATURES`` is spoken here (vhost-user spec,
"Message format"): enough to tell a peer is ready without a front-end.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path
from typing import Final

from shadowvmm.errors import ArgumentError, PeerError

StrPath = str | os.PathLike[str]

_VHOST_USER_GET_FEATURES: Final = 1
_VHOST_USER_VERSION: Final = 0x1
_VHOST_USER_REPLY: Final = 0x4
_VHOST_USER_HDR: Final = struct.Struct("<III")
_SUN_PATH_MAX: Final = 107


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly *n* bytes (replies may arrive split header / payload)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def send_get_features(sock: socket.socket) -> None:
    sock.sendall(_VHOST_USER_HDR.pack(_VHOST_USER_GET_FEATURES, _VHOST_USER_VERSION, 0))


def recv_features(sock: socket.socket) -> int:
    request, flags, size = _VHOST_USER_HDR.unpack(recv_exact(sock, _VHOST_USER_HDR.size))
    if request != _VHOST_USER_GET_FEATURES or flags & _VHOST_USER_REPLY == 0 or size != 8:
        raise ConnectionError(f"bad GET_FEATURES reply: request={request} flags={flags:#x} size={size}")
    return int.from_bytes(recv_exact(sock, 8), "little")


def probe_features(socket_path: StrPath, timeout: float = 5.0) -> int:
    """Connect, send GET_FEATURES, return the feature bits and disconnect.

    Never use this on a one-shot peer (virtiofsd): the probe *is* its session.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(socket_path))
        send_get_features(sock)
        return recv_features(sock)


def connect_unix(path: Path, timeout: float) -> socket.socket | None:
    """Connect to *path*; ``None`` if nothing listens there (yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return None
        raise
    return sock


def answers_get_features(path: Path, timeout: float) -> bool:
    """Readiness: one full GET_FEATURES round trip on *path* (False if nothing listens yet).

    A bare connect-and-close probe is not enough: qsd serves one client at a
    time with a listen backlog of 1, so unconsumed probes can fill the
    backlog and make the caller's next connect() fail with EAGAIN.
    """
    if not path.exists():
        return False
    sock = connect_unix(path, timeout)
    if sock is None:
        return False
    with sock:
        send_get_features(sock)
        recv_features(sock)
    return True


def listening(path: Path, timeout: float) -> bool:
    """Readiness after a restart: something accepts connections on *path*.

    A front-end reconnecting on its own may take the one session the peer
    serves the moment it listens, so a GET_FEATURES probe would wait behind it;
    one bare connect (then close) proves the listener without holding a session.
    """
    if not path.exists():
        return False
    sock = connect_unix(path, timeout)
    if sock is None:
        return False
    sock.close()
    return True


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ArgumentError(f"unix socket path longer than {_SUN_PATH_MAX} bytes: {path}")


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse to steal a live one."""
    if not path.exists():
        return
    live = connect_unix(path, 1.0)
    if live is not None:
        live.close()
        raise PeerError(f"socket {path} is in use by another process")
    path.unlink(missing_ok=True)
