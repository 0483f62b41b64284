"""virtio-net: NetConfig and the header in process, then NetDriver against a real DPDK testpmd (io mode)."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_until

from shadowvmm.backends.base import Capability
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import ArgumentError, DeviceStateError
from shadowvmm.guest.net import CTRL_HEADER, NET_HDR_SIZE, CtrlClass, CtrlMq, NetDriver, NetHeader
from shadowvmm.machine import Machine
from shadowvmm.testing.peers import DpdkTestpmd
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import Feature, NetFeature
from shadowvmm.virtio.devcfg import NET_CONFIG_BASE_SIZE, NET_DUPLEX_UNKNOWN, NET_SPEED_UNKNOWN, NetConfig, NetStatus
from shadowvmm.vmmqueue import NetControl
from shadowvmm_vhost_user.backend import VhostUserBackend

MAC = NetConfig.parse_mac("52:54:00:12:34:56")

# ---------------------------------------------------------------------- in process


def test_net_config_layout() -> None:
    cfg = NetConfig(mac=MAC, status=NetStatus.LINK_UP, max_virtqueue_pairs=4, mtu=9000, speed=10000,
                    duplex=1, rss_max_key_size=40, rss_max_indirection_table_length=128,
                    supported_hash_types=0x3F)
    raw = cfg.pack()
    assert len(raw) == NetConfig.SIZE == 24 and NET_CONFIG_BASE_SIZE == 12
    assert raw[:6] == MAC
    assert struct.unpack_from("<HHHIBBHI", raw, 6) == (1, 4, 9000, 10000, 1, 40, 128, 0x3F)
    assert [NetConfig.offset(n) for n in ("status", "max_virtqueue_pairs", "mtu", "speed", "duplex")] == \
        [6, 8, 10, 12, 16]
    assert NetConfig.unpack(raw) == cfg
    base = NetConfig.unpack(cfg.pack(NET_CONFIG_BASE_SIZE))
    assert (base.mac, base.status, base.max_virtqueue_pairs, base.mtu) == (MAC, 1, 4, 9000)
    assert (base.speed, base.duplex, base.supported_hash_types) == (NET_SPEED_UNKNOWN, NET_DUPLEX_UNKNOWN, 0)
    assert NetConfig.unpack(raw[:8]).max_virtqueue_pairs == 1
    assert len(cfg.pack(16)) == 16 and len(cfg.pack(17)) == 17
    with pytest.raises(ValueError):
        cfg.pack(7)
    with pytest.raises(ValueError):
        NetConfig(mac=b"\0" * 5)
    with pytest.raises(ValueError):
        NetConfig(max_virtqueue_pairs=0)
    with pytest.raises(ValueError):
        NetConfig(max_virtqueue_pairs=0x8001)
    assert NetConfig(mac=MAC).mac_str == "52:54:00:12:34:56"
    with pytest.raises(ValueError):
        NetConfig.parse_mac("52:54:00")


def test_net_header_and_ctrl() -> None:
    assert NET_HDR_SIZE == 12
    hdr = NetHeader(flags=1, gso_type=3, hdr_len=54, gso_size=1448, csum_start=34, csum_offset=16,
                    num_buffers=2)
    raw = hdr.pack()
    assert len(raw) == 12 and raw[10:12] == (2).to_bytes(2, "little") and raw[2:4] == (54).to_bytes(2, "little")
    assert NetHeader.unpack(raw) == hdr and NetHeader().pack() == bytes(12)
    assert CTRL_HEADER.pack(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET) == b"\x04\x00"


# ---------------------------------------------------------------------- real testpmd


def frames_for(count: int, src: bytes, tag: int = 0, size: int = 64) -> list[bytes]:
    """Broadcast frames with a local-experimental EtherType and a (tag, seq) payload."""
    return [b"\xff" * 6 + src + b"\x88\xb5" + struct.pack(">HI", tag, i) + bytes(size - 20) for i in range(count)]


@dataclass
class NetRig:
    machine: Machine
    driver: NetDriver
    backend: VhostUserBackend
    peer: DpdkTestpmd


async def make_rig(peer: DpdkTestpmd, *, pairs: int = 1, queues: int = 2) -> tuple[Machine, NetDriver,
                                                                                   VhostUserBackend]:
    machine = Machine(memory_bytes=64 << 20)
    cfg = {"socket": str(peer.socket_path), "device": "net", "timeout": 5.0, "queues": queues}
    backend = VhostUserBackend(cfg)
    config = NetConfig(mac=MAC, status=NetStatus.LINK_UP,
                       max_virtqueue_pairs=pairs).pack(NET_CONFIG_BASE_SIZE)
    # DPDK offers neither MAC nor STATUS: the VMM serves them from the config it synthesises
    vmm_features = int(NetFeature.MAC | NetFeature.STATUS)
    await machine.add_device(DeviceConfig("net0", "vhost-user", cfg, vmm_features=vmm_features),
                             backend=backend, config_override=config)
    return machine, NetDriver(machine.guest("net0"), ctrl_timeout=1.0), backend


@pytest.fixture
async def net(testpmd: DpdkTestpmd) -> AsyncIterator[NetRig]:
    machine, driver, backend = await make_rig(testpmd)
    try:
        yield NetRig(machine, driver, backend, testpmd)
    finally:
        await asyncio.wait_for(driver.close(), 10)
        await machine.close()


async def echo(driver: NetDriver, frames: list[bytes], batch: int, pair: int = 0) -> list[bytes]:
    got: list[bytes] = []
    for start in range(0, len(frames), batch):
        chunk = frames[start:start + batch]
        assert await driver.send(chunk, pair) == len(chunk)
        got += await driver.receive(len(chunk), timeout=5.0, pair=pair)
    return got


@pytest.mark.peer
@pytest.mark.parametrize("mrg", [False, True], ids=["plain", "mrg_rxbuf"])
async def test_echo(net: NetRig, ring_layout: str, mrg: bool) -> None:
    packed = ring_layout == "packed"
    d = net.driver
    features = await d.start(packed=packed, mrg_rxbuf=mrg)
    assert bool(features & NetFeature.MRG_RXBUF) == mrg
    assert bool(d.dev.features & (1 << 34)) == packed
    assert not features & (NetFeature.CTRL_VQ | NetFeature.MQ)
    assert len(d.dev.queues) == 2 and d.active_pairs == 1
    assert d.link_up and d.mtu == 1500
    assert features & NetFeature.MAC and features & NetFeature.STATUS
    assert d.mac == MAC
    acked = net.backend.connection.features_acked
    assert not acked & (NetFeature.MAC | NetFeature.STATUS), "VMM-served bits reached the backend"
    net.peer.clear_stats()
    frames = frames_for(600, d.mac) + [frames_for(1, d.mac, tag=1, size=1514)[0]]
    got = await echo(d, frames, batch=64)
    assert got == frames
    assert d.rx[0].received == len(frames) and d.tx[0].sent == len(frames) and d.rx[0].errors == 0
    stats = net.peer.port_stats()[0]
    assert stats["RX-packets"] == stats["TX-packets"] == len(frames)
    assert stats["RX-bytes"] == sum(len(f) for f in frames)
    assert stats["RX-errors"] == stats["TX-errors"] == 0


@pytest.mark.peer
async def test_echo_event_idx(net: NetRig) -> None:
    features = await net.driver.start(event_idx=True)
    assert features & (1 << 29)
    frames = frames_for(4000, net.driver.mac, tag=2)
    assert await echo(net.driver, frames, batch=200) == frames


@pytest.mark.peer
async def test_status_gates_the_data_path(net: NetRig) -> None:
    """testpmd negotiates vhost-user STATUS: it serves rings only after SET_STATUS(DRIVER_OK),
    which the device layer sends when the guest sets DRIVER_OK."""
    assert Capability.STATUS in net.backend.capabilities()
    log = net.peer.log_path
    assert b"virtio is now ready for processing" not in log.read_bytes()
    await net.driver.start()
    await net.machine.device("net0").settle()
    await wait_until(lambda: b"virtio is now ready for processing" in log.read_bytes(), interval=0.01,
                     what="testpmd to report the device ready")
    frames = frames_for(32, net.driver.mac)
    assert await echo(net.driver, frames, batch=32) == frames


@pytest.mark.peer
async def test_burst_one_kick_and_iterator(net: NetRig) -> None:
    d = net.driver
    await d.start()
    frames = frames_for(200, d.mac, tag=7)
    tx = d.tx[0].queue
    kicks = tx.notifies
    assert await d.send(frames) == 200
    assert tx.notifies - kicks <= 1
    got: list[bytes] = []

    async def collect() -> None:
        async for frame in d:
            got.append(frame)
            if len(got) == len(frames):
                return

    await asyncio.wait_for(collect(), 5.0)
    assert got == frames
    assert await d.receive(1, timeout=0.05) == []
    with pytest.raises(ValueError):
        await d.send([bytes(d.max_frame + 1)])
    with pytest.raises(DeviceStateError):
        await d.send(frames[:1], pair=1)
    with pytest.raises(DeviceStateError):
        await d.set_queue_pairs(1)


@pytest.mark.peer
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
async def test_poll_mode_batches(net: NetRig, ring_layout: str, event_idx: bool) -> None:
    """Polling mode (send_batch / recv_batch) through testpmd io: 1000 frames (4 rings' worth)
    come back byte for byte and in order; the counters equal testpmd's; testpmd polls, so its
    event suppression leaves (almost) no kick; the per-buffer API is refused meanwhile."""
    d = net.driver
    with pytest.raises(DeviceStateError):
        d.send_batch(frames_for(1, MAC))
    with pytest.raises(ArgumentError):
        await d.start(poll=True, mrg_rxbuf=True)
    features = await d.start(packed=ring_layout == "packed", event_idx=event_idx, poll=True)
    assert bool(features & (1 << 29)) == event_idx
    net.peer.clear_stats()
    frames = frames_for(1000, d.mac, tag=9)
    sent, got = 0, []
    deadline = asyncio.get_running_loop().time() + 10
    while len(got) < len(frames):
        room = 200 - (sent - len(got))      # never more in flight than the receive ring holds
        if room > 0:
            sent += d.send_batch(frames[sent:sent + min(room, 64)])
        got += d.recv_batch(64)
        await asyncio.sleep(0)
        assert asyncio.get_running_loop().time() < deadline, f"{len(got)} of {len(frames)} came back"
    assert got == frames
    assert d.tx_pending() == 0
    assert d.tx[0].sent == d.rx[0].received == len(frames) and d.rx[0].errors == 0
    stats = net.peer.port_stats()[0]
    assert stats["RX-packets"] == stats["TX-packets"] == len(frames)
    assert stats["RX-bytes"] == sum(len(f) for f in frames)
    assert d.dev.queues[1].notifies <= 2 and d.dev.queues[0].notifies <= 3
    with pytest.raises(DeviceStateError):
        await d.send(frames[:1])
    with pytest.raises(DeviceStateError):
        await d.receive(1)
    with pytest.raises(ArgumentError):
        d.send_batch([bytes(d.max_frame + 1)])
    assert d.tx_pending() == 0


async def _poll_echo(d: NetDriver, frames: list[bytes], batches: list[int]) -> list[bytes]:
    """Send *frames* with send_batch in batches of the given sizes (cycled), at most 200 in
    flight, and receive them back with recv_batch (testpmd io echoes)."""
    sent, got, turn = 0, [], 0
    deadline = asyncio.get_running_loop().time() + 10
    while len(got) < len(frames):
        room = 200 - (sent - len(got))      # never more in flight than the receive ring holds
        if room > 0 and sent < len(frames):
            sent += d.send_batch(frames[sent:sent + min(room, batches[turn % len(batches)])])
            turn += 1
        got += d.recv_batch(64)
        await asyncio.sleep(0)
        assert asyncio.get_running_loop().time() < deadline, f"{len(got)} of {len(frames)} came back"
    return got


@pytest.mark.peer
async def test_poll_mode_mixed_sizes_then_reset_and_restart(net: NetRig, ring_layout: str) -> None:
    """In-order polling mode through testpmd io with runs of one frame size (the strided
    transmit layout, each size its own stride) and of mixed sizes (a slot per frame) in
    random-sized batches, so the layout changes while testpmd uses batches in part; then a
    device reset and a new start, and again: every frame comes back byte for byte, in order."""
    d = net.driver
    rng = random.Random(7)
    for rnd in range(2):
        features = await d.start(packed=ring_layout == "packed", poll=True)
        assert features & Feature.IN_ORDER, "testpmd offers IN_ORDER: the fixed-slot path is the one tested"
        net.peer.clear_stats()
        frames: list[bytes] = []
        for _ in range(12):
            size = rng.choice([None, 64, 64, 128, 600, 1514])
            for _ in range(rng.randint(20, 90)):
                length = size or rng.randint(60, 1514)
                frames.append(b"\xff" * 6 + d.mac + b"\x88\xb5" + struct.pack(">HI", rnd, len(frames))
                              + bytes(length - 20))
        got = await _poll_echo(d, frames, [rng.randint(1, 64) for _ in range(16)])
        assert got == frames
        assert d.tx_pending() == 0
        stats = net.peer.port_stats()[0]
        assert stats["RX-packets"] == stats["TX-packets"] == len(frames)
        await d.dev.reset()


@pytest.fixture
def testpmd_2q(tmp_path: Path) -> Iterator[DpdkTestpmd]:
    """testpmd with two queue pairs on its vhost port, io forwarding started."""
    binary = require_peer("dpdk-testpmd")
    peer = DpdkTestpmd(tmp_path, forward_mode="io", queues=2, app_args=["--rxq=2", "--txq=2"], binary=binary)
    with peer:
        peer.start_forwarding()
        yield peer


@pytest.mark.peer
async def test_multiqueue_control_queue_answered_by_device_layer(testpmd_2q: DpdkTestpmd) -> None:
    """The VMM serves the control queue (as QEMU does); data moves on both pairs."""
    machine, driver, _ = await make_rig(testpmd_2q, pairs=2, queues=5)
    device = machine.device("net0")
    try:
        features = await driver.start(pairs=2)
        assert features & NetFeature.MQ and features & NetFeature.CTRL_VQ
        assert driver.active_pairs == 2 and driver.config.max_virtqueue_pairs == 2
        assert driver.ctrl_queue is not None and driver.ctrl_queue.index == 4
        control = device.vmm_queues[4].handler
        assert isinstance(control, NetControl)
        assert control.commands == [(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET)]
        assert control.active_pairs == 2 and device.active_queues == 4
        testpmd_2q.clear_stats()
        for pair in (0, 1):
            frames = frames_for(256, driver.mac, tag=pair)
            assert await echo(driver, frames, batch=64, pair=pair) == frames
            assert driver.rx[pair].received == 256
        assert testpmd_2q.port_stats()[0]["RX-packets"] == 512
    finally:
        await asyncio.wait_for(driver.close(), 10)
        await machine.close()
