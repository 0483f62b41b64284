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


async def _latency_blk(latency_us: int) -> tuple[Machine, InProcBackend, BlkDriver]:
    machine = Machine(16 << 20)
    await machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "size": 1 << 20,
                                                              "latency_us": latency_us}, queue_size=16))
    backend = machine.device("blk0").backend
    assert isinstance(backend, InProcBackend)
    driver = BlkDriver(machine.guest("blk0"), max_request=4096, slots_per_queue=4)
    await driver.start(queue_size=16)
    return machine, backend, driver


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


async def test_what_comes_due_during_a_pass_waits_for_what_the_pass_made_ready() -> None:
    """A completion that wakes a task does not starve it: a deadline passing while callbacks run
    is served after the loop ran what they scheduled (the stop of the device just completed)."""
    loop = asyncio.get_running_loop()
    timer = DeadlineTimer(loop)
    order: list[str] = []
    done = loop.create_future()

    def first() -> None:
        order.append("first")
        loop.call_soon(order.append, "woken")
        _busy(0.002)                    # the second deadline passes meanwhile

    def second() -> None:
        order.append("second")
        done.set_result(None)
    try:
        timer.call_later(0.001, first)
        timer.call_later(0.0015, second)
        await asyncio.wait_for(done, 2)
        assert order == ["first", "woken", "second"]
    finally:
        timer.close()


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
        machine, backend, driver = await _latency_blk(3000)
        short = []
        takes: list[float] = []
        process = backend._process

        def timed(ring) -> None:
            before, start = backend.requests, time.perf_counter()      # before the latency starts
            process(ring)
            if backend.requests > before:
                takes.append(start)
        backend._process = timed            # type: ignore[method-assign]
        try:
            for i in range(20):
                _busy(0.0001 * (i % 10))
                read = asyncio.ensure_future(driver.read(0, 512))
                while len(takes) <= i:
                    await asyncio.sleep(0)
                _busy(0.0007)
                await asyncio.wait_for(read, 2)
                took = time.perf_counter() - takes[i]
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
    try:
        machine, backend, driver = await _latency_blk(20_000)
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


async def test_a_delayed_write_reaches_the_image_when_its_latency_has_passed() -> None:
    """With latency_us the request is checked when taken and its data moves at completion
    (as a device's DMA ends with the request): the image holds the old bytes meanwhile."""
    machine, backend, driver = await _latency_blk(20_000)
    image = backend.model.image
    assert image is not None
    try:
        write = asyncio.ensure_future(driver.write(8, b"\xa5" * 4096))
        while not backend.requests:
            await asyncio.sleep(0.001)
        assert image[4096:8192] == bytes(4096) and backend.rings[0].in_flight == 1
        await asyncio.wait_for(write, 2)
        assert image[4096:8192] == b"\xa5" * 4096
        assert await asyncio.wait_for(driver.read(8, 4096), 2) == b"\xa5" * 4096
    finally:
        await machine.close()


async def test_a_delayed_read_marks_its_buffer_dirty_when_it_lands() -> None:
    """Dirty logging turned on while a read is in flight: the guest pages the read fills at
    completion are in the log (a pre-copy round would otherwise miss them)."""
    machine, backend, driver = await _latency_blk(20_000)
    image = backend.model.image
    assert image is not None
    image[0:4096] = b"\x3c" * 4096
    moved: list[tuple] = []
    finish = backend.model.finish

    def recording(memory, later) -> None:
        moved.extend(later)
        finish(memory, later)
    backend.model.finish = recording        # type: ignore[method-assign]
    try:
        read = asyncio.ensure_future(driver.read(0, 4096))
        while not backend.requests:
            await asyncio.sleep(0.001)
        log = machine.memory.enable_dirty_log()
        log.take()
        assert await asyncio.wait_for(read, 2) == b"\x3c" * 4096
        (inbound, _region, _at, data, _offset, length), = moved
        assert inbound and length == 4096
        dirty = set(log.take())
        assert {data // 4096, (data + length - 1) // 4096} <= dirty, dirty
    finally:
        machine.memory.disable_dirty_log()
        await machine.close()
