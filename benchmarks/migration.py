"""Migration benchmark; prints JSON.

* ``downtime``: local migration of virtio-blk with 4 queues under guest
  random read+write load, source stop -> destination running (RESULT
  received), between two qemu-storage-daemon exports of one image (the
  in-process backend on a shared image file when qsd is missing). Two
  variants: ``guest_running`` (the guest model keeps submitting through the
  stop, as with the transparent stop; it shares this process's one thread
  with the VMM) and ``guest_paused`` (vCPUs paused for stop-and-copy through
  ``MigrationHooks.pause_guest``, as QEMU does; requests in flight stay in
  flight). Goal: median <= 5 ms for both.
* ``stop``: time to stop 1 and 64 devices together (``asyncio.gather``),
  in-process blk backends with requests in flight (completion latency
  ``latency_us``, every device's requests submitted at the same moment, so
  each stop waits for the same in-flight drain; the in-process backends
  take the requests in the timed window, on this thread, before the stop
  begins: a device stopped before it took what was kicked would not wait for
  it, and a back-end of its own takes requests at once; the guests' interrupts
  are held during the timed stop, as with paused vCPUs, since their completion
  handling is guest work that runs on vCPU threads in a VMM) and idle; goals
  (issue 14): stop(64)/stop(1) <= 1.2 under I/O, and <= 10 µs added per device
  idle. ``added_us_per_device`` is (stop(64) - stop(1)) / 63; ``cpu_*`` are
  the same in CPU time of this thread (steady on a loaded machine). ``under_io_taken``
  (no goal): the backends took every request before the stop began, so the
  stop is timed without their request work. ``--profile``
  adds cProfile's top entries of the 64-device stops, per device stopped.

``--section stop`` or ``--section downtime`` runs one of the two; ``--quick``
runs 2 migrations and 3 stops per figure (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Goal, goals, machine_info, profile_table, run_loop  # noqa: E402

from shadowvmm.config import DeviceConfig
from shadowvmm.errors import MigrationError
from shadowvmm.guest.blk import BlkDriver, BlkOp
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import BlkLoad, machine_sharing, move_guest
from shadowvmm.migration.migrate import MigrationHooks, MigrationOptions, _stop_all, migrate_in, migrate_out
from shadowvmm.migration.stream import Endpoint
from shadowvmm.testing.peers import PeerMissing, QsdBlk, find_peer
from shadowvmm.virtio.constants import BlkRequestType
from shadowvmm_vhost_user import VhostUserBackend  # noqa: E402

#: Issue 14: half of QEMU 7.2's 4 ms with the guest running, less with it paused.
DOWNTIME_GOAL_MS = {"guest_paused": 2.0, "guest_running": 3.0}
RATIO_GOAL = 1.2
IDLE_ADDED_US_GOAL = 10.0


class DowntimeProfile:
    """cProfile switched on when the source stops (the pause hook) and off at switch-over."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile()

    def wrap_pause(self, hook: Callable[[], Any] | None) -> Callable[[], Any]:
        def pause() -> Any:
            self.profile.enable()
            return hook() if hook is not None else None
        return pause

    def wrap_switch_over(self, hook: Callable[[], Any]) -> Callable[[], Any]:
        def switch_over() -> Any:
            self.profile.disable()
            return hook()
        return switch_over


async def one_migration(tmp: Path, sockets: list[Path] | None, image: Path, pause: bool,
                        profile: DowntimeProfile | None = None) -> dict:
    src = Machine(64 << 20)
    dst = machine_sharing(src.memory)
    cfg = DeviceConfig("blk0", "vhost-user" if sockets else "inproc",
                       {} if sockets else {"device": "blk", "image": str(image), "queues": 4, "latency_us": 100},
                       queue_size=128)
    if sockets:
        await src.add_device(cfg, VhostUserBackend({"socket": str(sockets[0]), "device": "blk", "queues": 4}))
        await dst.add_device(cfg, VhostUserBackend({"socket": str(sockets[1]), "device": "blk", "queues": 4}))
    else:
        await src.add_device(cfg)
        await dst.add_device(cfg)
    guest = src.guest("blk0")
    try:
        driver = BlkDriver(guest)
        await driver.start(queue_size=128)
        load = BlkLoad(driver, blocks_per_queue=512, depth=8).start()
        await asyncio.sleep(0.2)
        endpoint = Endpoint.parse(f"unix:{tmp / 'bench.sock'}")
        listener = await endpoint.listen()

        async def incoming():
            return await migrate_in(dst, await listener.accept(10))
        task = asyncio.ensure_future(incoming())
        def move() -> None:
            move_guest(guest, src.device("blk0"), dst.device("blk0"), dst.slots["blk0"].transport)
        switch_over: Callable[[], Any] = move
        pause_guest: Callable[[], Any] | None = load.freeze if pause else None
        if profile is not None:
            switch_over, pause_guest = profile.wrap_switch_over(move), profile.wrap_pause(pause_guest)
        hooks = MigrationHooks(switch_over=switch_over, pause_guest=pause_guest,
                               resume_guest=load.resume if pause else None)
        in_flight = sum(q.ring.in_flight for q in guest.queues)
        abandoned = None
        try:
            report = await migrate_out(src, await endpoint.connect(), MigrationOptions(mode="local"), hooks)
        except MigrationError as exc:     # e.g. a stop beyond its bound on a loaded host: counted
            abandoned = str(exc)
        with contextlib.suppress(MigrationError):
            await task
        if pause:
            load.resume()
        await listener.close()
        await asyncio.sleep(0.1)
        await load.stop()
        bad = await load.verify()
        ok = not bad and not load.stats.errors
        if abandoned is not None:
            return {"abandoned": abandoned, "ok": ok}
        return {"downtime_ms": report.downtime_ms, "stop_ms": report.stop_ms, "in_flight": in_flight, "ok": ok}
    finally:
        guest.close()
        await dst.close()
        await src.close()


async def downtime(runs: int, pause: bool, profile: bool = False) -> dict:
    prof = DowntimeProfile() if profile else None
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        try:
            qsd = QsdBlk(tmp, image=tmp / "disk.img", size=64 << 20, create=True, num_queues=4, exports=2,
                         binary=find_peer("qemu-storage-daemon"))
        except PeerMissing:
            qsd = None
        if qsd is not None:
            with qsd:
                results = [await one_migration(tmp, qsd.socket_paths, tmp / "disk.img", pause) for _ in range(runs)]
                if prof is not None:
                    await one_migration(tmp, qsd.socket_paths, tmp / "disk.img", pause, prof)
                    prof.profile.disable()      # an abandoned migration never reached switch-over
            backend = "qemu-storage-daemon (2 exports, 4 queues)"
        else:
            (tmp / "disk.img").write_bytes(bytes(64 << 20))
            results = [await one_migration(tmp, None, tmp / "disk.img", pause) for _ in range(runs)]
            if prof is not None:
                await one_migration(tmp, None, tmp / "disk.img", pause, prof)
                prof.profile.disable()
            backend = "inproc (shared image file, 4 queues)"
    done = [r for r in results if "abandoned" not in r]
    values = [r["downtime_ms"] for r in done]
    goal = DOWNTIME_GOAL_MS["guest_paused" if pause else "guest_running"]
    median = round(statistics.median(values), 3) if values else None
    return {"backend": backend, "runs": runs, "median_ms": median,
            "min_ms": round(min(values), 3) if values else None, "max_ms": round(max(values), 3) if values else None,
            "stop_median_ms": round(statistics.median(r["stop_ms"] for r in done), 3) if done else None,
            "in_flight_at_start_median": statistics.median(r["in_flight"] for r in done) if done else None,
            "all_verified": all(r["ok"] for r in results),
            "abandoned": [r["abandoned"] for r in results if "abandoned" in r],
            "goal_ms": goal, "meets_goal": median is not None and median <= goal,
            **({} if prof is None else {"profile": {
                "migrations": 1, "window": "source stop (pause hook) to switch-over",
                "note": "untimed migration; profiler overhead inflates every figure",
                "top": profile_table(prof.profile, 1)}})}


#: The stop section's variants: requests in flight (submitted together just before the stop, or
#: already taken by every backend when it starts), or none.
STOP_MODES = ("under_io", "under_io_taken", "idle")


async def _submit_all(drivers: list[BlkDriver], devices: dict) -> tuple[list[asyncio.Future], dict[str, int]]:
    """4 writes per device, one kick each; the batches, and each backend's request count before."""
    before = {n: d.backend.requests for n, d in devices.items()}
    batches = [asyncio.ensure_future(d.submit([BlkOp(BlkRequestType.OUT, 8 * k, data=bytes(4096))
                                               for k in range(4)])) for d in drivers]
    await asyncio.sleep(0)
    return batches, before


async def _until_taken(devices: dict, before: dict[str, int]) -> None:
    """Return once every backend took the 4 requests kicked to it (its kick handler ran)."""
    for _ in range(10_000):
        if all(d.backend.requests - before[n] >= 4 for n, d in devices.items()):
            return
        await asyncio.sleep(0)
    raise RuntimeError("the in-process backends did not take the requests kicked to them")


async def stop_times(count: int, latency_us: int, mode: str, rounds: int,
                     prof: cProfile.Profile | None = None) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (this thread) ms of each stop of *count* devices in *mode* (:data:`STOP_MODES`).
    With *prof*, the timed stops are profiled (the times then include the profiler's overhead)."""
    machine = Machine(max(64, count) << 20)
    guests, drivers = [], []
    try:
        for i in range(count):
            await machine.add_device(DeviceConfig(f"blk{i}", "inproc", {"device": "blk", "size": 1 << 20,
                                                                        "latency_us": latency_us}, queue_size=16))
            guest = machine.guest(f"blk{i}")
            guests.append(guest)
            driver = BlkDriver(guest, max_request=4096, slots_per_queue=8)
            await driver.start(queue_size=16)
            drivers.append(driver)
        devices = {name: slot.device for name, slot in machine.slots.items()}
        wall, cpu = [], []
        for _ in range(rounds):
            await asyncio.sleep(0.01)
            batches, before = ([], {}) if mode == "idle" else await _submit_all(drivers, devices)
            if mode == "under_io_taken":
                await _until_taken(devices, before)
            for guest in guests:
                guest.hold_interrupts()
            if prof is not None:
                prof.enable()
            t0, c0 = time.perf_counter(), time.thread_time()
            if mode == "under_io":
                await _until_taken(devices, before)
            await _stop_all(devices, 10.0, time.perf_counter)
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.thread_time() - c0) * 1e3)
            if prof is not None:
                prof.disable()
            for guest in guests:
                guest.release_interrupts()
            await asyncio.gather(*(d.resume() for d in devices.values()))
            await asyncio.gather(*batches)
        return wall, cpu
    finally:
        for guest in guests:
            guest.close()
        await machine.close()


async def stop_scaling(latency_us: int, rounds: int, profile: bool = False, devices: int = 64) -> dict:
    """Each mode's median stop of 1 and of *devices* devices, wall-clock and CPU; the CPU figures
    hold on a loaded machine, where the wall-clock ones take in whatever ran meanwhile."""
    out: dict = {"devices": devices}
    extra = max(devices - 1, 1)
    for mode in STOP_MODES:
        (one, one_cpu), (many, many_cpu) = [[statistics.median(v) for v in await stop_times(n, latency_us, mode,
                                                                                             rounds)]
                                            for n in (1, devices)]
        out[mode] = {"stop_1_ms": round(one, 3), "stop_64_ms": round(many, 3), "ratio": round(many / one, 2),
                     "added_us_per_device": round((many - one) / extra * 1e3, 1),
                     "cpu_1_ms": round(one_cpu, 3), "cpu_64_ms": round(many_cpu, 3),
                     "cpu_added_us_per_device": round((many_cpu - one_cpu) / extra * 1e3, 1)}
        if profile:
            prof = cProfile.Profile()
            await stop_times(devices, latency_us, mode, rounds, prof)
            out[mode]["profile"] = {"note": f"cProfile of the {devices}-device stops (the backends' request work "
                                    "included), per device stopped", "top": profile_table(prof, devices * rounds, 20)}
    out["under_io_taken"]["note"] = ("the backends took every request before the stop began: the stop "
                                     "without the in-process backends' request work (no goal of its own)")
    out["latency_us"] = latency_us
    out["goal_ratio"] = RATIO_GOAL
    out["goal_idle_added_us_per_device"] = IDLE_ADDED_US_GOAL
    out["meets_goal"] = (out["under_io"]["ratio"] <= RATIO_GOAL
                         and out["idle"]["added_us_per_device"] <= IDLE_ADDED_US_GOAL)
    return out


def figure_goals(result: dict) -> list[dict]:
    items = []
    for variant, fig in result.get("downtime", {}).items():
        items.append(Goal(f"migration.downtime.{variant}", fig["median_ms"], DOWNTIME_GOAL_MS[variant], "ms"))
    stop = result.get("stop")
    if stop is not None:
        items.append(Goal("migration.stop_64_vs_1.under_io", stop["under_io"]["ratio"], RATIO_GOAL, "ratio"))
        items.append(Goal("migration.stop_64.idle_added_per_device", stop["idle"]["added_us_per_device"],
                          IDLE_ADDED_US_GOAL, "us"))
    return goals(*items)


async def main(args: argparse.Namespace) -> dict:
    out: dict = {}
    if args.section in ("all", "downtime"):
        out["downtime"] = {"guest_running": await downtime(args.runs, False, args.profile),
                           "guest_paused": await downtime(args.runs, True, args.profile)}
    if args.section in ("all", "stop"):
        out["stop"] = await stop_scaling(args.latency_us, args.rounds, args.profile, args.devices)
    out["goals"] = figure_goals(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="migrations per downtime variant (default 9)")
    parser.add_argument("--rounds", type=int, default=9, help="stops per stop-time figure (default 9)")
    parser.add_argument("--latency-us", type=int, default=5000, help="in-process request latency (default 5000)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (default uvloop, as `shadowvmm run`)")
    parser.add_argument("--section", choices=("all", "downtime", "stop"), default="all")
    parser.add_argument("--devices", type=int, default=64, help="devices stopped together (default 64)")
    parser.add_argument("--quick", action="store_true", help="2 migrations, 3 stops per figure (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="add cProfile's top entries of the many-device "
                        "stops and of one more (untimed) migration's downtime window per variant")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.rounds = 2, 3
    result = run_loop(lambda: main(args), args.loop)
    result["loop"] = args.loop
    result["quick"] = args.quick
    result["machine"] = machine_info()
    json.dump(result, sys.stdout, indent=2)
    print()
