"""The 2021 STOP dialect with ring-state registers as the L1's stop path (docs/nested.md
"Ring-state registers"; /work/shared/reference/stop-and-ring-state.md §1).

Both feature bits are shadowvmm-private (the proposal was never merged): the lower device is
configured with ``stop_dialect = "stop"``, ``stop_feature_bit`` (44..49) and ``ring_state =
true``, and the L1 negotiates both bits. Per stop and per ring it costs register accesses only:

* stop: one status write (``DRIVER_OK | STOP``), then status reads until STOP shows (the
  device drained first: every buffer it took is used);
* capture: one ``queue_select`` write and one ``queue_ring_state`` read per ring;
* start on a fresh device (a move, or the resume: STOP is left only by a reset): the driver
  initialisation, with one ``queue_ring_state`` write per ring after the queue's addresses and
  before ``queue_enable`` and DRIVER_OK. The rings are the same memory: L2's rings, at the same
  IOVAs, which the new device reaches through its own IOMMU table.
"""

from __future__ import annotations

from shadowvmm.backends.base import RingState, VringAddr
from shadowvmm.errors import BackendError
from shadowvmm.memory import GuestMemory
from shadowvmm.shadow import RING_STATE_RUNNING_VALUE, DialectSpec, StopDialect
from shadowvmm.timeline import EventKind, Tap
from shadowvmm.virtio.constants import Status

from .lower import LowerDevice
from .stoppath import LIVE, Derived, StartPlan, register_start


class RingStatePath:
    """STOP (status 0x20) + VIRTIO_F_RING_STATE registers (module docstring).

    *stop_bit* and *ring_state_bit* are the lower device's configured bits (44..49; the ring
    state's defaults to ``stop_bit + 1``, as the device config does). *tap* records each
    ring-state read and write on a timeline (:attr:`EventKind.RING_STATE`).
    """

    name = "ring-state"

    def __init__(self, stop_bit: int = 44, ring_state_bit: int | None = None, *, tap: Tap | None = None) -> None:
        spec = DialectSpec.make(StopDialect.STOP, stop_bit, ring_state=True, ring_state_feature_bit=ring_state_bit)
        self.feature = spec.feature | spec.ring_state
        self.tap = tap
        #: Register accesses of the last stop + capture (status write, status reads, selects
        #: and ring-state reads), and of the last start's ring-state writes.
        self.stop_accesses = 0
        self.base_writes = 0

    async def stop(self, lower: LowerDevice) -> None:
        reads_before = lower.status_reads
        lower.write_status(LIVE | Status.STOP)
        await lower.wait_status(lambda v: bool(v & Status.STOP) and bool(v & Status.DRIVER_OK), "STOP")
        self.stop_accesses = 1 + lower.status_reads - reads_before

    async def resume(self, lower: LowerDevice, plan: StartPlan) -> None:
        """STOP is left only by a reset: initialise the device again with the captured states."""
        await register_start(self, lower, plan)

    def ring_state(self, lower: LowerDevice, memory: GuestMemory, addr: VringAddr, num: int,
                   packed: bool) -> Derived:
        value = lower.transport.ring_state(addr.index)
        self.stop_accesses += 2
        if self.tap is not None:
            self.tap.record(EventKind.RING_STATE, op="read", ring=addr.index, value=value)
        if value == RING_STATE_RUNNING_VALUE:
            raise BackendError(f"{lower.name}: ring {addr.index} state reads {value:#x}: the device is not "
                               "stopped, or VIRTIO_F_RING_STATE was not negotiated")
        return Derived(RingState(addr.index, value))

    def queue_base(self, lower: LowerDevice, index: int, state: RingState, packed: bool) -> None:
        lower.transport.set_ring_state(index, state.base)
        self.base_writes += 1
        if self.tap is not None:
            self.tap.record(EventKind.RING_STATE, op="write", ring=index, value=state.base)

    async def start(self, lower: LowerDevice, plan: StartPlan, source: LowerDevice) -> None:
        self.base_writes = 0
        await register_start(self, lower, plan)
