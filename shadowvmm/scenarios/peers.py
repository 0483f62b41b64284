"""The ``[[peer]]`` tables of a config, started for one command (:class:`StartedPeers`).

A peer of kind ``qemu-storage-daemon`` serves one block node (an image file, created sparse
in the peer's work directory unless ``image`` names one, or ``null-co``) with two
vhost-user-blk exports per device that names it: the device's own (role 0) and one for a
migration destination on the same node (role 1). :meth:`StartedPeers.device` gives a device
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
from ..testing.peers import QsdBlk, find_peer

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
        image: Path | None = None
        if peer.driver == "file":
            image = Path(peer.image) if peer.image else workdir / "disk.img"
            if peer.image and not image.is_file():
                raise self.cfg.error(f"peer[{index}].image", f"{image}: no such file")
        qsd = QsdBlk(workdir, image=image, size=peer.size, create=image is not None and not peer.image,
                     num_queues=peer.num_queues, exports=ROLES * len(users), name="qsd",
                     binary=find_peer("qemu-storage-daemon"))
        self._stack.enter_context(qsd)
        return list(qsd.socket_paths)

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
        socket = sockets[ROLES * users.index(device.name) + role]
        return replace(device, backend_config={**device.backend_config, "socket": str(socket)})
