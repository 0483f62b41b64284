"""Launchers for the real vhost-user peers used by the tests.

Three backends are supported, all from Debian bookworm packages (see
``scripts/install-peers.sh``):

* :class:`QsdBlk` - ``qemu-storage-daemon`` exporting vhost-user-blk;
* :class:`Virtiofsd` - the C ``virtiofsd`` of QEMU 7.2 (one session per process);
* :class:`DpdkTestpmd` - ``dpdk-testpmd`` with the ``net_vhost`` PMD, no hugepages.

Every launcher owns exactly one child process, writes its log into the work
directory, and is a context manager (``with QsdBlk(...) as qsd: ...``).
``stop()`` always reaps the child, so no zombie or stray process is left.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Final, Self

from shadowvmm.errors import ShadowVmmError

__all__ = [
    "DpdkTestpmd",
    "PeerCommandError",
    "PeerError",
    "PeerMissing",
    "PeerStartError",
    "QsdBlk",
    "Virtiofsd",
    "find_peer",
    "parse_port_stats",
    "probe_features",
]

StrPath = str | os.PathLike[str]

PEER_CANDIDATES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "qemu-storage-daemon": ("qemu-storage-daemon", "/usr/bin/qemu-storage-daemon"),
        "virtiofsd": ("/usr/lib/qemu/virtiofsd",),
        "dpdk-testpmd": ("dpdk-testpmd", "/usr/bin/dpdk-testpmd"),
        "qemu-img": ("qemu-img", "/usr/bin/qemu-img"),
    }
)
"""Peer name -> executables tried in order (bare names are looked up in PATH)."""

TESTPMD_FORWARD_MODES: Final = frozenset({"io", "mac", "macswap", "rxonly", "txonly", "icmpecho", "5tswap"})

_VHOST_USER_GET_FEATURES: Final = 1
_VHOST_USER_VERSION: Final = 0x1
_VHOST_USER_REPLY: Final = 0x4
_VHOST_USER_HDR: Final = struct.Struct("<III")
_SUN_PATH_MAX: Final = 107
_POLL_S: Final = 0.005
_PROMPT: Final = b"testpmd> "
_ASYNC_LOG_LINE: Final = re.compile(r"^(?:testpmd> )?VHOST_(?:CONFIG|DATA): ")


class PeerError(ShadowVmmError):
    """Base of the errors raised by the peer launchers."""


class PeerMissing(PeerError):
    """The peer's executable is not installed."""

    def __init__(self, name: str, tried: Sequence[str]) -> None:
        super().__init__(f"{name} not found (tried {', '.join(tried)}); run scripts/install-peers.sh as root")
        self.name = name


class PeerStartError(PeerError):
    """The peer exited or did not become ready in time; carries its log tail."""

    def __init__(self, name: str, reason: str, log_tail: str) -> None:
        super().__init__(f"{name}: {reason}\n--- log tail ---\n{log_tail}")
        self.name = name
        self.reason = reason
        self.log_tail = log_tail


class PeerCommandError(PeerError):
    """A command to a running peer failed or timed out."""


def find_peer(name: str) -> str:
    """Return the executable path of peer *name*, or raise :class:`PeerMissing`.

    Known names: ``qemu-storage-daemon``, ``virtiofsd``, ``dpdk-testpmd``, ``qemu-img``.
    """
    try:
        candidates = PEER_CANDIDATES[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEER_CANDIDATES)}") from None
    for cand in candidates:
        if os.path.isabs(cand):
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
        elif (found := shutil.which(cand)) is not None:
            return found
    raise PeerMissing(name, candidates)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly *n* bytes (replies may arrive split header / payload)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _send_get_features(sock: socket.socket) -> None:
    sock.sendall(_VHOST_USER_HDR.pack(_VHOST_USER_GET_FEATURES, _VHOST_USER_VERSION, 0))


def _recv_features(sock: socket.socket) -> int:
    request, flags, size = _VHOST_USER_HDR.unpack(_recv_exact(sock, _VHOST_USER_HDR.size))
    if request != _VHOST_USER_GET_FEATURES or flags & _VHOST_USER_REPLY == 0 or size != 8:
        raise ConnectionError(f"bad GET_FEATURES reply: request={request} flags={flags:#x} size={size}")
    return int.from_bytes(_recv_exact(sock, 8), "little")


def probe_features(socket_path: StrPath, timeout: float = 5.0) -> int:
    """Connect, send GET_FEATURES, return the feature bits and disconnect.

    Never use this on a one-shot peer (virtiofsd): the probe *is* its session.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(socket_path))
        _send_get_features(sock)
        return _recv_features(sock)


def _connect(path: Path, timeout: float) -> socket.socket | None:
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


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(f"unix socket path longer than {_SUN_PATH_MAX} bytes: {path}")


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse to steal a live one."""
    if not path.exists():
        return
    live = _connect(path, 1.0)
    if live is not None:
        live.close()
        raise PeerError(f"socket {path} is in use by another process")
    path.unlink(missing_ok=True)


def _qemu_opt(value: StrPath) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return os.fspath(value).replace(",", ",,")


class _Peer:
    """One child process with a log file in the work directory."""

    kind: str = ""

    def __init__(self, workdir: StrPath, name: str, binary: str | None, start_timeout: float) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.binary = binary if binary is not None else find_peer(self.kind)
        self.start_timeout = start_timeout
        self.log_path = self.workdir / f"{name}.log"
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
    ) -> subprocess.Popen[bytes]:
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            self._proc = subprocess.Popen(
                list(argv), stdin=stdin, stdout=log, stderr=subprocess.STDOUT, pass_fds=pass_fds, cwd=self.workdir
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
            time.sleep(_POLL_S)


class QsdBlk(_Peer):
    """``qemu-storage-daemon`` serving one block node as vhost-user-blk.

    The node is a raw/qcow2 *image* file (created sparse when ``create=True``)
    or, without *image*, ``null-co`` of *size* bytes with ``read-zeroes=off``.
    ``exports=N`` exports the same node N times (ids ``exp0``..), one socket each.
    """

    kind = "qemu-storage-daemon"
    node_name: Final = "n0"

    def __init__(
        self,
        workdir: StrPath,
        *,
        image: StrPath | None = None,
        size: int | None = None,
        create: bool = False,
        fmt: str = "raw",
        num_queues: int = 1,
        writable: bool = True,
        logical_block_size: int | None = None,
        exports: int = 1,
        name: str = "qsd-blk",
        binary: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(workdir, name, binary, start_timeout)
        if image is None and (create or fmt != "raw"):
            raise ValueError("create/fmt need an image path")
        if create and size is None:
            raise ValueError("create=True needs a size")
        if exports < 1 or num_queues < 1:
            raise ValueError("exports and num_queues must be >= 1")
        if fmt not in ("raw", "qcow2"):
            raise ValueError(f"unsupported image format {fmt!r}")
        self.image = None if image is None else Path(image)
        self.size = size if size is not None or image is not None else 1 << 30
        self.create = create
        self.fmt = fmt
        self.num_queues = num_queues
        self.writable = writable
        self.logical_block_size = logical_block_size
        self.socket_paths = [self.workdir / f"{name}.{i}.sock" for i in range(exports)]
        for path in self.socket_paths:
            _check_socket_path(path)
        self._created = False

    @property
    def socket_path(self) -> Path:
        """Socket of the first export (``exp0``)."""
        return self.socket_paths[0]

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        if self.image is None:
            node = f"driver=null-co,node-name={self.node_name},size={self.size},read-zeroes=off"
        elif self.fmt == "raw":
            node = f"driver=file,node-name={self.node_name},filename={_qemu_opt(self.image)},cache.direct=off"
        else:
            node = (
                f"driver=qcow2,node-name={self.node_name},file.driver=file,"
                f"file.filename={_qemu_opt(self.image)},file.cache.direct=off"
            )
        argv = [self.binary, "--blockdev", node]
        for i, path in enumerate(self.socket_paths):
            export = (
                f"type=vhost-user-blk,id=exp{i},node-name={self.node_name},addr.type=unix,"
                f"addr.path={_qemu_opt(path)},writable={'on' if self.writable else 'off'},"
                f"num-queues={self.num_queues}"
            )
            if self.logical_block_size is not None:
                export += f",logical-block-size={self.logical_block_size}"
            argv += ["--export", export]
        return argv

    def _create_image(self) -> None:
        assert self.image is not None and self.size is not None
        if self.fmt == "raw":
            with open(self.image, "wb") as f:
                f.truncate(self.size)
            return
        res = subprocess.run(
            [find_peer("qemu-img"), "create", "-q", "-f", self.fmt, os.fspath(self.image), str(self.size)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise PeerStartError(self.name, "qemu-img create failed", res.stderr.strip())

    def _prepare(self) -> None:
        if self.create and not self._created:
            self._create_image()
            self._created = True
        for path in self.socket_paths:
            _clear_stale_socket(path)

    def _launch(self, deadline: float) -> None:
        self._spawn(self.argv())
        for path in self.socket_paths:
            self._wait_until(f"GET_FEATURES reply on {path.name}", functools.partial(self._answers, path), deadline)

    def _answers(self, path: Path) -> bool:
        """Readiness: one full GET_FEATURES round trip.

        A bare connect-and-close probe is not enough: qsd serves one client at a
        time with a listen backlog of 1, so unconsumed probes can fill the
        backlog and make the caller's next connect() fail with EAGAIN.
        """
        if not path.exists():
            return False
        sock = _connect(path, self.start_timeout)
        if sock is None:
            return False
        with sock:
            _send_get_features(sock)
            _recv_features(sock)
        return True

    def _cleanup(self) -> None:
        for path in self.socket_paths:
            path.unlink(missing_ok=True)


class Virtiofsd(_Peer):
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
            raise ValueError(f"virtiofsd -o options cannot carry a ',' in the source path: {self.source}")
        self.cache = cache
        self.sandbox = sandbox
        self.extra_args = tuple(extra_args)
        self.socket_path = self.workdir / f"{unique}.sock"
        _check_socket_path(self.socket_path)

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


def _default_lcores() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    return f"0@{cpus[0]},1@{cpus[1] if len(cpus) > 1 else cpus[0]}"


class DpdkTestpmd(_Peer):
    """``dpdk-testpmd`` as a vhost-user net backend (``net_vhost0``), no hugepages.

    Interactive: commands go to its stdin (a pipe held by the launcher), and
    answers are read back from the log up to the next ``testpmd>`` prompt.
    :meth:`start` returns after the prompt and after one throw-away
    GET_FEATURES connection, so the first real connection is answered at once
    (DPDK's vhost thread notices a new listen fd only when its 1 s poll ends).
    Forwarding is stopped after :meth:`start`; call :meth:`start_forwarding`.
    """

    kind = "dpdk-testpmd"

    def __init__(
        self,
        workdir: StrPath,
        *,
        forward_mode: str = "io",
        queues: int = 1,
        lcores: str | None = None,
        memory_mb: int = 256,
        total_mbufs: int = 16384,
        vdev_args: str = "",
        eal_args: Sequence[str] = (),
        app_args: Sequence[str] = (),
        warmup: bool = True,
        name: str = "testpmd",
        binary: str | None = None,
        start_timeout: float = 20.0,
        command_timeout: float = 5.0,
    ) -> None:
        super().__init__(workdir, name, binary, start_timeout)
        if forward_mode not in TESTPMD_FORWARD_MODES:
            raise ValueError(f"unknown forward mode {forward_mode!r}; known: {sorted(TESTPMD_FORWARD_MODES)}")
        self.forward_mode = forward_mode
        self.queues = queues
        self.lcores = lcores if lcores is not None else _default_lcores()
        self.memory_mb = memory_mb
        self.total_mbufs = total_mbufs
        self.vdev_args = vdev_args
        self.eal_args = tuple(eal_args)
        self.app_args = tuple(app_args)
        self.warmup = warmup
        self.command_timeout = command_timeout
        self.socket_path = self.workdir / f"{name}.sock"
        _check_socket_path(self.socket_path)
        if "," in os.fspath(self.socket_path):
            raise ValueError(f"DPDK devargs cannot carry a ',' in the socket path: {self.socket_path}")

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        vdev = f"net_vhost0,iface={self.socket_path},queues={self.queues}"
        if self.vdev_args:
            vdev += "," + self.vdev_args
        stdbuf = shutil.which("stdbuf")
        prefix = [stdbuf, "-oL"] if stdbuf is not None else []
        return [
            *prefix,
            self.binary,
            "--lcores",
            self.lcores,
            "--no-pci",
            "--no-huge",
            "-m",
            str(self.memory_mb),
            "--no-shconf",
            "--vdev",
            vdev,
            *self.eal_args,
            "--",
            "-i",
            f"--total-num-mbufs={self.total_mbufs}",
            "--nb-cores=1",
            f"--forward-mode={self.forward_mode}",
            *self.app_args,
        ]

    def _prepare(self) -> None:
        _clear_stale_socket(self.socket_path)

    def _launch(self, deadline: float) -> None:
        self._spawn(self.argv(), stdin=subprocess.PIPE)
        self._wait_until("vhost-user socket", self.socket_path.exists, deadline)
        warm: socket.socket | None = None
        try:
            if self.warmup:
                # Send the warm-up request now; it is answered while we wait for the prompt.
                def connected() -> bool:
                    nonlocal warm
                    warm = _connect(self.socket_path, max(deadline - time.monotonic(), 0.1))
                    return warm is not None

                self._wait_until("connection to the vhost-user socket", connected, deadline)
                assert warm is not None
                _send_get_features(warm)
            self._wait_until("'testpmd>' prompt", lambda: _PROMPT in self.log_path.read_bytes(), deadline)
            if warm is not None:
                warm.settimeout(max(deadline - time.monotonic(), 0.1))
                try:
                    _recv_features(warm)
                except OSError as exc:
                    raise self._fail(f"warm-up GET_FEATURES failed: {exc}") from exc
        finally:
            if warm is not None:
                warm.close()

    def _request_exit(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(b"quit\n")
            proc.stdin.close()
        except (OSError, ValueError):
            proc.send_signal(signal.SIGTERM)
            return
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)

    def _cleanup(self) -> None:
        self.socket_path.unlink(missing_ok=True)

    def command(self, text: str, timeout: float | None = None) -> str:
        """Run one testpmd command; return its output (without echo and async vhost log lines)."""
        if "\n" in text:
            raise ValueError("one command per call")
        proc = self._proc
        if proc is None or proc.poll() is not None or proc.stdin is None or proc.stdin.closed:
            raise PeerCommandError(f"{self.name} is not running")
        limit = self.command_timeout if timeout is None else timeout
        with open(self.log_path, "rb") as log:
            log.seek(0, os.SEEK_END)
            try:
                proc.stdin.write(text.encode() + b"\n")
                proc.stdin.flush()
            except OSError as exc:
                raise PeerCommandError(f"{self.name}: cannot send {text!r}: {exc}") from exc
            out = bytearray()
            deadline = time.monotonic() + limit
            while True:
                out += log.read()
                if (end := out.find(_PROMPT)) >= 0:
                    break
                if proc.poll() is not None:
                    raise PeerCommandError(f"{self.name} exited during {text!r}:\n{self.log_tail()}")
                if time.monotonic() >= deadline:
                    raise PeerCommandError(f"{self.name}: no prompt {limit} s after {text!r}")
                time.sleep(_POLL_S)
        text_out = out[:end].decode(errors="replace").replace("\r", "")
        lines = [ln for ln in text_out.split("\n") if not _ASYNC_LOG_LINE.match(ln)]
        if lines and lines[0].strip() == text.strip():
            lines = lines[1:]
        return "\n".join(lines).strip("\n")

    def start_forwarding(self) -> str:
        """``start``: begin forwarding (busy-polls the forwarding lcore)."""
        return self.command("start")

    def stop_forwarding(self) -> str:
        """``stop``: end forwarding; returns testpmd's forward statistics text."""
        return self.command("stop")

    def clear_stats(self) -> None:
        """``clear port stats all``."""
        self.command("clear port stats all")

    def port_stats(self) -> dict[int, dict[str, int]]:
        """``show port stats all`` as ``{port: {"RX-packets": n, "RX-missed": n, ...}}``."""
        return parse_port_stats(self.command("show port stats all"))


def parse_port_stats(text: str) -> dict[int, dict[str, int]]:
    """Parse the counters of testpmd's ``show port stats all`` (throughput lines excluded)."""
    stats: dict[int, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        if (m := re.search(r"NIC statistics for port (\d+)", line)) is not None:
            current = stats.setdefault(int(m[1]), {})
        elif "Throughput" in line or line.strip().startswith("####"):
            current = None
        elif current is not None:
            for key, value in re.findall(r"([A-Za-z][A-Za-z-]*):\s*(\d+)", line):
                current[key] = int(value)
    if not stats:
        raise PeerCommandError(f"no port statistics in:\n{text}")
    return stats
