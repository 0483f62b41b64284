"""Who is at the other end of a vhost-user socket.

Two answers, for two questions:

- :func:`listener_pid` (``SO_PEERCRED``) names whoever called ``listen()``: cheap, taken at
  connect time, and enough to ask later whether that process can still write guest memory
  (:func:`process_has_memory`).
- :func:`socket_peer_pid` names the process that holds the peer socket now, which differs when
  a launcher bound the socket and passed it on (``--fd``): the peer socket's inode is looked up
  with ``sock_diag`` (``NETLINK_SOCK_DIAG``, ``UNIX_DIAG_PEER``) and searched for in
  ``/proc/*/fd``. It walks ``/proc``: call it off the event loop.
"""

from __future__ import annotations

import os
import socket
import struct

from shadowvmm.backends.base import PeerIdentity

__all__ = ["identify", "listener_pid", "process_has_memory", "socket_peer_pid"]

_PEERCRED = struct.Struct("3i")     #: struct ucred: pid, uid, gid


def listener_pid(sock: socket.socket) -> int | None:
    """The pid ``SO_PEERCRED`` reports for a unix socket's peer (not our own pid), if any."""
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


def _peer_inode(sock: socket.socket) -> int | None:
    """The inode of the socket connected to *sock*, from ``sock_diag``."""
    from pyroute2 import DiagSocket

    ours = os.fstat(sock.fileno()).st_ino
    with DiagSocket() as diag:
        diag.bind()
        for entry in diag.get_sock_stats(family=socket.AF_UNIX):
            if entry["udiag_ino"] == ours:
                peer = dict(entry["attrs"]).get("UNIX_DIAG_PEER")
                return int(peer) if peer else None
    return None


def _holder_of(target: str) -> int | None:
    """The first process with an fd whose link reads *target*."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return int(pid)
            except OSError:
                continue
    return None


def socket_peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process holding the other end of the unix stream socket *sock*."""
    if sock.family != socket.AF_UNIX:
        return None
    peer = _peer_inode(sock)
    return None if not peer else _holder_of(f"socket:[{peer}]")


def process_name(pid: int) -> str | None:
    """``/proc/PID/comm`` (None if the process is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return None


def identify(sock: socket.socket, what: str) -> PeerIdentity | None:
    """:class:`PeerIdentity` of the process serving *sock* (see :func:`socket_peer_pid`);
    *what* names the endpoint in the description."""
    pid = socket_peer_pid(sock)
    if pid is None:
        return None
    try:
        uid: int | None = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/comm") as comm:
            name = comm.read().strip()
    except OSError:
        uid, name = None, "?"
    return PeerIdentity(pid, uid, f"{name} (pid {pid}) serving {what}")
