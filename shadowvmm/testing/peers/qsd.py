"""``qemu-storage-daemon`` exporting vhost-user-blk (:class:`QsdBlk`)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any, Final

from shadowvmm.errors import ArgumentError, PeerCommandError, PeerStartError

from .probe import StrPath, check_socket_path, clear_stale_socket
from .process import Peer, find_peer
from .qmp import Qmp, keyval, qemu_opt


class QsdBlk(Peer):
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
            check_socket_path(path)
        self.command_timeout = command_timeout
        self.iops = iops
        self._qmp: Qmp | None = None
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
            node = f"driver=file,node-name={self.node_name},filename={qemu_opt(self.image)},cache.direct=off"
        else:
            node = (
                f"driver=qcow2,node-name={self.node_name},file.driver=file,"
                f"file.filename={qemu_opt(self.image)},file.cache.direct=off"
            )
        argv = [self.binary]
        if self.iops is not None:
            # a slow disk: the exported node throttles the image node to *iops* requests/s
            base = node.replace(f"node-name={self.node_name}", f"node-name={self.node_name}-disk", 1)
            argv += ["--object", f"throttle-group,id=tg0,x-iops-total={self.iops}", "--blockdev", base]
            node = f"driver=throttle,node-name={self.node_name},throttle-group=tg0,file={self.node_name}-disk"
        argv += ["--blockdev", node]
        for i in range(len(self.socket_paths)):
            argv += ["--export", keyval(self.export_options(i))]
        if self.qmp_path is not None:
            argv += [
                "--chardev",
                f"socket,id=qmp0,path={qemu_opt(self.qmp_path)},server=on,wait=off",
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
            self._qmp = Qmp(self.qmp_path, self.command_timeout)
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
            clear_stale_socket(path)
        if self.qmp_path is not None:
            clear_stale_socket(self.qmp_path)

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
