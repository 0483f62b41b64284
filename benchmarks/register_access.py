#!/usr/bin/env python3
"""Cost of a guest read and write of ``device_status`` through the full intercept path.

The path measured is what a guest access goes through: transport entry
(``PciTransport.read/write`` or ``MmioTransport.read/write``) -> region
decode -> register table dispatch -> width check -> device handler -> status
shadow. The device is a live virtio-blk (DRIVER_OK, backend running). The
write rewrites the current status (the common case: drivers re-write the
status they read), which still goes through every shadow rule.

Prints JSON: median ns per access over ``--rounds`` rounds of ``--ops`` accesses,
the 2 µs target and the ratio median / target (≤ 1.0 meets the goal).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Goal, goals, profile_table, profiled  # noqa: E402

from shadowvmm.config import DeviceConfig
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.transport.pci import COMMON_OFF, Space

TARGET_NS = 2000.0


def measure(fn, ops: int, rounds: int) -> float:
    """Median ns per call over *rounds* rounds (GC paused while timing, as timeit does)."""
    samples = []
    gc.disable()
    try:
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            for _ in range(ops):
                fn()
            samples.append((time.perf_counter_ns() - t0) / ops)
    finally:
        gc.enable()
    return statistics.median(samples)


async def main(ops: int, rounds: int, profile: bool = False) -> dict:
    machine = Machine(16 << 20)
    results = {}
    profiles: dict[str, object] = {}
    for transport in ("pci", "mmio"):
        name = f"blk-{transport}"
        await machine.add_device(DeviceConfig(name, "inproc", {"device": "blk", "size": 1 << 20},
                                              transport=transport))
        guest = machine.guest(name)
        await BlkDriver(guest).start()
        t = machine.slots[name].transport
        if transport == "pci":
            off = COMMON_OFF + 0x14
            status = t.read(Space.BAR, off, 1)
            read = lambda: t.read(Space.BAR, off, 1)          # noqa: E731, B023  (called within this iteration)
            write = lambda: t.write(Space.BAR, off, 1, status)  # noqa: E731, B023  (called within this iteration)
        else:
            status = t.read(0x70, 4)
            read = lambda: t.read(0x70, 4)                     # noqa: E731, B023  (called within this iteration)
            write = lambda: t.write(0x70, 4, status)           # noqa: E731, B023  (called within this iteration)
        read_ns = measure(read, ops, rounds)
        write_ns = measure(write, ops, rounds)
        if profile:
            with profiled(True) as prof:
                for _ in range(ops):
                    read()
                    write()
            assert prof is not None
            profiles[transport] = {"accesses": 2 * ops, "note": "cProfile pass (one read + one write per "
                                   "access pair), not the timed one", "top": profile_table(prof, 2 * ops, 15)}
        assert guest.status() == status, "the rewritten status must read back unchanged"
        results[transport] = {"read_status_ns": round(read_ns, 1), "write_status_ns": round(write_ns, 1),
                              "read_ratio_to_target": round(read_ns / TARGET_NS, 3),
                              "write_ratio_to_target": round(write_ns / TARGET_NS, 3)}
        guest.close()
    await machine.close()
    worst = max(v for r in results.values() for k, v in r.items() if k.endswith("_ns"))
    out = {"benchmark": "register_access", "target_ns": TARGET_NS, "ops_per_round": ops,
           "rounds": rounds, "results": results, "worst_median_ns": worst,
           "meets_target": worst <= TARGET_NS,
           "goals": goals(*(Goal(f"register_access.{t}.{k.removesuffix('_status_ns')}", v, TARGET_NS, "ns")
                            for t, r in results.items() for k, v in r.items() if k.endswith("_ns")))}
    if profile:
        out["profile"] = profiles
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="2000 ops x 3 rounds (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="add cProfile's top entries of a read and a write")
    args = parser.parse_args()
    if args.quick:
        args.ops, args.rounds = 2000, 3
    result = asyncio.run(main(args.ops, args.rounds, args.profile))
    result["quick"] = args.quick
    print(json.dumps(result, indent=2))
