"""One peer process: found on the host, started, waited for, stopped and reaped (:class:`Peer`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Final, Self

from shadowvmm.errors import ArgumentError, PeerCommandError, PeerError, PeerMissing, PeerStartError

from .probe import StrPath, answers_get_features, listening

PEER_CANDIDATES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "qemu-storage-daemon": ("qemu-storage-daemon", "/usr/bin/qemu-storage-daemon"),
        "virtiofsd": ("/usr/lib/qemu/virtiofsd",),
        "dpdk-testpmd": ("dpdk-testpmd", "/usr/bin/dpdk-testpmd"),
        "qemu-img": ("qemu-img", "/usr/bin/qemu-img"),
    }
)
"""Peer name -> executables tried in order (bare names are looked up in PATH)."""

POLL_S: Final = 0.005


def find_peer(name: str) -> str:
    """Return the executable path of peer *name*, or raise :class:`PeerMissing`.

    Known names: ``qemu-storage-daemon``, ``virtiofsd``, ``dpdk-testpmd``, ``qemu-img``.
    """
    try:
        candidates = PEER_CANDIDATES[name]
    except KeyError:
        raise ArgumentError(f"unknown peer {name!r}; known: {', '.join(PEER_CANDIDATES)}") from None
    for cand in candidates:
        if os.path.isabs(cand):
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
        elif (found := shutil.which(cand)) is not None:
            return found
    raise PeerMissing(name, candidates)


class Peer:
    """One child process with a log file in the work directory."""

    kind: str = ""

    def __init__(self, workdir: StrPath, name: str, binary: str | None, start_timeout: float) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.binary = binary if binary is not None else find_peer(self.kind)
        self.start_timeout = start_timeout
        self.log_path = self.workdir / f"{name}.log"
        self.generation = 0
        self._restarting = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """Process id of the running (or last) child."""
        if self._proc is None:
            raise PeerError(f"{self.name} was never started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the child has exited, else ``None``."""
        return None if self._proc is None else self._proc.poll()

    @property
    def running(self) -> bool:
        """Whether the child is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """Last *lines* lines of the log file."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def start(self) -> Self:
        """Start the peer and wait until it is ready; raise :class:`PeerStartError` otherwise."""
        if self.running:
            raise PeerError(f"{self.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self.generation += 1
        try:
            self._launch(time.monotonic() + self.start_timeout)
        except PeerStartError:
            raise
        except OSError as exc:
            raise self._fail(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._abort()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the child (tolerates it having exited) and reap it; return its exit status."""
        rc = self._reap(timeout)
        self._cleanup()
        return rc

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 5.0) -> int | None:
        """Send *sig* to the child; after SIGKILL or SIGTERM wait for its exit and return the status.

        Nothing is cleaned up: a killed peer leaves its socket file behind as a
        crashed one would (:meth:`restart` and :meth:`stop` deal with it).
        Other signals return ``None`` at once.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise PeerCommandError(f"{self.name} is not running")
        proc.send_signal(sig)
        if sig not in (signal.SIGKILL, signal.SIGTERM):
            return None
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise PeerCommandError(f"{self.name} did not exit {timeout} s after signal {sig}") from None

    def restart(self) -> Self:
        """Start the same peer again: same socket paths, same image (never re-created).

        A running child is stopped first; the previous log is kept as
        ``NAME.GENERATION.log``.
        """
        self.stop()
        if self.log_path.exists():
            self.log_path.rename(self.workdir / f"{self.name}.{self.generation}.log")
        self._restarting = True
        try:
            return self.start()
        finally:
            self._restarting = False

    def _ready(self, path: Path) -> bool:
        """A fresh peer answers GET_FEATURES; a restarted one only has to listen (:func:`listening`)."""
        if self._restarting:
            return listening(path, self.start_timeout)
        return answers_get_features(path, self.start_timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "never started" if self._proc is None else f"pid={self._proc.pid} rc={self.returncode}"
        return f"<{type(self).__name__} {self.name} {state}>"

    def _prepare(self) -> None:
        """Set up files before the spawn (failures here leave nothing to clean)."""

    def _launch(self, deadline: float) -> None:
        raise NotImplementedError

    def _request_exit(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)

    def _cleanup(self) -> None:
        """Remove files the launcher owns once the child is gone."""

    def _spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[bytes] = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            self._proc = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                cwd=self.workdir,
                env=None if env is None else dict(env),
            )
        return self._proc

    def _reap(self, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                self._request_exit(proc)
                proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        return proc.returncode

    def _abort(self) -> None:
        """Kill a half-started child and remove its files."""
        self._reap(0.5)
        self._cleanup()

    def _fail(self, reason: str) -> PeerStartError:
        self._abort()
        return PeerStartError(self.name, reason, self.log_tail())

    def _wait_until(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        """Poll *ready* until true; fail if the child exits or the deadline passes."""
        proc = self._proc
        assert proc is not None
        while not ready():
            if (rc := proc.poll()) is not None:
                raise self._fail(f"exited with status {rc} while waiting for {what}")
            if time.monotonic() >= deadline:
                raise self._fail(f"no {what} after {self.start_timeout} s")
            time.sleep(POLL_S)
