#!/usr/bin/env python3
"""Stop latency of an idle 2-queue vhost-user-blk device on qemu-storage-daemon, next to its floor.

Measured: ``await device.stop()`` of a started, idle device (guest driver model, PCI, two
queues) on :class:`~shadowvmm_vhost_user.VhostUserBackend`, each stop followed by an untimed
``device.resume()``.

Floor, measured in the same run on the same loop, interleaved stop by stop: a minimal client
(plain sockets and asyncio, no shadowvmm) with its own session on a second export of the same
daemon (``exports=2``, the same ``null-co`` node), its own two rings started, replaying
byte for byte the messages shadowvmm's stop sent (captured once, untimed, before the timed
runs): it writes each message and waits for a reply where the message asks for one
(NEED_REPLY or a request with a reply body), so it makes the same round trips on the same
socket type. Its rings are restarted after each stop, untimed.

Prints JSON: the stop's and the floor's median/min/max in ms, the messages replayed and the
round trips they make, ratio = stop median / floor median, the goals (stop median <= 0.5 ms,
ratio <= 1.5) and whether they are met. ``--profile`` adds cProfile's top entries over
separate, untimed stops (in µs per stop).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import json
import mmap
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Goal, goals, machine_info, profile_table, run_checked, run_loop  # noqa: E402

from shadowvmm.config import DeviceConfig  # noqa: E402
from shadowvmm.guest.blk import BlkDriver  # noqa: E402
from shadowvmm.machine import Machine  # noqa: E402
from shadowvmm.testing.peers import QsdBlk, find_peer  # noqa: E402
from shadowvmm_vhost_user import VhostUserBackend, connection  # noqa: E402

GOAL_STOP_MS = 0.5
GOAL_RATIO = 1.5
QUEUES = 2
QUEUE_SIZE = 64
WARMUP = 20
#: Untimed pause after each resume: libvhost-user signals every ring's call fd at SET_VRING_CALL,
#: and the guest driver's handling of those interrupts belongs to the resume, not to the next stop.
SETTLE_S = 0.0005

# The floor client speaks vhost-user itself (QEMU docs/interop/vhost-user.rst "Message
# specification"): a 12-byte header (request, flags, size) and the payload, fds as SCM_RIGHTS.
_HDR = struct.Struct("=III")
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_REGION = struct.Struct("=QQQQ")
_VERSION, _REPLY, _NEED_REPLY = 0x1, 0x4, 0x8
_GET_FEATURES, _SET_FEATURES, _SET_OWNER, _SET_MEM_TABLE = 1, 2, 3, 5
_SET_VRING_NUM, _SET_VRING_ADDR, _SET_VRING_BASE, _GET_VRING_BASE = 8, 9, 10, 11
_SET_VRING_KICK, _SET_VRING_CALL = 12, 13
_GET_PROTOCOL_FEATURES, _SET_PROTOCOL_FEATURES, _SET_VRING_ENABLE = 15, 16, 18
#: Requests that always have a reply body (of those a stop may send).
_REPLY_BODY = frozenset({_GET_FEATURES, _GET_VRING_BASE, _GET_PROTOCOL_FEATURES})
_F_VERSION_1, _F_PROTOCOL_FEATURES = 1 << 32, 1 << 30
_MEMORY = 1 << 20


def wants_reply(message: bytes) -> bool:
    request, flags, _ = _HDR.unpack_from(message)
    return bool(flags & _NEED_REPLY) or request in _REPLY_BODY


class FloorClient:
    """A bare vhost-user front-end: blocking set-up, then timed replays on the asyncio loop."""

    def __init__(self, path: Path, protocol_features: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.memfd = os.memfd_create("floor-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, _MEMORY)
        self.mem = mmap.mmap(self.memfd, _MEMORY)
        self.host = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(QUEUES)]
        self.calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(QUEUES)]
        features = self._u64(_GET_FEATURES)
        offered = self._u64(_GET_PROTOCOL_FEATURES)
        self._send(_SET_PROTOCOL_FEATURES, _U64.pack(offered & protocol_features))
        self._send(_SET_OWNER)
        self._send(_SET_FEATURES, _U64.pack(features & (_F_VERSION_1 | _F_PROTOCOL_FEATURES)))
        table = struct.pack("=II", 1, 0) + _REGION.pack(0, _MEMORY, self.host, 0)
        self._send(_SET_MEM_TABLE, table, [self.memfd])
        for index in range(QUEUES):
            self.start_ring(index, 0)
        self._u64(_GET_FEATURES)    # a barrier: everything above was handled

    def _send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = _VERSION) -> None:
        data = _HDR.pack(request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def _recv_exact(self, size: int) -> bytes:
        buf = b""
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise ConnectionError("qemu-storage-daemon closed the floor session")
            buf += chunk
        return buf

    def _u64(self, request: int) -> int:
        self._send(request)
        _, _, size = _HDR.unpack(self._recv_exact(_HDR.size))
        return int(_U64.unpack(self._recv_exact(size))[0])

    def start_ring(self, index: int, base: int) -> None:
        ring = 0x10000 * (index + 1)
        self._send(_SET_VRING_CALL, _U64.pack(index), [self.calls[index]])
        self._send(_SET_VRING_NUM, _STATE.pack(index, QUEUE_SIZE))
        self._send(_SET_VRING_BASE, _STATE.pack(index, base))
        self._send(_SET_VRING_ADDR, _ADDR.pack(index, 0, self.host + ring, self.host + ring + 0x2000,
                                               self.host + ring + 0x1000, ring + 0x2000))
        self._send(_SET_VRING_KICK, _U64.pack(index), [self.kicks[index]])
        self._send(_SET_VRING_ENABLE, _STATE.pack(index, 1))

    def restart(self) -> None:
        """Untimed: start both rings again after a replayed stop (blocking)."""
        self.sock.setblocking(True)
        for index in range(QUEUES):
            self.start_ring(index, 0)
        self._u64(_GET_FEATURES)

    async def replay(self, messages: Sequence[bytes]) -> float:
        """Send *messages* in order, awaiting each reply asked for; the seconds it took."""
        loop = asyncio.get_running_loop()
        sock = self.sock
        sock.setblocking(False)
        t0 = time.perf_counter()
        for message in messages:
            await loop.sock_sendall(sock, message)
            if wants_reply(message):
                header = await _recv_exact_async(loop, sock, _HDR.size)
                _, flags, size = _HDR.unpack(header)
                body = await _recv_exact_async(loop, sock, size) if size else b""
                if flags != _VERSION | _REPLY or (len(body) == 8 and _HDR.unpack_from(message)[0] != _GET_VRING_BASE
                                                   and _U64.unpack(body)[0]):
                    raise RuntimeError(f"floor: unexpected reply flags={flags:#x} body={body.hex()}")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()
        self.mem.close()
        for fd in (self.memfd, *self.kicks, *self.calls):
            os.close(fd)


async def _recv_exact_async(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = await loop.sock_recv(sock, size - len(buf))
        if not chunk:
            raise ConnectionError("qemu-storage-daemon closed the floor session")
        buf += chunk
    return buf


async def capture_stop(device: Any) -> list[bytes]:
    """The messages one stop sends (the connection's send wrapped for this one untimed stop)."""
    sent: list[bytes] = []
    original = connection.send_nowait

    def recording(sock: socket.socket, data: bytes, fds: Sequence[int]) -> int:
        if fds:
            raise RuntimeError("a stop sent fds: the floor replays fd-less messages only")
        sent.append(bytes(data))
        return original(sock, data, fds)

    connection.send_nowait = recording     # type: ignore[assignment]
    try:
        await device.stop()
    finally:
        connection.send_nowait = original  # type: ignore[assignment]
    await device.resume()
    return sent


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    return {"median_ms": round(statistics.median(ms), 4), "min_ms": round(min(ms), 4), "max_ms": round(max(ms), 4)}


async def measure(sockets: list[Path], iterations: int, profile: bool) -> dict[str, Any]:
    machine = Machine(64 << 20)
    backend = VhostUserBackend({"socket": str(sockets[0]), "device": "blk", "queues": QUEUES})
    await machine.add_device(DeviceConfig("blk0", "vhost-user", {}, transport="pci"), backend)
    guest = machine.guest("blk0")
    floor: FloorClient | None = None
    try:
        driver = BlkDriver(guest)
        await driver.start(num_queues=QUEUES, queue_size=QUEUE_SIZE)
        device = machine.device("blk0")
        messages = await capture_stop(device)
        floor = FloorClient(sockets[1], int(backend.protocol_features))
        ours: list[float] = []
        bare: list[float] = []
        for i in range(WARMUP + iterations):
            t0 = time.perf_counter()
            await device.stop()
            took = time.perf_counter() - t0
            await device.resume()
            await asyncio.sleep(SETTLE_S)
            floor_took = await floor.replay(messages)
            floor.restart()
            if i >= WARMUP:
                ours.append(took)
                bare.append(floor_took)
        result: dict[str, Any] = {
            "messages": [_describe(m) for m in messages],
            "round_trips": sum(wants_reply(m) for m in messages),
            "stop": summary(ours), "floor": summary(bare), "iterations": iterations,
            "stops_counted": device.stats.stops,
        }
        if profile:
            runs = max(iterations, 50)
            prof = cProfile.Profile()
            for _ in range(runs):
                prof.enable()
                await device.stop()
                prof.disable()
                await device.resume()
                await asyncio.sleep(SETTLE_S)
            result["profile"] = {"stops": runs, "note": "cProfile over untimed stops; profiler overhead "
                                 "inflates every figure", "top": profile_table(prof, runs, top=80)}
        return result
    finally:
        if floor is not None:
            floor.close()
        guest.close()
        await machine.close()


def _describe(message: bytes) -> str:
    request, flags, size = _HDR.unpack_from(message)
    name = connection.FrontendRequest(request).name
    return f"{name} flags={flags:#x} size={size}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300, help="timed stops (and floor stops), default 300")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (default uvloop, as `shadowvmm run`)")
    parser.add_argument("--profile", action="store_true", help="add cProfile's top entries of the stop")
    parser.add_argument("--quick", action="store_true", help="20 stops (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = 20
    version = run_checked([find_peer("qemu-storage-daemon"), "--version"]).splitlines()[0]
    with tempfile.TemporaryDirectory(prefix="shadowvmm-stop-") as tmp:
        with QsdBlk(tmp, size=1 << 30, num_queues=QUEUES, exports=2, name="qsd-stop") as qsd:
            got = run_loop(lambda: measure(qsd.socket_paths, args.iterations, args.profile), args.loop)
    stop_ms, floor_ms = got["stop"]["median_ms"], got["floor"]["median_ms"]
    ratio = round(stop_ms / floor_ms, 3)
    return {
        "benchmark": "stop_latency",
        "workload": f"device.stop() of an idle {QUEUES}-queue vhost-user-blk device, then an untimed resume",
        "peer": version,
        "floor_client": "plain-socket asyncio client, own session on a second export, replaying the stop's messages",
        "loop": args.loop,
        **got,
        "ratio": ratio,
        "goal": {"stop_median_ms_at_most": GOAL_STOP_MS, "ratio_at_most": GOAL_RATIO,
                 "stop_met": stop_ms <= GOAL_STOP_MS, "ratio_met": ratio <= GOAL_RATIO,
                 "met": stop_ms <= GOAL_STOP_MS and ratio <= GOAL_RATIO},
        "goals": goals(Goal("stop_latency.idle_2q_qsd", stop_ms, GOAL_STOP_MS, "ms"),
                       Goal("stop_latency.stop_vs_floor", ratio, GOAL_RATIO, "ratio")),
        "machine": machine_info(),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
