"""The transparent VMM stop: the backend stops and resumes, the guest never notices."""

from __future__ import annotations

import asyncio

import pytest
from helpers import wait_for_count, wait_until

from shadowvmm.backends.base import RingState
from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import BackendError, DeviceStateError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.guest.rng import RngDriver
from shadowvmm.machine import Machine
from shadowvmm.shadow import RunState
from shadowvmm.virtio.constants import Status
from shadowvmm.workload import StatusWatcher, blk_write_verify

LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)


async def make_blk(queues: int = 2, latency_us: int = 1000, transport: str = "pci",
                   packed: bool = False):
    machine = Machine(48 << 20)
    device = await machine.add_device(DeviceConfig(
        "blk0", "inproc", {"device": "blk", "queues": queues, "latency_us": latency_us},
        transport=transport))
    guest = machine.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start(packed=packed)
    return machine, device, guest, driver


@pytest.mark.parametrize("transport,packed", [("pci", False), ("mmio", False), ("pci", True)])
async def test_stop_resume_under_continuous_io(transport: str, packed: bool) -> None:
    machine, device, guest, driver = await make_blk(transport=transport, packed=packed)
    backend: InProcBackend = device.backend
    watcher = StatusWatcher(guest.status, interval=0).start()
    cycles: list[tuple[int, list[RingState], int]] = []
    finished = asyncio.Event()

    async def stopper() -> None:
        while len(cycles) < 5 and not finished.is_set():
            await asyncio.sleep(0.004)
            in_flight = sum(q.ring.in_flight for q in guest.queues)
            states = await device.stop()
            assert device.run_state is RunState.STOPPED
            assert not device.rings_running
            before = backend.requests
            kicks = device.stats.kicks
            # Stopped: whatever the guest kicks (it may have its whole depth out and kick nothing,
            # so every queue also gets a notify of its own: spurious ones are allowed, v1.4
            # §2.7.13), the backend processes nothing.
            await asyncio.sleep(0.0025)
            for q in guest.queues:
                guest.transport.notify(q.index)
            await asyncio.sleep(0.0025)
            assert backend.requests == before
            cycles.append((in_flight, states, device.stats.kicks - kicks))
            await device.resume()
            assert device.run_state is RunState.RUNNING

    task = asyncio.create_task(stopper())
    res = await blk_write_verify(driver, requests=3000, queue_depth=16, block_bytes=4096, seed=7)
    finished.set()
    await task
    await watcher.stop()
    assert len(cycles) == 5
    assert any(in_flight for in_flight, _, _ in cycles), "no stop landed while requests were in flight"
    assert all(kicks >= len(guest.queues) for _, _, kicks in cycles), "kicks while stopped went uncounted"
    for _, states, _ in cycles:
        assert [s.index for s in states] == [0, 1]
        assert all(isinstance(s, RingState) for s in states)
    assert res.mismatches == []
    # every request completed exactly once: the backend handled exactly what the guest sent
    assert backend.requests == res.writes + res.reads
    assert sum(q.completed for q in guest.queues) == backend.requests
    assert all(q.ring.in_flight == 0 for q in guest.queues)
    assert watcher.values == {LIVE}
    assert watcher.reads > 100
    assert device.faults.total == 0
    guest.close()
    await machine.close()


async def test_stop_rng_mid_stream() -> None:
    machine = Machine(16 << 20)
    device = await machine.add_device(DeviceConfig("rng0", "inproc", {"device": "rng"},
                                                   transport="mmio"))
    guest = machine.guest("rng0")
    rng = RngDriver(guest, buffer_size=64)
    await rng.start()
    await device.stop()
    pending = asyncio.create_task(rng.read(64))
    await asyncio.sleep(0.01)                       # held stopped a while: nothing completes
    assert not pending.done()
    assert guest.status() == LIVE
    await device.resume()
    data = await asyncio.wait_for(pending, 2)
    assert len(data) == 64
    guest.close()
    await machine.close()


async def test_guest_initialises_while_stopped() -> None:
    """Seed scenario 2.3: stopped half-way through init, the guest carries on."""
    machine = Machine(32 << 20)
    device = await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk"}))
    guest = machine.guest("blk0")
    t = guest.transport
    t.set_status(0)
    t.set_status(Status.ACKNOWLEDGE)
    t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    assert await device.stop() == []
    assert not device.started
    driver = BlkDriver(guest)
    start = asyncio.create_task(driver.start())
    # init went through register writes only; the backend was not started while stopped
    await wait_until(lambda: t.get_status() == LIVE, what="the guest's init to reach DRIVER_OK")
    await asyncio.sleep(0.01)                       # held stopped a while: the backend stays down
    assert not device.started
    await start
    write = asyncio.create_task(driver.write(8, b"x" * 512))
    await asyncio.sleep(0.01)                       # held stopped a while: nothing completes
    assert not write.done()
    await device.resume()
    await asyncio.wait_for(write, 2)
    assert device.started
    assert await driver.read(8, 512) == b"x" * 512
    guest.close()
    await machine.close()


async def test_guest_reset_while_stopped() -> None:
    machine, device, guest, driver = await make_blk(queues=1, latency_us=0)
    await driver.write(0, b"a" * 512)
    await device.stop()
    guest.transport.set_status(0)
    await device.settle()
    assert guest.status() == 0
    await device.resume()
    assert not device.started
    await driver.start()
    assert await driver.read(0, 512) == b"a" * 512
    guest.close()
    await machine.close()


async def test_stop_guards() -> None:
    machine, device, guest, driver = await make_blk(queues=1, latency_us=0)
    await device.resume()                     # running: a no-op
    first = await device.stop()
    assert await device.stop() == first       # stopping twice is idempotent
    await device.resume()
    await driver.flush()
    guest.close()
    await machine.close()
    unrealized = InProcBackend({"device": "blk"})
    from shadowvmm.device import VirtioDevice
    lone = VirtioDevice(unrealized, machine.memory)
    with pytest.raises(DeviceStateError):
        await lone.stop()


class BrokenKick(InProcBackend):
    """Fails when the device starts a ring: a backend error mid-start."""

    async def set_vring_kick(self, index: int, fd: int) -> None:
        raise BackendError("injected: kick fd refused")


async def test_backend_failure_sets_needs_reset_and_spares_other_devices() -> None:
    machine = Machine(48 << 20)
    bad = await machine.add_device(DeviceConfig("bad", "inproc", {"device": "blk"}),
                                   backend=BrokenKick({"device": "blk"}))
    await machine.add_device(DeviceConfig("good", "inproc", {"device": "blk"}))
    bad_guest = machine.guest("bad")
    bad_driver = BlkDriver(bad_guest)
    with pytest.raises(DeviceStateError, match="NEEDS_RESET|kick fd refused"):
        await bad_driver.start()        # the guest model's start waits for the backend's
    await bad.settle()
    assert bad.run_state is RunState.FAILED
    assert bad_guest.status() & Status.NEEDS_RESET
    # config interrupt announces NEEDS_RESET
    assert await wait_for_count(lambda: bad_guest.config_changes, 1, what="config interrupts") == 1
    good_guest = machine.guest("good")
    good_driver = BlkDriver(good_guest)
    await good_driver.start()
    await good_driver.write(0, b"z" * 4096)
    assert await good_driver.read(0, 4096) == b"z" * 4096
    # a guest reset recovers the failed device's register state
    await bad_guest.reset()
    assert bad_guest.status() == 0
    bad_guest.close()
    good_guest.close()
    await machine.close()


class VhostUserLike(InProcBackend):
    """The reference backend with vhost-user stop semantics: no SUSPEND/RESUME, rings
    stopped by GET_VRING_BASE and restarted with NUM/BASE/ADDR/CALL/KICK."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.calls: list[str] = []

    def capabilities(self):
        from shadowvmm.backends.base import Capability
        return super().capabilities() & ~(Capability.SUSPEND | Capability.RESUME)

    async def set_vring_call(self, index: int, fd: int) -> None:
        self.calls.append(f"call{index}")
        await super().set_vring_call(index, fd)

    async def set_vring_kick(self, index: int, fd: int) -> None:
        self.calls.append(f"kick{index}")
        await super().set_vring_kick(index, fd)


async def test_ring_restart_path_drains_holds_kicks_and_rewires_call_first() -> None:
    machine = Machine(32 << 20)
    backend = VhostUserLike({"device": "blk", "latency_us": 20000})
    device = await machine.add_device(DeviceConfig("blk0", "inproc", {}), backend=backend)
    guest = machine.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start()
    first = asyncio.create_task(driver.write(0, b"1" * 512))
    await wait_until(lambda: 0 in backend.rings and backend.rings[0].in_flight, interval=0.0005,
                     what="a request in flight inside the backend")
    stopping = asyncio.create_task(device.stop())
    await wait_until(lambda: device._held_kicks, interval=0.0005, what="the stop to be draining")
    second = asyncio.create_task(driver.write(8, b"2" * 512))   # kicked during the drain
    states = await stopping
    assert first.done(), "the stop returned before the in-flight request completed"
    assert states[0].base == 1, "the request kicked during the drain reached the backend"
    await asyncio.sleep(0.03)                       # held stopped a while: the held kick stays held
    assert not second.done()
    backend.calls.clear()
    await device.resume()
    assert backend.calls == ["call0", "kick0"], "restart must give the call fd before the kick"
    await asyncio.wait_for(second, 2)
    assert await driver.read(8, 512) == b"2" * 512
    guest.close()
    await machine.close()


class SlowSuspend(InProcBackend):
    """SUSPEND takes 50 ms, and records the order of the backend operations."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.order: list[str] = []

    async def suspend(self) -> None:
        self.order.append("suspend")
        await asyncio.sleep(0.05)
        await super().suspend()
        self.order.append("suspended")

    async def set_config(self, offset: int, data: bytes) -> None:
        self.order.append("set_config")
        await super().set_config(offset, data)


async def slow_suspend_blk():
    machine = Machine(48 << 20)
    device = await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk"}),
                                      backend=SlowSuspend({"device": "blk"}))
    guest = machine.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start()
    await device.settle()
    return machine, device, guest, driver


async def test_guest_operation_during_a_stop_runs_after_it() -> None:
    """A stop with nothing queued runs at once in the caller's task; a guest register write
    that arrives meanwhile queues behind it, in order."""
    machine, device, guest, driver = await slow_suspend_blk()
    stop = asyncio.ensure_future(device.stop())
    await wait_until(lambda: device.backend.order == ["suspend"], what="the stop to be suspending")
    guest.transport.write_config(32, 1, 0)          # writeback -> writethrough: a CONFIG_WRITE op
    await stop
    await device.settle()
    assert device.backend.order == ["suspend", "suspended", "set_config"]
    assert guest.status() == LIVE and device.run_state is RunState.STOPPED
    await device.resume()
    await driver.write(0, b"q" * 4096)
    assert await driver.read(0, 4096) == b"q" * 4096
    guest.close()
    await machine.close()


async def test_cancelling_a_stop_midway_fails_the_device_visibly() -> None:
    machine, device, guest, driver = await slow_suspend_blk()
    stop = asyncio.ensure_future(device.stop())
    await wait_until(lambda: device.backend.order == ["suspend"], what="the stop to be suspending")
    stop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stop
    assert device.run_state is RunState.FAILED
    assert guest.status() & Status.NEEDS_RESET
    await driver.start()                            # the guest's reset and re-initialisation recover it
    await driver.write(0, b"r" * 4096)
    assert await driver.read(0, 4096) == b"r" * 4096
    guest.close()
    await machine.close()


async def test_held_interrupts_stay_pending_until_released() -> None:
    machine, device, guest, driver = await make_blk(queues=1, latency_us=0)
    guest.hold_interrupts()
    read = asyncio.ensure_future(driver.read(0, 4096))
    await wait_until(guest.queues[0].ring.has_used, what="the request to be used")
    await asyncio.sleep(0.01)                       # held: no interrupt completes the read
    assert not read.done()
    guest.release_interrupts()
    assert await asyncio.wait_for(read, 1.0) == bytes(4096)
    guest.close()
    await machine.close()
