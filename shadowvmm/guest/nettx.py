"""Fixed transmit slots for a polling virtio-net driver with VIRTIO_F_IN_ORDER (v1.4 §2.7.9,
§2.8.16).

With IN_ORDER the ring hands out descriptors (split) / buffer ids (packed) in ring order and
the device uses them in that order, so the memory behind id *k* can be fixed: slot ``k % n``
of *n* equally spaced slots (n divides the queue size, so the at most n buffers in flight
never share a slot). A batch takes consecutive ids, hence consecutive slots, and owns their
memory until it is used: its buffers (``virtio_net_hdr`` + frame each, one descriptor) are laid
end to end from the first slot's start, the whole batch written with one copy (the headers as
the separator of one join: all zero, no offloads, v1.4 §5.1.6). Completions are reaped by count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from ..errors import ArgumentError
from ..memory import GuestMemory
from ..virtio.inorder import InOrderPackedDriverQueue, InOrderSplitDriverQueue
from .driver import GuestQueue


@dataclass
class FixedTxSlots:
    """The slots of one transmitq whose ring is in order: slot ``id % len(slots)`` per id."""

    slots: list[int]
    view8: memoryview         #: the slots' memory region
    gpa_base: int             #: guest address of ``view8[0]``
    stride: int               #: bytes from one slot to the next
    header: int               #: bytes before the frame in a slot
    max_frame: int
    free: int                 #: slots not in flight

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
        return cls(list(slots), region.view, region.gpa, buffer_size, header, buffer_size - header, n)

    def send(self, queue: GuestQueue, frames: Sequence[bytes]) -> int:
        """Reap by count, then make as many of *frames* available as slots are free (one
        descriptor each, header + frame), one avail store and a kick if asked. Returns how many."""
        self.free += queue.reap_count()
        count = min(len(frames), self.free)
        if count == 0:
            return 0
        batch = frames[:count]
        sizes = list(map(len, batch))
        lo, hi = min(sizes), max(sizes)
        if lo < 1 or hi > self.max_frame:
            raise ArgumentError(f"frames of {lo}..{hi} bytes; 1..{self.max_frame} fit a buffer")
        n = len(self.slots)
        first = queue.ring.next_id % n
        part = min(count, n - first)
        gpas = self._store(batch[:part], sizes[:part], first)
        if count > part:
            gpas += self._store(batch[part:], sizes[part:], 0)
        header = self.header
        queue.add_many(gpas, list(map(header.__add__, sizes)), gpas)
        queue.kick()
        self.free -= count
        return count

    def _store(self, batch: Sequence[bytes], sizes: list[int], slot: int) -> list[int]:
        """Header + frame for each of *batch*, end to end from slot *slot* (the batch's slots
        hold them: each buffer fits one). Returns the buffers' guest addresses."""
        header = self._zero
        gpa = self.slots[slot]
        at = gpa - self.gpa_base
        data = header + header.join(batch)
        self.view8[at:at + len(data)] = data
        return list(accumulate(map(len(header).__add__, sizes[:-1]), initial=gpa))
