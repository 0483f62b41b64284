"""Driver rings for VIRTIO_F_IN_ORDER (v1.4 §2.7.9 split, §2.8.16 packed).

With IN_ORDER the device uses buffers in the order they were made available, and may tell
the driver about a whole batch with one used element (split: one used ring entry at the
batch's first offset, used idx advanced by the batch size; packed: one used descriptor at
the batch's first slot) whose id is the last buffer's. Buffers skipped that way count as
used completely (v1.4 §2.7.9: a device-writable buffer as written to its full length).

These rings keep the ids made available in order and reap by walking batches: an element
whose id is the next expected one completes one buffer, any other id completes every buffer
up to it. Descriptors (split) and buffer ids (packed) are handed out in ring order, as the
split driver requirement asks (descriptors used "in ring order", v1.4 §2.7.9): a reaped
descriptor goes to the back of the free list instead of being reused first.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence
from functools import cached_property
from itertools import repeat

from ..errors import RingError
from ..memory import GuestMemory
from .packed import _BIT1, _BIT7, PackedDriverQueue, PackedLayout
from .packedfmt import _AVAIL, _USED, _WRITE, DESC_SIZE, FLAGS_OFFSET, avail_flags, off_wrap
from .split import SplitDriverQueue, SplitLayout
from .vring import RingState


def _store_run(table: list[int], ids: list[int], lengths: Sequence[int], write: bool) -> None:
    """Record the device-writable length (0 unless *write*) of buffers with consecutive ids
    (mod the table size) in two slice stores."""
    if not ids:
        return
    size, first, count = len(table), ids[0], len(ids)
    part = min(count, size - first)
    values = list(lengths[:count]) if write else [0] * count
    table[first:first + part] = values[:part]
    table[:count - part] = values[part:]


_Taken = tuple[list[object], list[int]]     #: tokens and written lengths of reaped buffers


class _Strided:
    """What add_strided slices per batch: ids ``0..size-1`` twice (as ints and as 16-bit
    values) and the address of each id's buffer for the layout last asked for, twice."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ids = list(range(size)) * 2
        self.ids16 = array("H", self.ids)
        self._key: tuple[int, int, int] | None = None
        self._addrs = array("Q")
        self._images: dict[bool, bytes] = {}

    @cached_property
    def words(self) -> tuple[array[int], array[int]]:
        """A device-readable packed descriptor's ``id | flags << 16`` by driver wrap counter."""
        return (array("I", [k | avail_flags(False) << 16 for k in self.ids]),
                array("I", [k | avail_flags(True) << 16 for k in self.ids]))

    def addrs(self, base: int, stride: int, slots: int) -> array[int]:
        """Buffer *k* at ``base + (k % slots) * stride``, for k in ``0..2*size-1``."""
        key = (base, stride, slots)
        if key != self._key:
            self._key = key
            self._addrs = array("Q", [base + k % slots * stride for k in range(self.size)]) * 2
            self._images = {}
        return self._addrs

    def image(self, base: int, stride: int, slots: int, wrap: bool) -> bytes:
        """The packed descriptor table as the driver leaves it when the buffer with id *k*
        sits in slot *k* (v1.4 §2.8.13): addr of id *k*, len *stride*, id *k*, flags
        AVAIL/USED for the driver wrap counter *wrap*; one per layout and counter."""
        addrs = self.addrs(base, stride, slots)
        image = self._images.get(wrap)
        if image is None:
            words = array("Q", bytes(16 * self.size))
            words[0::2] = addrs[:self.size]
            words[1::2] = array("Q", [stride | word << 32 for word in self.words[wrap][:self.size]])
            image = self._images[wrap] = words.tobytes()
        return image


class InOrderSplitDriverQueue(SplitDriverQueue):
    """A split ring's driver side with VIRTIO_F_IN_ORDER negotiated (one-descriptor and chained
    buffers; no reserved chains)."""

    def __init__(self, memory: GuestMemory, layout: SplitLayout, *, event_idx: bool = False,
                 state: RingState | None = None, adopt: bool = False) -> None:
        super().__init__(memory, layout, event_idx=event_idx, state=state, adopt=adopt)
        self._order: list[int] = []         #: heads made available, not used yet, in avail order
        self._wlen = [0] * self.size        #: device-writable length of the buffer at each head
        self._strided: _Strided | None = None

    def add(self, out: list[tuple[int, int]], inp: list[tuple[int, int]], token: object) -> int:
        head = super().add(out, inp, token)
        self._order.append(head)
        self._wlen[head] = sum(length for _, length in inp)
        return head

    def reserve(self, out: list[tuple[int, int]], inp: list[tuple[int, int]]) -> list[int]:
        raise RingError("reserved chains are not used with VIRTIO_F_IN_ORDER")

    def add_many(self, addrs: Sequence[int], lengths: Sequence[int], tokens: Sequence[object], *,
                 write: bool = False) -> int:
        heads = self._add_run(addrs, lengths, write)
        self.tokens.update(zip(heads, tokens))
        self._order += heads
        _store_run(self._wlen, heads, lengths, write)
        return len(heads)

    def add_counted(self, addrs: Sequence[int], lengths: Sequence[int]) -> int:
        """Make one-descriptor device-readable buffers available that keep no token: they are
        reaped by count (:meth:`reap_count`; :meth:`pop_used_many` gives None for them).
        Returns how many fitted."""
        heads = self._add_run(addrs, lengths, False)
        self._order += heads
        _store_run(self._wlen, heads, lengths, False)
        return len(heads)

    def add_strided(self, base: int, stride: int, slots: int, count: int) -> int:
        """Make *count* one-descriptor device-readable buffers available, the one at head *h*
        being the *stride* bytes at ``base + (h % slots) * stride`` (filled by the caller),
        kept without token (reaped by count). Returns how many fitted.

        Heads go round the table in ring order (v1.4 §2.7.9), so a batch's descriptors are
        at most two runs, and their addresses and avail entries slices of arrays built once
        per layout: no work per buffer in Python."""
        heads = self._take_heads(count)
        if not heads:
            return 0
        count, first, size = len(heads), heads[0], self.size
        strided = self._strided = self._strided or _Strided(size)
        addrs = strided.addrs(base, stride, slots)
        if heads != strided.ids[first:first + count]:       # not in ring order: one by one
            self._write_heads(heads, [addrs[h] for h in heads], [stride] * count, False)
        else:
            words = array("Q", [stride]) * count      # len | flags (none) << 32
            part = min(count, size - first)
            self._store_descs(first, addrs[first:first + part], words[:part])
            if count > part:
                self._store_descs(0, addrs[:count - part], words[part:])
            self._store_avail(heads, strided.ids16[first:first + count])
        self._order += heads
        _store_run(self._wlen, heads, (), False)
        return count

    @property
    def in_flight(self) -> int:
        return len(self._order)

    @property
    def next_id(self) -> int:
        """The descriptor the next buffer made available starts at (ring order)."""
        return self.free[-1]

    def pop_used_many(self, limit: int) -> list[tuple[object, int]]:
        """Reap at most *limit* used buffers (more if the device's last batch ends past it):
        the used entries' ids are read as strided arrays; when each is the next head in avail
        order they are taken as they are, otherwise batch by batch (v1.4 §2.7.9)."""
        size, last = self.size, self.last_used_idx
        ready = (self._used16[self._used_idx16] - last) & 0xFFFF
        if ready > len(self._order):
            raise RingError(f"used idx runs {ready} ahead of {last} with {len(self._order)} in flight")
        count = min(ready, limit)
        if count == 0:
            return []
        ids, written = self._used_run(last, ready)
        order = self._order
        if ids[:count] == order[:count]:
            heads, written = order[:count], written[:count]
        else:
            heads, written = self._walk(ids, written, ready, count)
        del order[:len(heads)]
        count = len(heads)
        tokens = list(map(self.tokens.pop, heads, repeat(None)))
        chains = self._chains
        back: list[int] = heads
        if chains:
            back = []
            for head in heads:
                chain = chains.pop(head, None)
                back += chain if chain is not None else (head,)
        self.free[:0] = back[::-1]      # reused last: descriptors go round the table in order
        self.last_used_idx = last = (last + count) & 0xFFFF
        if self.event_idx and self._interrupts:
            self._avail16[self._avail_ring16 + size] = last
            dirty = self.memory.dirty_log
            if dirty is not None:
                dirty.mark(self._used_event_addr, 2)
        return list(zip(tokens, written))

    def reap_count(self) -> int:
        """Reap every used buffer by count alone (used idx; in order, v1.4 §2.7.9): the used
        entries are not read, so neither tokens nor lengths come back. Returns how many."""
        if self._chains:
            return len(self.pop_used_many(self.size))
        last = self.last_used_idx
        ready = (self._used16[self._used_idx16] - last) & 0xFFFF
        order = self._order
        if ready > len(order):
            raise RingError(f"used idx runs {ready} ahead of {last} with {len(order)} in flight")
        if ready == 0:
            return 0
        heads = order[:ready]
        del order[:ready]
        if self.tokens:
            deque(map(self.tokens.pop, heads, repeat(None)), 0)
        self.free[:0] = heads[::-1]
        self.last_used_idx = last = (last + ready) & 0xFFFF
        if self.event_idx and self._interrupts:
            self._avail16[self._avail_ring16 + self.size] = last
        return ready

    def _walk(self, ids: list[int], written: list[int], ready: int, limit: int) -> tuple[list[int], list[int]]:
        """Heads and lengths of whole batches, from used entry 0 until *limit* buffers are
        covered: the entry at a batch's first offset names its last buffer."""
        order, wlen = self._order, self._wlen
        heads: list[int] = []
        lengths: list[int] = []
        p = 0
        while p < limit:
            try:
                end = order.index(ids[p], p, ready)
            except ValueError:
                raise RingError(f"device used descriptor {ids[p]} out of order (expected {order[p]}.."
                                f"{order[ready - 1]})") from None
            heads += order[p:end + 1]
            lengths += map(wlen.__getitem__, order[p:end])
            lengths.append(written[p])
            p = end + 1
        return heads, lengths


class InOrderPackedDriverQueue(PackedDriverQueue):
    """A packed ring's driver side with VIRTIO_F_IN_ORDER negotiated."""

    def __init__(self, memory: GuestMemory, layout: PackedLayout, *, event_idx: bool = False,
                 state: RingState | None = None, adopt: bool = False) -> None:
        super().__init__(memory, layout, event_idx=event_idx, state=state, adopt=adopt)
        self._order: list[int] = []         #: buffer ids made available, not used yet, in order
        self._wlen = [0] * self.size        #: device-writable length of the buffer with each id
        self._strided: _Strided | None = None

    def add(self, out: list[tuple[int, int]], inp: list[tuple[int, int]], token: object, *,
            indirect_table: int | None = None) -> int:
        buf_id = super().add(out, inp, token, indirect_table=indirect_table)
        self._order.append(buf_id)
        self._wlen[buf_id] = sum(length for _, length in inp)
        return buf_id

    def add_many(self, addrs: Sequence[int], lengths: Sequence[int], tokens: Sequence[object], *,
                 write: bool = False) -> int:
        ids = self._add_run(addrs, lengths, write)
        self.tokens.update(zip(ids, tokens))
        self._order += ids
        _store_run(self._wlen, ids, lengths, write)
        return len(ids)

    def add_counted(self, addrs: Sequence[int], lengths: Sequence[int]) -> int:
        """Make one-descriptor device-readable buffers available that keep no token (reaped
        by count; :meth:`pop_used_many` gives None for them). Returns how many fitted."""
        ids = self._add_run(addrs, lengths, False)
        self._order += ids
        _store_run(self._wlen, ids, lengths, False)
        return len(ids)

    def add_strided(self, base: int, stride: int, slots: int, count: int) -> int:
        """:meth:`InOrderSplitDriverQueue.add_strided` for buffer ids: the buffer with id *k*
        is the *stride* bytes at ``base + (k % slots) * stride``; ids go round in ring order,
        so a batch's addresses are one slice of an array built once per layout."""
        count = min(count, self.free_slots)
        if count <= 0:
            return 0
        strided = self._strided = self._strided or _Strided(self.size)
        addrs = strided.addrs(base, stride, slots)
        ids = self.free_ids[-count:]
        ids.reverse()
        first = ids[0]
        if ids != strided.ids[first:first + count]:         # not in ring order: one by one
            return self.add_counted(array("Q", [addrs[k] for k in ids]), array("I", [stride]) * count)
        if first == self.next_avail:                        # id k in slot k: copy the table image
            self._add_image(strided, base, stride, slots, ids)
        else:
            ids = self._add_run(addrs[first:first + count], array("I", [stride]) * count, False, strided.words)
        self._order += ids
        _store_run(self._wlen, ids, (), False)
        return count

    def _add_image(self, strided: _Strided, base: int, stride: int, slots: int, ids: list[int]) -> None:
        """Make the buffers *ids* (consecutive, the first in its own slot) available by copying
        their descriptors from the table image, the head's flags stored last and alone
        (v1.4 §2.8.21.1): one copy per lap instead of a store per field."""
        size, count, first, wrap = self.size, len(ids), ids[0], self.avail_wrap
        image = strided.image(base, stride, slots, wrap)
        view, off = self._desc8, self._desc_off
        part = min(count, size - first)
        head = DESC_SIZE * first
        view[off + head:off + head + FLAGS_OFFSET] = image[head:head + FLAGS_OFFSET]
        view[off + head + DESC_SIZE:off + head + DESC_SIZE * part] = image[head + DESC_SIZE:head + DESC_SIZE * part]
        slot = first + part
        if slot == size:
            slot, wrap = 0, not wrap
            if count > part:
                rest = DESC_SIZE * (count - part)
                view[off:off + rest] = strided.image(base, stride, slots, wrap)[:rest]
                slot = count - part
        self._desc16[(off + head + FLAGS_OFFSET) >> 1] = avail_flags(self.avail_wrap)
        del self.free_ids[-count:]
        self._advance(first, count, slot, wrap)

    @property
    def in_flight(self) -> int:
        return len(self._order)

    @property
    def next_id(self) -> int:
        """The buffer id the next buffer made available gets (ring order)."""
        return self.free_ids[-1]

    def pop_used_many(self, limit: int) -> list[tuple[object, int]]:
        """Reap used buffers, a used descriptor per batch (v1.4 §2.8.16): runs of used
        descriptors whose ids follow the avail order are read as strided arrays, any other
        descriptor completes the buffers up to the one it names. A batch is taken whole, so
        more than *limit* may come back."""
        out: list[tuple[object, int]] = []
        self._reap(limit, out)
        return out

    def reap_count(self) -> int:
        """Reap every used buffer; returns how many (a packed ring is walked batch by batch)."""
        return self._reap(self.size, None)

    def _reap(self, limit: int, out: list[tuple[object, int]] | None) -> int:
        """Reap at least *limit* used buffers if there are, ``(token, written)`` each into *out*
        (unless None); re-arms the used event (EVENT_IDX). Returns how many."""
        count = 0
        while count < limit and self._order:
            got = self._take_run(limit - count) or self._take_batch()
            if got is None:
                break
            tokens, lens = got
            if out is not None:
                out += zip(tokens, lens)
            count += len(lens)
        if self.event_idx and self._interrupts:
            self.memory.store_u16(self.layout.driver, off_wrap(self.next_used, self.used_wrap))
        return count

    def _take_run(self, limit: int) -> _Taken | None:
        """One-slot buffers used one descriptor each, in order, from next_used (before a wrap).

        The run's flags are read as one strided array (a used descriptor's AVAIL and USED
        bits both equal the used wrap counter, v1.4 §2.8.1) and the run ends at the first
        that is not used: no call per descriptor."""
        if self._multi:
            return None
        used, size, order = self.next_used, self.size, self._order
        most = min(limit, len(order), size - used)
        if most <= 0:
            return None
        at = self._desc_off + DESC_SIZE * used
        if self._desc16[(at + 12) >> 1] != order[0]:
            return None       # a batch's used descriptor (it names the batch's last buffer)
        view = self._desc8
        low = bytes(view[at + FLAGS_OFFSET:at + DESC_SIZE * most:DESC_SIZE])
        high = bytes(view[at + FLAGS_OFFSET + 1:at + DESC_SIZE * most:DESC_SIZE])
        other = b"\x00" if self.used_wrap else b"\x01"  # AVAIL (bit 7), USED (bit 15) == wrap
        ends = [i for i in (low.translate(_BIT7).find(other), high.translate(_BIT7).find(other)) if i >= 0]
        count = min(ends, default=most)
        if count == 0:
            return None
        ids = self._desc16[(at + 12) >> 1:(at + DESC_SIZE * count) >> 1:8].tolist()
        if ids != order[:count]:
            # the first differing descriptor ends a batch: take the run up to it, then the batch
            count = next(k for k, (a, b) in enumerate(zip(ids, order)) if a != b)
            if count == 0:
                return None
            ids = ids[:count]
        wrote = low[:count].translate(_BIT1)       # WRITE (bit 1): the device wrote len bytes
        written = wrote.count(1)
        if written == 0:
            lens = [0] * count
        else:
            lens = self._desc32[(at + 8) >> 2:(at + DESC_SIZE * count) >> 2:4].tolist()
            if written < count:
                lens = [n if w else 0 for n, w in zip(lens, wrote)]
        return self._complete(ids, lens, count)

    def _take_batch(self) -> _Taken | None:
        """Used descriptors each naming the last buffer of a batch (v1.4 §2.8.16), walked from
        next_used batch after batch (the next one sits where the batch ends) and completed
        together. Ids go round in ring order, so a batch's end is found by arithmetic; this walk
        counts the slots of buffers that take several."""
        if not self._multi:
            return self._take_batch_single()
        order, desc16, size, wlen = self._order, self._desc16, self.size, self._wlen
        used, wrap, pos, slots = self.next_used, self.used_wrap, 0, 0
        ends: list[tuple[int, int]] = []        #: (index in order of a batch's last, its len)
        while pos < len(order):
            at = self._desc_off + DESC_SIZE * used
            flags = desc16[(at + FLAGS_OFFSET) >> 1]
            if flags & (_AVAIL | _USED) != (_AVAIL | _USED if wrap else 0):
                break
            buf_id = desc16[(at + 12) >> 1]
            end = pos + (buf_id - order[pos]) % size
            if end >= len(order) or order[end] != buf_id:
                end = self._batch_end(buf_id, pos)
            n = sum(map(self._slots.get, order[pos:end + 1], repeat(1)))
            if flags & _WRITE:
                ends.append((end, self._desc32[(at + 8) >> 2]))
            slots += n
            used += n
            if used >= size:
                used -= size
                wrap = not wrap
            pos = end + 1
        if pos == 0:
            return None
        ids = order[:pos]
        lens = list(map(wlen.__getitem__, ids)) if ends else [0] * pos
        for end, length in ends:
            lens[end] = length
        return self._complete(ids, lens, slots)

    def _take_batch_single(self) -> _Taken | None:
        """:meth:`_take_batch` while every buffer takes one slot: a batch of *n* buffers
        takes *n* slots, so the walk needs only each used descriptor's flags and id."""
        order, desc16, size = self._order, self._desc16, self.size
        n = len(order)
        flags_at = (self._desc_off + FLAGS_OFFSET) >> 1     # slot 0's flags; its id is the u16 before
        used, wrap, pos = self.next_used, self.used_wrap, 0
        want = _AVAIL | _USED if wrap else 0
        ends: list[tuple[int, int]] = []        #: (index in order of a batch's last, its len)
        while pos < n:
            at = flags_at + 8 * used
            flags = desc16[at]
            if flags & (_AVAIL | _USED) != want:
                break
            buf_id = desc16[at - 1]
            end = pos + (buf_id - order[pos]) % size
            if end >= n or order[end] != buf_id:
                end = self._batch_end(buf_id, pos)
            if flags & _WRITE:
                ends.append((end, self._desc32[(2 * at - FLAGS_OFFSET + 8) >> 2]))
            used += end + 1 - pos
            pos = end + 1
            if used >= size:
                used -= size
                wrap = not wrap
                want ^= _AVAIL | _USED
        if pos == 0:
            return None
        ids = order[:pos]
        lens = [0] * pos
        if ends:
            lens = list(map(self._wlen.__getitem__, ids))
            for end, length in ends:
                lens[end] = length
        return self._complete(ids, lens, pos)

    def _batch_end(self, buf_id: int, pos: int) -> int:
        try:
            return self._order.index(buf_id, pos)
        except ValueError:
            raise RingError(f"device used buffer id {buf_id} out of order or unknown") from None

    def _complete(self, ids: list[int], lens: list[int], slots: int) -> _Taken:
        """Free the buffers *ids* (taking *slots* ring slots) used with *lens*; their tokens
        (None for those kept without) and *lens*."""
        tokens, slots_of = self.tokens, self._slots
        got: list[object] = list(map(tokens.pop, ids, repeat(None))) if tokens else [None] * len(ids)
        if self._multi:
            for buf_id in ids:
                self._multi -= slots_of.pop(buf_id, 1) > 1
        del self._order[:len(ids)]
        back = ids[::-1]
        self.free_ids[:0] = back       # ids go round in order, as they were made available
        self.free_slots += slots
        used = self.next_used + slots
        if used >= self.size:
            used -= self.size
            self.used_wrap = not self.used_wrap
        self.next_used = used
        return got, lens
