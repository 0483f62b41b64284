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

import enum
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from ..errors import PluginError
from ..memory import GuestMemory
from ..virtio.constants import DeviceId

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


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Guest-physical ring addresses (vhost ``vhost_vring_addr``, GPAs here)."""

    index: int
    desc: int
    driver: int
    device: int
    log: int = 0
    log_enabled: bool = False


@dataclass(frozen=True, slots=True)
class RingState:
    """A stopped ring's position in the vhost base encoding.

    Split rings carry the next avail index in bits 0-15. Packed rings carry
    avail index (bits 0-14) + avail wrap (bit 15), used index (bits 16-30) +
    used wrap (bit 31) (vhost-user.rst "VHOST_USER_SET_VRING_BASE").
    """

    index: int
    base: int

    @classmethod
    def packed(cls, index: int, avail_idx: int, avail_wrap: bool, used_idx: int,
               used_wrap: bool) -> "RingState":
        return cls(index, (avail_idx & 0x7FFF) | int(avail_wrap) << 15
                   | (used_idx & 0x7FFF) << 16 | int(used_wrap) << 31)

    def unpack_packed(self) -> tuple[int, bool, int, bool]:
        b = self.base
        return b & 0x7FFF, bool(b >> 15 & 1), b >> 16 & 0x7FFF, bool(b >> 31 & 1)


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
        return eps[name].load()
    except Exception as exc:
        raise PluginError(f"backend {name!r} failed to load: {exc}") from exc
