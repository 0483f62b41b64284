"""A user's own vhost-user back-end daemon, launched from its command line (:class:`Daemon`)."""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final

from shadowvmm.errors import ArgumentError

from .probe import StrPath, answers_get_features, check_socket_path, clear_stale_socket, listening
from .process import Peer


def is_socket(path: Path, timeout: float) -> bool:
    """Readiness without touching the daemon: *path* exists and is a unix socket."""
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except FileNotFoundError:
        return False


READY_PROBES: Final[Mapping[str, Callable[[Path, float], bool]]] = MappingProxyType({
    "socket": is_socket,
    "listening": listening,
    "get_features": answers_get_features,
})
"""How :class:`Daemon` tells the daemon is ready: its socket file exists (``socket``, touches no
session: right for one-session daemons), it accepts a connection (``listening``: one bare
connect and close) or it answers ``VHOST_USER_GET_FEATURES`` (``get_features``)."""


class Daemon(Peer):
    """The user's back-end: runs *argv* (``argv[0]`` looked up by the OS), logs its stdout and
    stderr to ``WORKDIR/NAME.log`` and is ready when *socket_path* passes the *ready* probe
    (:data:`READY_PROBES`) within *start_timeout* seconds; :meth:`stop` sends SIGTERM, kills
    after *stop_timeout* and reaps, then removes the socket file if the daemon left it."""

    kind = "daemon"

    def __init__(
        self,
        workdir: StrPath,
        argv: Sequence[str],
        socket_path: StrPath,
        *,
        ready: str = "socket",
        env: Mapping[str, str] | None = None,
        name: str = "daemon",
        start_timeout: float = 10.0,
    ) -> None:
        argv = [os.fspath(arg) for arg in argv]
        if not argv:
            raise ArgumentError("a daemon needs a command line (argv)")
        if ready not in READY_PROBES:
            raise ArgumentError(f"unknown ready probe {ready!r}; known: {', '.join(READY_PROBES)}")
        super().__init__(workdir, name, argv[0], start_timeout)
        self._argv = argv
        self.socket_path = Path(socket_path)
        check_socket_path(self.socket_path)
        self.ready = ready
        self.env = None if env is None else {**os.environ, **env}

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        return list(self._argv)

    def _prepare(self) -> None:
        clear_stale_socket(self.socket_path)

    def _launch(self, deadline: float) -> None:
        self._spawn(self.argv(), env=self.env)
        probe = functools.partial(READY_PROBES[self.ready], self.socket_path, self.start_timeout)
        self._wait_until(f"{self.socket_path} ({self.ready})", probe, deadline)

    def _cleanup(self) -> None:
        if is_socket(self.socket_path, 0):
            self.socket_path.unlink(missing_ok=True)
