"""A device's DMA address space as an IOMMU gives it: a table of IOVA -> guest-physical ranges.

:class:`DmaMap` stands in for the vIOMMU a nested stack uses (virtio-iommu ATTACH, MAP and
UNMAP requests, v1.4 §5.13.6; or intel-iommu second-level tables and their IOTLB
invalidations, forwarded to vhost as IOTLB updates): the driver that owns the device (an L1
hypervisor driving the device it was given) programs it by method calls instead of requests
on an IOMMU's virtqueue. Unattached (no mapping) the device is in bypass: its DMA addresses
are guest-physical. With mappings, its DMA addresses are the IOVAs: the device sees
:meth:`~shadowvmm.memory.GuestMemory.alias` of the guest memory, so its own ring handling and
the memory table its backend gets (regions at the IOVAs, backed by the guest memfd at the
mapped offsets) both use it, and nothing is copied.

Every change replaces the device's DMA space through its ordered worker
(:meth:`~.frontend.VirtioDevice.set_dma_space`), which accepts it only while the rings do
not run (:class:`~shadowvmm.errors.DmaSpaceError` otherwise): a table that is refused leaves
the previous one in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import ArgumentError
from ..memory import PAGE_SIZE, GuestMemory


class DmaDevice(Protocol):
    """What a :class:`DmaMap` needs of its device."""

    name: str

    async def set_dma_space(self, memory: GuestMemory) -> None: ...


@dataclass(frozen=True, slots=True)
class DmaMapping:
    """One IOVA range and the guest-physical range it maps (virtio-iommu MAP: virt_start,
    phys_start and the range's size, v1.4 §5.13.6.6)."""

    iova: int
    gpa: int
    size: int

    def validate(self) -> None:
        if self.size <= 0 or (self.iova | self.gpa | self.size) % PAGE_SIZE:
            raise ArgumentError(f"DMA mapping iova {self.iova:#x} -> gpa {self.gpa:#x} size {self.size:#x}: "
                                "page multiples wanted")

    @property
    def end(self) -> int:
        return self.iova + self.size


class DmaMap:
    """The IOMMU translation of one device (module docstring)."""

    def __init__(self, device: DmaDevice, memory: GuestMemory) -> None:
        """*memory* is the guest memory the IOVAs map into (the device's machine keeps it)."""
        self.device = device
        self.memory = memory
        self.mappings: list[DmaMapping] = []
        self._space: GuestMemory | None = None
        #: How many changes the device accepted.
        self.changes = 0

    @property
    def translated(self) -> bool:
        """Whether the device's DMA addresses are IOVAs (False: bypass, guest-physical)."""
        return self._space is not None

    async def map(self, iova: int, gpa: int, size: int) -> None:
        """Map ``[iova, iova+size)`` to ``[gpa, gpa+size)`` (virtio-iommu MAP)."""
        mapping = DmaMapping(iova, gpa, size)
        mapping.validate()
        for other in self.mappings:
            if mapping.iova < other.end and other.iova < mapping.end:
                raise ArgumentError(f"{self.device.name}: IOVA {iova:#x}+{size:#x} overlaps a mapping")
        await self._apply([*self.mappings, mapping])

    async def unmap(self, iova: int, size: int) -> None:
        """Unmap the mappings wholly inside ``[iova, iova+size)`` (virtio-iommu UNMAP: a
        mapping is never split, §5.13.6.7); the last one unmapped leaves the device in bypass."""
        kept = [m for m in self.mappings if not (iova <= m.iova and m.end <= iova + size)]
        if len(kept) != len(self.mappings):
            await self._apply(kept)

    async def program(self, mappings: list[DmaMapping]) -> None:
        """Replace the whole table at once (an empty one: bypass)."""
        for mapping in mappings:
            mapping.validate()
        if mappings != self.mappings:
            await self._apply(list(mappings))

    async def _apply(self, mappings: list[DmaMapping]) -> None:
        space = None
        if mappings:
            layout = [(m.iova, m.gpa, m.size) for m in sorted(mappings, key=lambda m: m.iova)]
            space = GuestMemory.alias(self.memory, layout, name=f"{self.device.name}-iova")
        try:
            await self.device.set_dma_space(self.memory if space is None else space)
        except BaseException:
            if space is not None:
                space.close()
            raise
        old, self._space = self._space, space
        self.mappings = mappings
        self.changes += 1
        if old is not None:
            old.close()

    def close(self) -> None:
        """Release the IOVA space's mappings (the device is closed first)."""
        if self._space is not None:
            self._space.close()
            self._space = None
