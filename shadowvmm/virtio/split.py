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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..errors import RingError
from ..memory import GuestMemory
from .constants import MAX_QUEUE_SIZE
from .vring import RingState

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


class RingAreas:
    """Checks shared by split and packed layouts: the three areas' alignment and bounds."""

    __slots__ = ()
    #: Alignment of the Descriptor, Driver and Device areas.
    ALIGN: ClassVar[tuple[int, int, int]]

    def areas(self) -> tuple[tuple[str, int, int, int], ...]:
        """``(name, gpa, bytes, alignment)`` of each area."""
        sizes = self.area_sizes(self.size)  # type: ignore[attr-defined]
        addrs = (self.desc, self.driver, self.device)  # type: ignore[attr-defined]
        return tuple(zip(("desc", "driver", "device"), addrs, sizes, self.ALIGN))

    def check_alignment(self) -> None:
        for name, addr, _, align in self.areas():
            if addr % align:
                raise RingError(f"{name} area {addr:#x} is not {align}-byte aligned")

    def check_memory(self, memory: GuestMemory) -> None:
        """Every area must lie inside guest memory."""
        for _, addr, length, _ in self.areas():
            memory.translate(addr, length)

    def initialize(self, memory: GuestMemory) -> None:
        """A driver's fresh ring: validate the layout, check it lies in memory, zero every area."""
        self.validate()  # type: ignore[attr-defined]
        self.check_memory(memory)
        for _, addr, length, _ in self.areas():
            memory.view(addr, length)[:] = bytes(length)


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


def _pieces(bufs: list[tuple[int, int]], skip: int, length: int | None) -> Iterator[tuple[int, int]]:
    """``(gpa, bytes)`` of *bufs* covering *length* bytes (None: all) after the first *skip*;
    empty pieces are left out."""
    for gpa, size in bufs:
        if skip >= size:
            skip -= size
            continue
        gpa, size, skip = gpa + skip, size - skip, 0
        if length is not None:
            if length <= 0:
                return
            size = min(size, length)
            length -= size
        yield gpa, size


@dataclass(slots=True)
class DescChain:
    """One available buffer as the device sees it (v1.4 §2.7.5.2).

    The walk bounds how many buffers a chain has (:func:`walk_descriptors`), not how many
    bytes they span: a guest can point every descriptor at the same large buffer. A chain
    past 2^32 bytes (which drivers MUST NOT make, v1.4 §2.7.5.2) is not a broken ring here:
    the sums are exact, and every device limit is far below 2^32. Device code checks
    :attr:`readable_len` / :attr:`writable_len` against its own limits before it touches
    the buffers, and streams them (:meth:`segments`, guest memory views) instead of
    copying the chain whole.
    """

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]

    @property
    def readable_len(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)

    def segments(self, writable: bool, skip: int = 0,
                 length: int | None = None) -> list[tuple[int, int]]:
        """``(gpa, bytes)`` of the readable (or writable) buffers covering *length* bytes
        (None: to the end) after the first *skip*, without empty pieces."""
        return list(_pieces(self.writable if writable else self.readable, skip, length))

    def read(self, memory: GuestMemory, length: int | None = None) -> bytes:
        """The device-readable bytes (the first *length* if given), concatenated: a copy,
        so the caller bounds :attr:`readable_len` or *length* first."""
        if len(self.readable) == 1 and length is None:
            gpa, size = self.readable[0]
            return memory.read(gpa, size)
        return b"".join(memory.read(gpa, size) for gpa, size in _pieces(self.readable, 0, length))

    def write(self, memory: GuestMemory, data: bytes | memoryview, skip: int = 0) -> int:
        """Scatter *data* into the writable buffers after *skip* bytes; returns bytes written."""
        view = memoryview(data)
        done = 0
        for gpa, length in self.writable:
            if skip >= length:
                skip -= length
                continue
            room = length - skip
            chunk = view[done:done + room]
            if not chunk:
                break
            memory.write(gpa + skip, chunk)
            done += len(chunk)
            skip = 0
        return done


def walk_descriptors(memory: GuestMemory, table: int, table_size: int, head: int,
                     indirect_ok: bool, readable: list, writable: list,
                     limit: int | None = None) -> None:
    """Follow a descriptor chain from *head* (v1.4 §2.7.5.3 rules enforced).

    At most *limit* buffers (default: the queue size *table_size*, or :data:`INDIRECT_MAX`
    if larger) end up in *readable* and *writable* together, direct and indirect ones
    alike, so an indirect table claiming thousands of entries is refused once past the
    limit, before any buffer is read.
    """
    if limit is None:
        limit = max(table_size, INDIRECT_MAX)
    count = len(readable) + len(writable)
    region, base = memory.translate(table, DESC_SIZE * table_size)
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

    def avail_idx(self) -> int:
        return self._avail16[self._avail_idx16]

    def pending(self) -> int:
        return (self.avail_idx() - self.last_avail_idx) & 0xFFFF

    def pop(self) -> DescChain | None:
        """Next available chain, or None. Raises RingError on a malformed ring."""
        avail = self.avail_idx()
        if avail == self.last_avail_idx:
            return None
        if (avail - self.last_avail_idx) & 0xFFFF > self.size:
            raise RingError(f"avail idx {avail} runs {self.size}+ ahead of {self.last_avail_idx}")
        slot = self.last_avail_idx % self.size
        head = self._avail16[self._avail_idx16 + 1 + slot]
        readable: list = []
        writable: list = []
        walk_descriptors(self.memory, self.layout.desc, self.size, head, self.indirect,
                         readable, writable)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self._used16[self._avail_event16] = self.last_avail_idx
            self._mark(self._avail_event_addr, 2)
        return DescChain(head, readable, writable)

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
        self._single = bytearray(self.size)     #: heads :meth:`add_many` made (freed when used)
        self._interrupts = True
        self._avail_ring = layout.avail + 4
        self._used_event_addr = layout.avail + 4 + 2 * self.size
        self._avail_event_addr = layout.used + 4 + 8 * self.size
        region, off = memory.translate(layout.desc, d)
        self._desc_map, self._desc_off = region.mmap, off
        region, off = memory.translate(layout.avail, a)
        self._avail16, self._avail_ring16 = region.view16, (off >> 1) + 2
        region, off = memory.translate(layout.used, u)
        self._used_map, self._used_ring_off = region.mmap, off + 4
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
        return self._chain(out, inp)

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
        free = self.free
        count = min(len(addrs), len(free))
        if count == 0:
            return 0
        heads = free[-count:]
        heads.reverse()
        del free[-count:]
        pack, dmap, doff = DESC.pack_into, self._desc_map, self._desc_off
        flags, own, single = _WRITE if write else 0, self.tokens, self._single
        for head, gpa, length, token in zip(heads, addrs, lengths, tokens):
            pack(dmap, doff + DESC_SIZE * head, gpa, length, flags, 0)
            own[head] = token
            single[head] = 1
        size, base, ring16 = self.size, self._avail_ring16, self._avail16
        start = self.avail_idx % size
        first = min(count, size - start)
        ring16[base + start:base + start + first] = array("H", heads[:first])
        if count > first:
            ring16[base:base + count - first] = array("H", heads[first:])
        dirty = self.memory.dirty_log
        if dirty is not None:
            for k, head in enumerate(heads):
                dirty.mark(self.layout.desc + DESC_SIZE * head, DESC_SIZE)
                dirty.mark(self._avail_ring + 2 * ((start + k) % size), 2)
        self.avail_idx = (self.avail_idx + count) & 0xFFFF
        return count

    def get_used(self) -> list[tuple[object, int]]:
        """Reap used elements: ``(token, bytes written)`` in completion order."""
        return self.pop_used_many(self.size)

    def pop_used_many(self, limit: int) -> list[tuple[object, int]]:
        """Reap at most *limit* used elements in one pass (one used->idx load, the elements
        unpacked as an array); re-arms used_event (EVENT_IDX) unless interrupts are off."""
        size, last = self.size, self.last_used_idx
        count = min((self._used16[self._used_idx16] - last) & 0xFFFF, limit)
        if count > size:
            raise RingError(f"used idx runs {count} ahead of {last} (size {size})")
        out: list[tuple[object, int]] = []
        umap, base, start = self._used_map, self._used_ring_off, last % size
        first = min(count, size - start)
        elements = list(USED_ELEM.iter_unpack(umap[base + 8 * start:base + 8 * (start + first)]))
        if count > first:
            elements += USED_ELEM.iter_unpack(umap[base:base + 8 * (count - first)])
        take, missing, chains, free, single = self.tokens.pop, _MISSING, self._chains, self.free, self._single
        append = out.append
        for head, written in elements:
            token = take(head, missing)
            if token is missing:
                self.last_used_idx = (last + len(out)) & 0xFFFF
                raise RingError(f"device used unknown descriptor {head}")
            append((token, written))
            if single[head]:
                single[head] = 0
                free.append(head)
            elif chains:
                chain = chains.pop(head, None)
                if chain is not None:       # None: a reserved chain, kept by its driver
                    chain.reverse()
                    free.extend(chain)
        self.last_used_idx = last = (last + count) & 0xFFFF
        if self.event_idx and self._interrupts:
            self._avail16[self._avail_ring16 + size] = last
            dirty = self.memory.dirty_log
            if dirty is not None:
                dirty.mark(self._used_event_addr, 2)
        return out

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
