"""L2 I/O through L1 -> L0 -> the in-process backend: data, address translation, guards."""

from __future__ import annotations

import asyncio

import pytest
from l1chain import L2_BASE, L2_SIZE, LIVE, MiB, nested_chain

from shadowvmm.backends.base import Capability, check_backend, load_backend
from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.device import DmaMap, DmaMapping
from shadowvmm.errors import ArgumentError, DmaSpaceError
from shadowvmm.virtio.constants import Status
from shadowvmm_nested import L1Backend, Phase


async def test_entry_point_and_contract() -> None:
    assert load_backend("l1") is L1Backend
    assert check_backend(L1Backend) == []
    with pytest.raises(ArgumentError, match="LowerDevice"):
        L1Backend({})
    async with nested_chain() as c:     # the entry point's form: one mapping of objects
        backend = load_backend("l1")({"lower": c.lower, "iommu": c.l0.iommu("vblk0")})
        assert isinstance(backend, L1Backend) and backend.implementation == "l1-block"


@pytest.mark.parametrize("transport,packed", [("pci", False), ("mmio", False), ("pci", True)])
async def test_l2_writes_and_reads_back_through_l1_and_l0(transport: str, packed: bool) -> None:
    async with nested_chain(transport=transport, packed=packed) as c:
        inner = c.l0_device.backend
        assert isinstance(inner, InProcBackend)
        blocks = {sector: bytes([sector % 251 + 1]) * 4096 for sector in (0, 8, 800, 16_000)}
        for sector, data in blocks.items():
            await c.driver.write(sector, data)
        for sector, data in blocks.items():
            assert await c.driver.read(sector, 4096) == data
            assert bytes(inner.model.image[sector * 512:sector * 512 + 4096]) == data   # on L0's disk
        assert inner.requests == 2 * len(blocks)
        assert c.backend.kicks >= 2 * len(blocks) and c.backend.interrupts >= 2 * len(blocks)
        assert c.driver.dev.transport.status_log.values[-1] == LIVE
        assert c.lower.status() == LIVE and c.backend.phase is Phase.RUNNING
        assert c.backend.capabilities() & (Capability.SUSPEND | Capability.RESUME)


async def test_l0_device_dma_uses_l2_addresses_through_the_iommu_table() -> None:
    """The L0 device and its backend see L2 guest-physical addresses (IOVAs) mapped onto L2's
    RAM inside L1's: L2's ring lies at L1 GPA L2_BASE + its L2 GPA, not at its L2 GPA."""
    async with nested_chain() as c:
        iommu = c.l0.iommu("vblk0")
        assert iommu.mappings == [DmaMapping(0, L2_BASE, L2_SIZE)]
        space = c.l0_device.memory
        assert [(r.gpa, r.parent_gpa, r.size, r.fd_offset) for r in space] == [(0, L2_BASE, L2_SIZE, L2_BASE)]
        inner = c.l0_device.backend
        assert isinstance(inner, InProcBackend) and inner.memory is space
        await c.driver.write(3, b"\xa5" * 512)
        used = c.driver.dev.queues[0].ring.layout.device
        assert c.l0.memory.load_u16(L2_BASE + used + 2) == 1         # L2's used idx, where L2 put it
        assert c.l2_memory.load_u16(used + 2) == 1
        assert c.l0.memory.load_u16(used + 2) == 0                   # not at the untranslated address


class ShiftedIommu:
    """A wrong IOMMU table: every IOVA mapped one page too far into L1 memory."""

    def __init__(self, real: DmaMap) -> None:
        self.real = real
        self.mappings: list[DmaMapping] = []

    async def program(self, mappings: list[DmaMapping]) -> None:
        self.mappings = mappings
        await self.real.program([DmaMapping(m.iova, m.gpa + 4096, m.size - 4096) for m in mappings])


async def test_a_wrong_iommu_table_makes_the_l0_backend_miss_l2s_request() -> None:
    """Proof that the translation is what makes it work: with every IOVA one page off, the L0
    backend reads other bytes than L2's ring, and L2's write never lands."""
    async with nested_chain(iommu_wrapper=ShiftedIommu) as c:
        inner = c.l0_device.backend
        assert isinstance(inner, InProcBackend)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.driver.write(0, b"\x5a" * 512), 0.3)
        assert bytes(inner.model.image[:512]) != b"\x5a" * 512
        await c.driver.dev.reset()


async def test_dma_space_change_while_the_l0_device_runs_is_refused() -> None:
    async with nested_chain() as c:
        iommu = c.l0.iommu("vblk0")
        before = list(iommu.mappings)
        with pytest.raises(DmaSpaceError, match="rings run"):
            await iommu.program([DmaMapping(0, 0, MiB)])
        with pytest.raises(DmaSpaceError):
            await iommu.unmap(0, L2_SIZE)
        assert iommu.mappings == before and not c.l0_device.failed()
        await c.driver.write(1, b"\x01" * 512)
        assert await c.driver.read(1, 512) == b"\x01" * 512


async def test_l2_reset_resets_l0_and_the_iommu_table_stays() -> None:
    async with nested_chain() as c:
        await c.driver.write(2, b"\x02" * 512)
        await c.driver.dev.reset()
        assert c.lower.status() == int(Status.ACKNOWLEDGE | Status.DRIVER)
        assert 0 in c.lower.writes and c.backend.phase is Phase.PROBED
        assert c.l0.iommu("vblk0").mappings == [DmaMapping(0, L2_BASE, L2_SIZE)]
        await c.driver.start()
        assert await c.driver.read(2, 512) == b"\x02" * 512
