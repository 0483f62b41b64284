"""Packed virtqueue: what only the packed layout has: buffer ids, chains across the ring
wrap, indirect tables, malformed rings, descriptor-event suppression, store ordering and
ring-state save/restore (v1.4 §2.8). What both layouts share is in test_virtqueue.py."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rings import MEM_SIZE, RING_BASE, PackedHarness
from rings import make_packed_layout as make_layout

from shadowvmm.backends.base import RingState
from shadowvmm.errors import GuestMemoryError, RingError
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.packed import (
    DESC_SIZE,
    EVENT_SUPPRESS,
    PACKED_DESC,
    EventFlags,
    PackedDescFlags,
    PackedDeviceQueue,
    PackedDriverQueue,
    PackedLayout,
    desc_event_due,
    is_used,
    off_wrap,
)
from shadowvmm.virtio.split import DescChain

AVAIL = int(PackedDescFlags.AVAIL)
USED = int(PackedDescFlags.USED)
NEXT = int(PackedDescFlags.NEXT)
WRITE = int(PackedDescFlags.WRITE)
INDIRECT = int(PackedDescFlags.INDIRECT)

HYPO = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory.create([(0, MEM_SIZE)])
    yield memory
    memory.close()


def put_desc(memory: GuestMemory, layout: PackedLayout, slot: int, addr: int, length: int,
             buf_id: int, flags: int) -> None:
    """Raw driver write of one ring descriptor."""
    memory.write(layout.desc + DESC_SIZE * slot, PACKED_DESC.pack(addr, length, buf_id, flags))


# -- layout -----------------------------------------------------------------------------------

def test_layout_sizes_and_alignment(mem: GuestMemory) -> None:
    assert PackedLayout.area_sizes(5) == (80, 4, 4)
    for size in (1, 3, 255, 32768):
        PackedLayout(size, 0x1000, 0x4, 0x8).validate()
    for size in (0, 32769, -1):
        with pytest.raises(RingError):
            PackedLayout(size, 0x1000, 0x4, 0x8).validate()
    for bad in (PackedLayout(4, 0x1008, 0x4, 0x8), PackedLayout(4, 0x1000, 0x2, 0x8),
                PackedLayout(4, 0x1000, 0x4, 0x6)):
        with pytest.raises(RingError):
            bad.validate()
    with pytest.raises(GuestMemoryError):
        PackedLayout(4, MEM_SIZE - 32, 0x4, 0x8).check_memory(mem)
    with pytest.raises(GuestMemoryError):
        PackedDeviceQueue(mem, PackedLayout(4, 0x1000, MEM_SIZE, 0x8))
    with pytest.raises(RingError):
        PackedDriverQueue(mem, PackedLayout(4, 0x1000, 0x2, 0x8))


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_data_and_ids(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 4)
    mem.write(0x9000, b"hello, ")
    mem.write(0x9100, b"device")
    buf_id = h.drv.add([(0x9000, 7), (0x9100, 6)], [(0xA000, 16), (0xA100, 16)], "tok")
    assert h.drv.num_free == 0 and h.drv.in_flight == 1 and h.drv.outstanding() == ["tok"]
    assert h.drv.publish() is True
    assert h.dev.pending() == 1
    chain = h.dev.pop()
    assert chain is not None and chain.head == buf_id
    assert chain.read(mem) == b"hello, device"
    assert chain.readable == [(0x9000, 7), (0x9100, 6)]
    assert chain.writable == [(0xA000, 16), (0xA100, 16)]
    assert h.dev.pop() is None and h.dev.pending() == 0
    assert h.drv.get_used() == []
    assert chain.write(mem, b"x" * 20) == 20
    h.dev.push(chain.head, 20)
    assert h.dev.should_notify() is True
    assert h.drv.get_used() == [("tok", 20)]
    assert mem.read(0xA000, 16) + mem.read(0xA100, 4) == b"x" * 20
    assert h.drv.num_free == 4 and h.drv.in_flight == 0
    assert h.dev.ring_state(0) == RingState.packed(0, 0, False, 0, False)


def test_used_without_write_flag_reports_zero(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 2)
    h.drv.add([(0x9000, 4)], [], "t")
    chain = h.dev.pop()
    assert chain is not None
    h.dev.push(chain.head, 0)
    flags = mem.load_u16(h.layout.desc + 14)
    assert flags == AVAIL | USED
    assert h.drv.get_used() == [("t", 0)]


def test_chain_across_ring_wrap(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 5)
    for _ in range(3):
        assert h.add(1, 0) is not None
    h.pop_all()
    h.complete(list(h.popped))
    h.reap()
    token = h.add(2, 2)
    assert token is not None
    assert (h.drv.next_avail, h.drv.avail_wrap) == (2, False)
    (chain,) = [h.dev.pop()]
    assert chain is not None and len(chain.readable) == 2 and len(chain.writable) == 2
    assert (h.dev.next_avail, h.dev.avail_wrap) == (2, False)
    h.popped.append(chain)
    h.complete([chain])
    h.reap()
    assert (h.dev.next_used, h.dev.used_wrap) == (2, False)
    assert (h.drv.next_used, h.drv.used_wrap) == (2, False)


def test_ring_full_and_id_reuse(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 3)
    ids = [h.drv.add([(0x9000, 1)], [], i) for i in range(3)]
    assert sorted(ids) == [0, 1, 2]
    with pytest.raises(RingError):
        h.drv.add([(0x9000, 1)], [], "x")
    with pytest.raises(RingError):
        h.drv.add([], [], "x")
    chains = [h.dev.pop() for _ in range(3)]
    assert h.dev.pop() is None
    assert [c.head for c in chains if c] == ids
    h.dev.push(ids[1], 0)
    assert h.drv.get_used() == [(1, 0)]
    assert h.drv.add([(0x9000, 1)], [], 9) == ids[1]


# -- indirect ---------------------------------------------------------------------------------

def test_indirect_round_trip(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 4)
    for _ in range(50):
        token = h.add(3, 2, indirect=True)
        assert token is not None
        assert h.drv.num_free == 3
        chain = h.dev.pop()
        assert chain is not None
        assert len(chain.readable) == 3 and len(chain.writable) == 2
        h.popped.append(chain)
        h.complete([chain])
        h.reap()
    h.check_all_done()


def test_indirect_table_ignores_next_and_id(mem: GuestMemory) -> None:
    layout = make_layout(4)
    PackedDriverQueue(mem, layout)
    table = 0x7000
    mem.write(table, PACKED_DESC.pack(0x9000, 8, 77, NEXT)
              + PACKED_DESC.pack(0x9100, 4, 0, WRITE | NEXT))
    put_desc(mem, layout, 0, table, 32, 5, INDIRECT | WRITE | AVAIL)
    chain = PackedDeviceQueue(mem, layout).pop()
    assert chain == DescChain(5, [(0x9000, 8)], [(0x9100, 4)])


def test_indirect_not_negotiated(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 4)
    h.dev = PackedDeviceQueue(mem, h.layout, indirect=False)
    h.add(1, 1, indirect=True)
    with pytest.raises(RingError):
        h.dev.pop()


# -- malformed rings --------------------------------------------------------------------------

def _device(mem: GuestMemory, size: int = 4) -> tuple[PackedLayout, PackedDeviceQueue]:
    layout = make_layout(size)
    PackedDriverQueue(mem, layout)
    return layout, PackedDeviceQueue(mem, layout)


def _assert_stuck(dev: PackedDeviceQueue, exc: type[Exception]) -> None:
    """The error repeats and the queue does not move past the bad chain."""
    position = dev.ring_state(0)
    for _ in range(2):
        with pytest.raises(exc):
            dev.pop()
    assert dev.ring_state(0) == position and dev.in_flight == 0


def test_descriptor_outside_memory(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, MEM_SIZE - 4, 8, 0, AVAIL)
    _assert_stuck(dev, GuestMemoryError)
    put_desc(mem, layout, 0, 1 << 40, 1, 0, AVAIL | WRITE)
    _assert_stuck(dev, GuestMemoryError)


def test_indirect_table_outside_memory(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, MEM_SIZE - 16, 32, 0, AVAIL | INDIRECT)
    _assert_stuck(dev, GuestMemoryError)
    mem.write(0x7000, PACKED_DESC.pack(MEM_SIZE, 1, 0, 0))
    put_desc(mem, layout, 0, 0x7000, 16, 0, AVAIL | INDIRECT)
    _assert_stuck(dev, GuestMemoryError)


def test_chain_loops_round_the_ring(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    for slot in range(4):
        put_desc(mem, layout, slot, 0x9000, 1, 0, AVAIL | NEXT)
    _assert_stuck(dev, RingError)


def test_chain_runs_into_unavailable_descriptor(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x9000, 1, 0, AVAIL | NEXT)
    _assert_stuck(dev, RingError)
    put_desc(mem, layout, 1, 0x9000, 1, 0, AVAIL | USED)
    _assert_stuck(dev, RingError)


def test_chain_overruns_in_flight_descriptors(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x9000, 1, 0, AVAIL)
    put_desc(mem, layout, 1, 0x9000, 1, 1, AVAIL)
    assert dev.pop() is not None and dev.pop() is not None
    put_desc(mem, layout, 2, 0x9000, 1, 2, AVAIL | NEXT)
    put_desc(mem, layout, 3, 0x9000, 1, 2, AVAIL | NEXT)
    put_desc(mem, layout, 0, 0x9000, 1, 2, USED)
    _assert_stuck_inflight(dev)


def _assert_stuck_inflight(dev: PackedDeviceQueue) -> None:
    position = dev.ring_state(0)
    with pytest.raises(RingError):
        dev.pop()
    assert dev.ring_state(0) == position


def test_indirect_with_next(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    mem.write(0x7000, PACKED_DESC.pack(0x9000, 4, 0, 0))
    put_desc(mem, layout, 0, 0x7000, 16, 0, AVAIL | INDIRECT | NEXT)
    put_desc(mem, layout, 1, 0x9000, 4, 0, AVAIL)
    _assert_stuck(dev, RingError)


def test_indirect_inside_chain(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    mem.write(0x7000, PACKED_DESC.pack(0x9000, 4, 0, 0))
    put_desc(mem, layout, 0, 0x9000, 4, 0, AVAIL | NEXT)
    put_desc(mem, layout, 1, 0x7000, 16, 0, AVAIL | INDIRECT)
    _assert_stuck(dev, RingError)


@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_bad_length(mem: GuestMemory, length: int) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x7000, length, 0, AVAIL | INDIRECT)
    _assert_stuck(dev, RingError)


def test_writable_then_readable(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x9000, 4, 0, AVAIL | WRITE | NEXT)
    put_desc(mem, layout, 1, 0x9100, 4, 0, AVAIL)
    _assert_stuck(dev, RingError)
    mem.write(0x7000, PACKED_DESC.pack(0x9000, 4, 0, WRITE) + PACKED_DESC.pack(0x9100, 4, 0, 0))
    put_desc(mem, layout, 0, 0x7000, 32, 0, AVAIL | INDIRECT)
    _assert_stuck(dev, RingError)


def test_buffer_id_already_in_flight(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x9000, 1, 7, AVAIL)
    put_desc(mem, layout, 1, 0x9000, 1, 7, AVAIL)
    chain = dev.pop()
    assert chain is not None and chain.head == 7
    _assert_stuck_inflight(dev)
    dev.push(7, 0)
    assert dev.pop() is not None


def test_push_unknown_id(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    with pytest.raises(RingError):
        dev.push(0, 0)
    put_desc(mem, layout, 0, 0x9000, 1, 4, AVAIL)
    assert dev.pop() is not None
    position = dev.ring_state(0)
    for bad in ([(4, 0), (1, 0)], [(4, 0), (4, 0)]):
        with pytest.raises(RingError):
            dev.push_batch(bad)
        assert dev.ring_state(0) == position and dev.in_flight == 1
    dev.push_batch([(4, 1)])
    assert dev.in_flight == 0


def test_driver_rejects_unknown_used_id(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 4)
    h.add(1, 1)
    put_desc(mem, h.layout, 0, 0, 0, 3, AVAIL | USED)
    with pytest.raises(RingError):
        h.drv.get_used()


def test_stale_skipped_descriptor_is_not_mistaken_for_used(mem: GuestMemory) -> None:
    """A chain member the device skipped keeps USED == the driver's next wrap (v1.4 §2.8.1)."""
    h = PackedHarness(mem, 4)
    for shape in ((1, 2), (1,), (2,)):
        for n_out in shape:
            h.add(n_out, 0)
        h.pop_all()
        h.complete(list(h.popped))
        assert len(h.reap()) == len(shape)
    assert (h.drv.next_used, h.drv.used_wrap) == (2, False)
    flags = mem.load_u16(h.layout.desc + DESC_SIZE * 2 + 14)
    assert bool(flags & USED) == h.drv.used_wrap and bool(flags & AVAIL) != h.drv.used_wrap
    assert not is_used(flags, h.drv.used_wrap)
    assert h.drv.get_used() == []
    h.add(1, 0)
    h.pop_all()
    h.complete(list(h.popped))
    assert len(h.reap()) == 1
    h.check_all_done()


descriptor = st.tuples(
    st.sampled_from([0, 0x9000, MEM_SIZE - 16, MEM_SIZE - 1, MEM_SIZE, 1 << 63, RING_BASE]),
    st.sampled_from([0, 1, 16, 32, 48, 4096, 0xFFFFFFFF]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)


@HYPO
@given(size=st.integers(1, 8), descs=st.lists(descriptor, min_size=8, max_size=8),
       table=st.lists(descriptor, min_size=4, max_size=4),
       state=st.tuples(st.integers(0, 7), st.booleans(), st.integers(0, 7), st.booleans()),
       pushes=st.lists(st.integers(0, 0xFFFF), max_size=4))
def test_fuzzed_ring_raises_only_ring_errors(mem: GuestMemory, size: int, descs: list,
                                             table: list, state: tuple, pushes: list) -> None:
    layout = make_layout(size)
    PackedDriverQueue(mem, layout)
    mem.write(0x9000, b"".join(PACKED_DESC.pack(*d) for d in table))
    for slot in range(size):
        put_desc(mem, layout, slot, *descs[slot])
    try:
        dev = PackedDeviceQueue(mem, layout, state=RingState.packed(0, *state))
    except RingError:
        return
    popped: list[int] = []
    for _ in range(size + 2):
        try:
            chain = dev.pop()
        except (RingError, GuestMemoryError):
            continue
        if chain is None:
            break
        assert isinstance(chain, DescChain)
        popped.append(chain.head)
    assert dev.in_flight == len(popped) == len(set(popped))
    in_flight = set(popped)
    for buf_id in pushes + popped:
        if buf_id in in_flight:
            dev.push(buf_id, buf_id & 0xFF)
            in_flight.discard(buf_id)
        else:
            with pytest.raises(RingError):
                dev.push(buf_id, 0)
    assert dev.in_flight == 0
    dev.should_notify()
    dev.pending()


@HYPO
@given(size=st.integers(1, 8), descs=st.lists(descriptor, min_size=8, max_size=8),
       adds=st.integers(1, 8))
def test_fuzzed_used_ring_raises_only_ring_errors(mem: GuestMemory, size: int, descs: list,
                                                  adds: int) -> None:
    h = PackedHarness(mem, size)
    for _ in range(adds):
        h.add(1, 0)
    for slot in range(size):
        put_desc(mem, h.layout, slot, *descs[slot])
    try:
        h.drv.get_used()
    except RingError:
        pass
    assert len(h.drv.outstanding()) == h.drv.in_flight <= adds
    # ring slots: free + one per buffer in flight + the extra ones of multi-slot buffers
    assert h.drv.num_free + h.drv.in_flight + sum(n - 1 for n in h.drv._slots.values()) == size


# -- event suppression ------------------------------------------------------------------------

def _reference_due(size: int, event_off: int, event_wrap: bool, new: int, wrap: bool,
                   count: int) -> bool:
    """Brute force: was descriptor (event_off, event_wrap) among the last *count* positions?"""
    lap = 0 if wrap else 1
    pos = lap * size + new + 4 * size
    for q in range(pos - count, pos):
        if q % size == event_off and ((q // size) % 2 == 0) == event_wrap:
            return True
    return False


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_desc_event_matches_brute_force(data: st.DataObject) -> None:
    size = data.draw(st.sampled_from([1, 2, 3, 7, 64, 255, 32768]))
    new = data.draw(st.integers(0, size - 1))
    wrap = data.draw(st.booleans())
    count = data.draw(st.integers(1, size))
    event_off = data.draw(st.integers(0, size - 1))
    event_wrap = data.draw(st.booleans())
    due = desc_event_due(off_wrap(event_off, event_wrap), size, new, wrap, count)
    if count < size:
        assert due == _reference_due(size, event_off, event_wrap, new, wrap, count)
    else:
        assert due


def _event(mem: GuestMemory, addr: int) -> tuple[int, int]:
    return EVENT_SUPPRESS.unpack(mem.read(addr, 4))


def test_desc_mode_without_event_idx_notifies(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 4)
    mem.store_u16(h.layout.device, off_wrap(3, False))
    mem.store_u16(h.layout.device + 2, EventFlags.DESC)
    h.add(1, 0)
    assert h.drv.publish() is True
    mem.store_u16(h.layout.driver, off_wrap(3, False))
    mem.store_u16(h.layout.driver + 2, EventFlags.DESC)
    h.pop_all()
    h.complete(list(h.popped))
    assert h.dev.should_notify() is True


def test_event_idx_kicks(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 5, event_idx=True)
    h.add(1, 0)
    assert h.drv.publish() is True
    h.add(1, 0)
    assert h.drv.publish() is True
    h.pop_all()
    assert _event(mem, h.layout.device) == (off_wrap(2, True), EventFlags.DESC)
    h.add(1, 0)
    assert h.drv.publish() is True
    h.add(1, 0)
    assert h.drv.publish() is False
    h.add(1, 0)
    assert h.drv.publish() is False
    h.complete(list(h.popped))
    h.reap()
    assert h.pop_all() == 3
    assert _event(mem, h.layout.device) == (off_wrap(0, False), EventFlags.DESC)
    h.complete(list(h.popped))
    h.reap()
    h.add(2, 0)
    h.add(1, 0)
    assert (h.drv.next_avail, h.drv.avail_wrap) == (3, False)
    assert h.drv.publish() is True
    h.dev.set_notification(False)
    h.pop_all()
    h.add(1, 0)
    assert h.drv.publish() is False
    h.dev.set_notification(True)
    assert _event(mem, h.layout.device) == (off_wrap(3, False), EventFlags.DESC)
    assert h.pop_all() == 1
    h.add(1, 0)
    assert h.drv.publish() is True


def test_event_idx_kick_across_wrap_from_previous_lap(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 4, event_idx=True)
    for _ in range(3):
        h.add(1, 0)
    h.drv.publish()
    h.pop_all()
    h.complete(list(h.popped))
    h.reap()
    assert _event(mem, h.layout.device)[0] == off_wrap(3, True)
    h.add(1, 0)
    h.add(1, 0)
    assert (h.drv.next_avail, h.drv.avail_wrap) == (1, False)
    assert h.drv.publish() is True


def test_event_idx_interrupts(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 4, event_idx=True)
    assert _event(mem, h.layout.driver) == (off_wrap(0, True), EventFlags.DESC)
    for _ in range(4):
        h.add(1, 0)
    h.pop_all()
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is True
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is False
    assert len(h.reap()) == 2
    assert _event(mem, h.layout.driver)[0] == off_wrap(2, True)
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is True
    h.drv.set_interrupts(False)
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is False
    h.drv.set_interrupts(True)
    assert _event(mem, h.layout.driver) == (off_wrap(2, True), EventFlags.DESC)
    h.reap()
    h.add(2, 0)
    h.pop_all()
    h.complete(list(h.popped))
    assert h.dev.should_notify() is True


# -- ordering of stores -----------------------------------------------------------------------

class StoreLog:
    """Records guest writes (multi-byte) and 16-bit stores, in order."""

    def __init__(self, mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ops: list[tuple[str, int, int]] = []
        write, store = mem.write, mem.store_u16

        def log_write(gpa: int, data: bytes | bytearray | memoryview) -> None:
            self.ops.append(("write", gpa, len(data)))
            write(gpa, data)

        def log_store(gpa: int, value: int) -> None:
            self.ops.append(("u16", gpa, value))
            store(gpa, value)

        monkeypatch.setattr(mem, "write", log_write)
        monkeypatch.setattr(mem, "store_u16", log_store)

    def check_no_torn_flags(self, layout: PackedLayout) -> None:
        end = layout.desc + DESC_SIZE * layout.size
        for kind, gpa, length in self.ops:
            if kind != "write" or gpa >= end or gpa + length <= layout.desc:
                continue
            for slot in range(layout.size):
                flags = layout.desc + DESC_SIZE * slot + 14
                overlaps = gpa < flags + 2 and flags < gpa + length
                assert not overlaps, "flags written by a bulk write"


def test_head_flags_stored_last(mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    h = PackedHarness(mem, 4)
    h.add(1, 0)
    h.pop_all()
    h.complete(list(h.popped))
    h.reap()
    log = StoreLog(mem, monkeypatch)
    h.add(2, 1)
    head_flags = h.layout.desc + DESC_SIZE * 1 + 14
    assert log.ops[-1] == ("u16", head_flags, AVAIL | NEXT)
    assert [op for op in log.ops if op[1] == head_flags] == [log.ops[-1]]
    assert [op[1] for op in log.ops if op[0] == "u16"] == [
        h.layout.desc + DESC_SIZE * s + 14 for s in (2, 3, 1)]
    log.check_no_torn_flags(h.layout)


def test_used_flags_stored_last(mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    h = PackedHarness(mem, 8)
    for _ in range(4):
        h.add(1, 1)
    h.pop_all()
    log = StoreLog(mem, monkeypatch)
    h.complete([h.popped[0]])
    assert log.ops[-1][:2] == ("u16", h.layout.desc + 14)
    log.ops.clear()
    h.complete(list(h.popped), batch=True)
    stores = [op for op in log.ops if op[0] == "u16"]
    assert [gpa for _, gpa, _ in stores] == [h.layout.desc + DESC_SIZE * s + 14 for s in (4, 6, 2)]
    assert all(value & (AVAIL | USED) == AVAIL | USED for _, _, value in stores)
    log.check_no_torn_flags(h.layout)
    assert len(h.reap()) == 4


# -- ring state save/restore ------------------------------------------------------------------

def test_ring_state_encoding_and_validation(mem: GuestMemory) -> None:
    layout = make_layout(6)
    PackedDriverQueue(mem, layout)
    fresh = RingState.packed(0, 0, True, 0, True)
    assert fresh.base == 0x80008000
    assert PackedDeviceQueue(mem, layout).ring_state(0) == fresh
    dev = PackedDeviceQueue(mem, layout, state=RingState.packed(1, 4, False, 2, False))
    assert dev.ring_state(1).unpack_packed() == (4, False, 2, False)
    for bad in (RingState.packed(0, 6, True, 0, True), RingState.packed(0, 0, True, 7, True),
                RingState.packed(0, 1, True, 2, True), RingState.packed(0, 1, False, 0, True)):
        with pytest.raises(RingError):
            PackedDeviceQueue(mem, layout, state=bad)
    nearly_full = RingState.packed(0, 1, False, 2, True)
    assert PackedDeviceQueue(mem, layout, state=nearly_full).pending() == 0
    full = RingState.packed(0, 2, False, 2, True)
    assert PackedDeviceQueue(mem, layout, state=full).pop() is None


@pytest.mark.parametrize("size", [3, 7, 16])
def test_save_restore_mid_traffic(mem: GuestMemory, size: int) -> None:
    rng = random.Random(size * 13)
    h = PackedHarness(mem, size, event_idx=size % 2 == 1)
    for _ in range(300):
        while rng.random() < 0.8 and h.add(rng.randint(1, 3), rng.randint(0, 2)) is not None:
            pass
        h.drv.publish()
        for _ in range(rng.randint(0, 3)):
            chain = h.dev.pop()
            if chain is not None:
                h.popped.append(chain)
        h.complete(rng.sample(h.popped, len(h.popped)), batch=rng.random() < 0.5)
        h.dev.should_notify()
        h.reap()
        before = h.dev.ring_state(0)
        pending = h.dev.pending()
        h.restore_device()
        assert h.dev.ring_state(0) == before and h.dev.pending() == pending
    h.pop_all()
    h.complete(list(h.popped))
    h.reap()
    h.check_all_done()


def test_restored_device_rejects_lost_in_flight_buffer(mem: GuestMemory) -> None:
    h = PackedHarness(mem, 4)
    h.add(1, 0)
    h.pop_all()
    state = h.dev.ring_state(0)
    dev = PackedDeviceQueue(mem, h.layout, state=state)
    assert dev.pop() is None
    with pytest.raises(RingError):
        dev.push(h.popped[0].head, 0)


def test_restored_device_keeps_in_flight_slots_out_of_chains(mem: GuestMemory) -> None:
    layout, dev = _device(mem)
    put_desc(mem, layout, 0, 0x9000, 1, 0, AVAIL)
    assert dev.pop() is not None
    dev = PackedDeviceQueue(mem, layout, state=dev.ring_state(0))
    for slot in (1, 2, 3):
        put_desc(mem, layout, slot, 0x9000, 1, 1, AVAIL | NEXT)
    put_desc(mem, layout, 0, 0x9000, 1, 1, USED)
    assert dev.pending() == 0
    with pytest.raises(RingError):
        dev.pop()
