"""The vhost sequencer: the backend brought to what the guest and the VMM ask for.

:meth:`SequencerMixin._op_reconcile` compares what is asked (the status shadow,
a VMM stop) with what the backend does and starts, stops or restarts it in
QEMU's vhost order (lab trace "Device start": SET_FEATURES, SET_VRING_CALL per
queue, memory table once per connection, NUM/BASE/ADDR/KICK per set-up queue,
SET_VRING_ENABLE; stop: disable, then GET_VRING_BASE in vq order). Every ring
is handed to the backend by one routine (:meth:`SequencerMixin._program_rings`:
CALL before KICK, then ENABLE, then the kicks held meanwhile), for the start, a
restart, a queue reset and a reconnect alike. The dirty log of a migration's
pre-copy is switched here too.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from ..backends.base import Capability, RingState, VringAddr
from ..errors import BackendDisconnected, DmaSpaceError, UnsupportedError
from ..lifecycle import DeviceEventKind, LinkState
from ..memory import DirtyLog, GuestMemory
from ..shadow import RunState
from ..timeline import EventKind
from ..virtio.constants import DeviceId, Feature, Status
from .core import DRAIN_POLL, DRAIN_QUIET, DRAIN_STALL, DRAIN_TIMEOUT, QueueRegs, Staged
from .link import LinkMixin
from .ops import Op, OpHandler, OpKind
from .vmmqueue import VmmQueue, vmm_queue_handlers

logger = logging.getLogger(__name__)

_RING_PACKED = int(Feature.RING_PACKED)   # an int: ``int & IntFlag`` builds an enum member
_SUSPEND = Capability.SUSPEND.value


class SequencerMixin(LinkMixin):
    """Start, stop, drain and restart the backend's rings; the dirty log (module docstring)."""

    def _op_table(self) -> dict[OpKind, OpHandler]:
        return {**super()._op_table(), OpKind.RECONCILE: self._op_reconcile,
                OpKind.CONFIG_WRITE: self._op_config_write, OpKind.VECTOR: self._op_vector,
                OpKind.QUEUE_RESET: self._op_queue_reset, OpKind.QUEUE_START: self._op_queue_start,
                OpKind.DMA_SPACE: self._op_dma_space}

    async def _op_reconcile(self, *why: str) -> None:
        shadow = self.shadow
        if self.link is not LinkState.UP:
            if shadow.reset_pending:
                self._schedule_reconnect(0.0)   # the reset completes once the backend is back
            return
        if "refresh-config" in why:
            self._config_refresh_queued = False
            if self._has_cap(Capability.CONFIG):
                self.update_config(await self.backend.get_config(0, len(self.config)))
        if "active-queues" in why:
            await self._apply_active_queues()
        session = self._session
        if shadow.reset_pending:
            await self._reset_backend_for_guest(session)
            self._complete_reset()
            return
        if self._backend_reset_owed and not self.started:
            await self.backend.reset()
            self._same_session(session)
            self._backend_touched = self._backend_reset_owed = False
        if self.run_state is RunState.FAILED:
            return
        want_started = shadow.driver_ok
        # Three stop sources: the VMM's transparent stop, an owner's DEV_MODE_SET, the guest's dialect.
        want_running = (want_started and not self._vmm_stop and not self._admin_stop
                        and not shadow.guest_stop_requested)
        if want_running and not self.started:
            await self._start()
        elif want_running and not self.rings_running:
            await self._restart_rings()
        elif not want_running and self.rings_running:
            await self._stop_rings()
        if shadow.guest_stop_requested and not self.rings_running and not shadow.guest_stopped:
            shadow.guest_stop_done()
            logger.info("%s: guest suspend complete", self.name)
            if self.timeline is not None:
                self.timeline.record(EventKind.STOP_END, by="guest")
        elif not shadow.guest_stop_requested and shadow.guest_stopped and self.rings_running:
            shadow.guest_resume_done()
            logger.info("%s: guest resume complete", self.name)
            if self.timeline is not None:
                self.timeline.record(EventKind.RESUME, by="guest")
            self._release_held_config()

    async def _reset_backend_for_guest(self, session: int) -> None:
        """Stop the rings and reset the backend for the guest's reset (v1.4 §2.1.2, §4.1.4.3.2).

        The guest's reset completes even when the backend fails it: a driver writes 0 once and
        polls until it reads 0, so a reset left pending hangs it. A failed ring stop is followed by
        the backend reset all the same (it stops every ring); whatever failed is reported as a
        ``BACKEND_ERROR`` event and the backend is reset again before the next start, whose
        failure then shows NEEDS_RESET as any failed start does. A lost session is not an error
        here: the loss handling completes the reset once the backend is back.
        """
        errors: list[BaseException] = []
        if self.rings_running:
            try:
                await self._stop_rings()
            except Exception as exc:
                if self.link is not LinkState.UP:
                    raise
                errors.append(exc)
        if self._backend_touched or self._backend_reset_owed or errors:
            try:
                await self.backend.reset()
                self._same_session(session)
                self._backend_touched = self._backend_reset_owed = False
            except Exception as exc:
                if self.link is not LinkState.UP:
                    raise
                errors.append(exc)
        if errors:
            self._backend_touched = self._backend_reset_owed = True
            detail = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
            logger.warning("%s: the backend failed the guest's reset (%s); the reset completes and the "
                           "backend is reset again before the next start", self.name, detail)
            self.events.emit(DeviceEventKind.BACKEND_ERROR, detail, errors[-1])

    async def _op_config_write(self, offset: int, data: bytes) -> None:
        if self.link is LinkState.UP:
            await self.backend.set_config(offset, data)

    async def _op_vector(self, index: int) -> None:
        if self.started and self.link is LinkState.UP and index not in self.vmm_queues:
            await self.backend.set_vring_call(index, self.call_fd(index))

    async def _op_queue_start(self, index: int) -> None:
        q = self.queues[index]
        if self.rings_running and self.link is LinkState.UP and q.set_up and index not in self.vmm_queues:
            try:
                await self._program_rings([q])
            finally:
                self._release_kicks([q])

    async def _op_queue_reset(self, index: int) -> None:
        """Stop one ring the way a device stop does (kicks held, disabled, in-flight requests
        drained, then GET_VRING_BASE): the guest frees the ring's memory once the reset reads
        done, and libvhost-user would otherwise complete late requests into it."""
        q = self.queues[index]
        if index in self._live_rings and self.link is LinkState.UP:
            held = index not in self._held_kicks
            self._held_kicks.add(index)
            try:
                # A SUSPEND-capable backend's GET_VRING_BASE completes the ring's requests itself.
                target = self._drain_target([q]) if not self._has_cap(Capability.SUSPEND) else (0.0, [])
                await self.backend.set_vring_enable(index, False)
                await self._drain(target)
                await self.backend.get_vring_base(index)
            finally:
                if held:
                    self._held_kicks.discard(index)
        self._live_rings.discard(index)
        self._ledgers.pop(index, None)
        self.ring_states.pop(index, None)
        q.clear()

    async def _op_dma_space(self, memory: GuestMemory, verdict: asyncio.Future[None]) -> None:
        """Make *memory* the device's DMA space (an IOMMU's IOVA space, :mod:`.dma`).

        Only while the rings do not run: before DRIVER_OK, after a reset, or stopped (by the
        VMM or the guest's own suspend). The refusal is the caller's error, never the device's
        failure. The backend gets the new memory table at the next start; a stopped device's
        suspended rings may hold translations of the old space, so its restart is a full one
        (backend reset, then the start from the captured ring states).
        """
        stopped = self._vmm_stop or self.shadow.guest_stop_requested or self.run_state is RunState.FAILED
        if self.rings_running or (self.shadow.driver_ok and not stopped):
            verdict.set_exception(DmaSpaceError(
                f"{self.name}: the DMA space changes only before DRIVER_OK, after a reset or while "
                "the device is stopped; its rings run"))
            return
        self.memory = memory
        self._mem_table_sent = False
        verdict.set_result(None)
        logger.info("%s: DMA space changed: %d region(s), span %#x", self.name, len(memory.regions), memory.span)

    # ------------------------------------------------------------------ start

    def backend_feature_word(self) -> int:
        word = self.policy.to_backend(self.driver_features)
        return word | int(Feature.LOG_ALL) if self.dirty_logging else word

    def _backend_queues(self) -> list[QueueRegs]:
        """Queues the backend serves (all but the VMM-served ones)."""
        return [q for q in self.queues if q.index not in self.vmm_queues]

    def _queue_active(self, q: QueueRegs) -> bool:
        return self.active_queues is None or q.index < self.active_queues

    async def _start(self) -> None:
        """Device start in QEMU's order (vhost_dev_start); after a reconnect, the whole
        session again: log base, features, calls, memory table, inflight area, config the
        guest wrote, rings from where they stood, status."""
        b = self.backend
        session = self._session
        self._backend_touched = True
        if not self.vmm_queues:
            self.vmm_queues = {i: VmmQueue(self, i, h) for i, h in vmm_queue_handlers(self).items()}
        staged, self._staged = self._staged or Staged(), None
        fresh, self._fresh_session = self._fresh_session, False
        if fresh and self.dirty_logging and self._dirty_log is not None:
            await b.set_log_base(self._dirty_log.fd, self._dirty_log.size)
        word = self.backend_feature_word()
        if staged.features != word:
            await b.set_features(word)
        for q in self._backend_queues():
            fd = self.call_fd(q.index)
            if staged.calls.get(q.index) != fd:
                await b.set_vring_call(q.index, fd)
        if not self._mem_table_sent:
            await b.set_mem_table(self.memory)
            self._same_session(session)
            self._mem_table_sent = True
        if self._has_cap(Capability.INFLIGHT):
            await b.prepare_inflight(self.num_queues, max(q.max_size for q in self.queues))
        if fresh:
            for offset, data in sorted(self._config_writes.items()):
                await b.set_config(offset, data)
        rings = [q for q in self._backend_queues() if q.set_up]
        try:
            await self._program_rings(rings, send_call=False, sizes=staged.sizes)
            if self._has_cap(Capability.STATUS):
                await b.set_status(self._backend_status())
            self._same_session(session)
            self.started = True
            self.rings_running = True
            self._start_vmm_queues()
        finally:
            self._release_kicks(rings)
        logger.info("%s: backend started, %d rings running", self.name, len(rings))
        if fresh and self.stats.reconnects:
            self._signal_rings(rings)
            self.stats.last_reconnect_seconds = self.clock() - self._lost_at
            after = f"{self.stats.last_reconnect_seconds * 1e3:.1f} ms after the loss"
            logger.info("%s: rings resumed on the new session %s", self.name, after)
            self.events.emit(DeviceEventKind.RESUMED, after)

    async def _program_rings(self, rings: list[QueueRegs], *, send_call: bool = True,
                             sizes: Mapping[int, int] | None = None) -> None:
        """Hand *rings* to the backend: the one ring-start routine (module docstring).

        Per ring CALL (unless the caller sent it), NUM (unless staged), BASE, ADDR, KICK,
        then ENABLE for the active ones. The guest's notifications for these rings are held
        from the first message on and the ring's kick eventfd is drained before KICK, so
        the backend sees no kick before its ring is enabled; the caller releases them with
        :meth:`_release_kicks` (after SET_STATUS on a start).
        """
        b = self.backend
        sizes = sizes or {}
        session = self._session
        self._held_kicks.update(q.index for q in rings)
        for q in rings:
            index = q.index
            base = self._saved_base(index)
            if send_call:
                await b.set_vring_call(index, self.call_fd(index))
            if sizes.get(index) != q.size:
                await b.set_vring_num(index, q.size)
            await b.set_vring_base(index, base)
            await b.set_vring_addr(VringAddr(index, q.desc, q.driver, q.device, log=q.device,
                                             log_enabled=self.dirty_logging))
            self._same_session(session)
            # Live (a lost session's ring to park) only from here: before its ledger and KICK
            # the backend never saw the ring, and a loss meanwhile leaves nothing outstanding.
            self._live_rings.add(index)
            self._track_ring(q, base)
            self._drain_kick(index)
            await b.set_vring_kick(index, self._kick_fds[index])
        for q in rings:
            if self._queue_active(q):
                await b.set_vring_enable(q.index, True)
        self._same_session(session)

    def _drain_kick(self, index: int) -> None:
        try:
            os.eventfd_read(self._kick_fds[index])
        except BlockingIOError:
            pass

    def _release_kicks(self, rings: list[QueueRegs]) -> None:
        """Stop holding the rings' notifications and kick each (spurious kicks are allowed,
        v1.4 §2.7.13), so what the guest published meanwhile is seen."""
        for q in rings:
            self._held_kicks.discard(q.index)
            if self.rings_running and q.set_up and q.index not in self.vmm_queues:
                os.eventfd_write(self._kick_fds[q.index], 1)

    def _start_vmm_queues(self) -> None:
        for index, vq in self.vmm_queues.items():
            if self.queues[index].set_up and vq.queue is None:
                vq.start(self._kick_fds[index], self._saved_base(index))

    def _stop_vmm_queues(self) -> dict[int, RingState]:
        if not self.vmm_queues:
            return {}
        return {i: RingState(i, vq.stop()) for i, vq in self.vmm_queues.items()
                if self.queues[i].set_up}

    def set_active_queues(self, count: int) -> None:
        """The driver chose how many queues it uses (net VQ_PAIRS_SET): enable those only."""
        self.active_queues = count
        if self.started:
            self._submit(Op(OpKind.RECONCILE, ("active-queues",)))

    async def _apply_active_queues(self) -> None:
        if not self.rings_running:
            return
        for q in self._backend_queues():
            if q.set_up:
                await self.backend.set_vring_enable(q.index, self._queue_active(q))

    def _backend_status(self) -> int:
        status = self.shadow.guest_status & ~int(Status.SUSPEND | Status.STOP | Status.NEEDS_RESET)
        if self.shadow.guest_stopped:
            status |= Status.DRIVER_OK
        return status

    # ------------------------------------------------------------------ stop, drain, restart

    async def _stop_rings(self) -> None:
        """Stop every started ring and capture its state (vhost order: disable, then bases)."""
        b = self.backend
        session = self._session
        vmm = self.vmm_queues
        vmm_states = self._stop_vmm_queues() if vmm else None
        live = self._live_rings
        running = [q for q in self.queues if q.index in live and q.index not in vmm]
        held_kicks = self._held_kicks
        held = {q.index for q in running}
        held.difference_update(held_kicks)
        held_kicks |= held
        tap = self.timeline
        suspends = self._caps_bits & _SUSPEND
        try:
            if tap is not None:
                tap.record(EventKind.DRAIN_START, rings=len(running), how="suspend" if suspends else "disable")
            if suspends:
                await b.suspend()
            else:
                await self._disable_and_drain(running)
            if tap is not None:
                tap.record(EventKind.DRAIN_END)
            states = {}
            for q in running:
                index = q.index
                states[index] = state = await b.get_vring_base(index)
                if tap is not None:
                    tap.record(EventKind.GET_VRING_BASE, ring=index, base=state.base)
                if session != self._session:
                    self._same_session(session)
                if not suspends:
                    live.discard(index)
                    self._ledgers.pop(index, None)
        except BaseException:
            held_kicks -= held
            if self.link is LinkState.UP:
                self._kick_all()    # the rings may still run: deliver the kicks held meanwhile
            raise
        held_kicks -= held
        if suspends:
            self._ledgers.clear()
        if vmm_states:
            states.update(vmm_states)
            states = dict(sorted(states.items()))
        self.ring_states = states       # in ring order: the queues are
        self.rings_running = False
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: rings stopped: %s", self.name, sorted(self.ring_states))

    async def _disable_and_drain(self, running: list[QueueRegs]) -> None:
        """QEMU's order: disable, then the bases. The drain target is taken at the hold,
        so the disables overlap the drain's quiet period instead of following it."""
        target = self._drain_target(running)
        # The target counts every buffer published so far, but a kick the guest sent for
        # the last of them may still be on its way (a relaying driver: an L1's) and is
        # dropped by the hold: kick once now (spurious kicks are allowed, v1.4 §2.7.13).
        # A ring whose used idx already reached its avail idx has nothing to be kicked for.
        kick = [q for q, avail, used in target[1] if avail != used] if target[1] else running
        if kick:
            self._kick_rings(kick)
        b = self.backend
        for q in self._disable_order(running):
            await b.set_vring_enable(q.index, False)
        if target[1] and not self._drained(target[1]):
            await self._drain(target)

    def _disable_order(self, running: list[QueueRegs]) -> list[QueueRegs]:
        """virtio-net: every transmitq before any receiveq. A back-end that forwards (testpmd
        io/macswap) drops what it takes from a transmitq once the receiveq is disabled; with
        the transmitqs disabled first, frames the guest sends meanwhile stay in its ring."""
        if self.device_id is DeviceId.NET:
            return [q for q in running if q.index % 2] + [q for q in running if not q.index % 2]
        return running

    def _drain_target(self, running: list[QueueRegs]) -> tuple[float, list[tuple[QueueRegs, int, int]]]:
        """When the hold began, and each ring's avail and used idx then (empty: no drain)."""
        if self.device_id is DeviceId.NET or self.driver_features & _RING_PACKED or not running:
            return 0.0, []
        load = self.memory.load_u16
        return self.loop.time(), [(q, load(q.driver + 2), load(q.device + 2)) for q in running]

    def _drained(self, rings: list[tuple[QueueRegs, int, int]]) -> bool:
        """Every buffer published at the hold is used and none was since: none is in flight."""
        load = self.memory.load_u16
        return all(load(q.device + 2) == avail and load(q.driver + 2) == avail for q, avail, _ in rings)

    async def _drain(self, hold: tuple[float, list[tuple[QueueRegs, int, int]]]) -> None:
        """Let the back-end finish the requests made available before the stop.

        vhost-user says GET_VRING_BASE returns once in-flight requests are done, but
        libvhost-user (qemu-storage-daemon 7.2) answers at once and closes its call fd there:
        a request completing afterwards hits ``eventfd_write(-1)`` and ``vu_panic`` kills the
        device. Guest kicks are held (see :meth:`notify`); wait until each split ring's used
        idx reached the avail idx published when the hold began, then (only if the guest
        published more since) for the used idx to stay quiet for DRAIN_QUIET s. A back-end that
        honours the disable never takes what it had not fetched yet: a used idx still for
        DRAIN_STALL s ends the wait too; one that does not (``disable_stops_fetch()`` False:
        libvhost-user) completes everything kicked before the hold, so that is waited for, however
        slow; what it took since is, as for the others, given DRAIN_QUIET (a guess: only an
        in-flight count is exact). At most DRAIN_TIMEOUT s.
        A backend that counts what it holds (:meth:`~shadowvmm.backends.base.Backend.in_flight`,
        the vhost-user inflight area) is waited for exactly instead: nothing in flight and the
        used idx quiet. Not for virtio-net (receive
        buffers are used only when traffic arrives) nor packed rings (no single used idx to compare).
        """
        quiet_since, rings = hold
        if not rings or self._drained(rings):
            return
        memory = self.memory
        loop = self.loop
        deadline = loop.time() + DRAIN_TIMEOUT
        target = [(q, avail) for q, avail, _ in rings]
        last = [used for _, _, used in rings]   # quiet since the hold unless it moved since
        counted = all(self.backend.in_flight(q.index) is not None for q, _ in target)
        stops_fetch: bool | None = None     # asked only when the rings did not drain at once
        while True:
            if self.link is not LinkState.UP:
                raise BackendDisconnected(f"{self.name}: backend lost while draining") from self._lost_error
            used = [memory.load_u16(q.device + 2) for q, _ in target]
            now = loop.time()
            if used != last:
                last, quiet_since = used, now
            if counted:
                # The backend says what it holds: nothing in flight and a quiet used idx is exact,
                # however slow its requests are (a busy host, a throttled disk).
                if now - quiet_since >= DRAIN_QUIET and not any(self.backend.in_flight(q.index)
                                                                for q, _ in target):
                    return
            else:
                reached = all((u - avail) & 0xFFFF < 0x8000 for u, (_, avail) in zip(used, target))
                if reached and all(memory.load_u16(q.driver + 2) == avail for q, avail in target):
                    return      # nothing published since the hold: nothing else can be in flight
                quiet = now - quiet_since
                if reached and quiet >= DRAIN_QUIET:
                    return
                if stops_fetch is None:
                    stops_fetch = self.backend.disable_stops_fetch()
                if stops_fetch and quiet >= DRAIN_STALL:
                    return      # what it had not fetched at the disable it never will
            if now >= deadline:
                logger.warning("%s: requests still in flight %.1f s into a stop; stopping anyway",
                            self.name, DRAIN_TIMEOUT)
                return
            await asyncio.sleep(DRAIN_POLL)

    async def _restart_rings(self) -> None:
        b = self.backend
        caps = self.backend_caps
        rings = [q for q in self._backend_queues() if q.set_up]
        if not self._mem_table_sent:
            # The DMA space changed while stopped (:meth:`_op_dma_space`): a full restart.
            caps = Capability.NONE
        if caps & Capability.RESUME:
            # The suspended rings continue; a ring the guest reset and set up again meanwhile
            # is not among them and starts like a new one.
            session = self._session
            await b.resume()
            self._same_session(session)
            rings = [q for q in rings if q.index not in self._live_rings]
        elif not caps & Capability.RING_RESTART:
            await b.reset()
            self.started = False
            self._live_rings.clear()
            self._mem_table_sent = False
            await self._start()
            return
        # RING_RESTART: the call fd first (QEMU's order): libvhost-user closed it at
        # GET_VRING_BASE, and SET_VRING_KICK restarts the ring, which completes pending
        # requests at once.
        try:
            await self._program_rings(rings)
            self.rings_running = True
            self._start_vmm_queues()
        finally:
            self._release_kicks(rings)
        self._kick_all()
        logger.debug("%s: rings restarted", self.name)

    def _signal_rings(self, rings: list[QueueRegs]) -> None:
        """Interrupt the guest once per ring after a lost session: a back-end killed between
        publishing a used entry and signalling it left a completion nobody announced, and the
        new session has no reason to (a spurious interrupt is allowed, v1.4 §2.7.10)."""
        for q in rings:
            os.eventfd_write(self.call_fd(q.index), 1)

    def _kick_rings(self, rings: list[QueueRegs]) -> None:
        for q in rings:
            os.eventfd_write(self._kick_fds[q.index], 1)

    def _kick_all(self) -> None:
        """Spurious kicks are allowed (v1.4 §2.7.13): wake every started ring."""
        for q in self.queues:
            if q.set_up:
                os.eventfd_write(self._kick_fds[q.index], 1)

    # ------------------------------------------------------------------ dirty log

    async def start_dirty_log(self, log: DirtyLog) -> None:
        """Make the backend mark its guest-memory writes in *log* (QEMU vhost_migration_log order).

        vhost-user: SET_LOG_BASE (LOG_SHMFD, the log's memfd), SET_FEATURES
        with LOG_ALL, then SET_VRING_ADDR with the LOG flag for every started
        ring. A backend with :attr:`Capability.SHARED_MEMORY` (inproc) writes through this
        device's GuestMemory, which marks the log (:meth:`GuestMemory.write`): it needs nothing.
        """
        b = self.backend
        if self._has_cap(Capability.SHARED_MEMORY):
            return
        if not self._has_cap(Capability.DIRTY_LOG):
            raise UnsupportedError(f"{self.name}: backend {b.implementation!r} cannot log dirty pages")
        await self.settle()
        await b.set_log_base(log.fd, log.size)
        await b.set_dirty_logging(True)
        self.dirty_logging = True
        self._dirty_log = log
        logger.info("%s: backend dirty logging on", self.name)
        if self.rings_running:
            await self._set_ring_logging(True)

    async def stop_dirty_log(self) -> None:
        """Undo :meth:`start_dirty_log`: SET_FEATURES without LOG_ALL, ring addresses without LOG."""
        b = self.backend
        if self._has_cap(Capability.SHARED_MEMORY) or not self._has_cap(Capability.DIRTY_LOG):
            return
        if self.run_state is RunState.FAILED:
            return
        await self.settle()
        await b.set_dirty_logging(False)
        self.dirty_logging = False
        self._dirty_log = None
        logger.info("%s: backend dirty logging off", self.name)
        if self.rings_running:
            await self._set_ring_logging(False)

    async def _set_ring_logging(self, enabled: bool) -> None:
        for q in self.queues:
            if q.set_up:
                await self.backend.set_vring_addr(VringAddr(q.index, q.desc, q.driver, q.device,
                                                            log=q.device, log_enabled=enabled))
