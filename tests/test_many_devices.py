"""Many devices stopped together (issue 14, goal 2: benchmarks/migration.py --section stop)."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import wait_until

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import MigrationError
from shadowvmm.guest.blk import BlkDriver, BlkOp
from shadowvmm.machine import Machine
from shadowvmm.migration.source import stop_all
from shadowvmm.shadow import RunState
from shadowvmm.virtio.constants import BlkRequestType


async def blk_machine(count: int, latency_us: int = 0) -> tuple[Machine, list[BlkDriver]]:
    machine = Machine(max(16, 2 * count) << 20)
    drivers = []
    for i in range(count):
        await machine.add_device(DeviceConfig(f"blk{i}", "inproc", {"device": "blk", "size": 1 << 20,
                                                                    "latency_us": latency_us}, queue_size=16))
        driver = BlkDriver(machine.guest(f"blk{i}"), max_request=4096, slots_per_queue=4)
        await driver.start(queue_size=16)
        drivers.append(driver)
    return machine, drivers


async def test_a_kick_while_suspended_waits_for_the_resume() -> None:
    """A suspended in-process backend processes nothing the guest publishes (its kick fds are
    not watched) until the resume, which takes what was published meanwhile."""
    machine, (driver,) = await blk_machine(1)
    device = machine.device("blk0")
    backend = device.backend
    assert isinstance(backend, InProcBackend)
    try:
        await device.stop()
        before = backend.requests
        write = asyncio.ensure_future(driver.write(0, b"\x5a" * 4096))
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert backend.requests == before and not write.done()
        assert device.stats.kicks >= 1
        await device.resume()
        await asyncio.wait_for(write, 2)
        assert backend.requests == before + 1
        assert await driver.read(0, 4096) == b"\x5a" * 4096
    finally:
        await machine.close()


async def test_stop_all_stops_every_device_with_requests_in_flight_and_times_each() -> None:
    machine, drivers = await blk_machine(16, latency_us=200_000)
    devices = {name: slot.device for name, slot in machine.slots.items()}
    try:
        batches = [asyncio.ensure_future(d.submit([BlkOp(BlkRequestType.OUT, 8 * k, data=bytes([k]) * 4096)
                                                   for k in range(2)])) for d in drivers]

        def in_flight() -> int:
            return sum(r.in_flight for d in devices.values() if isinstance(d.backend, InProcBackend)
                       for r in d.backend.rings.values())
        await wait_until(lambda: in_flight() == 32, what="every device's 2 requests taken")
        times = await stop_all(devices, 5.0, time.perf_counter)
        assert sorted(times) == sorted(devices)
        assert all(0.02 < t < 5.0 for t in times.values()), times
        for device in devices.values():
            assert device.run_state is RunState.STOPPED and not device.rings_running
            assert isinstance(device.backend, InProcBackend)
            assert all(r.in_flight == 0 for r in device.backend.rings.values())
        await asyncio.gather(*(d.resume() for d in devices.values()))
        await asyncio.wait_for(asyncio.gather(*batches), 2)
    finally:
        await machine.close()


async def test_stop_all_reports_a_device_that_fails_its_stop() -> None:
    machine, _ = await blk_machine(3)
    devices = {name: slot.device for name, slot in machine.slots.items()}
    backend = devices["blk1"].backend
    assert isinstance(backend, InProcBackend)

    async def broken() -> None:
        raise OSError("suspend refused")

    backend.suspend = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(MigrationError, match="blk1"):
            await stop_all(devices, 5.0, time.perf_counter)
        assert devices["blk0"].run_state is RunState.STOPPED and devices["blk2"].run_state is RunState.STOPPED
        assert devices["blk1"].failed()
    finally:
        await machine.close()


async def test_stop_all_waits_for_a_late_device_and_names_it_over_a_failed_one() -> None:
    """One device misses the bound and another fails: stop_all still waits for the late stop
    to end (never cancelling it midway), then names the late device; the rest stopped."""
    from shadowvmm.errors import StopTimeoutError

    machine, _ = await blk_machine(4)
    devices = {name: slot.device for name, slot in machine.slots.items()}
    slow, broken = devices["blk1"].backend, devices["blk2"].backend
    assert isinstance(slow, InProcBackend) and isinstance(broken, InProcBackend)
    slow_suspend = slow.suspend
    finished: list[str] = []

    async def late() -> None:
        await asyncio.sleep(0.3)
        await slow_suspend()
        finished.append("blk1")

    async def refused() -> None:
        raise OSError("suspend refused")

    slow.suspend = late  # type: ignore[method-assign]
    broken.suspend = refused  # type: ignore[method-assign]
    try:
        with pytest.raises(StopTimeoutError) as info:
            await stop_all(devices, 0.1, time.perf_counter)
        assert "blk1" in str(info.value) and "blk2" not in str(info.value)
        assert finished == ["blk1"] and devices["blk1"].run_state is RunState.STOPPED
        assert devices["blk0"].run_state is RunState.STOPPED and devices["blk3"].run_state is RunState.STOPPED
        assert devices["blk2"].failed()
    finally:
        await machine.close()
