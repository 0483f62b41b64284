"""The frontend virtio device: guest registers -> status shadow -> backend.

:class:`VirtioDevice` is the device a transport serves and a VMM drives:
realize and close, the transparent VMM stop and resume. Everything else comes
from its seams (the package docstring lists them).
"""

from __future__ import annotations

import asyncio
import logging
import os

from ..backends.base import Capability
from ..errors import ArgumentError, BackendDisconnected, BackendError, DeviceStateError
from ..lifecycle import LinkState
from ..memory import GuestMemory
from ..shadow import FeaturePolicy, RunState
from ..timeline import EventKind
from ..virtio.constants import MAX_QUEUE_SIZE, Feature
from ..virtio.vring import RingState
from .adminq import AdminServer, Member
from .core import MAX_QUEUES, QueueRegs
from .interrupts import Interrupts
from .ops import RECONCILE, Op, OpKind
from .parts import PartsMixin

log = logging.getLogger(__name__)


class VirtioDevice(PartsMixin):
    """One virtio device as the guest sees it, backed by a :class:`Backend`."""

    # ------------------------------------------------------------------ lifecycle

    async def realize(self) -> None:
        """Connect the backend and build the guest-visible device from it.

        A failure at any step leaves nothing behind: the backend is closed, every eventfd
        and reader is released, and the device can be realized again.
        """
        if self._realized:
            raise DeviceStateError(f"{self.name}: already realized")
        size = self._queue_size
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise DeviceStateError(f"{self.name}: queue size {size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        self.backend.set_event_handler(self._on_backend_event)
        try:
            await self.backend.connect()
            await self._build()
        except BaseException:
            self._release_fds()
            self.backend.set_event_handler(None)
            await self.backend.close()
            raise
        self._wake = asyncio.Event()
        self._worker = self.loop.create_task(self._work(), name=f"{self.name}-worker")
        self._realized = True
        log.info("%s: realized on backend %r: %d queues of %d, features %#x", self.name,
                 self.backend.implementation, self.num_queues, self._queue_size, self.device_features)

    async def _build(self) -> None:
        self.backend_caps = self.backend.capabilities()
        self.backend_features = int(await self.backend.get_features())
        policy = self.policy
        if not self._has_cap(Capability.RING_RESTART):
            policy = FeaturePolicy(policy.dialect, policy.mask, policy.transport_supported,
                                   policy.vmm_emulated & ~int(Feature.RING_RESET))
            self.policy = policy
        self.device_features = policy.offer(self.backend_features)
        count = self._requested_queues
        if count is None:
            count = await self.backend.get_queue_num()
        if not 0 < count <= MAX_QUEUES:
            raise DeviceStateError(f"{self.name}: {count} queues; a device has 1..{MAX_QUEUES}")
        size = self._queue_size
        self.queues = [QueueRegs(i, size, notify_off=i) for i in range(count)]
        # An owner's admin queue sits right after the others (v1.4 §4.1.4.3: admin_queue_index),
        # with its own kick, relay and MSI-X vector.
        self.admin_queue = QueueRegs(count, size, notify_off=count) if self._want_admin_queue else None
        fds = count + (self.admin_queue is not None)
        self.interrupts = Interrupts(fds + 1)
        self._kick_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(fds)]
        self._relay_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(fds)]
        for index, fd in enumerate(self._relay_fds):
            self.loop.add_reader(fd, self._on_relay, index)
        if self._config_override is not None:
            self.config = bytearray(self._config_override)
        else:
            size_cfg = self.backend.config_size()
            self.config = bytearray(await self.backend.get_config(0, size_cfg)) if size_cfg else bytearray()

    def _release_fds(self) -> None:
        for fd in self._relay_fds:
            self.loop.remove_reader(fd)
        for fd in self._kick_fds + self._relay_fds:
            os.close(fd)
        self._kick_fds = []
        self._relay_fds = []
        if self.interrupts is not None:
            self.interrupts.close()
            self.interrupts = None

    async def close(self) -> None:
        """Stop the backend if it runs, close it and release every fd."""
        retry = self._retry
        self._cancel_timers()
        if retry is not None:
            await asyncio.gather(retry, return_exceptions=True)
        await self._stop_tracking()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for op in self._ops:
            if op.done is not None and not op.done.done():
                op.done.set_exception(DeviceStateError(f"{self.name}: closed"))
        self._ops.clear()
        self._wake_link_waiters()
        try:
            if self.rings_running and self.link is LinkState.UP:
                await self._stop_rings()
        except BackendError as exc:
            log.warning("%s: stop at close failed: %s", self.name, exc)
        for vq in self.vmm_queues.values():
            vq.stop()
        if isinstance(self.admin, AdminServer):
            self.admin.close()
            self.admin = None
        self.backend.set_event_handler(None)
        await self.backend.close()
        self._release_fds()
        self._realized = False
        log.info("%s: closed", self.name)

    def attach_admin_members(self, members: list[Member]) -> AdminServer:
        """Make this owner's admin queue control *members* (member ids 1..N in this order,
        group type SR-IOV, v1.4 §2.12). The device must have been built with ``admin_queue=True``."""
        self._require_realized()
        if self.admin_queue is None:
            raise ArgumentError(f"{self.name}: built without an admin queue")
        if self.admin is not None:
            raise ArgumentError(f"{self.name}: admin members already attached")
        server = AdminServer(self, self.admin_queue.index, self._kick_fds[self.admin_queue.index], members)
        self.admin = server
        return server

    # ------------------------------------------------------------------ VMM: transparent stop

    async def stop(self) -> list[RingState]:
        """Stop the backend transparently: the guest keeps reading what it wrote.

        Returns the ring states of the started rings (empty if the guest had
        not started the device). A backend being reconnected is waited for first.
        """
        if not self._realized:
            self._require_realized()
        if self.link is LinkState.RECONNECTING:
            await self._wait_link()
        run_state = self.run_state
        if run_state is not RunState.RUNNING:
            if run_state is RunState.STOPPED:
                return list(self.ring_states.values())
            raise DeviceStateError(f"{self.name}: cannot stop while {run_state.value}")
        started = self.clock()
        tap, admin = self.timeline, self.admin
        if tap is not None:
            tap.record(EventKind.STOP_START, by="vmm")
        self._set_run_state(RunState.STOPPING)
        self._vmm_stop = True
        try:
            if admin is not None:      # the VMM-served admin queue stops with its owner
                await admin.hold()
            await self._submit_wait(RECONCILE)
            if self.link is not LinkState.UP:
                raise BackendDisconnected(f"{self.name}: backend lost during the stop") from self._lost_error
        except BaseException:
            # Not stopped: a failed backend (FAILED) recovers through the guest's reset into
            # a running device, not into a VMM stop nobody will resume.
            self._vmm_stop = False
            if self.admin is not None:
                self.admin.release()
            if self.run_state is RunState.STOPPING:
                self._set_run_state(RunState.RUNNING)
            raise
        self._set_run_state(RunState.STOPPED)
        stats = self.stats
        stats.stops += 1
        stats.last_stop_seconds = took = self.clock() - started
        if tap is not None:
            tap.record(EventKind.STOP_END, by="vmm", rings=len(self.ring_states))
        if log.isEnabledFor(logging.INFO):
            log.info("%s: VMM stop complete in %.1f ms", self.name, took * 1e3)
        return list(self.ring_states.values())

    async def resume(self) -> None:
        """Undo :meth:`stop`: restart the rings from the captured state."""
        self._require_realized()
        if self.run_state is RunState.RUNNING:
            return
        if self.run_state is not RunState.STOPPED:
            raise DeviceStateError(f"{self.name}: cannot resume while {self.run_state.value}")
        self._vmm_stop = False
        self._set_run_state(RunState.RUNNING)
        await self._submit_wait(RECONCILE)
        if self.admin is not None:
            self.admin.release()
        if self.timeline is not None:
            self.timeline.record(EventKind.RESUME, by="vmm", running=self.rings_running)

    async def set_dma_space(self, memory: GuestMemory) -> None:
        """Make *memory* the address space the device's DMA uses: an IOMMU's IOVA space
        (:class:`~.dma.DmaMap` calls it), or the guest memory again (bypass).

        Carried out in order with the guest's operations; only while the rings do not run
        (before DRIVER_OK, after a reset, or stopped), else :class:`DmaSpaceError` and nothing
        changes.
        """
        self._require_realized()
        verdict: asyncio.Future[None] = self.loop.create_future()
        await self._submit_wait(Op(OpKind.DMA_SPACE, (memory, verdict)))
        verdict.result()

    def failed(self) -> bool:
        """The device shows DEVICE_NEEDS_RESET (:attr:`failure` says why)."""
        return self.run_state is RunState.FAILED
