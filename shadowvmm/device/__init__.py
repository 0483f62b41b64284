"""The frontend virtio device: guest registers -> status shadow -> backend.

:class:`VirtioDevice` holds the transport-independent guest-visible state
(features and their select registers, the status shadow, per-queue
registers, device config and its generation, ISR) and drives the backend
through the :class:`~shadowvmm.backends.base.Backend` operations in QEMU's
vhost order (lab trace "Device start": SET_FEATURES, SET_VRING_CALL per
queue, memory table once per connection, NUM/BASE/ADDR/KICK per set-up
queue, SET_VRING_ENABLE; stop: disable, then GET_VRING_BASE in vq order).

The device is split along its seams, one module each, every seam a class on
top of the one below it (a seam calls its own methods and those below):

=================  ==============================================================
:mod:`.core`       the state every seam shares, timing constants
:mod:`.interrupts` MSI-X vector eventfds, INTx, ISR, the call-fd relay
:mod:`.worker`     the ordered op worker: submit, carry out, fail
:mod:`.registers`  guest-visible registers: features, status, queues, config
:mod:`.link`       a lost backend session, reconnect, ring ledgers
:mod:`.sequencer`  vhost start, program rings, stop, drain, restart, dirty log
:mod:`.persistence` export/check/import state, start preview, prestage
:mod:`.frontend`   :class:`VirtioDevice`: realize, close, VMM stop and resume
:mod:`.vmmqueue`   queues the VMM serves itself (net control queue)
:mod:`.dma`        the IOMMU translation of the device's DMA (IOVA -> guest-physical)
:mod:`.eager`      start a coroutine in the caller until it waits (many-device stops)
=================  ==============================================================

Guest register accesses are synchronous and never raise: a bad access is
ignored, counted and logged (:class:`~shadowvmm.shadow.FaultCounter`).
Anything that needs the backend becomes an operation on one ordered queue
served by a worker task, so the guest never waits on a socket inside a
register access. The backend is brought to the state the shadow and the VMM
ask for by :meth:`VirtioDevice._op_reconcile`; the VMM's transparent
:meth:`~VirtioDevice.stop`/:meth:`~VirtioDevice.resume` only change what is
asked, so a guest that keeps writing registers while the device is stopped is
served from the shadow and its writes take effect on resume.

Invariants the lifecycle keeps, whatever the order of guest, VMM and backend
events:

* every ring is handed to the backend by one routine
  (:meth:`VirtioDevice._program_rings`: CALL before KICK, then ENABLE, then
  the kicks held meanwhile), for the start, a restart, a queue reset and a
  reconnect alike;
* a reset (device or queue) goes through the worker after every operation
  queued before it, and one method (:meth:`VirtioDevice._forget_started`)
  clears everything derived from a started device;
* any exception in an operation leaves the device FAILED with
  DEVICE_NEEDS_RESET, never a dead worker;
* a backend whose session dies is noticed at once (its ``DISCONNECTED``
  event) and handled by the :class:`~shadowvmm.lifecycle.ReconnectPolicy`.

Logging: INFO for lifecycle transitions (realize and close, run state, link,
the guest's status transitions, suspend and resume), DEBUG for every step of
the op worker; nothing on the register hot path.
"""

from __future__ import annotations

from .core import (
    DRAIN_POLL,
    DRAIN_QUIET,
    DRAIN_STALL,
    DRAIN_TIMEOUT,
    MAX_QUEUES,
    QUICK_RETRIES,
    QUICK_RETRY,
    SESSION_QUIET,
    SESSION_QUIET_TIMEOUT,
    DeviceCore,
    DeviceStats,
    QueueRegs,
    Staged,
)
from .dma import DmaMap, DmaMapping
from .frontend import VirtioDevice
from .interrupts import Interrupts
from .link import RESUMABLE_TYPES
from .ops import Op, OpKind
from .vmmqueue import VmmQueue, vmm_queue_handlers

__all__ = [
    "DRAIN_POLL", "DRAIN_QUIET", "DRAIN_STALL", "DRAIN_TIMEOUT", "DmaMap", "DmaMapping", "MAX_QUEUES",
    "QUICK_RETRIES", "QUICK_RETRY", "RESUMABLE_TYPES", "SESSION_QUIET", "SESSION_QUIET_TIMEOUT", "DeviceCore",
    "DeviceStats", "Interrupts", "Op",
    "OpKind", "QueueRegs", "Staged", "VirtioDevice", "VmmQueue", "vmm_queue_handlers",
]
