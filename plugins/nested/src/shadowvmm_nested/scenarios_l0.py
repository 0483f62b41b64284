"""Scenarios "L0 migrates L1" (entry point ``nested`` of group ``shadowvmm.scenarios``).

The configured device is L0's (virtio-pci: blk, fs, net); an L1 hypervisor drives it through the L1
plugin for its L2 guest, whose RAM is the upper half of L0's guest memory
(:func:`~.l0migrate.build_l1`). L0 live-migrates its machine (local model) and L1 moves at
switch-over (:func:`~.l0migrate.migrate_l0`):

``l0-migrates-l1``      2.1: L1's device runs, L2 does I/O throughout.
``l0-migrates-l1-2.2``  2.2: L1 has stopped its device (SUSPEND at L0, by L1's VMM; on the admin
                        path DEV_MODE_SET through the owner ``adm0``, whose driver moves with
                        L1); the destination presents the stop to L1, which resumes it there.
``l0-migrates-l1-2.3``  2.3: L2 has not initialised its device (L0's shows ACKNOWLEDGE|DRIVER,
                        L1's probe); L2 initialises it on the destination.

The report's ``statuses`` has L2's reads of its device (``L2``) and L1's of its L0 device
(``L1``); exactly-once and the data check count L2's requests (blk blocks, an fs file, net
frames: whatever L0's device is).
"""

from __future__ import annotations

import asyncio

from shadowvmm.errors import ScenarioError
from shadowvmm.scenarios.context import LIVE, OWNER, ScenarioContext, status_text
from shadowvmm.scenarios.guestio import GuestIo
from shadowvmm.scenarios.registry import Scenario
from shadowvmm.shadow import StopDialect
from shadowvmm.virtio.constants import Status

from .adminpath import AdminPath
from .l0migrate import L1, L2, L1Stack, build_l1, migrate_l0
from .ringstate import RingStatePath
from .stoppath import StopPath

_SUSPENDED = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.SUSPEND)
_PROBED = int(Status.ACKNOWLEDGE | Status.DRIVER)
#: L2's disk as L1 names it.
L2_DISK = "vda"


async def _stack(ctx: ScenarioContext) -> tuple[L1Stack, GuestIo]:
    if ctx.device.transport != "pci":
        raise ScenarioError(f"{ctx.name}: L1 drives a virtio-pci L0 device; {ctx.device.name} is "
                            f"{ctx.device.transport}")
    memory = ctx.cfg.memory_mib << 20
    if memory < 16 << 20:
        raise ScenarioError(f"{ctx.name}: L0 needs 16 MiB of memory or more (L2's RAM is its upper half)")
    src = ctx.machines[0]
    dev = ctx.device
    path: StopPath | None = RingStatePath(dev.stop_feature_bit, dev.ring_state_feature_bit) \
        if dev.stop_dialect is StopDialect.STOP and dev.ring_state else None
    if ctx.owner is not None:       # the admin path: L1 stops member 1 through the owner's admin queue
        path = AdminPath(ctx.owner, {f"l0-{dev.name}": 1}, tap=ctx.timeline.tap(L1, OWNER))
    stack = await build_l1(src, dev.name, l2_base=memory // 2, l2_size=memory // 2, device=L2_DISK,
                           timeline=ctx.timeline, stop_path=path)
    ctx.guests.append((L2, stack.guest))
    return stack, GuestIo(stack.guest, stack.backend.device_id, ctx.report, packed=ctx.device.packed,
                          queue_size=64)


def _account(ctx: ScenarioContext, stack: L1Stack) -> None:
    """L1's reads of its L0 device and the faults L1's device counted, into the report."""
    log = stack.lower.transport.status_log
    ctx.report.statuses[L1] = list(log.values)
    ctx.report.status_reads += log.reads
    for fault, count in stack.device.faults.counts.items():
        ctx.report.faults[fault.name] = ctx.report.faults.get(fault.name, 0) + count


async def _run(ctx: ScenarioContext, case: str) -> None:
    if case == "2.2" and not ctx.admin:
        ctx.need_dialect(StopDialect.SUSPEND)
    src = await ctx.machine()
    dst = await ctx.destination(src)
    stack, io = await _stack(ctx)
    name, log = ctx.device.name, stack.lower.transport.status_log
    try:
        if case != "2.3":
            await io.start()
            await io.io()
        stopped = LIVE if ctx.admin else _SUSPENDED     # a member stopped by its owner keeps DRIVER_OK
        if case == "2.2":
            await stack.device.stop()
            ctx.report.check(stack.lower.status() == stopped, f"L1 stopped its device and reads "
                                                              f"{status_text(stack.lower.status())}")
        done = asyncio.Event()

        async def load() -> None:
            while not done.is_set():
                await io.io()
                await asyncio.sleep(0)
        running = asyncio.ensure_future(load()) if case == "2.1" else None
        try:
            await asyncio.sleep(0.01)
            owner = (OWNER, ctx.owner.guest) if ctx.owner is not None else None
            report, _ = await migrate_l0(src, dst, stack, name, ctx.workdir, timeline=ctx.timeline,
                                         owner=owner)
            ctx.report.check(report.ok, "the migration did not complete")
        finally:
            done.set()
            if running is not None:
                await running
        await _after(ctx, stack, io, case, stopped)
        ctx.report.check(ctx.dev(dst).rings_running and not ctx.dev(src).rings_running,
                         "L0's destination does not run the rings (or the source still does)")
        ctx.report.notes.append(f"L1 read {[status_text(v) for v in log.values]} from its L0 device")
    finally:
        _account(ctx, stack)
        await stack.close()


async def _after(ctx: ScenarioContext, stack: L1Stack, io: GuestIo, case: str, stopped: int) -> None:
    """On the destination: what L1 reads, then L1 resumes (2.2: SUSPEND cleared, or DEV_MODE_SET
    through the owner the destination's L1 driver now reaches) or L2 initialises (2.3), then I/O."""
    shown = stack.lower.status()
    if case == "2.2":
        ctx.report.check(shown == stopped, f"the destination presents {status_text(shown)} to L1, which "
                                           f"had stopped at {status_text(stopped)}")
        await stack.device.resume()
    elif case == "2.3":
        ctx.report.check(shown == _PROBED, f"the destination presents {status_text(shown)} to L1, not "
                                           f"{status_text(_PROBED)}")
        await io.start()
    ctx.report.check(stack.lower.status() == LIVE, f"L1 reads {status_text(stack.lower.status())} after "
                                                   "the migration, not DRIVER_OK")
    await io.io()


async def running(ctx: ScenarioContext) -> None:
    """2.1: L0 migrates while L1's device runs and L2 does I/O."""
    await _run(ctx, "2.1")


async def stopped(ctx: ScenarioContext) -> None:
    """2.2: L1 has stopped its L0 device; it resumes it on the destination."""
    await _run(ctx, "2.2")


async def uninitialised(ctx: ScenarioContext) -> None:
    """2.3: L2 has not initialised its device; it does on the destination."""
    await _run(ctx, "2.3")


#: The scenarios of this plugin (entry point ``nested`` of group ``shadowvmm.scenarios``).
L0_MIGRATES_L1: dict[str, Scenario] = {s.name: s for s in (
    Scenario("l0-migrates-l1", "2.1 one level down: L0 migrates the machine L1 runs in, L2 doing I/O", running),
    Scenario("l0-migrates-l1-2.2", "L1 has stopped its L0 device (SUSPEND); L0 migrates; L1 resumes it",
             stopped),
    Scenario("l0-migrates-l1-2.3", "L2 has not initialised its device when L0 migrates; it does after",
             uninitialised),
)}
