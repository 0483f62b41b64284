"""Launchers for the real vhost-user peers used by the tests.

Three backends come from Debian bookworm packages (see
``scripts/install-peers.sh``), one from this project:

* :class:`QsdBlk` - ``qemu-storage-daemon`` exporting vhost-user-blk, optionally
  with a QMP monitor (:meth:`QsdBlk.qmp`);
* :class:`Virtiofsd` - the C ``virtiofsd`` of QEMU 7.2 (one session per process);
* :class:`DpdkTestpmd` - ``dpdk-testpmd`` with the ``net_vhost`` PMD, no hugepages;
* :class:`RefBlk` - the Python reference vhost-user-blk back-end
  (:mod:`shadowvmm_vhost_user.refbackend`) in its own process.

Every launcher owns exactly one child process, writes its log into the work
directory, and is a context manager (``with QsdBlk(...) as qsd: ...``).
``stop()`` always reaps the child, so no zombie or stray process is left;
``kill()`` models a crash (``kill -9``) and ``restart()`` brings the same peer
back on the same socket and image.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Any, Final, Self

from shadowvmm.errors import ArgumentError, PeerCommandError, PeerError, PeerMissing, PeerStartError

__all__ = [
    "DpdkTestpmd",
    "PeerCommandError",
    "PeerError",
    "PeerMissing",
    "PeerStartError",
    "QsdBlk",
    "RefBlk",
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


def _answers_get_features(path: Path, timeout: float) -> bool:
    """Readiness: one full GET_FEATURES round trip on *path* (False if nothing listens yet).

    A bare connect-and-close probe is not enough: qsd serves one client at a
    time with a listen backlog of 1, so unconsumed probes can fill the
    backlog and make the caller's next connect() fail with EAGAIN.
    """
    if not path.exists():
        return False
    sock = _connect(path, timeout)
    if sock is None:
        return False
    with sock:
        _send_get_features(sock)
        _recv_features(sock)
    return True


def _listening(path: Path, timeout: float) -> bool:
    """Readiness after a restart: something accepts connections on *path*.

    A front-end reconnecting on its own may take the one session the peer
    serves the moment it listens, so a GET_FEATURES probe would wait behind it;
    one bare connect (then close) proves the listener without holding a session.
    """
    if not path.exists():
        return False
    sock = _connect(path, timeout)
    if sock is None:
        return False
    sock.close()
    return True


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ArgumentError(f"unix socket path longer than {_SUN_PATH_MAX} bytes: {path}")


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


def _keyval(options: Mapping[str, Any], prefix: str = "") -> str:
    """A QAPI options dict in QEMU's dotted ``key=value,...`` syntax (nested dicts: ``addr.type=``)."""
    parts = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            parts.append(_keyval(value, f"{prefix}{key}."))
        elif isinstance(value, bool):
            parts.append(f"{prefix}{key}={'on' if value else 'off'}")
        else:
            parts.append(f"{prefix}{key}={_qemu_opt(str(value))}")
    return ",".join(parts)


class _Qmp:
    """A synchronous QMP client on a unix socket (QEMU docs/interop/qmp-spec).

    JSON objects one per line; commands carry an ``id`` matched against the
    response, and events met meanwhile are kept in :attr:`events`.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 0

    def open(self) -> None:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(os.fspath(self.path))
        except OSError as exc:
            sock.close()
            raise PeerCommandError(f"QMP {self.path}: cannot connect: {exc}") from exc
        self._sock = sock
        self._buf = bytearray()
        greeting = self._read(time.monotonic() + self.timeout)
        if "QMP" not in greeting:
            self.close()
            raise PeerCommandError(f"QMP {self.path}: no greeting, got {greeting}")
        self.execute("qmp_capabilities", {})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _read(self, deadline: float) -> dict[str, Any]:
        sock = self._sock
        assert sock is not None
        while (end := self._buf.find(b"\n")) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerCommandError(f"QMP {self.path}: no answer within {self.timeout} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self.close()
                raise PeerCommandError(f"QMP {self.path}: {exc}") from exc
            if not chunk:
                self.close()
                raise PeerCommandError(f"QMP {self.path}: the monitor closed the connection")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise PeerCommandError(f"QMP {self.path}: not JSON: {line!r}") from exc
        if not isinstance(message, dict):
            raise PeerCommandError(f"QMP {self.path}: not a JSON object: {line!r}")
        return message

    def execute(self, command: str, arguments: Mapping[str, Any]) -> Any:
        """Run *command*; its ``return`` value, or :class:`PeerCommandError` for an ``error``."""
        if self._sock is None:
            raise PeerCommandError(f"QMP {self.path}: not connected")
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = dict(arguments)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            self.close()
            raise PeerCommandError(f"QMP {self.path}: cannot send {command}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read(deadline)
            if "event" in message:
                self.events.append(message)
            elif message.get("id") == self._next_id:
                break
        if "error" in message:
            error = message["error"]
            raise PeerCommandError(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        return message.get("return")

    def wait_event(self, name: str, data: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """The first event *name* whose data contains *data* (kept or still to come); it is consumed."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("event") == name and data.items() <= event.get("data", {}).items():
                    self.events.remove(event)
                    return event
            if self._sock is None:
                raise PeerCommandError(f"QMP {self.path}: not connected")
            self.events.append(self._read(deadline))


class _Peer:
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
        """A fresh peer answers GET_FEATURES; a restarted one only has to listen (:func:`_listening`)."""
        if self._restarting:
            return _listening(path, self.start_timeout)
        return _answers_get_features(path, self.start_timeout)

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
            time.sleep(_POLL_S)


class QsdBlk(_Peer):
    """``qemu-storage-daemon`` serving one block node as vhost-user-blk.

    The node is a raw/qcow2 *image* file (created sparse when ``create=True``)
    or, without *image*, ``null-co`` of *size* bytes with ``read-zeroes=off``.
    ``exports=N`` exports the same node N times (ids ``exp0``..), one socket each.
    ``qmp=True`` adds a QMP monitor on ``NAME.qmp.sock`` (``--chardev socket``
    + ``--monitor mode=control``), used by :meth:`qmp`, :meth:`close_export`
    and :meth:`add_export`. ``iops=N`` puts a throttle node (a throttle group of
    ``x-iops-total=N``) in front of the image: a slow disk, whose requests stay in
    flight long enough for a test to act on them.
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
        qmp: bool = False,
        iops: int | None = None,
        name: str = "qsd-blk",
        binary: str | None = None,
        start_timeout: float = 10.0,
        command_timeout: float = 5.0,
    ) -> None:
        super().__init__(workdir, name, binary, start_timeout)
        if image is None and (create or fmt != "raw"):
            raise ArgumentError("create/fmt need an image path")
        if create and size is None:
            raise ArgumentError("create=True needs a size")
        if exports < 1 or num_queues < 1:
            raise ArgumentError("exports and num_queues must be >= 1")
        if fmt not in ("raw", "qcow2"):
            raise ArgumentError(f"unsupported image format {fmt!r}")
        self.image = None if image is None else Path(image)
        self.size = size if size is not None or image is not None else 1 << 30
        self.create = create
        self.fmt = fmt
        self.num_queues = num_queues
        self.writable = writable
        self.logical_block_size = logical_block_size
        self.socket_paths = [self.workdir / f"{name}.{i}.sock" for i in range(exports)]
        self.qmp_path = self.workdir / f"{name}.qmp.sock" if qmp else None
        for path in [*self.socket_paths, *([self.qmp_path] if self.qmp_path else [])]:
            _check_socket_path(path)
        self.command_timeout = command_timeout
        self.iops = iops
        self._qmp: _Qmp | None = None
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
        argv = [self.binary]
        if self.iops is not None:
            # a slow disk: the exported node throttles the image node to *iops* requests/s
            base = node.replace(f"node-name={self.node_name}", f"node-name={self.node_name}-disk", 1)
            argv += ["--object", f"throttle-group,id=tg0,x-iops-total={self.iops}", "--blockdev", base]
            node = f"driver=throttle,node-name={self.node_name},throttle-group=tg0,file={self.node_name}-disk"
        argv += ["--blockdev", node]
        for i in range(len(self.socket_paths)):
            argv += ["--export", _keyval(self.export_options(i))]
        if self.qmp_path is not None:
            argv += [
                "--chardev",
                f"socket,id=qmp0,path={_qemu_opt(self.qmp_path)},server=on,wait=off",
                "--monitor",
                "chardev=qmp0,mode=control",
            ]
        return argv

    def export_options(self, index: int) -> dict[str, Any]:
        """``BlockExportOptions`` of export *index* (QAPI; ``--export`` and ``block-export-add`` alike)."""
        options: dict[str, Any] = {
            "type": "vhost-user-blk",
            "id": f"exp{index}",
            "node-name": self.node_name,
            "addr": {"type": "unix", "path": os.fspath(self.socket_paths[index])},
            "writable": self.writable,
            "num-queues": self.num_queues,
        }
        if self.logical_block_size is not None:
            options["logical-block-size"] = self.logical_block_size
        return options

    def qmp(self, command: str, /, **arguments: Any) -> Any:
        """Run QMP *command* with *arguments* (dashed names via ``**{"node-name": ...}``).

        Returns the response's ``return`` value; an ``error`` response, a
        timeout or a lost monitor raise :class:`PeerCommandError`. The monitor
        connection is opened (greeting, ``qmp_capabilities``) on first use.
        """
        if self.qmp_path is None:
            raise PeerCommandError(f"{self.name} was started without a QMP monitor (qmp=True)")
        if not self.running:
            raise PeerCommandError(f"{self.name} is not running")
        if self._qmp is None or not self._qmp.connected:
            self._qmp = _Qmp(self.qmp_path, self.command_timeout)
            self._qmp.open()
        return self._qmp.execute(command, arguments)

    def close_export(self, index: int, mode: str = "hard") -> None:
        """``block-export-del`` export *index* and wait for its ``BLOCK_EXPORT_DELETED`` event.

        Observed on qsd 7.2.22 (vhost-user-blk), identical for ``mode=safe``
        (QMP's default) and ``mode=hard``: with no request in flight the
        connected client's socket is closed at once (EOF about 3 ms after the
        command was sent, the event arrives before the command's return), the
        socket file is removed, and the export is gone from
        ``query-block-exports``. Requests in flight are not cancelled: the
        command blocks until they have completed and been used (seen with a
        1-IOPS throttle: five requests, 4.7 s), then closes the client.
        """
        self.qmp("block-export-del", id=f"exp{index}", mode=mode)
        assert self._qmp is not None
        self._qmp.wait_event("BLOCK_EXPORT_DELETED", {"id": f"exp{index}"}, self.command_timeout)

    def add_export(self, index: int) -> None:
        """``block-export-add`` export *index* again, same id and socket path; it listens on return."""
        self.socket_paths[index].unlink(missing_ok=True)
        self.qmp("block-export-add", **self.export_options(index))

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
        if self.qmp_path is not None:
            _clear_stale_socket(self.qmp_path)

    def _launch(self, deadline: float) -> None:
        self._spawn(self.argv())
        for path in self.socket_paths:
            self._wait_until(f"{path.name} to answer", functools.partial(self._ready, path), deadline)
        if self.qmp_path is not None:
            self._wait_until("QMP socket", self.qmp_path.exists, deadline)

    def _cleanup(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        for path in self.socket_paths:
            path.unlink(missing_ok=True)
        if self.qmp_path is not None:
            self.qmp_path.unlink(missing_ok=True)


class RefBlk(_Peer):
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
        _check_socket_path(self.socket_path)
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
        _clear_stale_socket(self.socket_path)

    def _launch(self, deadline: float) -> None:
        package_root = Path(__file__).resolve().parents[2]
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.fspath(package_root), path]))}
        self._spawn(self.argv(), env=env)
        self._wait_until(f"{self.socket_path.name} to answer", functools.partial(self._ready, self.socket_path),
                         deadline)

    def _cleanup(self) -> None:
        self.socket_path.unlink(missing_ok=True)


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
            raise ArgumentError(f"virtiofsd -o options cannot carry a ',' in the source path: {self.source}")
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
            raise ArgumentError(f"unknown forward mode {forward_mode!r}; known: {sorted(TESTPMD_FORWARD_MODES)}")
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
            raise ArgumentError(f"DPDK devargs cannot carry a ',' in the socket path: {self.socket_path}")

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
            raise ArgumentError("one command per call")
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
