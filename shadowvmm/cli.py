"""Command line: ``shadowvmm run | migrate | scenario`` plus the commands plugins add (``probe``).

Plugins add subcommands through the ``shadowvmm.commands`` entry-point group: each entry
resolves to a :class:`Command`. ``-v`` (INFO: lifecycle transitions) and ``--trace`` (DEBUG:
every backend message) work before or after the subcommand.

Every :class:`~shadowvmm.errors.ShadowVmmError` (a bad config above all: the
file, the key path and what was expected) ends the command with one line,
``shadowvmm: error: ...``, on stderr and exit code 2; an OS error outside
them (out of file descriptors) with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Protocol, TextIO

from . import config as configmod
from .backends.base import load_backend
from .device import VirtioDevice
from .errors import ConfigError, DeviceFailedError, GuestMemoryError, PluginError, ShadowVmmError
from .guest.blk import BlkDriver
from .guest.rng import RngDriver
from .lifecycle import unless_failed
from .machine import Machine
from .migration import cli as migration_cli
from .scenarios import cli as scenario_cli
from .testing.conformance.command import COMMAND as CHECK_COMMAND
from .timeline import Timeline
from .virtio.constants import BlkFeature, DeviceId, Status, feature_names
from .workload import StatusWatcher, blk_write_verify


@dataclass
class StopReport:
    in_flight_at_stop: int = 0
    stop_ms: float = 0.0
    held_ms: float = 0.0
    kicks_while_stopped: int = 0
    ring_states: list[tuple[int, int]] = field(default_factory=list)


async def _stop_midway(device, guest, after: int, hold: float, report: StopReport,
                       finished: asyncio.Event) -> None:
    while (sum(q.completed for q in guest.queues) < after
           or not sum(q.ring.in_flight for q in guest.queues)) and not finished.is_set():
        await asyncio.sleep(0.0001)
    report.in_flight_at_stop = sum(q.ring.in_flight for q in guest.queues)
    kicks = device.stats.kicks
    t0 = time.perf_counter()
    states = await device.stop()
    report.stop_ms = (time.perf_counter() - t0) * 1e3
    report.ring_states = [(s.index, s.base) for s in states]
    await asyncio.sleep(hold)
    report.kicks_while_stopped = device.stats.kicks - kicks
    report.held_ms = (time.perf_counter() - t0) * 1e3
    await device.resume()


def _status_text(values: set[int]) -> str:
    return ", ".join(f"{v:#04x} ({'|'.join(str(b.name) for b in Status if v & b)})"
                     for v in sorted(values))


def _machine(cfg: configmod.MachineConfig) -> Machine:
    try:
        return Machine(cfg.memory_mib << 20)
    except OSError as exc:
        raise cfg.error("machine.memory_mib", f"cannot map {cfg.memory_mib} MiB of guest memory: "
                                              f"{exc.strerror or exc}") from exc


async def _add_device(machine: Machine, cfg: configmod.MachineConfig, index: int) -> VirtioDevice:
    """Build device *index*. A ConfigError from its backend (refusing an option when built, or
    when it connects: a queue count the back-end lacks) names the file and the full key path."""
    dev_cfg = cfg.devices[index]
    factory = load_backend(dev_cfg.backend)
    try:
        return await machine.add_device(dev_cfg, factory(dev_cfg.backend_config))
    except ConfigError as exc:
        raise cfg.backend_error(index, exc) from exc


async def run(cfg: configmod.MachineConfig, out=sys.stdout) -> int:
    """The main job: bring up every device, drive I/O, stop transparently mid-I/O."""
    machine = _machine(cfg)
    failures = 0
    try:
        for index, dev_cfg in enumerate(cfg.devices):
            device = await _add_device(machine, cfg, index)
            guest = machine.guest(dev_cfg.name)
            print(f"== {dev_cfg.name}: {device.device_id.name} over {dev_cfg.transport}, "
                  f"backend {dev_cfg.backend} ({device.backend.implementation})", file=out)
            try:
                if device.device_id == DeviceId.BLOCK:
                    failures += await unless_failed(device, _run_blk(cfg, dev_cfg, device, guest, out))
                elif device.device_id == DeviceId.RNG:
                    failures += await unless_failed(device, _run_rng(dev_cfg, guest, out))
                else:
                    print("   (no workload for this device type)", file=out)
            except DeviceFailedError as exc:
                failures += 1
                print(f"   FAILED: the backend of {dev_cfg.name} failed: {exc.__cause__ or exc}", file=out)
            except GuestMemoryError as exc:
                raise cfg.error("machine.memory_mib", f"{cfg.memory_mib} MiB of guest memory does not hold "
                                                      f"{dev_cfg.name}'s rings and buffers ({exc})") from exc
            guest.close()
            print(f"   guest faults counted: {device.faults.total}", file=out)
    finally:
        await machine.close()
    print("RESULT:", "PASS" if not failures else f"FAIL ({failures})", file=out)
    return 1 if failures else 0


async def _run_rng(dev_cfg, guest, out) -> int:
    rng = RngDriver(guest)
    await rng.start(packed=dev_cfg.packed)
    data = await rng.read(64)
    print(f"   rng: read {len(data)} bytes: {data[:16].hex()}...", file=out)
    return int(len(data) != 64)


def _check_run(cfg: configmod.MachineConfig, dev_cfg: configmod.DeviceConfig, driver: BlkDriver) -> None:
    """The [run] table against what the started disk offers (its size, its request slots)."""
    slots = min(min(queue.size, driver.slots_per_queue) for queue in driver.dev.queues)
    if cfg.run.queue_depth > slots:
        raise cfg.error("run.queue_depth", f"{cfg.run.queue_depth} is more than the {slots} requests "
                                           f"{dev_cfg.name} takes per queue (its queue_size, at most "
                                           f"{driver.slots_per_queue})")
    if cfg.run.request_bytes > driver.capacity_bytes:
        raise cfg.error("run.request_bytes", f"{cfg.run.request_bytes} is larger than {dev_cfg.name}'s "
                                             f"disk ({driver.capacity_bytes} bytes)")


async def _run_blk(cfg, dev_cfg, device, guest, out) -> int:
    run_cfg = cfg.run
    driver = BlkDriver(guest)
    features = await driver.start(packed=dev_cfg.packed, queue_size=dev_cfg.queue_size)
    _check_run(cfg, dev_cfg, driver)
    c = driver.config
    assert c is not None
    print(f"   negotiated: {', '.join(feature_names(features, BlkFeature))}", file=out)
    print(f"   capacity {driver.capacity_bytes >> 20} MiB, {c.num_queues} queue(s), "
          f"seg_max {c.seg_max}, id {await driver.get_id()!r}", file=out)
    watcher = StatusWatcher(guest.status).start()
    report = StopReport()
    finished = asyncio.Event()
    stopper = asyncio.create_task(_stop_midway(device, guest, run_cfg.stop_after,
                                               run_cfg.stop_hold_ms / 1e3, report, finished))
    t0 = time.perf_counter()
    try:
        res = await blk_write_verify(driver, requests=run_cfg.requests,
                                     queue_depth=run_cfg.queue_depth,
                                     block_bytes=run_cfg.request_bytes, seed=run_cfg.seed)
        finished.set()
        await stopper
        elapsed = time.perf_counter() - t0
        await driver.flush()
    finally:
        if not stopper.done():      # the run failed: the stop/resume cycle has nothing to finish
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
        await watcher.stop()
    ok = not res.mismatches and watcher.values == {int(Status.ACKNOWLEDGE | Status.DRIVER
                                                       | Status.FEATURES_OK | Status.DRIVER_OK)}
    print(f"   I/O: {res.writes} writes + {res.reads} read-back of {run_cfg.request_bytes} B "
          f"in {elapsed:.2f} s, {len(res.mismatches)} mismatches", file=out)
    print(f"   transparent stop after {run_cfg.stop_after} completions: "
          f"{report.in_flight_at_stop} requests in flight, stop took {report.stop_ms:.2f} ms, "
          f"held {report.held_ms:.1f} ms, {report.kicks_while_stopped} guest kicks while stopped",
          file=out)
    print(f"   ring state at stop (queue, last_avail): {report.ring_states}", file=out)
    print(f"   guest read device_status {watcher.reads} times, values seen: "
          f"{_status_text(watcher.values)}", file=out)
    return 0 if ok else 1


COMMANDS_GROUP = "shadowvmm.commands"


class Command(Protocol):
    """A subcommand a plugin adds (entry-point group ``shadowvmm.commands``)."""

    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    async def run(self, args: argparse.Namespace, out: TextIO) -> int: ...


def plugin_commands() -> dict[str, Command]:
    """The registered plugin commands; an entry point that fails to import raises PluginError."""
    found: dict[str, Command] = {}
    for ep in metadata.entry_points(group=COMMANDS_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:
            raise PluginError(f"command {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
    return found


def _runner() -> asyncio.Runner:
    """An event loop for one command, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).splitlines()) or type(exc).__name__


def _verbosity() -> argparse.ArgumentParser:
    """The logging options, accepted before and after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log lifecycle transitions (INFO)")
    common.add_argument("--trace", action="store_true", default=argparse.SUPPRESS,
                        help="log every backend message in both directions (DEBUG)")
    return common


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    common = _verbosity()
    parser = argparse.ArgumentParser(prog="shadowvmm", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the configured machine's main job", parents=[common])
    p_run.add_argument("config")
    migration_cli.add_parser(sub, parents=[common])
    scenario_cli.add_parser(sub, parents=[common])
    for name, command in sorted(commands.items()):
        command.add_arguments(sub.add_parser(name, help=command.help, parents=[common]))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        commands = {"check": CHECK_COMMAND, **plugin_commands()}
    except ShadowVmmError as exc:
        print(f"shadowvmm: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    args = build_parser(commands).parse_args(argv)
    level = logging.DEBUG if getattr(args, "trace", False) else \
        logging.INFO if getattr(args, "verbose", False) else logging.ERROR
    logging.basicConfig(level=level, format="%(relativeCreated)9.3f %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            cfg = configmod.load(args.config)
            with _runner() as runner:
                return runner.run(run(cfg, sys.stdout))
        if args.command in commands:
            with _runner() as runner:
                return runner.run(commands[args.command].run(args, sys.stdout))
        if args.command == "migrate":
            timeline = Timeline() if args.timeline or args.plot else None
            with _runner() as runner:
                code = runner.run(migration_cli.run(args, timeline=timeline))
            if timeline is not None:
                scenario_cli.write_outputs(timeline, args.timeline, args.plot, "shadowvmm migrate")
            return code
        if args.command == "scenario":
            with _runner() as runner:
                return runner.run(scenario_cli.run(args, sys.stdout))
    except ShadowVmmError as exc:
        print(f"shadowvmm: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"shadowvmm: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
