"""Reserved descriptor chains (split ring) and :meth:`BlkDriver.pipeline` on them."""

from __future__ import annotations

import asyncio
import random

import pytest
from helpers import wait_until

from shadowvmm.config import DeviceConfig
from shadowvmm.errors import DeviceStateError, RingError
from shadowvmm.guest.blk import BlkDriver, BlkIOError, BlkOp
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.constants import BlkRequestType
from shadowvmm.virtio.split import SplitDeviceQueue, SplitDriverQueue, SplitLayout

SECTOR = 512
DISK = 8 << 20


@pytest.fixture
def memories():
    made: list[GuestMemory] = []
    yield made
    for memory in made:
        memory.close()


def ring_pair(size: int = 16) -> tuple[GuestMemory, SplitDriverQueue, SplitDeviceQueue]:
    memory = GuestMemory.create([(0, 1 << 20)])
    d, a, _ = SplitLayout.area_sizes(size)
    layout = SplitLayout(size, 0x1000, 0x1000 + d, (0x1000 + d + a + 3) & ~3)
    return memory, SplitDriverQueue(memory, layout), SplitDeviceQueue(memory, layout)


def test_reserved_chain_is_reused_without_touching_the_free_list(memories: list[GuestMemory]) -> None:
    memory, drv, dev = ring_pair()
    memories.append(memory)
    chain = drv.reserve([(0x80000, 16)], [(0x81000, 4096), (0x80010, 1)])
    assert len(chain) == 3 and drv.num_free == 13
    for round_ in range(40):                    # wraps the 16-entry avail ring twice
        if round_ % 2:      # data descriptor device-readable, of a varying length
            drv.rewrite(chain[1], 0x81000, 512 * (round_ % 8 + 1), 1, chain[2])
        elif round_:        # back to device-writable, 4 KiB
            drv.rewrite(chain[1], 0x81000, 4096, 3, chain[2])
        drv.post([chain[0]], [f"tag{round_}"])
        drv.publish()
        popped = dev.pop()
        assert popped is not None and popped.head == chain[0]
        want = 512 * (round_ % 8 + 1) if round_ % 2 else 4096
        if round_ % 2:
            assert [len_ for _, len_ in popped.readable] == [16, want]
        else:
            assert [len_ for _, len_ in popped.writable] == [want, 1]
        dev.push(popped.head, 1)
        assert drv.has_used()
        assert drv.get_used() == [(f"tag{round_}", 1)]
        assert not drv.has_used()
    assert drv.num_free == 13
    drv.release(chain)
    assert drv.num_free == 16


def test_reserved_and_dynamic_chains_share_a_ring(memories: list[GuestMemory]) -> None:
    memory, drv, dev = ring_pair()
    memories.append(memory)
    chain = drv.reserve([(0x80000, 16)], [(0x80010, 1)])
    drv.add([(0x82000, 8)], [(0x83000, 8)], "dynamic")
    drv.post([chain[0]], ["reserved"])
    drv.publish()
    first, second = dev.pop(), dev.pop()
    assert first is not None and second is not None
    dev.push(second.head, 1)
    dev.push(first.head, 8)
    assert drv.get_used() == [("reserved", 1), ("dynamic", 8)]
    assert drv.num_free == 14          # the dynamic chain is free again, the reserved one is kept


def test_reserved_chain_misuse_is_refused(memories: list[GuestMemory]) -> None:
    memory, drv, _ = ring_pair(4)
    memories.append(memory)
    chain = drv.reserve([(0x80000, 16)], [(0x80010, 1)])
    drv.post([chain[0]], ["once"])
    with pytest.raises(RingError, match="already available"):
        drv.post([chain[0]], ["twice"])
    with pytest.raises(RingError, match="still available"):
        drv.release(chain)
    with pytest.raises(RingError, match="need 3 descriptors"):
        drv.reserve([(0x80000, 16)], [(0x81000, 8), (0x80010, 1)])


async def blk_machine(*, packed: bool = False, latency_us: int = 0):
    machine = Machine(32 << 20)
    options = {"device": "blk", "size": DISK}
    if latency_us:
        options["latency_us"] = latency_us
    await machine.add_device(DeviceConfig("blk0", "inproc", options))
    guest = machine.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start(packed=packed)
    return machine, guest, driver


async def all_retired(q, timeout: float = 1.0) -> None:
    """Wait until the pipeline's tags still in flight have completed and been retired."""
    await wait_until(lambda: q.on_used is None, timeout=timeout, interval=0.005,
                     what="the pipeline's tags to be retired")


async def test_pipeline_moves_mixed_requests(ring_layout: str) -> None:
    """Split rings complete by tag, packed rings by future."""
    machine, guest, driver = await blk_machine(packed=ring_layout == "packed")
    try:
        rng = random.Random(7)
        expected: dict[int, bytes] = {}
        writes = []
        for i in range(300):
            sector = rng.randrange(DISK // SECTOR - 16)
            if any(abs(sector - other) < 16 for other in expected):
                continue
            data = bytes([i & 0xFF]) * (SECTOR * rng.choice((1, 2, 8, 16)))
            expected[sector] = data
            writes.append(BlkOp(BlkRequestType.OUT, sector, data=data))
        writes.insert(50, BlkOp(BlkRequestType.FLUSH))
        assert await driver.pipeline(writes, 24) == len(writes)
        got: dict[int, bytes] = {}
        ids: list[bytes] = []

        def sink(op: BlkOp, data: bytes) -> None:
            got[op.sector] = data

        reads = [BlkOp(BlkRequestType.IN, s, length=len(d)) for s, d in expected.items()]
        reads.insert(10, BlkOp(BlkRequestType.GET_ID))
        assert await driver.pipeline(reads, 32, sink=lambda op, data: (
            ids.append(data) if op.kind == BlkRequestType.GET_ID else sink(op, data))) == len(reads)
        assert got == expected
        ring = driver.queue().ring
        assert ring.num_free == ring.size and ring.in_flight == 0
        assert driver.queue().on_used is None
        assert await driver.get_id() == "shadowvmm-blk"
    finally:
        guest.close()
        await machine.close()


async def test_pipeline_error_retires_in_flight_tags_as_they_complete() -> None:
    machine, guest, driver = await blk_machine(latency_us=2000)
    try:
        ops = [BlkOp(BlkRequestType.IN, 8 * i, length=4096) for i in range(20)]
        ops[3] = BlkOp(BlkRequestType.IN, DISK // SECTOR, length=4096)     # beyond the disk
        with pytest.raises(BlkIOError):
            await driver.pipeline(ops, 8)
        q = driver.queue()
        await all_retired(q)
        assert q.on_used is None and q.ring.num_free == q.ring.size
        assert len(driver._slots[0]) == driver.slots_per_queue
        assert await driver.read(0, 4096) == bytes(4096)
    finally:
        guest.close()
        await machine.close()


async def test_pipeline_refuses_an_oversized_request_and_loses_nothing() -> None:
    machine, guest, driver = await blk_machine(latency_us=2000)
    try:
        ops = [BlkOp(BlkRequestType.OUT, 8 * i, data=bytes([i]) * 4096) for i in range(5)]
        ops.append(BlkOp(BlkRequestType.IN, 0, length=driver.max_request + SECTOR))
        with pytest.raises(DeviceStateError, match="limit"):
            await driver.pipeline(ops, 8)
        q = driver.queue()
        # The five writes before it went out (with their kick) and retire as they complete.
        assert q.ring.in_flight == 5 and q.on_used is not None
        await all_retired(q)
        assert q.on_used is None and q.ring.num_free == q.ring.size
        for i in range(5):
            assert await driver.read(8 * i, 4096) == bytes([i]) * 4096
    finally:
        guest.close()
        await machine.close()


async def test_submit_alongside_a_pipeline_on_the_same_queue() -> None:
    machine, guest, driver = await blk_machine(latency_us=200)
    try:
        reads = (BlkOp(BlkRequestType.IN, 8 * (i % 64), length=4096) for i in range(400))
        run = asyncio.ensure_future(driver.pipeline(reads, 16))
        for i in range(10):
            await driver.write(2048 + 8 * i, bytes([0xA0 + i]) * 4096)
        assert await run == 400
        with pytest.raises(DeviceStateError, match="already runs"):
            driver.queue().on_used = lambda used: None
            await driver.pipeline([BlkOp(BlkRequestType.FLUSH)], 1)
        driver.queue().on_used = None
        for i in range(10):
            assert await driver.read(2048 + 8 * i, 4096) == bytes([0xA0 + i]) * 4096
    finally:
        guest.close()
        await machine.close()


async def test_write_past_the_end_is_an_io_error_and_changes_nothing() -> None:
    machine, guest, driver = await blk_machine()
    try:
        backend = machine.device("blk0").backend
        with pytest.raises(BlkIOError):
            await driver.write(DISK // SECTOR - 4, b"x" * 4096)     # 2 KiB past the end
        assert len(backend.model.image) == DISK
        await driver.write(DISK // SECTOR - 8, b"y" * 4096)         # the last 4 KiB
        assert await driver.read(DISK // SECTOR - 8, 4096) == b"y" * 4096
    finally:
        guest.close()
        await machine.close()
