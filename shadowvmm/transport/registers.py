"""Register files as data: (offset, width, name, access, handler) tables.

A :class:`RegisterFile` dispatches an access by offset through a dict built
from its table once. Every refused access (unknown offset, wrong width, write
to a read-only or read of a write-only register) is ignored, counted and
logged through the device's :class:`~shadowvmm.shadow.FaultCounter`; reads
of refused accesses return 0. Nothing a guest does raises.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ArgumentError
from ..shadow import FaultCounter, GuestFault

Reader = Callable[[], int]
Writer = Callable[[int], None]

#: The value mask of a bus access of each width a transport accepts.
WIDTH_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class Access(enum.Flag):
    R = enum.auto()
    W = enum.auto()
    RW = R | W


@dataclass(frozen=True, slots=True)
class Register:
    offset: int
    width: int
    name: str
    access: Access
    read: Reader | None = None
    write: Writer | None = None


class RegisterFile:
    """Offset-indexed dispatch over a register table."""

    def __init__(self, name: str, table: list[Register], faults: FaultCounter) -> None:
        self.name = name
        self.table = table
        self.faults = faults
        self.by_offset: dict[int, Register] = {}
        for reg in table:
            if reg.offset in self.by_offset:
                raise ArgumentError(f"{name}: two registers at {reg.offset:#x}")
            if reg.access & Access.R and reg.read is None or reg.access & Access.W and reg.write is None:
                raise ArgumentError(f"{name}.{reg.name}: handler missing for its access")
            self.by_offset[reg.offset] = reg
        #: the accepted accesses by offset: (width, handler), and for writes the value mask
        self._readers = {r.offset: (r.width, r.read) for r in table if r.read is not None}
        self._writers = {r.offset: (r.width, r.write, (1 << 8 * r.width) - 1) for r in table if r.write is not None}

    def read(self, offset: int, width: int) -> int:
        entry = self._readers.get(offset)
        if entry is not None and entry[0] == width:
            return entry[1]()
        reg = self.by_offset.get(offset)
        if reg is None:
            self.faults(GuestFault.UNKNOWN_OFFSET, f"{self.name} read {offset:#x}")
        elif width != reg.width:
            self.faults(GuestFault.BAD_WIDTH, f"{self.name}.{reg.name} read width {width}")
        else:
            self.faults(GuestFault.WRITE_ONLY, f"{self.name}.{reg.name}")
        return 0

    def write(self, offset: int, width: int, value: int) -> None:
        """*value* is an int (the transports make it one); it is truncated to the register."""
        entry = self._writers.get(offset)
        if entry is not None and entry[0] == width:
            entry[1](value & entry[2])
            return
        reg = self.by_offset.get(offset)
        if reg is None:
            self.faults(GuestFault.UNKNOWN_OFFSET, f"{self.name} write {offset:#x}")
        elif width != reg.width:
            self.faults(GuestFault.BAD_WIDTH, f"{self.name}.{reg.name} write width {width}")
        else:
            self.faults(GuestFault.READ_ONLY, f"{self.name}.{reg.name}")
