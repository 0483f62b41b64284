"""Guest driver core: initialisation, virtqueues, interrupts (virtio v1.4 §3.1).

:class:`GuestDevice` performs the spec's initialisation sequence purely
through transport register accesses, sets up split or packed rings in guest
memory, kicks through the notify register and takes interrupts from the
platform eventfds (one per MSI-X vector, or the INTx line + ISR read).
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

from ..device import Interrupts
from ..errors import DeviceStateError, RingError
from ..memory import GuestAllocator, GuestMemory
from ..virtio.constants import NO_VECTOR, Feature, Status
from ..virtio.packed import PackedDriverQueue, PackedLayout
from ..virtio.split import SplitDriverQueue, SplitLayout
from .transport import GuestTransport

RESET_TIMEOUT = 5.0


class GuestQueue:
    """One virtqueue as the guest driver runs it."""

    def __init__(self, device: "GuestDevice", index: int, ring, vector: int) -> None:
        self.device = device
        self.index = index
        self.ring = ring
        self.vector = vector
        self.completed = 0
        self.notifies = 0
        #: Takes every reaped ``(token, written)`` batch instead of resolving futures: a
        #: driver that keeps its own request slots (:meth:`BlkDriver.pipeline`) sets it.
        self.on_used: Callable[[list[tuple[object, int]]], None] | None = None

    @property
    def size(self) -> int:
        return self.ring.size

    @property
    def num_free(self) -> int:
        return self.ring.num_free

    def add(self, out: list[tuple[int, int]], inp: list[tuple[int, int]]) -> asyncio.Future:
        """Make a buffer available (not yet published); resolves to bytes written."""
        future = self.device.loop.create_future()
        self.ring.add(out, inp, future)
        return future

    def kick(self) -> None:
        """Publish avail idx; notify the device if it asked for it."""
        if self.ring.publish():
            self.notifies += 1
            self.device.transport.notify(self.index)

    async def request(self, out: list[tuple[int, int]], inp: list[tuple[int, int]]) -> int:
        future = self.add(out, inp)
        self.kick()
        return await future

    def reap(self) -> int:
        """Complete every used buffer.

        ``get_used`` re-arms used_event (EVENT_IDX) after reaping; reaping
        again until nothing is left closes the window in which the device
        published more entries before seeing the new used_event and so
        decided not to interrupt (as Linux's virtqueue_enable_cb re-checks).
        """
        count = 0
        hook = self.on_used
        while True:
            used = self.ring.get_used()
            if not used:
                break
            count += len(used)
            if hook is not None:
                hook(used)
                continue
            for future, written in used:
                if not future.done():
                    future.set_result(written)
        self.completed += count
        return count


class GuestDevice:
    """A guest's virtio driver core bound to one device."""

    def __init__(self, transport: GuestTransport, memory: GuestMemory, interrupts: Interrupts,
                 allocator: GuestAllocator, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.transport = transport
        self.memory = memory
        self.interrupts = interrupts
        self.alloc = allocator
        self.loop = loop or asyncio.get_running_loop()
        self.features = 0
        self.queues: list[GuestQueue] = []
        self.on_config_change: Callable[[], None] | None = None
        self.config_changes = 0
        self._readers: list[int] = []
        self._held = False

    # ------------------------------------------------------------------ status

    def status(self) -> int:
        return self.transport.get_status()

    async def reset(self, timeout: float = RESET_TIMEOUT) -> None:
        """Write 0 and wait for status to read 0 (v1.4 §4.1.4.3.2)."""
        self.transport.set_status(0)
        deadline = self.loop.time() + timeout
        while self.status() != 0:
            if self.loop.time() > deadline:
                raise DeviceStateError("device did not complete reset")
            await asyncio.sleep(0.0005)
        self._drop_queues()

    async def initialize(self, wanted: int, *, packed: bool = False, queue_size: int = 256,
                         num_queues: int | None = None, set_driver_ok: bool = True) -> int:
        """The driver initialisation sequence (v1.4 §3.1.1). Returns the negotiated features."""
        t = self.transport
        await self.reset()
        t.set_status(Status.ACKNOWLEDGE)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        offered = t.device_features()
        if not offered & Feature.VERSION_1:
            t.set_status(self.status() | Status.FAILED)
            raise DeviceStateError("device does not offer VERSION_1")
        want = wanted | Feature.VERSION_1
        if packed:
            want |= Feature.RING_PACKED
        accepted = offered & want
        t.set_driver_features(accepted)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        if not self.status() & Status.FEATURES_OK:
            t.set_status(self.status() | Status.FAILED)
            raise DeviceStateError(f"device refused features {accepted:#x}")
        self.features = accepted
        count = t.num_queues() if num_queues is None else num_queues
        self._start_interrupts()
        t.set_config_vector(0)
        for index in range(count):
            self.queues.append(self._setup_queue(index, queue_size))
        if set_driver_ok:
            self.driver_ok()
        return accepted

    def driver_ok(self) -> None:
        self.transport.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
                                  | Status.DRIVER_OK)

    def _setup_queue(self, index: int, wanted_size: int) -> GuestQueue:
        t = self.transport
        max_size = t.queue_max_size(index)
        if max_size == 0:
            raise DeviceStateError(f"queue {index} is not available")
        size = min(max_size, wanted_size)
        event_idx = bool(self.features & Feature.EVENT_IDX)
        if self.features & Feature.RING_PACKED:
            d, a, u = PackedLayout.area_sizes(size)
            layout = PackedLayout(size, self.alloc.alloc(d, 16), self.alloc.alloc(a, 4),
                                  self.alloc.alloc(u, 4))
            ring = PackedDriverQueue(self.memory, layout, event_idx=event_idx)
        else:
            d, a, u = SplitLayout.area_sizes(size)
            layout = SplitLayout(size, self.alloc.alloc(d, 16), self.alloc.alloc(a, 2),
                                 self.alloc.alloc(u, 4))
            ring = SplitDriverQueue(self.memory, layout, event_idx=event_idx)
        vector = index + 1 if t.uses_msix and index + 1 < self.interrupts.vectors else NO_VECTOR
        t.setup_queue(index, size, layout.desc, layout.driver, layout.device, vector)
        t.enable_queue(index)
        return GuestQueue(self, index, ring, vector)

    def rebind(self, transport: GuestTransport, interrupts: Interrupts) -> None:
        """Attach this driver to another device instance (migration switch-over)."""
        active = bool(self._readers)
        self._stop_interrupts()
        self.transport = transport
        self.interrupts = interrupts
        if active:
            self._start_interrupts()

    # ------------------------------------------------------------------ interrupts

    def hold_interrupts(self) -> None:
        """Stop taking interrupts, as a paused vCPU: they stay pending in their eventfds."""
        self._held = bool(self._readers)
        self._stop_interrupts()

    def release_interrupts(self) -> None:
        """Undo :meth:`hold_interrupts`; the pending interrupts are taken first."""
        if self._held:
            self._held = False
            self._start_interrupts()

    def _start_interrupts(self) -> None:
        self._stop_interrupts()
        ints = self.interrupts
        if self.transport.uses_msix:
            for vector, fd in enumerate(ints.vector_fds):
                self.loop.add_reader(fd, self._on_vector, vector)
                self._readers.append(fd)
        else:
            self.loop.add_reader(ints.intx_fd, self._on_intx)
            self._readers.append(ints.intx_fd)

    def _stop_interrupts(self) -> None:
        for fd in self._readers:
            self.loop.remove_reader(fd)
        self._readers = []

    def _on_vector(self, vector: int) -> None:
        try:
            os.eventfd_read(self.interrupts.vector_fds[vector])
        except BlockingIOError:
            return
        if vector == 0:
            self._config_changed()
        elif vector - 1 < len(self.queues):
            self.queues[vector - 1].reap()

    def _on_intx(self) -> None:
        try:
            os.eventfd_read(self.interrupts.intx_fd)
        except BlockingIOError:
            pass
        isr = self.transport.interrupt_status()
        if isr & 1:
            for queue in self.queues:
                queue.reap()
        if isr & 2:
            self._config_changed()

    def _config_changed(self) -> None:
        self.config_changes += 1
        if self.on_config_change is not None:
            self.on_config_change()

    # ------------------------------------------------------------------ config space

    def read_config(self, offset: int, size: int) -> bytes:
        """Read config bytes consistently using config_generation (v1.4 §2.5.1)."""
        t = self.transport
        for _ in range(100):
            before = t.config_generation()
            data = bytearray()
            pos = offset
            while pos < offset + size:
                width = 4 if offset + size - pos >= 4 and pos % 4 == 0 else (
                    2 if offset + size - pos >= 2 and pos % 2 == 0 else 1)
                data += t.read_config(pos, width).to_bytes(width, "little")
                pos += width
            if t.config_generation() == before:
                return bytes(data)
        raise DeviceStateError("config_generation never settled")

    def config_int(self, offset: int, width: int) -> int:
        return int.from_bytes(self.read_config(offset, width), "little")

    # ------------------------------------------------------------------ teardown

    def _drop_queues(self) -> None:
        for queue in self.queues:
            for future in queue.ring.outstanding():
                if isinstance(future, asyncio.Future) and not future.done():
                    future.set_exception(RingError("device reset with the request in flight"))
        self.queues = []

    def close(self) -> None:
        self._stop_interrupts()
