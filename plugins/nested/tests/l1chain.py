"""The nested chain for the tests: L2 driver -> L1 device -> L1Backend -> L0 device -> a real backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.guest.transport import PciGuestTransport
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.shadow import StopDialect
from shadowvmm.virtio.constants import Status
from shadowvmm_nested import L1Backend, LowerDevice

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


@asynccontextmanager
async def nested_chain(backend: str = "inproc", config: dict[str, Any] | None = None, *,
                       transport: str = "pci", packed: bool = False,
                       iommu_wrapper: Any = None) -> AsyncIterator[Chain]:
    """An L0 machine whose device vblk0 has *backend*; L1 runs an L2 whose blk0 is backed by it."""
    l0 = Machine(L0_MEMORY)
    l2_memory: GuestMemory | None = None
    l1: Machine | None = None
    try:
        await l0.add_device(DeviceConfig("vblk0", backend, config or {"device": "blk"},
                                         stop_dialect=StopDialect.SUSPEND))
        pci = l0.guest_transport("vblk0")
        assert isinstance(pci, PciGuestTransport)
        interrupts = l0.device("vblk0").interrupts
        assert interrupts is not None
        lower = LowerDevice.pci(pci, interrupts, name="l0-vblk0")
        iommu = l0.iommu("vblk0") if iommu_wrapper is None else iommu_wrapper(l0.iommu("vblk0"))
        l1_backend = L1Backend(lower, iommu)
        l2_memory = GuestMemory.alias(l0.memory, [(0, L2_BASE, L2_SIZE)], name="l2")
        l1 = Machine(memory=l2_memory)
        device = await l1.add_device(DeviceConfig("blk0", "l1", {}, transport=transport), backend=l1_backend)
        driver = BlkDriver(l1.guest("blk0"))
        await driver.start(packed=packed)
        yield Chain(l0, l1, l2_memory, lower, l1_backend, device, driver)
    finally:
        if l1 is not None:
            await l1.close()
        if l2_memory is not None:
            l2_memory.close()
        await l0.close()
