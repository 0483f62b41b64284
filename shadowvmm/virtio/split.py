"""Split virtqueue layout and accessors (virtio v1.4 §2.7 "Split Virtqueues").

Both sides are here: :class:`SplitDriverQueue` is what a guest driver does
(fill descriptors, publish avail idx, reap used entries) and
:class:`SplitDeviceQueue` is what a device does (pop available chains,
publish used entries). Both only touch guest memory through
:class:`~shadowvmm.memory.GuestMemory`, so every address is bounds checked
and ring indexes are published with single 16-bit stores.
"""

from __future__ import annotations

import enum
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import ClassVar

from ..errors import RingError
from ..memory import GuestMemory, MemoryRegion
from .chain import DescChain
from .constants import MAX_QUEUE_SIZE
from .vring import RingAreas, RingState

DESC = struct.Struct("<QIHH")        #: virtq_desc: addr, len, flags, next (v1.4 §2.7.5)
USED_ELEM = struct.Struct("<II")     #: virtq_used_elem: id, len (v1.4 §2.7.8)
DESC_SIZE = 16


class DescFlags(enum.IntFlag):
    """virtq_desc flags (v1.4 §2.7.5)."""

    NEXT = 1      #: chain continues via ``next``
    WRITE = 2     #: device-writable buffer
    INDIRECT = 4  #: buffer holds an indirect descriptor table (v1.4 §2.7.5.3)


_NEXT, _WRITE, _INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)

#: Buffers a chain may have through an indirect table when the queue is smaller. The spec
#: bounds a chain by the queue size (v1.4 §2.7.5.3.1, §2.8.17), but Linux does not check
#: that for indirect chains; QEMU (VIRTQUEUE_MAX_SIZE) and vhost (UIO_MAXIOV) take 1024.
INDIRECT_MAX = 1024

AVAIL_F_NO_INTERRUPT = 1  #: v1.4 §2.7.6
USED_F_NO_NOTIFY = 1      #: v1.4 §2.7.8


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The event-index test (v1.4 §2.7.7.2, ``vring_need_event``)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass(frozen=True, slots=True)
class SplitLayout(RingAreas):
    """Guest-physical placement of one split ring (v1.4 §2.7 table of alignments)."""

    size: int
    desc: int
    avail: int
    used: int

    ALIGN: ClassVar[tuple[int, int, int]] = (16, 2, 4)

    @property
    def driver(self) -> int:
        """The Driver Area (v1.4 §2.6: the avail ring for split queues)."""
        return self.avail

    @property
    def device(self) -> int:
        """The Device Area (v1.4 §2.6: the used ring for split queues)."""
        return self.used

    @staticmethod
    def area_sizes(size: int) -> tuple[int, int, int]:
        """Bytes of descriptor table, avail ring and used ring (incl. event fields)."""
        return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size

    def validate(self) -> None:
        if not 0 < self.size <= MAX_QUEUE_SIZE or self.size & (self.size - 1):
            raise RingError(f"split queue size {self.size} is not a power of 2 <= {MAX_QUEUE_SIZE}")
        self.check_alignment()


def walk_descriptors(memory: GuestMemory, table: int, table_size: int, head: int,
                     indirect_ok: bool, readable: list, writable: list,
                     limit: int | None = None, *, located: tuple[MemoryRegion, int] | None = None) -> None:
    """Follow a descriptor chain from *head* (v1.4 §2.7.5.3 rules enforced).

    At most *limit* buffers (default: the queue size *table_size*, or :data:`INDIRECT_MAX`
    if larger) end up in *readable* and *writable* together, direct and indirect ones
    alike, so an indirect table claiming thousands of entries is refused once past the
    limit, before any buffer is read. *located*: the table's region and offset, if the
    caller translated it already (a queue's own table, checked when the queue was made).
    """
    if limit is None:
        limit = max(table_size, INDIRECT_MAX)
    count = len(readable) + len(writable)
    region, base = located or memory.translate(table, DESC_SIZE * table_size)
    tmap, unpack, translate = region.mmap, DESC.unpack_from, memory.translate
    rgpa, rsize = region.gpa, region.size
    index = head
    seen = 0
    while True:
        if index >= table_size:
            raise RingError(f"descriptor index {index} out of range ({table_size})")
        seen += 1
        if seen > table_size:
            raise RingError("descriptor chain loops")
        addr, length, flags, nxt = unpack(tmap, base + DESC_SIZE * index)
        if flags & _INDIRECT:
            if not indirect_ok:
                raise RingError("nested or unnegotiated indirect descriptor")
            if flags & _NEXT:
                raise RingError("INDIRECT and NEXT both set")
            if length == 0 or length % DESC_SIZE:
                raise RingError(f"indirect table length {length} is not a multiple of 16")
            walk_descriptors(memory, addr, length // DESC_SIZE, 0, False, readable, writable, limit)
            return
        if count >= limit:
            raise RingError(f"descriptor chain longer than {limit} buffers")
        count += 1
        off = addr - rgpa
        if off < 0 or off + length > rsize:     # not in the table's region: search (or refuse)
            translate(addr, length)
        if flags & _WRITE:
            writable.append((addr, length))
        else:
            if writable:
                raise RingError("device-readable descriptor after a writable one")
            readable.append((addr, length))
        if not flags & _NEXT:
            return
        index = nxt


class SplitDeviceQueue:
    """Device side of a split ring: consume avail entries, produce used ones."""

    def __init__(self, memory: GuestMemory, layout: SplitLayout, *, event_idx: bool = False,
                 indirect: bool = True, last_avail_idx: int = 0) -> None:
        layout.validate()
        layout.check_memory(memory)
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = memory.load_u16(layout.used + 2)
        self._signalled_used = self.used_idx
        self._avail_idx_addr = layout.avail + 2
        self._avail_ring = layout.avail + 4
        self._used_ring = layout.used + 4
        self._used_idx_addr = layout.used + 2
        self._used_event_addr = layout.avail + 4 + 2 * self.size
        self._avail_event_addr = layout.used + 4 + 8 * self.size
        _, a, u = layout.area_sizes(self.size)
        region, off = memory.translate(layout.avail, a)
        self._avail16, self._avail_idx16 = region.view16, (off >> 1) + 1
        region, off = memory.translate(layout.used, u)
        self._used16, self._used_map, self._used_off = region.view16, region.mmap, off
        self._avail_event16 = (off >> 1) + 2 + 4 * self.size
        self._table = memory.translate(layout.desc, DESC_SIZE * self.size)

    def avail_idx(self) -> int:
        return self._avail16[self._avail_idx16]

    def pending(self) -> int:
        return (self.avail_idx() - self.last_avail_idx) & 0xFFFF

    def pop(self) -> DescChain | None:
        """Next available chain, or None. Raises RingError on a malformed ring."""
        avail16, at = self._avail16, self._avail_idx16
        avail, last = avail16[at], self.last_avail_idx
        if avail == last:
            return None
        if (avail - last) & 0xFFFF > self.size:
            raise RingError(f"avail idx {avail} runs {self.size}+ ahead of {last}")
        head = avail16[at + 1 + last % self.size]
        readable: list = []
        writable: list = []
        walk_descriptors(self.memory, self.layout.desc, self.size, head, self.indirect,
                         readable, writable, located=self._table)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self._used16[self._avail_event16] = self.last_avail_idx
            self._mark(self._avail_event_addr, 2)
        return DescChain(head, readable, writable)

    def pop_many(self, out: list[DescChain]) -> None:
        """Append every available chain to *out*, as :meth:`pop` until None would; a malformed
        chain raises once the ones before it are in *out* and consumed."""
        avail16, at, size, last = self._avail16, self._avail_idx16, self.size, self.last_avail_idx
        count = (avail16[at] - last) & 0xFFFF
        if count > size:
            raise RingError(f"avail idx {avail16[at]} runs {size}+ ahead of {last}")
        memory, desc, indirect, table, append = self.memory, self.layout.desc, self.indirect, self._table, out.append
        region, base = table
        tmap, unpack, rgpa, rsize = region.mmap, DESC.unpack_from, region.gpa, region.size
        taken = 0
        try:
            for k in range(last, last + count):
                head = avail16[at + 1 + k % size]
                readable: list = []
                writable: list = []
                # The usual chain (direct descriptors in the table's region, readable ones first)
                # is walked here; anything else is left to walk_descriptors from the head.
                index, seen, plain = head, 0, False
                while index < size and seen < size:
                    seen += 1
                    addr, length, flags, index = unpack(tmap, base + DESC_SIZE * index)
                    off = addr - rgpa
                    if flags & _INDIRECT or off < 0 or off + length > rsize:
                        break
                    if flags & _WRITE:
                        writable.append((addr, length))
                    elif writable:
                        break
                    else:
                        readable.append((addr, length))
                    if not flags & _NEXT:
                        plain = True
                        break
                if not plain:
                    readable, writable = [], []
                    walk_descriptors(memory, desc, size, head, indirect, readable, writable, located=table)
                append(DescChain(head, readable, writable))
                taken += 1
        finally:
            if taken:
                self.last_avail_idx = (last + taken) & 0xFFFF
                if self.event_idx:
                    self._used16[self._avail_event16] = self.last_avail_idx
                    self._mark(self._avail_event_addr, 2)

    def chain_at(self, head: int) -> DescChain:
        """The chain starting at descriptor *head*, consuming no avail entry.

        For a chain that was made available before, e.g. one resubmitted from
        the vhost-user inflight region ("Inflight I/O tracking").
        """
        if not 0 <= head < self.size:
            raise RingError(f"descriptor head {head} out of range ({self.size})")
        readable: list = []
        writable: list = []
        walk_descriptors(self.memory, self.layout.desc, self.size, head, self.indirect,
                         readable, writable)
        return DescChain(head, readable, writable)

    def _mark(self, gpa: int, length: int) -> None:
        dirty = self.memory.dirty_log
        if dirty is not None:
            dirty.mark(gpa, length)

    def push(self, head: int, written: int) -> None:
        """Add one used element and publish it."""
        self.push_batch(((head, written),))

    def push_batch(self, entries: Iterable[tuple[int, int]]) -> None:
        """Write used elements, then publish the index once (one 16-bit store)."""
        pack, umap, base, size = USED_ELEM.pack_into, self._used_map, self._used_off + 4, self.size
        idx = first = self.used_idx
        for head, written in entries:
            pack(umap, base + 8 * (idx % size), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        self._used16[(self._used_off >> 1) + 1] = idx
        if self.memory.dirty_log is not None:
            count = (idx - first) & 0xFFFF
            for k in range(count):
                self._mark(self._used_ring + 8 * ((first + k) % size), 8)
            self._mark(self._used_idx_addr, 2)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call."""
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if old == new:
            return False
        if self.event_idx:
            return need_event(self.memory.load_u16(self._used_event_addr), new, old)
        return not self.memory.load_u16(self.layout.avail) & AVAIL_F_NO_INTERRUPT

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver (not) to kick (advisory, v1.4 §2.7.10)."""
        if self.event_idx:
            if enabled:
                self.memory.store_u16(self._avail_event_addr, self.last_avail_idx)
        else:
            self.memory.store_u16(self.layout.used, 0 if enabled else USED_F_NO_NOTIFY)


_MISSING = object()


class SplitDriverQueue:
    """Driver side of a split ring, as a guest driver runs it.

    The ring areas are validated once at construction and then written
    through their region mapping directly (``pack_into``, single 16-bit
    index stores); guest writes are still marked in the dirty log.
    """

    def __init__(self, memory: GuestMemory, layout: SplitLayout, *, event_idx: bool = False,
                 state: RingState | None = None, adopt: bool = False) -> None:
        """*state* (vhost base encoding: the next avail idx) starts the ring there instead of at 0.
        With *adopt* the areas already hold the ring that state was read from (a stopped device's,
        every request used): they are kept, and must agree. Without it they are cleared and, for a
        *state*, both idx fields set to it before the device sees the ring."""
        start = 0 if state is None else state.base & 0xFFFF
        if adopt:
            layout.validate()
            layout.check_memory(memory)
            avail, used = memory.load_u16(layout.avail + 2), memory.load_u16(layout.used + 2)
            if avail != start or used != start:
                raise RingError(f"ring at {layout.desc:#x} has avail idx {avail}, used idx {used}: not a "
                                f"drained ring stopped at {start}")
        else:
            layout.initialize(memory)
            if start:
                # idx and the EVENT_IDX fields (used_event after the avail ring, avail_event after
                # the used ring, v1.4 §2.7.10) as a ring stopped there would hold them
                for addr in (layout.avail + 2, layout.used + 2, layout.avail + 4 + 2 * layout.size,
                             layout.used + 4 + 8 * layout.size):
                    memory.store_u16(addr, start)
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        d, a, u = layout.area_sizes(self.size)
        self.free = list(range(self.size - 1, -1, -1))
        self.avail_idx = start
        self.last_used_idx = start
        self._kicked_avail = start
        self.tokens: dict[int, object] = {}
        self._chains: dict[int, list[int]] = {}
        self._reserved: set[int] = set()        #: heads of chains :meth:`reserve` keeps
        self._interrupts = True
        self._avail_ring = layout.avail + 4
        self._used_event_addr = layout.avail + 4 + 2 * self.size
        self._avail_event_addr = layout.used + 4 + 8 * self.size
        region, off = memory.translate(layout.desc, d)
        self._desc_map, self._desc_off, self._desc64 = region.mmap, off, region.view64
        region, off = memory.translate(layout.avail, a)
        self._avail16, self._avail_ring16 = region.view16, (off >> 1) + 2
        region, off = memory.translate(layout.used, u)
        self._used_map, self._used_ring_off = region.mmap, off + 4
        self._used32, self._used_ring32 = region.view32, (off + 4) >> 2
        self._used16, self._used_idx16 = region.view16, (off >> 1) + 1
        self._avail_event16 = (off >> 1) + 2 + 4 * self.size

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _chain(self, out: list[tuple[int, int]], inp: list[tuple[int, int]]) -> list[int]:
        """Take descriptors and write *out* (device-readable) then *inp* (device-writable)."""
        free = self.free
        count = len(out) + len(inp)
        if count == 0 or count > len(free):
            raise RingError(f"need {count} descriptors, {len(free)} free")
        heads = free[-count:]
        heads.reverse()
        del free[-count:]
        pack, dmap, doff = DESC.pack_into, self._desc_map, self._desc_off
        last = count - 1
        i = 0
        for bufs, write in ((out, 0), (inp, _WRITE)):
            for gpa, length in bufs:
                if i < last:
                    pack(dmap, doff + DESC_SIZE * heads[i], gpa, length, write | _NEXT, heads[i + 1])
                else:
                    pack(dmap, doff + DESC_SIZE * heads[i], gpa, length, write, 0)
                i += 1
        dirty = self.memory.dirty_log
        if dirty is not None:
            for index in heads:
                dirty.mark(self.layout.desc + DESC_SIZE * index, DESC_SIZE)
        return heads

    def add(self, out: list[tuple[int, int]], inp: list[tuple[int, int]], token: object) -> int:
        """Chain *out* (device-readable) then *inp* (device-writable); not yet published."""
        heads = self._chain(out, inp)
        head = heads[0]
        self.tokens[head] = token
        self._chains[head] = heads
        slot = self.avail_idx % self.size
        self._avail16[self._avail_ring16 + slot] = head
        dirty = self.memory.dirty_log
        if dirty is not None:
            dirty.mark(self._avail_ring + 2 * slot, 2)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def reserve(self, out: list[tuple[int, int]], inp: list[tuple[int, int]]) -> list[int]:
        """Write a chain whose descriptors stay allocated until :meth:`release`.

        A driver's fixed request slot (as Linux blk-mq preallocates per tag): the chain is
        written once and made available again and again with :meth:`post`, rewriting at
        most one descriptor (:meth:`rewrite`) per request. Returns the descriptor indexes,
        head first.
        """
        heads = self._chain(out, inp)
        self._reserved.add(heads[0])
        return heads

    def rewrite(self, index: int, gpa: int, length: int, flags: int, next_index: int) -> None:
        """Rewrite descriptor *index* of a reserved chain (not while it is available)."""
        DESC.pack_into(self._desc_map, self._desc_off + DESC_SIZE * index, gpa, length, flags, next_index)
        dirty = self.memory.dirty_log
        if dirty is not None:
            dirty.mark(self.layout.desc + DESC_SIZE * index, DESC_SIZE)

    def post(self, heads: list[int], tokens: list[object]) -> None:
        """Make reserved chains available (not yet published): one avail entry each."""
        own = self.tokens
        ring16, base, size = self._avail16, self._avail_ring16, self.size
        idx = self.avail_idx
        dirty = self.memory.dirty_log
        for head, token in zip(heads, tokens):
            if head in own:
                raise RingError(f"descriptor {head} is already available")
            own[head] = token
            ring16[base + idx % size] = head
            if dirty is not None:
                dirty.mark(self._avail_ring + 2 * (idx % size), 2)
            idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx

    def release(self, chain: list[int]) -> None:
        """Return a reserved chain's descriptors to the free list (it must not be available)."""
        if chain and chain[0] in self.tokens:
            raise RingError(f"descriptor {chain[0]} is still available to the device")
        if chain:
            self._reserved.discard(chain[0])
        self.free.extend(reversed(chain))

    def publish(self) -> bool:
        """Publish the avail index (one 16-bit store); True if the device wants a kick."""
        new = self.avail_idx
        self._avail16[self._avail_ring16 - 1] = new
        dirty = self.memory.dirty_log
        if dirty is not None:
            dirty.mark(self.layout.avail + 2, 2)
        old = self._kicked_avail
        self._kicked_avail = new
        if old == new:
            return False
        if self.event_idx:
            return need_event(self._used16[self._avail_event16], new, old)
        return not self._used16[self._used_idx16 - 1] & USED_F_NO_NOTIFY

    def has_used(self) -> bool:
        """Whether the device published used elements not reaped yet (one 16-bit load)."""
        return self._used16[self._used_idx16] != self.last_used_idx

    def add_many(self, addrs: Sequence[int], lengths: Sequence[int], tokens: Sequence[object], *,
                 write: bool = False) -> int:
        """Make one-descriptor buffers available as a batch (not yet published: :meth:`publish`
        stores the avail index once); returns how many fitted the free descriptors."""
        heads = self._add_run(addrs, lengths, write)
        self.tokens.update(zip(heads, tokens))
        return len(heads)

    def _add_run(self, addrs: Sequence[int], lengths: Sequence[int], write: bool) -> list[int]:
        """Write one-descriptor buffers and their avail entries; returns their heads.

        Descriptors are written as two 64-bit stores each (addr; len | flags << 32), each run
        of consecutive heads (two at most when the free list goes round the table in order)
        as two strided array stores, the avail entries as one array store per ring part."""
        heads = self._take_heads(len(addrs))
        if heads:
            self._write_heads(heads, addrs, lengths, write)
        return heads

    def _write_heads(self, heads: list[int], addrs: Sequence[int], lengths: Sequence[int], write: bool) -> None:
        count, first, size = len(heads), heads[0], self.size
        high = (_WRITE if write else 0) << 32
        split = min(count, size - first)
        if heads == [*range(first, first + split), *range(count - split)]:
            for done, head, part in ((0, first, split), (split, 0, count - split)):
                if part:
                    self._store_descs(head, array("Q", addrs[done:done + part]), array(
                        "Q", map(high.__or__, lengths[done:done + part]) if high else lengths[done:done + part]))
        else:
            q, base = self._desc64, self._desc_off >> 3
            for head, gpa, length in zip(heads, addrs, lengths):
                q[base + 2 * head] = gpa
                q[base + 2 * head + 1] = length | high
        self._store_avail(heads, array("H", heads))

    def _take_heads(self, count: int) -> list[int]:
        """Up to *count* free descriptors, in the order they are handed out."""
        free = self.free
        count = min(count, len(free))
        if count <= 0:
            return []
        heads = free[-count:]
        heads.reverse()
        del free[-count:]
        return heads

    def _store_descs(self, head: int, addrs: array[int], words: array[int]) -> None:
        """Descriptors ``head..head+len(addrs)-1`` (no wrap): addr and ``len | flags << 32``."""
        q, count = self._desc64, len(addrs)
        at = (self._desc_off >> 3) + 2 * head
        q[at:at + 2 * count:2] = addrs
        q[at + 1:at + 2 * count:2] = words

    def _store_avail(self, heads: list[int], entries: array[int]) -> None:
        """The avail ring entries of *heads* (*entries*: the same as 16-bit values) from avail
        idx on, the descriptors' dirty marks, and avail idx advanced (not published)."""
        count, size = len(heads), self.size
        ring, ring16 = self._avail_ring16, self._avail16
        start = self.avail_idx % size
        part = min(count, size - start)
        ring16[ring + start:ring + start + part] = entries[:part]
        if count > part:
            ring16[ring:ring + count - part] = entries[part:]
        dirty = self.memory.dirty_log
        if dirty is not None:
            for k, head in enumerate(heads):
                dirty.mark(self.layout.desc + DESC_SIZE * head, DESC_SIZE)
                dirty.mark(self._avail_ring + 2 * ((start + k) % size), 2)
        self.avail_idx = (self.avail_idx + count) & 0xFFFF

    def get_used(self) -> list[tuple[object, int]]:
        """Reap used elements: ``(token, bytes written)`` in completion order."""
        return self.pop_used_many(self.size)

    def _used_run(self, last: int, count: int) -> tuple[list[int], list[int]]:
        """Ids and written lengths of *count* used elements from index *last*, read as strided
        arrays of the used ring (v1.4 §2.7.8), across its wrap."""
        size, u32, base = self.size, self._used32, self._used_ring32
        start = last % size
        part = min(count, size - start)
        at = base + 2 * start
        ids, written = u32[at:at + 2 * part:2].tolist(), u32[at + 1:at + 2 * part:2].tolist()
        if count > part:
            ids += u32[base:base + 2 * (count - part):2].tolist()
            written += u32[base + 1:base + 2 * (count - part):2].tolist()
        return ids, written

    def pop_used_many(self, limit: int) -> list[tuple[object, int]]:
        """Reap at most *limit* used elements in one pass: one used->idx load, ids and lengths
        read as strided arrays; re-arms used_event (EVENT_IDX) unless interrupts are off."""
        size, last = self.size, self.last_used_idx
        count = min((self._used16[self._used_idx16] - last) & 0xFFFF, limit)
        if count > size:
            raise RingError(f"used idx runs {count} ahead of {last} (size {size})")
        if count == 0:
            return []
        ids, written = self._used_run(last, count)
        tokens = list(map(self.tokens.pop, ids, repeat(_MISSING, count)))
        if _MISSING in tokens:
            bad = ids[tokens.index(_MISSING)]
            raise RingError(f"device used unknown descriptor {bad}")
        chains, free = self._chains, self.free
        if not chains and not self._reserved:
            ids.reverse()           # the next batch takes them back in ring order
            free += ids
        else:
            for head in ids:
                chain = chains.pop(head, None)
                if chain is not None:
                    chain.reverse()
                    free += chain
                elif head not in self._reserved:
                    free.append(head)
        self.last_used_idx = last = (last + count) & 0xFFFF
        if self.event_idx and self._interrupts:
            self._avail16[self._avail_ring16 + size] = last
            dirty = self.memory.dirty_log
            if dirty is not None:
                dirty.mark(self._used_event_addr, 2)
        return list(zip(tokens, written))

    def set_interrupts(self, enabled: bool) -> None:
        """Ask the device (not) to interrupt (v1.4 §2.7.10). With EVENT_IDX, off means
        used_event is no longer re-armed (left behind, as Linux's disable_cb does)."""
        self._interrupts = enabled
        if self.event_idx:
            if enabled:
                self._avail16[self._avail_ring16 + self.size] = self.last_used_idx
        else:
            self.memory.store_u16(self.layout.avail, 0 if enabled else AVAIL_F_NO_INTERRUPT)

    @property
    def in_flight(self) -> int:
        return len(self.tokens)

    def outstanding(self) -> list[object]:
        """Tokens of buffers the device has not used yet."""
        return list(self.tokens.values())
