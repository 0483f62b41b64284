"""Command line: ``shadowvmm run | probe | bench``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field

from . import config as configmod
from .errors import DeviceFailedError, ShadowVmmError
from .lifecycle import unless_failed
from .guest.blk import BlkDriver
from .guest.rng import RngDriver
from .machine import Machine
from .virtio.constants import DeviceId, Status, feature_names, BlkFeature
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
    return ", ".join(f"{v:#04x} ({'|'.join(b.name for b in Status if v & b)})"
                     for v in sorted(values))


async def run(cfg: configmod.MachineConfig, out=sys.stdout) -> int:
    """The main job: bring up every device, drive I/O, stop transparently mid-I/O."""
    machine = Machine(cfg.memory_mib << 20)
    failures = 0
    try:
        for dev_cfg in cfg.devices:
            device = await machine.add_device(dev_cfg)
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


async def _run_blk(cfg, dev_cfg, device, guest, out) -> int:
    run_cfg = cfg.run
    driver = BlkDriver(guest)
    features = await driver.start(packed=dev_cfg.packed, queue_size=dev_cfg.queue_size)
    c = driver.config
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
    finally:
        finished.set()
        await stopper
    elapsed = time.perf_counter() - t0
    await driver.flush()
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


async def probe(socket: str, as_json: bool, timeout: float, out=sys.stdout) -> int:
    from .backends.vhost_user.probe import format_probe
    from .backends.vhost_user.probe import probe as do_probe
    info = await do_probe(socket, timeout)
    print(json.dumps(info, indent=2) if as_json else format_probe(info), file=out)
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shadowvmm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the configured machine's main job")
    p_run.add_argument("config")
    p_probe = sub.add_parser("probe", help="probe a vhost-user backend socket")
    p_probe.add_argument("socket")
    p_probe.add_argument("--json", action="store_true")
    p_probe.add_argument("--timeout", type=float, default=5.0)
    from .migration import cli as migration_cli
    migration_cli.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    _use_uvloop()
    try:
        if args.command == "run":
            return asyncio.run(run(configmod.load(args.config)))
        if args.command == "probe":
            return asyncio.run(probe(args.socket, args.json, args.timeout))
        if args.command == "migrate":
            return asyncio.run(migration_cli.run(args))
    except ShadowVmmError as exc:
        print(f"shadowvmm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
