"""A device's DMA space (its IOMMU translation, shadowvmm.device.dma): changed through the worker,
only while the rings do not run; a refused change is the caller's error, never the device's."""

from __future__ import annotations

import pytest

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.device import DmaMapping
from shadowvmm.errors import ArgumentError, DmaSpaceError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.shadow import RunState

MiB = 1 << 20
MEMORY = 32 * MiB


async def make(latency_us: int = 0) -> tuple[Machine, BlkDriver]:
    machine = Machine(MEMORY)
    await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "latency_us": latency_us}))
    return machine, BlkDriver(machine.guest("blk0"))


async def test_mapping_before_driver_ok_makes_the_iova_space_the_device_memory() -> None:
    machine, _ = await make()
    device, iommu = machine.device("blk0"), machine.iommu("blk0")
    try:
        assert not iommu.translated and device.memory is machine.memory
        await iommu.map(0, 8 * MiB, 4 * MiB)
        await iommu.map(16 * MiB, 0x10000, MiB)
        assert iommu.translated and iommu.changes == 2
        assert [(r.gpa, r.parent_gpa, r.size) for r in device.memory] == [(0, 8 * MiB, 4 * MiB),
                                                                          (16 * MiB, 0x10000, MiB)]
        machine.memory.write(8 * MiB + 0x40, b"iova")
        assert device.memory.read(0x40, 4) == b"iova"
        with pytest.raises(ArgumentError):
            await iommu.map(MiB, 0, MiB)                # overlaps the first mapping
        with pytest.raises(ArgumentError):
            await iommu.map(32 * MiB, 0x800, 0x1000)    # not page aligned
        await iommu.unmap(0, 16 * MiB)
        assert iommu.mappings == [DmaMapping(16 * MiB, 0x10000, MiB)]
        await iommu.unmap(0, 64 * MiB)
        assert not iommu.translated and device.memory is machine.memory and iommu.changes == 4
    finally:
        await machine.close()


async def test_change_while_running_is_refused_and_the_device_keeps_running() -> None:
    machine, driver = await make()
    device, iommu = machine.device("blk0"), machine.iommu("blk0")
    try:
        await driver.start()
        await driver.write(0, b"\x11" * 512)
        with pytest.raises(DmaSpaceError, match="rings run"):
            await iommu.map(0, 0, MEMORY)
        assert iommu.mappings == [] and iommu.changes == 0 and device.memory is machine.memory
        assert device.run_state is RunState.RUNNING and not device.failed()
        assert await driver.read(0, 512) == b"\x11" * 512
        # after the guest's reset the change is allowed again
        await driver.dev.reset()
        await iommu.map(0, 0, MEMORY)
        assert iommu.translated
    finally:
        await machine.close()


async def test_change_while_stopped_restarts_the_backend_from_the_captured_rings() -> None:
    """An identity IOVA space set while the VMM holds the device stopped: the resume is a full
    restart (backend reset, new memory table, rings from their captured bases); no request is
    lost or repeated."""
    machine, driver = await make()
    device, iommu = machine.device("blk0"), machine.iommu("blk0")
    backend = device.backend
    assert isinstance(backend, InProcBackend)
    try:
        await driver.start()
        for sector in range(5):
            await driver.write(sector, bytes([sector]) * 512)
        states = await device.stop()
        assert [s.base for s in states] == [5]
        await iommu.map(0, 0, MEMORY)
        await device.resume()
        assert backend.memory is device.memory and backend.memory is not machine.memory
        await driver.write(5, b"\x05" * 512)
        assert [await driver.read(s, 512) for s in range(6)] == [bytes([s]) * 512 for s in range(6)]
        assert backend.requests == 12 and driver.dev.queues[0].completed == 12
    finally:
        await machine.close()
