"""Reconnect benchmark; prints JSON.

A virtio-blk device (2 queues, 8 guest writers, reconnect on) runs on
qemu-storage-daemon, which is killed with SIGKILL and started again on the
same socket, ``--rounds`` times. Per round:

* ``kill_to_io_ms``: from the kill to the first request completed after it;
  it includes the daemon's own restart (exec to listening);
* ``socket_to_io_ms``: from the new daemon's socket appearing (watched by a
  thread polling every 50 us) to that first completion: the device's share
  (the next connection attempt, the handshake, the session replay, the rings
  resumed). Goal: median <= 50 ms.

Side by side in the same run, ``cold_start_ms``: from the socket appearing to
the first completion of a device realized from scratch on a fresh daemon
(realize, guest initialisation, first write), the floor a reconnect is held
against (``ratio_socket_to_io_vs_cold_start``). The same for the reference
back-end (INFLIGHT_SHMFD, as a process) when ``--ref`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Goal, goals, machine_info, profile_table, profiled, run_loop  # noqa: E402

from shadowvmm.config import DeviceConfig  # noqa: E402
from shadowvmm.guest.blk import BlkDriver  # noqa: E402
from shadowvmm.lifecycle import DeviceEventKind, ReconnectPolicy  # noqa: E402
from shadowvmm.machine import Machine  # noqa: E402
from shadowvmm.testing.blkcheck import Writers, pattern  # noqa: E402
from shadowvmm.testing.peers import QsdBlk, RefBlk, _Peer  # noqa: E402
from shadowvmm_vhost_user import VhostUserBackend  # noqa: E402

IMAGE_BYTES = 64 << 20
GOAL_SOCKET_TO_IO_MS = 50.0


class SocketWatch:
    """A thread that notes when *path* appears (after it was removed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SocketWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            if os.path.exists(self.path):       # looked at before the stop flag: join() comes
                self.seen_at = time.perf_counter()   # only after the socket exists
                return
            if self._stop.is_set():
                return
            time.sleep(0.00005)

    def join(self) -> None:
        self._stop.set()
        self._thread.join()


def restart_watched(peer: _Peer, path: Path) -> SocketWatch:
    path.unlink(missing_ok=True)        # a killed peer leaves its socket file behind
    watch = SocketWatch(path).start()
    peer.restart()
    watch.join()
    return watch


async def cold_start(peer: _Peer, path: Path, queues: int) -> float:
    """Socket appearing -> first completion, for a device realized from scratch."""
    peer.stop()
    path.unlink(missing_ok=True)
    watch = SocketWatch(path).start()
    await asyncio.to_thread(peer.restart)
    watch.join()
    machine = Machine(32 << 20)
    try:
        backend = VhostUserBackend({"socket": str(path), "device": "blk", "queues": queues})
        await machine.add_device(DeviceConfig("blk0", "bench", {}, queue_size=64, num_queues=queues), backend)
        driver = BlkDriver(machine.guest("blk0"))
        await driver.start(queue_size=64)
        await driver.write(0, pattern(0, 1))
        done = time.perf_counter()
    finally:
        await machine.close()
    assert watch.seen_at is not None
    return (done - watch.seen_at) * 1e3


async def rounds(peer: _Peer, path: Path, queues: int, count: int, interval: float) -> dict:
    machine = Machine(48 << 20)
    policy = ReconnectPolicy.bounded(interval=interval, deadline=5.0)
    kill_to_io, socket_to_io = [], []
    try:
        backend = VhostUserBackend({"socket": str(path), "device": "blk", "queues": queues})
        device = await machine.add_device(DeviceConfig("blk0", "bench", {}, queue_size=64, num_queues=queues,
                                                       reconnect=policy), backend)
        guest = machine.guest("blk0")
        driver = BlkDriver(guest, slots_per_queue=16)
        await driver.start(queue_size=64)
        writers = Writers(driver, queues=queues, writers=8, blocks=4096, seed=1, read_share=0.0).start()
        for _ in range(count):
            await asyncio.sleep(0.1)
            before = writers.completed
            killed = time.perf_counter()
            await asyncio.to_thread(peer.kill, signal.SIGKILL)
            after_kill = writers.completed
            watch = await asyncio.to_thread(restart_watched, peer, path)
            while writers.completed == after_kill:
                await asyncio.sleep(0)
            flowing = time.perf_counter()
            assert watch.seen_at is not None and writers.completed > before
            kill_to_io.append((flowing - killed) * 1e3)
            socket_to_io.append((flowing - watch.seen_at) * 1e3)
        await writers.pause(5)
        await writers.stop()
        problems = writers.violations + guest.violations
        if problems or device.events.last(DeviceEventKind.FAILED) is not None:
            raise RuntimeError(f"reconnect rounds went wrong: {problems} {device.failure}")
        return {"kill_to_io_ms": kill_to_io, "socket_to_io_ms": socket_to_io, "reconnects": device.stats.reconnects,
                "requests": writers.completed}
    finally:
        await machine.close()


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": len(values)}


async def bench_peer(name: str, peer: _Peer, path: Path, queues: int, count: int, interval: float,
                     profile: bool = False) -> dict:
    with peer:
        with profiled(profile) as prof:
            result = await rounds(peer, path, queues, count, interval)
        colds = [await cold_start(peer, path, queues) for _ in range(max(1 if count < 3 else 3, count // 2))]
    socket_median = statistics.median(result["socket_to_io_ms"])
    return {"peer": name, "kill_to_io_ms": summary(result["kill_to_io_ms"]),
            "socket_to_io_ms": summary(result["socket_to_io_ms"]), "cold_start_ms": summary(colds),
            "ratio_socket_to_io_vs_cold_start": round(socket_median / statistics.median(colds), 2),
            "goal_socket_to_io_ms": GOAL_SOCKET_TO_IO_MS,
            "goal_met": socket_median <= GOAL_SOCKET_TO_IO_MS,
            "reconnects": result["reconnects"], "requests": result["requests"],
            **({"profile": {"note": "cProfile of the rounds (kills, reconnects and the writers' I/O), per round",
                            "top": profile_table(prof, count, 15)}} if prof is not None else {})}


async def main(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="shadowvmm-bench-reconnect-"))
    out: dict = {"benchmark": "reconnect", "machine": machine_info(), "queues": args.queues,
                 "reconnect_interval_ms": args.interval_ms, "results": []}
    qsd = QsdBlk(work, image=work / "disk.img", size=IMAGE_BYTES, create=True, num_queues=args.queues)
    out["results"].append(await bench_peer("qemu-storage-daemon", qsd, qsd.socket_path, args.queues, args.rounds,
                                           args.interval_ms / 1e3, args.profile))
    if args.ref:
        ref = RefBlk(work, size=IMAGE_BYTES, queues=args.queues, latency_us=500)
        out["results"].append(await bench_peer("reference back-end (INFLIGHT_SHMFD)", ref, ref.socket_path,
                                               args.queues, args.rounds, args.interval_ms / 1e3, args.profile))
    out["goals"] = goals(*(Goal(f"reconnect.{'qsd' if r['peer'].startswith('qemu') else 'ref'}.socket_to_io",
                                r["socket_to_io_ms"]["median"], GOAL_SOCKET_TO_IO_MS, "ms")
                           for r in out["results"]))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--interval-ms", type=float, default=ReconnectPolicy().interval * 1e3,
                        help="reconnect attempt interval (default: the policy default)")
    parser.add_argument("--ref", action="store_true", help="also the reference back-end")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 cold start (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="add cProfile's top entries of the rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    logging.getLogger("shadowvmm").setLevel(logging.ERROR)     # each kill logs the loss by design
    result = run_loop(lambda: main(args), args.loop)
    result["quick"] = args.quick
    print(json.dumps(result, indent=2))
