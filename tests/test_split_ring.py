"""Split virtqueue: driver <-> device round trips, wraps, malformed rings (v1.4 §2.7)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowvmm.errors import GuestMemoryError, RingError
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.split import (
    AVAIL_F_NO_INTERRUPT,
    DESC,
    DESC_SIZE,
    USED_ELEM,
    USED_F_NO_NOTIFY,
    DescChain,
    DescFlags,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
    need_event,
)

MEM_SIZE = 1 << 20
RING_BASE = 0x1000
BUF_BASE = 0x80000
BUF_STRIDE = 256
BUF_SLOTS = (MEM_SIZE - BUF_BASE) // BUF_STRIDE
IN_LEN = 32

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


def make_layout(size: int) -> SplitLayout:
    d, a, _ = SplitLayout.area_sizes(size)
    avail = RING_BASE + d
    used = (avail + a + 3) & ~3
    return SplitLayout(size, RING_BASE, avail, used)


def put_desc(memory: GuestMemory, layout: SplitLayout, index: int, addr: int, length: int,
             flags: int, nxt: int = 0) -> None:
    memory.write(layout.desc + DESC_SIZE * index, DESC.pack(addr, length, flags, nxt))


def make_avail(memory: GuestMemory, layout: SplitLayout, heads: list[int], start: int = 0) -> None:
    """Raw driver: put *heads* in the avail ring from index *start* and publish."""
    for i, head in enumerate(heads):
        memory.store_u16(layout.avail + 4 + 2 * ((start + i) % layout.size), head)
    memory.store_u16(layout.avail + 2, (start + len(heads)) & 0xFFFF)


class Harness:
    """A driver and a device over one ring, with per-token buffers and expected lengths."""

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool = False,
                 start_idx: int = 0) -> None:
        self.memory = memory
        self.layout = make_layout(size)
        self.size = size
        self.event_idx = event_idx
        self.drv = SplitDriverQueue(memory, self.layout, event_idx=event_idx)
        if start_idx:
            self.drv.avail_idx = self.drv._kicked_avail = self.drv.last_used_idx = start_idx
            memory.store_u16(self.layout.avail + 2, start_idx)
            memory.store_u16(self.layout.used + 2, start_idx)
            if event_idx:
                memory.store_u16(self.layout.avail + 4 + 2 * size, start_idx)
                memory.store_u16(self.layout.used + 4 + 8 * size, start_idx)
        self.dev = SplitDeviceQueue(memory, self.layout, event_idx=event_idx,
                                    last_avail_idx=start_idx)
        self.next_token = 0
        self.expected: dict[int, int] = {}
        self.completed: dict[int, int] = {}
        self.popped: list[DescChain] = []

    def add(self, n_out: int, n_in: int) -> int | None:
        """Queue one request (token in its first readable buffer); None if the ring is full."""
        if n_out + n_in > self.drv.num_free:
            return None
        token = self.next_token
        self.next_token += 1
        base = BUF_BASE + BUF_STRIDE * (token % BUF_SLOTS)
        self.memory.write(base, token.to_bytes(8, "little"))
        out = [(base + 16 * k, 8) for k in range(n_out)]
        inp = [(base + 128 + IN_LEN * k, IN_LEN) for k in range(n_in)]
        self.drv.add(out, inp, token)
        self.expected[token] = token % (n_in * IN_LEN + 1)
        return token

    def pop_all(self) -> int:
        count = 0
        while (chain := self.dev.pop()) is not None:
            self.popped.append(chain)
            count += 1
        return count

    def serve(self, chain: DescChain) -> tuple[int, int]:
        token = int.from_bytes(chain.read(self.memory)[:8], "little")
        written = token % (chain.writable_len + 1)
        assert chain.write(self.memory, bytes([token & 0xFF]) * written) == written
        return chain.head, written

    def complete(self, chains: list[DescChain], *, batch: bool = False) -> None:
        entries = [self.serve(c) for c in chains]
        for c in chains:
            self.popped.remove(c)
        if batch:
            self.dev.push_batch(entries)
        else:
            for head, written in entries:
                self.dev.push(head, written)

    def reap(self) -> list[tuple[object, int]]:
        used = self.drv.get_used()
        for token, written in used:
            assert isinstance(token, int)
            assert token not in self.completed, f"token {token} completed twice"
            assert written == self.expected[token], (token, written)
            base = BUF_BASE + BUF_STRIDE * (token % BUF_SLOTS) + 128
            assert self.memory.read(base, written) == bytes([token & 0xFF]) * written
            self.completed[token] = written
        return used

    def restore_device(self) -> None:
        """Stop the device queue and build a new one from its last_avail_idx (vhost base)."""
        base = self.dev.last_avail_idx
        self.dev = SplitDeviceQueue(self.memory, self.layout, event_idx=self.event_idx,
                                    last_avail_idx=base)

    def check_all_done(self) -> None:
        assert set(self.completed) == set(self.expected)
        assert self.drv.in_flight == 0 and self.drv.num_free == self.size
        assert self.dev.pending() == 0


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
    h = Harness(mem, 4)
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


@pytest.mark.parametrize("size", [1, 2, 8, 64])
def test_many_wraps_in_order(mem: GuestMemory, size: int) -> None:
    rng = random.Random(size)
    h = Harness(mem, size)
    while h.next_token < 3000:
        while h.add(rng.randint(1, 3), rng.randint(0, 2)) is not None:
            pass
        h.drv.publish()
        h.pop_all()
        h.complete(list(h.popped), batch=rng.random() < 0.5)
        h.reap()
    h.drv.publish()
    h.pop_all()
    h.complete(list(h.popped))
    h.reap()
    h.check_all_done()


@pytest.mark.parametrize("event_idx", [False, True])
def test_index_wraps_past_65535(mem: GuestMemory, event_idx: bool) -> None:
    rng = random.Random(5)
    h = Harness(mem, 8, event_idx=event_idx, start_idx=0xFFF0)
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


@pytest.mark.parametrize("size", [4, 16, 32])
def test_out_of_order_completion(mem: GuestMemory, size: int) -> None:
    rng = random.Random(size * 7)
    h = Harness(mem, size)
    for _ in range(400):
        while h.add(rng.randint(1, 2), rng.randint(0, 3)) is not None:
            pass
        h.drv.publish()
        h.pop_all()
        chosen = rng.sample(h.popped, rng.randint(0, len(h.popped)))
        tokens = [int.from_bytes(c.read(mem)[:8], "little") for c in chosen]
        h.complete(chosen, batch=rng.random() < 0.5)
        assert [t for t, _ in h.reap()] == tokens
    h.complete(list(h.popped))
    h.reap()
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
    """The error repeats and the queue does not move past the bad chain."""
    position = dev.last_avail_idx
    for _ in range(2):
        with pytest.raises(exc):
            dev.pop()
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
    h = Harness(mem, 4)
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


@HYPO
@given(size_log=st.integers(0, 3), descs=st.lists(descriptor, min_size=8, max_size=8),
       table=st.lists(descriptor, min_size=4, max_size=4),
       heads=st.lists(st.integers(0, 9), min_size=8, max_size=8),
       last_avail=st.integers(0, 0xFFFF), ahead=st.integers(0, 12))
def test_fuzzed_ring_raises_only_ring_errors(mem: GuestMemory, size_log: int, descs: list,
                                             table: list, heads: list, last_avail: int,
                                             ahead: int) -> None:
    size = 1 << size_log
    layout = make_layout(size)
    SplitDriverQueue(mem, layout)
    mem.write(0x9000, b"".join(DESC.pack(*d) for d in table))
    for index in range(size):
        put_desc(mem, layout, index, *descs[index])
    make_avail(mem, layout, heads[:size] * 2, start=last_avail)
    mem.store_u16(layout.avail + 2, (last_avail + ahead) & 0xFFFF)
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


# -- event suppression ------------------------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(old=st.integers(0, 0xFFFF), count=st.integers(0, 0x8000), event=st.integers(0, 0xFFFF))
def test_need_event_matches_brute_force(old: int, count: int, event: int) -> None:
    new = (old + count) & 0xFFFF
    crossed = any((old + i) & 0xFFFF == event for i in range(count))
    assert need_event(event, new, old) == crossed


def test_flags_mode_suppression(mem: GuestMemory) -> None:
    h = Harness(mem, 4)
    assert h.drv.publish() is False
    h.add(1, 0)
    assert h.drv.publish() is True
    h.dev.set_notification(False)
    assert mem.load_u16(h.layout.used) == USED_F_NO_NOTIFY
    h.add(1, 0)
    assert h.drv.publish() is False
    h.dev.set_notification(True)
    h.add(1, 0)
    assert h.drv.publish() is True
    h.pop_all()
    assert h.dev.should_notify() is False
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is True
    assert h.dev.should_notify() is False
    h.drv.set_interrupts(False)
    assert mem.load_u16(h.layout.avail) == AVAIL_F_NO_INTERRUPT
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is False
    h.drv.set_interrupts(True)
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is True


def test_event_idx_kicks_and_interrupts(mem: GuestMemory) -> None:
    h = Harness(mem, 8, event_idx=True)
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
    h = Harness(mem, size, event_idx=size == 8)
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


# -- random interleavings ---------------------------------------------------------------------

add_op = st.tuples(st.just("add"), st.integers(1, 3), st.integers(0, 3))
pop_op = st.tuples(st.just("pop"), st.integers(1, 4))
push_op = st.tuples(st.just("push"), st.lists(st.integers(0, 1000), min_size=1, max_size=4),
                    st.booleans())
reap_op = st.tuples(st.just("reap"))
op = st.one_of(
    add_op, add_op, add_op, pop_op, pop_op, push_op, push_op, reap_op,
    st.tuples(st.just("publish")),
    st.tuples(st.just("notify")),
    st.tuples(st.just("dev_notify"), st.booleans()),
    st.tuples(st.just("drv_irq"), st.booleans()),
    st.tuples(st.just("restore")),
)


def run_interleaving(mem: GuestMemory, size: int, event_idx: bool, ops: list) -> None:
    """Every token completes once with its length, and no needed kick/interrupt is suppressed."""
    h = Harness(mem, size, event_idx=event_idx)
    dev_notify = drv_irq = True
    dev_idle = drv_idle = False
    unreaped = 0

    def notify() -> None:
        nonlocal drv_idle
        must = drv_idle and unreaped > 0
        fired = h.dev.should_notify()
        assert fired or not must, "used buffer notification lost"
        drv_idle = drv_idle and not fired

    for step in ops:
        kind = step[0]
        if kind == "add":
            h.add(step[1], step[2])
        elif kind == "publish":
            kicked = h.drv.publish()
            must = dev_idle and h.dev.pending() > 0
            assert kicked or not must, "available buffer notification lost"
            dev_idle = dev_idle and not kicked
        elif kind == "pop":
            for _ in range(step[1]):
                chain = h.dev.pop()
                if chain is None:
                    dev_idle = dev_notify
                    break
                h.popped.append(chain)
                dev_idle = False
        elif kind == "push" and h.popped:
            picks = dict.fromkeys(i % len(h.popped) for i in step[1])
            h.complete([h.popped[i] for i in picks], batch=step[2])
            unreaped += len(picks)
        elif kind == "notify":
            notify()
        elif kind == "reap":
            unreaped -= len(h.reap())
            assert unreaped == 0
            drv_idle = drv_irq
        elif kind == "dev_notify":
            h.dev.set_notification(step[1])
            dev_notify, dev_idle = step[1], False
        elif kind == "drv_irq":
            h.drv.set_interrupts(step[1])
            drv_irq, drv_idle = step[1], False
        elif kind == "restore":
            notify()
            h.restore_device()
            dev_idle = False
    for _ in range(3):
        h.drv.publish()
        h.pop_all()
        h.complete(list(h.popped))
        h.reap()
    h.check_all_done()


@HYPO
@given(size_log=st.integers(0, 4), event_idx=st.booleans(),
       ops=st.lists(op, min_size=20, max_size=200))
def test_random_interleavings(mem: GuestMemory, size_log: int, event_idx: bool, ops: list) -> None:
    run_interleaving(mem, 1 << size_log, event_idx, ops)


@pytest.mark.parametrize("seed", range(12))
def test_long_random_interleavings(mem: GuestMemory, seed: int) -> None:
    rng = random.Random(seed)
    ops: list = []
    for _ in range(3000):
        kind = rng.choices(["add", "publish", "pop", "push", "notify", "reap", "dev_notify",
                            "drv_irq", "restore"], [6, 2, 4, 4, 2, 3, 1, 1, 1])[0]
        if kind == "add":
            ops.append((kind, rng.randint(1, 3), rng.randint(0, 3)))
        elif kind == "pop":
            ops.append((kind, rng.randint(1, 4)))
        elif kind == "push":
            picks = [rng.randrange(1000) for _ in range(rng.randint(1, 4))]
            ops.append((kind, picks, rng.random() < 0.5))
        elif kind in ("dev_notify", "drv_irq"):
            ops.append((kind, rng.random() < 0.7))
        else:
            ops.append((kind,))
    run_interleaving(mem, rng.choice([1, 2, 4, 8, 16, 32]), seed % 2 == 0, ops)
