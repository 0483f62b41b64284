"""The seed's scenarios on one level (L0): 1, 2, 2.1, 2.2, 2.2-reset and 2.3 (:data:`BASIC`).

1. The VMM does not offer the stop feature: the guest's write of the bit is a counted fault
   and the device runs on.
2. Offered: the guest stops the device (SUSPEND or STOP) and resumes it (SUSPEND) or resets it.
2.1 The VMM stops the device for a live migration under guest I/O; the guest never writes
   STOP and reads DRIVER_OK throughout; the destination starts from the state.
2.2 The guest stops the device, then the VMM migrates it: the destination presents the stopped
   status, then the guest resumes (``2.2``, SUSPEND dialect) or resets (``2.2-reset``).
2.3 The guest has not initialised the device, or is half-way through, when it is migrated; it
   finishes the initialisation on the destination.

On the admin stop path (``ctx.admin``) the guest's own stop and resume in 2 and 2.2 are the
owner's DEV_MODE_SET (v1.4 §2.12.1.4) instead of a status bit: the member's guest keeps reading
DRIVER_OK. With the STOP dialect and VIRTIO_F_RING_STATE negotiated, the ring-state registers
read at the guest's stop must equal the bases the device captured.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..device import VirtioDevice
from ..errors import DeviceStateError
from ..guest.driver import GuestDevice
from ..shadow import GuestFault, StopDialect
from ..virtio.constants import Feature, Status
from .context import LIVE, ScenarioContext, status_text
from .guestio import GuestIo
from .registry import Scenario

_STOP_BITS = int(Status.SUSPEND | Status.STOP)
_ERROR_BITS = int(Status.NEEDS_RESET | Status.FAILED)


def _io(ctx: ScenarioContext, guest: GuestDevice) -> GuestIo:
    return GuestIo(guest, ctx.dev(ctx.machines[0]).device_id, ctx.report, packed=ctx.device.packed,
                   queue_size=min(ctx.device.queue_size, 64))


async def _wait_status(guest: GuestDevice, want: Callable[[int], object], what: str, timeout: float = 5.0) -> int:
    """Poll device_status (as a driver does) until *want* (a predicate) holds."""
    try:
        async with asyncio.timeout(timeout):
            while not want(value := guest.status()):
                await asyncio.sleep(0.0005)
    except TimeoutError:
        raise DeviceStateError(f"waited {timeout} s for {what}; the guest reads "
                               f"{status_text(guest.status())}") from None
    return value


def _stopped_bit(dialect: StopDialect) -> int:
    return int(Status.SUSPEND) if dialect is StopDialect.SUSPEND else int(Status.STOP)


async def stop_not_offered(ctx: ScenarioContext) -> None:
    """Seed 1: no stop dialect offered; the guest's SUSPEND and STOP writes are counted faults."""
    ctx.with_dialect(StopDialect.NONE)
    src = await ctx.machine()
    guest = ctx.guest(src)
    io = _io(ctx, guest)
    await io.start()
    await io.io()
    for bit in (Status.SUSPEND, Status.STOP):
        guest.transport.set_status(LIVE | bit)
    await ctx.dev(src).settle()
    counted = ctx.dev(src).faults.counts[GuestFault.DIALECT_NOT_OFFERED]
    ctx.report.check(counted == 2, f"{counted} DIALECT_NOT_OFFERED faults counted, expected 2")
    ctx.report.check(guest.status() == LIVE, f"the guest reads {status_text(guest.status())} after its "
                                             f"stop writes, expected {status_text(LIVE)}")
    await io.io()


async def guest_stop(ctx: ScenarioContext) -> None:
    """Seed 2: the guest stops its device through the offered dialect, then resumes or resets."""
    if ctx.admin:
        await _owner_stop_resume(ctx)
        return
    dialect = ctx.need_dialect(StopDialect.SUSPEND, StopDialect.STOP)
    src = await ctx.machine()
    dev = ctx.dev(src)
    guest = ctx.guest(src)
    io = _io(ctx, guest)
    spec = dev.policy.dialect
    features = await io.start(spec.feature | spec.ring_state)
    ctx.report.check(features & spec.feature, "the guest could not negotiate the stop feature")
    await io.io()
    bit = _stopped_bit(dialect)
    guest.transport.set_status(guest.status() | bit)
    await _wait_status(guest, lambda v: v & bit, f"{dialect.value} to show")
    ctx.report.check(not dev.rings_running, "the rings still run after the guest's stop completed")
    _check_ring_states(ctx, guest, dev)
    await _resume_or_reset(ctx, guest, io, dialect, reset=dialect is StopDialect.STOP)


def _check_ring_states(ctx: ScenarioContext, guest: GuestDevice, dev: VirtioDevice) -> None:
    """With VIRTIO_F_RING_STATE negotiated, the registers read the bases the stop captured."""
    mask = dev.policy.dialect.ring_state
    if not mask or not guest.features & mask:
        return
    read = guest.read_ring_states()
    want = {index: state.base for index, state in dev.ring_states.items()}
    ctx.report.check(read == want, f"the ring-state registers read {read}, the device captured {want}")
    ctx.report.notes.append(f"ring-state registers at the stop: {read}")


async def _owner_mode(ctx: ScenarioContext, dev: VirtioDevice, stopped: bool) -> None:
    """DEV_MODE_SET on member 1 through the owner's admin queue (v1.4 §2.12.1.4)."""
    assert ctx.owner is not None
    await ctx.owner.dev_mode_set(1, stopped)
    ctx.report.check(dev.admin_stopped == stopped and dev.rings_running != stopped,
                     f"DEV_MODE_SET {'stop' if stopped else 'resume'} completed, the rings "
                     f"{'still run' if dev.rings_running else 'do not run'}")


async def _owner_stop_resume(ctx: ScenarioContext) -> None:
    """Seed 2 on the admin path: the owner stops and resumes the member; its guest reads DRIVER_OK."""
    src = await ctx.machine()
    dev = ctx.dev(src)
    guest = ctx.guest(src)
    io = _io(ctx, guest)
    await io.start()
    await io.io()
    await _owner_mode(ctx, dev, True)
    await _owner_mode(ctx, dev, False)
    await io.io()


async def _resume_or_reset(ctx: ScenarioContext, guest: GuestDevice, io: GuestIo, dialect: StopDialect,
                           *, reset: bool) -> None:
    if reset:
        await io.start(guest.features & ctx.dev(ctx.machines[-1]).policy.dialect.feature)
    else:
        guest.transport.set_status((guest.status() & ~int(Status.SUSPEND)) | Status.DRIVER_OK)
        await _wait_status(guest, lambda v: v == LIVE, "the resume to complete")
    await io.io()


async def vmm_migrates(ctx: ScenarioContext) -> None:
    """Seed 2.1: the VMM stops the device for a live migration; the guest never writes STOP."""
    src = await ctx.machine()
    dst = await ctx.destination(src)
    guest = ctx.guest(src)
    io = _io(ctx, guest)
    await io.start()
    await io.io()
    mark = len(guest.transport.status_log.values)
    done = asyncio.Event()

    async def load() -> None:
        while not done.is_set():
            await io.io()
            await asyncio.sleep(0)
    running = asyncio.ensure_future(load())
    try:
        await asyncio.sleep(0.01)
        report = await ctx.migrate(src, dst, guest)
        ctx.report.check(report.ok, "the migration did not complete")
        await asyncio.sleep(0.01)
    finally:
        done.set()
        await running
    await io.io()
    after = guest.transport.status_log.values[mark - 1:]
    ctx.report.check(after == [LIVE], f"the guest read {[status_text(v) for v in after]} during the "
                                      f"migration, expected only {status_text(LIVE)}")
    ctx.report.check(ctx.dev(dst).rings_running and not ctx.dev(src).rings_running,
                     "the destination does not run the rings (or the source still does)")


async def _owner_stop_then_migrate(ctx: ScenarioContext, *, reset: bool) -> None:
    """2.2 on the admin path: the owner stops the member, the VMM migrates the machine (owner and
    member: the group and the stopped mode are in the device states); on the destination the
    member stays stopped until the owner resumes it (DEV_MODE_SET), or its guest resets it."""
    src = await ctx.machine()
    dst = await ctx.destination(src)
    guest = ctx.guest(src)
    io = _io(ctx, guest)
    await io.start()
    await io.io()
    await _owner_mode(ctx, ctx.dev(src), True)
    report = await ctx.migrate(src, dst, guest)
    ctx.report.check(report.ok, "the migration did not complete")
    dev = ctx.dev(dst)
    ctx.report.check(dev.admin_stopped and not dev.rings_running,
                     "the destination runs the member the owner had stopped")
    ctx.report.check(guest.status() == LIVE, f"the member's guest reads {status_text(guest.status())} on the "
                                             f"destination, expected {status_text(LIVE)}")
    if reset:
        await io.start()        # a member's reset clears its stopped mode (v1.4 §2.12.1.4)
    else:
        await _owner_mode(ctx, dev, False)
    ctx.report.check(dev.rings_running, "the destination does not run the rings after the "
                                        + ("reset" if reset else "owner's resume"))
    await io.io()


async def _guest_stop_then_migrate(ctx: ScenarioContext, *, reset: bool) -> None:
    if ctx.admin:
        await _owner_stop_then_migrate(ctx, reset=reset)
        return
    allowed = (StopDialect.SUSPEND, StopDialect.STOP) if reset else (StopDialect.SUSPEND,)
    dialect = ctx.need_dialect(*allowed)
    src = await ctx.machine()
    dst = await ctx.destination(src)
    guest = ctx.guest(src)
    io = _io(ctx, guest)
    spec = ctx.dev(src).policy.dialect
    ctx.report.check(await io.start(spec.feature | spec.ring_state) & spec.feature,
                     "the guest could not negotiate the stop feature")
    await io.io()
    bit = _stopped_bit(dialect)
    guest.transport.set_status(guest.status() | bit)
    stopped = await _wait_status(guest, lambda v: v & bit, f"{dialect.value} to show")
    _check_ring_states(ctx, guest, ctx.dev(src))
    report = await ctx.migrate(src, dst, guest)
    ctx.report.check(report.ok, "the migration did not complete")
    shown = guest.status()
    ctx.report.check(shown == stopped, f"the destination presents {status_text(shown)}, the guest had "
                                       f"stopped at {status_text(stopped)}")
    await _resume_or_reset(ctx, guest, io, dialect, reset=reset)
    ctx.report.check(ctx.dev(dst).rings_running, "the destination does not run the rings after the "
                                                 + ("reset" if reset else "resume"))


async def guest_stop_migrate_resume(ctx: ScenarioContext) -> None:
    """Seed 2.2: the guest suspends, the VMM migrates, the guest resumes on the destination."""
    await _guest_stop_then_migrate(ctx, reset=False)


async def guest_stop_migrate_reset(ctx: ScenarioContext) -> None:
    """Seed 2.2, then the guest resets and initialises the device again on the destination."""
    await _guest_stop_then_migrate(ctx, reset=True)


#: How far the guest got through v1.4 §3.1.1 before the migration of scenario 2.3.
INIT_STAGES = ("never", "ack_driver", "features_ok")


async def half_initialised(ctx: ScenarioContext) -> None:
    """Seed 2.3: for each stage of :data:`INIT_STAGES`, migrate, then finish init on the destination."""
    for stage in INIT_STAGES:
        await ctx.close()
        src = await ctx.machine()
        dst = await ctx.destination(src)
        guest = ctx.guest(src)
        io = _io(ctx, guest)
        await _init_to(guest, io, stage)
        before = guest.status()
        report = await ctx.migrate(src, dst, guest)
        ctx.report.check(report.ok, f"{stage}: the migration did not complete")
        ctx.report.check(guest.status() == before, f"{stage}: the destination presents "
                                                   f"{status_text(guest.status())}, not {status_text(before)}")
        await io.finish_init()
        ctx.report.check(guest.status() == LIVE and ctx.dev(dst).rings_running,
                         f"{stage}: the device does not run after the guest finished its init")
        await io.io()
        ctx.report.notes.append(f"{stage}: migrated at {status_text(before)}, then initialised on the destination")


async def _init_to(guest: GuestDevice, io: GuestIo, stage: str) -> None:
    t = guest.transport
    await guest.reset()
    if stage == "never":
        return
    t.set_status(Status.ACKNOWLEDGE)
    t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    if stage == "features_ok":
        accepted = t.device_features() & (io.wanted | Feature.VERSION_1)
        t.set_driver_features(accepted)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        guest.features = accepted
        guest.queues.append(guest._setup_queue(0, io.queue_size))


#: The built-in scenarios (name -> :class:`Scenario`).
BASIC: dict[str, Scenario] = {s.name: s for s in (
    Scenario("1", "no stop feature offered: the guest's stop write is a counted fault", stop_not_offered),
    Scenario("2", "the guest stops its device (SUSPEND or STOP) and resumes or resets it", guest_stop),
    Scenario("2.1", "the VMM stops the device for live migration; the guest never writes STOP", vmm_migrates),
    Scenario("2.2", "the guest suspends, the VMM migrates, the guest resumes on the destination",
             guest_stop_migrate_resume),
    Scenario("2.2-reset", "the guest stops, the VMM migrates, the guest resets on the destination",
             guest_stop_migrate_reset),
    Scenario("2.3", "the guest has not initialised the device, or is half-way, when it is migrated",
             half_initialised),
)}
