"""Acceptance (vhost-user issue), virtio-net: guest model -> device layer -> VhostUserBackend ->
the real dpdk-testpmd (``net_vhost``), 100,000 frames in io mode and in macswap mode.

Every frame carries a sequence number, so each one must come back exactly once; the guest's
receive counts and bytes must equal testpmd's port statistics; in io mode the stream runs
across transparent stop/resume cycles while frames are in flight, with the guest reading only
DRIVER_OK. testpmd negotiates vhost-user STATUS, so the test also checks that the backend holds
DRIVER_OK (GET_STATUS) and reported readiness after every restart. tests/test_guest_net.py
already covers the data path on short streams (split/packed, mergeable buffers, EVENT_IDX, one
kick per burst, multiqueue) and that no frame moves before SET_STATUS(DRIVER_OK).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_value

from shadowvmm.backends.base import Capability
from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest.net import NetDriver
from shadowvmm.machine import Machine
from shadowvmm.shadow import RunState
from shadowvmm.testing.peers import DpdkTestpmd
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import Status
from shadowvmm.virtio.devcfg import NET_CONFIG_BASE_SIZE, NetConfig
from shadowvmm.workload import StatusWatcher
from shadowvmm_vhost_user.backend import VhostUserBackend

FRAMES = 100_000
BATCH = 128                 #: frames per send; the receive queue (256 buffers) always has room
MAC = NetConfig.parse_mac("52:54:00:12:34:56")
PEER_MAC = NetConfig.parse_mac("02:00:00:aa:bb:cc")
ETHERTYPE = b"\x88\xb5"     #: IEEE local experimental
SEQ = struct.Struct(">I")
LIVE = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
STOP_AT = (10_000, 30_000, 50_000, 70_000, 90_000)   #: stop/resume once this many frames were sent
STOPPED_FOR = 0.02
SLOW_CONTROL_PLANE = 0.002
READY = b"virtio is now ready for processing"


def frame(seq: int) -> bytes:
    """A unicast frame of 60..123 bytes whose payload starts with its sequence number."""
    body = SEQ.pack(seq) + bytes(range(seq % 64)) + bytes(42)
    return PEER_MAC + MAC + ETHERTYPE + body


@dataclass
class NetRig:
    machine: Machine
    device: VirtioDevice
    backend: VhostUserBackend
    driver: NetDriver
    peer: DpdkTestpmd


async def make_rig(peer: DpdkTestpmd) -> NetRig:
    machine = Machine(memory_bytes=64 << 20)
    cfg = {"socket": str(peer.socket_path), "device": "net", "timeout": 5.0, "queues": 2}
    backend = VhostUserBackend(cfg)
    config = NetConfig(mac=MAC).pack(NET_CONFIG_BASE_SIZE)
    device = await machine.add_device(DeviceConfig("net0", "vhost-user", cfg), backend=backend,
                                      config_override=config)
    return NetRig(machine, device, backend, NetDriver(machine.guest("net0")), peer)


@pytest.fixture
async def io_rig(testpmd: DpdkTestpmd) -> AsyncIterator[NetRig]:
    rig = await make_rig(testpmd)
    try:
        yield rig
    finally:
        await asyncio.wait_for(rig.driver.close(), 10)
        await rig.machine.close()


@pytest.fixture
def testpmd_macswap(tmp_path: Path) -> Iterator[DpdkTestpmd]:
    binary = require_peer("dpdk-testpmd")
    with DpdkTestpmd(tmp_path, forward_mode="macswap", binary=binary) as peer:
        peer.start_forwarding()
        yield peer


@pytest.fixture
async def macswap_rig(testpmd_macswap: DpdkTestpmd) -> AsyncIterator[NetRig]:
    rig = await make_rig(testpmd_macswap)
    try:
        yield rig
    finally:
        await asyncio.wait_for(rig.driver.close(), 10)
        await rig.machine.close()


class Stream:
    """Sends FRAMES frames in batches and collects every frame that comes back."""

    def __init__(self, driver: NetDriver, peer: DpdkTestpmd) -> None:
        self.driver = driver
        self.peer = peer
        self.sent = 0
        self.received: list[bytes] = []

    async def run(self, marks: tuple[int, ...] = (), on_mark: Callable[[], None] | None = None) -> None:
        """Send batch after batch, receiving each back. Once *marks[i]* frames were sent,
        *on_mark* is called right after that batch was made available; it must not block
        (a stop it starts runs while the stream goes on)."""
        d = self.driver
        todo = list(marks)
        for start in range(0, FRAMES, BATCH):
            batch = [frame(seq) for seq in range(start, min(start + BATCH, FRAMES))]
            send = asyncio.ensure_future(d.send(batch))
            self.sent += len(batch)
            if todo and self.sent >= todo[0]:
                todo.pop(0)
                assert on_mark is not None
                await asyncio.sleep(0)      # send() runs up to its wait: the batch is in the ring
                on_mark()
            assert await send == len(batch)
            want = self.sent - len(self.received)
            got = await d.receive(want, timeout=5.0)
            self.received += got
            if len(got) != want:
                raise AssertionError(f"{want - len(got)} frame(s) did not come back by seq {start}; testpmd: "
                                     f"{self.peer.port_stats()[0]}")
        assert not todo


async def ready_lines(peer: DpdkTestpmd, want: int) -> int:
    """How many times testpmd logged readiness, waiting up to 2 s for *want* (its log is line-buffered)."""
    return await wait_value(lambda: peer.log_path.read_bytes().count(READY), lambda count: count >= want,
                            timeout=2.0, interval=0.01, what=f"{want} readiness lines in the testpmd log")


async def start_driver(rig: NetRig) -> None:
    """Start the guest driver; testpmd negotiated STATUS and holds DRIVER_OK once the start settled."""
    await rig.driver.start()
    await rig.device.settle()
    assert Capability.STATUS in rig.backend.capabilities()
    assert await rig.backend.get_status() == LIVE
    assert await ready_lines(rig.peer, 1) == 1
    assert b"new device status(0x0000000f)" in rig.peer.log_path.read_bytes()   # SET_STATUS(DRIVER_OK)


def check_counts(rig: NetRig, stream: Stream) -> None:
    """The guest's counters and testpmd's port statistics agree exactly."""
    nbytes = sum(len(frame(seq)) for seq in range(FRAMES))
    assert len(stream.received) == FRAMES and sum(len(f) for f in stream.received) == nbytes
    assert rig.driver.rx[0].received == FRAMES and rig.driver.rx[0].errors == 0
    stats = rig.peer.port_stats()[0]
    assert stats["RX-packets"] == stats["TX-packets"] == FRAMES
    assert stats["RX-bytes"] == stats["TX-bytes"] == nbytes
    assert stats["RX-errors"] == stats["TX-errors"] == stats["RX-missed"] == 0


def seqs_of(frames: list[bytes]) -> list[int]:
    return [SEQ.unpack_from(f, 14)[0] for f in frames]


@pytest.mark.peer
async def test_io_stream_across_transparent_stops(io_rig: NetRig) -> None:
    rig = io_rig
    await start_driver(rig)
    guest = rig.driver.dev
    tx = rig.driver.tx[0].queue
    rig.peer.clear_stats()
    stream = Stream(rig.driver, rig.peer)
    stops: list[tuple[int, int, int]] = []   # (tx frames in flight at stop, status while stopped, GET_STATUS)

    async def pause() -> None:
        in_flight = tx.ring.in_flight
        await rig.device.stop()
        assert rig.device.run_state is RunState.STOPPED
        status = guest.status()
        backend_status = await rig.backend.get_status()
        await asyncio.sleep(STOPPED_FOR)
        await rig.device.resume()
        stops.append((in_flight, status, backend_status))

    # A VMM control plane is not instantaneous: leave 2 ms after each SET_VRING_ENABLE(0), in
    # which the guest goes on transmitting, as a real guest would (nothing tells it to wait).
    set_enable = rig.backend.set_vring_enable

    async def slow_enable(index: int, enable: bool) -> None:
        await set_enable(index, enable)
        if not enable:
            await asyncio.sleep(SLOW_CONTROL_PLANE)

    rig.backend.set_vring_enable = slow_enable  # type: ignore[method-assign]
    pauses: list[asyncio.Task] = []
    guest_watcher = StatusWatcher(guest.status, interval=0.0005).start()
    try:
        async with asyncio.timeout(30):
            await stream.run(STOP_AT, lambda: pauses.append(asyncio.ensure_future(pause())))
            await asyncio.gather(*pauses)
    finally:
        for task in pauses:
            task.cancel()
        await guest_watcher.stop()

    seqs = seqs_of(stream.received)
    assert len(set(seqs)) == len(seqs) == FRAMES and set(seqs) == set(range(FRAMES)), "lost or duplicated"
    assert stream.received == [frame(seq) for seq in seqs], "io forwarding changed a frame"
    check_counts(rig, stream)
    assert len(stops) == len(STOP_AT) and all(n > 0 and s == LIVE for n, s, _ in stops)
    assert all(b == LIVE for _, _, b in stops)
    assert guest_watcher.values == {LIVE} and guest_watcher.reads > 100
    assert rig.device.stats.stops == len(STOP_AT) and rig.device.faults.total == 0
    await rig.device.settle()
    assert await rig.backend.get_status() == LIVE
    # DPDK drops readiness at GET_VRING_BASE and regains it after the restart (rings + DRIVER_OK).
    assert await ready_lines(rig.peer, 1 + len(STOP_AT)) == 1 + len(STOP_AT)


@pytest.mark.peer
async def test_macswap_stream(macswap_rig: NetRig) -> None:
    rig = macswap_rig
    await start_driver(rig)
    rig.peer.clear_stats()
    stream = Stream(rig.driver, rig.peer)
    async with asyncio.timeout(20):
        await stream.run()
    seqs = seqs_of(stream.received)
    assert len(set(seqs)) == FRAMES and set(seqs) == set(range(FRAMES))
    for got, seq in zip(stream.received, seqs):
        sent = frame(seq)
        assert got[:6] == sent[6:12] == MAC and got[6:12] == sent[:6] == PEER_MAC, f"MACs not swapped in {seq}"
        assert got[12:] == sent[12:]
    check_counts(rig, stream)
