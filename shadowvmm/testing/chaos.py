"""Random event orders against real peers: a seeded, model-based lifecycle test.

One run drives a virtio-blk device through a random interleaving of guest,
VMM and backend events while guest workers write and read known data:

* guest: full and partial initialisation, reset, immediate re-initialisation,
  per-queue reset, SUSPEND/resume (virtio 1.4 dialect), STOP then reset
  (2021 dialect);
* VMM: transparent stop/resume, local migration to the backend's other export
  (and back on the next migration), a migration of a guest-stopped device
  (seed scenario 2.2) followed by the reset the STOP dialect requires;
* backend: kill -9, SIGTERM, the backend closing its socket, each followed by
  a restart on the same socket after a random delay.

Invariants, checked all along:

* no guest operation waits longer than :data:`BOUND` seconds unless
  DEVICE_NEEDS_RESET is visible;
* every write the guest saw complete is on disk (guest read-backs during the
  run, the image file at the end), and no block holds data nobody wrote;
* no request completes twice (the guest ring refuses a used entry for a
  descriptor it does not own: a violation);
* the guest reads only status values it wrote, plus DEVICE_NEEDS_RESET and the
  states its own stop dialect presents;
* file descriptors, tasks and memory mappings come back to where they were.

The same seed gives the same sequence of actions (the timing of the peers
does not repeat exactly). ``python -m shadowvmm.testing.chaos`` runs seeds
until a time budget is spent (``make soak``); a failing seed is printed with
its trace so it can become a regression test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import gc
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..backends.base import Backend, load_backend
from ..backends.inproc import InProcBackend
from ..config import DeviceConfig
from ..device import VirtioDevice
from ..errors import ShadowVmmError
from ..guest.blk import BlkDriver
from ..guest.driver import GuestDevice
from ..lifecycle import ReconnectPolicy
from ..machine import Machine
from ..memory import GuestAllocator, GuestMemory
from ..migration.harness import move_guest
from ..migration.migrate import MigrationHooks, MigrationOptions, migrate_in, migrate_out
from ..migration.stream import Endpoint
from ..shadow import StopDialect
from ..virtio.constants import Feature, Status
from .blkcheck import BLOCK, NeedsReset, Writers
from .peers import QsdBlk, RefBlk

log = logging.getLogger(__name__)

#: Longest a guest operation may wait while DEVICE_NEEDS_RESET is not visible.
BOUND = 5.0
IMAGE_BYTES = 8 << 20
BLOCKS = IMAGE_BYTES // BLOCK
QUEUE_SIZE = 64
WORKERS_PER_QUEUE = 4

NEEDS_RESET = int(Status.NEEDS_RESET)
LIVE_STATUS = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)

T = TypeVar("T")


class Violation(AssertionError):
    """An invariant broke; the message says which, the trace says how we got there."""


class Phase(enum.Enum):
    RESET = "reset"
    PARTIAL = "partially initialised"
    LIVE = "live"
    SUSPENDED = "suspended"
    STOPPED = "stopped (STOP dialect)"


@dataclass(frozen=True)
class Plan:
    """What a seed chose: the backend and how the device is set up."""

    backend: str            #: qsd | ref | inproc
    queues: int
    transport: str          #: pci-msix | pci-intx | mmio
    dialect: StopDialect
    reconnect: bool
    steps: int
    seed: int

    @classmethod
    def from_seed(cls, seed: int, backend: str, queues: int, steps: int) -> Plan:
        rnd = random.Random(seed)
        transport = rnd.choice(["pci-msix", "pci-msix", "pci-intx", "mmio"])
        dialect = rnd.choice([StopDialect.NONE, StopDialect.SUSPEND, StopDialect.STOP])
        reconnect = backend != "inproc" and rnd.random() < 0.5
        return cls(backend, queues, transport, dialect, reconnect, steps, seed)

    def describe(self) -> str:
        return (f"seed={self.seed} backend={self.backend} queues={self.queues} transport={self.transport} "
                f"dialect={self.dialect.value} reconnect={'on' if self.reconnect else 'off'} steps={self.steps}")


# ---------------------------------------------------------------------- backends


class Host:
    """The backend side of a run: its peers, and a backend object per device built on them.

    Two exports (or processes, or models) of one image, so a local migration has
    somewhere to go; ``active`` is the one the device uses now.
    """

    can_kill = False
    can_close = False

    def __init__(self, workdir: Path, queues: int) -> None:
        self.workdir = workdir
        self.queues = queues
        self.image = workdir / "disk.img"
        self.active = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def backend(self, index: int) -> Backend:
        raise NotImplementedError

    def kill(self, sig: int) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def close_session(self) -> None:
        raise NotImplementedError

    def log_tail(self) -> str:
        return ""

    def read_image(self) -> bytes:
        return self.image.read_bytes()


class QsdHost(Host):
    can_kill = True
    can_close = True

    def __init__(self, workdir: Path, queues: int) -> None:
        super().__init__(workdir, queues)
        self.peer = QsdBlk(workdir, image=self.image, size=IMAGE_BYTES, create=True, num_queues=queues,
                           exports=2, qmp=True)

    def start(self) -> None:
        self.peer.start()

    def stop(self) -> None:
        self.peer.stop()

    def backend(self, index: int) -> Backend:
        return load_backend("vhost-user")({"socket": str(self.peer.socket_paths[index]), "device": "blk",
                                 "queues": self.queues, "timeout": 3.0})

    def kill(self, sig: int) -> None:
        self.peer.kill(sig)

    def restart(self) -> None:
        self.peer.restart()

    def close_session(self) -> None:
        self.peer.close_export(self.active)
        self.peer.add_export(self.active)

    def log_tail(self) -> str:
        return self.peer.log_tail()


class RefHost(Host):
    """Two reference back-end processes on one image (INFLIGHT_SHMFD, with request latency)."""

    can_kill = True
    can_close = True

    def __init__(self, workdir: Path, queues: int) -> None:
        super().__init__(workdir, queues)
        self.peers = [RefBlk(workdir, image=self.image, size=IMAGE_BYTES, create=i == 0, queues=queues,
                             latency_us=2000, latency_data_only=True, name=f"refblk{i}") for i in range(2)]

    def start(self) -> None:
        for peer in self.peers:
            peer.start()

    def stop(self) -> None:
        for peer in self.peers:
            peer.stop()

    def backend(self, index: int) -> Backend:
        return load_backend("vhost-user")({"socket": str(self.peers[index].socket_path), "device": "blk",
                                 "queues": self.queues, "timeout": 3.0})

    def kill(self, sig: int) -> None:
        self.peers[self.active].kill(sig)

    def restart(self) -> None:
        self.peers[self.active].restart()

    def close_session(self) -> None:
        self.peers[self.active].drop_session()

    def log_tail(self) -> str:
        return "\n".join(peer.log_tail() for peer in self.peers)


class InprocHost(Host):
    def start(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_BYTES)

    def backend(self, index: int) -> Backend:
        return InProcBackend({"device": "blk", "image": str(self.image), "size": IMAGE_BYTES,
                              "queues": self.queues, "latency_us": 1500})


HOSTS: dict[str, Callable[[Path, int], Host]] = {"qsd": QsdHost, "ref": RefHost, "inproc": InprocHost}


# ---------------------------------------------------------------------- the guest's model


@dataclass
class Resources:
    fds: int
    tasks: int
    maps: int
    task_names: tuple[str, ...] = ()

    @classmethod
    def now(cls) -> Resources:
        gc.collect()
        with open("/proc/self/maps") as maps:
            count = sum(1 for _ in maps)
        tasks = asyncio.all_tasks()
        names = tuple(sorted(f"{t.get_name()}:{t.get_coro().__qualname__}" for t in tasks))  # type: ignore[union-attr]
        return cls(len(os.listdir("/proc/self/fd")), len(tasks), count, names)


class Run:
    """One seeded run (module docstring)."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.rnd = random.Random(plan.seed * 7919 + 1)
        self.workdir = workdir
        self.host = HOSTS[plan.backend](workdir, plan.queues)
        self.trace: list[str] = []
        self.phase = Phase.RESET
        self.written: set[int] = {0}
        self.counts: dict[str, int] = {}
        self.memory: GuestMemory | None = None
        self.machines: list[Machine] = []
        self.device: VirtioDevice | None = None
        self.guest: GuestDevice | None = None
        self.driver: BlkDriver | None = None
        self.writers: Writers | None = None
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ setup

    def note(self, text: str) -> None:
        self.trace.append(f"{time.monotonic() - self.t0:8.3f} {self.phase.value:>22}: {text}")

    def violation(self, text: str) -> Violation:
        return Violation(f"{text}\n{self.plan.describe()}\ntrace:\n" + "\n".join(self.trace[-40:])
                         + f"\ndevice:\n{self.describe_device()}"
                         + (f"\npeer log:\n{self.host.log_tail()}" if self.host.log_tail() else ""))

    def describe_device(self) -> str:
        device, guest = self.device, self.guest
        if device is None or guest is None:
            return "(none)"
        lines = [f"link {device.link.value}, run state {device.run_state.value}, started {device.started}, "
                 f"rings running {device.rings_running}, live rings {sorted(device._live_rings)}, "
                 f"held kicks {sorted(device._held_kicks)}, ring states {device.ring_states}, "
                 f"guest status {guest.status():#04x}"]
        load = device.memory.load_u16
        for q, gq in zip(device.queues, guest.queues):
            if q.set_up:
                lines.append(f"queue {q.index}: avail idx {load(q.driver + 2)}, used idx {load(q.device + 2)}, "
                             f"guest in flight {gq.ring.in_flight}, guest last used {gq.ring.last_used_idx}")
        lines += [f"event {e.at - self.t0:8.3f} {e.kind.value}: {e.detail}" for e in device.events.events[-12:]]
        return "\n".join(lines)

    def device_config(self) -> DeviceConfig:
        plan = self.plan
        policy = ReconnectPolicy.bounded(0.02, 3.0) if plan.reconnect else ReconnectPolicy.off(0.02)
        return DeviceConfig("blk0", "chaos", {}, transport="mmio" if plan.transport == "mmio" else "pci",
                            queue_size=QUEUE_SIZE, num_queues=plan.queues, stop_dialect=plan.dialect,
                            reconnect=policy)

    async def _add_device(self, index: int) -> tuple[Machine, VirtioDevice]:
        assert self.memory is not None
        machine = Machine(memory=self.memory)
        self.machines.append(machine)
        device = await machine.add_device(self.device_config(), self.host.backend(index))
        return machine, device

    def _watch_status(self, guest: GuestDevice) -> None:
        transport = guest.transport
        original = transport.set_status

        def set_status(value: int) -> None:
            self.written.add(int(value) & 0xFF)
            original(value)

        transport.set_status = set_status  # type: ignore[method-assign]

    async def setup(self) -> None:
        self.host.start()
        self.memory = GuestMemory.create([(0, 48 << 20)])
        allocator = GuestAllocator(self.memory, start=0x1000)
        machine, device = await self._add_device(0)
        self.device = device
        guest = GuestDevice(machine.guest_transport("blk0", msix=self.plan.transport == "pci-msix"),
                            self.memory, device.interrupts, allocator, settle=device.settle)  # type: ignore[arg-type]
        self._watch_status(guest)
        self.guest = guest
        self.driver = BlkDriver(guest, slots_per_queue=WORKERS_PER_QUEUE * 2)
        self.writers = Writers(self.driver, queues=self.plan.queues, writers=self.plan.queues * WORKERS_PER_QUEUE,
                               blocks=BLOCKS, seed=self.plan.seed, think=0.002, bound=BOUND,
                               needs_reset=self._needs_reset)
        self.writers.start()
        self.writers.freeze()

    async def teardown(self) -> None:
        if self.writers is not None:
            await self.writers.stop()
        if self.guest is not None:
            self.guest.close()
        for machine in self.machines:
            await machine.close()
        self.machines = []
        self.device = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.host.stop()

    # ------------------------------------------------------------------ guest workers

    async def bounded(self, awaitable: Awaitable[T], what: str, *, vmm: bool = False,
                      needs_reset_ends: bool = True) -> T:
        """Await *awaitable* at most :data:`BOUND` s, unless DEVICE_NEEDS_RESET shows up.

        A reset is what clears DEVICE_NEEDS_RESET, so it is waited for (``needs_reset_ends``
        False): the run has brought the backend back, so the reset must complete in time.
        """
        assert self.writers is not None
        try:
            return await self.writers.bounded(awaitable, what, needs_reset_ends=needs_reset_ends)  # type: ignore
        except TimeoutError as exc:
            raise self.violation(f"{'VMM' if vmm else 'guest'} operation: {exc}") from None

    def _needs_reset(self) -> bool:
        assert self.guest is not None
        return bool(self.guest.status() & NEEDS_RESET)

    async def quiesce(self) -> None:
        """Stop the guest making new requests and wait for the ones in flight."""
        assert self.writers is not None
        try:
            await self.writers.pause(BOUND)
        except TimeoutError:
            if not self._needs_reset():
                raise self.violation(f"requests still in flight {BOUND} s after the guest stopped making new ones")
            raise NeedsReset("requests in flight to finish") from None

    def pause_guest(self) -> None:
        assert self.writers is not None
        self.writers.freeze()

    def resume_guest(self) -> None:
        assert self.writers is not None
        self.writers.resume()

    # ------------------------------------------------------------------ status legality

    def check_status(self) -> None:
        assert self.guest is not None and self.writers is not None
        if self.writers.violations:
            raise self.violation(f"guest I/O: {self.writers.violations[:4]}")
        if self.guest.violations:
            raise self.violation(f"the device broke the ring protocol: {self.guest.violations}")
        legal = set()
        for value in self.written:
            legal |= {value, value & ~int(Status.DRIVER_OK),                  # SUSPEND presented
                      (value & ~int(Status.SUSPEND)) | int(Status.DRIVER_OK)}  # resumed
        log_values = self.guest.transport.status_log.values
        for value in log_values:
            if value & ~NEEDS_RESET not in legal:
                raise self.violation(f"the guest read status {value:#04x}, which it never wrote "
                                     f"(wrote {sorted(hex(v) for v in self.written)})")
        del log_values[:-1]

    # ------------------------------------------------------------------ actions

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
        self.note(f"migrated to export {target} (downtime {getattr(report, 'downtime_s', 0) * 1e3:.1f} ms)")

    @staticmethod
    async def _incoming(listener: Any, machine: Machine) -> Any:
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

    # ------------------------------------------------------------------ the run

    def choose(self) -> tuple[str, Callable[[], Awaitable[None]]]:
        rnd, phase, plan = self.rnd, self.phase, self.plan
        if self.guest is not None and self._needs_reset():
            failure = self.device.failure if self.device is not None else None
            self.note(f"DEVICE_NEEDS_RESET shown: {failure}")
            return "recover", self.act_init
        options: list[tuple[float, str, Callable[[], Awaitable[None]]]] = [
            (1.0, "init", self.act_init), (0.3, "reset", self.act_reset), (0.3, "partial", self.act_partial)]
        if phase is Phase.LIVE:
            options += [(3.0, "io", self.act_io), (1.0, "vmm stop", self.act_vmm_stop),
                        (0.6, "migrate", self.act_migrate)]
            if self.negotiated(Feature.RING_RESET):
                options.append((0.8, "queue reset", self.act_queue_reset))
            if plan.dialect is StopDialect.SUSPEND and self.negotiated(Feature.SUSPEND):
                options.append((0.8, "suspend", self.act_suspend_resume))
            if plan.dialect is StopDialect.STOP and self.device is not None \
                    and self.negotiated(self.device.policy.dialect.feature):
                options.append((0.5, "stop", self.act_stop))
        elif phase is Phase.SUSPENDED:
            options += [(2.0, "resume", self.act_resume), (0.5, "vmm stop", self.act_vmm_stop),
                        (0.3, "migrate", self.act_migrate)]
        elif phase is Phase.STOPPED:
            options += [(1.0, "migrate", self.act_migrate)]     # scenario 2.2, then a reset
        elif phase in (Phase.RESET, Phase.PARTIAL):
            options += [(0.3, "migrate", self.act_migrate), (0.3, "vmm stop", self.act_vmm_stop)]
        if self.host.can_kill and phase is not Phase.STOPPED:
            options.append((0.8, "backend", self.act_backend_event))
        total = sum(weight for weight, _, _ in options)
        pick = rnd.random() * total
        for weight, name, action in options:
            pick -= weight
            if pick <= 0:
                return name, action
        return options[-1][1], options[-1][2]

    async def act_io(self) -> None:
        assert self.writers is not None
        await asyncio.sleep(0.02 + self.rnd.random() * 0.08)
        self.note(f"I/O ({self.writers.completed} requests completed so far)")

    async def run(self) -> dict[str, Any]:
        await asyncio.to_thread(lambda: None)      # the executor's thread exists before the baseline
        baseline = Resources.now()
        await self.setup()
        try:
            await self.act_init()
            await self.settled()
            warm = Resources.now()
            for step in range(self.plan.steps):
                name, action = self.choose()
                self.counts[name] = self.counts.get(name, 0) + 1
                try:
                    await action()
                except NeedsReset as exc:
                    self.note(f"{name}: DEVICE_NEEDS_RESET seen while waiting for {exc}")
                except ShadowVmmError as exc:
                    if not self._needs_reset():
                        raise self.violation(f"{name} failed without DEVICE_NEEDS_RESET: {exc!r}") from exc
                    self.note(f"{name}: {exc} (DEVICE_NEEDS_RESET shown)")
                self.check_status()
                await asyncio.sleep(self.rnd.random() * 0.01)
            await self.finish()
            await self.settled()
            end = Resources.now()
            if end.fds > warm.fds + 2 or end.tasks > warm.tasks or end.maps > warm.maps + 32:
                extra = sorted(set(end.task_names) - set(warm.task_names))
                raise self.violation(f"resources grew over the run: {warm} -> {end}; new tasks {extra}")
        finally:
            await self.teardown()
        self.verify_image()
        after = Resources.now()
        if after.fds != baseline.fds or after.tasks != baseline.tasks:
            raise self.violation(f"resources left behind: {baseline} -> {after}")
        assert self.writers is not None
        return {"seed": self.plan.seed, "plan": self.plan.describe(), "completed": self.writers.completed,
                "failed_requests": self.writers.failed, "actions": self.counts}

    async def settled(self) -> None:
        """Every operation the device has queued carried out (its tasks are what they will be)."""
        assert self.device is not None
        await self.bounded(self.device.settle(), "settle", vmm=True)

    async def finish(self) -> None:
        """Back to a live device, every block read back through the guest, then the image file
        (after the run's teardown, see :meth:`verify_image`)."""
        if self.phase is not Phase.LIVE or self._needs_reset():
            await self.act_init()
        assert self.driver is not None and self.writers is not None
        for attempt in range(3):        # a NEEDS_RESET is allowed at any time: the guest resets
            try:
                await self.quiesce()
                mismatches = await self.bounded(self.writers.check_through(self.driver, WORKERS_PER_QUEUE),
                                                "final read-back")
                break
            except NeedsReset:
                self.note(f"final read-back: DEVICE_NEEDS_RESET ({self.device.failure if self.device else None})")
                await self.act_init()
        else:
            raise self.violation("the final read-back kept failing with DEVICE_NEEDS_RESET")
        await self.bounded(self.driver.flush(), "flush")
        if mismatches:
            raise self.violation(f"{len(mismatches)} blocks read back wrong: {mismatches[:8]}")
        self.note(f"read back {BLOCKS} blocks through the guest")

    def verify_image(self) -> None:
        assert self.writers is not None
        bad = self.writers.check_image(self.host.read_image())
        if bad:
            raise self.violation(f"{len(bad)} blocks of the image file differ from what the guest read: {bad[:8]}")


async def run_seed(seed: int, backend: str, queues: int, steps: int, workdir: Path | None = None) -> dict[str, Any]:
    """One seeded run; raises :class:`Violation` with the trace."""
    plan = Plan.from_seed(seed, backend, queues, steps)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shadowvmm-chaos-")))
        return await Run(plan, workdir).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=sorted(HOSTS),
                        help="backends to rotate through (default: qsd, ref, inproc)")
    parser.add_argument("--queues", type=int, action="append", help="queue counts to rotate through (default 2, 4)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=0, help="number of seeds (0: until --minutes)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    backends = args.backend or ["qsd", "ref", "inproc"]
    queue_counts = args.queues or [2, 4]
    logging.basicConfig(level=logging.CRITICAL)
    deadline = time.monotonic() + args.minutes * 60
    seed, runs, failures = args.first_seed, 0, []
    while (args.seeds and runs < args.seeds) or (not args.seeds and time.monotonic() < deadline):
        backend = backends[runs % len(backends)]
        queues = queue_counts[(runs // len(backends)) % len(queue_counts)]
        try:
            result = asyncio.run(run_seed(seed, backend, queues, args.steps))
            print(json.dumps(result) if args.json else f"ok   {result['plan']}: {result['completed']} requests",
                  flush=True)
        except Exception as exc:        # a violation, or the harness itself: either is reported
            failures.append(seed)
            detail = str(exc) if isinstance(exc, Violation) else "".join(traceback.format_exception(exc))
            print(f"FAIL seed {seed} ({backend}, {queues} queues, {args.steps} steps):\n{detail}", flush=True)
        seed += 1
        runs += 1
    summary = {"runs": runs, "failures": failures, "first_seed": args.first_seed, "last_seed": seed - 1}
    print(json.dumps(summary), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
