"""``shadowvmm run CONFIG``: bring up every device, drive its workload, report.

The config's ``[[peer]]`` tables are started first and stopped after
(:class:`~shadowvmm.scenarios.peers.StartedPeers`, the scenarios' code). Each device type's
workload is one entry of :data:`WORKLOADS`: blk writes random blocks, stops the backend
transparently mid-I/O and reads every block back; rng reads entropy; fs does FUSE file
operations in the share; net sends frames to a looping peer. A type without an entry is
SKIPPED. The guest accepts the configured stop dialect's feature bits when offered; whatever
the config asks for and did not get negotiated is a warning in the report.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO

from .. import config as configmod
from ..backends.base import load_backend
from ..device import VirtioDevice
from ..errors import ConfigError, DeviceFailedError, GuestMemoryError
from ..guest.blk import BlkDriver
from ..guest.driver import GuestDevice
from ..guest.fs import FsDriver
from ..guest.net import NetDriver
from ..guest.rng import RngDriver
from ..lifecycle import unless_failed
from ..machine import Machine
from ..progress import Progress
from ..scenarios.peers import StartedPeers
from ..shadow import StopDialect
from ..virtio.constants import BlkFeature, DeviceId, FsFeature, NetFeature, Status, feature_names
from ..workload import StatusWatcher, blk_write_verify, fs_roundtrip, net_echo
from .report import DeviceReport, Outcome, RunReport, not_negotiated

LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
_FLAGS = {DeviceId.BLOCK: (BlkFeature,), DeviceId.NET: (NetFeature,), DeviceId.FS: (FsFeature,)}


@dataclass
class StopReport:
    """The transparent stop in the middle of the blk workload (milliseconds)."""

    in_flight_at_stop: int = 0
    stop_ms: float = 0.0
    held_ms: float = 0.0
    kicks_while_stopped: int = 0
    ring_states: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class DeviceRun:
    """What a workload runs with."""

    cfg: configmod.MachineConfig
    dev_cfg: configmod.DeviceConfig
    device: VirtioDevice
    guest: GuestDevice
    report: DeviceReport
    err: TextIO | None

    @property
    def extra_features(self) -> int:
        """The stop dialect's bits: the guest accepts them when the device offers them."""
        spec = self.dev_cfg.dialect_spec()
        return spec.feature | spec.ring_state

    def progress(self, label: str, total: int) -> Progress:
        return Progress(f"{self.dev_cfg.name}: {label}", total, stream=self.err)

    def negotiated(self, features: int) -> None:
        """Record the negotiated features and warn about what the config asked for in vain."""
        spec = self.dev_cfg.dialect_spec()
        private = {spec.feature: f"STOP (bit {spec.feature.bit_length() - 1})",
                   spec.ring_state: f"RING_STATE (bit {spec.ring_state.bit_length() - 1})"} \
            if spec.dialect is StopDialect.STOP else {}
        names = feature_names(features & ~sum(private), *_FLAGS.get(self.device.device_id, ()))
        self.report.negotiated = names + [name for mask, name in private.items() if mask and features & mask]
        offered = self.guest.transport.device_features()
        self.report.warnings.extend(not_negotiated(self.dev_cfg, offered, features))


async def _stop_midway(device: VirtioDevice, guest: GuestDevice, after: int, hold: float,
                       report: StopReport, finished: asyncio.Event) -> None:
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


async def run_blk(run: DeviceRun) -> bool:
    cfg, dev_cfg, report = run.cfg, run.dev_cfg, run.report
    driver = BlkDriver(run.guest)
    run.negotiated(await driver.start(packed=dev_cfg.packed, queue_size=dev_cfg.queue_size,
                                      extra_features=run.extra_features))
    _check_run(cfg, dev_cfg, driver)
    c = driver.config
    assert c is not None
    serial = await driver.get_id()
    report.lines.append(f"capacity {driver.capacity_bytes >> 20} MiB, {c.num_queues} queue(s), "
                        f"seg_max {c.seg_max}, id {serial!r}")
    watcher = StatusWatcher(run.guest.status).start()
    stop = StopReport()
    finished = asyncio.Event()
    stopper = asyncio.create_task(_stop_midway(run.device, run.guest, cfg.run.stop_after,
                                               cfg.run.stop_hold_ms / 1e3, stop, finished))
    t0 = time.perf_counter()
    try:
        with run.progress("blk writes", cfg.run.requests) as progress:
            res = await blk_write_verify(driver, requests=cfg.run.requests, queue_depth=cfg.run.queue_depth,
                                         block_bytes=cfg.run.request_bytes, seed=cfg.run.seed,
                                         on_progress=progress.update)
        finished.set()
        await stopper
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        await driver.flush()
    finally:
        if not stopper.done():      # the run failed: the stop/resume cycle has nothing to finish
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
        await watcher.stop()
    report.measurements = {
        "capacity_bytes": driver.capacity_bytes, "queues": c.num_queues, "serial": serial,
        "writes": res.writes, "reads": res.reads, "request_bytes": cfg.run.request_bytes,
        "elapsed_ms": round(elapsed_ms, 3), "verified": cfg.run.verify, "mismatches": len(res.mismatches),
        "stop": {"after_completions": cfg.run.stop_after, "in_flight_at_stop": stop.in_flight_at_stop,
                 "stop_ms": round(stop.stop_ms, 3), "held_ms": round(stop.held_ms, 3),
                 "kicks_while_stopped": stop.kicks_while_stopped, "ring_states": stop.ring_states},
        "status_reads": watcher.reads, "status_values": [f"{v:#04x}" for v in sorted(watcher.values)]}
    report.lines += [
        f"I/O: {res.writes} writes + {res.reads} read-back of {cfg.run.request_bytes} B "
        f"in {elapsed_ms:.1f} ms, " + (f"{len(res.mismatches)} mismatches" if cfg.run.verify else
                                       "data not compared (run.verify = false)"),
        f"transparent stop after {cfg.run.stop_after} completions: {stop.in_flight_at_stop} requests "
        f"in flight, stop took {stop.stop_ms:.2f} ms, held {stop.held_ms:.1f} ms, "
        f"{stop.kicks_while_stopped} guest kicks while stopped",
        f"ring state at stop (queue, last_avail): {stop.ring_states}",
        f"guest read device_status {watcher.reads} times, values seen: {_status_text(watcher.values)}"]
    bad_data = bool(res.mismatches) and cfg.run.verify
    if bad_data:
        report.reason = f"{len(res.mismatches)} blocks read back other data than written"
    elif watcher.values != {LIVE}:
        report.reason = f"the guest read device_status values other than {LIVE:#04x}"
    return not bad_data and watcher.values == {LIVE}


async def run_rng(run: DeviceRun) -> bool:
    rng = RngDriver(run.guest)
    run.negotiated(await rng.start(packed=run.dev_cfg.packed, queue_size=min(run.dev_cfg.queue_size, 64),
                                   extra_features=run.extra_features))
    data = await rng.read(64)
    run.report.measurements = {"read_bytes": len(data)}
    run.report.lines.append(f"rng: read {len(data)} bytes: {data[:16].hex()}...")
    if len(data) != 64:
        run.report.reason = f"read {len(data)} bytes of 64"
    return len(data) == 64


async def run_fs(run: DeviceRun) -> bool:
    r = run.cfg.run
    fs = FsDriver(run.guest, request_timeout=10.0)
    await fs.start(queue_size=run.dev_cfg.queue_size, extra_features=run.extra_features)
    run.negotiated(run.guest.features)
    t0 = time.perf_counter()
    try:
        with run.progress("fs files", r.files) as progress:
            res = await fs_roundtrip(fs, files=r.files, file_bytes=r.file_bytes, seed=r.seed,
                                     on_progress=progress.update)
    finally:
        await fs.close()
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    run.report.measurements = {"tag": fs.config.tag if fs.config else "", "files": res.files,
                               "bytes_written": res.bytes_written, "bytes_read": res.bytes_read,
                               "elapsed_ms": round(elapsed_ms, 3), "mismatches": len(res.mismatches),
                               "problems": res.problems}
    run.report.lines.append(f"fs: {res.files} files of {r.file_bytes} B created, written, read back, listed, "
                            f"unlinked in {res.directory}/ in {elapsed_ms:.1f} ms, "
                            f"{len(res.mismatches)} mismatches")
    if not res.ok:
        mismatched = [f"{len(res.mismatches)} files read back other data"] if res.mismatches else []
        run.report.reason = "; ".join(mismatched + res.problems)
    return res.ok


async def run_net(run: DeviceRun) -> bool:
    r = run.cfg.run
    net = NetDriver(run.guest)
    run.negotiated(await net.start(packed=run.dev_cfg.packed, queue_size=run.dev_cfg.queue_size,
                                   extra_features=run.extra_features))
    t0 = time.perf_counter()
    try:
        with run.progress("net frames", r.frames) as progress:
            res = await net_echo(net, frames=r.frames, batch=max(1, min(64, run.dev_cfg.queue_size // 2)),
                                 seed=r.seed, on_progress=progress.update)
    finally:
        await net.close()
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    run.report.measurements = {"mac": net.config.mac_str if net.config else "", "sent": res.sent,
                               "received": res.received, "mismatches": res.mismatches,
                               "duplicates": res.duplicates, "missing": res.missing,
                               "unexpected": res.unexpected, "elapsed_ms": round(elapsed_ms, 3)}
    run.report.lines.append(f"net: {res.sent} frames sent, {res.received} back in {elapsed_ms:.1f} ms: "
                            f"{res.mismatches} mismatches, {res.duplicates} duplicates, {res.missing} missing, "
                            f"{res.unexpected} unexpected")
    if not res.ok:
        run.report.reason = "frames lost, duplicated or changed on the way back (is the peer looping, " \
                            "e.g. testpmd in io mode?)"
    return res.ok


Workload = Callable[[DeviceRun], Awaitable[bool]]
#: Device type -> (what it does, the workload). A type not here is SKIPPED.
WORKLOADS: dict[DeviceId, tuple[str, Workload]] = {
    DeviceId.BLOCK: ("blk random writes, transparent stop, read-back", run_blk),
    DeviceId.RNG: ("rng read", run_rng),
    DeviceId.FS: ("fs FUSE create/write/read/readdir/unlink", run_fs),
    DeviceId.NET: ("net frames echoed by the peer", run_net),
}


def _machine(cfg: configmod.MachineConfig) -> Machine:
    try:
        return Machine(cfg.memory_mib << 20)
    except OSError as exc:
        raise cfg.error("machine.memory_mib", f"cannot map {cfg.memory_mib} MiB of guest memory: "
                                              f"{exc.strerror or exc}") from exc


async def _add_device(machine: Machine, cfg: configmod.MachineConfig, peers: StartedPeers,
                      index: int) -> VirtioDevice:
    """Build device *index*. A ConfigError from its backend (refusing an option when built, or
    when it connects: a queue count the back-end lacks) names the file and the full key path."""
    dev_cfg = peers.device(cfg.devices[index])
    factory = load_backend(dev_cfg.backend)
    try:
        return await machine.add_device(dev_cfg, factory(dev_cfg.backend_config))
    except ConfigError as exc:
        raise cfg.backend_error(index, exc) from exc


async def _one(cfg: configmod.MachineConfig, machine: Machine, peers: StartedPeers, index: int,
               workloads: dict[DeviceId, tuple[str, Workload]], err: TextIO | None) -> DeviceReport:
    dev_cfg = cfg.devices[index]
    device = await _add_device(machine, cfg, peers, index)
    guest = machine.guest(dev_cfg.name)
    report = DeviceReport(dev_cfg.name, device.device_id.name, dev_cfg.transport, dev_cfg.backend,
                          device.backend.implementation)
    entry = workloads.get(device.device_id)
    try:
        if entry is None:
            report.reason = f"no workload for device type {device.device_id.name}"
            return report
        report.workload, workload = entry
        ok = await unless_failed(device, workload(DeviceRun(cfg, dev_cfg, device, guest, report, err)))
        report.outcome = Outcome.PASS if ok else Outcome.FAIL
    except DeviceFailedError as exc:
        report.fail(f"the backend of {dev_cfg.name} failed: {exc.__cause__ or exc}")
    except GuestMemoryError as exc:
        raise cfg.error("machine.memory_mib", f"{cfg.memory_mib} MiB of guest memory does not hold "
                                              f"{dev_cfg.name}'s rings and buffers ({exc})") from exc
    finally:
        guest.close()
        report.guest_faults = device.faults.total
    return report


async def run(cfg: configmod.MachineConfig, out: TextIO | None = sys.stdout, err: TextIO | None = None, *,
              workloads: dict[DeviceId, tuple[str, Workload]] | None = None) -> RunReport:
    """The main job over every device of *cfg*; each device's text goes to *out* as it finishes
    (None: nothing printed), progress to *err* when it is a terminal."""
    report = RunReport(cfg.source or "")
    with StartedPeers(cfg) as peers:
        machine = _machine(cfg)
        try:
            for index in range(len(cfg.devices)):
                device = await _one(cfg, machine, peers, index, WORKLOADS if workloads is None else workloads, err)
                report.devices.append(device)
                if out is not None:
                    print("\n".join(device.text()), file=out, flush=True)
        finally:
            await machine.close()
    if out is not None:
        print(report.result_line(), file=out)
    return report
