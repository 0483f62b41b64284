"""The C ``virtiofsd`` of QEMU 7.2, one session per process (:class:`Virtiofsd`)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

from shadowvmm.errors import ArgumentError

from .probe import StrPath, check_socket_path
from .process import Peer


class Virtiofsd(Peer):
    """The C ``virtiofsd`` sharing *source*; it serves ONE frontend session, then exits.

    The launcher binds and listens on the socket itself and passes it with
    ``--fd``, so the socket is ready when :meth:`start` returns. Readiness is
    read from the log; the socket is never probed with ``connect()`` (that
    would consume the only session). Each instance gets a unique socket path.
    """

    kind = "virtiofsd"

    def __init__(
        self,
        workdir: StrPath,
        *,
        source: StrPath | None = None,
        cache: str = "auto",
        sandbox: str = "chroot",
        extra_args: Sequence[str] = (),
        name: str = "virtiofsd",
        binary: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        unique = f"{name}-{secrets.token_hex(4)}"
        super().__init__(workdir, unique, binary, start_timeout)
        self.source = Path(source) if source is not None else self.workdir / f"{unique}-share"
        if "," in os.fspath(self.source):
            raise ArgumentError(f"virtiofsd -o options cannot carry a ',' in the source path: {self.source}")
        self.cache = cache
        self.sandbox = sandbox
        self.extra_args = tuple(extra_args)
        self.socket_path = self.workdir / f"{unique}.sock"
        check_socket_path(self.socket_path)

    def argv(self, fd: int) -> list[str]:
        """The command line :meth:`start` runs with listening socket *fd*."""
        return [
            self.binary,
            f"--fd={fd}",
            "-o",
            f"source={self.source}",
            "-o",
            f"cache={self.cache}",
            "-o",
            f"sandbox={self.sandbox}",
            *self.extra_args,
        ]

    def _prepare(self) -> None:
        self.source.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)

    def _launch(self, deadline: float) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(os.fspath(self.socket_path))
            listener.listen(1)
            self._spawn(self.argv(listener.fileno()), pass_fds=(listener.fileno(),))
        self._wait_until("'Waiting for vhost-user socket connection' in the log", self._waiting, deadline)

    def _waiting(self) -> bool:
        try:
            return b"Waiting for vhost-user socket connection" in self.log_path.read_bytes()
        except FileNotFoundError:
            return False

    def _cleanup(self) -> None:
        self.socket_path.unlink(missing_ok=True)
