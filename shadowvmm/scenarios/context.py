"""What a scenario runs with (:class:`ScenarioContext`) and what it reports (:class:`ScenarioReport`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import DeviceConfig, MachineConfig
from ..device import VirtioDevice
from ..errors import ScenarioError
from ..guest.admin import AdminClient
from ..guest.driver import GuestDevice
from ..machine import Machine
from ..migration.harness import move_guest
from ..migration.migrate import MigrationHooks, MigrationOptions, MigrationReport, migrate_in, migrate_out
from ..migration.stream import Endpoint
from ..shadow import StopDialect
from ..timeline import EventKind, Timeline
from ..virtio.constants import Status
from .peers import PeerSource

#: The status a running driver reads (v1.4 §3.1.1 steps 1-8 done).
LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
#: Level of the machines the built-in scenarios run (the host VMM).
L0 = "L0"
#: The admin-queue owner a scenario adds on the admin stop path (an rng owning the device, member 1).
OWNER = "adm0"


def status_text(value: int) -> str:
    names = "|".join(str(b.name) for b in Status if value & b) or "RESET"
    return f"{value:#04x} ({names})"


@dataclass
class ScenarioReport:
    """The outcome of one scenario: pass/fail with the reasons, and what was measured."""

    scenario: str
    device: str
    backend: str = ""
    transport: str = ""
    dialect: str = ""
    ok: bool = True
    reasons: list[str] = field(default_factory=list)
    #: Every distinct consecutive device_status value the guest read, per level.
    statuses: dict[str, list[int]] = field(default_factory=dict)
    status_reads: int = 0
    #: Requests the guest submitted and completions it saw (exactly once: equal, no violation).
    submitted: int = 0
    completed: int = 0
    violations: list[str] = field(default_factory=list)
    verified: int = 0
    mismatches: int = 0
    workload: str = "none"
    faults: dict[str, int] = field(default_factory=dict)
    stop_ms: float | None = None
    downtime_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    def check(self, condition: object, reason: str) -> bool:
        """Fail the scenario with *reason* unless *condition* holds."""
        if not condition:
            self.ok = False
            self.reasons.append(reason)
        return bool(condition)

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "device": self.device, "backend": self.backend,
                "transport": self.transport, "dialect": self.dialect, "ok": self.ok, "reasons": self.reasons,
                "statuses": {level: [f"{v:#04x}" for v in values] for level, values in self.statuses.items()},
                "status_reads": self.status_reads, "workload": self.workload, "submitted": self.submitted,
                "completed": self.completed, "exactly_once": self.exactly_once, "violations": self.violations,
                "verified_blocks": self.verified, "mismatches": self.mismatches, "faults": self.faults,
                "stop_ms": self.stop_ms, "downtime_ms": self.downtime_ms, "notes": self.notes}

    @property
    def exactly_once(self) -> bool:
        return self.submitted == self.completed and not self.violations

    def lines(self) -> list[str]:
        out = [f"scenario {self.scenario} on {self.device} ({self.backend}, {self.transport}, "
               f"stop dialect {self.dialect})"]
        for level, values in self.statuses.items():
            out.append(f"  {level} guest read device_status: {', '.join(status_text(v) for v in values)} "
                       f"({self.status_reads} reads)")
        out.append(f"  workload: {self.workload}; {self.submitted} requests, {self.completed} completions, "
                   f"exactly once: {'yes' if self.exactly_once else 'NO'}")
        out.append(f"  data: {self.verified} blocks verified, {self.mismatches} mismatches")
        if self.faults:
            out.append(f"  guest faults counted: {self.faults}")
        ms = lambda v: "n/a" if v is None else f"{v:.3f} ms"  # noqa: E731
        out.append(f"  stop latency {ms(self.stop_ms)}, downtime {ms(self.downtime_ms)}")
        out.extend(f"  note: {n}" for n in self.notes)
        out.append("RESULT: PASS" if self.ok else "RESULT: FAIL: " + "; ".join(self.reasons))
        return out


@dataclass
class ScenarioContext:
    """One run of a scenario against one configured device (its source and destination configs)."""

    name: str
    cfg: MachineConfig
    device: DeviceConfig
    peers: PeerSource
    timeline: Timeline
    workdir: Path
    report: ScenarioReport
    machines: list[Machine] = field(default_factory=list)
    guests: list[tuple[str, GuestDevice]] = field(default_factory=list)
    #: The admin stop path: each machine gets an owner (:data:`OWNER`) whose admin queue stops
    #: and resumes the device (DEV_MODE_SET, member 1) where the guest would write a status bit.
    admin: bool = False
    #: The owner's driver on the latest machine (admin path only).
    owner: AdminClient | None = None

    def with_dialect(self, dialect: StopDialect) -> None:
        """Run the device with *dialect* instead of its configured one (ring-state registers: STOP only)."""
        self.device = replace(self.device, stop_dialect=dialect,
                              ring_state=self.device.ring_state and dialect is StopDialect.STOP)
        self.report.dialect = dialect.value

    def need_dialect(self, *allowed: StopDialect) -> StopDialect:
        """The device's dialect if one of *allowed*; SUSPEND for a device configured with none."""
        dialect = self.device.stop_dialect
        if dialect is StopDialect.NONE and StopDialect.SUSPEND in allowed:
            self.with_dialect(StopDialect.SUSPEND)
            self.report.notes.append("the device offers no stop dialect in its config: SUSPEND used")
            return StopDialect.SUSPEND
        if dialect not in allowed:
            raise ScenarioError(f"scenario {self.name} needs the stop dialect {' or '.join(d.value for d in allowed)};"
                                f" {self.device.name} is configured with {dialect.value!r}")
        return dialect

    async def machine(self) -> Machine:
        """A machine with the device (its own backend endpoint), recording on the timeline."""
        machine = Machine(self.cfg.memory_mib << 20, timeline=self.timeline, level=L0)
        self.machines.append(machine)
        await self.peers.add(machine, self.device, 0)
        await self._add_owner(machine)
        return machine

    async def _add_owner(self, machine: Machine, *, start: bool = True) -> None:
        """The owner device; on a source its driver starts the admin queue and declares LIST_USE
        (a destination's owner takes its group from the migrated state)."""
        if not self.admin:
            return
        await machine.add_device(DeviceConfig(OWNER, "inproc", {"device": "rng"}, admin_members=(self.device.name,)))
        if not start:
            return
        self.owner = AdminClient(machine.guest(OWNER))
        if not self.machines[:-1]:
            self.guests.append((f"{L0} {OWNER}", self.owner.guest))     # the owner's driver, as a level
        await self.owner.start()
        await self.owner.list_use()

    async def destination(self, source: Machine) -> Machine:
        """A migration destination sharing *source*'s guest memory (the local model)."""
        machine = Machine(memory=source.memory, timeline=self.timeline, level=L0, suffix="@dst")
        self.machines.append(machine)
        await self.peers.add(machine, self.device, 1)
        await self._add_owner(machine, start=False)     # the owner's driver moves at the switch-over
        return machine

    def guest(self, machine: Machine, level: str = L0) -> GuestDevice:
        """The guest driver core of the device; its status reads go into the report."""
        guest = machine.guest(self.device.name)
        self.guests.append((level, guest))
        return guest

    def dev(self, machine: Machine) -> VirtioDevice:
        return machine.device(self.device.name)

    async def migrate(self, source: Machine, dest: Machine, guest: GuestDevice,
                      pause: Callable[[], Awaitable[None] | None] | None = None) -> MigrationReport:
        """Live-migrate the device (local model); the guest moves to *dest* at switch-over."""
        name = self.device.name
        endpoint = Endpoint.parse(f"unix:{self.workdir / 'migrate.sock'}")
        listener = await endpoint.listen()
        tap = self.timeline.tap(L0, "migration")
        def switch_over() -> None:
            move_guest(guest, source.device(name), dest.device(name), dest.slots[name].transport)
            if self.owner is not None and OWNER in dest.slots:
                move_guest(self.owner.guest, source.device(OWNER), dest.device(OWNER), dest.slots[OWNER].transport)
        hooks = MigrationHooks(pause_guest=pause, switch_over=switch_over)
        try:
            async def incoming() -> None:
                await migrate_in(dest, await listener.accept(10), timeline=tap)
            receiving = asyncio.ensure_future(incoming())
            try:
                report = await migrate_out(source, await endpoint.connect(), MigrationOptions(mode="local"),
                                           hooks, timeline=tap)
            except BaseException:
                receiving.cancel()          # a refused migration: the destination waits for nothing
                await asyncio.gather(receiving, return_exceptions=True)
                raise
            await asyncio.gather(receiving, return_exceptions=not receiving.done())
        finally:
            await listener.close()
        return report

    def finish(self) -> None:
        """Fill in the report from the guests' status logs, the devices' faults and the timeline."""
        report = self.report
        for level, guest in self.guests:
            log = guest.transport.status_log
            report.statuses.setdefault(level, []).extend(log.values)
            report.status_reads += log.reads
        for machine in self.machines:
            for slot in machine.slots.values():
                for fault, count in slot.device.faults.counts.items():
                    report.faults[fault.name] = report.faults.get(fault.name, 0) + count
        stops = [e for e in self.timeline.events if e.kind in (EventKind.STOP_START, EventKind.STOP_END)]
        start = next((e for e in stops if e.kind is EventKind.STOP_START), None)
        if start is not None:
            end = next((e for e in stops if e.kind is EventKind.STOP_END and e.t >= start.t
                        and e.device == start.device), None)
            report.stop_ms = None if end is None else round((end.t - start.t) * 1e3, 3)
        down = self.timeline.downtime()
        report.downtime_ms = None if down is None else round((down[1] - down[0]) * 1e3, 3)

    async def close(self) -> None:
        machines, self.machines = self.machines, []
        for machine in reversed(machines):
            await machine.close()
