"""Reaping with VIRTIO_F_IN_ORDER (v1.4 §2.7.9 split, §2.8.16 packed) against a small in-test
device that honours it: it uses buffers in the order they were made available and writes one
used element per batch (the id of the batch's last buffer, at the batch's first offset/slot),
or one per buffer. Batches, ring and index wrap-around, limits, and a device breaking order."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from rings import BUF_BASE, make_packed_layout, make_split_layout

from shadowvmm.errors import RingError
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.inorder import InOrderPackedDriverQueue, InOrderSplitDriverQueue

STRIDE = 128
PACKED_AVAIL, PACKED_USED, PACKED_WRITE = 1 << 7, 1 << 15, 2
DESC = struct.Struct("<QIHH")


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.create([(0, 1 << 20)])
    try:
        yield mem
    finally:
        mem.close()


class SplitInOrderDevice:
    """Device side of a split ring that uses buffers in order (one-descriptor buffers)."""

    def __init__(self, memory: GuestMemory, layout) -> None:
        self.m, self.l, self.size = memory, layout, layout.size
        self.last_avail = 0
        self.used_idx = 0
        self.pending: list[tuple[int, int, int]] = []     #: (head, addr, len) taken, not used yet

    def take(self) -> list[int]:
        """Every available buffer; returns the heads, in avail order."""
        avail = self.m.load_u16(self.l.avail + 2)
        heads = []
        while self.last_avail != avail:
            head = self.m.load_u16(self.l.avail + 4 + 2 * (self.last_avail % self.size))
            addr, length, _flags, _next = DESC.unpack(self.m.read(self.l.desc + 16 * head, 16))
            self.pending.append((head, addr, length))
            heads.append(head)
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return heads

    def use(self, n: int, written: int, *, one_entry: bool = True) -> None:
        """Use the next *n* buffers: one used entry for the batch (the last head) or one each."""
        batch, self.pending = self.pending[:n], self.pending[n:]
        entries = [(batch[-1][0], written)] if one_entry else [(head, written) for head, _, _ in batch]
        for k, (head, length) in enumerate(entries):
            at = self.l.used + 4 + 8 * ((self.used_idx + k) % self.size)
            self.m.write(at, struct.pack("<II", head, length))
        self.used_idx = (self.used_idx + n) & 0xFFFF
        self.m.store_u16(self.l.used + 2, self.used_idx)


class PackedInOrderDevice:
    """Device side of a packed ring that uses buffers in order (one-descriptor buffers)."""

    def __init__(self, memory: GuestMemory, layout) -> None:
        self.m, self.l, self.size = memory, layout, layout.size
        self.avail_slot, self.avail_wrap = 0, True
        self.used_slot, self.used_wrap = 0, True
        self.pending: list[tuple[int, int, int]] = []     #: (id, addr, len)

    def take(self) -> list[int]:
        ids = []
        while True:
            addr, length, buf_id, flags = DESC.unpack(self.m.read(self.l.desc + 16 * self.avail_slot, 16))
            if bool(flags & PACKED_AVAIL) != self.avail_wrap or bool(flags & PACKED_USED) == self.avail_wrap:
                return ids
            self.pending.append((buf_id, addr, length))
            ids.append(buf_id)
            self.avail_slot += 1
            if self.avail_slot == self.size:
                self.avail_slot, self.avail_wrap = 0, not self.avail_wrap

    def use(self, n: int, written: int, *, one_entry: bool = True, write: bool = True) -> None:
        batch, self.pending = self.pending[:n], self.pending[n:]
        entries = [batch[-1][0]] if one_entry else [buf_id for buf_id, _, _ in batch]
        slot, wrap = self.used_slot, self.used_wrap
        for buf_id in entries:
            flags = (PACKED_AVAIL | PACKED_USED if wrap else 0) | (PACKED_WRITE if write else 0)
            at = self.l.desc + 16 * slot
            self.m.write(at + 8, struct.pack("<IH", written if write else 0, buf_id))
            self.m.store_u16(at + 14, flags)
            slot += 1
            if slot == self.size:
                slot, wrap = 0, not wrap
        # a batch written as one descriptor skips the ring forward by its size
        self.used_slot, self.used_wrap = (self.used_slot + n) % self.size, (
            self.used_wrap if self.used_slot + n < self.size else not self.used_wrap)


def make(layout: str, memory: GuestMemory, size: int):
    if layout == "split":
        sl = make_split_layout(size)
        return InOrderSplitDriverQueue(memory, sl), SplitInOrderDevice(memory, sl)
    pl = make_packed_layout(size)
    return InOrderPackedDriverQueue(memory, pl), PackedInOrderDevice(memory, pl)


def add(drv, first: int, count: int, *, write: bool) -> int:
    addrs = [BUF_BASE + STRIDE * ((first + k) % 512) for k in range(count)]
    lengths = [8 + (first + k) % 50 for k in range(count)]
    return drv.add_many(addrs, lengths, list(range(first, first + count)), write=write)


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("write", [False, True], ids=["out", "in"])
@pytest.mark.parametrize("one_entry", [True, False], ids=["per-batch", "per-buffer"])
def test_batches_wrap_around(memory: GuestMemory, layout: str, write: bool, one_entry: bool) -> None:
    """Ring of 8, 60 rounds of 5 buffers used in device batches of 1..4 (crossing the ring end):
    every buffer comes back once in order; a batch's last buffer has the length the device wrote,
    the skipped ones count as used completely (their full length when device-writable, v1.4
    §2.7.9); descriptors / buffer ids go round the ring in order."""
    drv, dev = make(layout, memory, 8)
    sent = reaped = 0
    seen_ids: list[int] = []
    sizes = [3, 1, 4, 2]
    for rnd in range(60):
        assert add(drv, sent, 5, write=write) == 5
        drv.publish()
        seen_ids += dev.take()
        sent += 5
        left = 5
        while left:
            n = min(sizes[(rnd + left) % 4], left)
            dev.use(n, 7 if write else 0, one_entry=one_entry)
            left -= n
            used = drv.pop_used_many(64)
            tokens = [t for t, _ in used]
            assert tokens == list(range(reaped, reaped + n))
            lengths = [w for _, w in used]
            if not write:
                assert lengths == [0] * n
            elif one_entry:
                assert lengths == [8 + t % 50 for t in tokens[:-1]] + [7]
            else:
                assert lengths == [7] * n
            reaped += n
        assert drv.num_free == 8 and drv.in_flight == 0
    assert seen_ids == [k % 8 for k in range(300)]


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_split_and_packed_index_wrap_in_flight(memory: GuestMemory, layout: str) -> None:
    """Buffers stay in flight across the ring end: a batch made available at slots 6, 7, 0, 1 is
    used as one element and reaped whole."""
    drv, dev = make(layout, memory, 8)
    assert add(drv, 0, 6, write=True) == 6
    drv.publish()
    dev.take()
    dev.use(6, 1)
    assert [t for t, _ in drv.pop_used_many(64)] == list(range(6))
    assert add(drv, 6, 4, write=True) == 4
    drv.publish()
    assert dev.take() == [6, 7, 0, 1]
    dev.use(4, 9)
    used = drv.pop_used_many(64)
    assert used == [(6, 8 + 6), (7, 8 + 7), (8, 8 + 8), (9, 9)]


def test_split_limit_stops_at_batch_boundary(memory: GuestMemory) -> None:
    """Split: with a limit inside a batch the whole batch comes back; per-buffer entries honour it."""
    drv, dev = make("split", memory, 16)
    add(drv, 0, 10, write=False)
    drv.publish()
    dev.take()
    dev.use(4, 0)
    dev.use(2, 0, one_entry=False)
    assert [t for t, _ in drv.pop_used_many(2)] == [0, 1, 2, 3]
    assert [t for t, _ in drv.pop_used_many(1)] == [4]
    assert [t for t, _ in drv.pop_used_many(8)] == [5]
    assert drv.in_flight == 4 and drv.num_free == 12


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_id_out_of_order_is_a_ring_error(memory: GuestMemory, layout: str) -> None:
    """A used element naming a buffer not made available (or already used) breaks the ring."""
    drv, dev = make(layout, memory, 8)
    add(drv, 0, 3, write=False)
    drv.publish()
    dev.take()
    dev.pending[2] = (5, 0, 0)          # the device claims id 5, never made available
    dev.use(3, 0)
    with pytest.raises(RingError):
        drv.pop_used_many(8)


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_batches_of_readable_buffers_reaped_at_once(memory: GuestMemory, layout: str) -> None:
    """Device-readable buffers used in batches of 2, 3, 1 (one element per buffer) and 2,
    crossing the ring end, then one more batch ending past it: each pass takes every used
    batch, tokens in order, nothing written."""
    drv, dev = make(layout, memory, 8)
    add(drv, 0, 6, write=False)
    drv.publish()
    dev.take()
    dev.use(6, 0)
    assert [t for t, _ in drv.pop_used_many(8)] == list(range(6))
    add(drv, 6, 8, write=False)
    drv.publish()
    assert len(dev.take()) == 8
    dev.use(2, 0)
    dev.use(3, 0)
    dev.use(1, 0, one_entry=False)
    assert drv.reap_count() == 6 and drv.in_flight == 2
    dev.use(2, 0)
    assert drv.pop_used_many(8) == [(12, 0), (13, 0)]
    assert drv.num_free == 8 and drv.in_flight == 0


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("claim", [7, 1, 3], ids=["unknown", "behind", "before-its-own"])
def test_a_later_batch_naming_a_wrong_id_is_a_ring_error(memory: GuestMemory, layout: str, claim: int) -> None:
    """Two batches used at once (4 buffers, then 2), the second naming an id not in flight,
    one of the first batch, or one before its own first buffer: the ring is broken,
    whichever pass reads it."""
    drv, dev = make(layout, memory, 8)
    add(drv, 0, 6, write=False)
    drv.publish()
    dev.take()
    dev.use(4, 0)
    dev.pending[1] = (claim, 0, 0)
    dev.use(2, 0)
    with pytest.raises(RingError):
        drv.pop_used_many(8)


def test_split_used_idx_past_in_flight_is_a_ring_error(memory: GuestMemory) -> None:
    drv, dev = make("split", memory, 8)
    add(drv, 0, 2, write=False)
    drv.publish()
    dev.take()
    memory.store_u16(dev.l.used + 2, 3)
    with pytest.raises(RingError):
        drv.pop_used_many(8)


class StubQueue:
    """The part of GuestQueue FixedTxSlots uses, over a bare in-order ring."""

    def __init__(self, ring) -> None:
        self.ring, self.size, self.kicks = ring, ring.size, 0

    def reap_count(self) -> int:
        return self.ring.reap_count()

    def add_many(self, addrs, lengths, tokens, *, write: bool = False) -> int:
        return self.ring.add_many(addrs, lengths, tokens, write=write)

    def add_counted(self, addrs, lengths) -> int:
        return self.ring.add_counted(addrs, lengths)

    def add_strided(self, base, stride, slots, count) -> int:
        return self.ring.add_strided(base, stride, slots, count)

    def kick(self) -> None:
        self.kicks += 1
        self.ring.publish()


def fixed_slots(memory: GuestMemory, layout: str, ring: int, slots: int, slot_size: int):
    """An in-order ring of *ring*, its in-test device, the stub queue and FixedTxSlots over
    *slots* slots of *slot_size* bytes from BUF_BASE (a 12-byte header)."""
    from shadowvmm.guest.nettx import FixedTxSlots

    drv, dev = make(layout, memory, ring)
    queue = StubQueue(drv)
    addrs = [BUF_BASE + slot_size * k for k in range(slots)]
    fixed = FixedTxSlots.of(memory, queue, addrs, slot_size, 12)
    assert fixed is not None
    return drv, dev, queue, addrs, fixed


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_fixed_tx_slots_payloads_and_wrap(memory: GuestMemory, layout: str) -> None:
    """FixedTxSlots on a ring of 8 with 4 slots: batches of mixed frame sizes go round the ring
    many times; every buffer the device takes is a zero header + the frame sent, inside the
    slots of its id, and completions reaped by count free the slots."""
    drv, dev, queue, slots, fixed = fixed_slots(memory, layout, 8, 4, 256)
    sent = 0
    for rnd in range(30):
        frames = [bytes([(sent + k) & 0xFF]) * (1 + (sent + k) * 37 % 244) for k in range(6)]
        count = fixed.send(queue, frames)
        assert count == 4 if rnd == 0 else count == 3
        assert len(dev.take()) == count
        batch = dev.pending[-count:]
        for k, (buf_id, addr, length) in enumerate(batch):
            assert length == 12 + len(frames[k])
            assert memory.read(addr, length) == bytes(12) + frames[k]
            # inside the slots this batch owns (from its first id's slot, up to the ring end)
            part = [b for b, _, _ in batch if b % 4 >= batch[0][0] % 4] if buf_id % 4 >= batch[0][0] % 4 \
                else [b for b, _, _ in batch if b % 4 < batch[0][0] % 4]
            assert slots[part[0] % 4] <= addr and addr + length <= slots[part[-1] % 4] + 256
        dev.use(len(dev.pending) - 1, 0)        # one buffer stays in flight
        sent += count
    assert drv.in_flight == 4 and fixed.free == 0
    assert queue.reap_count() == 3 and drv.in_flight == 1 and queue.reap_count() == 0


def test_fixed_tx_slots_refused_without_in_order(memory: GuestMemory) -> None:
    from shadowvmm.guest.nettx import FixedTxSlots
    from shadowvmm.virtio.split import SplitDriverQueue

    queue = StubQueue(SplitDriverQueue(memory, make_split_layout(8)))
    assert FixedTxSlots.of(memory, queue, [BUF_BASE + 256 * k for k in range(4)], 256, 12) is None
    drv, _ = make("split", memory, 8)
    assert FixedTxSlots.of(memory, StubQueue(drv), [BUF_BASE + 256 * k for k in range(3)], 256, 12) is None


def _frames(seed: int, count: int, size: int | None) -> list[bytes]:
    """*count* frames numbered from *seed* (4-byte big-endian number, then filler) of *size*
    bytes each, or of mixed sizes (None)."""
    return [struct.pack(">I", seed + k) + bytes([(seed + k) & 0xFF]) * ((size or 8 + (seed + k) * 37 % 200) - 4)
            for k in range(count)]


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_fixed_tx_slots_strided_batches(memory: GuestMemory, layout: str) -> None:
    """Batches of one frame size go round a ring of 8 with 8 slots many times: buffer *k*
    is header + frame at ``slots[0] + (k % 8) * (12 + size)``, the descriptor says so, and
    the ring keeps no token for it."""
    drv, dev, queue, slots, fixed = fixed_slots(memory, layout, 8, 8, 256)
    sent = 0
    for _ in range(25):
        frames = _frames(sent, 5, 60)
        count = fixed.send(queue, frames)
        assert count == 5 and fixed.layout == 72
        assert len(dev.take()) == count and not drv.tokens
        for k, (buf_id, addr, length) in enumerate(dev.pending[-count:]):
            assert (addr, length) == (slots[0] + (buf_id % 8) * 72, 72)
            assert memory.read(addr, length) == bytes(12) + frames[k]
        dev.use(len(dev.pending), 0)
        sent += count
    assert fixed.free + queue.reap_count() == 8 and drv.in_flight == 0


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_fixed_tx_slots_stride_change_waits_for_the_ring_to_drain(memory: GuestMemory, layout: str) -> None:
    """A batch that needs another stride (another frame size, or mixed sizes after one size)
    is not queued while buffers laid out by the old one are in flight: their bytes stay as
    sent. Under the slot stride (mixed sizes) a batch of one size goes out in the slots."""
    drv, dev, queue, slots, fixed = fixed_slots(memory, layout, 8, 8, 256)
    assert fixed.send(queue, _frames(0, 3, 40)) == 3 and fixed.layout == 52
    dev.take()
    held = [memory.read(addr, length) for _, addr, length in dev.pending]
    for frames in (_frames(9, 3, 100), _frames(9, 3, None)):
        assert fixed.send(queue, frames) == 0
    assert [memory.read(addr, length) for _, addr, length in dev.pending] == held
    dev.use(2, 0)
    assert fixed.send(queue, _frames(9, 3, None)) == 0       # one buffer still in flight
    dev.use(1, 0)
    assert fixed.send(queue, _frames(9, 3, None)) == 3 and fixed.layout == 256
    dev.take()
    assert fixed.send(queue, _frames(20, 2, 30)) == 2 and fixed.layout == 256
    dev.take()
    assert [addr for _, addr, _ in dev.pending] == slots[3:8]
    dev.use(5, 0)
    assert fixed.send(queue, _frames(30, 2, 30)) == 2 and fixed.layout == 42


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_counted_buffers_beside_tokened_ones(memory: GuestMemory, layout: str) -> None:
    """Buffers added without token count as in flight and come back with token None from
    pop_used_many, between buffers that keep theirs."""
    drv, dev = make(layout, memory, 8)
    add(drv, 0, 2, write=False)
    assert drv.add_counted([BUF_BASE, BUF_BASE + 64], [10, 20]) == 2
    add(drv, 4, 1, write=False)
    assert drv.add_strided(BUF_BASE, 32, 8, 2) == 2
    drv.publish()
    assert drv.in_flight == 7 and dev.take() == [0, 1, 2, 3, 4, 5, 6]
    assert [length for _, _, length in dev.pending] == [8, 9, 10, 20, 12, 32, 32]
    assert [addr for _, addr, _ in dev.pending][5:] == [BUF_BASE + 5 * 32, BUF_BASE + 6 * 32]
    dev.use(7, 0)
    assert [t for t, _ in drv.pop_used_many(8)] == [0, 1, None, None, 4, None, None]
    assert drv.in_flight == 0 and not drv.tokens


@pytest.mark.parametrize("size", [60, None], ids=["strided", "slots"])
def test_fixed_tx_slots_writes_are_dirty_logged(memory: GuestMemory, size: int | None) -> None:
    """The frames written into the slots dirty their pages, as GuestMemory.write does."""
    from shadowvmm.memory import PAGE_SHIFT

    drv, dev, queue, _, fixed = fixed_slots(memory, "split", 64, 64, 2048)
    dirty = memory.enable_dirty_log()
    dirty.take()
    assert fixed.send(queue, _frames(0, 40, size)) == 40
    dev.take()
    pages = set(dirty.take())
    for _, addr, length in dev.pending:
        assert {addr >> PAGE_SHIFT, (addr + length - 1) >> PAGE_SHIFT} <= pages


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("seed", range(6))
def test_fixed_tx_slots_random_orders(memory: GuestMemory, layout: str, seed: int) -> None:
    """Random batches (one size or mixed, 1..9 frames) against a device that takes and uses
    random amounts: every buffer holds header + its frame from the moment it is made
    available until it is used, buffers in flight never overlap, and each frame is used
    exactly once, in order."""
    import random

    rng = random.Random(seed)
    drv, dev, queue, _, fixed = fixed_slots(memory, layout, 16, 8, 512)
    waiting: list[bytes] = []       #: frames not queued yet, in order
    flight: list[bytes] = []        #: frames made available, not used yet, in order
    used: list[bytes] = []
    queued: list[bytes] = []
    made = 0
    for _ in range(400):
        if len(waiting) < 12:
            size = rng.choice([None, 20, 20, 64, 64, 64, 300, 500])
            count = rng.randint(1, 9)
            waiting += _frames(made, count, size)
            made += count
        count = fixed.send(queue, waiting[:rng.randint(1, 9)])
        flight += waiting[:count]
        queued += waiting[:count]
        del waiting[:count]
        dev.take()
        assert len(dev.pending) == len(flight)
        spans = sorted((addr, addr + length) for _, addr, length in dev.pending)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "buffers in flight overlap"
        for (_, addr, length), frame in zip(dev.pending, flight):
            assert memory.read(addr, length) == bytes(12) + frame
        if dev.pending and rng.random() < 0.6:
            n = rng.randint(1, len(dev.pending))
            dev.use(n, 0, one_entry=rng.random() < 0.5)
            used += flight[:n]
            del flight[:n]
    assert used + flight == queued
    assert len(set(queued)) == len(queued) > 100
    reaped = queue.reap_count()
    assert drv.in_flight == len(flight)
    assert fixed.free + reaped == 8 - len(flight)


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_several_batches_reaped_in_one_pass(memory: GuestMemory, layout: str) -> None:
    """Batches of 2 and 3 (one element each), 1 (per buffer) and 2, crossing the ring end, all
    reaped by one call: tokens in order, each batch's last with the device's length, the
    skipped ones with their full length."""
    drv, dev = make(layout, memory, 8)
    add(drv, 0, 5, write=True)
    drv.publish()
    dev.take()
    dev.use(5, 3)
    drv.pop_used_many(8)
    add(drv, 5, 8, write=True)
    drv.publish()
    assert dev.take() == [5, 6, 7, 0, 1, 2, 3, 4]
    dev.use(2, 1)
    dev.use(3, 2)
    dev.use(1, 4, one_entry=False)
    dev.use(2, 5)
    used = drv.pop_used_many(64)
    assert [t for t, _ in used] == list(range(5, 13))
    full = [8 + t % 50 for t in range(5, 13)]
    assert [w for _, w in used] == [full[0], 1, full[2], full[3], 2, 4, full[6], 5]
    assert drv.num_free == 8 and drv.in_flight == 0
    assert layout == "split" or (drv.next_used, drv.used_wrap) == (5, False)


class FieldByField(InOrderPackedDriverQueue):
    """The packed in-order ring with add_strided's table-image copy replaced by the
    descriptor-field stores it stands for."""

    def _add_image(self, strided, base, stride, slots, ids) -> None:
        from array import array

        first = ids[0]
        self._add_run(strided.addrs(base, stride, slots)[first:first + len(ids)],
                      array("I", [stride]) * len(ids), False, strided.words)


@pytest.mark.parametrize("seed", range(4))
def test_packed_strided_image_matches_field_stores(seed: int) -> None:
    """Random strided batches (two layouts, 1..13 buffers) over a ring of 16 for many laps,
    used by the in-test device in random batches: the descriptor table and the dirty pages
    after each step are byte for byte those of the field-by-field stores, and the ids the
    device takes are the same."""
    import random

    rng = random.Random(seed)
    rigs = []
    for cls in (InOrderPackedDriverQueue, FieldByField):
        mem = GuestMemory.create([(0, 1 << 20)])
        layout = make_packed_layout(16)
        rigs.append((mem, cls(mem, layout), PackedInOrderDevice(mem, layout), mem.enable_dirty_log()))
    images = 0
    try:
        stride = 72
        for _ in range(300):
            new_stride = rng.choice([72, 72, 140])
            count = rng.randint(1, 13)
            use = rng.random() < 0.7
            fraction, one_entry = rng.random(), rng.random() < 0.6
            steps = []
            for mem, drv, dev, dirty in rigs:
                if new_stride != stride and drv.in_flight:      # a new layout once the ring drained
                    dev.use(len(dev.pending), 0)
                    drv.reap_count()
                images += bool(drv.free_ids) and drv.next_avail == drv.next_id and type(drv) is InOrderPackedDriverQueue
                added = drv.add_strided(BUF_BASE, new_stride, 8, count)
                drv.publish()
                taken = dev.take()
                if dev.pending and use:
                    dev.use(max(1, int(fraction * len(dev.pending))), 0, one_entry=one_entry)
                reaped = drv.reap_count()
                steps.append((added, taken, reaped, mem.read(drv.layout.desc, 16 * 16), sorted(dirty.take())))
            stride = new_stride
            assert steps[0] == steps[1]
        assert images > 250, "the table-image path was taken"
    finally:
        for mem, *_ in rigs:
            mem.close()
