"""How the L1 stops its lower device, reads its rings' state and sets it on a fresh one.

Three ways exist or are being built (/work/shared/reference/stop-and-ring-state.md):

* the virtio 1.4 SUSPEND status bit (feature 43, §3.4): :class:`SuspendPath`, here;
* the STOP dialect with ring-state registers (proposal): reads and *sets* ring bases;
* an admin virtqueue owner device (1.4 DEV_MODE_SET, device parts).

Each is a :class:`StopPath`; the plugin and :func:`~shadowvmm_nested.move.move_device` use
only this interface, so the other two plug in without touching them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from shadowvmm.backends.base import RingState, VringAddr
from shadowvmm.errors import RefusedError
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.constants import Feature, Status
from shadowvmm.virtio.packed import DESC_SIZE, PackedDescFlags

from .lower import LowerDevice

_LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
_AVAIL = int(PackedDescFlags.AVAIL)
#: A pvirtq_desc's flags (le16) sit at byte 14 (v1.4 §2.8.13).
_FLAGS_OFF = 14


class StopPath(Protocol):
    """One way to stop a lower device and carry its rings' state (module docstring)."""

    name: str
    #: The feature bit the lower device must offer and the L1 accepts for it (0: none).
    feature: int

    async def stop(self, lower: LowerDevice) -> None:
        """Stop the device as a whole; on return every buffer it observed is used."""

    async def resume(self, lower: LowerDevice) -> None:
        """Continue after :meth:`stop`, rings where they stood."""

    def ring_state(self, lower: LowerDevice, memory: GuestMemory, addr: VringAddr, num: int,
                   packed: bool) -> RingState:
        """A stopped ring's state in the vhost encoding."""

    async def restore_bases(self, lower: LowerDevice, states: Mapping[int, RingState], packed: bool) -> None:
        """Before DRIVER_OK on a fresh lower device: make its rings start at *states*
        (:class:`~shadowvmm.errors.RefusedError` if this path cannot)."""


def fresh_base(index: int, packed: bool) -> RingState:
    """Where a ring starts after a reset: 0, both packed wrap counters 1 (v1.4 §2.8.1)."""
    return RingState.packed(index, 0, True, 0, True) if packed else RingState(index, 0)


def split_state(memory: GuestMemory, addr: VringAddr) -> RingState:
    """A split ring drained of every buffer the device observed: its next avail index is the
    used idx in memory (v1.4 §2.7.8: used.idx at byte 2 of the used ring)."""
    return RingState(addr.index, memory.load_u16(addr.device + 2))


def packed_state(memory: GuestMemory, addr: VringAddr, num: int) -> RingState:
    """A drained packed ring's state from its descriptor flags.

    Every descriptor the driver wrote in the current lap has AVAIL equal to the lap's wrap
    counter, whether the device since overwrote it with a used element (AVAIL = USED = wrap)
    or skipped it as the tail of a chain (AVAIL = wrap, USED = !wrap); the rest of the ring
    holds the previous lap (or zeroes: AVAIL 0 before the first wrap, v1.4 §2.8.1-2.8.2).
    The first position whose AVAIL bit differs from position 0's is the next avail position
    and, all buffers being used, the next used position too, in the same lap.
    """
    first = bool(memory.load_u16(addr.desc + _FLAGS_OFF) & _AVAIL)
    for position in range(1, num):
        if bool(memory.load_u16(addr.desc + position * DESC_SIZE + _FLAGS_OFF) & _AVAIL) != first:
            return RingState.packed(addr.index, position, first, position, first)
    return RingState.packed(addr.index, 0, not first, 0, not first)


class SuspendPath:
    """virtio 1.4 SUSPEND (status 0x10, VIRTIO_F_SUSPEND 43, §3.4).

    Stop: set SUSPEND, poll until SUSPEND=1 and DRIVER_OK=0 (the device used every buffer it
    observed and sent the notifications first). Resume: set DRIVER_OK again, poll until
    SUSPEND=0 and DRIVER_OK=1. The ring state is derived from guest memory (split: the used
    idx; packed: the descriptor flags). virtio 1.4 has no register to set a ring base, so a
    fresh device's rings can only start at 0: :meth:`restore_bases` refuses anything else.
    """

    name = "suspend"
    feature = int(Feature.SUSPEND)

    async def stop(self, lower: LowerDevice) -> None:
        lower.write_status(_LIVE | Status.SUSPEND)
        await lower.wait_status(lambda v: bool(v & Status.SUSPEND) and not v & Status.DRIVER_OK, "SUSPEND")

    async def resume(self, lower: LowerDevice) -> None:
        lower.write_status(_LIVE)
        await lower.wait_status(lambda v: bool(v & Status.DRIVER_OK) and not v & Status.SUSPEND, "resume")

    def ring_state(self, lower: LowerDevice, memory: GuestMemory, addr: VringAddr, num: int,
                   packed: bool) -> RingState:
        return packed_state(memory, addr, num) if packed else split_state(memory, addr)

    async def restore_bases(self, lower: LowerDevice, states: Mapping[int, RingState], packed: bool) -> None:
        moved = sorted(index for index, state in states.items() if state != fresh_base(index, packed))
        if moved:
            raise RefusedError(
                f"{lower.name}: rings {moved} are past their start: SUSPEND offers no way to set ring "
                "bases on a fresh device (virtio 1.4 has no vq-state registers); use the STOP dialect "
                "with ring-state registers or the admin queue")
