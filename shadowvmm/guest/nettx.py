"""Fixed transmit slots for a polling virtio-net driver with VIRTIO_F_IN_ORDER (v1.4 §2.7.9,
§2.8.16).

With IN_ORDER the ring hands out descriptors (split) / buffer ids (packed) in ring order and
the device uses them in that order, so the memory behind id *k* can be fixed. Each buffer is
``virtio_net_hdr`` + frame in one descriptor, the header all zero (no offloads, v1.4
§5.1.6); completions are reaped by count, and the device may use part of a batch. The *n*
slots' memory (n divides the queue size, so the at most n buffers in flight have distinct
ids mod n) is laid out by a *stride*: buffer *k* lies at ``slots[0] + (k % n) * stride``:

- a batch of frames of one size uses ``stride = header + size``: the batch is one
  contiguous run (two at the wrap) written with one copy (the headers as the separator of
  one join), and the ring writes its descriptors from arrays built once per stride (a
  packed ring whose ids sit in their own slots copies them from a table image);
- frames of mixed sizes use the slot size as the stride: each buffer in its own slot, one
  copy per frame.

Buffers in flight under one stride may overlap the memory another stride gives a new id, so
the stride changes only when no buffer is in flight; until then a batch that needs another
one goes out under the slot stride if that is the one in use, else waits (:meth:`send`
queues nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ArgumentError
from ..memory import GuestMemory
from ..virtio.inorder import InOrderPackedDriverQueue, InOrderSplitDriverQueue
from .driver import GuestQueue


@dataclass
class FixedTxSlots:
    """The slots of one transmitq whose ring is in order: buffer *k* at a fixed place."""

    memory: GuestMemory
    slots: list[int]
    view8: memoryview         #: the slots' memory region
    gpa_base: int             #: guest address of ``view8[0]``
    stride: int               #: bytes from one slot to the next
    header: int               #: bytes before the frame in a buffer
    max_frame: int
    free: int                 #: slots not in flight
    layout: int = 0           #: the stride buffers in flight were laid out by (0: none yet)

    def __post_init__(self) -> None:
        self._zero = bytes(self.header)

    @classmethod
    def of(cls, memory: GuestMemory, queue: GuestQueue, slots: list[int], buffer_size: int,
           header: int) -> FixedTxSlots | None:
        """Fixed slots for *queue*, or None if its ring is not in order or the slots do not fit
        the scheme (one region, equally spaced, a count dividing the queue size)."""
        n = len(slots)
        if not isinstance(queue.ring, InOrderSplitDriverQueue | InOrderPackedDriverQueue):
            return None
        if n == 0 or queue.size % n or queue.ring.in_flight:
            return None
        if slots != [slots[0] + buffer_size * k for k in range(n)]:
            return None
        region = memory.translate(slots[0], buffer_size * n)[0]
        return cls(memory, list(slots), region.view, region.gpa, buffer_size, header, buffer_size - header, n)

    def send(self, queue: GuestQueue, frames: Sequence[bytes]) -> int:
        """Reap by count, then make as many of *frames* available as slots are free (one
        descriptor each, header + frame, no token kept), one avail store and a kick if asked.
        Returns how many: 0 while a change of stride waits for the buffers in flight."""
        n = len(self.slots)
        self.free += queue.reap_count()
        count = min(len(frames), self.free)
        if count == 0:
            return 0
        batch = frames[:count]
        sizes = list(map(len, batch))
        lo = hi = sizes[0]
        if sizes.count(lo) != count:       # one size (the common case) needs no min and max
            lo, hi = min(sizes), max(sizes)
        if lo < 1 or hi > self.max_frame:
            raise ArgumentError(f"frames of {lo}..{hi} bytes; 1..{self.max_frame} fit a buffer")
        header, slot = self.header, self.stride
        stride = header + lo if lo == hi else slot
        if stride != self.layout:
            if self.free == n:
                self.layout = stride
            elif self.layout == slot:
                stride = slot
            else:
                return 0
        first = queue.ring.next_id % n
        part = min(count, n - first)
        if lo == hi and stride == header + lo:
            self._put(batch[:part], first * stride)
            if count > part:
                self._put(batch[part:], 0)
            queue.add_strided(self.slots[0], stride, n, count)
        else:
            self._put_each(batch, first)
            queue.add_counted(self.slots[first:first + part] + self.slots[:count - part],
                              list(map(header.__add__, sizes)))
        queue.kick()
        self.free -= count
        return count

    def _put(self, batch: Sequence[bytes], offset: int) -> None:
        """Header + frame for each of *batch*, end to end from *offset* bytes into the slots."""
        header = self._zero
        at = self.slots[0] - self.gpa_base + offset
        body = header.join(batch)
        end = at + len(header) + len(body)
        self.view8[at:at + len(header)] = header
        self.view8[at + len(header):end] = body
        self._dirty(at, end - at)

    def _put_each(self, batch: Sequence[bytes], first: int) -> None:
        """Header + frame for each of *batch* at the start of its own slot, from *first*."""
        view8, header, slot, n = self.view8, self._zero, self.stride, len(self.slots)
        base, dirty = self.slots[0] - self.gpa_base, self.memory.dirty_log
        for k, frame in enumerate(batch, first):
            at = base + k % n * slot
            data = header + frame
            view8[at:at + len(data)] = data
            if dirty is not None:
                dirty.mark(self.gpa_base + at, len(data))

    def _dirty(self, at: int, length: int) -> None:
        """Dirty-log a write of the slots' memory (as :meth:`GuestMemory.write` does)."""
        dirty = self.memory.dirty_log
        if dirty is not None:
            dirty.mark(self.gpa_base + at, length)
