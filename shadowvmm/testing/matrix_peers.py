"""The matrix's columns as running peers (:mod:`shadowvmm.testing.matrix`): one per backend, for
the host matrix's built-in rows (``tests/test_nested_matrix.py``) and the nested rows
(``plugins/nested/tests/test_nested_matrix_rows.py``).

:func:`open_source` starts a column's peer (on an ExitStack) as a
:class:`~shadowvmm.scenarios.peers.PeerSource`: role 0 the source's endpoint, role 1 a
destination's (a migration's, or the L0 device an L1 moves its L2's device to).
:func:`device_config` is a cell's device: its backend and the stop dialect its path offers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from ..config import DeviceConfig
from ..device import VirtioDevice
from ..machine import Machine
from ..shadow import StopDialect
from ..virtio.constants import NetFeature
from ..virtio.devcfg import FS_CONFIG_BASE_SIZE, NET_CONFIG_BASE_SIZE, FsConfig, NetConfig, NetStatus
from .matrix import BackendKind, Cell, StopPath
from .peers import DpdkTestpmd, QsdBlk, RefBlk, Virtiofsd
from .plugin import require_peer

MAC = NetConfig.parse_mac("52:54:00:4d:41:54")
FS_TAG = "matrix"
IMAGE_BYTES = 16 << 20
#: testpmd retries a frame the guest's device cannot take (its rings stopped for a move or a
#: migration, or no receive buffer yet) for up to 200 ms instead of dropping it: a lossless
#: wire, so every frame the guest sent comes back once (testpmd's ``io retry`` mode).
TX_RETRY_DELAY_US, TX_RETRIES = 1000, 200
#: The stop dialect each stop path's device offers (the admin path's members offer none).
DIALECTS = {StopPath.SUSPEND: StopDialect.SUSPEND, StopPath.STOP: StopDialect.STOP, StopPath.ADMIN: StopDialect.NONE}


@dataclass
class Sockets:
    """A running peer's vhost-user sockets (role 0 the source's, 1 the destination's)."""

    device: str
    sockets: tuple[Path, Path]
    config: bytes | None = None
    vmm_features: int = 0

    def __enter__(self) -> Sockets:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    async def add(self, machine: Machine, device: DeviceConfig, role: int) -> VirtioDevice:
        cfg = replace(device, vmm_features=self.vmm_features,
                      backend_config={**device.backend_config, "socket": str(self.sockets[role])})
        return await machine.add_device(cfg, config_override=self.config)


class FreshVirtiofsd:
    """virtiofsd serves one session per process: one started per device, all stopped at the end."""

    def __init__(self, workdir: Path, share: Path, binary: str) -> None:
        self.workdir, self.share, self.binary = workdir, share, binary
        self.device = "fs"
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FreshVirtiofsd:
        self._stack = contextlib.ExitStack()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    async def add(self, machine: Machine, device: DeviceConfig, role: int) -> VirtioDevice:
        peer = self._stack.enter_context(Virtiofsd(self.workdir, source=self.share, binary=self.binary))
        cfg = replace(device, backend_config={**device.backend_config, "socket": str(peer.socket_path)})
        return await machine.add_device(cfg, config_override=FsConfig(FS_TAG).pack(FS_CONFIG_BASE_SIZE))


@dataclass
class Source:
    """A column's backend: where the device connects, its device type, testpmd for its counters."""

    backend: BackendKind
    peers: Sockets | FreshVirtiofsd | None
    kind: str = "blk"
    testpmd: DpdkTestpmd | None = None

    def clear_stats(self) -> None:
        if self.testpmd is not None:
            self.testpmd.clear_stats()

    def port_stats(self) -> tuple[int, int]:
        """testpmd's RX and TX packets on its port."""
        assert self.testpmd is not None
        stats = self.testpmd.port_stats()[0]
        return stats["RX-packets"], stats["TX-packets"]


def _testpmd(stack: contextlib.ExitStack, workdir: Path, name: str) -> DpdkTestpmd:
    pmd = stack.enter_context(DpdkTestpmd(workdir, forward_mode="io", binary=require_peer("dpdk-testpmd"),
                                          name=name))
    pmd.command("set fwd io retry")
    pmd.command(f"set burst tx delay {TX_RETRY_DELAY_US} retry {TX_RETRIES}")
    pmd.start_forwarding()
    return pmd


def open_source(stack: contextlib.ExitStack, backend: BackendKind, workdir: Path) -> Source:
    """Start *backend*'s peer on *stack*. testpmd serves both roles on its one port (as a switch
    port that follows the device): a frame in flight when the source stops is retried and then
    delivered to the destination, where a second process would drop it."""
    if backend is BackendKind.INPROC_BLK:
        return Source(backend, None)
    if backend is BackendKind.REFBLK:           # two back-ends on one image: source's, destination's
        src = stack.enter_context(RefBlk(workdir, size=IMAGE_BYTES, queues=2, name="ref-src"))
        dst = stack.enter_context(RefBlk(workdir, image=src.image, create=False, size=IMAGE_BYTES, queues=2,
                                         name="ref-dst"))
        return Source(backend, Sockets("blk", (src.socket_path, dst.socket_path)))
    if backend is BackendKind.QSD:              # one node, two exports
        qsd = stack.enter_context(QsdBlk(workdir, image=workdir / "qsd.img", size=IMAGE_BYTES, create=True,
                                         num_queues=2, exports=2, binary=require_peer("qemu-storage-daemon")))
        return Source(backend, Sockets("blk", (qsd.socket_paths[0], qsd.socket_paths[1])))
    if backend is BackendKind.VIRTIOFSD:
        share = workdir / "share"
        share.mkdir()
        return Source(backend, FreshVirtiofsd(workdir, share, require_peer("virtiofsd")), "fs")
    if backend is not BackendKind.TESTPMD:
        raise AssertionError(f"{backend.value} runs in the vDPA VM lane only")
    pmd = _testpmd(stack, workdir, "testpmd")
    config = NetConfig(mac=MAC, status=NetStatus.LINK_UP, max_virtqueue_pairs=1).pack(NET_CONFIG_BASE_SIZE)
    sockets = (pmd.socket_path, pmd.socket_path)
    return Source(backend, Sockets("net", sockets, config, int(NetFeature.MAC | NetFeature.STATUS)), "net", pmd)


def device_config(cell: Cell, workdir: Path, kind: str, name: str = "dev0") -> DeviceConfig:
    """The cell's device: its backend, and the stop dialect its path offers."""
    if cell.backend is BackendKind.INPROC_BLK:
        backend, options = "inproc", {"device": "blk", "image": str(workdir / "inproc.img"), "size": IMAGE_BYTES,
                                      "queues": 2}
    else:
        options = {"device": kind, "timeout": 5.0, **({"queues": 2} if kind != "fs" else {})}
        backend = "vhost-user"
    return DeviceConfig(name, backend, options, queue_size=64, stop_dialect=DIALECTS[cell.path], stop_feature_bit=44,
                        ring_state=cell.path is StopPath.STOP)
