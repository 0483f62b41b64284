"""What a migration is asked to do: tunables (:class:`MigrationOptions`), the VMM's callbacks
(:class:`MigrationHooks`) and what it needs of a machine (:class:`MachineLike`)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..device import DmaMap, VirtioDevice
from ..errors import MigrationError
from ..memory import GuestMemory

#: Memory models: ``local`` (both sides map the same memfds) and ``copy`` (pages travel).
MODES = ("local", "copy")
#: What to do with a started virtio-fs device whose backend cannot hand its session over.
FS_SESSION_POLICIES = ("refuse", "remount")
#: Reply busy-poll of a lone migrating device (µs): about one backend round trip's worth.
AUTO_BUSY_POLL_US = 300


class SlotLike(Protocol):
    """One device of a machine and the transport in front of it."""

    @property
    def device(self) -> VirtioDevice: ...

    @property
    def transport(self) -> Any: ...

    @property
    def iommu(self) -> DmaMap:
        """The device's IOMMU table (migrated in the IOMMU record when not empty)."""


class MachineLike(Protocol):
    """What migration needs of a machine (:class:`~shadowvmm.machine.Machine` fits)."""

    @property
    def memory(self) -> GuestMemory: ...

    @property
    def slots(self) -> Mapping[str, SlotLike]: ...


def auto_busy_poll(devices: int) -> float:
    """Busy-poll seconds for *devices* migrating together (:class:`MigrationOptions`)."""
    return AUTO_BUSY_POLL_US / 1e6 if devices == 1 else 0.0


@dataclass(frozen=True)
class MigrationOptions:
    """Tunables; ``stop_timeout`` bounds each device's stop (seconds).

    ``fs_session``: what to do with a started virtio-fs device whose backend cannot hand its
    FUSE session over (no DEVICE_STATE, e.g. the C virtiofsd): ``refuse`` (default; QEMU marks
    such a device unmigratable) or ``remount``: migrate it anyway when the backend holds no open
    file; the destination backend has no session, answers EIO until the guest mounts again
    (a new FUSE_INIT on the same queues), and the guest's inode numbers are void.

    ``busy_poll_us``: from the stop to the end, each device's backend spins up to this long
    for every reply instead of sleeping (:meth:`VirtioDevice.set_busy_poll`). Spinning holds
    the event loop, which serializes the round trips of devices stopped together, so the
    default (None) spins :data:`AUTO_BUSY_POLL_US` for a single device and not at all for more.
    """

    mode: str = "copy"
    stop_timeout: float = 0.1
    max_rounds: int = 16
    converge_pages: int = 256
    batch_pages: int = 256
    ready_timeout: float = 30.0
    result_timeout: float = 30.0
    #: Seconds the destination may take to accept one send (a stalled reader fails the migration).
    send_timeout: float = 10.0
    include_opaque: bool = True
    digest: bool = False
    busy_poll_us: int | None = None
    fs_session: str = "refuse"

    def busy_poll_seconds(self, devices: int) -> float:
        if self.busy_poll_us is None:
            return auto_busy_poll(devices)
        return self.busy_poll_us / 1e6

    def validate(self) -> None:
        if self.mode not in MODES:
            raise MigrationError(f"memory model {self.mode!r} is not one of {MODES}")
        if not self.stop_timeout > 0 or self.max_rounds < 1 or self.batch_pages < 1:
            raise MigrationError("stop_timeout must be > 0, max_rounds and batch_pages >= 1")
        if not self.send_timeout > 0:
            raise MigrationError(f"send_timeout must be > 0, not {self.send_timeout}")
        if self.fs_session not in FS_SESSION_POLICIES:
            raise MigrationError(f"fs_session must be one of {FS_SESSION_POLICIES}, not {self.fs_session!r}")
        if self.busy_poll_us is not None and not 0 <= self.busy_poll_us <= 100_000:
            raise MigrationError(f"busy_poll_us must be in [0, 100000], not {self.busy_poll_us}")


#: The options of a migration given none (a frozen instance, shared).
DEFAULT_OPTIONS = MigrationOptions()


@dataclass(frozen=True)
class RoundInfo:
    """One pre-copy round: pages sent, pages the dirty log marked meanwhile, its duration (ms)."""

    round: int
    pages: int
    dirty: int
    ms: float


Hook = Callable[[], Awaitable[None] | None]


@dataclass
class MigrationHooks:
    """Callbacks into the VMM: vCPU pause/resume around stop-and-copy, and switch-over."""

    pause_guest: Hook | None = None
    resume_guest: Hook | None = None
    switch_over: Hook | None = None
    progress: Callable[[RoundInfo], None] | None = None


async def call_hook(hook: Callable[..., Awaitable[None] | None] | None, *args: Any) -> None:
    """Run *hook* (plain or async) if there is one."""
    if hook is not None:
        result = hook(*args)
        if result is not None:
            await result


@contextlib.contextmanager
def busy_polling(devices: Iterable[VirtioDevice], seconds: float) -> Iterator[None]:
    """Busy-poll backend replies while the block runs, then restore each previous setting."""
    previous = [(device, device.set_busy_poll(seconds)) for device in devices] if seconds > 0 else []
    try:
        yield
    finally:
        for device, before in previous:
            device.set_busy_poll(before)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the block runs (a stop, the stop-and-copy window).

    With 64 devices a young-generation pass costs about 0.1 ms, a middle one about 0.8 ms and
    a full one over 10 ms: one landing in a stop takes a good part of a 2-3 ms downtime
    budget. The window is bounded (the stop timeout, the stream's timeouts), so the garbage
    it leaves is too; collection runs again after it. A collector already off stays off.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
