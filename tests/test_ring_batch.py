"""The driver rings' batch API (``add_many`` / ``pop_used_many``), split (v1.4 §2.7) and packed
(§2.8), against the device side of the same ring: contents, order, limits, index and wrap-counter
wrap-around, event suppression (§2.7.10, §2.8.10) and mixing with the per-buffer API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from rings import BUF_BASE, SplitHarness, make_harness

from shadowvmm.errors import RingError
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.packed import PackedDeviceQueue

STRIDE = 128


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.create([(0, 1 << 20)])
    try:
        yield mem
    finally:
        mem.close()


def buffers(memory: GuestMemory, first: int, count: int) -> tuple[list[int], list[int]]:
    """Addresses and lengths of *count* buffers numbered from *first* (the number in the first
    4 bytes, the length 8 + number % 50)."""
    addrs = [BUF_BASE + STRIDE * ((first + k) % 1024) for k in range(count)]
    for k, gpa in enumerate(addrs):
        memory.write(gpa, (first + k).to_bytes(4, "little"))
    return addrs, [8 + (first + k) % 50 for k in range(count)]


def serve_all(h, memory: GuestMemory, *, write: bool) -> list[tuple[int, int]]:
    """Pop every available chain; check each is one buffer of the expected kind; used entries."""
    entries = []
    while (chain := h.dev.pop()) is not None:
        bufs = chain.writable if write else chain.readable
        assert len(bufs) == 1 and not (chain.readable if write else chain.writable)
        gpa, length = bufs[0]
        number = int.from_bytes(memory.read(gpa, 4), "little")
        assert length == 8 + number % 50
        entries.append((chain.head, length // 2 if write else 0))
    return entries


@pytest.mark.parametrize("write", [False, True], ids=["out", "in"])
def test_batch_round_trip_and_wrap(memory: GuestMemory, ring_layout: str, write: bool) -> None:
    """Batches of 5 on a ring of 8 for 40 rounds: more than 16 laps (both packed wrap counters flip
    many times); every buffer comes back once, in order, with what the device wrote."""
    h = make_harness(ring_layout, memory, 8)
    sent = 0
    for _ in range(40):
        addrs, lengths = buffers(memory, sent, 5)
        assert h.drv.add_many(addrs, lengths, list(range(sent, sent + 5)), write=write) == 5
        h.drv.publish()
        entries = serve_all(h, memory, write=write)
        assert len(entries) == 5
        h.dev.push_batch(entries)
        used = h.drv.pop_used_many(64)
        assert [token for token, _ in used] == list(range(sent, sent + 5))
        assert [written for _, written in used] == ([n // 2 for n in lengths] if write else [0] * 5)
        assert h.drv.num_free == 8 and h.drv.in_flight == 0
        sent += 5


def test_split_index_wraps_at_65536(memory: GuestMemory) -> None:
    h = SplitHarness(memory, 16, start_idx=0xFFF0)
    for round_ in range(6):
        addrs, lengths = buffers(memory, round_ * 13, 13)
        assert h.drv.add_many(addrs, lengths, addrs) == 13
        h.drv.publish()
        h.dev.push_batch(serve_all(h, memory, write=False))
        assert [token for token, _ in h.drv.pop_used_many(100)] == addrs
    assert h.drv.avail_idx == (0xFFF0 + 78) & 0xFFFF == h.drv.last_used_idx


def test_full_ring_and_limit(memory: GuestMemory, ring_layout: str) -> None:
    h = make_harness(ring_layout, memory, 8)
    addrs, lengths = buffers(memory, 0, 12)
    assert h.drv.add_many(addrs, lengths, addrs) == 8          # only 8 fit
    assert h.drv.add_many(addrs[8:], lengths[8:], addrs[8:]) == 0
    h.drv.publish()
    h.dev.push_batch(serve_all(h, memory, write=False))
    assert [t for t, _ in h.drv.pop_used_many(3)] == addrs[:3]
    assert [t for t, _ in h.drv.pop_used_many(100)] == addrs[3:8]
    assert h.drv.pop_used_many(100) == []


def test_out_of_order_completion(memory: GuestMemory, ring_layout: str) -> None:
    h = make_harness(ring_layout, memory, 8)
    addrs, lengths = buffers(memory, 0, 6)
    h.drv.add_many(addrs, lengths, list(range(6)))
    h.drv.publish()
    entries = serve_all(h, memory, write=False)
    h.dev.push_batch(entries[::-1])
    assert [t for t, _ in h.drv.pop_used_many(100)] == [5, 4, 3, 2, 1, 0]
    again, lens = buffers(memory, 6, 8)
    assert h.drv.add_many(again, lens, list(range(6, 14))) == 8      # every descriptor came back
    h.drv.publish()
    h.dev.push_batch(serve_all(h, memory, write=False))
    assert [t for t, _ in h.drv.pop_used_many(100)] == list(range(6, 14))


def test_mixed_with_per_buffer_api(memory: GuestMemory, ring_layout: str) -> None:
    """Chains of several descriptors (``add``) between batches: each frees what it took."""
    h = make_harness(ring_layout, memory, 16)
    for _round in range(5):
        token = h.add(2, 1)
        addrs, lengths = buffers(memory, 0, 4)
        h.drv.add_many(addrs, lengths, ["b"] * 4)
        h.add(1, 2)
        h.drv.publish()
        h.pop_all()
        h.complete(list(h.popped), batch=True)
        used = h.drv.pop_used_many(100)
        assert [t for t, _ in used] == [token, "b", "b", "b", "b", token + 1]
        assert h.drv.num_free == 16
    h.drv.add_many(*buffers(memory, 0, 2), ["x", "y"])       # only single buffers in flight again
    h.drv.publish()
    h.dev.push_batch(serve_all(h, memory, write=False))
    assert h.drv.pop_used_many(100) == [("x", 0), ("y", 0)]


def test_split_reserved_chain_is_kept(memory: GuestMemory) -> None:
    h = SplitHarness(memory, 8)
    chain = h.drv.reserve([(BUF_BASE, 8)], [(BUF_BASE + 64, 8)])
    h.drv.post([chain[0]], ["reserved"])
    h.drv.add_many(*buffers(memory, 0, 3), ["a", "b", "c"])
    h.drv.publish()
    served = [h.dev.pop() for _ in range(4)]
    h.dev.push_batch([(c.head, 0) for c in served if c is not None])
    assert [t for t, _ in h.drv.pop_used_many(10)] == ["reserved", "a", "b", "c"]
    assert h.drv.num_free == 6          # the reserved chain's two descriptors stay taken
    h.drv.release(chain)
    assert h.drv.num_free == 8


def test_unknown_id_is_a_ring_error(memory: GuestMemory, ring_layout: str) -> None:
    h = make_harness(ring_layout, memory, 8)
    h.drv.add_many(*buffers(memory, 0, 2), ["a", "b"])
    h.drv.publish()
    chains = [h.dev.pop(), h.dev.pop()]
    h.dev.push_batch([(c.head, 0) for c in chains if c is not None])
    # the device names a buffer the driver never made available
    if ring_layout == "split":
        memory.store_u32(h.layout.used + 4, 7)
    else:
        memory.store_u16(h.layout.desc + 12, 7)
    with pytest.raises(RingError, match="unknown"):
        h.drv.pop_used_many(8)


def test_kick_suppression_flags_honoured(memory: GuestMemory, ring_layout: str) -> None:
    """A polling device disables kicks (NO_NOTIFY / DISABLE): a batch is published without one."""
    h = make_harness(ring_layout, memory, 16)
    h.dev.set_notification(False)
    h.drv.add_many(*buffers(memory, 0, 4), list(range(4)))
    assert h.drv.publish() is False
    assert h.pop_all() == 4
    h.dev.set_notification(True)
    h.drv.add_many(*buffers(memory, 4, 4), list(range(4, 8)))
    assert h.drv.publish() is True


def test_kick_suppression_event_idx_honoured(memory: GuestMemory, ring_layout: str) -> None:
    """EVENT_IDX: one kick when a batch crosses the device's avail event, none while the device
    has not moved it (v1.4 §2.7.10, §2.8.10)."""
    h = make_harness(ring_layout, memory, 16, event_idx=True)
    h.dev.set_notification(True)
    h.drv.add_many(*buffers(memory, 0, 4), list(range(4)))
    assert h.drv.publish() is True
    h.drv.add_many(*buffers(memory, 4, 4), list(range(4, 8)))
    assert h.drv.publish() is False
    assert h.pop_all() == 8           # popping moves the event to the device's position
    h.drv.add_many(*buffers(memory, 8, 4), list(range(8, 12)))
    assert h.drv.publish() is True


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_interrupt_suppression_honoured(memory: GuestMemory, ring_layout: str, event_idx: bool) -> None:
    """A polling driver (interrupts off) is not interrupted for batches it reaps; with EVENT_IDX
    pop_used_many leaves the used event behind, so at most the first batch signals."""
    h = make_harness(ring_layout, memory, 16, event_idx=event_idx)
    h.drv.set_interrupts(False)
    signals = []
    for round_ in range(4):
        h.drv.add_many(*buffers(memory, 4 * round_, 4), list(range(4)))
        h.drv.publish()
        h.dev.push_batch([(c.head, 0) for c in [h.dev.pop() for _ in range(4)] if c is not None])
        signals.append(h.dev.should_notify())
        assert len(h.drv.pop_used_many(16)) == 4
    assert sum(signals) <= (1 if event_idx else 0)
    assert signals[1:] == [False] * 3
    h.drv.set_interrupts(True)
    h.drv.add_many(*buffers(memory, 0, 1), ["on"])
    h.drv.publish()
    chain = h.dev.pop()
    assert chain is not None
    h.dev.push(chain.head, 0)
    assert h.dev.should_notify() is True


def test_packed_batch_head_flags_last(memory: GuestMemory) -> None:
    """The device sees nothing of a batch until its first descriptor's flags are stored: with
    that store undone, no descriptor of the batch is available (v1.4 §2.8.21.1)."""
    h = make_harness("packed", memory, 8)
    head_flags_at = h.layout.desc + 14
    before = memory.load_u16(head_flags_at)
    h.drv.add_many(*buffers(memory, 0, 5), list(range(5)))
    after = memory.load_u16(head_flags_at)
    assert after != before
    memory.store_u16(head_flags_at, before)
    fresh = PackedDeviceQueue(memory, h.layout)
    assert fresh.pop() is None
    memory.store_u16(head_flags_at, after)
    assert h.pop_all() == 5


def test_batch_marks_dirty_pages(memory: GuestMemory, ring_layout: str) -> None:
    """With dirty logging on (migration), a batch marks the descriptors and ring entries it wrote."""
    h = make_harness(ring_layout, memory, 8)
    addrs, lengths = buffers(memory, 0, 3)
    log = memory.enable_dirty_log()
    log.take()
    h.drv.add_many(addrs, lengths, ["a", "b", "c"])
    h.drv.publish()
    pages = set(log.take())
    assert {h.layout.desc // 4096, h.layout.driver // 4096} <= pages
    assert not pages & {gpa // 4096 for gpa in addrs}        # the driver wrote no buffer


def test_split_used_run_crosses_the_ring_end(memory: GuestMemory) -> None:
    """The reader of used elements both split driver rings share (in order or not): a run that
    starts 3 before the ring's end comes back whole, ids and lengths in used-ring order."""
    h = SplitHarness(memory, 8)
    first, first_lengths = buffers(memory, 0, 5)
    h.drv.add_many(first, first_lengths, first, write=True)
    h.drv.publish()
    h.dev.push_batch(serve_all(h, memory, write=True))
    h.drv.pop_used_many(100)                        # used idx now 5: the next run wraps at 8
    addrs, lengths = buffers(memory, 5, 6)
    h.drv.add_many(addrs, lengths, addrs, write=True)
    h.drv.publish()
    entries = serve_all(h, memory, write=True)
    h.dev.push_batch(entries)
    ids, written = h.drv._used_run(h.drv.last_used_idx, 6)
    assert (ids, written) == ([head for head, _ in entries], [n for _, n in entries])
    assert written == [n // 2 for n in lengths]
