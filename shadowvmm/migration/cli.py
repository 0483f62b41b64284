"""``shadowvmm migrate``: migrate a machine under guest load and report.

``--role both`` (default) runs source and destination in this process: the
destination listens on ``--to``, or reads the file once the source has
written and closed it (its report is the source's confirmation). With
``--role source`` / ``--role destination`` each side runs alone, e.g. in two
network namespaces over TCP. The local memory model (shared memfds) needs
both roles in one process; the guest then moves to the destination and
keeps doing I/O, and every block it wrote is read back at the end: ``ok``
is false if any read (during the load or the read-back) returned other
data than the last write, and ``mismatches`` counts them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import config as configmod
from ..errors import MigrationError
from ..guest.blk import BlkDriver
from ..guest.driver import GuestDevice
from ..machine import Machine
from ..progress import Progress
from ..timeline import Timeline
from ..virtio.constants import DeviceId
from .harness import BlkLoad, move_guest
from .migrate import MigrationHooks, MigrationOptions, RoundInfo, migrate_in, migrate_out
from .stream import Endpoint

HELP = "live-migrate a machine's devices (and memory) under guest load"
EXAMPLES = """examples:
  shadowvmm migrate configs/src.toml configs/dst.toml --to unix:/tmp/mig.sock --mode local
  shadowvmm migrate configs/src.toml configs/dst.toml --to unix:/tmp/mig.sock --mode copy --json
  shadowvmm migrate SRC DST --to tcp:10.99.0.2:4444 --role source   # one side per host"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``migrate`` options (pre-copy rounds show on stderr when it is a terminal)."""
    p.epilog = EXAMPLES
    p.add_argument("source_config")
    p.add_argument("dest_config")
    p.add_argument("--to", required=True, help="tcp:HOST:PORT, unix:PATH or file:PATH")
    p.add_argument("--mode", choices=("copy", "local"), default="copy")
    p.add_argument("--role", choices=("both", "source", "destination"), default="both")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of guest load before migrating")
    p.add_argument("--after", type=float, default=0.5, help="seconds of guest load on the destination (local)")
    p.add_argument("--stop-timeout-ms", type=float, default=100.0)
    p.add_argument("--max-rounds", type=int, default=16)
    p.add_argument("--digest", action="store_true", help="compare guest memory digests at switch-over")
    p.add_argument("--fs-remount", action="store_true",
                   help="migrate virtio-fs devices whose backend cannot hand the FUSE session over "
                        "(the guest must mount again on the destination)")
    p.add_argument("--accept-timeout", type=float, default=30.0)
    p.add_argument("--read-share", type=float, default=0.4,
                   help="share of guest requests that read back an already written block")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.add_argument("--timeline", type=Path, help="write the migration's timeline as JSON to this file")
    p.add_argument("--plot", type=Path, help="draw the migration's timeline into this PNG file (shadowvmm[plot])")


@dataclass
class Guests:
    guests: list[tuple[str, GuestDevice]] = field(default_factory=list)
    loads: list[BlkLoad] = field(default_factory=list)

    async def pause(self) -> None:
        await asyncio.gather(*(load.pause() for load in self.loads))

    def resume(self) -> None:
        for load in self.loads:
            load.resume()

    async def stop(self) -> None:
        for load in self.loads:
            load.resume()
        await asyncio.gather(*(load.stop() for load in self.loads))

    def close(self) -> None:
        for _, guest in self.guests:
            guest.close()


async def _build(cfg: configmod.MachineConfig, machine: Machine) -> Machine:
    for dev_cfg in cfg.devices:
        await machine.add_device(dev_cfg)
    return machine


async def _start_load(machine: Machine, cfg: configmod.MachineConfig, read_share: float) -> Guests:
    out = Guests()
    for index, dev_cfg in enumerate(cfg.devices):
        if machine.device(dev_cfg.name).device_id != DeviceId.BLOCK:
            continue
        guest = machine.guest(dev_cfg.name)
        driver = BlkDriver(guest)
        await driver.start(packed=dev_cfg.packed, queue_size=dev_cfg.queue_size)
        out.guests.append((dev_cfg.name, guest))
        out.loads.append(BlkLoad(driver, blocks_per_queue=256, depth=8, seed=index + 1,
                                 read_share=read_share).start())
    return out


def _progress(err: TextIO):
    progress = Progress("migrate", stream=err)

    def show(info: RoundInfo) -> None:
        progress.note(f"pre-copy round {info.round}: sent {info.pages} pages in {info.ms:.1f} ms, "
                      f"{info.dirty} dirty")
    return show


async def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
              timeline: Timeline | None = None) -> int:
    """Run the migration; *timeline* (if any) records both machines and the migration's phases."""
    src_cfg = configmod.load(args.source_config)
    dst_cfg = configmod.load(args.dest_config)
    endpoint = Endpoint.parse(args.to)
    options = MigrationOptions(mode=args.mode, stop_timeout=args.stop_timeout_ms / 1e3,
                               max_rounds=args.max_rounds, digest=args.digest,
                               fs_session="remount" if args.fs_remount else "refuse")
    if args.mode == "local" and args.role != "both":
        raise MigrationError("the local memory model shares the memfds of one process: use --role both")
    if args.role == "destination":
        report = await _destination(dst_cfg, endpoint, args, timeline)
    else:
        report = await _source(src_cfg, dst_cfg, endpoint, options, args, err, timeline)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True), file=out)
    else:
        for key, value in report.items():
            print(f"{key}: {value}", file=out)
    return 0 if report.get("ok", True) else 1


async def _destination(cfg: configmod.MachineConfig, endpoint: Endpoint, args: argparse.Namespace,
                       timeline: Timeline | None = None) -> dict[str, Any]:
    machine = await _build(cfg, Machine(cfg.memory_mib << 20, timeline=timeline, suffix="@dst"))
    listener = await endpoint.listen()
    try:
        channel = await listener.accept(args.accept_timeout)
        report = await migrate_in(machine, channel, digest=args.digest, timeline=machine.tap("migration@dst"))
        result = {"role": "destination", "ok": True, **report.as_dict(),
                  "running": {n: machine.device(n).rings_running for n in machine.slots}}
    finally:
        await listener.close()
        await machine.close()
    return result


async def _source(src_cfg: configmod.MachineConfig, dst_cfg: configmod.MachineConfig, endpoint: Endpoint,
                  options: MigrationOptions, args: argparse.Namespace, err: TextIO,
                  timeline: Timeline | None = None) -> dict[str, Any]:
    src = await _build(src_cfg, Machine(src_cfg.memory_mib << 20, timeline=timeline))
    dst: Machine | None = None
    listener = None
    incoming: asyncio.Future | None = None
    guests = Guests()
    result: dict[str, Any] = {"role": args.role}
    try:
        if args.role == "both":
            base = Machine(memory=src.memory, timeline=timeline, suffix="@dst") if options.mode == "local" \
                else Machine(dst_cfg.memory_mib << 20, timeline=timeline, suffix="@dst")
            dst = await _build(dst_cfg, base)
            if endpoint.kind != "file":
                listener = await endpoint.listen()
                incoming = asyncio.ensure_future(_accept_in(listener, dst, args))
        guests = await _start_load(src, src_cfg, args.read_share)
        await asyncio.sleep(args.warmup)

        def switch_over() -> None:
            if dst is not None and options.mode == "local":
                for name, guest in guests.guests:
                    move_guest(guest, src.device(name), dst.device(name), dst.slots[name].transport)

        async def read_file() -> dict[str, Any]:
            """Called once the source closed the file: read it into the destination."""
            assert dst is not None
            reader = await endpoint.listen()
            try:
                channel = await reader.accept()
            finally:
                await reader.close()
            return (await migrate_in(dst, channel, digest=options.digest, timeline=dst.tap("migration@dst"))).as_dict()
        confirm = read_file if dst is not None and endpoint.kind == "file" else None
        hooks = MigrationHooks(pause_guest=guests.pause if options.mode == "copy" else None,
                               resume_guest=guests.resume, switch_over=switch_over, progress=_progress(err))
        report = await migrate_out(src, await endpoint.connect(), options, hooks, confirm=confirm,
                                   timeline=src.tap("migration"))
        if incoming is not None:
            report.destination = (await incoming).as_dict()
        result.update(report.as_dict())
        result["guest_io_before_switch"] = sum(load.completed for load in guests.loads)
        if dst is not None and options.mode == "local":
            guests.resume()
            await asyncio.sleep(args.after)
            await guests.stop()
            bad = [b for load in guests.loads for b in await load.verify()]
            result["guest_io_total"] = sum(load.completed for load in guests.loads)
            result["verified_blocks"] = sum(len(load.expected) for load in guests.loads)
            mismatches = len(bad) + sum(len(load.stats.read_mismatches) for load in guests.loads)
            result["mismatches"] = mismatches
            result["ok"] = report.ok and mismatches == 0 and not any(load.stats.errors for load in guests.loads)
        if options.digest and report.destination:
            result["memory_identical"] = report.destination.get("memory_digest") == report.memory_digest
            result["ok"] = result.get("ok", True) and result["memory_identical"]
    finally:
        if incoming is not None and not incoming.done():
            incoming.cancel()
        if listener is not None:
            await listener.close()
        await asyncio.gather(*(load.abandon() for load in guests.loads))
        guests.close()
        if dst is not None:
            await dst.close()
        await src.close()
    return result


async def _accept_in(listener, dst: Machine, args: argparse.Namespace):
    return await migrate_in(dst, await listener.accept(args.accept_timeout), digest=args.digest,
                            timeline=dst.tap("migration@dst"))
