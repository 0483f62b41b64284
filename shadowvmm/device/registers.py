"""The guest-visible registers: features, status, queue registers, device config.

Guest register accesses are synchronous and never raise: a bad access is
ignored, counted and logged (:class:`~shadowvmm.shadow.FaultCounter`).
Anything that needs the backend becomes an operation for the worker
(:mod:`.worker`), so the guest never waits on a socket inside a register
access. The read and write of ``device_status`` are the hot path: nothing is
logged on it unless the write changes what the device must do.
"""

from __future__ import annotations

import logging
import os

from ..backends.base import Capability, RingState
from ..errors import GuestMemoryError, RingError
from ..lifecycle import DeviceEventKind, LinkState
from ..shadow import RING_STATE_RUNNING_VALUE, GuestFault, GuestStatusAction, RunState
from ..timeline import EventKind
from ..virtio.constants import NO_VECTOR, Feature, Status
from ..virtio.packed import PackedLayout
from ..virtio.split import SplitLayout
from .core import QueueRegs
from .ops import Op, OpKind
from .worker import WorkerMixin

log = logging.getLogger(__name__)

#: How a status write that asks something of the device is logged.
_ACTION_NAMES = {GuestStatusAction.RESET: "reset requested", GuestStatusAction.FEATURES_OK: "FEATURES_OK",
                 GuestStatusAction.DRIVER_OK: "DRIVER_OK", GuestStatusAction.GUEST_STOP: "suspend requested",
                 GuestStatusAction.GUEST_RESUME: "resume requested"}


class RegistersMixin(WorkerMixin):
    """Guest register reads and writes (module docstring)."""

    # ------------------------------------------------------------------ features

    def read_device_features(self) -> int:
        """The 32-bit word selected by device_feature_select (0 past the end)."""
        sel = self.device_feature_select
        return (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 4 else 0

    def read_driver_features(self) -> int:
        sel = self.driver_feature_select
        return (self.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 4 else 0

    def write_driver_features(self, value: int) -> None:
        if self.shadow.guest_status & Status.FEATURES_OK:
            self.faults(GuestFault.FEATURES_LATE, f"{value:#x}")
            return
        sel = self.driver_feature_select
        if sel >= 4:
            self.faults(GuestFault.FEATURES_REFUSED, f"driver_feature_select {sel}")
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def negotiated(self, feature: int) -> bool:
        return bool(self.shadow.guest_status & Status.FEATURES_OK and self.driver_features & feature)

    # ------------------------------------------------------------------ status

    def read_status(self) -> int:
        return self.shadow._status

    def write_status(self, value: int) -> None:
        if value and value == self.shadow._status:
            return      # the status rewritten as read: no transition (what shadow.write returns)
        action = self.shadow.write(value)
        if action is GuestStatusAction.NONE:
            return
        log.info("%s: guest wrote status %#04x: %s", self.name, value, _ACTION_NAMES[action])
        if action is GuestStatusAction.RESET:
            self._guest_reset()
        elif action is GuestStatusAction.FEATURES_OK:
            self._features_ok()
            if self.shadow.guest_status & Status.DRIVER_OK:
                self._submit(Op(OpKind.RECONCILE))
        elif action in (GuestStatusAction.DRIVER_OK, GuestStatusAction.GUEST_STOP,
                        GuestStatusAction.GUEST_RESUME):
            if action is GuestStatusAction.GUEST_STOP and self.timeline is not None:
                self.timeline.record(EventKind.STOP_START, by="guest")
            self._submit(Op(OpKind.RECONCILE))

    def _features_ok(self) -> None:
        offered = self.device_features
        accepted = self.driver_features
        if accepted & ~offered or not accepted & Feature.VERSION_1:
            self.faults(GuestFault.FEATURES_REFUSED,
                        f"accepted {accepted:#x}, offered {offered:#x}")
            self.shadow.refuse_features()
            return
        dialect_bit = self.policy.dialect.feature
        self.shadow.dialect_negotiated = bool(dialect_bit and accepted & dialect_bit)

    def _guest_reset(self) -> None:
        """Guest wrote 0 (v1.4 §2.1): status reads 0 once the backend really stopped.

        The reset is an operation like any other, carried out after every one queued
        before it (a start still under way is finished, then undone). Only a device
        whose backend was never touched, with nothing queued, completes at once.
        While the reset is carried out the registers keep their values (the stop
        sequence needs the rings' set-up); they are cleared when it completes.

        A reset of a device whose status already reads 0 completes at once too: the
        driver cannot tell it from a finished one (it goes on as soon as it reads 0), so a
        backend reset still owed (state of a lost session) is done before the next start.
        """
        idle = not self._backend_touched and not self._ops and not self._op_running
        if (idle and self.link is LinkState.UP) or (self.shadow.guest_status == 0 and not self._lost_rings):
            if self._backend_touched:
                self._backend_reset_owed = True
            self._complete_reset()
            return
        self._submit(Op(OpKind.RECONCILE))

    def _complete_reset(self) -> None:
        self._forget_started()
        self.failure = None
        self._clear_guest_registers()
        if self.run_state is RunState.FAILED:
            self._set_run_state(RunState.STOPPED if self._vmm_stop else RunState.RUNNING)
        self.shadow.reset_done()
        log.info("%s: guest reset complete", self.name)
        self.events.emit(DeviceEventKind.RESET)

    def _forget_started(self) -> None:
        """Drop everything derived from a started device (the one place a reset clears it)."""
        self.started = False
        self.rings_running = False
        self._staged = None
        self.ring_states.clear()
        self._live_rings.clear()
        self._ledgers.clear()
        for vq in self.vmm_queues.values():
            vq.stop()
        self.vmm_queues = {}
        self.active_queues = None
        self._held_kicks.clear()
        self._config_writes.clear()
        if self._held_config is not None:
            self._set_config(self._held_config)
            self._held_config = None

    def _clear_guest_registers(self) -> None:
        for q in self.queues:
            q.clear()
        if self.admin_queue is not None:
            self.admin_queue.clear()
        if self.admin is not None:
            self.admin.reset()
        # A member's reset clears its stopped mode and device parts (v1.4 §2.12.1.4).
        self._admin_stop = False
        self.driver_features = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.config_msix_vector = NO_VECTOR
        self.isr = 0

    # ------------------------------------------------------------------ queues

    def selected_queue(self) -> QueueRegs | None:
        return self.queue_regs(self.queue_select)

    def _writable_queue(self) -> QueueRegs | None:
        q = self.selected_queue()
        if q is None:
            self.faults(GuestFault.QUEUE_SELECT, f"{self.queue_select}")
            return None
        if q.enabled:
            self.faults(GuestFault.QUEUE_LIVE, f"queue {q.index}")
            return None
        return q

    def write_queue_size(self, value: int) -> None:
        q = self._writable_queue()
        if q is None:
            return
        packed = bool(self.driver_features & Feature.RING_PACKED)
        if not 0 < value <= q.max_size or (not packed and value & (value - 1)):
            self.faults(GuestFault.QUEUE_SIZE, f"queue {q.index} size {value}")
            return
        q.size = value
        if q.ring_base is not None and not self._ring_state_fits(q, q.ring_base):
            self.faults(GuestFault.RING_STATE_INVALID, f"queue {q.index}: size {value} drops state {q.ring_base:#x}")
            q.ring_base = None

    def write_queue_addr(self, field_name: str, value: int, high: bool) -> None:
        q = self._writable_queue()
        if q is None:
            return
        old = getattr(q, field_name)
        if high:
            new = (old & 0xFFFFFFFF) | (value & 0xFFFFFFFF) << 32
        else:
            new = (old & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
        setattr(q, field_name, new)

    def write_queue_vector(self, value: int) -> None:
        q = self.selected_queue()
        if q is None:
            self.faults(GuestFault.QUEUE_SELECT, f"{self.queue_select}")
            return
        assert self.interrupts is not None
        q.msix_vector = value if value < self.interrupts.vectors else NO_VECTOR
        if self.started and q is not self.admin_queue:
            self._submit(Op(OpKind.VECTOR, (q.index,)))

    def write_config_vector(self, value: int) -> None:
        assert self.interrupts is not None
        self.config_msix_vector = value if value < self.interrupts.vectors else NO_VECTOR

    def write_queue_enable(self, value: int) -> None:
        q = self.selected_queue()
        if q is None:
            self.faults(GuestFault.QUEUE_SELECT, f"{self.queue_select}")
            return
        if value == 0:
            if q.enabled:
                self.faults(GuestFault.QUEUE_DISABLE, f"queue {q.index}")
            return
        if q.enabled:
            return
        try:
            self._validate_queue(q)
        except (RingError, GuestMemoryError) as exc:
            self.faults(GuestFault.QUEUE_SIZE, f"queue {q.index}: {exc}")
            return
        q.enabled = True
        if self.started and q is not self.admin_queue:
            self._submit(Op(OpKind.QUEUE_START, (q.index,)))

    def _validate_queue(self, q: QueueRegs) -> None:
        layout: PackedLayout | SplitLayout
        if self.driver_features & Feature.RING_PACKED:
            layout = PackedLayout(q.size, q.desc, q.driver, q.device)
        else:
            layout = SplitLayout(q.size, q.desc, q.driver, q.device)
        layout.validate()
        layout.check_memory(self.memory)

    def write_queue_reset(self, value: int) -> None:
        """Per-queue reset (v1.2 VIRTIO_F_RING_RESET, v1.4 §2.6.1)."""
        q = self.selected_queue()
        if q is None:
            self.faults(GuestFault.QUEUE_SELECT, f"queue_reset on {self.queue_select}")
        elif q is self.admin_queue:
            self.faults(GuestFault.READ_ONLY, "queue_reset of the admin queue (reset the owner instead)")
        elif value != 1 or not self.negotiated(Feature.RING_RESET):
            self.faults(GuestFault.READ_ONLY, "queue_reset without RING_RESET")
        else:
            self.reset_queue(q)

    def reset_queue(self, q: QueueRegs) -> None:
        """Stop one queue and return its registers to defaults (also MMIO QueueReady=0)."""
        q.resetting = True
        self._submit(Op(OpKind.QUEUE_RESET, (q.index,)))

    # ------------------------------------------------------------------ ring state (docs/nested.md)

    def _ring_state_queue(self) -> QueueRegs | None:
        """The selected queue if VIRTIO_F_RING_STATE is negotiated; else count why not."""
        ring_state = self.policy.dialect.ring_state
        if not (ring_state and self.negotiated(ring_state)):
            self.faults(GuestFault.RING_STATE_NOT_NEGOTIATED, f"queue_select {self.queue_select}")
            return None
        q = self.selected_queue()
        if q is None:
            self.faults(GuestFault.QUEUE_SELECT, f"ring state of {self.queue_select}")
        return q

    def read_ring_state(self) -> int:
        """The selected queue's state in the vhost base encoding while the guest's STOP is complete:
        the state captured at the stop, else the one the ring would start from."""
        q = self._ring_state_queue()
        if q is None:
            return 0
        if not self.shadow.guest_stopped:
            self.faults(GuestFault.RING_STATE_RUNNING, f"queue {q.index}")
            return RING_STATE_RUNNING_VALUE
        state = self.ring_states.get(q.index)
        return state.base if state is not None else self._saved_base(q.index)

    def write_ring_state(self, value: int) -> None:
        """Between FEATURES_OK and DRIVER_OK: the selected queue's ring starts from *value*."""
        q = self._ring_state_queue()
        if q is None:
            return
        status = self.shadow.guest_status
        if not status & Status.FEATURES_OK or status & Status.DRIVER_OK or self.shadow.guest_stopped:
            self.faults(GuestFault.RING_STATE_WRITE_TIME, f"queue {q.index} status {status:#x}")
            return
        if not self._ring_state_fits(q, value):
            self.faults(GuestFault.RING_STATE_INVALID, f"queue {q.index} size {q.size} state {value:#x}")
            return
        q.ring_base = value

    def _saved_base(self, index: int) -> int:
        """Ring base for SET_VRING_BASE: the captured state, else the one the driver wrote
        (VIRTIO_F_RING_STATE), else a fresh ring's.

        A fresh packed ring starts with both wrap counters at 1 (v1.4 §2.8.1).
        """
        state = self.ring_states.get(index)
        if state is not None:
            return state.base
        written = self.queues[index].ring_base
        if written is not None:
            return written
        if self.driver_features & Feature.RING_PACKED:
            return RingState.packed(index, 0, True, 0, True).base
        return 0

    def _ring_state_fits(self, q: QueueRegs, value: int) -> bool:
        """Split: a 16-bit avail idx; packed: both 15-bit idx fields below the queue size."""
        if not self.driver_features & Feature.RING_PACKED:
            return 0 <= value <= 0xFFFF
        return (value & 0x7FFF) < q.size and (value >> 16 & 0x7FFF) < q.size

    def interrupt_routing_changed(self) -> None:
        """MSI-X was enabled or disabled: rewire every queue's call fd."""
        if self.started:
            for q in self.queues:
                self._submit(Op(OpKind.VECTOR, (q.index,)))

    def notify(self, value: int) -> None:
        """Available-buffer notification (v1.4 §4.1.5.2): kick the backend's eventfd."""
        index = value & 0xFFFF
        q = self.queue_regs(index)
        if q is None or not q.enabled:
            self.faults(GuestFault.NOTIFY_INVALID, f"queue {index}")
            return
        self.stats.kicks += 1
        if index in self._held_kicks:
            return      # a start or stop is under way on this ring; it ends with a kick
        os.eventfd_write(self._kick_fds[index], 1)

    # ------------------------------------------------------------------ config

    def _guest_suspended(self) -> bool:
        return self.shadow.guest_stopped or self.shadow.guest_stop_requested

    def read_config(self, offset: int, width: int) -> int:
        if offset < 0 or offset + width > len(self.config):
            self.faults(GuestFault.CONFIG_RANGE, f"read {offset}+{width}")
            return 0
        return int.from_bytes(self.config[offset:offset + width], "little")

    def write_config(self, offset: int, width: int, value: int) -> None:
        """A driver config write; ignored while the guest has the device suspended or stopped
        (v1.4 §3.4: the device SHOULD ignore it, the driver MUST NOT do it)."""
        if offset < 0 or offset + width > len(self.config):
            self.faults(GuestFault.CONFIG_RANGE, f"write {offset}+{width}")
            return
        if self._guest_suspended():
            self.faults(GuestFault.CONFIG_WHILE_STOPPED, f"write {offset}+{width}")
            return
        data = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        self.config[offset:offset + width] = data
        if self._has_cap(Capability.CONFIG):
            self._config_writes[offset] = data
            self._submit(Op(OpKind.CONFIG_WRITE, (offset, data)))

    def update_config(self, data: bytes) -> None:
        """A device-side config change: bump config_generation and notify (v1.4 §2.5.1).

        While the guest has the device suspended (or stopped) the change and its
        notification wait for the resume (v1.4 §3.4: no config change, no notification
        while suspended); a reset applies it without one.
        """
        if bytes(data) == bytes(self.config if self._held_config is None else self._held_config):
            return
        if self._guest_suspended():
            self._held_config = bytes(data)
            return
        if self._set_config(data) and self.shadow.driver_ok:
            self._config_interrupt()

    def _set_config(self, data: bytes) -> bool:
        if bytes(data) == bytes(self.config):
            return False
        self.config = bytearray(data)
        self.config_generation = (self.config_generation + 1) & 0xFF
        return True

    def _release_held_config(self) -> None:
        held, self._held_config = self._held_config, None
        if held is not None:
            self.update_config(held)
