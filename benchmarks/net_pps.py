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
process and core) against the *same* backend process, started first; rates from testpmd's
packet counters over a fixed window.

Directions: ``tx`` = our transmitq -> testpmd ``rxonly``; ``rx`` = testpmd ``txonly`` -> our
receiveq. Correctness: before the timed runs 256 distinct frames go through testpmd in ``io``
mode and must come back byte for byte; after each timed run testpmd's port counters must equal
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

from _common import machine_info, profile_table, profiled, run_loop  # noqa: E402

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
FRAMES = 2_000_000
DPDK_SECS = 3.0
WARMUP_SECS = 1.0
RING = 256
BATCH = 256
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


# ---------------------------------------------------------------------- DPDK virtio-user

def dpdk_reference(workdir: str, backend: DpdkTestpmd, packed: bool, secs: float, warmup: float,
                   lcores: str) -> dict[str, Any]:
    """virtio-user txonly -> vhost rxonly, then vhost txonly -> virtio-user rxonly."""
    out: dict[str, Any] = {}
    with DpdkVirtioUser(workdir, backend.socket_path, forward_mode="txonly", lcores=lcores,
                        vdev_args="packed_vq=1" if packed else "") as fe:
        for direction, (fe_mode, be_mode) in (("tx", ("txonly", "rxonly")), ("rx", ("rxonly", "txonly"))):
            fe.command(f"set fwd {fe_mode}")
            backend.command(f"set fwd {be_mode}")
            backend.start_forwarding()
            fe.start_forwarding()
            time.sleep(warmup)
            peer = backend if direction == "tx" else fe     # the receiving side counts
            before, t0 = peer.port_stats()[0]["RX-packets"], time.perf_counter()
            time.sleep(secs)
            after, t1 = peer.port_stats()[0]["RX-packets"], time.perf_counter()
            fe.stop_forwarding()
            backend.stop_forwarding()
            out[direction] = {"packets": after - before, "seconds": round(t1 - t0, 4),
                              "mpps": round((after - before) / (t1 - t0) / 1e6, 4)}
        features = negotiated(backend)
    out["features"] = None if features is None else hex(features)
    out["packed_negotiated"] = None if features is None else bool(features & Feature.RING_PACKED)
    return out


# ---------------------------------------------------------------------- ours

async def _send_all(driver: NetDriver, pool: list[bytes], count: int, batch: int) -> None:
    sent, size, turns = 0, len(pool), 0
    send = driver.send_batch
    while sent < count:
        start = sent % size
        sent += send(pool[start:start + min(batch, count - sent, size - start)])
        turns += 1
        if turns & 63 == 0:
            await asyncio.sleep(0)
    while driver.tx_pending():
        await asyncio.sleep(0)


async def _recv(driver: NetDriver, count: int, batch: int, keep: list[bytes]) -> int:
    got, turns = 0, 0
    recv = driver.recv_batch
    while got < count:
        frames = recv(batch)
        if frames and len(keep) < SAMPLE:
            keep += frames[:SAMPLE - len(keep)]
        got += len(frames)
        turns += 1
        if turns & 63 == 0:
            await asyncio.sleep(0)
    return got


async def _drain(driver: NetDriver, keep: list[bytes]) -> int:
    got, idle = 0, 0
    while idle < 50:
        frames = driver.recv_batch(RING)
        got += len(frames)
        if frames:
            keep[:] = (keep + frames)[-SAMPLE:]
        idle = 0 if frames else idle + 1
        await asyncio.sleep(0.001)
    return got


async def ours(peer: DpdkTestpmd, packed: bool, event_idx: bool, frames: int, batch: int,
               profile: bool) -> dict[str, Any]:
    machine = Machine(64 << 20)
    cfg = {"socket": str(peer.socket_path), "device": "net", "timeout": 5.0, "queues": 2}
    config = NetConfig(mac=MAC, status=NetStatus.LINK_UP).pack(NET_CONFIG_BASE_SIZE)
    await machine.add_device(DeviceConfig("net0", "vhost-user", cfg,
                                          vmm_features=int(NetFeature.MAC | NetFeature.STATUS)),
                             backend=VhostUserBackend(cfg), config_override=config)
    driver = NetDriver(machine.guest("net0"), tx_slots=RING)
    out: dict[str, Any] = {}
    try:
        features = await driver.start(packed=packed, event_idx=event_idx, queue_size=RING, poll=True)
        out["features"] = hex(features)
        out["packed_negotiated"] = bool(features & Feature.RING_PACKED)
        out["event_idx"] = bool(features & Feature.EVENT_IDX)
        pool = frame_pool()
        peer.command("set fwd io")
        peer.start_forwarding()
        await _send_all(driver, pool, SAMPLE, batch)
        echoed: list[bytes] = []
        await asyncio.wait_for(_recv(driver, SAMPLE, batch, echoed), 10)
        peer.stop_forwarding()
        if echoed != pool:
            raise RuntimeError("io-mode echo: the frames that came back differ from those sent")
        out["sample_echo_verified"] = SAMPLE
        out["tx"] = await _tx(driver, peer, pool, frames, batch, profile)
        out["rx"] = await _rx(driver, peer, frames, batch, profile)
    finally:
        await asyncio.wait_for(driver.close(), 10)
        await machine.close()
    return out


async def _profiled(loop: Callable[[], Awaitable[Any]], frames: int) -> dict[str, Any]:
    """A cProfile pass of *loop* (not the timed one): the top functions in µs per frame."""
    with profiled(True) as prof:
        await loop()
    assert prof is not None
    return {"frames": frames, "note": "cProfile pass, not the timed one; profiler overhead inflates "
            "every figure", "top": profile_table(prof, frames)}


def _counters(driver: NetDriver) -> tuple[int, int]:
    queues = driver.dev.queues
    return queues[1].notifies, queues[0].notifies


async def _tx(driver: NetDriver, peer: DpdkTestpmd, pool: list[bytes], frames: int, batch: int,
              profile: bool) -> dict[str, Any]:
    peer.command("set fwd rxonly")
    peer.clear_stats()
    peer.start_forwarding()
    kicks, _ = _counters(driver)
    sent0 = driver.tx[0].sent
    t0 = time.perf_counter()
    c0 = time.process_time()
    await _send_all(driver, pool, frames, batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    entry = {"frames": frames, "seconds": round(wall, 4), "mpps": round(frames / wall / 1e6, 4),
             "cpu_seconds": round(cpu, 3), "kicks_per_frame": round((_counters(driver)[0] - kicks) / frames, 5)}
    if profile:
        count = max(frames // 4, 1000)
        entry["profile"] = await _profiled(lambda: _send_all(driver, pool, count, batch), count)
    peer.stop_forwarding()
    stats = peer.port_stats()[0]
    sent = driver.tx[0].sent - sent0
    nbytes = FRAME * sent
    if (stats["RX-packets"], stats["RX-bytes"]) != (sent, nbytes) or stats["RX-errors"] or stats["RX-missed"]:
        raise RuntimeError(f"tx: we sent {sent} frames ({nbytes} B), testpmd counted {stats}")
    entry["testpmd_rx_packets"] = stats["RX-packets"]
    entry["counters_match"] = True
    return entry


async def _rx(driver: NetDriver, peer: DpdkTestpmd, frames: int, batch: int, profile: bool) -> dict[str, Any]:
    peer.command("set fwd txonly")
    peer.clear_stats()
    received0 = driver.rx[0].received
    head: list[bytes] = []
    _, kicks = _counters(driver)
    peer.start_forwarding()
    t0 = time.perf_counter()
    c0 = time.process_time()
    got = await _recv(driver, frames, batch, head)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    entry: dict[str, Any] = {"frames": got, "seconds": round(wall, 4), "mpps": round(got / wall / 1e6, 4),
                             "cpu_seconds": round(cpu, 3),
                             "kicks_per_frame": round((_counters(driver)[1] - kicks) / got, 5)}
    if profile:
        count = max(frames // 4, 1000)
        entry["profile"] = await _profiled(lambda: _recv(driver, count, batch, []), count)
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

def measure_layout(layout: str, args: argparse.Namespace, workdir: str, cpus: list[int] | None) -> dict[str, Any]:
    packed = layout == "packed"
    be_lcores = fe_lcores = None
    if cpus is not None:
        be_lcores = f"0@{cpus[0]},1@{cpus[1]}"     # forwarding lcore on the second CPU
        fe_lcores = f"0@{cpus[1]},1@{cpus[0]}"     # virtio-user's forwarding lcore on the first
    with DpdkTestpmd(workdir, forward_mode="io", lcores=be_lcores, name=f"vhost-{layout}") as backend:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[0]})
        ref = dpdk_reference(workdir, backend, packed, args.dpdk_secs, args.warmup, fe_lcores)
        got = run_loop(lambda: ours(backend, packed, args.event_idx, args.frames, args.batch, args.profile),
                       args.loop)
    entry: dict[str, Any] = {"negotiated": {"shadowvmm": got.pop("features"), "dpdk": ref.pop("features"),
                                            "packed": {"shadowvmm": got.pop("packed_negotiated"),
                                                       "dpdk": ref.pop("packed_negotiated")}},
                             "event_idx": got.pop("event_idx"), "sample_echo_verified": got.pop("sample_echo_verified")}
    if packed and not entry["negotiated"]["packed"]["shadowvmm"]:
        entry["note"] = "testpmd's vhost backend did not negotiate VIRTIO_F_RING_PACKED"
    for direction in ("tx", "rx"):
        ratio = got[direction]["mpps"] / ref[direction]["mpps"] if ref[direction]["mpps"] else None
        entry[direction] = {"shadowvmm": got[direction], "dpdk_virtio_user": ref[direction],
                            "ratio": None if ratio is None else round(ratio, 4)}
    return entry


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=FRAMES, help=f"frames per timed run (default {FRAMES})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"frames per send_batch/recv_batch (default {BATCH})")
    parser.add_argument("--dpdk-secs", type=float, default=DPDK_SECS, help="DPDK measurement window")
    parser.add_argument("--warmup", type=float, default=WARMUP_SECS, help="DPDK warm-up before the window")
    parser.add_argument("--layouts", default="split,packed", help="comma-separated: split, packed")
    parser.add_argument("--event-idx", action="store_true", help="negotiate VIRTIO_F_EVENT_IDX (ours)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--profile", action="store_true", help="add a cProfile pass of each of our loops")
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the scheduler")
    args = parser.parse_args(argv)
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
        "reference": "dpdk-testpmd net_virtio_user0 (DPDK's virtio PMD) against the same testpmd vhost backend",
        "ring_size": RING,
        "batch": args.batch,
        "loop": args.loop,
        "cpu_pinning": None if pinning is None else {"shadowvmm_and_virtio_user": pinning[0],
                                                     "testpmd_vhost_forwarding": pinning[1]},
        "results": results,
        "goal": {"tx_ratio_at_least": GOAL_TX, "tx_ratios": tx_ratios, "met": met},
        "machine": machine_info(),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
