"""The ordered op worker: everything that needs the backend, one operation at a time.

Guest register accesses never wait on a socket: what needs the backend
becomes an :class:`~.ops.Op` on one ordered queue, served by a worker task
(or, with nothing queued, at once in a caller that awaits it). Any exception
in an operation leaves the device FAILED with DEVICE_NEEDS_RESET (v1.4
§2.1.2), never a dead worker.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import BackendError, DeviceStateError, GuestMemoryError, IncompatibleStateError, RingError
from ..lifecycle import DeviceEventKind, LinkState
from ..shadow import RunState
from ..virtio.constants import Status
from .interrupts import InterruptsMixin
from .ops import RECONCILE, Op, OpKind

log = logging.getLogger(__name__)

#: Operations a failed device still carries out (the guest's reset; a reconnect; an IOMMU change).
_WHEN_FAILED = (OpKind.RECONCILE, OpKind.RECONNECT, OpKind.DMA_SPACE)


class WorkerMixin(InterruptsMixin):
    """Submit, carry out and fail operations (module docstring)."""

    def _submit(self, op: Op) -> None:
        self._ops.append(op)
        if self._wake is not None:
            self._wake.set()

    async def _submit_wait(self, op: Op) -> None:
        """Carry out *op* after every queued one and wait for it.

        With nothing queued or running it runs at once in the caller's task: the same order
        as through the worker, without the two event-loop hops (worker wake-up, completion)
        that otherwise each wait behind every other ready callback. Cancelling the caller
        then cancels the operation midway, which fails the device (DEVICE_NEEDS_RESET).
        A reconcile cut short by a backend being reconnected runs again once it is back.
        *op* itself is never queued (a copy with its own ``done`` is): a constant op such as
        :data:`~.ops.RECONCILE` can be passed.
        """
        while True:
            try:
                if self._wake is None:
                    raise DeviceStateError(f"{self.name}: not realized")
                if not self._ops and not self._op_running:
                    try:
                        await self._run_op(op)
                    except asyncio.CancelledError:
                        self._fail(DeviceStateError(f"{self.name}: {op.kind.name} cancelled midway"))
                        raise
                else:
                    done = self.loop.create_future()
                    self._submit(Op(op.kind, op.args, done))
                    await done
                return
            except BackendError:
                if op.kind is not OpKind.RECONCILE or self.link is not LinkState.RECONNECTING:
                    raise
            await self._wait_link()
            op = Op(op.kind, op.args)

    async def _run_op(self, op: Op) -> None:
        """Run one operation; any error fails the device unless the backend session died
        under it (then the loss handling owns the recovery)."""
        self._op_running = True
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            if self.run_state is not RunState.FAILED or op.kind in _WHEN_FAILED:
                if debug:
                    log.debug("%s: op %s%s", self.name, op.kind.value, op.args or "")
                await self._op_handlers[op.kind](*op.args)
                if debug:
                    log.debug("%s: op %s done", self.name, op.kind.value)
            elif debug:
                log.debug("%s: op %s skipped: the device failed", self.name, op.kind.value)
        except asyncio.CancelledError:
            if debug:
                log.debug("%s: op %s cancelled", self.name, op.kind.value)
            raise
        except Exception as exc:
            if not (isinstance(exc, BackendError) and self.link is not LinkState.UP):
                if not isinstance(exc, (BackendError, RingError, GuestMemoryError, OSError,
                                        IncompatibleStateError)):
                    log.exception("%s: %s failed unexpectedly", self.name, op.kind.value)
                self._fail(exc)
            if debug:
                log.debug("%s: op %s failed: %s", self.name, op.kind.value, exc)
            raise
        finally:
            self._op_running = False
            if self._ops and self._wake is not None:
                self._wake.set()

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            if not self._ops or self._op_running:
                self._wake.clear()
                await self._wake.wait()
                continue
            op = self._ops.popleft()
            try:
                await self._run_op(op)
            except Exception as exc:
                if op.done is not None and not op.done.done():
                    op.done.set_exception(exc)
                continue
            if op.done is not None and not op.done.done():
                op.done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        """Backend failure: DEVICE_NEEDS_RESET + config interrupt (v1.4 §2.1.2)."""
        first = self.run_state is not RunState.FAILED
        if first:
            log.error("%s: backend failed, the guest sees DEVICE_NEEDS_RESET: %s", self.name, exc)
            self.failure = exc
            self.events.emit(DeviceEventKind.FAILED, str(exc), exc)
        self._set_run_state(RunState.FAILED)
        self.rings_running = False
        self.shadow.needs_reset()
        if first and self.shadow.guest_status & Status.DRIVER_OK:
            self._config_interrupt()

    async def settle(self) -> None:
        """Wait until every queued guest-triggered operation has been carried out.

        Register writes return to the guest at once and their effect (a DRIVER_OK starts the
        backend) runs on the device's worker; this is the point where it has. Guest driver
        models await it in ``start()`` (:meth:`GuestDevice.started`, through their transport),
        and :func:`shadowvmm.testing.ready.ready_device` before it yields. A backend being
        reconnected is waited for (what it takes is carried out once it is back). A device
        that failed shows DEVICE_NEEDS_RESET (:attr:`failure` says why).
        """
        while True:
            await self._submit_wait(RECONCILE)
            if self.link is not LinkState.RECONNECTING:
                return
            await self._wait_link()
