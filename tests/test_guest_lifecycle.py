"""The guest model's lifecycle: interrupt readers and guest memory across close, device reset
and per-queue reset (virtio v1.4 §2.6.1), and waiting for the device to act on DRIVER_OK."""

from __future__ import annotations

import asyncio
import os

import pytest
from helpers import wait_for_count

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import BackendError, DeviceStateError, GuestMemoryError, RingError
from shadowvmm.guest.blk import BlkDriver, BlkOp
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestAllocator, GuestMemory
from shadowvmm.virtio.constants import BlkRequestType, Feature, Status

MiB = 1 << 20
DISK = 4 * MiB
SECTOR = 512


async def blk_machine(memory: int = 32 * MiB, *, transport: str = "pci", latency_us: int = 0,
                      backend: InProcBackend | None = None) -> Machine:
    machine = Machine(memory)
    options: dict = {"device": "blk", "size": DISK, "queues": 2}
    if latency_us:
        options["latency_us"] = latency_us
    await machine.add_device(DeviceConfig("blk0", "inproc", options, transport=transport), backend)
    return machine


def pending(queue, count: int) -> list[asyncio.Future]:
    """*count* GET_ID requests added to *queue* and never kicked: the device never sees them."""
    dev = queue.device
    futures = []
    for _ in range(count):
        header, data = dev.alloc.alloc(16), dev.alloc.alloc(21)
        dev.memory.write(header, (8).to_bytes(4, "little") + bytes(12))
        futures.append(queue.add([(header, 16)], [(data, 20), (data + 20, 1)]))
    return futures


# ---------------------------------------------------------------------------- allocator


@pytest.fixture
def memory():
    mem = GuestMemory.create([(0, MiB), (2 * MiB, MiB)], name="alloc")
    yield mem
    mem.close()


def test_allocator_first_fit_reuses_and_coalesces(memory):
    alloc = GuestAllocator(memory, start=0x1000, end=0x9000)
    total = alloc.free_bytes
    assert total == 0x8000
    a, b, c = alloc.alloc(0x1000), alloc.alloc(0x1000), alloc.alloc(0x1000)
    assert (a, b, c) == (0x1000, 0x2000, 0x3000)
    assert alloc.free_bytes == total - 0x3000
    memory.write(b, b"\xaa" * 0x1000)
    alloc.free(b)
    assert alloc.alloc(0x800) == b                    # first fit: the hole left by b
    assert memory.read(b, 0x800) == bytes(0x800)      # zeroed again
    alloc.free(b)
    alloc.free(a)                                     # merges with the hole after it
    alloc.free(c)                                     # ...and with the tail: one block again
    assert alloc.free_bytes == total and alloc.allocations == 0
    assert alloc.alloc(0x8000) == 0x1000              # the whole range in one piece


def test_allocator_alignment_padding_goes_back_with_the_block(memory):
    alloc = GuestAllocator(memory, start=0x1008, end=0x4000)
    total = alloc.free_bytes
    first = alloc.alloc(8, align=1)
    aligned = alloc.alloc(0x100, align=0x1000)
    assert first == 0x1008 and aligned == 0x2000
    assert alloc.free_bytes == total - (0x2100 - 0x1008)
    alloc.free(aligned)
    alloc.free(first)
    assert alloc.free_bytes == total
    assert alloc.alloc(0x2FF8, align=8) == 0x1008


def test_allocator_refuses_double_free_unknown_and_straddling(memory):
    alloc = GuestAllocator(memory, start=0x1000)
    gpa = alloc.alloc(64)
    with pytest.raises(GuestMemoryError, match="not an allocated block"):
        alloc.free(gpa + 16)                          # inside a block, not its address
    alloc.free(gpa)
    with pytest.raises(GuestMemoryError, match="not an allocated block"):
        alloc.free(gpa)
    with pytest.raises(GuestMemoryError, match="bad allocation"):
        alloc.alloc(16, align=24)
    straddle = GuestAllocator(memory, start=MiB - 0x100)
    free = straddle.free_bytes
    with pytest.raises(GuestMemoryError):
        straddle.alloc(0x200)                         # across the hole after the first region
    assert straddle.free_bytes == free and straddle.allocations == 0


# ---------------------------------------------------------------------------- bug 1: close


async def test_machine_close_detaches_guest_interrupts_from_reused_fds():
    """A guest left open when its machine closes must not keep readers on the eventfd
    numbers the next device in this event loop gets."""
    first = await blk_machine()
    guest = first.guest("blk0")
    driver = BlkDriver(guest, slots_per_queue=4)
    await driver.start()
    await driver.write(0, b"a" * 4096)
    fds = list(first.device("blk0").interrupts.vector_fds)
    await first.close()                               # the test never closes `guest`

    second = await blk_machine()
    try:
        assert set(fds) & set(second.device("blk0").interrupts.vector_fds)   # the fds are reused
        driver = BlkDriver(second.guest("blk0"), slots_per_queue=4)
        await driver.start()
        await asyncio.wait_for(driver.write(8, b"b" * 4096), 2)
        assert await asyncio.wait_for(driver.read(8, 4096), 2) == b"b" * 4096
    finally:
        await second.close()
    assert guest._readers == []


async def test_guest_close_is_idempotent():
    machine = await blk_machine()
    try:
        guest = machine.guest("blk0")
        driver = BlkDriver(guest, slots_per_queue=4)
        await driver.start()
        guest.hold_interrupts()
        guest.close()
        guest.close()
        guest.release_interrupts()                    # a closed guest takes no interrupts again
        assert guest._readers == []
        owned = guest.alloc.allocations
        assert owned and machine.allocator.allocations == owned     # live queues keep their memory
        await guest.reset()
        assert guest.alloc.allocations == 0 and machine.allocator.allocations == 0
        guest.alloc.alloc(4096)
        guest.close()                                 # nothing live: close gives memory back
        assert machine.allocator.allocations == 0
    finally:
        await machine.close()


# ---------------------------------------------------------------------------- bug 2: memory


async def test_reinit_gives_guest_memory_back():
    """200 blk re-initialisations on 64 MiB (each takes ~4 MiB of slots and rings)."""
    machine = await blk_machine(64 * MiB)
    try:
        guest = machine.guest("blk0")
        driver = BlkDriver(guest)
        free = machine.allocator.free_bytes
        for round_ in range(200):
            await driver.start()
            assert machine.allocator.free_bytes < free - 4 * MiB
            data = bytes([round_ & 0xFF]) * 4096
            await driver.write(8 * (round_ % 64), data)
            assert await driver.read(8 * (round_ % 64), 4096) == data
            await guest.reset()
            assert machine.allocator.free_bytes == free
            assert machine.allocator.allocations == 0 and guest.alloc.allocations == 0
    finally:
        await machine.close()


# ---------------------------------------------------------------------------- bug 3: DRIVER_OK


class RefusingBackend(InProcBackend):
    """An inproc blk backend that refuses the ring addresses at device start."""

    async def set_vring_addr(self, addr) -> None:
        raise BackendError("vring address refused")


async def test_start_returns_once_the_backend_runs():
    machine = await blk_machine()
    try:
        device = machine.device("blk0")
        driver = BlkDriver(machine.guest("blk0"), slots_per_queue=4)
        await driver.start()
        assert device.started and device.rings_running
        assert all(ring.enabled for ring in device.backend.rings.values())
    finally:
        await machine.close()


async def test_start_raises_when_the_device_failed_to_start():
    machine = await blk_machine(backend=RefusingBackend({"device": "blk", "size": DISK}))
    try:
        guest = machine.guest("blk0")
        with pytest.raises(DeviceStateError, match="failed to start"):
            await BlkDriver(guest, slots_per_queue=4).start()
        assert guest.status() & Status.NEEDS_RESET
    finally:
        await machine.close()


async def test_started_hook_failure_is_chained():
    machine = await blk_machine()
    cause = BackendError("backend gone")

    async def settle() -> None:
        raise cause

    try:
        device = machine.device("blk0")
        assert device.interrupts is not None
        guest = GuestDevice(machine.guest_transport("blk0"), machine.memory, device.interrupts,
                            machine.allocator, settle=settle)
        try:
            with pytest.raises(DeviceStateError, match="failed to start") as info:
                await guest.initialize(0, queue_size=16)
            assert info.value.__cause__ is cause
        finally:
            guest.close()
    finally:
        await machine.close()


async def test_guest_without_a_settle_hook_waits_through_its_transport():
    """A driver core built by hand (no settle hook) still returns from initialize() only once
    the backend has started: the transport's settle is the default hook."""
    machine = await blk_machine()
    try:
        device = machine.device("blk0")
        assert device.interrupts is not None
        guest = GuestDevice(machine.guest_transport("blk0"), machine.memory, device.interrupts,
                            machine.allocator)
        try:
            await guest.initialize(0, queue_size=16)
            assert device.rings_running
            await guest.started()
            assert guest.status() & Status.DRIVER_OK
        finally:
            guest.close()
    finally:
        await machine.close()


# ---------------------------------------------------------------------------- bug 4: queue reset


async def test_reset_queue_fails_requests_frees_the_ring_and_restarts(transport: str):
    machine = await blk_machine(transport=transport)
    try:
        guest = machine.guest("blk0")
        driver = BlkDriver(guest, slots_per_queue=8)
        await driver.start(queue_size=64, extra_features=int(Feature.RING_RESET))
        assert guest.features & Feature.RING_RESET
        await driver.write(0, b"x" * 4096)
        old = guest.queues[0]
        stuck = pending(old, 3)
        before = machine.allocator.free_bytes
        await guest.reset_queue(0)
        for future in stuck:
            with pytest.raises(RingError, match="queue reset"):
                future.result()
        assert machine.allocator.free_bytes > before  # the ring went back (its buffers did not)
        assert old.reap() == 0
        with pytest.raises(DeviceStateError, match="is reset"):
            await driver.read(0, 4096)
        with pytest.raises(DeviceStateError, match="already reset"):
            await guest.reset_queue(0)
        fresh = await guest.restart_queue(0, queue_size=32)
        assert guest.queues[0] is fresh and fresh.size == 32 and fresh is not old
        assert len(driver._slots[0]) == 8
        assert await asyncio.wait_for(driver.read(0, 4096), 2) == b"x" * 4096
        await driver.write(8, b"y" * 4096)
        assert await driver.read(8, 4096) == b"y" * 4096
        assert await driver.read(0, 4096, queue=0) == b"x" * 4096
        with pytest.raises(DeviceStateError, match="not reset"):
            await guest.restart_queue(0)
    finally:
        await machine.close()


async def test_reset_queue_needs_ring_reset():
    machine = await blk_machine()
    try:
        guest = machine.guest("blk0")
        await BlkDriver(guest, slots_per_queue=4).start()
        with pytest.raises(DeviceStateError, match="RING_RESET"):
            await guest.reset_queue(0)
        with pytest.raises(DeviceStateError, match="no queue 5"):
            await guest.restart_queue(5)
    finally:
        await machine.close()


async def test_reset_queue_ends_a_running_pipeline_and_keeps_its_slots():
    machine = await blk_machine(latency_us=300)
    try:
        guest = machine.guest("blk0")
        driver = BlkDriver(guest, slots_per_queue=16)
        await driver.start(extra_features=int(Feature.RING_RESET))
        ops = (BlkOp(BlkRequestType.IN, 8 * (i % 64), length=4096) for i in range(100_000))
        run = asyncio.ensure_future(driver.pipeline(ops, 16))
        await wait_for_count(lambda: guest.queues[0].completed, 1, what="pipeline completions")
        assert not run.done()
        await guest.reset_queue(0)
        with pytest.raises(RingError):
            await asyncio.wait_for(run, 2)
        assert len(driver._slots[0]) == 16
        queue = await guest.restart_queue(0)
        assert queue.on_used is None and queue.on_drop is None
        assert await driver.pipeline([BlkOp(BlkRequestType.IN, 0, length=4096)] * 64, 16) == 64
        assert len(driver._slots[0]) == 16
    finally:
        await machine.close()


# ---------------------------------------------------------------------------- bug 5: device reset


async def test_device_reset_ends_pipeline_and_submit_and_start_works_again():
    machine = await blk_machine(latency_us=300)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        guest = machine.guest("blk0")
        driver = BlkDriver(guest, slots_per_queue=16)
        await driver.start()
        ops = (BlkOp(BlkRequestType.IN, 8 * (i % 64), length=4096) for i in range(100_000))
        run = asyncio.ensure_future(driver.pipeline(ops, 16))
        await wait_for_count(lambda: guest.queues[0].completed, 1, what="pipeline completions")
        old = guest.queues[1]
        stuck = pending(old, 2)
        await guest.reset()
        with pytest.raises(RingError):
            await asyncio.wait_for(run, 2)
        for future in stuck:
            with pytest.raises(RingError, match="device reset"):
                future.result()
        assert guest.queues == [] and old.reap() == 0
        device = machine.device("blk0")
        assert device.interrupts is not None
        os.eventfd_write(device.interrupts.vector_fds[2], 1)   # a late interrupt for queue 1
        await asyncio.sleep(0.01)                              # a while for it to be (not) handled
        await driver.start()
        assert await driver.pipeline([BlkOp(BlkRequestType.IN, 0, length=4096)] * 64, 16) == 64
        assert await driver.read(0, 4096, queue=1) == bytes(4096)
        assert {index: len(pool) for index, pool in driver._slots.items()} == {0: 16, 1: 16}
        assert errors == []
    finally:
        loop.set_exception_handler(None)
        await machine.close()
