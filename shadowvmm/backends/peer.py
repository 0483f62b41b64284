"""The process listening on a unix socket, found without connecting to it.

Connecting would use up a one-shot back-end's only session (virtiofsd), so tools that want to
know who serves a socket before the first session read ``/proc``: the socket's inode from
``/proc/net/unix`` (a listening socket has ``__SO_ACCEPTCON`` in its flags), then the process
holding that inode among its ``/proc/PID/fd`` links.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ListeningPeer", "socket_listener"]

#: ``__SO_ACCEPTCON`` in the Flags column of ``/proc/net/unix``: a listening socket.
ACCEPTCON = 0x10000


@dataclass(frozen=True)
class ListeningPeer:
    """A process holding the listening socket."""

    pid: int
    comm: str   #: ``/proc/PID/comm`` (the kernel truncates it to 15 characters)
    name: str   #: the base name of ``argv[0]`` (``qemu-storage-daemon``, in full)


def _listening_inodes(path: str | os.PathLike[str], proc: Path) -> set[str]:
    wanted = {os.path.abspath(path), os.path.realpath(path)}
    try:
        lines = (proc / "net" / "unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    inodes = set()
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode Path
        fields = line.split()
        try:
            if len(fields) >= 8 and fields[7] in wanted and int(fields[3], 16) & ACCEPTCON:
                inodes.add(f"socket:[{fields[6]}]")
        except ValueError:
            continue
    return inodes


def socket_listener(path: str | os.PathLike[str], proc: Path = Path("/proc")) -> ListeningPeer | None:
    """The process listening on unix socket *path*; None when it cannot be told (not
    listening, another user's process, no ``/proc``)."""
    inodes = _listening_inodes(path, proc)
    if not inodes:
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
                comm = (entry / "comm").read_text().strip()
                return ListeningPeer(int(entry.name), comm, os.path.basename(argv0) or comm)
        except OSError:
            continue
    return None
