"""The backend link: a lost session, the reconnect policy, and the ring ledgers that let rings resume.

A backend whose session dies is noticed at once (its ``DISCONNECTED`` event)
and handled by the :class:`~shadowvmm.lifecycle.ReconnectPolicy`: the rings
of a resumable device are parked where they stood and resumed on a new
session, or the guest is told (DEVICE_NEEDS_RESET). The split rings of a
backend without in-flight tracking are followed by a ledger
(:class:`~shadowvmm.virtio.ledger.SplitLedger`) so their outstanding requests
are known exactly when the session is lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..backends.base import BackendEvent, BackendEventKind, Capability, RingState
from ..errors import BackendDisconnected, BackendError, IncompatibleStateError
from ..lifecycle import DeviceEventKind, LinkState
from ..shadow import RunState
from ..virtio.constants import DeviceId, Feature, Status
from ..virtio.ledger import SplitLedger
from ..virtio.split import SplitLayout
from .core import DRAIN_POLL, QUICK_RETRIES, QUICK_RETRY, SESSION_QUIET, SESSION_QUIET_TIMEOUT, QueueRegs
from .ops import Op, OpHandler, OpKind
from .registers import RegistersMixin

log = logging.getLogger(__name__)

#: Device types whose backend keeps nothing a new session could not be given again: their rings
#: resume transparently after a reconnect. virtio-fs is not among them: a FUSE session (looked-up
#: inodes, open handles, locks) dies with its daemon, so the guest must reset and mount again.
RESUMABLE_TYPES = frozenset({DeviceId.BLOCK, DeviceId.NET, DeviceId.RNG, DeviceId.CONSOLE,
                             DeviceId.SCSI, DeviceId.VSOCK, DeviceId.INPUT})


class LinkMixin(RegistersMixin):
    """Backend loss, reconnection and ring tracking (module docstring)."""

    if TYPE_CHECKING:
        # carried out by the sequencer (.sequencer), which sits above this seam
        async def _op_reconcile(self, *why: str) -> None: ...

    def _op_table(self) -> dict[OpKind, OpHandler]:
        return {**super()._op_table(), OpKind.RECONNECT: self._op_reconnect}

    async def reconnect(self) -> None:
        """Connect the backend again now, without waiting for the policy's next attempt.

        For a VMM that restarted the backend itself. Within the policy's deadline the
        rings resume where they stood; a device already showing NEEDS_RESET only gets
        its session back (the guest's reset then completes at once). Raises the
        connection error if the backend does not answer.
        """
        self._require_realized()
        if self.link is LinkState.UP:
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        await self._submit_wait(Op(OpKind.RECONNECT, (True,)))

    def _on_backend_event(self, event: BackendEvent) -> None:
        if event.kind is BackendEventKind.CONFIG_CHANGED:
            # Coalesced: one refresh reads the config as it is then, whatever the number of
            # notifications before it (a back-end storm queues one GET_CONFIG, not thousands).
            if not self._config_refresh_queued:
                self._config_refresh_queued = True
                self._submit(Op(OpKind.RECONCILE, ("refresh-config",)))
        elif event.kind is BackendEventKind.DISCONNECTED:
            self._backend_lost(event.error)
        elif event.kind is BackendEventKind.ERROR:
            self._fail(event.error or BackendError(f"{self.name}: the device reported an error"))

    # ------------------------------------------------------------------ a lost session

    def _backend_lost(self, error: BaseException | None) -> None:
        """The backend session died: park the rings, then reconnect or tell the guest."""
        if self.link is not LinkState.UP or not self._realized:
            return
        error = error or BackendDisconnected(f"{self.name}: backend session lost")
        self._session += 1
        self._lost_at = self.clock()
        self._lost_error = error
        self.events.emit(DeviceEventKind.BACKEND_LOST, str(error), error)
        log.warning("%s: backend lost: %s (reconnect %s)", self.name, error, self.reconnect_policy.describe())
        handed = sorted(self._live_rings)
        self._backend_touched = True     # the plugin may keep state across sessions (an inflight area)
        self.rings_running = False
        self.started = False
        self._mem_table_sent = False
        self._fresh_session = True
        self._staged = None
        self._held_kicks.clear()
        self._live_rings.clear()
        self._lost_rings = handed
        reason = self._resumable()
        if reason is None and self.run_state is not RunState.FAILED:
            self._set_link(LinkState.RECONNECTING)
            deadline = self.reconnect_policy.deadline
            if deadline is not None:
                self._deadline = self.loop.call_later(deadline, self._deadline_passed)
            self._schedule_reconnect(0.0)
        else:
            self._set_link(LinkState.DOWN)
            if reason:
                log.warning("%s: %s", self.name, reason)
            self._fail(error)
            if self.shadow.reset_pending:
                self._schedule_reconnect(0.0)
        self._wake_link_waiters()

    def _resumable(self) -> str | None:
        """Why the rings of a lost session cannot resume transparently (None: they may)."""
        if not self.reconnect_policy.enabled:
            return "reconnect is off"
        if not self._has_cap(Capability.RECONNECT):
            return f"backend {self.backend.implementation!r} cannot reconnect"
        if self._lost_rings and self.device_id not in RESUMABLE_TYPES:
            return f"a {self.device_id.name} backend keeps session state a new session lacks"
        return None

    async def _session_over(self) -> bool:
        """Wait until the lost session can no longer write guest memory.

        A peer that closed its socket may still complete the requests it had (qemu-storage-
        daemon's block-export-del does) and write used entries. Over when its process has no
        address space any more (:meth:`Backend.lost_peer_alive`), or when the used idx of the
        rings it had stayed still for :data:`SESSION_QUIET` s; False if they still move after
        :data:`SESSION_QUIET_TIMEOUT` s (the old session is alive: nothing may restart).
        """
        rings = [self.queues[i] for i in self._lost_rings]
        if not rings or self.backend.lost_peer_alive() is False:
            return True
        load = self.memory.load_u16
        loop = self.loop
        since = start = loop.time()
        last = [load(q.device + 2) for q in rings]
        while True:
            await asyncio.sleep(DRAIN_POLL * 10)
            for ledger in self._ledgers.values():
                ledger.sample()
            now = loop.time()
            used = [load(q.device + 2) for q in rings]
            if used != last:
                last, since = used, now
            elif now - since >= SESSION_QUIET or self.backend.lost_peer_alive() is False:
                return True
            if now - start >= SESSION_QUIET_TIMEOUT:
                return False

    def _park_rings(self) -> str | None:
        """Where each ring the lost session had must resume; a reason if it cannot be exact."""
        handed, self._lost_rings = self._lost_rings, []
        bases: dict[int, RingState] = {}
        packed = bool(self.driver_features & Feature.RING_PACKED)
        for index in handed:
            q = self.queues[index]
            if packed:
                return f"ring {index}: packed rings resume only from the backend's own state"
            if self._has_cap(Capability.INFLIGHT):
                # The new session resubmits from the inflight area (used idx + in-flight ones).
                bases[index] = RingState(index, self.memory.load_u16(q.device + 2))
                continue
            ledger = self._ledgers.get(index)
            base = ledger.repack() if ledger is not None else None
            if base is None:
                return f"ring {index}: the outstanding requests are not known exactly"
            bases[index] = RingState(index, base)
        self.ring_states.update(bases)
        self._ledgers.clear()          # the tracker task ends by itself with nothing to follow
        return None

    def _deadline_passed(self) -> None:
        self._deadline = None
        error = BackendDisconnected(f"{self.name}: backend not back within {self.reconnect_policy.deadline:g} s")
        error.__cause__ = self._lost_error
        self._give_up(error)

    def _give_up(self, error: BaseException) -> None:
        """Stop trying to resume transparently: the guest is told (NEEDS_RESET)."""
        if self.link is LinkState.RECONNECTING:
            self._set_link(LinkState.DOWN)
            self._fail(error)
            self._wake_link_waiters()

    def _schedule_reconnect(self, delay: float | None = None) -> None:
        """Queue a connection attempt after *delay* (default: the policy's interval), or as soon
        as the backend's endpoint shows up again (:meth:`Backend.wait_for_endpoint`)."""
        if self._retry is not None or not self._realized:
            return
        if delay is None:
            delay = self.reconnect_policy.interval
            if self._quick_retries:
                # the endpoint just appeared: its server may bind before it listens
                self._quick_retries -= 1
                delay = min(delay, QUICK_RETRY)

        async def attempt() -> None:
            if delay and await self.backend.wait_for_endpoint(delay):
                self._quick_retries = QUICK_RETRIES
            self._retry = None
            self._submit(Op(OpKind.RECONNECT))

        self._retry = self.loop.create_task(attempt(), name=f"{self.name}-reconnect")

    def _cancel_timers(self) -> None:
        for handle in (self._retry, self._deadline):
            if handle is not None:
                handle.cancel()
        self._retry = self._deadline = None

    async def _op_reconnect(self, explicit: bool = False) -> None:
        if self.link is LinkState.UP:
            return
        if self._lost_rings:
            # Nothing may touch the rings (repack, restart, a reset reusing their memory)
            # while the lost session can still write them.
            if not await self._session_over():
                self._give_up(BackendDisconnected(f"{self.name}: the lost backend session still completes "
                                                  f"requests {SESSION_QUIET_TIMEOUT:g} s later"))
                if self.shadow.reset_pending:
                    self._schedule_reconnect()
                return
            reason = self._park_rings() if self.link is LinkState.RECONNECTING else None
            self._lost_rings = []
            self._ledgers.clear()
            if reason is not None:
                log.warning("%s: %s", self.name, reason)
                self._give_up(self._lost_error or BackendDisconnected(reason))
                if not self.shadow.reset_pending:
                    return
        try:
            await self.backend.connect()
            await self._check_new_session()
        except (BackendError, OSError, IncompatibleStateError) as exc:
            self.events.emit(DeviceEventKind.RECONNECT_ATTEMPT_FAILED, str(exc), exc)
            if isinstance(exc, IncompatibleStateError):
                await self.backend.close()
                if self.link is LinkState.RECONNECTING:
                    self._deadline_passed()
                raise
            if self.link is LinkState.RECONNECTING or self.shadow.reset_pending:
                self._schedule_reconnect()
            if explicit:
                raise
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.backend_caps = self.backend.capabilities()
        self._set_link(LinkState.UP)
        self.stats.reconnects += 1
        after = f"{(self.clock() - self._lost_at) * 1e3:.1f} ms after the loss"
        log.info("%s: backend reconnected %s", self.name, after)
        self.events.emit(DeviceEventKind.RECONNECTED, after)
        self._wake_link_waiters()
        await self._op_reconcile()

    async def _check_new_session(self) -> None:
        """Refuse a backend that came back unable to serve what the guest negotiated; a guest
        that will negotiate again (reset pending, or never got as far) is offered what the
        new session offers."""
        features = int(await self.backend.get_features())
        if self.shadow.reset_pending or not self.shadow.guest_status & Status.FEATURES_OK:
            self.backend_features = features
            self.device_features = self.policy.offer(features)
            return
        missing = self.driver_features & ~self.policy.offer(features)
        if missing:
            raise IncompatibleStateError(f"{self.name}: the backend came back without features {missing:#x} "
                                         "the guest negotiated")

    # ------------------------------------------------------------------ ring tracking

    def _tracking_wanted(self) -> bool:
        return (self.reconnect_policy.enabled and bool(self._has_cap(Capability.RECONNECT))
                and not self._has_cap(Capability.INFLIGHT) and self.device_id in RESUMABLE_TYPES
                and not self.driver_features & Feature.RING_PACKED)

    def _track_ring(self, q: QueueRegs, base: int) -> None:
        if not self._tracking_wanted():
            return
        self._ledgers[q.index] = SplitLedger(self.memory, SplitLayout(q.size, q.desc, q.driver, q.device), base)
        if self._tracker is None:
            self._tracker = self.loop.create_task(self._track(), name=f"{self.name}-ring-ledger")

    async def _track(self) -> None:
        interval = self.reconnect_policy.track_interval
        while self._ledgers:
            await asyncio.sleep(interval)
            for ledger in list(self._ledgers.values()):
                ledger.sample()
        self._tracker = None

    async def _stop_tracking(self) -> None:
        task, self._tracker = self._tracker, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
