"""Faults at every phase: the destination refuses, the source resumes, guest I/O loses nothing."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_for_count, wait_until

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import MigrationError, StreamError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import BlkLoad
from shadowvmm.migration.migrate import MigrationHooks, MigrationOptions, StopTimeoutError, migrate_in, migrate_out
from shadowvmm.migration.stream import Channel, Endpoint, RecordType, StreamHeader

MEMORY = 16 << 20


class FaultChannel:
    """Wraps the source's channel; at the first record of *rtype* it cuts, corrupts or truncates."""

    def __init__(self, inner: Channel, rtype: RecordType, fault: str) -> None:
        self.inner = inner
        self.duplex = inner.duplex
        self.rtype = rtype
        self.fault = fault
        self.fired = False

    async def send(self, data: bytes) -> None:
        if self.fired and self.fault != "corrupt":
            raise StreamError("connection cut by the fault injector")
        is_header = len(data) == StreamHeader.STRUCT.size and data.startswith(b"SVMMIGR")
        if not self.fired and not is_header and struct.unpack_from("<H", data)[0] == self.rtype:
            self.fired = True
            if self.fault == "corrupt":
                buf = bytearray(data)
                buf[-1] ^= 0x5A
                await self.inner.send(bytes(buf))
                return
            if self.fault == "truncate":
                await self.inner.send(data[:max(1, len(data) // 2)])
            await self.inner.close()
            raise StreamError("connection cut by the fault injector")
        await self.inner.send(data)

    async def recv_exactly(self, size: int) -> bytes:
        return await self.inner.recv_exactly(size)

    async def close(self) -> None:
        await self.inner.close()

    async def abort(self) -> None:
        await self.inner.abort()


@dataclass
class Rig:
    tmp: Path
    src: Machine
    dst: Machine
    load: BlkLoad


async def blk_machine(tmp: Path, latency_us: int = 200, devices: int = 1) -> Machine:
    machine = Machine(MEMORY * devices)
    for i in range(devices):
        backend = {"device": "blk", "image": str(tmp / f"disk{i}.img"), "size": 4 << 20, "queues": 2,
                   "latency_us": latency_us}
        await machine.add_device(DeviceConfig(f"blk{i}", "inproc", backend, queue_size=64))
    return machine


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    src = await blk_machine(tmp_path)
    dst = await blk_machine(tmp_path)
    guest = src.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start(queue_size=64)
    load = BlkLoad(driver, blocks_per_queue=128, depth=8, seed=3).start()
    rig = Rig(tmp_path, src, dst, load)
    try:
        yield rig
    finally:
        await load.stop()
        guest.close()
        await rig.dst.close()
        await src.close()


async def attempt(rig: Rig, rtype: RecordType | None, fault: str, options: MigrationOptions):
    endpoint = Endpoint.parse(f"unix:{rig.tmp / 'm.sock'}")
    listener = await endpoint.listen()

    async def incoming():
        return await migrate_in(rig.dst, await listener.accept(5), timeout=5)
    task = asyncio.ensure_future(incoming())
    channel = await endpoint.connect()
    if rtype is not None:
        channel = FaultChannel(channel, rtype, fault)
    try:
        with pytest.raises(MigrationError) as source_error:
            await migrate_out(rig.src, channel, options)
        with pytest.raises((MigrationError, StreamError)) as dest_error:
            await task
        return source_error.value, dest_error.value
    finally:
        await listener.close()


async def check_source_intact(rig: Rig) -> None:
    device = rig.src.device("blk0")
    assert device.run_state.value == "running" and device.rings_running
    assert rig.src.memory.dirty_log is None
    assert not rig.dst.device("blk0").started
    before = rig.load.completed
    await wait_for_count(lambda: rig.load.completed, before + 21, what="guest I/O continuing on the source")
    await rig.load.stop()
    assert rig.load.stats.errors == [] and rig.load.stats.read_mismatches == []
    assert await rig.load.verify() == []


PHASES = [RecordType.HELLO, RecordType.PAGES, RecordType.ROUND, RecordType.DEVICE, RecordType.END]


@pytest.mark.parametrize("fault", ["cut", "corrupt", "truncate"])
@pytest.mark.parametrize("rtype", PHASES, ids=[p.name for p in PHASES])
async def test_fault_at_each_phase(rig: Rig, rtype: RecordType, fault: str) -> None:
    await asyncio.sleep(0.05)
    source_error, dest_error = await attempt(rig, rtype, fault, MigrationOptions(mode="copy", max_rounds=3))
    if fault == "corrupt":
        assert "CRC32" in str(dest_error) and "refused" in str(source_error)
    elif fault == "truncate":
        assert "truncated" in str(dest_error)
    await check_source_intact(rig)


async def test_destination_refuses_incompatible_state(rig: Rig, tmp_path: Path) -> None:
    await rig.dst.close()
    rig.dst = Machine(MEMORY)
    backend = {"device": "blk", "image": str(tmp_path / "other.img"), "size": 8 << 20, "queues": 2}
    await rig.dst.add_device(DeviceConfig("blk0", "inproc", backend, queue_size=64))
    source_error, dest_error = await attempt(rig, None, "", MigrationOptions(mode="copy", max_rounds=2))
    assert "sectors" in str(dest_error) and "refused" in str(source_error)
    await check_source_intact(rig)


async def test_cancel_during_precopy_resumes_source(rig: Rig) -> None:
    endpoint = Endpoint.parse(f"unix:{rig.tmp / 'm.sock'}")
    listener = await endpoint.listen()
    async def dest():
        return await migrate_in(rig.dst, await listener.accept(5), timeout=5)
    dest_task = asyncio.ensure_future(dest())
    seen = asyncio.Event()
    options = MigrationOptions(mode="copy", max_rounds=100_000, converge_pages=-1)
    hooks = MigrationHooks(progress=lambda info: seen.set() if info.round >= 1 else None)
    source = asyncio.ensure_future(migrate_out(rig.src, await endpoint.connect(), options, hooks))
    await asyncio.wait_for(seen.wait(), 10)
    source.cancel()
    with pytest.raises(asyncio.CancelledError):
        await source
    with pytest.raises((MigrationError, StreamError)):
        await dest_task
    await listener.close()
    await check_source_intact(rig)


async def test_slow_device_abandons_migration_and_everything_resumes(tmp_path: Path) -> None:
    src = await blk_machine(tmp_path, latency_us=250_000, devices=2)
    dst = await blk_machine(tmp_path, devices=2)
    guests = [src.guest(f"blk{i}") for i in range(2)]
    drivers = [BlkDriver(g) for g in guests]
    try:
        for d in drivers:
            await d.start(queue_size=64)
        fast = src.device("blk1").backend
        assert isinstance(fast, InProcBackend)
        fast.latency = 0.0
        loads = [BlkLoad(d, blocks_per_queue=64, depth=4, seed=i).start() for i, d in enumerate(drivers)]
        await asyncio.sleep(0.3)
        endpoint = Endpoint.parse(f"unix:{tmp_path / 'm.sock'}")
        listener = await endpoint.listen()

        async def dest():
            return await migrate_in(dst, await listener.accept(5), timeout=5)
        dest_task = asyncio.ensure_future(dest())
        slow = src.device("blk0").backend
        assert isinstance(slow, InProcBackend)

        async def fresh_batch_in_flight() -> None:
            # The stop starts right after blk0's backend took a batch: its requests then have
            # ~250 ms to go, past the 0.1 s bound whatever phase of the load the precopy ended in
            # (a stop landing less than 0.1 s before a batch completed used to finish in time).
            taken = slow.requests
            await wait_until(lambda: slow.requests > taken, what="blk0 taking a new batch")

        with pytest.raises(StopTimeoutError) as info:
            await migrate_out(src, await endpoint.connect(), MigrationOptions(mode="copy", max_rounds=1,
                                                                                stop_timeout=0.1),
                              MigrationHooks(pause_guest=fresh_batch_in_flight))
        assert list(info.value.slow) == ["blk0"] and "resumed" in str(info.value)
        with pytest.raises(MigrationError):
            await dest_task
        await listener.close()
        assert all(src.device(f"blk{i}").rings_running for i in range(2))
        done = [load.completed for load in loads]
        await wait_until(lambda: all(load.completed > d for load, d in zip(loads, done)),
                         what="guest I/O on every device after the failed stop")
        for load in loads:
            await load.stop()
            assert load.stats.errors == [] and load.stats.read_mismatches == []
            assert await load.verify() == []
    finally:
        for g in guests:
            g.close()
        await dst.close()
        await src.close()


async def test_destination_takes_another_attempt_after_a_fault(rig: Rig) -> None:
    """A fault after the destination staged its start (HELLO carried the preview) leaves the
    destination devices untouched again: a second attempt into the same machine succeeds."""
    await asyncio.sleep(0.05)
    await attempt(rig, RecordType.DEVICE, "corrupt", MigrationOptions(mode="copy", max_rounds=3))
    ddev = rig.dst.device("blk0")
    assert not ddev.started and ddev._staged is None
    await rig.load.pause()          # vCPUs paused: the guest stays on the source's memory copy
    endpoint = Endpoint.parse(f"unix:{rig.tmp / 'm2.sock'}")
    listener = await endpoint.listen()
    try:
        async def accept_in():
            return await migrate_in(rig.dst, await listener.accept(5), timeout=5)
        incoming = asyncio.ensure_future(accept_in())
        report = await migrate_out(rig.src, await endpoint.connect(), MigrationOptions(mode="copy", max_rounds=3))
        await incoming
    finally:
        await listener.close()
    assert report.ok and ddev.rings_running and ddev.ring_states
