"""The device's state, shared by every seam of :class:`~.frontend.VirtioDevice`.

:class:`DeviceCore` holds the transport-independent guest-visible state
(features and their select registers, the status shadow, per-queue
registers, device config and its generation, ISR), what the device knows of
its backend session, and the few helpers every seam uses. Each seam
(:mod:`.interrupts`, :mod:`.worker`, :mod:`.registers`, :mod:`.link`,
:mod:`.sequencer`, :mod:`.persistence`) is a class on top of it; a seam calls
its own methods and those of the seams below it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..backends.base import Backend, Capability, RingState
from ..errors import BackendDisconnected, DeviceStateError
from ..lifecycle import EventLog, LinkState, ReconnectPolicy
from ..memory import GuestMemory
from ..shadow import FaultCounter, FeaturePolicy, RunState, StatusShadow
from ..state import AdminGroup, QueueState
from ..timeline import Tap
from ..virtio.constants import NO_VECTOR, DeviceId
from ..virtio.ledger import SplitLedger
from .ops import Op, OpHandler, OpKind

if TYPE_CHECKING:
    from ..memory import DirtyLog
    from .interrupts import Interrupts
    from .vmmqueue import VmmQueue

log = logging.getLogger(__name__)

_EAGER_OPS = Capability.EAGER_OPS.value

#: Queues a device may have (the virtio-pci common cfg addresses 16 bits of them; a VMM gives far
#: fewer: QEMU's VIRTIO_QUEUE_MAX is 1024).
MAX_QUEUES = 1024

#: Transparent stop: how long to wait for in-flight requests before GET_VRING_BASE (see
#: :meth:`~.sequencer.SequencerMixin._drain`).
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
    #: Ring state the driver wrote (VIRTIO_F_RING_STATE, vhost base encoding): the ring starts there.
    ring_base: int | None = None

    def __post_init__(self) -> None:
        self.size = self.max_size

    def clear(self) -> None:
        """Back to the after-reset values (v1.4 §2.4 / §4.1.4.3)."""
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.resetting = False
        self.ring_base = None

    @property
    def set_up(self) -> bool:
        return self.enabled and self.desc != 0


class AdminEndpoint(Protocol):
    """What the device needs of an owner's administration queue server (:mod:`.adminq`)."""

    def reset(self) -> None:
        """The owner was reset (v1.4 §2.12.1): drop the ring, forget LIST_USE and resource objects."""

    async def hold(self) -> None:
        """The owner's VMM stop: pop nothing more, let the popped commands complete."""

    def release(self) -> None:
        """The owner's VMM resume: serve again, and what was posted meanwhile."""

    def poll(self) -> None:
        """Look at the ring as if kicked (a migration destination after its import)."""

    def snapshot(self, queue: QueueState) -> AdminGroup:
        """The group as a state record, the admin queue's registers *queue* included."""

    def check_restore(self, group: AdminGroup) -> None:
        """Refuse (IncompatibleStateError) a group this owner does not serve."""

    def restore(self, group: AdminGroup) -> None:
        """Take a migrated group."""


@dataclass
class Staged:
    """Start messages a migration destination sent ahead of the state (:meth:`VirtioDevice.prestage`)."""

    features: int | None = None
    calls: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)


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


class DeviceCore:
    """State and shared helpers of one virtio device (module docstring)."""

    def __init__(self, backend: Backend, memory: GuestMemory, *, name: str = "dev0",
                 num_queues: int | None = None, queue_size: int = 256,
                 policy: FeaturePolicy | None = None, config_override: bytes | None = None,
                 reconnect: ReconnectPolicy | None = None, admin_queue: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None,
                 clock: Callable[[], float] = time.monotonic, timeline: Tap | None = None) -> None:
        self.backend = backend
        #: Where stops, drains and ring bases are recorded (:mod:`shadowvmm.timeline`); None: nowhere.
        self.timeline = timeline
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
        self._want_admin_queue = admin_queue
        self.device_id: DeviceId = backend.device_id
        self._init_guest_state()
        self._init_backend_state()
        self._init_worker_state()
        self._init_liveness()

    def _init_guest_state(self) -> None:
        """The transport-independent guest-visible state."""
        self.device_features = 0
        self.driver_features = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.config_msix_vector = NO_VECTOR
        self.config = bytearray()
        self.config_generation = 0
        self.isr = 0
        self.queues: list[QueueRegs] = []
        #: The administration queue of an owner device (v1.4 §2.12, §4.1.4.3): index num_queues,
        #: beyond the queues num_queues counts; served by the VMM (:mod:`.adminq`).
        self.admin_queue: QueueRegs | None = None
        self.admin: AdminEndpoint | None = None
        self.interrupts: Interrupts | None = None
        self.queue_select = 0
        #: Queues the driver may use (net: 2 x active pairs); None = all.
        self.active_queues: int | None = None
        #: Guest config writes since the reset, replayed to a new backend session.
        self._config_writes: dict[int, bytes] = {}
        #: A device-side config change held while the guest has the device suspended (v1.4 §3.4).
        self._held_config: bytes | None = None
        self._config_refresh_queued = False

    def _init_backend_state(self) -> None:
        """What the device knows of, and has sent to, its backend session."""
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
        #: An owner's DEV_MODE_SET stopped this member (v1.4 §2.12.1.4); the guest sees nothing.
        self._admin_stop = False
        self._kick_fds: list[int] = []
        self._relay_fds: list[int] = []
        self.vmm_queues: dict[int, VmmQueue] = {}
        #: The backend logs its writes (migration pre-copy): kept across ring restarts.
        self.dirty_logging = False
        self._dirty_log: DirtyLog | None = None
        #: Why the device last failed (DEVICE_NEEDS_RESET); cleared by the guest's reset.
        self.failure: BaseException | None = None

    def _init_worker_state(self) -> None:
        """The ordered operation queue and its worker task (:mod:`.worker`)."""
        self._ops: deque[Op] = deque()
        self._op_running = False
        self._op_handlers: dict[OpKind, OpHandler] = self._op_table()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._realized = False

    def _init_liveness(self) -> None:
        """Backend liveness: the session counter, reconnect timers, ring ledgers (:mod:`.link`)."""
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

    def _op_table(self) -> dict[OpKind, OpHandler]:
        """The worker's dispatch table: each seam adds the operations it carries out."""
        return {}

    @property
    def backend_caps(self) -> Capability:
        """What the backend session can do (:meth:`~shadowvmm.backends.base.Backend.capabilities`)."""
        return self._backend_caps

    @backend_caps.setter
    def backend_caps(self, caps: Capability) -> None:
        self._backend_caps = caps
        self._caps_bits = caps.value

    @property
    def ops_start_eagerly(self) -> bool:
        """The backend's operations may start in the caller's task (``Capability.EAGER_OPS``)."""
        return bool(self._caps_bits & _EAGER_OPS)

    def _has_cap(self, cap: Capability) -> bool:
        """``cap in backend_caps`` on the int bits: a Flag ``&`` builds a member (about 2 µs), and
        ``.value`` is a property; ``_value_`` is the member's plain attribute."""
        return bool(self._caps_bits & cap._value_)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def config_override(self) -> bytes | None:
        """The config space the VMM serves in place of a backend without one (None: the backend's)."""
        return self._config_override

    @property
    def num_queues(self) -> int:
        """Queues the guest's num_queues shows (the admin queue is not among them)."""
        return len(self.queues)

    def queue_regs(self, index: int) -> QueueRegs | None:
        """Queue *index*'s registers, the admin queue's included; None past the end."""
        if index < len(self.queues):
            return self.queues[index]
        if index == len(self.queues) and self.admin_queue is not None:
            return self.admin_queue
        return None

    def _require_realized(self) -> None:
        if not self._realized:
            raise DeviceStateError(f"{self.name}: not realized")

    def _set_run_state(self, state: RunState) -> None:
        if state is not self.run_state and log.isEnabledFor(logging.INFO):
            log.info("%s: run state %s -> %s", self.name, self.run_state.value, state.value)
        self.run_state = state

    def _set_link(self, state: LinkState) -> None:
        if state is not self.link and log.isEnabledFor(logging.INFO):
            log.info("%s: backend link %s -> %s", self.name, self.link.value, state.value)
        self.link = state

    def _same_session(self, session: int) -> None:
        """Raise if the backend session was lost since *session* was read: a reply can arrive
        and the loss be seen before the awaiting coroutine resumes, and nothing learnt from
        the old session may be recorded as true of the new one."""
        if session != self._session:
            raise BackendDisconnected(f"{self.name}: backend session lost during the operation") \
                from self._lost_error

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
