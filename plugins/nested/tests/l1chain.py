"""The nested chain for the tests: L2 driver -> L1 device -> L1Backend -> L0 device -> a real backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest.admin import AdminClient
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.guest.transport import PciGuestTransport
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.shadow import StopDialect
from shadowvmm.timeline import Timeline
from shadowvmm.virtio.constants import Status
from shadowvmm_nested import AdminPath, L1Backend, LowerDevice, RingStatePath, StopPath, SuspendPath

MiB = 1 << 20
L0_MEMORY = 48 * MiB
#: L2's RAM: L2 GPA [0, 12 MiB) is L1 GPA [L2_BASE, L2_BASE + 12 MiB).
L2_BASE = 20 * MiB
L2_SIZE = 12 * MiB
LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)


@dataclass
class Chain:
    l0: Machine
    l1: Machine
    l2_memory: GuestMemory
    lower: LowerDevice
    backend: L1Backend
    device: VirtioDevice
    driver: BlkDriver
    #: The move's destination (``second=`` of :func:`nested_chain`), and the stop path.
    lower2: LowerDevice | None = None
    path: StopPath | None = None

    @property
    def l0_device(self) -> VirtioDevice:
        return self.l0.device("vblk0")

    async def add_lower(self, name: str, backend: str, config: dict[str, Any]) -> LowerDevice:
        """Another L0 device with the SUSPEND dialect, seen from L1."""
        await self.l0.add_device(DeviceConfig(name, backend, config, stop_dialect=StopDialect.SUSPEND))
        transport = self.l0.guest_transport(name)
        assert isinstance(transport, PciGuestTransport)
        interrupts = self.l0.device(name).interrupts
        assert interrupts is not None
        return LowerDevice.pci(transport, interrupts, name=f"l0-{name}")


#: The L0 device config each stop path needs (docs/nested.md): SUSPEND; STOP with the
#: ring-state registers (bits 44 and 45); none at all for the admin queue's members.
DIALECTS: dict[str, dict[str, Any]] = {
    "suspend": {"stop_dialect": StopDialect.SUSPEND},
    "ring-state": {"stop_dialect": StopDialect.STOP, "stop_feature_bit": 44, "ring_state": True},
    "admin": {"stop_dialect": StopDialect.NONE},
}


def lower_of(l0: Machine, name: str) -> LowerDevice:
    """L0's device *name* as L1 sees it."""
    pci = l0.guest_transport(name)
    assert isinstance(pci, PciGuestTransport)
    interrupts = l0.device(name).interrupts
    assert interrupts is not None
    return LowerDevice.pci(pci, interrupts, name=f"l0-{name}")


async def make_path(l0: Machine, path: str, timeline: Timeline | None) -> StopPath:
    """The L1's stop path; for ``admin`` an AdminClient on L0's owner device (started)."""
    if path == "ring-state":
        return RingStatePath(44, tap=None if timeline is None else timeline.tap("L1", "blk0"))
    if path == "admin":
        client = AdminClient(l0.guest("owner"))
        await client.start()
        await client.list_use()
        return AdminPath(client, {"l0-vblk0": 1, "l0-vblk1": 2},
                         tap=None if timeline is None else timeline.tap("L1", "owner"))
    return SuspendPath()


@asynccontextmanager
async def nested_chain(backend: str = "inproc", config: dict[str, Any] | None = None, *,
                       transport: str = "pci", packed: bool = False,
                       iommu_wrapper: Any = None, path: str = "suspend",
                       second: dict[str, Any] | None = None, timeline: Timeline | None = None,
                       l2_queue_size: int = 256) -> AsyncIterator[Chain]:
    """An L0 machine whose device vblk0 has *backend*; L1 runs an L2 whose blk0 is backed by it.

    *path* picks the stop path and the L0 devices' dialect (:data:`DIALECTS`); *second* adds
    vblk1 (same backend, this config) as a move destination; with ``admin`` an owner device
    (rng) whose members are vblk0 and vblk1 comes first."""
    l0 = Machine(L0_MEMORY, timeline=timeline, level="L0")
    l2_memory: GuestMemory | None = None
    l1: Machine | None = None
    try:
        names = ("vblk0", "vblk1") if second is not None else ("vblk0",)
        if path == "admin":
            await l0.add_device(DeviceConfig("owner", "inproc", {"device": "rng"}, admin_members=names))
        for name, cfg in zip(names, (config or {"device": "blk"}, second), strict=False):
            await l0.add_device(DeviceConfig(name, backend, cfg, **DIALECTS[path]))
        lower = lower_of(l0, "vblk0")
        iommu = l0.iommu("vblk0") if iommu_wrapper is None else iommu_wrapper(l0.iommu("vblk0"))
        stop_path = await make_path(l0, path, timeline)
        l1_backend = L1Backend(lower, iommu, stop_path=stop_path)
        l2_memory = GuestMemory.alias(l0.memory, [(0, L2_BASE, L2_SIZE)], name="l2")
        l1 = Machine(memory=l2_memory, timeline=timeline, level="L1")
        device = await l1.add_device(DeviceConfig("blk0", "l1", {}, transport=transport), backend=l1_backend)
        driver = BlkDriver(l1.guest("blk0"))
        await driver.start(packed=packed, queue_size=l2_queue_size)
        lower2 = lower_of(l0, "vblk1") if second is not None else None
        yield Chain(l0, l1, l2_memory, lower, l1_backend, device, driver, lower2, stop_path)
    finally:
        if l1 is not None:
            await l1.close()
        if l2_memory is not None:
            l2_memory.close()
        await l0.close()
