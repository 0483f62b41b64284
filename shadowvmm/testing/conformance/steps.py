"""The conformance steps: each builds what it needs from a fresh backend, checks one part of the
contract through the public API (the backend's own methods, or :class:`Machine` +
:class:`VirtioDevice` + a guest driver model), and returns what it saw. A failed check raises
AssertionError; any other exception is the backend's (or the device's) error. The order, the
dependencies and the spec sections are in :mod:`.catalog`; the later steps (config, queue reset,
reconnect, migration) in :mod:`.lifecycle`."""

from __future__ import annotations

import asyncio
import gc

from ...backends.base import Capability, RingState, check_backend
from ...guest.driver import GuestQueue
from ...lifecycle import DeviceEvent, DeviceEventKind
from ...memory import GuestMemory
from ...migration.harness import move_guest
from ...shadow import RunState
from ...virtio.constants import DeviceId, Feature
from ...virtio.split import SplitDriverQueue
from ..fds import open_fds
from .rig import LIVE, Context, Rig, close_rig, close_shared, open_rig, rig, session_backend

__all__ = ["cap_names", "check_bases", "expect", "stop_cycle"]

#: How long a request made while the device is stopped must stay pending.
STOPPED_FOR = 0.05
#: Round trips left running when a stop with requests in flight starts.
IN_FLIGHT = 4


def expect(condition: object, message: str) -> None:
    """A conformance check: AssertionError with *message* unless *condition*."""
    if not condition:
        raise AssertionError(message)


def cap_names(caps: Capability) -> str:
    return "|".join(sorted(c.name for c in Capability if c and c in caps and c.name)) or "none"


def _used_idx(queue: GuestQueue) -> int | None:
    ring = queue.ring
    if isinstance(ring, SplitDriverQueue):
        return ring.memory.load_u16(ring.layout.used + 2)
    return None


def check_bases(r: Rig, states: list[RingState], *, quiet: bool) -> str:
    """The stopped rings are the started ones; a split ring's base (its next avail index) was
    used in full (nothing taken is left in flight) and, when *quiet*, is every buffer the
    guest made available."""
    started = sorted(q.index for q in r.guest.queues)
    expect(sorted(s.index for s in states) == started,
           f"stop returned ring states {sorted(s.index for s in states)}, the started rings are {started}")
    for s in states:
        used = _used_idx(r.guest.queue(s.index))
        if used is None:
            continue
        base = s.base & 0xFFFF
        expect(base == used, f"ring {s.index}: base {base} but used idx {used}: requests taken and not "
                             f"completed at the stop")
        if quiet:
            made = r.workload.available(s.index) & 0xFFFF
            expect(base == made, f"ring {s.index}: base {base}, the guest made {made} buffers available")
        else:
            most = r.workload.most_taken(s.index) & 0xFFFF
            expect((most - base) & 0xFFFF < 0x8000,
                   f"ring {s.index}: base {base}, the guest made {most} buffers available")
    return ", ".join(f"{s.index}:{s.base}" for s in states)


async def _until_in_flight(r: Rig, running: list[asyncio.Future[None]], bound: float = 1.0) -> None:
    """Wait until the device holds a request of *running* (or they all completed already)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while running and not all(task.done() for task in running) and loop.time() < deadline:
        if any(q.ring.in_flight for q in r.guest.queues):
            return
        await asyncio.sleep(0.0002)


async def stop_cycle(ctx: Context, r: Rig, *, in_flight: int = 0) -> str:
    """Round trip, *in_flight* more requests left running, stop, check, a request made while
    stopped stays pending, resume, it completes, and the data is all there."""
    w, device = r.workload, r.device
    first = ctx.tag()
    await w.round_trip(first)
    running: list[asyncio.Future[None]] = [asyncio.ensure_future(w.in_flight_trip(ctx.tag()))
                                           for _ in range(in_flight)]
    pending: asyncio.Future[None] | None = None
    try:
        await _until_in_flight(r, running)
        bases = check_bases(r, await device.stop(), quiet=not in_flight)
        expect(r.status() == LIVE, f"the guest read status {r.status():#x} during a VMM stop, not {LIVE:#x}")
        pending = asyncio.ensure_future(w.round_trip(ctx.tag()))
        await asyncio.sleep(STOPPED_FOR)
        expect(not pending.done(), "a request made while the device was stopped completed before the resume")
        await device.resume()
        tasks = [pending, *running]
        _, late = await asyncio.wait(tasks, timeout=ctx.options.io_timeout)
        expect(not late, f"{len(late)} of {len(tasks)} requests made before or during the stop did not "
                         f"complete within {ctx.options.io_timeout} s of the resume")
        for task in tasks:
            task.result()
    finally:
        tasks = [*running, *([pending] if pending else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await w.round_trip(ctx.tag())
    if w.keeps_data:
        await w.verify(first)
    return bases


# ---------------------------------------------------------------------- steps


async def contract(ctx: Context) -> str:
    backend = ctx.factory()
    try:
        ctx.implementation = backend.implementation
        problems = check_backend(backend)
        expect(not problems, "; ".join(problems))
        expect(isinstance(backend.capabilities(), Capability), "capabilities() is not a Capability")
    finally:
        await backend.close()
    return f"{type(backend).__qualname__} ({backend.implementation} v{backend.implementation_version}); " \
           f"close() before connect() is fine"


async def connect(ctx: Context) -> str:
    async with session_backend(ctx) as backend:
        caps = backend.capabilities()
        expect(isinstance(caps, Capability), "capabilities() is not a Capability")
        expect(backend.device_id == ctx.device_id,
               f"device_id is {backend.device_id!r}, the run is for {ctx.device_id.name}")
        ctx.caps = caps
        ctx.queue_num = await backend.get_queue_num()
    return f"capabilities {cap_names(caps)}"


async def features(ctx: Context) -> str:
    async with session_backend(ctx) as backend:
        offered = await backend.get_features()
        expect(offered & Feature.VERSION_1, f"features {offered:#x} lack VERSION_1 (bit 32)")
        queues = await backend.get_queue_num()
        expect(queues >= 1, f"get_queue_num() is {queues}")
        size = backend.config_size()
        expect(size >= 0, f"config_size() is {size}")
        if size:
            data = await backend.get_config(0, size)
            expect(len(data) == size, f"get_config(0, {size}) gave {len(data)} bytes")
    return f"features {offered:#x}, {queues} queue(s), {size}-byte config"


async def realize(ctx: Context) -> str:
    async with rig(ctx, start=False) as r:
        expect(r.status() == 0, f"a fresh device reads status {r.status():#x}")
        offered = r.guest.transport.device_features()
        expect(offered & Feature.VERSION_1, f"the guest is offered {offered:#x}, without VERSION_1")
        if ctx.device_id is DeviceId.BLOCK:
            capacity = r.guest.config_int(0, 8)
            expect(capacity > 0, "virtio-blk config: capacity 0")
        return f"{r.device.num_queues} queue(s), guest offered {offered:#x}"


async def driver_init(ctx: Context) -> str:
    async with rig(ctx) as r:
        expect(r.status() == LIVE, f"status {r.status():#x} after DRIVER_OK, expected {LIVE:#x}")
        expect(r.device.run_state is RunState.RUNNING, f"run state {r.device.run_state.value}")
        return f"negotiated {r.guest.features:#x}, {len(r.guest.queues)} ring(s) started"


async def io(ctx: Context) -> str:
    async with rig(ctx) as r:
        for _ in range(3):
            await r.workload.round_trip(ctx.tag())
        tally = r.workload.tally()
        return "3 round trips verified" + (f": {tally}" if tally else "")


async def stop_resume(ctx: Context) -> str:
    async with rig(ctx) as r:
        bases = await stop_cycle(ctx, r)
        path = "suspend" if r.device.backend_caps & Capability.SUSPEND else "get_vring_base"
        return f"stopped ({path}) with ring bases {bases}; I/O made while stopped completed after the resume"


async def stop_in_flight(ctx: Context) -> str:
    async with rig(ctx) as r:
        bases = await stop_cycle(ctx, r, in_flight=IN_FLIGHT)
        path = "suspend" if r.device.backend_caps & Capability.SUSPEND else "disable, drain, get_vring_base"
        return (f"stopped ({path}) with {IN_FLIGHT} round trips in flight, ring bases {bases} (each used in "
                f"full); every request completed after the resume, data verified")


async def suspend_resume(ctx: Context) -> str:
    async with rig(ctx) as r:
        for _ in range(3):
            await stop_cycle(ctx, r, in_flight=IN_FLIGHT if r.workload.no_io is None else 0)
        return "3 suspend/resume cycles with requests in flight; every request completed once, data verified"


async def reset_reinit(ctx: Context) -> str:
    async with rig(ctx) as r:
        w = r.workload
        before = ctx.tag()
        await w.round_trip(before)
        await r.guest.reset()
        expect(r.status() == 0, f"status {r.status():#x} after the guest's reset")
        await w.start()
        expect(r.status() == LIVE, f"status {r.status():#x} after re-initialising")
        if w.keeps_data:
            await w.verify(before)
        await w.round_trip(ctx.tag())
        return "reset, re-initialised; I/O after" + (", data from before the reset intact" if w.keeps_data else "")


async def queues(ctx: Context) -> str:
    await ctx.capabilities()
    count = ctx.queue_num or 0
    expect(count >= 1, f"get_queue_num() is {count}")
    if ctx.shared is not None:      # one session: the queues it was realized with
        count = ctx.shared.device.num_queues
    async with rig(ctx, num_queues=count) as r:
        expect(r.device.num_queues == count, f"device has {r.device.num_queues} queues, backend said {count}")
        if not r.workload.any_queue:
            return f"{count} queue(s) realized"
        for index in range(count):
            await r.workload.round_trip(ctx.tag(), index)
        return f"{count} queue(s), I/O verified on each"


async def device_state(ctx: Context) -> str:
    memory = GuestMemory.create([(0, ctx.options.memory_mib << 20)])
    src = dst = None
    try:
        src = await open_rig(ctx, memory=memory)
        tag = ctx.tag()
        await src.workload.round_trip(tag)
        await src.device.stop()
        state = await src.device.export_state(src.transport)
        opaque = state.opaque
        expect(opaque is not None, "export_state carried no opaque state (save_state returned None)")
        assert opaque is not None
        expect(opaque.implementation == src.backend.implementation,
               f"opaque state of {opaque.implementation!r}, the backend is {src.backend.implementation!r}")
        dst = await open_rig(ctx, start=False, memory=src.machine.memory,
                             factory=ctx.options.destination_factory)
        await dst.device.import_state(state, dst.transport)
        move_guest(src.guest, src.device, dst.device, dst.transport)
        expect(dst.status() == LIVE, f"the destination reads status {dst.status():#x}")
        await src.workload.round_trip(ctx.tag())
        return f"{len(opaque.blob)}-byte opaque state loaded into a fresh backend; I/O after"
    finally:
        if src is not None:     # the guest first (it moved to dst's interrupts), the source with it
            await close_rig(ctx, src)
        if dst is not None:
            await close_rig(ctx, dst)
        memory.close()


async def dirty_log(ctx: Context) -> str:
    async with rig(ctx) as r:
        memory: GuestMemory = r.machine.memory
        log = memory.enable_dirty_log()
        try:
            await r.device.start_dirty_log(log)
            log.take()
            page = await r.workload.write_probe()
            dirty = log.take()
            expect(page in dirty, f"the device wrote page {page:#x}; the dirty log shows {len(dirty)} other pages")
            await r.device.stop_dirty_log()
        finally:
            memory.disable_dirty_log()
        return f"page {page:#x} written by the device was logged"


async def events(ctx: Context) -> str:
    seen: list[DeviceEvent] = []
    async with rig(ctx) as r:
        unsubscribe = r.device.events.subscribe(seen.append)
        try:
            if r.workload.no_io is None:
                await stop_cycle(ctx, r)
            else:
                await r.device.stop()
                await r.device.resume()
        finally:
            unsubscribe()
        bad = [f"{e.kind.value}: {e.error or e.detail}" for e in seen
               if e.kind in (DeviceEventKind.BACKEND_LOST, DeviceEventKind.FAILED)]
        expect(not bad, f"events nobody caused: {'; '.join(bad)}")
        expect(not r.device.failed(), f"the device failed: {r.device.failure}")
    return "no loss or failure reported over I/O, stop and resume"


async def close(ctx: Context) -> str:
    if ctx.baseline is None:
        gc.collect()
        ctx.baseline = (open_fds(), asyncio.all_tasks())
    fds, tasks = ctx.baseline
    if ctx.shared is None:
        async with rig(ctx):
            pass        # the guest started the rings: call and kick fds, readers, the worker
    await close_shared(ctx)     # a single-session run: its one device, as the earlier steps left it
    await asyncio.sleep(0)
    gc.collect()
    leaked = sorted((fd, target) for fd, target in open_fds().items() if fds.get(fd) != target)
    expect(not leaked, f"{len(leaked)} fd(s) left open after close: {leaked[:6]}")
    left = sorted(t.get_name() for t in asyncio.all_tasks() - tasks if not t.done())
    expect(not left, f"tasks left running after close: {left[:6]}")
    return "after a guest start: every fd and task released"
