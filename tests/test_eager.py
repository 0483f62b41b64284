"""Coroutines started in the caller (shadowvmm.device.eager) and the stops that use them."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_many_devices import blk_machine

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.device.eager import NATIVE_EAGER, start_eager
from shadowvmm.migration.source import stop_all
from shadowvmm.shadow import RunState


async def test_a_coroutine_that_never_waits_finishes_in_the_call() -> None:
    ran: list[str] = []

    async def work() -> None:
        ran.append("done")

    assert start_eager(asyncio.get_running_loop(), work(), True) is None
    assert ran == ["done"]


async def test_a_coroutine_that_waits_continues_in_a_task_with_its_result() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()
    steps: list[str] = []

    async def work() -> int:
        steps.append("before")
        value = await gate
        steps.append("after")
        await asyncio.sleep(0)
        return value + 1

    task = start_eager(loop, work(), True)
    assert task is not None and steps == ["before"]
    gate.set_result(41)
    assert await task == 42 and steps == ["before", "after"]


@pytest.mark.parametrize("before_first_step", [True, False])
async def test_cancelling_the_task_reaches_the_coroutine(before_first_step: bool) -> None:
    """Cancelled before the task ever ran (the coroutine is still in its eager await) or later:
    either way the coroutine sees CancelledError where it waits, and its cleanup runs."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()
    seen: list[str] = []

    async def work() -> None:
        try:
            await gate
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = start_eager(loop, work(), True)
    assert task is not None
    if not before_first_step:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"] and task.cancelled()


async def test_an_error_after_the_first_wait_is_the_tasks() -> None:
    loop = asyncio.get_running_loop()

    async def work() -> None:
        await asyncio.sleep(0)
        raise OSError("late")

    task = start_eager(loop, work(), True)
    assert task is not None
    with pytest.raises(OSError, match="late"):
        await task


async def test_not_eager_runs_nothing_in_the_call() -> None:
    ran: list[str] = []

    async def work() -> None:
        ran.append("done")

    task = start_eager(asyncio.get_running_loop(), work(), False)
    assert task is not None and ran == []
    await task
    assert ran == ["done"]


async def test_stop_all_stops_idle_in_process_devices_without_a_task_each() -> None:
    """The in-process backend may start eagerly: idle devices are stopped before stop_all's
    first suspension, so no task is created for them (before Python 3.12)."""
    machine, _ = await blk_machine(4)
    devices = {name: slot.device for name, slot in machine.slots.items()}
    assert all(d.ops_start_eagerly for d in devices.values())
    loop = asyncio.get_running_loop()
    made: list[object] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: object, **kwargs: object) -> asyncio.Task[object]:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)  # type: ignore[arg-type]

    loop.set_task_factory(counting)  # type: ignore[arg-type]
    try:
        times = await stop_all(devices, 5.0, time.perf_counter)
    finally:
        loop.set_task_factory(factory)
        try:
            assert set(times) == set(devices)
            assert all(d.run_state is RunState.STOPPED for d in devices.values())
            if not NATIVE_EAGER:
                assert made == []
        finally:
            await machine.close()


async def test_stop_all_gives_a_task_to_a_device_whose_backend_is_not_eager() -> None:
    machine, _ = await blk_machine(2)
    devices = {name: slot.device for name, slot in machine.slots.items()}
    plain = devices["blk1"]
    plain._caps_bits &= ~plain.backend_caps.EAGER_OPS.value
    assert not plain.ops_start_eagerly and devices["blk0"].ops_start_eagerly
    try:
        times = await stop_all(devices, 5.0, time.perf_counter)
        assert set(times) == {"blk0", "blk1"}
        assert all(d.run_state is RunState.STOPPED for d in devices.values())
    finally:
        await machine.close()


async def test_a_kick_while_suspended_unwatches_its_fd_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop leaves the kick fd watched (no syscall per ring); the first kick while suspended
    removes the reader, so a pending kick does not spin the loop, and the resume watches again."""
    calls: list[int] = []
    on_kick = InProcBackend._on_kick

    def counted(self: InProcBackend, ring: object) -> None:
        calls.append(1)
        on_kick(self, ring)  # type: ignore[arg-type]

    monkeypatch.setattr(InProcBackend, "_on_kick", counted)
    machine, (driver,) = await blk_machine(1)
    device = machine.device("blk0")
    backend = device.backend
    assert isinstance(backend, InProcBackend)
    ring = backend.rings[0]
    try:
        await device.stop()
        assert ring.watched_fd >= 0
        calls.clear()
        write = asyncio.ensure_future(driver.write(0, b"\x33" * 4096))
        for _ in range(30):
            await asyncio.sleep(0.001)
        assert ring.watched_fd == -1 and not write.done()
        assert len(calls) == 1
        await device.resume()
        assert ring.watched_fd >= 0
        await asyncio.wait_for(write, 2)
        assert await driver.read(0, 4096) == b"\x33" * 4096
    finally:
        await machine.close()


async def test_stop_all_right_after_a_guest_reset_and_then_a_reinit() -> None:
    """A guest reset written just before the many-device stop (its operation still queued on
    the device's worker, so that stop waits and gets a task): every device stops, the reset one
    with no ring to capture; after the resume the reset device is initialized again and its
    I/O, and the others', completes with the data on the disk."""
    machine, drivers = await blk_machine(3)
    devices = {name: slot.device for name, slot in machine.slots.items()}
    reset = drivers[1]
    try:
        for k, driver in enumerate(drivers):
            await driver.write(0, bytes([k + 1]) * 4096)
        reset.dev.transport.set_status(0)
        times = await stop_all(devices, 5.0, time.perf_counter)
        assert set(times) == set(devices)
        assert all(d.run_state is RunState.STOPPED for d in devices.values())
        assert devices["blk1"].ring_states == {} and len(devices["blk0"].ring_states) == 1
        await asyncio.gather(*(d.resume() for d in devices.values()))
        await reset.dev.reset()
        await reset.start(queue_size=16)
        for k, driver in enumerate(drivers):
            await asyncio.wait_for(driver.write(8, bytes([k + 10]) * 4096), 2)
            assert await driver.read(0, 4096) == bytes([k + 1]) * 4096
            assert await driver.read(8, 4096) == bytes([k + 10]) * 4096
    finally:
        await machine.close()
