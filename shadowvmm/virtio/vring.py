"""Ring addresses and a stopped ring's position: the vhost encodings (spec layer).

Both are plain values shared by the rings (:mod:`.split`, :mod:`.packed`),
the backend contract and the migration state; :class:`RingAreas` holds the
checks both ring layouts share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import RingError
from ..memory import GuestMemory


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Guest-physical ring addresses (vhost ``vhost_vring_addr``, GPAs here)."""

    index: int
    desc: int
    driver: int
    device: int
    log: int = 0
    log_enabled: bool = False


@dataclass(frozen=True, slots=True)
class RingState:
    """A stopped ring's position in the vhost base encoding.

    Split rings carry the next avail index in bits 0-15. Packed rings carry
    avail index (bits 0-14) + avail wrap (bit 15), used index (bits 16-30) +
    used wrap (bit 31) (vhost-user.rst "VHOST_USER_SET_VRING_BASE").
    """

    index: int
    base: int

    @classmethod
    def packed(cls, index: int, avail_idx: int, avail_wrap: bool, used_idx: int,
               used_wrap: bool) -> RingState:
        return cls(index, (avail_idx & 0x7FFF) | int(avail_wrap) << 15
                   | (used_idx & 0x7FFF) << 16 | int(used_wrap) << 31)

    def unpack_packed(self) -> tuple[int, bool, int, bool]:
        b = self.base
        return b & 0x7FFF, bool(b >> 15 & 1), b >> 16 & 0x7FFF, bool(b >> 31 & 1)


class RingAreas:
    """Checks shared by split and packed layouts: the three areas' alignment and bounds."""

    __slots__ = ()
    #: Alignment of the Descriptor, Driver and Device areas.
    ALIGN: ClassVar[tuple[int, int, int]]

    def areas(self) -> tuple[tuple[str, int, int, int], ...]:
        """``(name, gpa, bytes, alignment)`` of each area."""
        sizes = self.area_sizes(self.size)  # type: ignore[attr-defined]
        addrs = (self.desc, self.driver, self.device)  # type: ignore[attr-defined]
        return tuple(zip(("desc", "driver", "device"), addrs, sizes, self.ALIGN))

    def check_alignment(self) -> None:
        for name, addr, _, align in self.areas():
            if addr % align:
                raise RingError(f"{name} area {addr:#x} is not {align}-byte aligned")

    def check_memory(self, memory: GuestMemory) -> None:
        """Every area must lie inside guest memory."""
        for _, addr, length, _ in self.areas():
            memory.translate(addr, length)

    def initialize(self, memory: GuestMemory) -> None:
        """A driver's fresh ring: validate the layout, check it lies in memory, zero every area."""
        self.validate()  # type: ignore[attr-defined]
        self.check_memory(memory)
        for _, addr, length, _ in self.areas():
            memory.view(addr, length)[:] = bytes(length)
