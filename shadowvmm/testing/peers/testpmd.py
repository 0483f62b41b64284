"""``dpdk-testpmd`` as a vhost-user net back-end, driven on its prompt (:class:`DpdkTestpmd`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Final

from shadowvmm.errors import ArgumentError, PeerCommandError

from .probe import StrPath, check_socket_path, clear_stale_socket, connect_unix, recv_features, send_get_features
from .process import POLL_S, Peer

TESTPMD_FORWARD_MODES: Final = frozenset({"io", "mac", "macswap", "rxonly", "txonly", "icmpecho", "5tswap"})
_PROMPT: Final = b"testpmd> "
_ASYNC_LOG_LINE: Final = re.compile(r"^(?:testpmd> )?VHOST_(?:CONFIG|DATA): ")


def default_lcores() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    return f"0@{cpus[0]},1@{cpus[1] if len(cpus) > 1 else cpus[0]}"


class DpdkTestpmd(Peer):
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
        self.lcores = lcores if lcores is not None else default_lcores()
        self.memory_mb = memory_mb
        self.total_mbufs = total_mbufs
        self.vdev_args = vdev_args
        self.eal_args = tuple(eal_args)
        self.app_args = tuple(app_args)
        self.warmup = warmup
        self.command_timeout = command_timeout
        self._baseline: dict[int, dict[str, int]] = {}
        self.socket_path = self.workdir / f"{name}.sock"
        check_socket_path(self.socket_path)
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
        clear_stale_socket(self.socket_path)

    def _launch(self, deadline: float) -> None:
        self._spawn(self.argv(), stdin=subprocess.PIPE)
        self._wait_until("vhost-user socket", self.socket_path.exists, deadline)
        warm: socket.socket | None = None
        try:
            if self.warmup:
                # Send the warm-up request now; it is answered while we wait for the prompt.
                def connected() -> bool:
                    nonlocal warm
                    warm = connect_unix(self.socket_path, max(deadline - time.monotonic(), 0.1))
                    return warm is not None

                self._wait_until("connection to the vhost-user socket", connected, deadline)
                assert warm is not None
                send_get_features(warm)
            self._wait_until("'testpmd>' prompt", lambda: _PROMPT in self.log_path.read_bytes(), deadline)
            if warm is not None:
                warm.settimeout(max(deadline - time.monotonic(), 0.1))
                try:
                    recv_features(warm)
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
                time.sleep(POLL_S)
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
        """Start counting from now: later :meth:`port_stats` are counts since this call.

        A baseline is read instead of sending ``clear port stats all``: DPDK's vhost PMD
        zeroes its per-queue counters from the prompt thread while the forwarding lcore
        adds to them unlocked (``pkts += nb_rx`` on every poll, 0 or not), so a reset can
        be lost and the old count reappear (seen: 640 + 609 RX-packets for 609 frames)."""
        self._baseline = self._read_port_stats()

    def port_stats(self) -> dict[int, dict[str, int]]:
        """``show port stats all`` as ``{port: {"RX-packets": n, "RX-missed": n, ...}}``,
        counted since the last :meth:`clear_stats` (a counter found below its baseline was
        reset by testpmd itself and is given as read)."""
        stats = self._read_port_stats()
        for port, counters in stats.items():
            base = self._baseline.get(port, {})
            for key, value in counters.items():
                if value >= (b := base.get(key, 0)):
                    counters[key] = value - b
        return stats

    def _read_port_stats(self) -> dict[int, dict[str, int]]:
        return parse_port_stats(self.command("show port stats all"))


class DpdkVirtioUser(DpdkTestpmd):
    """``dpdk-testpmd`` as a virtio-user net *frontend* (``net_virtio_user0``) of the vhost-user
    socket *backend_socket*: DPDK's own virtio driver, the yardstick for the guest net model.
    ``vdev_args`` adds devargs (``packed_vq=1`` for packed rings)."""

    def __init__(self, workdir: StrPath, backend_socket: StrPath, **kwargs) -> None:
        kwargs.setdefault("name", "virtio-user")
        kwargs.setdefault("warmup", False)
        super().__init__(workdir, **kwargs)
        self.backend_socket = os.fspath(backend_socket)
        if "," in self.backend_socket:
            raise ArgumentError(f"DPDK devargs cannot carry a ',' in the socket path: {self.backend_socket}")

    def argv(self) -> list[str]:
        vdev = f"net_virtio_user0,path={self.backend_socket},queues={self.queues}"
        argv = super().argv()
        argv[argv.index("--vdev") + 1] = vdev + ("," + self.vdev_args if self.vdev_args else "")
        return argv

    def _prepare(self) -> None:
        pass

    def _launch(self, deadline: float) -> None:
        self._spawn(self.argv(), stdin=subprocess.PIPE)
        self._wait_until("'testpmd>' prompt", lambda: _PROMPT in self.log_path.read_bytes(), deadline)

    def _cleanup(self) -> None:
        pass


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
