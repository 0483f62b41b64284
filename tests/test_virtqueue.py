"""Both virtqueue layouts, one suite: round trips across many wraps, out-of-order completion,
flag-mode notification suppression and random driver/device interleavings, for the split
(v1.4 §2.7) and packed (§2.8) rings. Layout-specific tests stay in test_split_ring.py and
test_packed_ring.py."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import by_layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rings import HARNESSES, MEM_SIZE, Harness, make_harness

from shadowvmm.memory import GuestMemory

HYPO = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory.create([(0, MEM_SIZE)])
    yield memory
    memory.close()


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("ring_layout,size", by_layout(split=[1, 2, 8, 64], packed=[1, 3, 8, 13, 64]),
                         indirect=["ring_layout"])
def test_many_wraps_in_order(mem: GuestMemory, ring_layout: str, size: int) -> None:
    rng = random.Random(size)
    h = make_harness(ring_layout, mem, size)
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


@pytest.mark.parametrize("ring_layout,size", by_layout(split=[4, 16, 32], packed=[5, 16, 31]),
                         indirect=["ring_layout"])
def test_out_of_order_completion(mem: GuestMemory, ring_layout: str, size: int) -> None:
    rng = random.Random(size * 7)
    h = make_harness(ring_layout, mem, size)
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
    h.pop_all()
    h.complete(list(h.popped))
    h.reap()
    h.check_all_done()


# -- event suppression ------------------------------------------------------------------------

def test_flags_mode_suppression(mem: GuestMemory, ring_layout: str) -> None:
    h = make_harness(ring_layout, mem, 4)
    assert h.drv.publish() is False
    h.add(1, 0)
    assert h.drv.publish() is True
    h.dev.set_notification(False)
    h.assert_kicks(False)
    h.add(1, 0)
    assert h.drv.publish() is False
    h.dev.set_notification(True)
    h.assert_kicks(True)
    h.add(1, 0)
    assert h.drv.publish() is True
    h.pop_all()
    assert h.dev.should_notify() is False
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is True
    assert h.dev.should_notify() is False
    h.drv.set_interrupts(False)
    h.assert_interrupts(False)
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is False
    h.drv.set_interrupts(True)
    h.complete([h.popped[0]])
    assert h.dev.should_notify() is True


# -- random interleavings ---------------------------------------------------------------------

add_op = st.tuples(st.just("add"), st.integers(1, 3), st.integers(0, 3), st.booleans())
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

#: Ring sizes for the random interleavings: a split ring's is a power of 2.
SIZES = {"split": st.integers(0, 4).map(lambda n: 1 << n), "packed": st.integers(1, 9)}
LONG_SIZES = {"split": [1, 2, 4, 8, 16, 32], "packed": [1, 2, 5, 7, 8, 16, 33]}


class Interleaving:
    """Runs driver/device steps and checks that no needed kick or interrupt is suppressed."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.dev_notify = self.drv_irq = True
        self.dev_idle = self.drv_idle = False
        self.unreaped = 0

    def notify(self) -> None:
        must = self.drv_idle and self.unreaped > 0
        fired = self.h.dev.should_notify()
        assert fired or not must, "used buffer notification lost"
        self.drv_idle = self.drv_idle and not fired

    def step(self, kind: str, *args: Any) -> None:
        h = self.h
        if kind == "add":
            indirect = len(args) > 2 and args[2]
            h.add(args[0], args[1], indirect=indirect and h.SUPPORTS_INDIRECT)
        elif kind == "publish":
            kicked = h.drv.publish()
            must = self.dev_idle and h.dev.pending() > 0
            assert kicked or not must, "available buffer notification lost"
            self.dev_idle = self.dev_idle and not kicked
        elif kind == "pop":
            self.pop(args[0])
        elif kind == "push" and h.popped:
            picks = dict.fromkeys(i % len(h.popped) for i in args[0])
            h.complete([h.popped[i] for i in picks], batch=args[1])
            self.unreaped += len(picks)
        elif kind == "notify":
            self.notify()
        elif kind == "reap":
            self.unreaped -= len(h.reap())
            assert self.unreaped == 0
            self.drv_idle = self.drv_irq
        elif kind == "dev_notify":
            h.dev.set_notification(args[0])
            self.dev_notify, self.dev_idle = args[0], False
        elif kind == "drv_irq":
            h.drv.set_interrupts(args[0])
            self.drv_irq, self.drv_idle = args[0], False
        elif kind == "restore" and h.can_restore():
            self.notify()
            h.restore_device()
            self.dev_idle = False

    def pop(self, count: int) -> None:
        for _ in range(count):
            chain = self.h.dev.pop()
            if chain is None:
                self.dev_idle = self.dev_notify
                return
            self.h.popped.append(chain)
            self.dev_idle = False

    def finish(self) -> None:
        h = self.h
        for _ in range(3):
            h.drv.publish()
            h.pop_all()
            h.complete(list(h.popped))
            h.reap()
        h.check_all_done()


def run_interleaving(h: Harness, ops: list) -> None:
    """Every token completes once with its length, and no needed kick/interrupt is suppressed."""
    run = Interleaving(h)
    for step in ops:
        run.step(*step)
    run.finish()


@HYPO
@given(data=st.data(), event_idx=st.booleans(), ops=st.lists(op, min_size=20, max_size=200))
def test_random_interleavings(mem: GuestMemory, ring_layout: str, data: st.DataObject, event_idx: bool,
                              ops: list) -> None:
    size = data.draw(SIZES[ring_layout], label="size")
    run_interleaving(make_harness(ring_layout, mem, size, event_idx=event_idx), ops)


@pytest.mark.parametrize("seed", range(12))
def test_long_random_interleavings(mem: GuestMemory, ring_layout: str, seed: int) -> None:
    indirect = HARNESSES[ring_layout].SUPPORTS_INDIRECT
    rng = random.Random(seed)
    ops: list = []
    for _ in range(3000):
        kind = rng.choices(["add", "publish", "pop", "push", "notify", "reap", "dev_notify",
                            "drv_irq", "restore"], [6, 2, 4, 4, 2, 3, 1, 1, 1])[0]
        if kind == "add":
            n_out, n_in = rng.randint(1, 3), rng.randint(0, 3)
            ops.append((kind, n_out, n_in, rng.random() < 0.2) if indirect else (kind, n_out, n_in))
        elif kind == "pop":
            ops.append((kind, rng.randint(1, 4)))
        elif kind == "push":
            picks = [rng.randrange(1000) for _ in range(rng.randint(1, 4))]
            ops.append((kind, picks, rng.random() < 0.5))
        elif kind in ("dev_notify", "drv_irq"):
            ops.append((kind, rng.random() < 0.7))
        else:
            ops.append((kind,))
    size = rng.choice(LONG_SIZES[ring_layout])
    run_interleaving(make_harness(ring_layout, mem, size, event_idx=seed % 2 == 0), ops)
