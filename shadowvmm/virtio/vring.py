"""Ring addresses and a stopped ring's position: the vhost encodings (spec layer).

Both are plain values shared by the rings (:mod:`.split`, :mod:`.packed`),
the backend contract and the migration state.
"""

from __future__ import annotations

from dataclasses import dataclass


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
