#!/usr/bin/env python3
"""64-byte packet rate of the guest net driver model against dpdk-testpmd's vhost backend,
next to DPDK's own virtio-user frontend against the same backend, in the same run.

Path measured (ours): the guest :class:`~shadowvmm.guest.net.NetDriver` in polling mode
(``send_batch`` / ``recv_batch``: one avail-index store per batch, completions reaped in
batches, no interrupt asked for, a kick only when the device's event suppression asks for
one) -> the VMM's notify intercept (transport register -> :meth:`VirtioDevice.notify` -> the
vhost-user kick eventfd) -> ``dpdk-testpmd`` ``net_vhost0`` (vhost-user, split or packed ring).
The guest model runs in this process, pinned to one CPU; testpmd's forwarding lcore on the other.
Nothing of that path is bypassed: the batch calls only change how the driver model writes the
rings. The ring memory and buffers are written through the guest-memory mapping (as a guest
kernel writes its RAM); what polling mode leaves out is the interrupt path (no MSI-X vector is
taken while the measured loop runs, as with a busy-polling NAPI or DPDK PMD guest).

Reference (DPDK): ``dpdk-testpmd`` ``net_virtio_user0`` (DPDK's virtio driver, its own
process; its forwarding lcore on the CPU our process uses) against the *same* backend process.
Per direction, DPDK's window runs first and ours right after it (the same ``--secs``), so the
two rates are taken seconds apart under the same machine load; each window also records the
CPU seconds of the frontend and backend and the cores everything else used (``others_cores``),
and ``ratio_per_frontend_cpu_second`` compares frames per CPU-second of each frontend.

Directions: ``tx`` = our transmitq -> testpmd ``rxonly``; ``rx`` = testpmd ``txonly`` -> our
receiveq. Our tx hands ``send_batch`` ``--batch`` frames a call, slices of a pool of that many
distinct frames (the pool once held 256, which silently capped every call at 256).
Correctness: before the timed runs 256 distinct frames go through testpmd in ``io`` mode and
must come back byte for byte; after each timed run testpmd's port counters must equal
ours (tx: its RX-packets/RX-bytes = frames we sent; rx: its TX-packets = frames we received,
after draining), and a sample of the received frames must be testpmd's txonly UDP frames.

Prints JSON: per ring layout and direction our Mpps, DPDK's Mpps, the ratio; the goal
(ours / DPDK >= 0.25 for tx) met or not. ``--profile`` adds a cProfile pass (not the timed one)
of each of our loops with the functions that cost most, in µs per packet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Goal, goals, machine_info, profile_table, profiled, run_loop  # noqa: E402

from shadowvmm.config import DeviceConfig  # noqa: E402
from shadowvmm.guest.net import NetDriver  # noqa: E402
from shadowvmm.machine import Machine  # noqa: E402
from shadowvmm.testing.peers import DpdkTestpmd, DpdkVirtioUser  # noqa: E402
from shadowvmm.virtio.constants import Feature, NetFeature  # noqa: E402
from shadowvmm.virtio.devcfg import NET_CONFIG_BASE_SIZE, NetConfig, NetStatus  # noqa: E402
from shadowvmm_vhost_user import VhostUserBackend  # noqa: E402

FRAME = 64
GOAL_TX = 0.25
MAC = NetConfig.parse_mac("52:54:00:12:34:56")
SAMPLE = 256
FRAMES = 10_000_000
SECS = 3.0
WARMUP_SECS = 1.0
RING = 1024
BATCH = 512
_NEGOTIATED = re.compile(r"negotiated Virtio features: (0x[0-9a-f]+)")
#: testpmd txonly's frame (app/test-pmd/txonly.c defaults): IPv4 (0x0800), UDP, ports 9 -> 9
_TXONLY_ETHERTYPE, _UDP, _TXONLY_PORTS = b"\x08\x00", 17, struct.pack(">HH", 9, 9)
BYPASSED = ("nothing on the kick path (notify register -> VirtioDevice.notify -> kick eventfd); "
            "the interrupt path is unused: polling mode asks the device not to interrupt "
            "(NO_INTERRUPT / event flags DISABLE) and reaps the used ring in the measured loop")


def frame_pool(count: int = SAMPLE) -> list[bytes]:
    """Distinct 64-byte frames: broadcast, local-experimental EtherType, a sequence number."""
    return [b"\xff" * 6 + MAC + b"\x88\xb5" + struct.pack(">I", i) + bytes(range(i % 64, i % 64 + FRAME - 18))
            for i in range(count)]


def check_txonly_frame(frame: bytes) -> None:
    """A frame of testpmd's txonly mode: 64 bytes, IPv4/UDP, ports 9 -> 9."""
    if len(frame) != FRAME or frame[12:14] != _TXONLY_ETHERTYPE or frame[14] >> 4 != 4 \
            or frame[23] != _UDP or frame[34:38] != _TXONLY_PORTS:
        raise RuntimeError(f"not a testpmd txonly frame: {frame.hex()}")


def negotiated(peer: DpdkTestpmd) -> int | None:
    found = _NEGOTIATED.findall(peer.log_path.read_text(errors="replace"))
    return int(found[-1], 16) if found else None


# ---------------------------------------------------------------------- CPU accounting

def _jiffies(pid: int) -> int:
    """User + system clock ticks of every thread of *pid*."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]


class CpuWindow:
    """CPU seconds the *pids* (this process included if listed) and everything else used."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __enter__(self) -> CpuWindow:
        self._t, self._busy = time.perf_counter(), _busy_jiffies()
        self._own = [_jiffies(pid) for pid in self.pids]
        return self

    def __exit__(self, *exc: object) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        self.wall = time.perf_counter() - self._t
        self.cpu = [(_jiffies(pid) - j) / hz for pid, j in zip(self.pids, self._own)]
        self.others_cores = ((_busy_jiffies() - self._busy) / hz - sum(self.cpu)) / self.wall


# ---------------------------------------------------------------------- DPDK virtio-user

def dpdk_window(workdir: str, backend: DpdkTestpmd, packed: bool, direction: str, args: argparse.Namespace,
                lcores: str | None) -> dict[str, Any]:
    """tx: virtio-user txonly -> vhost rxonly; rx: vhost txonly -> virtio-user rxonly."""
    fe_mode, be_mode = ("txonly", "rxonly") if direction == "tx" else ("rxonly", "txonly")
    devargs = f"queue_size={args.ring}" + (",packed_vq=1" if packed else "")
    with DpdkVirtioUser(workdir, backend.socket_path, forward_mode=fe_mode, lcores=lcores, vdev_args=devargs) as fe:
        backend.command(f"set fwd {be_mode}")
        backend.start_forwarding()
        fe.start_forwarding()
        time.sleep(args.warmup)
        counter = backend if direction == "tx" else fe      # the receiving side counts
        before = counter.port_stats()[0]["RX-packets"]
        with CpuWindow([fe.pid, backend.pid]) as cpu:
            time.sleep(args.secs)
            after = counter.port_stats()[0]["RX-packets"]
        fe.stop_forwarding()
        backend.stop_forwarding()
        features = negotiated(backend)
    packets = after - before
    return {"packets": packets, "seconds": round(cpu.wall, 4), "mpps": round(packets / cpu.wall / 1e6, 4),
            "cpu_frontend_seconds": round(cpu.cpu[0], 3), "cpu_backend_seconds": round(cpu.cpu[1], 3),
            "others_cores": round(cpu.others_cores, 2),
            "features": None if features is None else hex(features),
            "packed_negotiated": None if features is None else bool(features & Feature.RING_PACKED)}


# ---------------------------------------------------------------------- ours

async def _send_all(driver: NetDriver, pool: list[bytes], count: int, batch: int, secs: float = 1e9) -> int:
    sent, size, turns = 0, len(pool), 0
    send = driver.send_batch
    deadline = time.perf_counter() + secs
    while sent < count:
        start = sent % size
        sent += send(pool[start:start + min(batch, count - sent, size - start)])
        turns += 1
        if turns & 63 == 0:
            await asyncio.sleep(0)
            if time.perf_counter() > deadline:
                break
    while driver.tx_pending():
        await asyncio.sleep(0)
    return sent


async def _recv(driver: NetDriver, count: int, batch: int, keep: list[bytes], secs: float = 1e9) -> int:
    got, turns = 0, 0
    recv = driver.recv_batch
    deadline = time.perf_counter() + secs
    while got < count:
        frames = recv(batch)
        if frames and len(keep) < SAMPLE:
            keep += frames[:SAMPLE - len(keep)]
        got += len(frames)
        turns += 1
        if turns & 63 == 0:
            await asyncio.sleep(0)
            if time.perf_counter() > deadline:
                break
    return got


async def _drain(driver: NetDriver, keep: list[bytes]) -> int:
    got, idle = 0, 0
    while idle < 50:
        frames = driver.recv_batch(BATCH)
        got += len(frames)
        if frames:
            keep[:] = (keep + frames)[-SAMPLE:]
        idle = 0 if frames else idle + 1
        await asyncio.sleep(0.001)
    return got


async def _profiled(loop: Callable[[], Awaitable[Any]], frames: int) -> dict[str, Any]:
    """A cProfile pass of *loop* (not the timed one): the top functions in CPU µs per frame."""
    with profiled(True, time.thread_time) as prof:
        await loop()
    assert prof is not None
    return {"frames": frames, "timer": "thread CPU time (time spent descheduled is not counted)",
            "note": "cProfile pass, not the timed one; profiler overhead inflates every figure",
            "top": profile_table(prof, frames)}


async def ours_window(peer: DpdkTestpmd, packed: bool, direction: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start the guest driver in polling mode, check an io-mode echo, then time one direction."""
    machine = Machine(64 << 20)
    cfg = {"socket": str(peer.socket_path), "device": "net", "timeout": 5.0, "queues": 2}
    config = NetConfig(mac=MAC, status=NetStatus.LINK_UP).pack(NET_CONFIG_BASE_SIZE)
    await machine.add_device(DeviceConfig("net0", "vhost-user", cfg, queue_size=args.ring,
                                          vmm_features=int(NetFeature.MAC | NetFeature.STATUS)),
                             backend=VhostUserBackend(cfg), config_override=config)
    driver = NetDriver(machine.guest("net0"), tx_slots=args.ring)
    try:
        features = await driver.start(packed=packed, event_idx=args.event_idx, queue_size=args.ring, poll=True,
                                       in_order=not args.no_in_order)
        pool = frame_pool(max(SAMPLE, args.batch))      # a batch is one slice of the pool
        peer.command("set fwd io")
        peer.start_forwarding()
        await _send_all(driver, pool[:SAMPLE], SAMPLE, args.batch)
        echoed: list[bytes] = []
        await asyncio.wait_for(_recv(driver, SAMPLE, args.batch, echoed), 10)
        peer.stop_forwarding()
        if echoed != pool[:SAMPLE]:
            raise RuntimeError("io-mode echo: the frames that came back differ from those sent")
        timed = _tx if direction == "tx" else _rx
        out = await timed(driver, peer, pool, args)
        out.update(queue_size=driver.dev.queues[1].size, features=hex(features),
                   packed_negotiated=bool(features & Feature.RING_PACKED),
                   event_idx=bool(features & Feature.EVENT_IDX),
                   in_order=bool(features & Feature.IN_ORDER), sample_echo_verified=SAMPLE)
        return out
    finally:
        await asyncio.wait_for(driver.close(), 10)
        await machine.close()


def _entry(count: int, cpu: CpuWindow, kicks: int) -> dict[str, Any]:
    return {"frames": count, "seconds": round(cpu.wall, 4), "mpps": round(count / cpu.wall / 1e6, 4),
            "cpu_frontend_seconds": round(cpu.cpu[0], 3), "cpu_backend_seconds": round(cpu.cpu[1], 3),
            "others_cores": round(cpu.others_cores, 2), "kicks_per_frame": round(kicks / max(count, 1), 5)}


async def _tx(driver: NetDriver, peer: DpdkTestpmd, pool: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    peer.command("set fwd rxonly")
    peer.clear_stats()
    peer.start_forwarding()
    queue = driver.dev.queues[1]
    kicks, sent0 = queue.notifies, driver.tx[0].sent
    with CpuWindow([os.getpid(), peer.pid]) as cpu:
        count = await _send_all(driver, pool, args.frames, args.batch, args.secs)
    entry = _entry(count, cpu, queue.notifies - kicks)
    if args.profile:
        frames = max(count // 4, 1000)
        entry["profile"] = await _profiled(lambda: _send_all(driver, pool, frames, args.batch), frames)
    peer.stop_forwarding()
    stats = peer.port_stats()[0]
    sent = driver.tx[0].sent - sent0
    if (stats["RX-packets"], stats["RX-bytes"]) != (sent, FRAME * sent) or stats["RX-errors"] or stats["RX-missed"]:
        raise RuntimeError(f"tx: we sent {sent} frames ({FRAME * sent} B), testpmd counted {stats}")
    entry.update(testpmd_rx_packets=stats["RX-packets"], counters_match=True)
    return entry


async def _rx(driver: NetDriver, peer: DpdkTestpmd, pool: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    peer.command("set fwd txonly")
    peer.clear_stats()
    received0 = driver.rx[0].received
    queue = driver.dev.queues[0]
    head: list[bytes] = []
    kicks = queue.notifies
    peer.start_forwarding()
    with CpuWindow([os.getpid(), peer.pid]) as cpu:
        count = await _recv(driver, args.frames, args.batch, head, args.secs)
    entry = _entry(count, cpu, queue.notifies - kicks)
    if args.profile:
        frames = max(count // 4, 1000)
        entry["profile"] = await _profiled(lambda: _recv(driver, frames, args.batch, []), frames)
    peer.stop_forwarding()
    tail: list[bytes] = []
    await _drain(driver, tail)
    for f in head + tail:
        check_txonly_frame(f)
    stats = peer.port_stats()[0]
    total = driver.rx[0].received - received0
    if stats["TX-packets"] != total or stats["TX-bytes"] != FRAME * total or driver.rx[0].errors:
        raise RuntimeError(f"rx: we received {total} frames, testpmd counted {stats}")
    entry.update(testpmd_tx_packets=stats["TX-packets"], counters_match=True,
                 payload_sample_verified=len(head) + len(tail))
    return entry


# ---------------------------------------------------------------------- main

def _ratio(ours: float, ref: float) -> float | None:
    return round(ours / ref, 4) if ref else None


def measure_layout(layout: str, args: argparse.Namespace, workdir: str, cpus: list[int] | None) -> dict[str, Any]:
    """Per direction: DPDK's window, then ours right after, against one backend process."""
    packed = layout == "packed"
    be_lcores = fe_lcores = None
    if cpus is not None:
        be_lcores = f"0@{cpus[0]},1@{cpus[1]}"     # forwarding lcore on the second CPU
        fe_lcores = f"0@{cpus[1]},1@{cpus[0]}"     # virtio-user's forwarding lcore on the first
    entry: dict[str, Any] = {}
    with DpdkTestpmd(workdir, forward_mode="io", lcores=be_lcores, name=f"vhost-{layout}") as backend:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[0]})
        for direction in ("tx", "rx"):
            ref = dpdk_window(workdir, backend, packed, direction, args, fe_lcores)
            got = run_loop(lambda d=direction: ours_window(backend, packed, d, args), args.loop)
            entry["negotiated"] = {"shadowvmm": got.pop("features"), "dpdk": ref.pop("features"),
                                   "packed": {"shadowvmm": got.pop("packed_negotiated"),
                                              "dpdk": ref.pop("packed_negotiated")}}
            entry["event_idx"] = got.pop("event_idx")
            entry["queue_size"] = {"shadowvmm": got.pop("queue_size"), "dpdk": args.ring}
            entry["sample_echo_verified"] = got.pop("sample_echo_verified")
            per_cpu = _ratio(got["frames"] / max(got["cpu_frontend_seconds"], 1e-3),
                             ref["packets"] / max(ref["cpu_frontend_seconds"], 1e-3))
            entry[direction] = {"shadowvmm": got, "dpdk_virtio_user": ref, "ratio": _ratio(got["mpps"], ref["mpps"]),
                                "ratio_per_frontend_cpu_second": per_cpu}
    if packed and not entry["negotiated"]["packed"]["shadowvmm"]:
        entry["note"] = "testpmd's vhost backend did not negotiate VIRTIO_F_RING_PACKED"
    return entry


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secs", type=float, default=SECS, help=f"measurement window, both sides (default {SECS})")
    parser.add_argument("--frames", type=int, default=FRAMES, help="cap on our frames per window")
    parser.add_argument("--ring", type=int, default=RING, help=f"queue size, both frontends (default {RING})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"frames per send_batch/recv_batch (default {BATCH})")
    parser.add_argument("--warmup", type=float, default=WARMUP_SECS, help="DPDK warm-up before its window")
    parser.add_argument("--layouts", default="split,packed", help="comma-separated: split, packed")
    parser.add_argument("--event-idx", action="store_true", help="negotiate VIRTIO_F_EVENT_IDX (ours)")
    parser.add_argument("--no-in-order", action="store_true", help="do not negotiate VIRTIO_F_IN_ORDER (ours)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--profile", action="store_true", help="add a cProfile pass of each of our loops")
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the scheduler")
    parser.add_argument("--quick", action="store_true", help="0.3 s windows, split rings only (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.secs, args.warmup, args.layouts = 0.3, min(args.warmup, 0.3), "split"
    cpus = sorted(os.sched_getaffinity(0))
    pinning = None if args.no_pin or len(cpus) < 2 else cpus[:2]
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="shadowvmm-pps-") as tmp:
            for layout in args.layouts.split(","):
                results[layout] = measure_layout(layout, args, tmp, pinning)
    finally:
        os.sched_setaffinity(0, set(cpus))
    tx_ratios = {layout: r["tx"]["ratio"] for layout, r in results.items()}
    met = all(r is not None and r >= GOAL_TX for r in tx_ratios.values()) if tx_ratios else None
    return {
        "benchmark": "net_pps",
        "frame_bytes": FRAME,
        "path": "guest NetDriver (polling mode, batch API) -> transport notify register -> VirtioDevice.notify "
                "-> vhost-user kick eventfd -> dpdk-testpmd net_vhost0",
        "bypassed": BYPASSED,
        "reference": "dpdk-testpmd net_virtio_user0 (DPDK's virtio PMD) against the same testpmd vhost backend, "
                     "its window right before ours, per direction",
        "ring_size": args.ring,
        "batch": args.batch,
        "loop": args.loop,
        "cpu_pinning": None if pinning is None else {"shadowvmm_and_virtio_user": pinning[0],
                                                     "testpmd_vhost_forwarding": pinning[1]},
        "results": results,
        "goal": {"tx_ratio_at_least": GOAL_TX, "tx_ratios": tx_ratios, "met": met},
        "goals": goals(*(Goal(f"net_pps.tx_vs_dpdk.{layout}", ratio, GOAL_TX, "ratio", "higher")
                         for layout, ratio in tx_ratios.items())),
        "machine": machine_info(),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
