"""Guest driver core: initialisation, virtqueues, interrupts (virtio v1.4 §3.1).

:class:`GuestDevice` performs the spec's initialisation sequence purely
through transport register accesses, sets up split or packed rings in guest
memory, kicks through the notify register and takes interrupts from the
platform eventfds (one per MSI-X vector, or the INTx line + ISR read).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence

from ..device import Interrupts
from ..errors import DeviceStateError, RingError, ShadowVmmError
from ..memory import GuestAllocator, GuestMemory
from ..virtio.constants import NO_VECTOR, Feature, Status
from ..virtio.inorder import InOrderPackedDriverQueue, InOrderSplitDriverQueue
from ..virtio.packed import PackedDriverQueue, PackedLayout
from ..virtio.split import SplitDriverQueue, SplitLayout
from ..virtio.vring import RingState
from .transport import GuestTransport, MmioGuestTransport, PciGuestTransport

RESET_TIMEOUT = 5.0
#: How long :meth:`GuestDevice.stop_device` waits for the device to show STOP.
STOP_TIMEOUT = 5.0
#: virtio-mmio QueueSel and QueueReset (v1.4 §4.2.2).
_MMIO_QUEUE_SEL, _MMIO_QUEUE_RESET = 0x030, 0x0C0


class DeviceArena:
    """One device's share of the guest allocator.

    Every block handed out is recorded, ring memory under its queue, so a device
    reset or close gives all of them back and a queue reset gives back that
    queue's ring (v1.4 §2.6.1).
    """

    def __init__(self, allocator: GuestAllocator) -> None:
        self.allocator = allocator
        self._owned: dict[int | None, list[int]] = {}

    @property
    def allocations(self) -> int:
        return sum(len(gpas) for gpas in self._owned.values())

    def alloc(self, size: int, align: int = 16, *, queue: int | None = None) -> int:
        """A zeroed block, owned by the device (or by queue *queue*)."""
        gpa = self.allocator.alloc(size, align)
        self._owned.setdefault(queue, []).append(gpa)
        return gpa

    def free_queue(self, index: int) -> None:
        """Give back every block owned by queue *index*."""
        for gpa in self._owned.pop(index, []):
            self.allocator.free(gpa)

    def free_all(self) -> None:
        """Give back every block this device owns."""
        owned, self._owned = self._owned, {}
        for gpas in owned.values():
            for gpa in gpas:
                self.allocator.free(gpa)


class GuestQueue:
    """One virtqueue as the guest driver runs it."""

    def __init__(self, device: GuestDevice, index: int, ring, vector: int) -> None:
        self.device = device
        self.index = index
        self.ring = ring
        self.vector = vector
        self.completed = 0
        self.notifies = 0
        #: Takes every reaped ``(token, written)`` batch instead of resolving futures: a
        #: driver that keeps its own request slots (:meth:`BlkDriver.pipeline`) sets it.
        self.on_used: Callable[[list[tuple[object, int]]], None] | None = None
        #: Told when the queue is dropped by a device or queue reset (its tokens never complete).
        self.on_drop: Callable[[RingError], None] | None = None
        #: Why the queue was dropped; a dropped queue takes no buffers and reaps nothing.
        self.error: RingError | None = None
        self._stash: list[tuple[object, int]] = []

    @property
    def size(self) -> int:
        return self.ring.size

    @property
    def num_free(self) -> int:
        return self.ring.num_free

    def add(self, out: list[tuple[int, int]], inp: list[tuple[int, int]]) -> asyncio.Future:
        """Make a buffer available (not yet published); resolves to bytes written."""
        if self.error is not None:
            raise DeviceStateError(f"queue {self.index} is reset") from self.error
        future = self.device.loop.create_future()
        self.ring.add(out, inp, future)
        return future

    def add_many(self, addrs: Sequence[int], lengths: Sequence[int], tokens: Sequence[object], *,
                 write: bool = False) -> int:
        """Make one-descriptor buffers available as a batch (not yet published; :meth:`kick`
        publishes them with one index store). Returns how many fitted."""
        if self.error is not None:
            raise DeviceStateError(f"queue {self.index} is reset") from self.error
        return self.ring.add_many(addrs, lengths, tokens, write=write)

    def add_counted(self, addrs: Sequence[int], lengths: Sequence[int]) -> int:
        """Make one-descriptor device-readable buffers available that keep no token, on an
        in-order ring (reaped by :meth:`reap_count`). Returns how many fitted."""
        if self.error is not None:
            raise DeviceStateError(f"queue {self.index} is reset") from self.error
        return self.ring.add_counted(addrs, lengths)

    def add_strided(self, base: int, stride: int, slots: int, count: int) -> int:
        """Make *count* one-descriptor device-readable buffers available on an in-order ring,
        the one with id *k* the *stride* bytes at ``base + (k % slots) * stride`` (reaped by
        :meth:`reap_count`). Returns how many fitted."""
        if self.error is not None:
            raise DeviceStateError(f"queue {self.index} is reset") from self.error
        return self.ring.add_strided(base, stride, slots, count)

    def poll(self) -> None:
        """Polling mode (as a NAPI busy-poll or a DPDK PMD): ask the device not to interrupt
        (v1.4 §2.7.10, §2.8.10) and keep whatever an interrupt still reaps for
        :meth:`pop_used_many`, whose caller owns the tokens."""
        self.ring.set_interrupts(False)
        self.on_used = self._stash.extend

    def pop_used_many(self, limit: int) -> list[tuple[object, int]]:
        """Reap at most *limit* used buffers in one pass: ``(token, written)`` in order."""
        if self.error is not None:
            return []
        held = self._stash
        taken: list[tuple[object, int]] = []
        if held:                    # reaped by an interrupt that came anyway
            taken = held[:limit]
            del held[:limit]
        try:
            used = self.ring.pop_used_many(limit - len(taken))
        except RingError as exc:
            self.device.violations.append(f"queue {self.index}: {exc}")
            self.drop(f"device broke the ring: {exc}")
            return taken
        self.completed += len(used)
        return taken + used if taken else used

    def reap_count(self) -> int:
        """Reap every used buffer of an in-order ring by count (tokens are not returned):
        those an interrupt reaped anyway plus the ring's."""
        if self.error is not None:
            return 0
        held = len(self._stash)
        self._stash.clear()
        try:
            count = self.ring.reap_count()
        except RingError as exc:
            self.device.violations.append(f"queue {self.index}: {exc}")
            self.drop(f"device broke the ring: {exc}")
            return held
        self.completed += count
        return held + count

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
        if self.error is not None:
            return 0
        count = 0
        hook = self.on_used
        while True:
            try:
                used = self.ring.get_used()
            except RingError as exc:
                # Linux marks such a virtqueue broken (BAD_RING); so does the model, and it
                # records the device's protocol violation (a buffer used twice, or never made
                # available) for whoever checks the device.
                self.device.violations.append(f"queue {self.index}: {exc}")
                self.drop(f"device broke the ring: {exc}")
                break
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

    def drop(self, reason: str) -> None:
        """The device let go of the ring: fail every outstanding request with :class:`RingError`."""
        if self.error is not None:
            return
        self.error = error = RingError(f"queue {self.index}: {reason}")
        for token in self.ring.outstanding():
            if isinstance(token, asyncio.Future) and not token.done():
                token.set_exception(RingError(f"queue {self.index}: {reason}"))
        hook, self.on_drop, self.on_used = self.on_drop, None, None
        if hook is not None:
            hook(error)


class GuestDevice:
    """A guest's virtio driver core bound to one device."""

    def __init__(self, transport: GuestTransport, memory: GuestMemory, interrupts: Interrupts,
                 allocator: GuestAllocator, *, loop: asyncio.AbstractEventLoop | None = None,
                 settle: Callable[[], Awaitable[None]] | None = None) -> None:
        """*settle* waits until the device has acted on every register write so far; by
        default the transport's (:meth:`VirtioDevice.settle`), so :meth:`started` (and every
        driver's ``start()``) returns once the backend has started."""
        self.transport = transport
        self.memory = memory
        self.interrupts = interrupts
        self.alloc = DeviceArena(allocator)
        self.loop = loop or asyncio.get_running_loop()
        self._settle: Callable[[], Awaitable[None]] | None = settle if settle is not None else transport.settle
        self.features = 0
        self.queues: list[GuestQueue] = []
        self.on_config_change: Callable[[], None] | None = None
        #: Ring protocol violations the device committed (each broke its queue, see GuestQueue.reap).
        self.violations: list[str] = []
        self.config_changes = 0
        self._readers: list[int] = []
        self._held = False

    # ------------------------------------------------------------------ status

    def status(self) -> int:
        return self.transport.get_status()

    async def reset(self, timeout: float = RESET_TIMEOUT) -> None:
        """Write 0 and wait for status to read 0 (v1.4 §4.1.4.3.2); then every request in
        flight fails with :class:`RingError` and the device's guest memory is given back."""
        self.transport.set_status(0)
        deadline = self.loop.time() + timeout
        while self.status() != 0:
            if self.loop.time() > deadline:
                raise DeviceStateError("device did not complete reset")
            await asyncio.sleep(0.0005)
        self._drop_queues()
        self.alloc.free_all()

    async def initialize(self, wanted: int, *, packed: bool = False, queue_size: int = 256,
                         num_queues: int | None = None, set_driver_ok: bool = True,
                         ring_states: Mapping[int, int] | None = None,
                         layouts: Mapping[int, SplitLayout | PackedLayout] | None = None) -> int:
        """The driver initialisation sequence (v1.4 §3.1.1). Returns the negotiated features.

        *ring_states* re-creates a device from captured state (VIRTIO_F_RING_STATE, which
        *wanted* must include; docs/nested.md): each listed queue's state is written to its
        ring-state register before it is enabled and DRIVER_OK, and this driver's ring starts
        there too. *layouts* gives a listed queue the ring memory it had (a stopped device's
        drained ring, kept as it is) instead of a fresh one; its size is the layout's.
        """
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
        states, kept = ring_states or {}, layouts or {}
        for index in range(count):
            state = states.get(index)
            self.queues.append(self._setup_queue(index, queue_size, state=state, layout=kept.get(index)))
        if set_driver_ok:
            self.driver_ok()
            await self.started()
        return accepted

    async def stop_device(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write STOP (2021 dialect, 0x20) and poll the status until the device shows it.

        The device finishes what it took from the rings first; afterwards the ring states are
        readable (:meth:`read_ring_states`). STOP is left only by a reset.
        """
        t = self.transport
        t.set_status(self.status() | Status.STOP)
        deadline = self.loop.time() + timeout
        while not (status := self.status()) & Status.STOP:
            if status & Status.NEEDS_RESET:
                raise DeviceStateError("device failed while stopping: it set DEVICE_NEEDS_RESET")
            if self.loop.time() > deadline:
                raise DeviceStateError(f"device did not show STOP within {timeout:g} s (status {status:#x})")
            await asyncio.sleep(0.0005)

    def read_ring_states(self) -> dict[int, int]:
        """Every set-up queue's ring state (vhost base encoding) from its ring-state register;
        valid once :meth:`stop_device` returned (a running device reads 0xFFFFFFFF)."""
        return {queue.index: self.transport.ring_state(queue.index) for queue in self.queues}

    def ring_layouts(self) -> dict[int, SplitLayout | PackedLayout]:
        """Where each set-up queue's ring lies (for :meth:`initialize` ``layouts=``)."""
        return {queue.index: queue.ring.layout for queue in self.queues}

    def driver_ok(self) -> None:
        """Set DRIVER_OK; the device starts its backend asynchronously (see :meth:`started`)."""
        self.transport.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
                                  | Status.DRIVER_OK)

    async def started(self) -> None:
        """Wait until the device has acted on DRIVER_OK (v1.4 §3.1.1 step 8).

        A device that failed to start raises :class:`DeviceStateError` (chained to the
        failure when the settle hook reports it; DEVICE_NEEDS_RESET otherwise, v1.4 §2.1.2).
        """
        if self._settle is None:        # a guest that does not wait for the VMM (tests set it)
            return
        try:
            await self._settle()
        except (ShadowVmmError, OSError) as exc:
            raise DeviceStateError(f"device failed to start: {exc}") from exc
        if self.status() & Status.NEEDS_RESET:
            raise DeviceStateError("device failed to start: it set DEVICE_NEEDS_RESET")

    async def reset_queue(self, index: int, timeout: float = RESET_TIMEOUT) -> None:
        """Reset one virtqueue (VIRTIO_F_RING_RESET, v1.4 §2.6.1.1).

        Waits until queue_reset (PCI) / QueueReset (MMIO) reads back 0 (v1.4 §4.1.4.3.2,
        §4.2.2.2), then fails the queue's outstanding requests with :class:`RingError` and
        gives back its ring memory. :meth:`restart_queue` sets it up again.
        """
        if not self.features & Feature.RING_RESET:
            raise DeviceStateError("queue reset needs VIRTIO_F_RING_RESET")
        queue = self.queue(index)
        if queue.error is not None:
            raise DeviceStateError(f"queue {index} is already reset")
        self.transport.reset_queue(index)
        deadline = self.loop.time() + timeout
        while self._queue_resetting(index):
            if self.loop.time() > deadline:
                raise DeviceStateError(f"device did not complete the reset of queue {index}")
            await asyncio.sleep(0.0005)
        queue.drop("queue reset with the request in flight")
        self.alloc.free_queue(index)

    async def restart_queue(self, index: int, queue_size: int | None = None) -> GuestQueue:
        """Set a reset queue up again with a fresh ring and enable it (v1.4 §2.6.1.2);
        replaces ``queues[index]``. Waits until the device has acted on it."""
        queue = self.queue(index)
        if queue.error is None:
            raise DeviceStateError(f"queue {index} is not reset")
        fresh = self._setup_queue(index, queue.size if queue_size is None else queue_size)
        self.queues[index] = fresh
        await self.started()
        return fresh

    def add_queue(self, index: int, queue_size: int = 256) -> GuestQueue:
        """Set up one more queue past those :meth:`initialize` set up (an admin queue at
        ``admin_queue_index``, v1.4 §2.12), before DRIVER_OK; it must be the next index."""
        if index != len(self.queues):
            raise DeviceStateError(f"queue {index} is not the next one ({len(self.queues)} set up)")
        queue = self._setup_queue(index, queue_size)
        self.queues.append(queue)
        return queue

    def queue(self, index: int) -> GuestQueue:
        """``queues[index]``; :class:`DeviceStateError` if the queue is not set up."""
        if not 0 <= index < len(self.queues):
            raise DeviceStateError(f"no queue {index} ({len(self.queues)} set up)")
        return self.queues[index]

    def _queue_resetting(self, index: int) -> bool:
        """Whether the device still reads back 1 in the queue's reset register."""
        t = self.transport
        if isinstance(t, PciGuestTransport):
            return t.queue_resetting(index)
        if isinstance(t, MmioGuestTransport):
            t.t.write(_MMIO_QUEUE_SEL, 4, index)
            return bool(t.t.read(_MMIO_QUEUE_RESET, 4))
        raise DeviceStateError(f"{type(t).__name__} cannot read back a queue reset")

    def _setup_queue(self, index: int, wanted_size: int, *, state: int | None = None,
                     layout: SplitLayout | PackedLayout | None = None) -> GuestQueue:
        """Set queue *index* up and enable it; *state* / *layout*: see :meth:`initialize`."""
        t = self.transport
        max_size = t.queue_max_size(index)
        if max_size == 0:
            raise DeviceStateError(f"queue {index} is not available")
        if layout is not None and state is None:
            raise DeviceStateError(f"queue {index}: a kept ring needs the state it stopped at")
        size = min(max_size, wanted_size) if layout is None else layout.size
        packed = bool(self.features & Feature.RING_PACKED)
        kept = layout is not None
        layout = layout if layout is not None else self._new_layout(index, size, packed)
        ring_state = None if state is None else RingState(index, state)
        event_idx = bool(self.features & Feature.EVENT_IDX)
        ring: PackedDriverQueue | SplitDriverQueue
        in_order = bool(self.features & Feature.IN_ORDER)
        if isinstance(layout, PackedLayout) and packed:
            ring = (InOrderPackedDriverQueue if in_order else PackedDriverQueue)(
                self.memory, layout, event_idx=event_idx, state=ring_state, adopt=kept)
        elif isinstance(layout, SplitLayout) and not packed:
            ring = (InOrderSplitDriverQueue if in_order else SplitDriverQueue)(
                self.memory, layout, event_idx=event_idx, state=ring_state, adopt=kept)
        else:
            raise DeviceStateError(f"queue {index}: a {type(layout).__name__} for a "
                                   f"{'packed' if packed else 'split'} device")
        vector = index + 1 if t.uses_msix and index + 1 < self.interrupts.vectors else NO_VECTOR
        t.setup_queue(index, size, layout.desc, layout.driver, layout.device, vector)
        if state is not None:
            t.set_ring_state(index, state)
        t.enable_queue(index)
        return GuestQueue(self, index, ring, vector)

    def _new_layout(self, index: int, size: int, packed: bool) -> SplitLayout | PackedLayout:
        """Fresh ring memory for queue *index*, owned by it in the arena."""
        alloc = self.alloc.alloc
        if packed:
            d, a, u = PackedLayout.area_sizes(size)
            return PackedLayout(size, alloc(d, 16, queue=index), alloc(a, 4, queue=index),
                                alloc(u, 4, queue=index))
        d, a, u = SplitLayout.area_sizes(size)
        return SplitLayout(size, alloc(d, 16, queue=index), alloc(a, 2, queue=index),
                           alloc(u, 4, queue=index))

    def rebind(self, transport: GuestTransport, interrupts: Interrupts, *,
               settle: Callable[[], Awaitable[None]] | None = None) -> None:
        """Attach this driver to another device instance (migration switch-over);
        *settle* is the new device's hook (default: the new transport's; the old one is dropped)."""
        active = bool(self._readers)
        self._stop_interrupts()
        self.transport = transport
        self.interrupts = interrupts
        self._settle = settle if settle is not None else transport.settle
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
        queues, self.queues = self.queues, []
        for queue in queues:
            queue.drop("device reset with the request in flight")

    def close(self) -> None:
        """Stop taking interrupts (idempotent). The device's guest memory is given back unless
        a queue is still live: the device owns those rings and buffers until it is reset
        (v1.4 §3.3.1), which gives them back then."""
        self._stop_interrupts()
        self._held = False
        if all(queue.error is not None for queue in self.queues):
            self.alloc.free_all()
