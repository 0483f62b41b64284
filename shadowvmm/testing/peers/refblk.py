"""The reference vhost-user-blk back-end in its own process (:class:`RefBlk`)."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import shadowvmm
from shadowvmm.errors import ArgumentError

from .probe import StrPath, check_socket_path, clear_stale_socket
from .process import Peer


class RefBlk(Peer):
    """The reference vhost-user-blk back-end (:mod:`shadowvmm_vhost_user.refbackend`) as a process.

    It offers what no Debian peer does (INFLIGHT_SHMFD, RESET_DEVICE, STATUS,
    DEVICE_STATE) and serves one front-end at a time, the next waiting in the
    listen backlog. *image* (default ``NAME.img``) is created sparse with
    *size* on the first start (``create=True``), never again. ``latency_us``
    holds every request in flight that long, so :meth:`kill` lands mid-I/O
    (``latency_data_only``: only reads and writes, so a FLUSH is used ahead of
    them, out of order); :meth:`drop_session` makes it close the session and
    wait for the next front-end. The child runs ``sys.executable -m
    shadowvmm_vhost_user.refbackend`` on the shadowvmm package the parent imported.
    """

    kind = "refblk"

    def __init__(
        self,
        workdir: StrPath,
        *,
        image: StrPath | None = None,
        size: int = 16 << 20,
        create: bool = True,
        queues: int = 2,
        latency_us: int = 0,
        latency_data_only: bool = False,
        implementation: str = "shadowvmm-refblk",
        name: str = "refblk",
        python: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(workdir, name, python if python is not None else sys.executable, start_timeout)
        if queues < 1 or size <= 0 or latency_us < 0:
            raise ArgumentError("queues and size must be >= 1, latency_us >= 0")
        self.image = Path(image) if image is not None else self.workdir / f"{name}.img"
        self.size = size
        self.create = create
        self.queues = queues
        self.latency_us = latency_us
        self.latency_data_only = latency_data_only
        self.implementation = implementation
        self.socket_path = self.workdir / f"{name}.sock"
        check_socket_path(self.socket_path)
        self._created = False

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        return [
            self.binary,
            "-m",
            "shadowvmm_vhost_user.refbackend",
            os.fspath(self.socket_path),
            "--image",
            os.fspath(self.image),
            "--size",
            str(self.size),
            "--queues",
            str(self.queues),
            "--latency-us",
            str(self.latency_us),
            "--implementation",
            self.implementation,
            *(["--latency-data-only"] if self.latency_data_only else []),
        ]

    def drop_session(self) -> None:
        """SIGUSR1: the back-end closes its session socket (a peer hanging up) and keeps listening.

        Asynchronous: the front-end sees EOF once the back-end has handled the signal.
        """
        self.kill(signal.SIGUSR1)

    def _prepare(self) -> None:
        if self.create and not self._created:
            with open(self.image, "wb") as f:
                f.truncate(self.size)
            self._created = True
        clear_stale_socket(self.socket_path)

    def _launch(self, deadline: float) -> None:
        package_root = Path(shadowvmm.__file__).resolve().parents[1]     # the tree holding shadowvmm/
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.fspath(package_root), path]))}
        self._spawn(self.argv(), env=env)
        self._wait_until(f"{self.socket_path.name} to answer", functools.partial(self._ready, self.socket_path),
                         deadline)

    def _cleanup(self) -> None:
        self.socket_path.unlink(missing_ok=True)
