"""In-process reference backend: virtio-blk and virtio-rng device models.

It implements the whole :class:`~shadowvmm.backends.base.Backend` contract
with vhost semantics (rings start on SET_VRING_ENABLE, GET_VRING_BASE stops a
ring after completing its in-flight requests) and is the embedded default
backend. Kicks arrive on eventfds watched with ``loop.add_reader``;
completions are signalled on the call eventfds. The device models (what a
request does) are in :mod:`.inproc_models`.

It works on the VMM's own :class:`~shadowvmm.memory.GuestMemory`
(:attr:`~.base.Capability.SHARED_MEMORY`: its writes are dirty-logged by the
VMM) and reports config changes and broken rings on its own
(:attr:`~.base.Capability.EVENTS`).

``latency_us`` delays completions (requests stay in flight meanwhile), which
is what makes "stop in the middle of I/O" observable in tests.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..errors import BackendError, GuestMemoryError, IncompatibleStateError, RingError
from ..memory import GuestMemory
from ..options import Option, OptionSchema
from ..virtio.chain import DescChain
from ..virtio.constants import Feature
from ..virtio.packed import PackedDeviceQueue, PackedLayout
from ..virtio.split import SplitDeviceQueue, SplitLayout
from .base import BackendBase, BackendEvent, BackendEventKind, Capability, RingState, VringAddr
from .deadlines import DeadlineTimer
from .inproc_models import (
    BLK_CONFIG,
    BLK_CONFIG_SIZE,
    BLK_MAX_TRANSFER,
    BLK_REQ_HEADER,
    MAX_IMAGE_BYTES,
    MODELS,
    RNG_REQUEST_MAX,
    BlkModel,
    DeviceModel,
    RngModel,
)

__all__ = [
    "BLK_CONFIG", "BLK_CONFIG_SIZE", "BLK_MAX_TRANSFER", "BLK_REQ_HEADER", "MAX_IMAGE_BYTES", "MODELS",
    "RNG_REQUEST_MAX", "BlkModel", "DeviceModel", "InProcBackend", "Ring", "RngModel",
]

log = logging.getLogger(__name__)


@dataclass
class Ring:
    """One vring as the backend holds it (vhost semantics)."""

    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int = -1
    call_fd: int = -1
    enabled: bool = False
    queue: Any = None
    in_flight: int = 0
    #: Futures resolved when in_flight reaches 0 (a bare future: an Event costs ~1.5 µs more
    #: per waiter, on every device of a many-device stop under I/O).
    drain_waiters: list[asyncio.Future[None]] = field(default_factory=list)
    #: The kick fd the loop watches for this ring (-1: none): a stop unwatches each ring twice
    #: (suspend, GET_VRING_BASE) and the loop's remove_reader is not free.
    watched_fd: int = -1
    #: The backend closed: a completion still pending touches nothing.
    closed: bool = False

    def drain_waiter(self) -> asyncio.Future[None]:
        """A future resolved when nothing is in flight any more (await it while in_flight)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.drain_waiters.append(waiter)
        return waiter

    def wake_drained(self) -> None:
        waiters, self.drain_waiters = self.drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class InProcBackend(BackendBase):
    """The embedded reference backend (entry point ``inproc``)."""

    implementation = "inproc"
    implementation_version = 1

    #: ``device`` picks the model, whose options follow (:attr:`BlkModel.OPTIONS`, :attr:`RngModel.OPTIONS`).
    OPTIONS = OptionSchema(
        Option("device", str, "blk", "device model"),
        Option("latency_us", float, 0.0, "completion delay in µs (requests stay in flight meanwhile)",
               min=0, max=10_000_000),
        select="device", variants={name: model.OPTIONS for name, model in MODELS.items()})

    def __init__(self, config: Mapping[str, Any]) -> None:
        options = self.OPTIONS.validate(config)
        kind = options["device"]
        self.kind = kind
        model = MODELS[kind]
        self.model: DeviceModel = model({name: options[name] for name in model.OPTIONS.options})
        self.device_id = self.model.device_id
        self.implementation = f"inproc-{kind}"
        self.latency = options["latency_us"] / 1e6
        self.memory: GuestMemory | None = None
        self.features = 0
        self.status = 0
        self.suspended = False
        self.rings: dict[int, Ring] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Completions after ``latency_us``: the loop's own timers are a millisecond off (:mod:`.deadlines`).
        self._deadlines: DeadlineTimer | None = None
        self._own_deadlines = False
        self._defers = False
        self.requests = 0
        self.broken_rings: set[int] = set()

    # ------------------------------------------------------------------ contract

    def capabilities(self) -> Capability:
        return (Capability.CONFIG | Capability.STATUS | Capability.SUSPEND | Capability.RESUME
                | Capability.RING_RESTART | Capability.RESET_DEVICE | Capability.DEVICE_STATE
                | Capability.MQ | Capability.EVENTS | Capability.SHARED_MEMORY | Capability.EAGER_OPS)

    def set_timer(self, timer: DeadlineTimer) -> None:
        if self._deadlines is None:
            self._deadlines = timer

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        #: With a latency, the model moves the data at completion if it can (:class:`DeviceModel`).
        self._defers = bool(self.latency) and "later" in inspect.signature(self.model.handle).parameters
        if self.latency and self._deadlines is None:     # used without a machine
            self._deadlines = DeadlineTimer(self._loop)
            self._own_deadlines = True

    async def close(self) -> None:
        """What is still in flight never completes; waiters for the drain return."""
        if self._own_deadlines and self._deadlines is not None:
            self._deadlines.close()
            self._deadlines, self._own_deadlines = None, False
        for ring in self.rings.values():
            self._unwatch(ring)
            ring.closed = True
            ring.in_flight = 0
            ring.wake_drained()
        self.rings.clear()
        self.model.close()

    async def get_features(self) -> int:
        return int(self.model.features() | Feature.VERSION_1 | Feature.INDIRECT_DESC
                   | Feature.EVENT_IDX | Feature.RING_PACKED)

    async def set_features(self, features: int) -> None:
        offered = await self.get_features()
        if features & ~offered:
            raise BackendError(f"features {features & ~offered:#x} were not offered")
        self.features = features

    async def get_queue_num(self) -> int:
        return self.model.queues

    def config_size(self) -> int:
        return len(self.model.config())

    async def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory

    def _ring(self, index: int) -> Ring:
        if not 0 <= index < 1024:
            raise BackendError(f"vring index {index} out of range")
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = Ring(index)
        return ring

    async def set_vring_num(self, index: int, num: int) -> None:
        self._ring(index).num = num

    async def set_vring_addr(self, addr: VringAddr) -> None:
        self._ring(addr.index).addr = addr

    async def set_vring_base(self, index: int, base: int) -> None:
        self._ring(index).base = base

    async def get_vring_base(self, index: int) -> RingState:
        """Suspended: read the state (vhost-vdpa semantics); else stop the ring (vhost-user)."""
        ring = self._ring(index)
        while ring.in_flight:
            await ring.drain_waiter()
        state = self._ring_state(ring)
        if self.suspended:
            return state
        ring.queue = None
        ring.enabled = False
        ring.base = state.base
        return state

    def _ring_state(self, ring: Ring) -> RingState:
        queue = ring.queue
        if queue is None:
            return RingState(ring.index, ring.base)
        if isinstance(queue, SplitDeviceQueue):
            return RingState(ring.index, queue.last_avail_idx)
        return queue.ring_state(ring.index)

    async def set_vring_kick(self, index: int, fd: int) -> None:
        ring = self._ring(index)
        self._unwatch(ring)
        ring.kick_fd = fd
        if ring.enabled:
            self._watch(ring)

    async def set_vring_call(self, index: int, fd: int) -> None:
        self._ring(index).call_fd = fd

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        ring = self._ring(index)
        if not enable:
            ring.enabled = False
            return
        if ring.addr is None or ring.num == 0 or self.memory is None:
            raise BackendError(f"vring {index} enabled before it was configured")
        if ring.queue is None:
            ring.queue = self._make_queue(ring)
        ring.enabled = True
        self._watch(ring)

    def _make_queue(self, ring: Ring) -> Any:
        assert ring.addr is not None and self.memory is not None
        event_idx = bool(self.features & Feature.EVENT_IDX)
        indirect = bool(self.features & Feature.INDIRECT_DESC)
        try:
            if self.features & Feature.RING_PACKED:
                layout = PackedLayout(ring.num, ring.addr.desc, ring.addr.driver, ring.addr.device)
                return PackedDeviceQueue(self.memory, layout, event_idx=event_idx,
                                         indirect=indirect, state=RingState(ring.index, ring.base))
            split = SplitLayout(ring.num, ring.addr.desc, ring.addr.driver, ring.addr.device)
            return SplitDeviceQueue(self.memory, split, event_idx=event_idx, indirect=indirect,
                                    last_avail_idx=ring.base)
        except (RingError, GuestMemoryError) as exc:
            raise BackendError(f"vring {ring.index}: {exc}") from exc

    async def get_config(self, offset: int, size: int) -> bytes:
        return self.model.config()[offset:offset + size]

    async def set_config(self, offset: int, data: bytes) -> None:
        self.model.set_config(offset, data)

    async def set_status(self, status: int) -> None:
        self.status = status

    async def reset(self) -> None:
        for ring in list(self.rings.values()):
            self._unwatch(ring)
            while ring.in_flight:
                await ring.drain_waiter()
        self.rings.clear()
        self.features = 0
        self.status = 0
        self.suspended = False

    async def suspend(self) -> None:
        self.suspended = True
        for ring in self.rings.values():
            while ring.in_flight:
                await ring.drain_waiter()

    async def resume(self) -> None:
        self.suspended = False
        for ring in self.rings.values():
            if ring.enabled and ring.queue is None:
                ring.queue = self._make_queue(ring)
            if ring.enabled:
                self._watch(ring)

    async def save_state(self) -> bytes | None:
        return msgpack.packb({"model": self.kind, "state": self.model.state()})

    async def load_state(self, blob: bytes) -> None:
        try:
            data = msgpack.unpackb(blob)
            kind, state = data["model"], data["state"]
        except Exception as exc:
            raise IncompatibleStateError(f"{self.implementation}: unreadable state: {exc}") from exc
        if kind != self.kind:
            raise IncompatibleStateError(f"state of inproc-{kind} cannot load into {self.implementation}")
        self.model.load(state)

    async def prepare_inflight(self, num_queues: int, queue_size: int) -> None:
        raise BackendError("inproc keeps no inflight area (no INFLIGHT capability)")

    def lost_peer_alive(self) -> bool | None:
        return False

    def change_config(self, **changes: Any) -> None:
        """Device-side config change (e.g. a resize), as a real device would do."""
        for key, value in changes.items():
            setattr(self.model, key, value)
        self.emit(BackendEvent(BackendEventKind.CONFIG_CHANGED))

    # ------------------------------------------------------------------ data path

    def _watch(self, ring: Ring) -> None:
        if ring.kick_fd >= 0 and not self.suspended and ring.queue is not None:
            assert self._loop is not None
            if ring.watched_fd != ring.kick_fd:
                self._unwatch(ring)
                self._loop.add_reader(ring.kick_fd, self._on_kick, ring)
                ring.watched_fd = ring.kick_fd
            self._process(ring)

    def _unwatch(self, ring: Ring) -> None:
        if ring.watched_fd >= 0 and self._loop is not None:
            self._loop.remove_reader(ring.watched_fd)
        ring.watched_fd = -1

    def _on_kick(self, ring: Ring) -> None:
        if self.suspended or not ring.enabled or ring.queue is None:
            self._unwatch(ring)     # left watched by the stop (no syscall then); the kick stays pending
            return
        try:
            os.eventfd_read(ring.kick_fd)
        except BlockingIOError:
            pass
        self._process(ring)

    def _process(self, ring: Ring) -> None:
        """Take every available request. With a latency, each request is checked now and its
        data moved when the latency has passed (:class:`DeviceModel`'s ``later``), as a
        device whose DMA ends with the request; without, it is carried out and used now."""
        queue = ring.queue
        memory = self.memory
        if queue is None or memory is None:
            return
        done: list[tuple[int, int]] = []
        chains: list[DescChain] = []
        later: list | None = [] if self._defers else None
        handle, append = self.model.handle, done.append
        try:
            try:
                queue.pop_many(chains)
            finally:
                if later is None:
                    for chain in chains:
                        append((chain.head, handle(memory, chain)))
                else:
                    deferring: Callable[..., int] = handle     # takes ``later`` (checked at connect)
                    for chain in chains:
                        append((chain.head, deferring(memory, chain, later=later)))
                self.requests += len(done)
        except (RingError, GuestMemoryError) as exc:
            self._broken(ring, exc)
        finally:
            if done:
                if self.latency:
                    assert self._deadlines is not None
                    ring.in_flight += len(done)
                    self._deadlines.call_later(self.latency, self._complete, ring, queue, done, later)
                else:
                    self._use(ring, queue, done)

    def _broken(self, ring: Ring, exc: Exception) -> None:
        log.error("%s: vring %d broken, stopped: %s", self.implementation, ring.index, exc)
        self._unwatch(ring)
        ring.enabled = False
        self.broken_rings.add(ring.index)
        self.emit(BackendEvent(BackendEventKind.ERROR, exc))

    def _complete(self, ring: Ring, queue: Any, done: list[tuple[int, int]], later: list | None) -> None:
        """The latency passed: move the requests' data, then use them all."""
        if ring.closed:
            return
        try:
            if later:
                assert self.memory is not None
                self.model.finish(self.memory, later)     # type: ignore[attr-defined]
        except (RingError, GuestMemoryError) as exc:
            self._broken(ring, exc)     # nothing of the batch is used: the ring is dead
        else:
            self._use(ring, queue, done)
        finally:
            ring.in_flight -= len(done)
            if not ring.in_flight:
                ring.wake_drained()

    def _use(self, ring: Ring, queue: Any, done: list[tuple[int, int]]) -> None:
        queue.push_batch(done)
        if queue.should_notify() and ring.call_fd >= 0:
            os.eventfd_write(ring.call_fd, 1)
