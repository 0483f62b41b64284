"""The ``[[peer]]`` tables of a config, started for one command (:class:`StartedPeers`).

A peer of kind ``qemu-storage-daemon`` serves one block node (an image file, created sparse
in the peer's work directory unless ``image`` names one, or ``null-co``) with two
vhost-user-blk exports per device that names it: the device's own (role 0) and one for a
migration destination on the same node (role 1). ``virtiofsd`` serves one session per
process: two are started per device on the one shared directory (``source``, or a new empty
one). ``dpdk-testpmd`` runs in io mode (every frame echoed back) with one vhost port, for one
device and no destination. :meth:`StartedPeers.device` gives a device
config whose ``backend_config.socket`` is the export of the role asked for.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Protocol

from ..config import DeviceConfig, MachineConfig, PeerConfig
from ..device import VirtioDevice
from ..errors import ConfigError
from ..machine import Machine
from ..testing.peers import DpdkTestpmd, QsdBlk, Virtiofsd, find_peer

#: Exports per device on its peer: the source's and a migration destination's.
ROLES = 2


class PeerSource(Protocol):
    """Where a scenario's device gets its backend: entered for the run, asked once per machine."""

    def __enter__(self) -> PeerSource: ...

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    async def add(self, machine: Machine, device: DeviceConfig, role: int) -> VirtioDevice:
        """Add *device* to *machine* (role 0: the source, 1: a migration destination)."""
        ...


class StartedPeers:
    """Every peer of *cfg*, started on entry and stopped (work directories removed) on exit."""

    def __init__(self, cfg: MachineConfig) -> None:
        self.cfg = cfg
        self.workdir: Path | None = None
        self._stack = contextlib.ExitStack()
        self.sockets: dict[str, list[Path]] = {}

    def __enter__(self) -> StartedPeers:
        if not self.cfg.peers:
            return self
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix="shadowvmm-peers-"))
            self._stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
            for index, peer in enumerate(self.cfg.peers):
                self.sockets[peer.name] = self._start(index, peer)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()

    def _start(self, index: int, peer: PeerConfig) -> list[Path]:
        assert self.workdir is not None
        users = [d for d in self.cfg.devices if d.peer == peer.name]
        if not users:
            return []
        workdir = self.workdir / peer.name
        workdir.mkdir()
        return self._STARTERS[peer.kind](self, index, peer, workdir, len(users))

    def _qsd(self, index: int, peer: PeerConfig, workdir: Path, users: int) -> list[Path]:
        image: Path | None = None
        if peer.driver == "file":
            image = Path(peer.image) if peer.image else workdir / "disk.img"
            if peer.image and not image.is_file():
                raise self.cfg.error(f"peer[{index}].image", f"{image}: no such file")
        qsd = QsdBlk(workdir, image=image, size=peer.size, create=image is not None and not peer.image,
                     num_queues=peer.num_queues, exports=ROLES * users, name="qsd",
                     binary=find_peer("qemu-storage-daemon"))
        self._stack.enter_context(qsd)
        return list(qsd.socket_paths)

    def _virtiofsd(self, index: int, peer: PeerConfig, workdir: Path, users: int) -> list[Path]:
        """One virtiofsd per session (it serves one, then exits): ROLES per device, one shared directory."""
        source = Path(peer.source) if peer.source else workdir / "share"
        if peer.source and not source.is_dir():
            raise self.cfg.error(f"peer[{index}].source", f"{source}: no such directory")
        source.mkdir(exist_ok=True)
        binary = find_peer("virtiofsd")
        return [self._stack.enter_context(Virtiofsd(workdir, source=source, binary=binary)).socket_path
                for _ in range(ROLES * users)]

    def _testpmd(self, index: int, peer: PeerConfig, workdir: Path, users: int) -> list[Path]:
        """dpdk-testpmd in io mode, forwarding: its one port echoes every frame back. One
        device session at a time (one vhost port): no migration destination export."""
        if users > 1:
            raise self.cfg.error(f"peer[{index}]", f"dpdk-testpmd peer {peer.name!r} has one vhost port: "
                                                   f"one device may name it, {users} do")
        pmd = self._stack.enter_context(DpdkTestpmd(workdir, forward_mode="io", queues=peer.num_queues,
                                                    binary=find_peer("dpdk-testpmd")))
        pmd.start_forwarding()
        return [pmd.socket_path]

    _STARTERS = {"qemu-storage-daemon": _qsd, "virtiofsd": _virtiofsd, "dpdk-testpmd": _testpmd}

    async def add(self, machine: Machine, device: DeviceConfig, role: int) -> VirtioDevice:
        return await machine.add_device(self.device(device, role))

    def device(self, device: DeviceConfig, role: int = 0) -> DeviceConfig:
        """*device* with its peer's socket for *role* (0: itself, 1: a migration destination)."""
        if not device.peer:
            return device
        users = [d.name for d in self.cfg.devices if d.peer == device.peer]
        sockets = self.sockets.get(device.peer)
        if not sockets:
            raise ConfigError("peer", f"peer {device.peer!r} of {device.name} was not started", self.cfg.source)
        slot = ROLES * users.index(device.name) + role if len(sockets) > 1 else role
        if slot >= len(sockets):
            raise ConfigError("peer", f"peer {device.peer!r} serves {device.name} one session: "
                                      "it has no export for a migration destination", self.cfg.source)
        socket = sockets[slot]
        return replace(device, backend_config={**device.backend_config, "socket": str(socket)})
