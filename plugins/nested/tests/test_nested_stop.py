"""L1 stops and resumes its L0 device in place under L2 I/O (SUSPEND at L0), the move refused on
the SUSPEND path and carried out when every ring is at its start, and the packed-ring state
derived from descriptor flags."""

from __future__ import annotations

import asyncio
import random

import pytest
from l1chain import L2_BASE, L2_SIZE, LIVE, nested_chain

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.device import DmaMapping
from shadowvmm.errors import RefusedError
from shadowvmm.memory import GuestMemory
from shadowvmm.shadow import RunState
from shadowvmm.virtio.constants import Status
from shadowvmm.virtio.packed import PackedDeviceQueue, PackedDriverQueue, PackedLayout
from shadowvmm.workload import StatusWatcher, blk_write_verify
from shadowvmm_nested import Phase, move_device, packed_state

SUSPENDING = LIVE | int(Status.SUSPEND)


@pytest.mark.parametrize("packed", [False, True])
async def test_l1_stops_and_resumes_its_l0_device_under_l2_io(packed: bool) -> None:
    async with nested_chain(config={"device": "blk", "latency_us": 300}, packed=packed) as c:
        inner = c.l0_device.backend
        assert isinstance(inner, InProcBackend)
        guest = c.driver.dev
        watcher = StatusWatcher(guest.status, interval=0).start()
        cycles: list[tuple[int, int]] = []
        finished = asyncio.Event()

        async def stopper() -> None:
            while len(cycles) < 4 and not finished.is_set():
                await asyncio.sleep(0.01)
                in_flight = sum(q.ring.in_flight for q in guest.queues)
                states = await c.device.stop()
                assert c.backend.phase is Phase.STOPPED and c.lower.status() & Status.SUSPEND
                assert not c.lower.status() & Status.DRIVER_OK
                # what L1 derived from guest memory is what L0's own backend reports
                exact = not c.backend.migration_blockers()
                assert exact or packed
                if exact:   # what L1 derived from guest memory is what L0's own backend reports
                    assert states[0] == c.l0_device.ring_states[0]
                before = inner.requests
                await asyncio.sleep(0.003)
                assert inner.requests == before          # nothing runs while suspended
                cycles.append((in_flight, states[0].base))
                await c.device.resume()
                assert c.backend.phase is Phase.RUNNING and c.lower.status() == LIVE

        task = asyncio.create_task(stopper())
        res = await blk_write_verify(c.driver, requests=400, queue_depth=8, block_bytes=4096, seed=3)
        finished.set()
        await task
        await watcher.stop()
        assert len(cycles) == 4 and any(in_flight for in_flight, _ in cycles)
        assert res.mismatches == []
        assert inner.requests == res.writes + res.reads == sum(q.completed for q in guest.queues)
        assert all(q.ring.in_flight == 0 for q in guest.queues)
        assert watcher.values == {LIVE} and watcher.reads > 50
        assert c.lower.writes.count(SUSPENDING) == 4
        assert c.device.faults.total == 0 and c.l0_device.faults.total == 0


async def test_move_on_the_suspend_path_is_refused_and_l2_sees_nothing() -> None:
    async with nested_chain(config={"device": "blk", "latency_us": 200}) as c:
        lower2 = await c.add_lower("vblk1", "inproc", {"device": "blk"})
        iommu2 = c.l0.iommu("vblk1")
        guest = c.driver.dev
        watcher = StatusWatcher(guest.status, interval=0).start()
        refusals: list[RefusedError] = []

        async def mover() -> None:
            await asyncio.sleep(0.02)
            with pytest.raises(RefusedError, match="SUSPEND offers no way to set ring bases") as info:
                await move_device(c.device, lower2, iommu2)
            refusals.append(info.value)

        task = asyncio.create_task(mover())
        res = await blk_write_verify(c.driver, requests=200, queue_depth=8, block_bytes=4096, seed=5)
        await task
        await watcher.stop()
        assert len(refusals) == 1 and "use the STOP dialect with ring-state registers" in str(refusals[0])
        assert res.mismatches == [] and watcher.values == {LIVE}
        old, new = c.l0_device.backend, c.l0.device("vblk1").backend
        assert isinstance(old, InProcBackend) and isinstance(new, InProcBackend)
        assert old.requests == res.writes + res.reads and new.requests == 0
        assert c.backend.lower is c.lower and c.device.run_state is RunState.RUNNING
        assert lower2.status() == 0 and not iommu2.translated          # the new device let go


async def test_move_with_every_ring_at_its_start_needs_no_base() -> None:
    """Nothing done yet: the fresh device's rings start where L2's stand; the move completes
    and L2's I/O goes to the new L0 device."""
    async with nested_chain() as c:
        lower2 = await c.add_lower("vblk1", "inproc", {"device": "blk"})
        iommu1, iommu2 = c.l0.iommu("vblk0"), c.l0.iommu("vblk1")
        await move_device(c.device, lower2, iommu2)
        assert c.backend.lower is lower2 and c.lower.status() == 0 and lower2.status() == LIVE
        assert not iommu1.translated and iommu2.mappings == [DmaMapping(0, L2_BASE, L2_SIZE)]
        await c.driver.write(7, b"\x77" * 4096)
        assert await c.driver.read(7, 4096) == b"\x77" * 4096
        old, new = c.l0_device.backend, c.l0.device("vblk1").backend
        assert isinstance(old, InProcBackend) and isinstance(new, InProcBackend)
        assert old.requests == 0 and new.requests == 2
        assert bytes(new.model.image[7 * 512:7 * 512 + 4096]) == b"\x77" * 4096
        seen = c.driver.dev.transport.status_log.values
        assert seen[seen.index(LIVE):] == [LIVE]        # L2 read DRIVER_OK throughout the move


async def test_packed_ring_state_from_descriptor_flags_matches_the_device() -> None:
    """Single-descriptor buffers over several laps, every buffer used: the state derived from
    the flags is the device's own (avail and used positions, wrap counters). Multi-descriptor
    chains and buffers the device never observed are flagged inexact."""
    memory = GuestMemory.create([(0, 1 << 20)])
    try:
        size = 8
        d, a, u = PackedLayout.area_sizes(size)
        layout = PackedLayout(size, 0x1000, 0x1000 + d, 0x1000 + d + a + 64)
        driver = PackedDriverQueue(memory, layout)
        device = PackedDeviceQueue(memory, layout)
        addr = type("Addr", (), {"index": 0, "desc": layout.desc})()
        rng = random.Random(1)
        for _ in range(12):
            for _ in range(rng.randint(1, 3)):
                driver.add([], [(0x20000, 1)], object())
            driver.publish()
            chains = []
            while (chain := device.pop()) is not None:
                chains.append((chain.head, 1))
            rng.shuffle(chains)
            device.push_batch(chains)
            driver.get_used()
            assert packed_state(memory, addr, size) == (device.ring_state(0), True)   # type: ignore[arg-type]
        # a buffer made available and never observed looks like a skipped chain tail: flagged
        driver.add([(0x10000, 16)], [(0x20000, 1)], object())
        driver.publish()
        derived = packed_state(memory, addr, size)   # type: ignore[arg-type]
        assert not derived.exact and derived.state != device.ring_state(0)
        # observed and used, it is still a chain of two: its tail is ambiguous, flagged too
        chain = device.pop()
        assert chain is not None
        device.push_batch([(chain.head, 1)])
        driver.get_used()
        derived = packed_state(memory, addr, size)   # type: ignore[arg-type]
        assert not derived.exact and derived.state == device.ring_state(0)
    finally:
        memory.close()
