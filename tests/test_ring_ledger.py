"""The split-ring ledger: exact outstanding heads under out-of-order completion, and the repack
that lets a fresh back-end resume a ring a dead one left (no request lost, none completed twice)."""

from __future__ import annotations

import random

import pytest

from shadowvmm.memory import GuestAllocator, GuestMemory
from shadowvmm.virtio.ledger import SplitLedger
from shadowvmm.virtio.split import SplitDeviceQueue, SplitDriverQueue, SplitLayout

MEMORIES: list[GuestMemory] = []


@pytest.fixture(autouse=True)
def close_memories():
    yield
    while MEMORIES:
        MEMORIES.pop().close()


def ring(size: int):
    memory = GuestMemory.create([(0, 1 << 20)])
    MEMORIES.append(memory)
    alloc = GuestAllocator(memory, start=0x1000)
    d, a, u = SplitLayout.area_sizes(size)
    layout = SplitLayout(size, alloc.alloc(d, 16), alloc.alloc(a, 2), alloc.alloc(u, 4))
    buf = alloc.alloc(64 * size, 64)
    return memory, layout, SplitDriverQueue(memory, layout), buf


def crash_and_resume(seed: int, size: int, steps: int, sample_every: int) -> None:
    """Random driver/device interleaving with out-of-order completion, then a 'crash': the
    device's fetched-but-unused requests vanish with it; a new device starts at repack()."""
    rnd = random.Random(seed)
    memory, layout, driver, buf = ring(size)
    device = SplitDeviceQueue(memory, layout)
    ledger = SplitLedger(memory, layout, 0)
    fetched: list[int] = []            # popped by the device, not yet used
    completed: dict[int, int] = {}     # token -> completions seen by the driver
    submitted = 0
    for step in range(steps):
        action = rnd.random()
        if action < 0.4 and driver.num_free:
            driver.add([(buf + 64 * (submitted % size), 16)], [], submitted)
            submitted += 1
            if rnd.random() < 0.5:
                driver.publish()
        elif action < 0.7:
            while (chain := device.pop()) is not None and rnd.random() < 0.8:
                fetched.append(chain.head)
            if chain is not None:
                fetched.append(chain.head)
        elif fetched:
            rnd.shuffle(fetched)                 # out of order
            k = rnd.randint(1, len(fetched))
            device.push_batch([(head, 0) for head in fetched[:k]])
            del fetched[:k]
        for token, _ in driver.get_used():
            completed[token] = completed.get(token, 0) + 1
        if step % sample_every == 0:
            ledger.sample()
    driver.publish()
    base = ledger.repack()
    assert base is not None, "the ledger lost track although it was sampled often enough"
    fresh = SplitDeviceQueue(memory, layout, last_avail_idx=base)
    while (chain := fresh.pop()) is not None:
        fresh.push(chain.head, 0)
    for token, _ in driver.get_used():
        completed[token] = completed.get(token, 0) + 1
    assert sorted(completed) == list(range(submitted)), "a request was lost"
    assert set(completed.values()) == {1}, "a request completed twice"
    assert driver.in_flight == 0


@pytest.mark.parametrize("seed", range(40))
def test_repack_resumes_exactly_once(seed: int) -> None:
    crash_and_resume(seed, size=16, steps=400, sample_every=3)


def test_ledger_loses_track_when_sampled_too_rarely_and_recovers_when_quiet() -> None:
    memory, layout, driver, buf = ring(8)
    device = SplitDeviceQueue(memory, layout)
    ledger = SplitLedger(memory, layout, 0)
    for i in range(20):                 # more than a ring's worth between two samples
        driver.add([(buf, 16)], [], i)
        driver.publish()
        chain = device.pop()
        assert chain is not None
        device.push(chain.head, 0)
        driver.get_used()
    driver.add([(buf, 16)], [], 99)
    driver.publish()
    assert not ledger.sample() and ledger.repack() is None
    chain = device.pop()
    assert chain is not None
    device.push(chain.head, 0)
    driver.get_used()
    assert ledger.sample(), "a quiet ring (avail idx == used idx) is known exactly"
    assert ledger.pending() == [] and ledger.repack() == ledger.used_idx


def test_ledger_started_behind_the_base_is_lost_until_quiet() -> None:
    memory, layout, driver, buf = ring(8)
    driver.add([(buf, 16)], [], 0)
    driver.publish()
    ledger = SplitLedger(memory, layout, base=1)   # one request fetched by a previous back-end
    assert not ledger.exact and ledger.repack() is None


def test_completion_of_an_unknown_head_is_lost_not_guessed() -> None:
    memory, layout, driver, buf = ring(8)
    ledger = SplitLedger(memory, layout, 0)
    memory.store_u32(layout.used + 4, 5)           # a used entry for a head never made available
    memory.store_u16(layout.used + 2, 1)
    memory.store_u16(layout.avail + 2, 2)           # heads 0 and 0 made available
    assert not ledger.sample() and ledger.repack() is None
