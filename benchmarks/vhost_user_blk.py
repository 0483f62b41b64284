#!/usr/bin/env python3
"""4 KiB random-read IOPS through the whole vhost-user path, next to ``qemu-img bench``.

Path measured: the guest driver model (:class:`~shadowvmm.guest.blk.BlkDriver`, split ring,
PCI with MSI-X) -> the device layer (notify register -> kick eventfd; call eventfd ->
MSI-X vector) -> :class:`~shadowvmm_vhost_user.VhostUserBackend` -> a real
``qemu-storage-daemon`` exporting ``null-co`` (``read-zeroes=off``: no data is produced, so
the figure is the cost of the request path itself). Depth N means N requests in flight:
:meth:`BlkDriver.pipeline` adds the first N with one kick and, after each wake-up, replaces
every completed request in one batch with one kick.

Reference, run in the same process tree right after each of ours: ``qemu-img bench`` reading
the same ``null-co`` driver in-process (QEMU's block layer, no vhost-user, no guest), at the
same depth and size; its offsets are sequential (it has no random mode; ``null-co`` ignores the
offset). Each measurement is a fixed number of requests; the rate is requests / wall seconds.

Prints JSON: per depth our IOPS, µs per request, CPU seconds of this process and of the
daemon, notifications per request; qemu-img's IOPS; and the ratio ours / qemu-img (the
project's goal: >= 0.3 at depth 32). ``--profile`` adds a cProfile pass per depth (not the
timed one) with the functions that cost most, in µs per request.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Goal, Stopwatch, goals, machine_info, pin_threads, profile_table, profiled, run_checked, run_loop  # noqa: E402

from shadowvmm.config import DeviceConfig  # noqa: E402
from shadowvmm.guest.blk import BlkDriver, BlkOp  # noqa: E402
from shadowvmm.machine import Machine  # noqa: E402
from shadowvmm.testing.peers import QsdBlk, find_peer  # noqa: E402
from shadowvmm.virtio.constants import BlkRequestType  # noqa: E402
from shadowvmm_vhost_user import VhostUserBackend  # noqa: E402

BLOCK = 4096
DISK = 1 << 30
GOAL_QD32 = 0.3
#: requests per measurement: ~2-5 s each on the 2-core development machine
OURS = {1: 100_000, 32: 400_000}
QEMU_IMG = {1: 1_500_000, 32: 4_000_000}
WARMUP = 3_000
QUICK_DIVISOR = 10
_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def random_reads(count: int, seed: int) -> list[BlkOp]:
    """*count* distinct 4 KiB reads at random 4 KiB-aligned offsets (cycled by the caller)."""
    rng = random.Random(seed)
    sectors = BLOCK // 512
    return [BlkOp(BlkRequestType.IN, rng.randrange(DISK // BLOCK) * sectors, length=BLOCK) for _ in range(count)]


def qemu_img_bench(depth: int, count: int, cpu: int | None) -> dict[str, Any]:
    """``qemu-img bench`` reading null-co in-process; IOPS from its own elapsed time."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    argv = [*pin, find_peer("qemu-img"), "bench", "--image-opts", f"driver=null-co,size={DISK},read-zeroes=off",
            "-c", str(count), "-d", str(depth), "-s", str(BLOCK), "-t", "none"]
    out = run_checked(argv)
    match = _COMPLETED.search(out)
    if match is None:
        raise RuntimeError(f"no 'Run completed' line in qemu-img bench output:\n{out}")
    seconds = float(match[1])
    return {"requests": count, "seconds": seconds, "iops": round(count / seconds),
            "us_per_request": round(seconds / count * 1e6, 3), "command": " ".join(argv[len(pin) + 1:]),
            "cpu": cpu}


async def ours(socket: Path, qsd_pid: int, depths: list[int], counts: dict[int, int],
               profile: bool) -> dict[int, dict[str, Any]]:
    machine = Machine(64 << 20)
    backend = VhostUserBackend({"socket": str(socket), "device": "blk", "queues": 1, "timeout": 5.0})
    await machine.add_device(DeviceConfig("blk0", "vhost-user", {}, transport="pci"), backend)
    guest = machine.guest("blk0")
    results: dict[int, dict[str, Any]] = {}
    try:
        driver = BlkDriver(guest)
        await driver.start(num_queues=1)
        queue = guest.queues[0]
        pool = random_reads(4096, seed=1)
        await driver.pipeline(itertools.islice(itertools.cycle(pool), WARMUP), 32)
        for depth in depths:
            count = counts[depth]
            ops = itertools.islice(itertools.cycle(pool), count)
            kicks = queue.notifies
            with Stopwatch(qsd_pid) as watch:
                done = await driver.pipeline(ops, depth)
            if done != count:
                raise RuntimeError(f"depth {depth}: {done} of {count} requests completed")
            entry = {"requests": count, "seconds": round(watch.wall, 4), "iops": round(count / watch.wall),
                     "us_per_request": round(watch.wall / count * 1e6, 3),
                     "cpu_self_seconds": round(watch.cpu_self, 3), "cpu_qsd_seconds": round(watch.cpu_peer, 3),
                     "notifications_per_request": round((queue.notifies - kicks) / count, 4)}
            if profile:
                prof_count = max(count // 4, 1000)
                with profiled(True) as prof:
                    await driver.pipeline(itertools.islice(itertools.cycle(pool), prof_count), depth)
                assert prof is not None
                entry["profile"] = {"requests": prof_count, "note": "cProfile pass, not the timed one; "
                                    "profiler overhead inflates every figure", "top": profile_table(prof, prof_count)}
            results[depth] = entry
    finally:
        guest.close()
        await machine.close()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"request counts / {QUICK_DIVISOR} (a smoke run)")
    parser.add_argument("--depths", default="1,32", help="comma-separated queue depths (default 1,32)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (default uvloop, as `shadowvmm run`)")
    parser.add_argument("--profile", action="store_true", help="add a cProfile pass per depth")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave CPU placement to the scheduler (default with 2+ CPUs: this process "
                             "on the first, qemu-storage-daemon and qemu-img bench on the second)")
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    pinning = None if args.no_pin or len(cpus) < 2 else {"frontend": cpus[0], "backend": cpus[1]}
    depths = [int(d) for d in args.depths.split(",")]
    divisor = QUICK_DIVISOR if args.quick else 1
    ours_counts = {d: max(OURS.get(d, OURS[32]) // divisor, 1000) for d in depths}
    img_counts = {d: max(QEMU_IMG.get(d, QEMU_IMG[32]) // divisor, 10_000) for d in depths}

    version = run_checked([find_peer("qemu-storage-daemon"), "--version"]).splitlines()[0]
    per_depth: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shadowvmm-bench-") as tmp:
        with QsdBlk(tmp, size=DISK, num_queues=1, name="qsd-null") as qsd:
            if pinning is not None:
                pin_threads(qsd.pid, pinning["backend"])
                os.sched_setaffinity(0, {pinning["frontend"]})
            for depth in depths:
                got = run_loop(lambda d=depth: ours(qsd.socket_path, qsd.pid, [d], ours_counts, args.profile),
                               args.loop)[depth]
                ref = qemu_img_bench(depth, img_counts[depth], pinning and pinning["backend"])
                per_depth[f"qd{depth}"] = {"shadowvmm": got, "qemu_img_bench": ref,
                                           "ratio": round(got["iops"] / ref["iops"], 4)}
            node = qsd.argv()[2]
    ratio32 = per_depth.get("qd32", {}).get("ratio")
    return {
        "benchmark": "vhost_user_blk",
        "workload": f"{BLOCK} B random reads, one queue",
        "path": "guest BlkDriver (split ring, PCI MSI-X) -> VirtioDevice -> VhostUserBackend -> qemu-storage-daemon",
        "peer": {"version": version, "blockdev": node},
        "reference": "qemu-img bench on the same null-co driver, in-process, sequential offsets",
        "loop": args.loop,
        "cpu_pinning": pinning,
        "quick": args.quick,
        "results": per_depth,
        "goal": {"qd32_ratio_at_least": GOAL_QD32, "qd32_ratio": ratio32,
                 "met": None if ratio32 is None else ratio32 >= GOAL_QD32},
        "goals": goals(Goal("vhost_user_blk.qd32_iops_vs_qemu_img", ratio32, GOAL_QD32, "ratio", "higher")),
        "machine": machine_info(),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
