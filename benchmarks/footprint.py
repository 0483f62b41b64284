#!/usr/bin/env python3
"""VMM memory of many devices in one process: 64 virtio-blk devices x 4 queues; prints JSON.

The figure is the process's anonymous resident memory (``Anonymous`` of
``/proc/self/smaps_rollup``): Python's heap, the VMM's objects and buffers. Guest memory is a
memfd (shared memory, not anonymous) and is not in it. Each device is realized, driven to
DRIVER_OK by a guest driver with its 4 queues set up and running, as a VMM holds it.

Backends (``--backend``):

* ``inproc`` (default): the in-process blk model with its 1 MiB image in memory, its default
  (what the issue's 89 MiB was measured with: each image was a zero-filled bytearray, all of it
  resident; it is an anonymous mapping now, resident where written), or in a sparse file
  (``--image-file``);
* ``vhost-user``: the reference back-end (``shadowvmm_vhost_user``'s, one process per device),
  only this process measured.

Goal (issue 14): <= 64 MiB anonymous RSS with the 64 devices. ``per_device_kib`` is (anon
with the devices - anon before the first device) / devices. The guest drivers' objects live in
this process too (a benchmark stand-in for the guest): ``--no-guest`` leaves the devices
realized but never started, to tell the two apart. ``--profile`` adds tracemalloc's top
allocation sites of the devices (bytes per device).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Goal, goals, machine_info, run_loop  # noqa: E402

from shadowvmm.config import DeviceConfig  # noqa: E402
from shadowvmm.guest.blk import BlkDriver  # noqa: E402
from shadowvmm.machine import Machine  # noqa: E402
from shadowvmm.testing.peers import RefBlk  # noqa: E402
from shadowvmm_vhost_user import VhostUserBackend  # noqa: E402

GOAL_MIB = 64.0
DEVICES = 64
QUEUES = 4
QUEUE_SIZE = 128
IMAGE_BYTES = 1 << 20


def anon_kib() -> int:
    """Anonymous resident KiB of this process (smaps_rollup)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise RuntimeError("no Anonymous line in /proc/self/smaps_rollup")


def settled_anon_kib() -> int:
    gc.collect()
    return anon_kib()


def top_sites(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, devices: int, top: int = 15) -> list[dict]:
    stats = after.compare_to(before, "lineno")
    rows = []
    for stat in stats[:top]:
        frame = stat.traceback[0]
        rows.append({"site": f"{Path(frame.filename).name}:{frame.lineno}",
                     "bytes_per_device": round(stat.size_diff / devices), "count_per_device":
                     round(stat.count_diff / devices, 2)})
    return rows


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    machine = Machine(max(64, 4 * args.devices) << 20)     # a memfd: not anonymous memory
    peers: list[Any] = []
    guests = []
    prof_before = tracemalloc.take_snapshot() if args.profile else None
    before = settled_anon_kib()
    try:
        for i in range(args.devices):
            name = f"blk{i}"
            if args.backend == "inproc":
                opts: dict[str, Any] = {"device": "blk", "queues": args.queues, "size": IMAGE_BYTES}
                if args.image_file:
                    opts["image"] = str(tmp / f"{name}.img")
                await machine.add_device(DeviceConfig(name, "inproc", opts, queue_size=args.queue_size))
            else:
                peer = RefBlk(tmp / name, size=IMAGE_BYTES, queues=args.queues)
                peer.__enter__()
                peers.append(peer)
                backend = VhostUserBackend({"socket": str(peer.socket_path), "device": "blk", "queues": args.queues})
                await machine.add_device(DeviceConfig(name, "vhost-user", {}, queue_size=args.queue_size,
                                                      num_queues=args.queues), backend)
            if not args.no_guest:
                guest = machine.guest(name)
                guests.append(guest)
                await BlkDriver(guest, max_request=4096, slots_per_queue=8).start(queue_size=args.queue_size)
        after = settled_anon_kib()
        prof_rows = None
        if prof_before is not None:
            prof_rows = top_sites(prof_before, tracemalloc.take_snapshot(), args.devices)
    finally:
        for guest in guests:
            guest.close()
        await machine.close()
        for peer in peers:
            peer.__exit__(None, None, None)
    out: dict[str, Any] = {
        "anon_before_devices_mib": round(before / 1024, 2), "anon_mib": round(after / 1024, 2),
        "per_device_kib": round((after - before) / args.devices, 1)}
    if prof_rows is not None:
        out["profile"] = {"note": "tracemalloc (Python allocations only), the devices' sites, per device",
                          "top": prof_rows}
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shadowvmm-footprint-") as tmpdir:
        tmp = Path(tmpdir)
        for i in range(args.devices):
            (tmp / f"blk{i}").mkdir()
        if args.backend == "inproc" and args.image_file:
            for i in range(args.devices):
                with open(tmp / f"blk{i}.img", "wb") as f:
                    f.truncate(IMAGE_BYTES)
        result = await measure(args, tmp)
    backend = {"inproc": "inproc (blk model, image " + ("in a sparse file" if args.image_file else "in memory")
               + ")", "vhost-user": "vhost-user to the reference back-end (one process per device; "
               "this process measured)"}[args.backend]
    anon = result["anon_mib"]
    # The goal is for the full 64 devices; a quick run (fewer devices) projects nothing.
    return {"benchmark": "footprint", "backend": backend, "devices": args.devices, "queues": args.queues,
            "queue_size": args.queue_size, "guest_drivers": not args.no_guest,
            "measure": "Anonymous of /proc/self/smaps_rollup after gc.collect()", **result,
            "goal_mib": GOAL_MIB, "met": anon <= GOAL_MIB,
            "goals": goals(Goal(f"footprint.{args.backend}.anon_rss_{args.devices}_devices", anon, GOAL_MIB, "MiB")),
            "machine": machine_info()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("inproc", "vhost-user"), default="inproc")
    parser.add_argument("--devices", type=int, default=DEVICES)
    parser.add_argument("--queues", type=int, default=QUEUES)
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE)
    parser.add_argument("--image-file", action="store_true", help="inproc images in sparse files, not in memory")
    parser.add_argument("--no-guest", action="store_true", help="realize the devices, start no guest driver")
    parser.add_argument("--quick", action="store_true", help="8 devices (a smoke run: the goal is for 64)")
    parser.add_argument("--profile", action="store_true", help="add tracemalloc's top allocation sites per device")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.quick:
        args.devices = 8
    if args.profile:
        tracemalloc.start()
    result = run_loop(lambda: main(args), args.loop)
    result["quick"] = args.quick
    print(json.dumps(result, indent=2))
