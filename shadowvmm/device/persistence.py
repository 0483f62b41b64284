"""Persistence: the device's migratable state out and in, and a destination's staging.

:meth:`PersistenceMixin.export_state` captures the registers, the status
shadow, the ring bases, the standard part of the device type and the
backend's opaque state as a :class:`~shadowvmm.state.DeviceState`, with what
the transport saves of itself (:class:`~shadowvmm.state.TransportImage`);
:meth:`PersistenceMixin.import_state` applies one to a fresh device. A
migration destination stages the start messages that do not depend on the
state (:meth:`PersistenceMixin.prestage`) while it waits for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..backends.base import Capability
from ..errors import BackendError, DeviceStateError, IncompatibleStateError
from ..lifecycle import LinkState
from ..shadow import RunState
from ..state import (
    STANDARD_TYPES,
    AdminState,
    DeviceState,
    OpaquePart,
    QueueState,
    RingPart,
    StatefulTransport,
    TransportImage,
    TransportState,
)
from ..virtio.constants import NO_VECTOR, Feature, Status
from .core import Staged
from .sequencer import SequencerMixin


class PersistenceMixin(SequencerMixin):
    """Export, check and import state; start preview, prestage and unstage (module docstring)."""

    async def export_state(self, transport: StatefulTransport | None = None, *,
                           include_opaque: bool = True) -> DeviceState:
        """The device's migratable state; the device must be STOPPED (or never started).

        *transport* (a PCI or MMIO transport of this device) adds its own
        state (:meth:`~shadowvmm.state.StatefulTransport.save_state`): PCI config space
        bytes and MSI-X table. The opaque part is the backend's
        :meth:`~shadowvmm.backends.base.Backend.save_state` when it has
        :attr:`Capability.DEVICE_STATE` and *include_opaque* is set.
        """
        self._require_realized()
        if self.link is not LinkState.UP:
            raise DeviceStateError(f"{self.name}: export_state needs the backend session (link {self.link.value})")
        if self.run_state is RunState.STOPPED:
            await self.settle()
        elif self.started or self.shadow.driver_ok:
            raise DeviceStateError(f"{self.name}: export_state needs the device stopped or never started "
                                   f"(run state {self.run_state.value}, started {self.started})")
        ints = self.interrupts
        assert ints is not None
        image = transport.save_state() if transport is not None else TransportImage("none")
        shadow = self.shadow
        queues = tuple(QueueState(q.index, q.size, q.enabled, q.desc, q.driver, q.device, q.msix_vector,
                                  q.max_size, q.ring_base) for q in self.queues)
        regs = TransportState(
            image.kind, shadow.guest_status, shadow.dialect_negotiated, shadow.guest_stop_requested,
            shadow.guest_stopped, self.device_features, self.driver_features, self.device_feature_select,
            self.driver_feature_select, self.queue_select, self.config_msix_vector, ints.msix_enabled,
            self.config_generation, bytes(self.config), self.isr, queues, image.pci_config_space,
            image.msix_table)
        packed = bool(self.driver_features & Feature.RING_PACKED)
        rings = tuple(RingPart.from_ring_state(self.ring_states[i], packed) for i in sorted(self.ring_states))
        standard_type = STANDARD_TYPES.get(self.device_id)
        standard = standard_type.capture(bytes(self.config), regs) if standard_type is not None else None
        opaque = None
        if include_opaque and self._has_cap(Capability.DEVICE_STATE):
            blob = await self.backend.save_state()
            if blob is not None:
                opaque = OpaquePart(self.backend.implementation, self.backend.implementation_version, bytes(blob))
        return DeviceState(self.name, int(self.device_id), regs, rings, standard, opaque, admin=self._admin_state())

    def _admin_state(self) -> AdminState | None:
        """An owner's group (its admin queue held by the stop) and a member's stopped mode."""
        group = None
        aq = self.admin_queue
        if self.admin is not None and aq is not None:
            group = self.admin.snapshot(QueueState(aq.index, aq.size, aq.enabled, aq.desc, aq.driver, aq.device,
                                                   aq.msix_vector, aq.max_size))
        return AdminState(group, self._admin_stop) if group is not None or self._admin_stop else None

    def _check_admin(self, state: DeviceState) -> None:
        group = state.admin.group if state.admin is not None else None
        if group is None:
            return
        if self.admin is None or self.admin_queue is None:
            raise IncompatibleStateError(f"{self.name}: the source owns an admin group {list(group.members)}, "
                                         "the destination device has no admin queue with members")
        if group.queue.index != self.admin_queue.index or group.queue.size > self.admin_queue.max_size:
            raise IncompatibleStateError(f"{self.name}: admin queue {group.queue.index} of size {group.queue.size}, "
                                         f"the destination's is {self.admin_queue.index} of at most "
                                         f"{self.admin_queue.max_size}")
        self.admin.check_restore(group)

    def _import_admin(self, state: DeviceState) -> None:
        admin = state.admin
        if admin is None:
            return
        self._admin_stop = admin.stopped
        group, aq = admin.group, self.admin_queue
        if group is None or aq is None or self.admin is None:
            return
        saved = group.queue
        aq.size, aq.enabled, aq.msix_vector = saved.size, saved.enabled, saved.msix_vector
        aq.desc, aq.driver, aq.device = saved.desc, saved.driver, saved.device
        self.admin.restore(group)

    def check_import(self, state: DeviceState, transport: StatefulTransport | None = None) -> None:
        """Refuse (IncompatibleStateError) a state this device cannot take; changes nothing."""
        regs = state.transport
        if state.device_id != int(self.device_id):
            raise IncompatibleStateError(f"{self.name}: state of device id {state.device_id}, "
                                         f"this device is {self.device_id.name} ({int(self.device_id)})")
        if len(regs.queues) != len(self.queues):
            raise IncompatibleStateError(f"{self.name}: source has {len(regs.queues)} queues, "
                                         f"destination {len(self.queues)}")
        for saved, q in zip(regs.queues, self.queues):
            if saved.size > q.max_size:
                raise IncompatibleStateError(f"{self.name}: queue {q.index} size {saved.size} exceeds the "
                                             f"destination's maximum {q.max_size}")
        missing = regs.driver_features & ~self.device_features
        if missing:
            raise IncompatibleStateError(f"{self.name}: the guest negotiated features {missing:#x} the "
                                         f"destination backend does not offer")
        if regs.config and len(regs.config) != len(self.config):
            raise IncompatibleStateError(f"{self.name}: config space of {len(regs.config)} bytes, "
                                         f"destination serves {len(self.config)}")
        image = transport.save_state() if transport is not None else TransportImage("none")
        config_space, msix_table = image.pci_config_space, image.msix_table
        if regs.kind == "pci":
            if config_space is None or msix_table is None:
                raise IncompatibleStateError(f"{self.name}: PCI state needs a PCI transport on the destination")
            if len(config_space) != len(regs.pci_config_space or b"") or \
                    len(msix_table) != len(regs.msix_table or b""):
                raise IncompatibleStateError(f"{self.name}: PCI config space or MSI-X table size differs")
        elif regs.kind == "mmio" and config_space is not None:
            raise IncompatibleStateError(f"{self.name}: MMIO state cannot load into a PCI transport")
        if state.standard is not None:
            state.standard.check_destination(bytes(self.config), self.name)
        self._check_admin(state)
        if state.opaque is not None:
            state.opaque.check_loadable(self.backend.implementation, self.backend.implementation_version,
                                        self.name)
            if not self._has_cap(Capability.DEVICE_STATE):
                raise IncompatibleStateError(f"{self.name}: destination backend "
                                             f"{self.backend.implementation!r} cannot load opaque state")

    async def import_state(self, state: DeviceState, transport: StatefulTransport | None = None) -> None:
        """Apply a migrated state to a freshly realized device, then settle.

        Registers, status shadow, config and ring bases are applied as they
        were; the opaque part is loaded into the backend; settling then starts
        the backend with the saved ring bases if the guest had set DRIVER_OK
        (no guest renegotiation). A device that was never initialised, or left
        half-way, stays as it was and the guest continues on this one.
        """
        self._require_realized()
        if self.started or self.shadow.guest_status or self._ops or self._vmm_stop or self._admin_stop:
            raise DeviceStateError(f"{self.name}: import_state needs a freshly realized, untouched device")
        self.check_import(state, transport)
        regs = state.transport
        backend_config = bytes(self.config)
        if state.opaque is not None:
            try:
                await self.backend.load_state(state.opaque.blob)
            except IncompatibleStateError:
                raise
            except BackendError as exc:
                raise IncompatibleStateError(
                    f"{self.name}: destination backend {self.backend.implementation!r} refused opaque state "
                    f"of {state.opaque.implementation!r} v{state.opaque.version}: {exc}") from exc
        if state.standard is not None and self._has_cap(Capability.CONFIG):
            for offset, data in state.standard.backend_writes(backend_config):
                await self.backend.set_config(offset, data)
        shadow = self.shadow
        shadow.guest_status = regs.guest_status
        shadow.dialect_negotiated = regs.dialect_negotiated
        shadow.guest_stop_requested = regs.guest_stop_requested
        shadow.guest_stopped = regs.guest_stopped
        shadow.reset_pending = False
        self.driver_features = regs.driver_features
        self.device_feature_select = regs.device_feature_select
        self.driver_feature_select = regs.driver_feature_select
        self.queue_select = regs.queue_select
        self.config_msix_vector = regs.config_msix_vector
        if regs.config:
            self.config = bytearray(regs.config)
        self.config_generation = regs.config_generation
        self.isr = regs.isr
        for saved, q in zip(regs.queues, self.queues):
            q.size, q.enabled, q.msix_vector = saved.size, saved.enabled, saved.msix_vector
            q.desc, q.driver, q.device = saved.desc, saved.driver, saved.device
            q.resetting = False
            q.ring_base = saved.ring_base
        self.ring_states = state.ring_states()
        self._import_admin(state)
        assert self.interrupts is not None
        self.interrupts.msix_enabled = regs.msix_enabled
        if regs.kind == "pci" and transport is not None:
            transport.load_state(TransportImage("pci", pci_config_space=regs.pci_config_space,
                                                 msix_table=regs.msix_table))
        if regs.guest_status & Status.NEEDS_RESET:
            self._set_run_state(RunState.FAILED)
        await self.settle()

    # ------------------------------------------------------------------ a destination's staging

    def start_preview(self) -> dict[str, Any] | None:
        """What a migration destination may send its backend before the device state arrives.

        The driver features, MSI-X routing and, per started queue, ``[index, size, vector]``:
        the SET_FEATURES, SET_VRING_CALL and SET_VRING_NUM of the destination's start, which
        do not depend on where the rings stopped. None when there is nothing to start (no
        DRIVER_OK) or the VMM serves a queue itself.
        """
        if not self.shadow.driver_ok or self.vmm_queues or self.interrupts is None:
            return None
        return {"features": self.driver_features, "msix": bool(self.interrupts.msix_enabled),
                "queues": [[q.index, q.size, q.msix_vector] for q in self._backend_queues() if q.set_up]}

    async def prestage(self, preview: Mapping[str, Any]) -> None:
        """Send the backend what a source's :meth:`start_preview` fixes, ahead of its state.

        The start after :meth:`import_state` skips what was staged with the values the state
        has and sends what differs (the guest changed it since the preview). Only on a freshly
        realized, untouched device; a malformed preview is refused before anything is sent.
        """
        self._require_realized()
        if self.started or self.shadow.guest_status or self._ops or self._staged is not None:
            raise DeviceStateError(f"{self.name}: prestage needs a freshly realized, untouched device")
        ints = self.interrupts
        assert ints is not None
        features, msix, queues = preview.get("features"), preview.get("msix"), preview.get("queues")
        entries: list[tuple[int, int, int]] = []
        if not isinstance(features, int) or isinstance(features, bool) or not 0 <= features < 1 << 64 \
                or not isinstance(msix, bool) or not isinstance(queues, list):
            raise DeviceStateError(f"{self.name}: malformed start preview {preview!r}")
        for entry in queues:
            if not (isinstance(entry, list) and len(entry) == 3 and all(type(v) is int for v in entry)):
                raise DeviceStateError(f"{self.name}: malformed start preview queue {entry!r}")
            index, size, vector = entry
            if not 0 <= index < self.num_queues or not 0 < size <= self.queues[index].max_size \
                    or not (vector == NO_VECTOR or 0 <= vector < ints.vectors):
                raise DeviceStateError(f"{self.name}: start preview queue {entry!r} does not fit this device")
            entries.append((index, size, vector))
        b = self.backend
        word = self.policy.to_backend(features)
        staged = Staged(word)
        self._staged = staged
        self._backend_touched = True
        await b.set_features(word)
        for index, size, vector in entries:
            fd = ints.vector_fds[vector] if msix and vector != NO_VECTOR else self._relay_fds[index]
            await b.set_vring_call(index, fd)
            staged.calls[index] = fd
            await b.set_vring_num(index, size)
            staged.sizes[index] = size

    async def unstage(self) -> None:
        """Take back :meth:`prestage` on a device that was never started (a failed incoming
        migration): the backend is reset and the memory table will be sent again."""
        if self._staged is None or self.started:
            return
        self._staged = None
        self._mem_table_sent = False
        await self.backend.reset()
        self._backend_touched = False

    async def preload_memory_table(self) -> None:
        """Give the backend the memory table ahead of the first start.

        A migration destination does this during setup, so the table (a
        round trip per region with CONFIGURE_MEM_SLOTS) is not paid inside
        the downtime.
        """
        if not self._mem_table_sent and not self.started:
            await self.backend.set_mem_table(self.memory)
            self._mem_table_sent = True

    def take_pending_kicks(self) -> list[int]:
        """Queues whose kick eventfd holds notifications nobody consumed (read and cleared).

        A stopped source's kicks must be replayed on the destination when the
        guest moves there.
        """
        pending = []
        for index, fd in enumerate(self._kick_fds):
            try:
                if os.eventfd_read(fd):
                    pending.append(index)
            except BlockingIOError:
                continue
        return pending

    def set_busy_poll(self, seconds: float) -> float:
        """Let the backend busy-poll its replies for up to *seconds* (a latency-critical phase
        such as a migration's downtime); returns the previous setting. Backends without
        request round trips (no :attr:`Capability.BUSY_POLL`) ignore it and return 0
        (:meth:`~shadowvmm.backends.base.BackendBase.set_busy_poll`)."""
        return float(self.backend.set_busy_poll(seconds))
