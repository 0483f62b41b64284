"""How the L1 stops its lower device, reads its rings' state and sets it on a fresh one.

Three ways (/work/shared/reference/stop-and-ring-state.md), each a :class:`StopPath`:

* the virtio 1.4 SUSPEND status bit (feature 43, §3.4): :class:`SuspendPath`, here; ring
  states derived from guest memory, no way to set them on a fresh device;
* the 2021 STOP dialect with ring-state registers (proposal, shadowvmm-private bits):
  :class:`~.ringstate.RingStatePath`; reads and *sets* ring bases through registers;
* an owner device's admin virtqueue (1.4 DEV_MODE_SET, device parts, shadowvmm's VQ_STATE
  part): :class:`~.adminpath.AdminPath`.

The plugin and :func:`~shadowvmm_nested.move.move_device` use only this interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from shadowvmm.backends.base import RingState, VringAddr
from shadowvmm.errors import RefusedError
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.constants import Feature, Status
from shadowvmm.virtio.packed import DESC_SIZE, PackedDescFlags, is_used

from .lower import LowerDevice

LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
_AVAIL = int(PackedDescFlags.AVAIL)
#: A pvirtq_desc's flags (le16) sit at byte 14 (v1.4 §2.8.13).
_FLAGS_OFF = 14


@dataclass(frozen=True)
class QueuePlan:
    """One ring as the L1 programs it on a lower device (v1.4 §4.1.4.3 queue registers)."""

    index: int
    num: int
    desc: int
    driver: int
    device: int
    #: MSI-X vector (the L1 uses ring index + 1; vector 0 is the config vector).
    vector: int


@dataclass(frozen=True)
class StartPlan:
    """What a lower device is brought up with: the L1's negotiated features (without the stop
    path's own bits), its live rings and where each starts."""

    features: int
    queues: tuple[QueuePlan, ...]
    states: Mapping[int, RingState]
    packed: bool


class StopPath(Protocol):
    """One way to stop a lower device and carry its rings' state (module docstring)."""

    name: str
    #: The feature bits the lower device must offer and the L1 accepts for it (0: none).
    feature: int

    async def stop(self, lower: LowerDevice) -> None:
        """Stop the device as a whole; on return every buffer it observed is used."""

    async def resume(self, lower: LowerDevice, plan: StartPlan) -> None:
        """Continue after :meth:`stop`, rings where they stood (*plan*: the rings and the
        states :meth:`ring_state` gave, for a path that leaves its stop by a reset)."""

    def ring_state(self, lower: LowerDevice, memory: GuestMemory, addr: VringAddr, num: int,
                   packed: bool) -> Derived:
        """A stopped ring's state in the vhost encoding."""

    def queue_base(self, lower: LowerDevice, index: int, state: RingState, packed: bool) -> None:
        """During a register-driven start, after queue *index*'s registers and before it is
        enabled: make it start at *state* (:class:`~shadowvmm.errors.RefusedError` if this
        path cannot set a base)."""

    async def start(self, lower: LowerDevice, plan: StartPlan, source: LowerDevice) -> None:
        """Bring the reset device *lower* (its IOMMU programmed) to running as *plan* says,
        continuing what the stopped *source* did (RefusedError if this path cannot)."""


async def register_start(path: StopPath, lower: LowerDevice, plan: StartPlan) -> None:
    """The driver initialisation through registers (v1.4 §3.1.1): reset, ACKNOWLEDGE | DRIVER,
    features (+ the path's bits), FEATURES_OK, each queue (registers, the path's base hook,
    queue_enable), DRIVER_OK."""
    await lower.probe()
    await lower.negotiate(plan.features | path.feature)
    t = lower.transport
    for q in plan.queues:
        t.setup_queue(q.index, q.num, q.desc, q.driver, q.device, q.vector)
        state = plan.states.get(q.index)
        if state is not None:
            path.queue_base(lower, q.index, state, plan.packed)
        t.enable_queue(q.index)
    lower.write_status(LIVE)


def fresh_base(index: int, packed: bool) -> RingState:
    """Where a ring starts after a reset: 0, both packed wrap counters 1 (v1.4 §2.8.1)."""
    return RingState.packed(index, 0, True, 0, True) if packed else RingState(index, 0)


def split_state(memory: GuestMemory, addr: VringAddr) -> RingState:
    """A split ring drained of every buffer the device observed: its next avail index is the
    used idx in memory (v1.4 §2.7.8: used.idx at byte 2 of the used ring)."""
    return RingState(addr.index, memory.load_u16(addr.device + 2))


class Derived(NamedTuple):
    """A ring state read from guest memory; ``exact`` is False when memory cannot tell it."""

    state: RingState
    exact: bool = True


def packed_state(memory: GuestMemory, addr: VringAddr, num: int) -> Derived:
    """A drained packed ring's state from its descriptor flags (v1.4 §2.8.1-2.8.2).

    Every descriptor the driver wrote in the current lap has AVAIL equal to the lap's wrap
    counter (a used element: AVAIL = USED = wrap; an available one or a chain's tail the
    device skipped: AVAIL = wrap, USED = !wrap); the rest holds the previous lap (or zeroes
    before the first wrap). The first position whose AVAIL differs from position 0's is the
    driver's next avail position D. Every buffer the device observed is used, so its next
    used position follows the last used element and the tail of its chain. When D directly
    follows a used element (buffers of one descriptor each, e.g. indirect ones, and none
    published since the stop), the state is exact. When available-looking descriptors sit
    between the last used element and D, memory cannot tell skipped chain tails from buffers
    the driver made available that the device never observed (only the driver knows its
    chains' lengths, and buffer ids are reused): the state assumes tails (D) and is marked
    inexact, which is conservative (a quiescent driver of multi-descriptor chains is flagged).
    """
    flags = [memory.load_u16(addr.desc + position * DESC_SIZE + _FLAGS_OFF) for position in range(num)]
    first = bool(flags[0] & _AVAIL)
    boundary = next((p for p in range(1, num) if bool(flags[p] & _AVAIL) != first), None)
    position, wrap = (0, not first) if boundary is None else (boundary, first)
    ambiguous = 0
    for back in range(1, num + 1):
        slot = (position - back) % num
        if is_used(flags[slot], wrap if slot < position else not wrap):
            break
        ambiguous += 1
    return Derived(RingState.packed(addr.index, position, wrap, position, wrap), exact=ambiguous == 0)


class SuspendPath:
    """virtio 1.4 SUSPEND (status 0x10, VIRTIO_F_SUSPEND 43, §3.4).

    Stop: set SUSPEND, poll until SUSPEND=1 and DRIVER_OK=0 (the device used every buffer it
    observed and sent the notifications first). Resume: set DRIVER_OK again, poll until
    SUSPEND=0 and DRIVER_OK=1. The ring state is derived from guest memory (split: the used
    idx, exact; packed: the descriptor flags, exact unless the driver published buffers the
    device never observed, see :func:`packed_state`). virtio 1.4 has no register to set a ring
    base, so a fresh device's rings can only start at 0: anything else is refused.
    """

    name = "suspend"
    feature = int(Feature.SUSPEND)

    async def stop(self, lower: LowerDevice) -> None:
        lower.write_status(LIVE | Status.SUSPEND)
        await lower.wait_status(lambda v: bool(v & Status.SUSPEND) and not v & Status.DRIVER_OK, "SUSPEND")

    async def resume(self, lower: LowerDevice, plan: StartPlan) -> None:
        lower.write_status(LIVE)
        await lower.wait_status(lambda v: bool(v & Status.DRIVER_OK) and not v & Status.SUSPEND, "resume")

    def ring_state(self, lower: LowerDevice, memory: GuestMemory, addr: VringAddr, num: int,
                   packed: bool) -> Derived:
        return packed_state(memory, addr, num) if packed else Derived(split_state(memory, addr))

    def queue_base(self, lower: LowerDevice, index: int, state: RingState, packed: bool) -> None:
        self._refuse(lower, {index: state}, packed)

    async def start(self, lower: LowerDevice, plan: StartPlan, source: LowerDevice) -> None:
        self._refuse(lower, plan.states, packed=plan.packed)
        await register_start(self, lower, plan)

    @staticmethod
    def _refuse(lower: LowerDevice, states: Mapping[int, RingState], packed: bool) -> None:
        moved = sorted(index for index, state in states.items() if state != fresh_base(index, packed))
        if moved:
            raise RefusedError(
                f"{lower.name}: rings {moved} are past their start: SUSPEND offers no way to set ring "
                "bases on a fresh device (virtio 1.4 has no vq-state registers); use the STOP dialect "
                "with ring-state registers or the admin queue")
