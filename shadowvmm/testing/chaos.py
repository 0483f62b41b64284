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
import gc
import json
import logging
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..config import DeviceConfig
from ..device import VirtioDevice
from ..errors import ShadowVmmError
from ..guest.blk import BlkDriver
from ..guest.driver import GuestDevice
from ..lifecycle import ReconnectPolicy
from ..machine import Machine
from ..memory import GuestAllocator, GuestMemory
from ..shadow import StopDialect
from ..virtio.constants import Feature, Status
from .blkcheck import BLOCK, NeedsReset, Writers
from .chaos_actions import NEEDS_RESET, QUEUE_SIZE, Actions, Phase
from .chaos_hosts import HOSTS, IMAGE_BYTES, Host, InprocHost, QsdHost, RefHost

__all__ = ["BOUND", "HOSTS", "Host", "InprocHost", "Phase", "Plan", "QsdHost", "RefHost", "Resources", "Run",
           "Violation", "main", "run_seed"]

log = logging.getLogger(__name__)

#: Longest a guest operation may wait while DEVICE_NEEDS_RESET is not visible.
BOUND = 5.0
BLOCKS = IMAGE_BYTES // BLOCK
WORKERS_PER_QUEUE = 4

LIVE_STATUS = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)

T = TypeVar("T")


class Violation(AssertionError):
    """An invariant broke; the message says which, the trace says how we got there."""


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


class Run(Actions):
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
            return await self.writers.bounded(awaitable, what, needs_reset_ends=needs_reset_ends)
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
        except TimeoutError as exc:
            if not self._needs_reset():
                raise self.violation(f"requests still in flight {BOUND} s after the guest stopped making new "
                                     "ones") from exc
            raise NeedsReset("requests in flight to finish") from None

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

    async def run(self) -> dict[str, Any]:
        await asyncio.to_thread(lambda: None)      # the executor's thread exists before the baseline
        baseline = Resources.now()
        await self.setup()
        try:
            await self.act_init()
            await self.settled()
            warm = Resources.now()
            for _step in range(self.plan.steps):
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
        for _attempt in range(3):        # a NEEDS_RESET is allowed at any time: the guest resets
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
