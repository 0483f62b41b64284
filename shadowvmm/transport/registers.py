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

    def read(self, offset: int, width: int) -> int:
        reg = self.by_offset.get(offset)
        if reg is None:
            self.faults(GuestFault.UNKNOWN_OFFSET, f"{self.name} read {offset:#x}")
            return 0
        if width != reg.width:
            self.faults(GuestFault.BAD_WIDTH, f"{self.name}.{reg.name} read width {width}")
            return 0
        if reg.read is None:
            self.faults(GuestFault.WRITE_ONLY, f"{self.name}.{reg.name}")
            return 0
        return reg.read()

    def write(self, offset: int, width: int, value: int) -> None:
        reg = self.by_offset.get(offset)
        if reg is None:
            self.faults(GuestFault.UNKNOWN_OFFSET, f"{self.name} write {offset:#x}")
            return
        if width != reg.width:
            self.faults(GuestFault.BAD_WIDTH, f"{self.name}.{reg.name} write width {width}")
            return
        if reg.write is None:
            self.faults(GuestFault.READ_ONLY, f"{self.name}.{reg.name}")
            return
        reg.write(int(value) & ((1 << (8 * width)) - 1))
