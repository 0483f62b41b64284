"""The microsecond timer behind the in-process backend's ``latency_us`` (shadowvmm.backends.deadlines),
and the collector kept off through a stop (shadowvmm.migration.options.gc_paused)."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
import uvloop

from shadowvmm.backends.deadlines import DeadlineTimer
from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import BackendError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.migration.options import gc_paused
from shadowvmm.migration.source import stop_all


def _busy(seconds: float) -> None:
    """Hold the event loop, as a VMM busy with other devices does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_callbacks_run_in_deadline_order_and_a_failing_one_does_not_stop_the_rest() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    timer = DeadlineTimer(loop)
    ran: list[str] = []
    done = loop.create_future()

    def boom() -> None:
        raise ValueError("boom")
    try:
        timer.call_later(0.004, ran.append, "c")
        timer.call_later(0.002, ran.append, "a")
        timer.call_later(0.002, boom)
        timer.call_later(0.002, ran.append, "b")
        timer.call_later(0.006, done.set_result, None)
        await asyncio.wait_for(done, 2)
        assert ran == ["a", "b", "c"]
        assert len(errors) == 1 and isinstance(errors[0]["exception"], ValueError)
        assert len(timer) == 0
    finally:
        timer.close()
        loop.set_exception_handler(None)


async def test_close_drops_what_is_pending_and_refuses_more() -> None:
    loop = asyncio.get_running_loop()
    timer = DeadlineTimer(loop)
    ran: list[int] = []
    timer.call_later(0.001, ran.append, 1)
    timer.close()
    timer.close()
    await asyncio.sleep(0.01)
    assert ran == []
    with pytest.raises(BackendError):
        timer.call_later(0.001, ran.append, 2)


@pytest.mark.leaks_fds     # uvloop's first event loop in a process keeps a process-wide pipe pair
@pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])
def test_never_early_even_with_the_loop_held(loop_factory) -> None:
    """uvloop's own call_later(5 ms) fires 4.1-5.9 ms later when the loop is held after it is
    made (whole milliseconds from a truncated clock); the deadline timer never fires early."""
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        timer = DeadlineTimer(loop)
        early = []
        try:
            for i in range(30):
                _busy(0.0001 * (i % 10))        # every phase of the millisecond
                fired = loop.create_future()
                start = time.perf_counter()
                timer.call_later(0.003, lambda f=fired: f.set_result(time.perf_counter()))
                _busy(0.0007)
                took = await asyncio.wait_for(fired, 2) - start
                if took < 0.003:
                    early.append(took)
        finally:
            timer.close()
        return early
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(main()) == []


@pytest.mark.leaks_fds
def test_an_in_process_request_completes_no_sooner_than_latency_us_on_uvloop() -> None:
    """The latency the config asks for is a floor: on uvloop a request used to complete up to
    0.9 ms early (loop timers in whole milliseconds), which made many-device stop timings
    depend on where the takes fell within a millisecond."""
    async def main() -> list[float]:
        machine = Machine(16 << 20)
        await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "size": 1 << 20,
                                                                  "latency_us": 3000}, queue_size=16))
        backend = machine.device("blk0").backend
        assert isinstance(backend, InProcBackend)
        driver = BlkDriver(machine.guest("blk0"), max_request=4096, slots_per_queue=4)
        await driver.start(queue_size=16)
        short = []
        try:
            for i in range(20):
                _busy(0.0001 * (i % 10))
                before = backend.requests
                read = asyncio.ensure_future(driver.read(0, 512))
                while backend.requests == before:
                    await asyncio.sleep(0)
                taken = time.perf_counter()
                _busy(0.0007)
                await asyncio.wait_for(read, 2)
                took = time.perf_counter() - taken
                if took < 0.003:
                    short.append(took)
        finally:
            await machine.close()
        return short
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == []


async def test_closing_a_machine_with_a_request_in_flight_leaves_nothing_to_run_later() -> None:
    """The close drains what is in flight (the device resets its backend, which waits) and
    closes the machine's timer: no completion runs after it, nothing fails in the loop."""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    machine = Machine(16 << 20)
    try:
        await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "size": 1 << 20,
                                                                  "latency_us": 20_000}, queue_size=16))
        backend = machine.device("blk0").backend
        assert isinstance(backend, InProcBackend)
        driver = BlkDriver(machine.guest("blk0"), max_request=4096, slots_per_queue=4)
        await driver.start(queue_size=16)
        read = asyncio.ensure_future(driver.read(0, 512))
        while not backend.requests:
            await asyncio.sleep(0.001)
        queue = backend.rings[0].queue
        await machine.close()
        assert machine._timer is None and not backend.rings
        used = queue.used_idx
        await asyncio.sleep(0.04)
        assert queue.used_idx == used and errors == []
        read.cancel()
    finally:
        loop.set_exception_handler(None)


async def test_the_collector_is_off_through_a_stop_and_back_on_after() -> None:
    machine = Machine(16 << 20)
    seen: list[bool] = []
    try:
        await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "size": 1 << 20}, queue_size=16))
        backend = machine.device("blk0").backend
        assert isinstance(backend, InProcBackend)
        driver = BlkDriver(machine.guest("blk0"), max_request=4096, slots_per_queue=4)
        await driver.start(queue_size=16)
        suspend = backend.suspend

        async def recording() -> None:
            seen.append(gc.isenabled())
            await suspend()
        backend.suspend = recording         # type: ignore[method-assign]
        assert gc.isenabled()
        await stop_all({"blk0": machine.device("blk0")}, 1.0, time.perf_counter)
        assert seen == [False] and gc.isenabled()
    finally:
        await machine.close()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()       # it was off before: it stays off
    finally:
        gc.enable()
