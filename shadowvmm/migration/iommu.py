"""The IOMMU tables of a migrating machine's devices: the stream's IOMMU record.

A device whose driver programmed its IOMMU (:class:`~shadowvmm.device.DmaMap`: an L1
hypervisor maps IOVA = L2 guest-physical -> L1 guest-physical) does DMA at IOVAs, and the
ring addresses in its state are IOVAs. The destination must translate them the same way
before it checks or starts anything, so the source sends every non-empty table in one
IOMMU record after the stop and before the device states, and the destination programs its
own devices' tables on receipt: the order QEMU gives a vIOMMU's state (``MIG_PRI_IOMMU``,
loaded before the devices it translates for). A machine whose devices are all in bypass
sends no IOMMU record, so its stream is unchanged.

Wire format (msgpack map): ``{"devices": {name: [[iova, gpa, size], ...]}}``, each mapping
a virtio-iommu MAP (v1.4 §5.13.6.6: virt_start, phys_start, the size).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..device import DmaMapping
from ..errors import ArgumentError, MigrationError, ShadowVmmError, StreamError
from .options import MachineLike
from .stream import Record, pack_map

log = logging.getLogger(__name__)

_MAX_MAPPINGS = 4096


@dataclass(frozen=True)
class IommuTables:
    """Each device's IOMMU table by name (devices in bypass are absent)."""

    tables: Mapping[str, tuple[DmaMapping, ...]]

    @classmethod
    def of(cls, machine: MachineLike) -> IommuTables:
        return cls({name: tuple(slot.iommu.mappings) for name, slot in machine.slots.items() if slot.iommu.mappings})

    def pack(self) -> bytes:
        return pack_map({"devices": {name: [[m.iova, m.gpa, m.size] for m in table]
                                     for name, table in self.tables.items()}})

    @classmethod
    def unpack(cls, record: Record) -> IommuTables:
        """Decode and :meth:`validate` an IOMMU record (:class:`StreamError` if malformed)."""
        devices: Any = record.decode().get("devices")
        if not isinstance(devices, dict):
            raise StreamError("IOMMU record: no device map")
        tables: dict[str, tuple[DmaMapping, ...]] = {}
        for name, rows in devices.items():
            if not isinstance(name, str) or not isinstance(rows, list) or not 0 < len(rows) <= _MAX_MAPPINGS:
                raise StreamError(f"IOMMU record: bad table for {name!r}")
            if not all(isinstance(r, list) and len(r) == 3 and all(type(v) is int for v in r) for r in rows):
                raise StreamError(f"IOMMU record: {name}: a mapping is not three integers")
            tables[name] = tuple(DmaMapping(*row) for row in rows)
        result = cls(tables)
        result.validate()
        return result

    def validate(self) -> None:
        """Page-aligned, non-empty, non-overlapping IOVA ranges (as :meth:`DmaMap.map` requires)."""
        for name, table in self.tables.items():
            try:
                for mapping in table:
                    mapping.validate()
            except ArgumentError as exc:
                raise StreamError(f"IOMMU record: {name}: {exc}") from None
            ordered = sorted(table, key=lambda m: m.iova)
            for before, after in zip(ordered, ordered[1:]):
                if after.iova < before.end:
                    raise StreamError(f"IOMMU record: {name}: IOVA {after.iova:#x} overlaps a mapping")

    async def apply(self, machine: MachineLike) -> None:
        """Program the destination's tables; a device it does not have is a refusal."""
        unknown = sorted(set(self.tables) - set(machine.slots))
        if unknown:
            raise MigrationError(f"IOMMU record names devices the destination does not have: {unknown}")
        for name, table in self.tables.items():
            await machine.slots[name].iommu.program(list(table))
        log.info("IOMMU tables applied: %s", {name: len(table) for name, table in self.tables.items()})


async def unmap_all(machine: MachineLike) -> None:
    """A failed incoming migration puts every destination device back in bypass."""
    for name, slot in machine.slots.items():
        try:
            await slot.iommu.program([])
        except (ShadowVmmError, OSError) as exc:
            log.error("%s: unmapping the IOMMU table after a failed migration: %s", name, exc)
