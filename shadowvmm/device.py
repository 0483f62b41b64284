"""The frontend virtio device: guest registers -> status shadow -> backend.

:class:`VirtioDevice` holds the transport-independent guest-visible state
(features and their select registers, the status shadow, per-queue
registers, device config and its generation, ISR) and drives the backend
through the :class:`~shadowvmm.backends.base.Backend` operations in QEMU's
vhost order (lab trace "Device start": SET_FEATURES, SET_VRING_CALL per
queue, memory table once per connection, NUM/BASE/ADDR/KICK per set-up
queue, SET_VRING_ENABLE; stop: disable, then GET_VRING_BASE in vq order).

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
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .backends.base import Backend, BackendEvent, BackendEventKind, Capability, RingState, VringAddr
from .errors import (
    BackendDisconnected,
    BackendError,
    DeviceStateError,
    GuestMemoryError,
    IncompatibleStateError,
    RingError,
)
from .lifecycle import DeviceEventKind, EventLog, LinkState, ReconnectPolicy
from .memory import GuestMemory
from .shadow import FaultCounter, FeaturePolicy, GuestFault, GuestStatusAction, RunState, StatusShadow
from .virtio.constants import ISR_CONFIG, ISR_QUEUE, MAX_QUEUE_SIZE, NO_VECTOR, DeviceId, Feature, Status
from .virtio.ledger import SplitLedger
from .virtio.packed import PackedLayout
from .virtio.split import SplitLayout
from .vmmqueue import VmmQueue, vmm_queue_handlers

if TYPE_CHECKING:
    from .memory import DirtyLog
    from .migration.state import DeviceState

log = logging.getLogger(__name__)

#: Transparent stop: how long to wait for in-flight requests before GET_VRING_BASE (see _drain).
#: Queues a device may have (the virtio-pci common cfg addresses 16 bits of them; a VMM gives far
#: fewer: QEMU's VIRTIO_QUEUE_MAX is 1024).
MAX_QUEUES = 1024

DRAIN_TIMEOUT = 5.0
DRAIN_QUIET = 0.001
#: A used idx that has not moved for this long will not: the backend fetched no more (it honours
#: the disable) and what it fetched is done.
DRAIN_STALL = 0.05
DRAIN_POLL = 0.0002
#: A lost session whose rings' used idx stayed still this long no longer writes them.
SESSION_QUIET = 0.02
SESSION_QUIET_TIMEOUT = 1.0
#: After the backend's endpoint reappeared, a failed attempt is retried this soon, this often.
QUICK_RETRY = 0.002
QUICK_RETRIES = 5

#: Device types whose backend keeps nothing a new session could not be given again: their rings
#: resume transparently after a reconnect. virtio-fs is not among them: a FUSE session (looked-up
#: inodes, open handles, locks) dies with its daemon, so the guest must reset and mount again.
RESUMABLE_TYPES = frozenset({DeviceId.BLOCK, DeviceId.NET, DeviceId.RNG, DeviceId.CONSOLE,
                             DeviceId.SCSI, DeviceId.VSOCK, DeviceId.INPUT})


@dataclass
class QueueRegs:
    """Per-queue registers (v1.4 §4.1.4.3 common cfg / §4.2.2 MMIO)."""

    index: int
    max_size: int
    notify_off: int
    size: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    resetting: bool = False

    def __post_init__(self) -> None:
        self.size = self.max_size

    def clear(self) -> None:
        """Back to the after-reset values (v1.4 §2.4 / §4.1.4.3)."""
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.resetting = False

    @property
    def set_up(self) -> bool:
        return self.enabled and self.desc != 0


@dataclass
class Staged:
    """Start messages a migration destination sent ahead of the state (:meth:`VirtioDevice.prestage`)."""

    features: int | None = None
    calls: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)


class Interrupts:
    """The platform side of interrupts: one eventfd per MSI-X vector, plus INTx.

    A guest model waits on these fds (they play the role of KVM irqfds).
    """

    def __init__(self, vectors: int) -> None:
        self.vector_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        self.intx_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.msix_enabled = False

    @property
    def vectors(self) -> int:
        return len(self.vector_fds)

    def close(self) -> None:
        for fd in self.vector_fds + [self.intx_fd]:
            os.close(fd)


class OpKind(enum.Enum):
    RECONCILE = "reconcile"
    CONFIG_WRITE = "config write"
    VECTOR = "vector change"
    QUEUE_RESET = "queue reset"
    QUEUE_START = "queue start"
    RECONNECT = "reconnect"


@dataclass
class Op:
    kind: OpKind
    args: tuple = ()
    done: asyncio.Future | None = None


@dataclass
class DeviceStats:
    kicks: int = 0
    interrupts: int = 0
    stops: int = 0
    last_stop_seconds: float = 0.0
    status_reads: int = 0
    reconnects: int = 0
    #: Seconds from the last backend loss to its rings running again on a new session.
    last_reconnect_seconds: float = 0.0


class VirtioDevice:
    """One virtio device as the guest sees it, backed by a :class:`Backend`."""

    def __init__(self, backend: Backend, memory: GuestMemory, *, name: str = "dev0",
                 num_queues: int | None = None, queue_size: int = 256,
                 policy: FeaturePolicy | None = None, config_override: bytes | None = None,
                 reconnect: ReconnectPolicy | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.memory = memory
        self.name = name
        self.policy = policy or FeaturePolicy()
        self.reconnect_policy = reconnect or ReconnectPolicy.off()
        self.faults = FaultCounter(name)
        self.shadow = StatusShadow(self.policy.dialect, self.faults)
        self.run_state = RunState.RUNNING
        self.link = LinkState.UP
        self.stats = DeviceStats()
        self.clock = clock
        self.events = EventLog(clock)
        self._loop = loop
        self._requested_queues = num_queues
        self._queue_size = queue_size
        self._config_override = config_override
        self.device_id: DeviceId = backend.device_id
        # guest-visible transport-independent state
        self.device_features = 0
        self.driver_features = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.config_msix_vector = NO_VECTOR
        self.config = bytearray()
        self.config_generation = 0
        self.isr = 0
        self.queues: list[QueueRegs] = []
        self.interrupts: Interrupts | None = None
        # backend-side state
        self.backend_caps = Capability.NONE
        self.backend_features = 0
        #: The backend session was started (features, rings) since the last reset or loss.
        self.started = False
        self.rings_running = False
        self.ring_states: dict[int, RingState] = {}
        #: Rings handed to the backend session (NUM/BASE sent) and not stopped since.
        self._live_rings: set[int] = set()
        #: The backend may hold state from this device's use since its last reset (negotiated
        #: features, rings, an inflight area kept across a lost session): a guest reset resets it.
        self._backend_touched = False
        #: A guest reset completed without resetting the backend (it was away): reset it before
        #: the next start.
        self._backend_reset_owed = False
        self._mem_table_sent = False
        #: What :meth:`prestage` sent ahead of the first start (features word, call fds, sizes).
        self._staged: Staged | None = None
        #: Rings whose guest notifications are held (a start or stop is under way on them);
        #: every ring start ends with a kick, so nothing held is lost.
        self._held_kicks: set[int] = set()
        self._vmm_stop = False
        self._kick_fds: list[int] = []
        self._relay_fds: list[int] = []
        self._ops: deque[Op] = deque()
        self._op_running = False
        self._op_handlers: dict[OpKind, Callable[..., Awaitable[None]]] = {
            OpKind.RECONCILE: self._op_reconcile,
            OpKind.CONFIG_WRITE: self._op_config_write,
            OpKind.VECTOR: self._op_vector,
            OpKind.QUEUE_RESET: self._op_queue_reset,
            OpKind.QUEUE_START: self._op_queue_start,
            OpKind.RECONNECT: self._op_reconnect,
        }
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._realized = False
        self.queue_select = 0
        self.vmm_queues: dict[int, VmmQueue] = {}
        #: The backend logs its writes (migration pre-copy): kept across ring restarts.
        self.dirty_logging = False
        self._dirty_log: DirtyLog | None = None
        #: Queues the driver may use (net: 2 x active pairs); None = all.
        self.active_queues: int | None = None
        #: Guest config writes since the reset, replayed to a new backend session.
        self._config_writes: dict[int, bytes] = {}
        #: A device-side config change held while the guest has the device suspended (v1.4 §3.4).
        self._held_config: bytes | None = None
        self._config_refresh_queued = False
        #: Why the device last failed (DEVICE_NEEDS_RESET); cleared by the guest's reset.
        self.failure: BaseException | None = None
        # backend liveness
        #: Bumped on every lost session: state learnt across an await is recorded only if the
        #: session it was learnt from is still the one (see :meth:`_same_session`).
        self._session = 0
        self._lost_at = 0.0
        self._lost_error: BaseException | None = None
        self._fresh_session = False
        self._retry: asyncio.Task[None] | None = None
        self._quick_retries = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._link_waiters: list[asyncio.Future[None]] = []
        self._ledgers: dict[int, SplitLedger] = {}
        self._tracker: asyncio.Task | None = None
        #: Rings the lost session had, until they are parked for the next one.
        self._lost_rings: list[int] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

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

    async def _build(self) -> None:
        self.backend_caps = self.backend.capabilities()
        self.backend_features = int(await self.backend.get_features())
        policy = self.policy
        if not self.backend_caps & Capability.RING_RESTART:
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
        self.interrupts = Interrupts(count + 1)
        self._kick_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self._relay_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
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
        self.backend.set_event_handler(None)
        await self.backend.close()
        self._release_fds()
        self._realized = False

    # ------------------------------------------------------------------ guest: features

    @property
    def num_queues(self) -> int:
        return len(self.queues)

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

    # ------------------------------------------------------------------ guest: status

    def read_status(self) -> int:
        return self.shadow._status

    def write_status(self, value: int) -> None:
        action = self.shadow.write(value)
        if action is GuestStatusAction.NONE:
            return
        if action is GuestStatusAction.RESET:
            self._guest_reset()
        elif action is GuestStatusAction.FEATURES_OK:
            self._features_ok()
            if self.shadow.guest_status & Status.DRIVER_OK:
                self._submit(Op(OpKind.RECONCILE))
        elif action in (GuestStatusAction.DRIVER_OK, GuestStatusAction.GUEST_STOP,
                        GuestStatusAction.GUEST_RESUME):
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
            self.run_state = RunState.STOPPED if self._vmm_stop else RunState.RUNNING
        self.shadow.reset_done()
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
        self.driver_features = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.config_msix_vector = NO_VECTOR
        self.isr = 0

    # ------------------------------------------------------------------ guest: queues

    def selected_queue(self) -> QueueRegs | None:
        sel = self.queue_select
        return self.queues[sel] if sel < len(self.queues) else None

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
        if self.started:
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
        if self.started:
            self._submit(Op(OpKind.QUEUE_START, (q.index,)))

    def _validate_queue(self, q: QueueRegs) -> None:
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
        elif value != 1 or not self.negotiated(Feature.RING_RESET):
            self.faults(GuestFault.READ_ONLY, "queue_reset without RING_RESET")
        else:
            self.reset_queue(q)

    def reset_queue(self, q: QueueRegs) -> None:
        """Stop one queue and return its registers to defaults (also MMIO QueueReady=0)."""
        q.resetting = True
        self._submit(Op(OpKind.QUEUE_RESET, (q.index,)))

    def notify(self, value: int) -> None:
        """Available-buffer notification (v1.4 §4.1.5.2): kick the backend's eventfd."""
        index = value & 0xFFFF
        if index >= len(self.queues) or not self.queues[index].enabled:
            self.faults(GuestFault.NOTIFY_INVALID, f"queue {index}")
            return
        self.stats.kicks += 1
        if index in self._held_kicks:
            return      # a start or stop is under way on this ring; it ends with a kick
        os.eventfd_write(self._kick_fds[index], 1)

    # ------------------------------------------------------------------ guest: config and ISR

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
        if self.backend_caps & Capability.CONFIG:
            self._config_writes[offset] = data
            self._submit(Op(OpKind.CONFIG_WRITE, (offset, data)))

    def read_isr(self) -> int:
        """ISR read clears it (v1.4 §4.1.4.5)."""
        value = self.isr
        self.isr = 0
        return value

    def ack_interrupt(self, bits: int) -> None:
        """MMIO InterruptACK (v1.4 §4.2.2)."""
        self.isr &= ~bits

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

    # ------------------------------------------------------------------ interrupts

    def call_fd(self, index: int) -> int:
        """The fd the backend signals for queue *index* (a vector's irqfd, or our relay)."""
        q = self.queues[index]
        ints = self.interrupts
        assert ints is not None
        if ints.msix_enabled and q.msix_vector < ints.vectors:
            return ints.vector_fds[q.msix_vector]
        return self._relay_fds[index]

    def interrupt_routing_changed(self) -> None:
        """MSI-X was enabled or disabled: rewire every queue's call fd."""
        if self.started:
            for q in self.queues:
                self._submit(Op(OpKind.VECTOR, (q.index,)))

    def _on_relay(self, index: int) -> None:
        try:
            os.eventfd_read(self._relay_fds[index])
        except BlockingIOError:
            return
        ints = self.interrupts
        if ints is None or ints.msix_enabled:
            return
        self.isr |= ISR_QUEUE
        self.stats.interrupts += 1
        os.eventfd_write(ints.intx_fd, 1)

    def _config_interrupt(self) -> None:
        ints = self.interrupts
        if ints is None:
            return
        if ints.msix_enabled:
            if self.config_msix_vector < ints.vectors:      # NO_VECTOR (0xffff) included
                os.eventfd_write(ints.vector_fds[self.config_msix_vector], 1)
            return
        self.isr |= ISR_CONFIG
        os.eventfd_write(ints.intx_fd, 1)

    # ------------------------------------------------------------------ VMM: transparent stop

    async def stop(self) -> list[RingState]:
        """Stop the backend transparently: the guest keeps reading what it wrote.

        Returns the ring states of the started rings (empty if the guest had
        not started the device). A backend being reconnected is waited for first.
        """
        self._require_realized()
        await self._wait_link()
        if self.run_state is RunState.STOPPED:
            return list(self.ring_states.values())
        if self.run_state is not RunState.RUNNING:
            raise DeviceStateError(f"{self.name}: cannot stop while {self.run_state.value}")
        started = self.clock()
        self.run_state = RunState.STOPPING
        self._vmm_stop = True
        try:
            await self._submit_wait(Op(OpKind.RECONCILE))
            if self.link is not LinkState.UP:
                raise BackendDisconnected(f"{self.name}: backend lost during the stop") from self._lost_error
        except BaseException:
            # Not stopped: a failed backend (FAILED) recovers through the guest's reset into
            # a running device, not into a VMM stop nobody will resume.
            self._vmm_stop = False
            if self.run_state is RunState.STOPPING:
                self.run_state = RunState.RUNNING
            raise
        self.run_state = RunState.STOPPED
        self.stats.stops += 1
        self.stats.last_stop_seconds = self.clock() - started
        return list(self.ring_states.values())

    async def resume(self) -> None:
        """Undo :meth:`stop`: restart the rings from the captured state."""
        self._require_realized()
        if self.run_state is RunState.RUNNING:
            return
        if self.run_state is not RunState.STOPPED:
            raise DeviceStateError(f"{self.name}: cannot resume while {self.run_state.value}")
        self._vmm_stop = False
        self.run_state = RunState.RUNNING
        await self._submit_wait(Op(OpKind.RECONCILE))

    def failed(self) -> bool:
        """The device shows DEVICE_NEEDS_RESET (:attr:`failure` says why)."""
        return self.run_state is RunState.FAILED

    def _require_realized(self) -> None:
        if not self._realized:
            raise DeviceStateError(f"{self.name}: not realized")

    async def settle(self) -> None:
        """Wait until every queued guest-triggered operation has been carried out.

        A backend being reconnected is waited for (what it takes is carried out once it is
        back). A device that failed shows DEVICE_NEEDS_RESET (:attr:`failure` says why).
        """
        while True:
            await self._submit_wait(Op(OpKind.RECONCILE))
            if self.link is not LinkState.RECONNECTING:
                return
            await self._wait_link()

    # ------------------------------------------------------------------ VMM: backend liveness

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
            self.link = LinkState.RECONNECTING
            deadline = self.reconnect_policy.deadline
            if deadline is not None:
                self._deadline = self.loop.call_later(deadline, self._deadline_passed)
            self._schedule_reconnect(0.0)
        else:
            self.link = LinkState.DOWN
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
        if not self.backend_caps & Capability.RECONNECT:
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
            if self.backend_caps & Capability.INFLIGHT:
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
            self.link = LinkState.DOWN
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
        self.link = LinkState.UP
        self.stats.reconnects += 1
        self.events.emit(DeviceEventKind.RECONNECTED, f"{(self.clock() - self._lost_at) * 1e3:.1f} ms after the loss")
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

    async def _wait_link(self) -> None:
        """Return once the link is not being re-established (UP, or DOWN: the guest was told)."""
        while self.link is LinkState.RECONNECTING:
            waiter = self.loop.create_future()
            self._link_waiters.append(waiter)
            await waiter

    def _wake_link_waiters(self) -> None:
        waiters, self._link_waiters = self._link_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ ring tracking

    def _tracking_wanted(self) -> bool:
        return (self.reconnect_policy.enabled and bool(self.backend_caps & Capability.RECONNECT)
                and not self.backend_caps & Capability.INFLIGHT and self.device_id in RESUMABLE_TYPES
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

    # ------------------------------------------------------------------ worker

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
        """
        while True:
            try:
                await self._carry_out(op)
                return
            except BackendError:
                if op.kind is not OpKind.RECONCILE or self.link is not LinkState.RECONNECTING:
                    raise
            await self._wait_link()
            op = Op(op.kind, op.args)

    async def _carry_out(self, op: Op) -> None:
        if self._wake is None:
            raise DeviceStateError(f"{self.name}: not realized")
        if not self._ops and not self._op_running:
            try:
                await self._run_op(op)
            except asyncio.CancelledError:
                self._fail(DeviceStateError(f"{self.name}: {op.kind.name} cancelled midway"))
                raise
            return
        op.done = self.loop.create_future()
        self._submit(op)
        await op.done

    async def _run_op(self, op: Op) -> None:
        """Run one operation; any error fails the device unless the backend session died
        under it (then the loss handling owns the recovery)."""
        self._op_running = True
        try:
            if self.run_state is not RunState.FAILED or op.kind in (OpKind.RECONCILE, OpKind.RECONNECT):
                await self._op_handlers[op.kind](*op.args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not (isinstance(exc, BackendError) and self.link is not LinkState.UP):
                if not isinstance(exc, (BackendError, RingError, GuestMemoryError, OSError,
                                        IncompatibleStateError)):
                    log.exception("%s: %s failed unexpectedly", self.name, op.kind.value)
                self._fail(exc)
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
            log.error("%s: backend failed: %s", self.name, exc)
            self.failure = exc
            self.events.emit(DeviceEventKind.FAILED, str(exc), exc)
        self.run_state = RunState.FAILED
        self.rings_running = False
        self.shadow.needs_reset()
        if first and self.shadow.guest_status & Status.DRIVER_OK:
            self._config_interrupt()

    async def _op_reconcile(self, *why: str) -> None:
        shadow = self.shadow
        if self.link is not LinkState.UP:
            if shadow.reset_pending:
                self._schedule_reconnect(0.0)   # the reset completes once the backend is back
            return
        if "refresh-config" in why:
            self._config_refresh_queued = False
            if self.backend_caps & Capability.CONFIG:
                self.update_config(await self.backend.get_config(0, len(self.config)))
        if "active-queues" in why:
            await self._apply_active_queues()
        session = self._session
        if self._backend_reset_owed and not self.started:
            await self.backend.reset()
            self._same_session(session)
            self._backend_touched = self._backend_reset_owed = False
        if shadow.reset_pending:
            if self.rings_running:
                await self._stop_rings()
            if self._backend_touched:
                await self.backend.reset()
                self._same_session(session)
                self._backend_touched = self._backend_reset_owed = False
            self._complete_reset()
            return
        if self.run_state is RunState.FAILED:
            return
        want_started = shadow.driver_ok
        want_running = want_started and not self._vmm_stop and not shadow.guest_stop_requested
        if want_running and not self.started:
            await self._start()
        elif want_running and not self.rings_running:
            await self._restart_rings()
        elif not want_running and self.rings_running:
            await self._stop_rings()
        if shadow.guest_stop_requested and not self.rings_running and not shadow.guest_stopped:
            shadow.guest_stop_done()
        elif not shadow.guest_stop_requested and shadow.guest_stopped and self.rings_running:
            shadow.guest_resume_done()
            self._release_held_config()

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
                target = self._drain_target([q]) if not self.backend_caps & Capability.SUSPEND else (0.0, [])
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

    # ------------------------------------------------------------------ backend sequencing

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
            await b.set_log_base(self._dirty_log.fd, self._dirty_log.size)  # type: ignore[attr-defined]
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
        if self.backend_caps & Capability.INFLIGHT:
            await b.prepare_inflight(self.num_queues, max(q.max_size for q in self.queues))
        if fresh:
            for offset, data in sorted(self._config_writes.items()):
                await b.set_config(offset, data)
        rings = [q for q in self._backend_queues() if q.set_up]
        try:
            await self._program_rings(rings, send_call=False, sizes=staged.sizes)
            if self.backend_caps & Capability.STATUS:
                await b.set_status(self._backend_status())
            self._same_session(session)
            self.started = True
            self.rings_running = True
            self._start_vmm_queues()
        finally:
            self._release_kicks(rings)
        if fresh and self.stats.reconnects:
            self.stats.last_reconnect_seconds = self.clock() - self._lost_at
            self.events.emit(DeviceEventKind.RESUMED, f"{self.stats.last_reconnect_seconds * 1e3:.1f} ms after the loss")

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
            self._same_session(session)
            self._live_rings.add(index)
            if sizes.get(index) != q.size:
                await b.set_vring_num(index, q.size)
            await b.set_vring_base(index, base)
            await b.set_vring_addr(VringAddr(index, q.desc, q.driver, q.device, log=q.device,
                                             log_enabled=self.dirty_logging))
            self._same_session(session)
            self._track_ring(q, base)
            self._drain_kick(index)
            await b.set_vring_kick(index, self._kick_fds[index])
        for q in rings:
            if self._queue_active(q):
                await b.set_vring_enable(q.index, True)
        self._same_session(session)

    def _same_session(self, session: int) -> None:
        """Raise if the backend session was lost since *session* was read: a reply can arrive
        and the loss be seen before the awaiting coroutine resumes, and nothing learnt from
        the old session may be recorded as true of the new one."""
        if session != self._session:
            raise BackendDisconnected(f"{self.name}: backend session lost during the operation") \
                from self._lost_error

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

    def _saved_base(self, index: int) -> int:
        """Ring base for SET_VRING_BASE: the captured state, else a fresh ring's.

        A fresh packed ring starts with both wrap counters at 1 (v1.4 §2.8.1).
        """
        state = self.ring_states.get(index)
        if state is not None:
            return state.base
        if self.driver_features & Feature.RING_PACKED:
            return RingState.packed(index, 0, True, 0, True).base
        return 0

    def _backend_status(self) -> int:
        status = self.shadow.guest_status & ~int(Status.SUSPEND | Status.STOP | Status.NEEDS_RESET)
        if self.shadow.guest_stopped:
            status |= Status.DRIVER_OK
        return status

    async def _stop_rings(self) -> None:
        """Stop every started ring and capture its state (vhost order: disable, then bases)."""
        b = self.backend
        session = self._session
        vmm_states = self._stop_vmm_queues()
        running = [q for q in self._backend_queues() if q.index in self._live_rings]
        held = {q.index for q in running} - self._held_kicks
        self._held_kicks.update(held)
        try:
            if self.backend_caps & Capability.SUSPEND:
                await b.suspend()
            else:
                # QEMU's order: disable, then the bases. The drain target is taken at the hold,
                # so the disables overlap the drain's quiet period instead of following it.
                target = self._drain_target(running)
                for q in self._disable_order(running):
                    await b.set_vring_enable(q.index, False)
                await self._drain(target)
            states = {}
            for q in running:
                states[q.index] = await b.get_vring_base(q.index)
                self._same_session(session)
                if not self.backend_caps & Capability.SUSPEND:
                    self._live_rings.discard(q.index)
                    self._ledgers.pop(q.index, None)
        except BaseException:
            self._held_kicks -= held
            if self.link is LinkState.UP:
                self._kick_all()    # the rings may still run: deliver the kicks held meanwhile
            raise
        self._held_kicks -= held
        if self.backend_caps & Capability.SUSPEND:
            self._ledgers.clear()
        states.update(vmm_states)
        self.ring_states = dict(sorted(states.items()))
        self.rings_running = False

    def _disable_order(self, running: list[QueueRegs]) -> list[QueueRegs]:
        """virtio-net: every transmitq before any receiveq. A back-end that forwards (testpmd
        io/macswap) drops what it takes from a transmitq once the receiveq is disabled; with
        the transmitqs disabled first, frames the guest sends meanwhile stay in its ring."""
        if self.device_id is DeviceId.NET:
            return [q for q in running if q.index % 2] + [q for q in running if not q.index % 2]
        return running

    def _drain_target(self, running: list[QueueRegs]) -> tuple[float, list[tuple[QueueRegs, int, int]]]:
        """When the hold began, and each ring's avail and used idx then (empty: no drain)."""
        if self.device_id is DeviceId.NET or self.driver_features & Feature.RING_PACKED or not running:
            return 0.0, []
        load = self.memory.load_u16
        return self.loop.time(), [(q, load(q.driver + 2), load(q.device + 2)) for q in running]

    async def _drain(self, hold: tuple[float, list[tuple[QueueRegs, int, int]]]) -> None:
        """Let the back-end finish the requests made available before the stop.

        vhost-user says GET_VRING_BASE returns once in-flight requests are done, but
        libvhost-user (qemu-storage-daemon 7.2) answers at once and closes its call fd there:
        a request completing afterwards hits ``eventfd_write(-1)`` and ``vu_panic`` kills the
        device. Guest kicks are held (see :meth:`notify`); wait until each split ring's used
        idx reached the avail idx published when the hold began, then (only if the guest
        published more since) for the used idx to stay quiet for DRAIN_QUIET s. A back-end that
        honours the disable never takes what it had not fetched yet: a used idx still for
        DRAIN_STALL s ends the wait too; at most DRAIN_TIMEOUT s. Not for virtio-net (receive
        buffers are used only when traffic arrives) nor packed rings (no single used idx to compare).
        """
        quiet_since, rings = hold
        if not rings:
            return
        memory = self.memory
        loop = self.loop
        deadline = loop.time() + DRAIN_TIMEOUT
        target = [(q, avail) for q, avail, _ in rings]
        last = [used for _, _, used in rings]   # quiet since the hold unless it moved since
        while True:
            if self.link is not LinkState.UP:
                raise BackendDisconnected(f"{self.name}: backend lost while draining") from self._lost_error
            used = [memory.load_u16(q.device + 2) for q, _ in target]
            now = loop.time()
            if used != last:
                last, quiet_since = used, now
            reached = all((u - avail) & 0xFFFF < 0x8000 for u, (_, avail) in zip(used, target))
            if reached and all(memory.load_u16(q.driver + 2) == avail for q, avail in target):
                return      # nothing published since the hold: nothing else can be in flight
            if (reached and now - quiet_since >= DRAIN_QUIET) or now - quiet_since >= DRAIN_STALL:
                return
            if now >= deadline:
                log.warning("%s: requests still in flight %.1f s into a stop; stopping anyway",
                            self.name, DRAIN_TIMEOUT)
                return
            await asyncio.sleep(DRAIN_POLL)

    async def _restart_rings(self) -> None:
        b = self.backend
        caps = self.backend_caps
        rings = [q for q in self._backend_queues() if q.set_up]
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

    def _kick_all(self) -> None:
        """Spurious kicks are allowed (v1.4 §2.7.13): wake every started ring."""
        for q in self.queues:
            if q.set_up:
                os.eventfd_write(self._kick_fds[q.index], 1)

    # ---- migration

    async def export_state(self, transport: object | None = None, *,
                           include_opaque: bool = True) -> DeviceState:
        """The device's migratable state; the device must be STOPPED (or never started).

        *transport* (a PCI or MMIO transport of this device) adds its own
        state: PCI config space bytes and MSI-X table. The opaque part is the
        backend's :meth:`~shadowvmm.backends.base.Backend.save_state` when it
        has :attr:`Capability.DEVICE_STATE` and *include_opaque* is set.
        """
        from .migration.state import STANDARD_TYPES, DeviceState, OpaquePart, QueueState, RingPart, TransportState
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
        config_space = getattr(transport, "config_space", None)
        msix_table = getattr(transport, "msix_table", None)
        kind = "none" if transport is None else ("pci" if config_space is not None else "mmio")
        shadow = self.shadow
        queues = tuple(QueueState(q.index, q.size, q.enabled, q.desc, q.driver, q.device, q.msix_vector,
                                  q.max_size) for q in self.queues)
        regs = TransportState(
            kind, shadow.guest_status, shadow.dialect_negotiated, shadow.guest_stop_requested,
            shadow.guest_stopped, self.device_features, self.driver_features, self.device_feature_select,
            self.driver_feature_select, self.queue_select, self.config_msix_vector, ints.msix_enabled,
            self.config_generation, bytes(self.config), self.isr, queues,
            bytes(config_space) if config_space is not None else None,
            bytes(msix_table) if msix_table is not None else None)
        packed = bool(self.driver_features & Feature.RING_PACKED)
        rings = tuple(RingPart.from_ring_state(self.ring_states[i], packed) for i in sorted(self.ring_states))
        standard_type = STANDARD_TYPES.get(self.device_id)
        standard = standard_type.capture(bytes(self.config), regs) if standard_type is not None else None
        opaque = None
        if include_opaque and self.backend_caps & Capability.DEVICE_STATE:
            blob = await self.backend.save_state()
            if blob is not None:
                opaque = OpaquePart(self.backend.implementation, self.backend.implementation_version, bytes(blob))
        return DeviceState(self.name, int(self.device_id), regs, rings, standard, opaque)

    def check_import(self, state: DeviceState, transport: object | None = None) -> None:
        """Refuse (IncompatibleStateError) a state this device cannot take; changes nothing."""
        from .errors import IncompatibleStateError
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
        config_space = getattr(transport, "config_space", None)
        if regs.kind == "pci":
            msix_table = getattr(transport, "msix_table", None)
            if config_space is None or msix_table is None:
                raise IncompatibleStateError(f"{self.name}: PCI state needs a PCI transport on the destination")
            if len(config_space) != len(regs.pci_config_space or b"") or \
                    len(msix_table) != len(regs.msix_table or b""):
                raise IncompatibleStateError(f"{self.name}: PCI config space or MSI-X table size differs")
        elif regs.kind == "mmio" and config_space is not None:
            raise IncompatibleStateError(f"{self.name}: MMIO state cannot load into a PCI transport")
        if state.standard is not None:
            state.standard.check_destination(bytes(self.config), self.name)
        if state.opaque is not None:
            state.opaque.check_loadable(self.backend.implementation, self.backend.implementation_version,
                                        self.name)
            if not self.backend_caps & Capability.DEVICE_STATE:
                raise IncompatibleStateError(f"{self.name}: destination backend "
                                             f"{self.backend.implementation!r} cannot load opaque state")

    async def import_state(self, state: DeviceState, transport: object | None = None) -> None:
        """Apply a migrated state to a freshly realized device, then settle.

        Registers, status shadow, config and ring bases are applied as they
        were; the opaque part is loaded into the backend; settling then starts
        the backend with the saved ring bases if the guest had set DRIVER_OK
        (no guest renegotiation). A device that was never initialised, or left
        half-way, stays as it was and the guest continues on this one.
        """
        from .errors import IncompatibleStateError
        self._require_realized()
        if self.started or self.shadow.guest_status or self._ops or self._vmm_stop:
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
        if state.standard is not None and self.backend_caps & Capability.CONFIG:
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
        self.ring_states = state.ring_states()
        assert self.interrupts is not None
        self.interrupts.msix_enabled = regs.msix_enabled
        if regs.kind == "pci":
            transport.config_space[:] = regs.pci_config_space  # type: ignore[union-attr]
            transport.msix_table[:] = regs.msix_table  # type: ignore[union-attr]
        if regs.guest_status & Status.NEEDS_RESET:
            self.run_state = RunState.FAILED
        await self.settle()

    async def start_dirty_log(self, log: DirtyLog) -> None:
        """Make the backend mark its guest-memory writes in *log* (QEMU vhost_migration_log order).

        vhost-user: SET_LOG_BASE (LOG_SHMFD, the log's memfd), SET_FEATURES
        with LOG_ALL, then SET_VRING_ADDR with the LOG flag for every started
        ring. A backend sharing this device's GuestMemory (inproc) marks the
        log through :meth:`GuestMemory.write` and needs nothing.
        """
        from .errors import UnsupportedError
        b = self.backend
        if getattr(b, "memory", None) is self.memory:
            return
        if not self.backend_caps & Capability.DIRTY_LOG or not hasattr(b, "set_log_base"):
            raise UnsupportedError(f"{self.name}: backend {b.implementation!r} cannot log dirty pages")
        await self.settle()
        await b.set_log_base(log.fd, log.size)
        await b.set_dirty_logging(True)
        self.dirty_logging = True
        self._dirty_log = log
        if self.rings_running:
            await self._set_ring_logging(True)

    async def stop_dirty_log(self) -> None:
        """Undo :meth:`start_dirty_log`: SET_FEATURES without LOG_ALL, ring addresses without LOG."""
        b = self.backend
        if getattr(b, "memory", None) is self.memory or not hasattr(b, "set_dirty_logging"):
            return
        if self.run_state is RunState.FAILED:
            return
        await self.settle()
        await b.set_dirty_logging(False)
        self.dirty_logging = False
        self._dirty_log = None
        if self.rings_running:
            await self._set_ring_logging(False)

    async def _set_ring_logging(self, enabled: bool) -> None:
        for q in self.queues:
            if q.set_up:
                await self.backend.set_vring_addr(VringAddr(q.index, q.desc, q.driver, q.device,
                                                            log=q.device, log_enabled=enabled))

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
        staged = Staged(self.policy.to_backend(features))
        self._staged = staged
        self._backend_touched = True
        await b.set_features(staged.features)
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

    def set_busy_poll(self, seconds: float) -> float:
        """Let the backend busy-poll its replies for up to *seconds* (a latency-critical phase
        such as a migration's downtime); returns the previous setting. Backends without
        request round trips (no ``set_busy_poll``) ignore it and return 0."""
        setter = getattr(self.backend, "set_busy_poll", None)
        return float(setter(seconds)) if setter is not None else 0.0

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
