"""What a chaos run does to the device (:mod:`.chaos`): guest, VMM and backend events.

:class:`Actions` is mixed into :class:`~.chaos.Run`, which owns the state the
actions read and change and the helpers they call (declared below for the
type checker).
"""

from __future__ import annotations

import asyncio
import enum
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..device import VirtioDevice
from ..guest.blk import BlkDriver
from ..guest.driver import GuestDevice
from ..machine import Machine
from ..migration.harness import move_guest
from ..migration.migrate import MigrationHooks, MigrationOptions, migrate_in, migrate_out
from ..migration.stream import Endpoint, Listener
from ..virtio.constants import Feature, Status
from .blkcheck import Writers
from .chaos_hosts import Host

if TYPE_CHECKING:
    from .chaos import Plan

QUEUE_SIZE = 64
NEEDS_RESET = int(Status.NEEDS_RESET)

T = TypeVar("T")


class Phase(enum.Enum):
    """Where the guest left the device."""

    RESET = "reset"
    PARTIAL = "partially initialised"
    LIVE = "live"
    SUSPENDED = "suspended"
    STOPPED = "stopped (STOP dialect)"


class Actions:
    """The actions of a run; each one notes what it did in the trace."""

    plan: Plan
    rnd: random.Random
    workdir: Path
    host: Host
    phase: Phase
    counts: dict[str, int]
    machines: list[Machine]
    device: VirtioDevice | None
    guest: GuestDevice | None
    driver: BlkDriver | None
    writers: Writers | None

    if TYPE_CHECKING:
        def note(self, text: str) -> None: ...

        def violation(self, text: str) -> AssertionError: ...

        async def bounded(self, awaitable: Awaitable[T], what: str, *, vmm: bool = False,
                          needs_reset_ends: bool = True) -> T: ...

        async def quiesce(self) -> None: ...

        def _needs_reset(self) -> bool: ...

        async def _add_device(self, index: int) -> tuple[Machine, VirtioDevice]: ...

    def pause_guest(self) -> None:
        assert self.writers is not None
        self.writers.freeze()

    def resume_guest(self) -> None:
        assert self.writers is not None
        self.writers.resume()

    def negotiated(self, feature: int) -> bool:
        return bool(self.guest is not None and self.guest.features & feature)

    async def act_init(self) -> None:
        """Reset and initialise in full; sometimes without waiting for the backend to start."""
        assert self.guest is not None and self.driver is not None and self.device is not None
        self.pause_guest()
        wait = self.rnd.random() < 0.7
        dialect_bit = self.device.policy.dialect.feature
        hook = self.guest._settle
        if not wait:
            self.guest._settle = None
        try:
            await self.bounded(self.driver.start(queue_size=QUEUE_SIZE,
                                                 extra_features=int(Feature.RING_RESET) | dialect_bit),
                               "reset and initialisation", needs_reset_ends=False)
        finally:
            self.guest._settle = hook
        self.note(f"initialised ({'waited for' if wait else 'did not wait for'} the backend start), "
                  f"features {self.guest.features:#x}")
        self.phase = Phase.LIVE
        self.resume_guest()

    async def act_partial(self) -> None:
        assert self.guest is not None
        self.pause_guest()
        guest, t = self.guest, self.guest.transport
        await self.bounded(guest.reset(), "reset", needs_reset_ends=False)
        stage = self.rnd.randrange(4)
        t.set_status(Status.ACKNOWLEDGE)
        if stage >= 1:
            t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        if stage >= 2:
            guest.features = t.device_features() & int(Feature.VERSION_1 | Feature.RING_RESET)
            t.set_driver_features(guest.features)
            t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        if stage >= 3:
            guest._start_interrupts()
            guest.queues.append(guest._setup_queue(0, QUEUE_SIZE))
        self.note(f"partial initialisation to stage {stage}")
        self.phase = Phase.PARTIAL

    async def act_reset(self) -> None:
        assert self.guest is not None
        self.pause_guest()
        await self.bounded(self.guest.reset(), "reset", needs_reset_ends=False)
        self.note("reset (requests in flight dropped)")
        self.phase = Phase.RESET

    async def act_queue_reset(self) -> None:
        assert self.guest is not None
        q = self.rnd.randrange(self.plan.queues)
        await self.bounded(self.guest.reset_queue(q), f"reset of queue {q}")
        await self.bounded(self.guest.restart_queue(q, QUEUE_SIZE), f"restart of queue {q}")
        self.note(f"queue {q} reset and set up again")

    async def act_suspend_resume(self) -> None:
        assert self.guest is not None
        await self.quiesce()
        t = self.guest.transport
        t.set_status(self.guest.status() | Status.SUSPEND)
        await self.bounded(self._until(lambda s: s & Status.SUSPEND and not s & Status.DRIVER_OK), "SUSPEND")
        self.phase = Phase.SUSPENDED
        self.note("suspended")
        await asyncio.sleep(self.rnd.random() * 0.02)
        if self.rnd.random() < 0.3:
            return      # stays suspended; a later action resumes or resets
        await self.act_resume()

    async def act_resume(self) -> None:
        assert self.guest is not None
        t = self.guest.transport
        t.set_status((self.guest.status() & ~int(Status.SUSPEND)) | Status.DRIVER_OK)
        await self.bounded(self._until(lambda s: s & Status.DRIVER_OK and not s & Status.SUSPEND), "resume")
        self.phase = Phase.LIVE
        self.note("resumed")
        self.resume_guest()

    async def act_stop(self) -> None:
        assert self.guest is not None
        await self.quiesce()
        self.guest.transport.set_status(self.guest.status() | Status.STOP)
        await self.bounded(self._until(lambda s: s & Status.STOP), "STOP")
        self.phase = Phase.STOPPED
        self.note("stopped through the STOP dialect")

    async def _until(self, ready: Callable[[int], Any]) -> None:
        assert self.guest is not None
        while not ready(self.guest.status()):
            await asyncio.sleep(0.0005)

    async def act_vmm_stop(self) -> None:
        assert self.device is not None
        hold = self.rnd.random() * 0.03
        await self.bounded(self.device.stop(), "VMM stop", vmm=True)
        await asyncio.sleep(hold)
        await self.bounded(self.device.resume(), "VMM resume", vmm=True)
        self.note(f"VMM stop, held {hold * 1e3:.0f} ms, resume")

    async def act_migrate(self) -> None:
        """Local migration to the other export; the guest keeps running."""
        assert self.device is not None and self.guest is not None
        source = self.device
        target = 1 - self.host.active
        machine, dest = await self._add_device(target)
        source_machine = next(m for m in self.machines if "blk0" in m.slots and m.slots["blk0"].device is source)
        guest = self.guest

        def switch_over() -> None:
            move_guest(guest, source, dest, machine.slots["blk0"].transport)

        endpoint = Endpoint.parse(f"unix:{self.workdir / 'migrate.sock'}")
        listener = await endpoint.listen()
        try:
            incoming = asyncio.ensure_future(self._incoming(listener, machine))
            try:
                report = await self.bounded(migrate_out(source_machine, await endpoint.connect(),
                                                        MigrationOptions(mode="local"),
                                                        MigrationHooks(switch_over=switch_over)),
                                            "local migration", vmm=True)
            except BaseException:
                incoming.cancel()
                raise
            await self.bounded(incoming, "incoming migration", vmm=True)
        finally:
            await listener.close()
        if not report.ok:
            raise self.violation(f"local migration failed: {report}")
        self.device = dest
        self.host.active = target
        self.machines.remove(source_machine)
        await source_machine.close()
        self.note(f"migrated to export {target} (downtime {getattr(report, 'downtime_ms', 0):.1f} ms)")

    @staticmethod
    async def _incoming(listener: Listener, machine: Machine) -> Any:
        return await migrate_in(machine, await listener.accept(10))

    async def act_backend_event(self) -> None:
        """kill -9, SIGTERM or a closed socket, then a restart on the same socket."""
        host = self.host
        kinds = ["kill", "term"] + (["close"] if host.can_close else [])
        kind = self.rnd.choice(kinds)
        delay = self.rnd.random() * 0.3
        before = self.guest.status() if self.guest is not None else 0
        t0 = time.monotonic()
        if kind == "close":
            await asyncio.to_thread(host.close_session)
        else:
            await asyncio.to_thread(host.kill, signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        if not self.plan.reconnect and before & Status.DRIVER_OK:
            await self.bounded(self._until(lambda s: s & NEEDS_RESET), "DEVICE_NEEDS_RESET after the loss",
                               needs_reset_ends=False)
            seen = time.monotonic() - t0
            if seen > 1.0:
                raise self.violation(f"DEVICE_NEEDS_RESET took {seen * 1e3:.0f} ms after the backend went")
        if kind != "close":
            await asyncio.sleep(delay)
            await asyncio.to_thread(host.restart)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.note(f"backend {kind}, back after {(time.monotonic() - t0) * 1e3:.0f} ms")

    async def act_io(self) -> None:
        assert self.writers is not None
        await asyncio.sleep(0.02 + self.rnd.random() * 0.08)
        self.note(f"I/O ({self.writers.completed} requests completed so far)")
