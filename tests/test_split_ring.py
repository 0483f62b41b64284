"""Split virtqueue: what only the split layout has: its area sizes, the 16-bit index wrap, raw
indirect tables, malformed rings, event-index suppression and save/restore (v1.4 §2.7).
What both layouts share is in test_virtqueue.py."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rings import MEM_SIZE, RING_BASE, SplitHarness
from rings import make_split_layout as make_layout

from shadowvmm.errors import GuestMemoryError, RingError
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.split import (
    DESC,
    DESC_SIZE,
    USED_ELEM,
    DescChain,
    DescFlags,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
    need_event,
)

NEXT = int(DescFlags.NEXT)
WRITE = int(DescFlags.WRITE)
INDIRECT = int(DescFlags.INDIRECT)

HYPO = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory.create([(0, MEM_SIZE)])
    yield memory
    memory.close()


def put_desc(memory: GuestMemory, layout: SplitLayout, index: int, addr: int, length: int,
             flags: int, nxt: int = 0) -> None:
    memory.write(layout.desc + DESC_SIZE * index, DESC.pack(addr, length, flags, nxt))


def make_avail(memory: GuestMemory, layout: SplitLayout, heads: list[int], start: int = 0) -> None:
    """Raw driver: put *heads* in the avail ring from index *start* and publish."""
    for i, head in enumerate(heads):
        memory.store_u16(layout.avail + 4 + 2 * ((start + i) % layout.size), head)
    memory.store_u16(layout.avail + 2, (start + len(heads)) & 0xFFFF)


# -- layout -----------------------------------------------------------------------------------

def test_layout_sizes_and_alignment(mem: GuestMemory) -> None:
    assert SplitLayout.area_sizes(8) == (128, 22, 70)
    for size in (1, 2, 256, 32768):
        SplitLayout(size, 0x1000, 0x2, 0x4).validate()
    for size in (0, 3, 12, 65536):
        with pytest.raises(RingError):
            SplitLayout(size, 0x1000, 0x2, 0x4).validate()
    for bad in (SplitLayout(4, 0x1008, 0x2, 0x4), SplitLayout(4, 0x1000, 0x1, 0x4),
                SplitLayout(4, 0x1000, 0x2, 0x6)):
        with pytest.raises(RingError):
            bad.validate()
    with pytest.raises(GuestMemoryError):
        SplitDeviceQueue(mem, SplitLayout(4, 0x1000, MEM_SIZE - 8, 0x4))


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_data(mem: GuestMemory) -> None:
    h = SplitHarness(mem, 4)
    mem.write(0x9000, b"hello, ")
    mem.write(0x9100, b"device")
    head = h.drv.add([(0x9000, 7), (0x9100, 6)], [(0xA000, 16)], "tok")
    assert h.drv.num_free == 1 and h.drv.in_flight == 1 and h.drv.outstanding() == ["tok"]
    assert h.dev.pop() is None, "not visible before publish"
    assert h.drv.publish() is True
    assert h.dev.pending() == 1
    chain = h.dev.pop()
    assert chain is not None and chain.head == head
    assert chain.read(mem) == b"hello, device"
    assert chain.writable == [(0xA000, 16)]
    assert chain.write(mem, b"y" * 10) == 10
    h.dev.push(chain.head, 10)
    assert h.dev.should_notify() is True
    assert h.drv.get_used() == [("tok", 10)]
    assert mem.read(0xA000, 10) == b"y" * 10
    assert h.drv.num_free == 4


@pytest.mark.parametrize("event_idx", [False, True])
def test_index_wraps_past_65535(mem: GuestMemory, event_idx: bool) -> None:
    rng = random.Random(5)
    h = SplitHarness(mem, 8, event_idx=event_idx, start_idx=0xFFF0)
    for _ in range(60):
        while h.add(1, rng.randint(0, 2)) is not None:
            pass
        assert h.drv.publish() is True
        h.pop_all()
        h.complete(rng.sample(h.popped, len(h.popped)))
        assert h.dev.should_notify() is True
        h.reap()
    assert h.dev.last_avail_idx < 0x1000
    h.check_all_done()


# -- indirect (raw driver: SplitDriverQueue has no indirect support) -----------------------

def test_indirect_round_trip(mem: GuestMemory) -> None:
    layout = make_layout(4)
    SplitDriverQueue(mem, layout)
    table = 0x7000
    mem.write(table, DESC.pack(0x9000, 8, NEXT, 2) + DESC.pack(0xA000, 16, WRITE, 0)
              + DESC.pack(0x9100, 4, NEXT, 1))
    put_desc(mem, layout, 3, table, 48, INDIRECT | WRITE)
    make_avail(mem, layout, [3])
    dev = SplitDeviceQueue(mem, layout)
    chain = dev.pop()
    assert chain == DescChain(3, [(0x9000, 8), (0x9100, 4)], [(0xA000, 16)])
    dev.push(3, 16)
    assert mem.load_u16(layout.used + 2) == 1
    assert USED_ELEM.unpack(mem.read(layout.used + 4, 8)) == (3, 16)
    dev_no_indirect = SplitDeviceQueue(mem, layout, indirect=False)
    with pytest.raises(RingError):
        dev_no_indirect.pop()


# -- malformed rings --------------------------------------------------------------------------

def _device(mem: GuestMemory, size: int = 4) -> tuple[SplitLayout, SplitDeviceQueue]:
    layout = make_layout(size)
    SplitDriverQueue(mem, layout)
    return layout, SplitDeviceQueue(mem, layout)


def _assert_stuck(dev: SplitDeviceQueue, exc: type[Exception]) -> None:
    """The error repeats, from pop and from pop_many (whose walk of a plain chain is its own),
    and the queue does not move past the bad chain."""
    position = dev.last_avail_idx
    for _ in range(2):
        with pytest.raises(exc):
            dev.pop()
        out: list[DescChain] = []
        with pytest.raises(exc):
            dev.pop_many(out)
        assert out == []
    assert dev.last_avail_idx == position


def test_descriptor_outside_memory(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, MEM_SIZE - 4, 8, 0)
    make_avail(mem, layout, [0])
    _assert_stuck(dev, GuestMemoryError)
    put_desc(mem, layout, 0, 0x7000, 32, INDIRECT)
    mem.write(0x7000, DESC.pack(1 << 40, 1, WRITE, 0))
    _assert_stuck(dev, GuestMemoryError)
    put_desc(mem, layout, 0, MEM_SIZE - 16, 32, INDIRECT)
    _assert_stuck(dev, GuestMemoryError)


def test_head_out_of_range(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    make_avail(mem, layout, [4])
    _assert_stuck(dev, RingError)
    put_desc(mem, layout, 0, 0x9000, 1, NEXT, 9)
    make_avail(mem, layout, [0])
    _assert_stuck(dev, RingError)


def test_descriptor_loop(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x9000, 1, NEXT, 1)
    put_desc(mem, layout, 1, 0x9000, 1, NEXT, 0)
    make_avail(mem, layout, [0])
    _assert_stuck(dev, RingError)
    put_desc(mem, layout, 2, 0x9000, 1, NEXT, 2)
    make_avail(mem, layout, [2])
    _assert_stuck(dev, RingError)
    mem.write(0x7000, DESC.pack(0x9000, 1, NEXT, 1) + DESC.pack(0x9000, 1, NEXT, 0))
    put_desc(mem, layout, 0, 0x7000, 32, INDIRECT)
    make_avail(mem, layout, [0])
    _assert_stuck(dev, RingError)


def test_indirect_with_next_and_nested(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    mem.write(0x7000, DESC.pack(0x9000, 4, 0, 0))
    put_desc(mem, layout, 0, 0x7000, 16, INDIRECT | NEXT, 1)
    put_desc(mem, layout, 1, 0x9000, 4, 0)
    make_avail(mem, layout, [0])
    _assert_stuck(dev, RingError)
    mem.write(0x7100, DESC.pack(0x7000, 16, INDIRECT, 0))
    put_desc(mem, layout, 0, 0x7100, 16, INDIRECT)
    _assert_stuck(dev, RingError)


@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_bad_length(mem: GuestMemory, length: int) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x7000, length, INDIRECT)
    make_avail(mem, layout, [0])
    _assert_stuck(dev, RingError)


def test_writable_then_readable(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x9000, 4, WRITE | NEXT, 1)
    put_desc(mem, layout, 1, 0x9100, 4, 0)
    make_avail(mem, layout, [0])
    _assert_stuck(dev, RingError)
    mem.write(0x7000, DESC.pack(0x9000, 4, WRITE | NEXT, 1) + DESC.pack(0x9100, 4, 0, 0))
    put_desc(mem, layout, 0, 0x7000, 32, INDIRECT)
    _assert_stuck(dev, RingError)


def test_avail_index_too_far_ahead(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x9000, 1, 0)
    mem.store_u16(layout.avail + 2, 5)
    _assert_stuck(dev, RingError)
    mem.store_u16(layout.avail + 2, 4)
    assert dev.pending() == 4
    assert dev.pop() is not None


def test_driver_rejects_unknown_used_id(mem: GuestMemory) -> None:
    h = SplitHarness(mem, 4)
    h.add(1, 1)
    h.drv.publish()
    mem.write(h.layout.used + 4, USED_ELEM.pack(3, 0))
    mem.store_u16(h.layout.used + 2, 1)
    with pytest.raises(RingError):
        h.drv.get_used()


descriptor = st.tuples(
    st.sampled_from([0, 0x9000, MEM_SIZE - 16, MEM_SIZE - 1, MEM_SIZE, 1 << 63, RING_BASE]),
    st.sampled_from([0, 1, 16, 32, 48, 4096, 0xFFFFFFFF]),
    st.integers(0, 0xFFFF),
    st.integers(0, 9),
)


def fuzzed_ring(mem: GuestMemory, size: int, descs: list, table: list, heads: list, last_avail: int,
                ahead: int) -> SplitLayout:
    """A ring of *size* with arbitrary descriptors, an indirect *table* at 0x9000 and *ahead*
    avail entries published from *last_avail* on."""
    layout = make_layout(size)
    SplitDriverQueue(mem, layout)
    mem.write(0x9000, b"".join(DESC.pack(*d) for d in table))
    for index in range(size):
        put_desc(mem, layout, index, *descs[index])
    make_avail(mem, layout, heads[:size] * 2, start=last_avail)
    mem.store_u16(layout.avail + 2, (last_avail + ahead) & 0xFFFF)
    return layout


@HYPO
@given(size_log=st.integers(0, 3), descs=st.lists(descriptor, min_size=8, max_size=8),
       table=st.lists(descriptor, min_size=4, max_size=4),
       heads=st.lists(st.integers(0, 9), min_size=8, max_size=8),
       last_avail=st.integers(0, 0xFFFF), ahead=st.integers(0, 12))
def test_fuzzed_ring_raises_only_ring_errors(mem: GuestMemory, size_log: int, descs: list,
                                             table: list, heads: list, last_avail: int,
                                             ahead: int) -> None:
    size = 1 << size_log
    layout = fuzzed_ring(mem, size, descs, table, heads, last_avail, ahead)
    dev = SplitDeviceQueue(mem, layout, last_avail_idx=last_avail)
    for _ in range(size + 2):
        try:
            chain = dev.pop()
        except (RingError, GuestMemoryError):
            continue
        if chain is None:
            break
        assert isinstance(chain, DescChain)
        dev.push(chain.head, 0)
    dev.should_notify()


@HYPO
@given(size_log=st.integers(0, 3), descs=st.lists(descriptor, min_size=8, max_size=8),
       table=st.lists(descriptor, min_size=4, max_size=4),
       heads=st.lists(st.integers(0, 9), min_size=8, max_size=8),
       last_avail=st.integers(0, 0xFFFF), ahead=st.integers(0, 12), event_idx=st.booleans())
def test_pop_many_takes_what_pop_one_by_one_takes(mem: GuestMemory, size_log: int, descs: list,
                                                  table: list, heads: list, last_avail: int,
                                                  ahead: int, event_idx: bool) -> None:
    """On any ring, well-formed or not: the same chains in the same order, the same error at
    the same chain, the same avail position and avail event afterwards."""
    size = 1 << size_log
    layout = fuzzed_ring(mem, size, descs, table, heads, last_avail, ahead)
    event = layout.used + 4 + 8 * size

    def one_by_one() -> tuple[list, type | None, int, int]:
        dev = SplitDeviceQueue(mem, layout, last_avail_idx=last_avail, event_idx=event_idx)
        got: list = []
        try:
            while (chain := dev.pop()) is not None:
                got.append((chain.head, chain.readable, chain.writable))
        except (RingError, GuestMemoryError) as exc:
            return got, type(exc), dev.last_avail_idx, mem.load_u16(event)
        return got, None, dev.last_avail_idx, mem.load_u16(event)

    def batched() -> tuple[list, type | None, int, int]:
        dev = SplitDeviceQueue(mem, layout, last_avail_idx=last_avail, event_idx=event_idx)
        out: list[DescChain] = []
        error: type | None = None
        try:
            dev.pop_many(out)
        except (RingError, GuestMemoryError) as exc:
            error = type(exc)
        return [(c.head, c.readable, c.writable) for c in out], error, dev.last_avail_idx, mem.load_u16(event)

    mem.store_u16(event, 0xBEEF)
    expected = one_by_one()
    mem.store_u16(event, 0xBEEF)
    assert batched() == expected


# -- event suppression ------------------------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(old=st.integers(0, 0xFFFF), count=st.integers(0, 0x8000), event=st.integers(0, 0xFFFF))
def test_need_event_matches_brute_force(old: int, count: int, event: int) -> None:
    new = (old + count) & 0xFFFF
    crossed = any((old + i) & 0xFFFF == event for i in range(count))
    assert need_event(event, new, old) == crossed


def test_event_idx_kicks_and_interrupts(mem: GuestMemory) -> None:
    h = SplitHarness(mem, 8, event_idx=True)
    avail_event = h.layout.used + 4 + 8 * 8
    used_event = h.layout.avail + 4 + 2 * 8
    h.add(1, 0)
    assert h.drv.publish() is True
    h.add(1, 0)
    assert h.drv.publish() is False
    assert h.pop_all() == 2
    assert mem.load_u16(avail_event) == 2
    h.add(1, 0)
    h.add(1, 0)
    assert h.drv.publish() is True
    h.add(1, 0)
    assert h.drv.publish() is False
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is True
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is False
    assert len(h.reap()) == 2
    assert mem.load_u16(used_event) == 2
    assert h.pop_all() == 3
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is True
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is False


# -- save/restore -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 8, 16])
def test_save_restore_mid_traffic(mem: GuestMemory, size: int) -> None:
    """A new device queue built from last_avail_idx continues, even with chains in flight."""
    rng = random.Random(size * 13)
    h = SplitHarness(mem, size, event_idx=size == 8)
    for _ in range(300):
        while rng.random() < 0.8 and h.add(rng.randint(1, 2), rng.randint(0, 2)) is not None:
            pass
        h.drv.publish()
        for _ in range(rng.randint(0, 3)):
            chain = h.dev.pop()
            if chain is not None:
                h.popped.append(chain)
        h.complete(rng.sample(h.popped, rng.randint(0, len(h.popped))), batch=rng.random() < 0.5)
        h.dev.should_notify()
        h.reap()
        pending = h.dev.pending()
        h.restore_device()
        assert h.dev.pending() == pending
    h.pop_all()
    h.complete(list(h.popped))
    h.reap()
    h.check_all_done()
