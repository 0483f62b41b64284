"""The backend plugin contract.

A backend is the device that really does the work. Its operations mirror
QEMU's ``VhostOps`` (hw/virtio/vhost-backend.h): the frontend device
(:mod:`shadowvmm.device`) sequences them exactly as QEMU's vhost layer does
(features, memory table, per-ring num/base/addr/kick/call, enable, status),
so one device layer drives vhost-user, vhost-vdpa and in-process models.

Ring stop semantics follow vhost: :meth:`Backend.get_vring_base` stops the
ring and returns its state in the vhost encoding (:class:`RingState`).

Backends are found through the ``shadowvmm.backends`` entry-point group; a
plugin that fails to import raises :class:`~shadowvmm.errors.PluginError`
chained to the original error.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

from ..errors import PluginError, UnsupportedError
from ..memory import GuestMemory
from ..virtio.constants import DeviceId
from ..virtio.vring import RingState, VringAddr
from .deadlines import DeadlineTimer

__all__ = [
    "ENTRY_POINT_GROUP", "Backend", "BackendBase", "BackendEvent", "BackendEventHandler",
    "BackendEventKind", "BackendFactory", "Capability", "PeerIdentity", "RingState", "VringAddr",
    "available_backends", "check_backend", "load_backend", "MANDATORY", "OPTIONAL",
]

ENTRY_POINT_GROUP = "shadowvmm.backends"


class Capability(enum.Flag):
    """What a backend can do beyond the mandatory operations."""

    NONE = 0
    CONFIG = enum.auto()        #: get/set device config space from the backend
    STATUS = enum.auto()        #: set_status is forwarded (vhost-user STATUS, vdpa SET_STATUS)
    SUSPEND = enum.auto()       #: suspend() stops the whole device before ring bases are read
    RESUME = enum.auto()        #: resume() continues after suspend() without a ring restart
    RING_RESTART = enum.auto()  #: a ring stopped by get_vring_base restarts with num/base/addr/kick
    RESET_DEVICE = enum.auto()  #: reset() resets the device and keeps the session (vhost-user RESET_DEVICE)
    DEVICE_STATE = enum.auto()  #: save_state/load_state carry opaque implementation state
    DIRTY_LOG = enum.auto()     #: the backend marks the dirty log it is given
    INFLIGHT = enum.auto()      #: in-flight descriptor tracking (vhost-user INFLIGHT_SHMFD): see prepare_inflight
    MQ = enum.auto()            #: get_queue_num reports the queue count
    RECONNECT = enum.auto()     #: connect() again after a lost session opens a fresh session to the same backend
    EVENTS = enum.auto()        #: reports BackendEvents on its own (set_event_handler): a lost session,
                                #: a config change, a device error; without it the device learns of
                                #: failures only from the next request
    BUSY_POLL = enum.auto()     #: set_busy_poll(): replies are busy-polled in latency-critical phases
    PEER_IDENTITY = enum.auto() #: peer_identity() names the process that serves the device
    SHARED_MEMORY = enum.auto() #: the backend reads and writes guest memory through the VMM's own
                                #: GuestMemory (in-process), so its writes are logged by the VMM and
                                #: a dirty log needs nothing from the backend
    EAGER_OPS = enum.auto()     #: no operation enters asyncio.timeout or reads current_task() before its
                                #: first suspension, so a VMM stop may start in the caller's task
                                #: (:mod:`shadowvmm.device.eager`; Python 3.12 starts every one eagerly)


class BackendEventKind(enum.Enum):
    """What a backend reports on its own, outside any request (see :meth:`Backend.set_event_handler`)."""

    CONFIG_CHANGED = "config changed"   #: the device changed its config space (v1.4 §2.5.1)
    DISCONNECTED = "disconnected"       #: the session is gone: peer closed, crashed, or stopped answering
    ERROR = "device error"              #: an error the device cannot recover from (a malformed ring):
                                        #: DEVICE_NEEDS_RESET (v1.4 §2.1.2)


@dataclass(frozen=True, slots=True)
class BackendEvent:
    """One event; ``error`` says why a session was lost."""

    kind: BackendEventKind
    error: BaseException | None = None


BackendEventHandler = Callable[[BackendEvent], None]


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The process serving a backend (:attr:`Capability.PEER_IDENTITY`), e.g. from SO_PEERCRED."""

    pid: int
    uid: int | None = None
    description: str = ""


@runtime_checkable
class Backend(Protocol):
    """Operations every backend implements (QEMU ``VhostOps``)."""

    #: Implementation id, recorded with opaque state (e.g. ``"inproc-blk"``).
    implementation: str
    #: Version of the implementation's opaque state format.
    implementation_version: int
    device_id: DeviceId

    def capabilities(self) -> Capability: ...

    async def connect(self) -> None:
        """Open the session (vhost-user: connect + SET_OWNER + protocol features)."""

    async def close(self) -> None: ...

    async def get_features(self) -> int: ...

    async def set_features(self, features: int) -> None: ...

    async def get_queue_num(self) -> int: ...

    def config_size(self) -> int:
        """Bytes of device config space the backend serves."""

    async def set_mem_table(self, memory: GuestMemory) -> None: ...

    async def set_vring_num(self, index: int, num: int) -> None: ...

    async def set_vring_addr(self, addr: VringAddr) -> None: ...

    async def set_vring_base(self, index: int, base: int) -> None: ...

    async def get_vring_base(self, index: int) -> RingState:
        """Stop ring *index* and return its state (vhost GET_VRING_BASE)."""

    async def set_vring_kick(self, index: int, fd: int) -> None: ...

    async def set_vring_call(self, index: int, fd: int) -> None: ...

    async def set_vring_enable(self, index: int, enable: bool) -> None: ...

    async def get_config(self, offset: int, size: int) -> bytes: ...

    async def set_config(self, offset: int, data: bytes) -> None: ...

    async def set_status(self, status: int) -> None: ...

    async def reset(self) -> None:
        """Reset the device: every ring stopped, back to the pre-negotiation state."""

    async def suspend(self) -> None:
        """Stop the device as a whole (only with :attr:`Capability.SUSPEND`)."""

    async def resume(self) -> None:
        """Continue after :meth:`suspend` (only with :attr:`Capability.RESUME`)."""

    async def save_state(self) -> bytes | None:
        """Opaque implementation state (only with :attr:`Capability.DEVICE_STATE`)."""

    async def load_state(self, blob: bytes) -> None: ...

    async def prepare_inflight(self, num_queues: int, queue_size: int) -> None:
        """Share an in-flight tracking area before the rings start (only with :attr:`Capability.INFLIGHT`).

        The area outlives the session: after a lost session and :meth:`connect`, the same
        area is handed to the new session so it resubmits what was in flight (vhost-user
        GET/SET_INFLIGHT_FD). :meth:`reset` discards it.
        """

    def in_flight(self, index: int) -> int | None:
        """How many requests of ring *index* the backend fetched and has not completed yet, read
        from the in-flight tracking area (vhost-user "Inflight I/O tracking"); None: it cannot
        tell. A transparent stop waits for 0 before GET_VRING_BASE instead of guessing from a
        quiet used idx."""

    def disable_stops_fetch(self) -> bool:
        """Whether the backend stops fetching from a ring it was told to disable (vhost-user:
        SET_VRING_ENABLE 0). False for one that keeps popping (libvhost-user, so
        qemu-storage-daemon): a stop then waits for every request kicked before it, however
        slow, instead of taking a quiet used idx as the end."""

    async def wait_for_endpoint(self, timeout: float) -> bool:
        """Between reconnect attempts: return early (True) when the backend's endpoint shows up
        again (a restarted daemon's socket), else after *timeout* seconds."""

    def lost_peer_alive(self) -> bool | None:
        """After ``DISCONNECTED``: whether whoever served the lost session can still write guest
        memory (a process that closed its socket but keeps running). None: cannot tell; the
        device then waits for the rings to go quiet before reusing them."""

    def set_event_handler(self, handler: BackendEventHandler | None) -> None:
        """Install the callback for :class:`BackendEvent` s.

        A backend whose session can die (a socket, a process) must report
        ``DISCONNECTED`` as soon as it notices (hang-up, error, timeout, a message
        nobody asked for), without waiting for the next request; the device layer
        does not poll.
        """

    async def set_log_base(self, log_fd: int, size: int) -> None:
        """Hand over the dirty log (only with :attr:`Capability.DIRTY_LOG`; vhost SET_LOG_BASE)."""

    async def set_dirty_logging(self, enabled: bool) -> None:
        """Start or stop marking guest-memory writes in the log (vhost ``VHOST_F_LOG_ALL``)."""

    def set_busy_poll(self, seconds: float) -> float:
        """Busy-poll replies for up to *seconds*; returns the previous value (:attr:`Capability.BUSY_POLL`)."""

    def peer_identity(self) -> PeerIdentity | None:
        """Who serves the device, when known (:attr:`Capability.PEER_IDENTITY`)."""

    def migration_blockers(self) -> list[str]:
        """Why this backend's device cannot migrate now, beyond what its capabilities say
        (empty: nothing)."""

    def set_timer(self, timer: DeadlineTimer) -> None:
        """The machine's shared microsecond timer (:mod:`.deadlines`), for delays a device model
        keeps itself (the in-process backend's ``latency_us``); given before :meth:`connect`."""


class BackendBase:
    """Defaults for every optional part of :class:`Backend`: subclass it and implement the
    mandatory operations (:data:`MANDATORY`).

    The defaults are those of a backend with none of the optional capabilities: one queue,
    no config space, status not forwarded, no suspend/resume/state/inflight/dirty log, no
    events (the handler is stored and never called), no peer to name. An operation that only
    makes sense with a capability raises :class:`~shadowvmm.errors.UnsupportedError`.
    """

    implementation: str = "unnamed"
    implementation_version: int = 1
    device_id: DeviceId
    _event_handler: BackendEventHandler | None = None

    def capabilities(self) -> Capability:
        return Capability.NONE

    def _unsupported(self, what: str, capability: Capability) -> UnsupportedError:
        return UnsupportedError(f"backend {self.implementation!r} does not offer {what} "
                                f"(no Capability.{capability.name})")

    async def close(self) -> None:
        return None

    async def get_queue_num(self) -> int:
        return 1

    def config_size(self) -> int:
        return 0

    async def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def set_config(self, offset: int, data: bytes) -> None:
        raise self._unsupported("config writes", Capability.CONFIG)

    async def set_status(self, status: int) -> None:
        return None

    async def suspend(self) -> None:
        raise self._unsupported("suspend", Capability.SUSPEND)

    async def resume(self) -> None:
        raise self._unsupported("resume", Capability.RESUME)

    async def save_state(self) -> bytes | None:
        return None

    async def load_state(self, blob: bytes) -> None:
        if blob:
            raise self._unsupported("opaque device state", Capability.DEVICE_STATE)

    async def prepare_inflight(self, num_queues: int, queue_size: int) -> None:
        raise self._unsupported("in-flight tracking", Capability.INFLIGHT)

    def in_flight(self, index: int) -> int | None:
        return None

    def disable_stops_fetch(self) -> bool:
        return True

    async def wait_for_endpoint(self, timeout: float) -> bool:
        await asyncio.sleep(timeout)
        return False

    def lost_peer_alive(self) -> bool | None:
        return None

    def set_event_handler(self, handler: BackendEventHandler | None) -> None:
        self._event_handler = handler

    def emit(self, event: BackendEvent) -> None:
        """Report *event* to the device (for subclasses with :attr:`Capability.EVENTS`)."""
        if self._event_handler is not None:
            self._event_handler(event)

    async def set_log_base(self, log_fd: int, size: int) -> None:
        raise self._unsupported("dirty logging", Capability.DIRTY_LOG)

    async def set_dirty_logging(self, enabled: bool) -> None:
        raise self._unsupported("dirty logging", Capability.DIRTY_LOG)

    def set_busy_poll(self, seconds: float) -> float:
        return 0.0

    def peer_identity(self) -> PeerIdentity | None:
        return None

    def migration_blockers(self) -> list[str]:
        return []

    def set_timer(self, timer: DeadlineTimer) -> None:
        return None


#: Operations with no default: every backend implements them.
MANDATORY: tuple[str, ...] = (
    "capabilities", "connect", "get_features", "set_features", "set_mem_table", "set_vring_num",
    "set_vring_addr", "set_vring_base", "get_vring_base", "set_vring_kick", "set_vring_call",
    "set_vring_enable", "reset",
)
#: Operations :class:`BackendBase` gives a default for.
OPTIONAL: tuple[str, ...] = (
    "close", "get_queue_num", "config_size", "get_config", "set_config", "set_status", "suspend",
    "resume", "save_state", "load_state", "prepare_inflight", "in_flight", "disable_stops_fetch",
    "wait_for_endpoint",
    "lost_peer_alive", "set_event_handler", "set_log_base", "set_dirty_logging", "set_busy_poll",
    "peer_identity", "migration_blockers", "set_timer",
)
_ATTRIBUTES = ("implementation", "implementation_version")


def check_backend(candidate: object) -> list[str]:
    """Everything *candidate* (a backend class or instance) lacks to honour :class:`Backend`:
    one line per missing method or attribute, or a method that should be a coroutine and is not.
    Empty when it conforms."""
    problems = []
    for name in MANDATORY + OPTIONAL:
        member = getattr(candidate, name, None)
        if member is None or not callable(member):
            problems.append(f"missing method {name}()")
            continue
        wanted = inspect.iscoroutinefunction(getattr(Backend, name))
        if wanted != inspect.iscoroutinefunction(member):
            kind = "a coroutine (async def)" if wanted else "a plain method (not async)"
            problems.append(f"{name}() must be {kind}")
    for name in _ATTRIBUTES:
        if not hasattr(candidate, name):
            problems.append(f"missing attribute {name}")
    return problems


class BackendFactory(Protocol):
    """What an entry point resolves to: a callable building a backend from config."""

    def __call__(self, config: Mapping[str, Any]) -> Backend: ...


def available_backends() -> dict[str, metadata.EntryPoint]:
    """Backends registered in the ``shadowvmm.backends`` entry-point group."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_backend(name: str) -> BackendFactory:
    """Resolve backend *name*; import errors are raised, never swallowed."""
    eps = available_backends()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise PluginError(f"no backend named {name!r} (registered: {known})")
    try:
        factory = eps[name].load()
    except Exception as exc:
        raise PluginError(f"backend {name!r} failed to load: {exc}") from exc
    if isinstance(factory, type):
        problems = check_backend(factory)
        if problems:
            raise PluginError(f"backend {name!r} ({factory.__module__}.{factory.__qualname__}) does not "
                              f"honour the backend contract: {'; '.join(problems)}")
    return factory
