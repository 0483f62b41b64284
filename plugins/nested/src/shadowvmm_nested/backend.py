"""The L1 backend: an L1 hypervisor's device backed by a virtio device of the layer below.

The chain (docs/nested.md): the L2 guest driver -> the L1 device (a VirtioDevice in the L1
machine, whose memory is L2's RAM) -> :class:`L1Backend`, a guest driver of the L0 device
through L0's transport registers, as Linux vp_vdpa drives the device L0 gave it -> the L0
device -> the real backend. Each contract operation is register accesses on the lower
transport (v1.4 §4.1.4):

=====================  ==========================================================
get_features           device_feature (the stop path's bit withheld)
set_features           driver_feature + FEATURES_OK (+ the stop path's bit)
set_mem_table          the lower device's IOMMU table: L2 GPA (IOVA) -> L1 GPA
set_vring_*            recorded; SET_VRING_ENABLE writes queue_size/desc/driver/device,
                       the MSI-X vector (ring + 1) and queue_enable
set_status DRIVER_OK   DRIVER_OK
kick / call            L1's kick eventfds -> the notify register; the lower device's
                       vector eventfds (or INTx + ISR) -> L1's call eventfds
suspend / resume       the :class:`~.stoppath.StopPath` (SUSPEND, STOP + ring-state
                       registers, or an owner's admin queue); the ring states are
                       captured right after the stop
get_vring_base         stop (if running), then the ring state the stop path captured
reset                  status 0, wait for 0, then ACKNOWLEDGE | DRIVER again
get/set_config         device config reads and writes
=====================  ==========================================================

Nothing is copied: the L0 device's DMA space is the IOVA space, so its real backend reads
L2's rings and buffers at L2 addresses in the memfd L0 owns.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shadowvmm.backends.base import (
    BackendBase,
    BackendEvent,
    BackendEventKind,
    Capability,
    RingState,
    VringAddr,
)
from shadowvmm.device import DmaMapping
from shadowvmm.errors import ArgumentError, BackendError, DmaSpaceError, RefusedError, UnsupportedError
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.constants import NO_VECTOR, DeviceId, Feature, Status

from .lower import Iommu, LowerDevice
from .stoppath import QueuePlan, StartPlan, StopPath, SuspendPath, fresh_base

log = logging.getLogger(__name__)

_LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
_ISR_QUEUE, _ISR_CONFIG = 1, 2


class Phase(enum.Enum):
    """Where the lower device stands, as its driver (this plugin) brought it."""

    CLOSED = "closed"          #: not connected
    PROBED = "probed"          #: ACKNOWLEDGE | DRIVER
    FEATURES_OK = "features"   #: FEATURES_OK shown
    RUNNING = "running"        #: DRIVER_OK
    STOPPING = "stopping"      #: the stop path is stopping it: kicks are held (a driver MUST NOT
                               #: kick after SUSPEND, v1.4 §3.4; nor after STOP or DEV_MODE_SET)
    STOPPED = "stopped"        #: stopped by the stop path (every observed buffer used)


@dataclass
class Ring:
    """One ring as the L1 device handed it over."""

    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int = -1
    call_fd: int = -1
    #: Set up on the lower device (queue registers written, queue_enable 1).
    live: bool = False
    enabled: bool = False


def iommu_table(memory: GuestMemory) -> list[DmaMapping]:
    """L2's memory as IOMMU mappings: each region's L2 GPA (the IOVA) -> its L1 GPA."""
    table = []
    for region in memory:
        if region.parent_gpa is None:
            raise BackendError(f"region at {region.gpa:#x} is not inside L1 memory (not a GuestMemory.alias)")
        table.append(DmaMapping(region.gpa, region.parent_gpa, region.size))
    return table


class L1Backend(BackendBase):
    """A backend that is a guest driver of a lower virtio device (module docstring)."""

    implementation = "l1"
    implementation_version = 1

    def __init__(self, lower: LowerDevice | Mapping[str, Any], iommu: Iommu | None = None, *,
                 stop_path: StopPath | None = None) -> None:
        """*lower* and *iommu*; or, called through the ``l1`` entry point, one mapping
        ``{"lower": LowerDevice, "iommu": Iommu, "stop_path": StopPath}`` (objects: an L1
        wires its lower device in process, there is nothing to write in a file)."""
        device: object = lower
        if not isinstance(lower, LowerDevice):
            device, iommu = lower.get("lower"), lower.get("iommu")
            stop_path = lower.get("stop_path", stop_path)
        if not isinstance(device, LowerDevice) or iommu is None:
            raise ArgumentError("the l1 backend needs 'lower' (a LowerDevice) and 'iommu' (its DmaMap)")
        lower = device
        self.lower = lower
        self.iommu = iommu
        self.stop_path: StopPath = stop_path or SuspendPath()
        self.device_id = lower.device_id
        self.implementation = f"l1-{lower.device_id.name.lower()}"
        self.phase = Phase.CLOSED
        self.offered = 0
        self.features = 0
        self.memory: GuestMemory | None = None
        self.rings: dict[int, Ring] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._irq_fds: list[int] = []
        #: Rings kicked while the lower device was stopped: notified on resume.
        self._pending: set[int] = set()
        #: Rings whose last state the stop path could not derive exactly.
        self._inexact: set[int] = set()
        self.kicks = 0
        self.interrupts = 0

    # ------------------------------------------------------------------ session

    def capabilities(self) -> Capability:
        caps = Capability.CONFIG | Capability.STATUS | Capability.MQ | Capability.EVENTS | Capability.RESET_DEVICE
        if self._can_stop():
            caps |= Capability.SUSPEND | Capability.RESUME
        return caps

    def _can_stop(self) -> bool:
        return self.offered & self.stop_path.feature == self.stop_path.feature

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.lower.probe()
        self.offered = self.lower.transport.device_features()
        self.phase = Phase.PROBED

    async def close(self) -> None:
        self._unwatch_all()
        if self.phase is not Phase.CLOSED:
            try:
                await self.lower.reset()
            except BackendError as exc:
                log.warning("%s: reset at close failed: %s", self.lower.name, exc)
        self.phase = Phase.CLOSED

    async def get_features(self) -> int:
        return self.offered & ~self.stop_path.feature

    async def set_features(self, features: int) -> None:
        if features & ~self.offered:
            raise BackendError(f"{self.lower.name}: features {features & ~self.offered:#x} were not offered")
        if self.phase is not Phase.PROBED:
            if features == self.features:
                return
            raise BackendError(f"{self.lower.name}: features change from {self.features:#x} to {features:#x} "
                               f"while {self.phase.value}")
        await self.lower.negotiate(features | (self.offered & self.stop_path.feature))
        self.features = features
        self.phase = Phase.FEATURES_OK

    async def get_queue_num(self) -> int:
        return self.lower.transport.num_queues()

    def config_size(self) -> int:
        return self.lower.config_size

    async def get_config(self, offset: int, size: int) -> bytes:
        return self.lower.read_config(offset, size)

    async def set_config(self, offset: int, data: bytes) -> None:
        self.lower.write_config(offset, data)

    async def set_mem_table(self, memory: GuestMemory) -> None:
        """Program the lower device's IOMMU: its DMA addresses become L2 guest-physical ones."""
        try:
            await self.iommu.program(iommu_table(memory))
        except DmaSpaceError as exc:
            raise BackendError(f"{self.lower.name}: {exc}") from exc
        self.memory = memory

    # ------------------------------------------------------------------ rings

    def _ring(self, index: int) -> Ring:
        if not 0 <= index < NO_VECTOR - 1:
            raise BackendError(f"vring index {index} out of range")
        return self.rings.setdefault(index, Ring(index))

    async def set_vring_num(self, index: int, num: int) -> None:
        self._ring(index).num = num

    async def set_vring_addr(self, addr: VringAddr) -> None:
        self._ring(addr.index).addr = addr

    async def set_vring_base(self, index: int, base: int) -> None:
        self._ring(index).base = base

    async def set_vring_kick(self, index: int, fd: int) -> None:
        ring = self._ring(index)
        if ring.kick_fd >= 0 and self._loop is not None:
            self._loop.remove_reader(ring.kick_fd)
        ring.kick_fd = fd
        if fd >= 0:
            self._event_loop().add_reader(fd, self._on_kick, ring)

    async def set_vring_call(self, index: int, fd: int) -> None:
        self._ring(index).call_fd = fd

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        ring = self._ring(index)
        ring.enabled = enable
        if not enable or ring.live:
            return
        if ring.addr is None or ring.num == 0 or self.memory is None:
            raise BackendError(f"vring {index} enabled before it was configured")
        if self.phase not in (Phase.FEATURES_OK, Phase.RUNNING):
            raise BackendError(f"{self.lower.name}: vring {index} enabled while {self.phase.value}")
        self._setup_lower_queue(self.lower, ring)
        ring.live = True
        if self.phase is Phase.RUNNING:
            self.lower.transport.notify(index)

    def _setup_lower_queue(self, lower: LowerDevice, ring: Ring) -> None:
        assert ring.addr is not None
        t = lower.transport
        if ring.num > t.queue_max_size(ring.index):
            raise BackendError(f"{lower.name}: queue {ring.index} of {ring.num} exceeds its maximum")
        t.setup_queue(ring.index, ring.num, ring.addr.desc, ring.addr.driver, ring.addr.device, ring.index + 1)
        state = RingState(ring.index, ring.base)
        if state != fresh_base(ring.index, self._packed):
            self.stop_path.queue_base(lower, ring.index, state, self._packed)
        t.enable_queue(ring.index)

    @property
    def _packed(self) -> bool:
        return bool(self.features & Feature.RING_PACKED)

    async def get_vring_base(self, index: int) -> RingState:
        """Stop the lower device if it runs (one ring cannot be stopped alone without losing
        its position), then the ring's state as the stop path captured it."""
        ring = self._ring(index)
        if not ring.live or ring.addr is None or self.memory is None:
            return RingState(index, ring.base)
        if self.phase is Phase.RUNNING:
            await self.suspend()
        if self.phase is not Phase.STOPPED:
            return fresh_base(index, self._packed)
        return RingState(index, ring.base)

    def _capture(self) -> None:
        """Every live ring's state from the stop path, right after its stop."""
        assert self.memory is not None
        for ring in self.rings.values():
            if not ring.live or ring.addr is None:
                continue
            state, exact = self.stop_path.ring_state(self.lower, self.memory, ring.addr, ring.num, self._packed)
            if exact:
                self._inexact.discard(ring.index)
            else:
                self._inexact.add(ring.index)
            ring.base = state.base

    def _plan(self, states: Mapping[int, RingState] | None = None) -> StartPlan:
        """The live rings as a lower device is brought up with them, at *states* (default:
        where they stood at the last stop)."""
        queues = tuple(QueuePlan(r.index, r.num, r.addr.desc, r.addr.driver, r.addr.device, r.index + 1)
                       for r in sorted(self.rings.values(), key=lambda r: r.index) if r.live and r.addr is not None)
        if states is None:
            states = {q.index: RingState(q.index, self.rings[q.index].base) for q in queues}
        return StartPlan(self.features, queues, dict(states), self._packed)

    def migration_blockers(self) -> list[str]:
        """Rings whose last state could not be told exactly from guest memory (:func:`packed_state`);
        a virtio-fs device whose FUSE session has begun (it lives in the lower device's back-end,
        not in the rings: another lower device would answer EIO, v1.4 §5.11)."""
        blockers = []
        if self._inexact:
            blockers.append(f"{self.lower.name}: the {self.stop_path.name} path could not tell the position of "
                            f"packed rings {sorted(self._inexact)} (buffers made available the device never "
                            "observed)")
        if self.device_id is DeviceId.FS and self.rings:
            blockers.append(f"{self.lower.name}: the FUSE session (INIT, the inode table, open files) lives in "
                            "this device's back-end, not in its rings: another lower device has none")
        return blockers

    async def set_status(self, status: int) -> None:
        if status & Status.DRIVER_OK and self.phase is Phase.FEATURES_OK:
            self.lower.write_status(_LIVE)
            self.phase = Phase.RUNNING
            self._watch_interrupts()

    async def reset(self) -> None:
        """Status 0 and wait for 0, then ACKNOWLEDGE | DRIVER: the next start negotiates again.
        The IOMMU table stays (the device's reset does not touch the IOMMU)."""
        self._unwatch_all()
        await self.lower.probe()
        self.rings.clear()
        self._pending.clear()
        self._inexact.clear()
        self.features = 0
        self.phase = Phase.PROBED

    async def suspend(self) -> None:
        if not self._can_stop():
            raise UnsupportedError(f"{self.lower.name}: the device does not offer the {self.stop_path.name} path")
        if self.phase is Phase.RUNNING:
            self.phase = Phase.STOPPING
            try:
                await self.stop_path.stop(self.lower)
            except BaseException:
                self.phase = Phase.RUNNING
                raise
            self.phase = Phase.STOPPED
            self._capture()

    async def resume(self) -> None:
        if self.phase is Phase.STOPPED:
            await self.stop_path.resume(self.lower, self._plan())
            self.phase = Phase.RUNNING
        pending, self._pending = self._pending, set()
        for index in sorted(pending):
            self._notify(index)

    # ------------------------------------------------------------------ L0 migrates L1 (l0migrate.py)

    def rebind(self, lower: LowerDevice, iommu: Iommu) -> None:
        """L0 migrated the machine this L1 runs in: the same L0 device (its state, its status,
        its IOMMU table) is now served by *lower*. Unlike :meth:`switch_lower` nothing is
        re-created and no register is written: the interrupts the old instance had raised are
        delivered first, then the new instance's interrupt lines are watched."""
        if lower.device_id != self.lower.device_id:
            raise ArgumentError(f"{lower.name}: a {lower.device_id.name} device cannot stand for "
                                f"{self.lower.name}, a {self.lower.device_id.name} one")
        if self.memory is not None and list(iommu.mappings) != iommu_table(self.memory):
            raise BackendError(f"{lower.name}: its IOMMU table {iommu.mappings} is not the one L1 programmed; "
                               "the migration must carry it")
        watching = bool(self._irq_fds)
        self._unwatch_interrupts()
        self.lower, self.iommu = lower, iommu
        if watching:
            self._watch_interrupts()

    # ------------------------------------------------------------------ the move (move.py)

    async def switch_lower(self, lower: LowerDevice, iommu: Iommu, states: Mapping[int, RingState]) -> None:
        """Re-create the stopped device on *lower* from *states*, then let the old one go.

        The new device is reset and given the IOMMU table; the stop path brings it up with the
        negotiated features and the rings at *states* (:meth:`~.stoppath.StopPath.start`: the
        registers, or the admin queue's DEV_PARTS_SET). Any failure leaves the old device in
        use (still stopped) and the new one reset, its IOMMU table as it was.
        """
        if self.phase is not Phase.STOPPED or self.memory is None:
            raise BackendError(f"{self.lower.name}: a move needs the device stopped (it is {self.phase.value})")
        blockers = self.migration_blockers()
        if blockers:
            raise RefusedError("; ".join(blockers))
        await lower.reset()
        table_before = list(iommu.mappings)
        try:
            offered = lower.transport.device_features()
            missing = (self.features | self.stop_path.feature) & ~offered
            if missing:
                raise BackendError(f"{lower.name}: does not offer features {missing:#x}")
            await iommu.program(iommu_table(self.memory))
            await self.stop_path.start(lower, self._plan(states), self.lower)
        except BaseException:
            await lower.reset()
            await iommu.program(table_before)
            raise
        self._unwatch_interrupts()
        old, old_iommu = self.lower, self.iommu
        self.lower, self.iommu, self.offered = lower, iommu, offered
        self.phase = Phase.RUNNING
        self._watch_interrupts()
        self._pending.update(index for index, ring in self.rings.items() if ring.live)
        await old.reset()
        await old_iommu.program([])

    # ------------------------------------------------------------------ kicks and interrupts

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _on_kick(self, ring: Ring) -> None:
        try:
            os.eventfd_read(ring.kick_fd)
        except BlockingIOError:
            return
        if self.phase is Phase.RUNNING and ring.live and ring.enabled:
            self._notify(ring.index)
        else:
            self._pending.add(ring.index)

    def _notify(self, index: int) -> None:
        ring = self.rings.get(index)
        if ring is not None and ring.live and self.phase is Phase.RUNNING:
            self.kicks += 1
            self.lower.transport.notify(index)

    def _watch_interrupts(self) -> None:
        loop = self._event_loop()
        ints = self.lower.interrupts
        if self.lower.transport.uses_msix:
            for vector, fd in enumerate(ints.vector_fds):
                loop.add_reader(fd, self._on_vector, vector)
                self._irq_fds.append(fd)
        else:
            loop.add_reader(ints.intx_fd, self._on_intx)
            self._irq_fds.append(ints.intx_fd)

    def _unwatch_interrupts(self) -> None:
        """Stop taking the lower device's interrupts; what is pending is delivered first."""
        fds, self._irq_fds = self._irq_fds, []
        for fd in fds:
            self._event_loop().remove_reader(fd)
        ints = self.lower.interrupts
        if fds and self.lower.transport.uses_msix:
            for vector in range(len(ints.vector_fds)):
                self._on_vector(vector)
        elif fds:
            self._on_intx()

    def _unwatch_all(self) -> None:
        self._unwatch_interrupts()
        for ring in self.rings.values():
            if ring.kick_fd >= 0 and self._loop is not None:
                self._loop.remove_reader(ring.kick_fd)
                ring.kick_fd = -1

    def _on_vector(self, vector: int) -> None:
        try:
            os.eventfd_read(self.lower.interrupts.vector_fds[vector])
        except BlockingIOError:
            return
        if vector == 0:
            self.emit(BackendEvent(BackendEventKind.CONFIG_CHANGED))
            return
        self._call(vector - 1)

    def _on_intx(self) -> None:
        try:
            os.eventfd_read(self.lower.interrupts.intx_fd)
        except BlockingIOError:
            pass
        isr = self.lower.transport.interrupt_status()
        if isr & _ISR_QUEUE:
            for index in self.rings:
                self._call(index)
        if isr & _ISR_CONFIG:
            self.emit(BackendEvent(BackendEventKind.CONFIG_CHANGED))

    def _call(self, index: int) -> None:
        ring = self.rings.get(index)
        if ring is not None and ring.call_fd >= 0:
            self.interrupts += 1
            os.eventfd_write(ring.call_fd, 1)

