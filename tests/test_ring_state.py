"""VIRTIO_F_RING_STATE (2021 STOP dialect; docs/nested.md "Ring-state registers"): per-queue
ring state read through the transport while the guest has the device stopped, and written on a
destination between FEATURES_OK and DRIVER_OK, on PCI (common cfg 0x40) and MMIO (0x0C4), split
and packed rings, the in-process backend and qemu-storage-daemon."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import faults, no_faults

from shadowvmm.backends.base import Backend
from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig, parse
from shadowvmm.device import VirtioDevice
from shadowvmm.errors import ConfigError, RingError, StateFormatError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.shadow import RING_STATE_RUNNING_VALUE, DialectSpec, FeaturePolicy, GuestFault, StopDialect
from shadowvmm.state import QueueState
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import Feature, Status
from shadowvmm.virtio.packed import PackedDriverQueue, PackedLayout
from shadowvmm.virtio.split import SplitDriverQueue, SplitLayout
from shadowvmm.virtio.vring import RingState

STOP_BIT, RING_BIT = 44, 45
QUEUE_SIZE = 16                    #: small: a packed ring wraps within a few requests
BLOCK = 4096
LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
PACKED_FRESH = RingState.packed(0, 0, True, 0, True).base      #: 0x80008000


def blk_config(name: str, transport: str, backend: dict[str, Any], *, ring_state: bool = True) -> DeviceConfig:
    return DeviceConfig(name, "inproc", backend, transport=transport, queue_size=QUEUE_SIZE,
                        stop_dialect=StopDialect.STOP, stop_feature_bit=STOP_BIT, ring_state=ring_state)


class Spy:
    """Records a backend's SET_VRING_BASE and GET_VRING_BASE (arguments and results)."""

    def __init__(self, backend: Backend) -> None:
        self.set_bases: dict[int, int] = {}
        self.got: dict[int, int] = {}
        set_base, get_base = backend.set_vring_base, backend.get_vring_base

        async def set_vring_base(index: int, base: int) -> None:
            self.set_bases[index] = base
            await set_base(index, base)

        async def get_vring_base(index: int) -> RingState:
            state = await get_base(index)
            self.got[index] = state.base
            return state

        backend.set_vring_base = set_vring_base      # type: ignore[method-assign]
        backend.get_vring_base = get_vring_base      # type: ignore[method-assign]


@dataclass
class Side:
    dev: VirtioDevice
    guest: GuestDevice
    driver: BlkDriver
    spy: Spy


@dataclass
class Rig:
    machine: Machine
    packed: bool
    sides: dict[str, Side]

    async def add(self, name: str, config: DeviceConfig, backend: Backend | None = None) -> Side:
        dev = await self.machine.add_device(config, backend)
        guest = self.machine.guest(name)
        side = Side(dev, guest, BlkDriver(guest, max_request=BLOCK, slots_per_queue=4), Spy(dev.backend))
        self.sides[name] = side
        return side

    @property
    def wanted(self) -> int:
        return (1 << STOP_BIT) | (1 << RING_BIT)


@contextlib.asynccontextmanager
async def make_rig(packed: bool) -> AsyncIterator[Rig]:
    machine = Machine(32 << 20)
    try:
        yield Rig(machine, packed, {})
    finally:
        await machine.close()


def pattern(tag: int, block: int) -> bytes:
    return bytes([(tag * 31 + block) & 0xFF]) * BLOCK


def driver_state(guest: GuestDevice, index: int) -> int:
    """The guest's own position of ring *index* in the vhost base encoding."""
    ring = guest.queue(index).ring
    if isinstance(ring, PackedDriverQueue):
        return RingState.packed(index, ring.next_avail, ring.avail_wrap, ring.next_used, ring.used_wrap).base
    return int(ring.avail_idx)


async def stop_with_io(rig: Rig, a: Side, writes: dict[int, int]) -> dict[int, int]:
    """Start *a*, write ``writes[queue]`` blocks on each queue (all complete), STOP it; its ring states."""
    await a.driver.start(packed=rig.packed, queue_size=QUEUE_SIZE, extra_features=rig.wanted)
    assert a.dev.driver_features & (1 << RING_BIT) and not a.dev.backend_feature_word() & (1 << RING_BIT)
    block = 0
    for queue, count in writes.items():
        for _ in range(count):
            await a.driver.write(block * BLOCK // 512, pattern(1, block), queue=queue)
            block += 1
    await a.guest.stop_device()
    assert a.guest.status() == LIVE | Status.STOP
    return a.guest.read_ring_states()


# ---------------------------------------------------------------------- reads


async def test_read_while_running_is_all_ones_and_counted(transport: str, ring_layout: str,
                                                          tmp_path: Path) -> None:
    async with make_rig(ring_layout == "packed") as rig:
        a = await rig.add("a", blk_config("a", transport, {"device": "blk", "size": 1 << 20, "queues": 2}))
        await a.driver.start(packed=rig.packed, queue_size=QUEUE_SIZE, extra_features=rig.wanted)
        with faults(a.dev, {GuestFault.RING_STATE_RUNNING: 2}):
            assert a.guest.read_ring_states() == {0: RING_STATE_RUNNING_VALUE, 1: RING_STATE_RUNNING_VALUE}
        # never a valid state: a packed one's idx fields would be 0x7FFF, above any queue size
        avail, _, used, _ = RingState(0, RING_STATE_RUNNING_VALUE).unpack_packed()
        assert avail == used == 0x7FFF > 0x7FFF - 1 >= a.dev.queues[0].max_size


async def test_states_after_stop_equal_backend_and_driver(transport: str, ring_layout: str,
                                                          tmp_path: Path) -> None:
    """After STOP every queue reads what GET_VRING_BASE returned, which is the guest's own
    position (all requests used); a queue never started reads its initial state."""
    async with make_rig(ring_layout == "packed") as rig:
        a = await rig.add("a", blk_config("a", transport, {"device": "blk", "size": 1 << 20, "queues": 3}))
        await a.driver.start(packed=rig.packed, queue_size=QUEUE_SIZE, extra_features=rig.wanted, num_queues=2)
        for block in range(7):
            await a.driver.write(block * 8, pattern(1, block), queue=0)
        await a.driver.write(0, pattern(1, 0), queue=1)
        with no_faults(a.dev):
            await a.guest.stop_device()
            states = a.guest.read_ring_states()
            a.guest.transport.set_status(LIVE | Status.STOP)     # reading again changes nothing
        assert states == a.spy.got == {0: driver_state(a.guest, 0), 1: driver_state(a.guest, 1)}
        if rig.packed:      # 7 requests of 3 descriptors in a 16-entry ring: second lap
            assert RingState(0, states[0]).unpack_packed() == (21 - QUEUE_SIZE, False, 21 - QUEUE_SIZE, False)
        else:
            assert states == {0: 7, 1: 1}
        assert a.guest.transport.ring_state(2) == (PACKED_FRESH if rig.packed else 0)


# ---------------------------------------------------------------------- restore on a destination


@pytest.mark.parametrize("kept", [True, False], ids=["same-rings", "fresh-rings"])
async def test_destination_continues_from_written_state(transport: str, ring_layout: str, tmp_path: Path,
                                                        kept: bool) -> None:
    """Device A stops with its requests done; device B (same image; A's ring memory, or fresh rings
    positioned at the states) is set up with A's ring states and continues: nothing replayed (B's
    backend serves exactly B's requests), nothing lost (every block reads back), and B's backend got
    the states with SET_VRING_BASE."""
    writes = {0: 7, 1: 2}
    backend = {"device": "blk", "image": str(tmp_path / "disk.img"), "size": 1 << 20, "queues": 2}
    async with make_rig(ring_layout == "packed") as rig:
        a = await rig.add("a", blk_config("a", transport, backend))
        b = await rig.add("b", blk_config("b", transport, backend))
        states = await stop_with_io(rig, a, writes)
        a_rings = {layout.desc for layout in a.guest.ring_layouts().values()}
        layouts = a.guest.ring_layouts() if kept else None
        a.guest.close()
        with no_faults(b.dev):
            await b.driver.start(packed=rig.packed, queue_size=QUEUE_SIZE, extra_features=rig.wanted,
                                 ring_states=states, layouts=layouts)
            assert all((q.ring.layout.desc in a_rings) is kept for q in b.guest.queues)
            assert b.spy.set_bases == states
            assert [b.dev.queues[i].ring_base for i in (0, 1)] == [states[0], states[1]]
            assert {i: driver_state(b.guest, i) for i in (0, 1)} == states
            done = sum(writes.values())
            for block in range(done, done + 9):
                await b.driver.write(block * BLOCK // 512, pattern(2, block), queue=block % 2)
            await b.driver.write(0, pattern(3, 0), queue=1)
            for block in range(done + 9):
                expected = pattern(3, 0) if block == 0 else pattern(1 if block < done else 2, block)
                assert await b.driver.read(block * BLOCK // 512, BLOCK, queue=block % 2) == expected
        assert isinstance(b.dev.backend, InProcBackend)
        assert b.dev.backend.requests == 10 + done + 9        # B's own requests, none of A's again
        assert b.guest.violations == [] and all(q.error is None for q in b.guest.queues)


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QsdBlk]:
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=tmp_path / "disk.img", size=8 << 20, create=True, num_queues=2,
                exports=2, binary=binary) as peer:
        yield peer


@pytest.mark.peer
async def test_qsd_destination_continues_from_written_state(qsd: QsdBlk, transport: str) -> None:
    """The same against qemu-storage-daemon (two exports of one image; libvhost-user: split rings)."""
    from shadowvmm_vhost_user import VhostUserBackend

    def vhost(i: int) -> VhostUserBackend:
        return VhostUserBackend({"socket": str(qsd.socket_paths[i]), "device": "blk", "queues": 2})

    cfg = DeviceConfig("x", "vhost-user", {}, transport=transport, queue_size=QUEUE_SIZE,
                       stop_dialect=StopDialect.STOP, stop_feature_bit=STOP_BIT, ring_state=True)
    async with make_rig(False) as rig:
        a = await rig.add("a", DeviceConfig(**{**cfg.__dict__, "name": "a"}), vhost(0))
        b = await rig.add("b", DeviceConfig(**{**cfg.__dict__, "name": "b"}), vhost(1))
        writes = {0: 19, 1: 3}                        # queue 0's avail idx passes the ring size
        states = await stop_with_io(rig, a, writes)
        assert states == a.spy.got == {0: 19, 1: 3} == {i: driver_state(a.guest, i) for i in (0, 1)}
        layouts = a.guest.ring_layouts()
        a.guest.close()
        with no_faults(b.dev):
            await b.driver.start(extra_features=rig.wanted, ring_states=states, layouts=layouts)
            assert b.spy.set_bases == states
            done = sum(writes.values())
            for block in range(done, done + 6):
                await b.driver.write(block * BLOCK // 512, pattern(2, block), queue=block % 2)
            for block in range(done + 6):
                assert await b.driver.read(block * BLOCK // 512, BLOCK, queue=block % 2) == \
                    pattern(1 if block < done else 2, block)
        # from A's states on: 3 writes and 14 reads per queue
        assert {i: driver_state(b.guest, i) for i in (0, 1)} == {0: 19 + 3 + 14, 1: 3 + 3 + 14}
        assert b.guest.violations == [] and all(q.error is None for q in b.guest.queues)


def test_driver_ring_adopt_checks_the_kept_ring(ring_layout: str) -> None:
    """A kept ring must be a drained ring at the state; a packed state must have nothing in flight."""
    memory = GuestMemory.create([(0, 1 << 20)])
    try:
        if ring_layout == "split":
            split = SplitLayout(QUEUE_SIZE, 0x1000, 0x2000, 0x3000)
            SplitDriverQueue(memory, split, state=RingState(0, 5))             # fresh ring at 5
            assert SplitDriverQueue(memory, split, state=RingState(0, 5), adopt=True).avail_idx == 5
            memory.store_u16(split.used + 2, 4)                                 # one request in flight
            with pytest.raises(RingError, match="not a drained ring"):
                SplitDriverQueue(memory, split, state=RingState(0, 5), adopt=True)
        else:
            packed = PackedLayout(QUEUE_SIZE, 0x1000, 0x2000, 0x3000)
            ring = PackedDriverQueue(memory, packed, state=RingState.packed(0, 3, False, 3, False), adopt=True)
            assert (ring.next_avail, ring.avail_wrap, ring.next_used, ring.used_wrap) == (3, False, 3, False)
            with pytest.raises(RingError, match="not a drained ring"):
                PackedDriverQueue(memory, packed, state=RingState.packed(0, 3, False, 2, False))
    finally:
        memory.close()


# ---------------------------------------------------------------------- write rules


async def test_write_rules_and_faults(transport: str, ring_layout: str) -> None:
    packed = ring_layout == "packed"
    async with make_rig(packed) as rig:
        a = await rig.add("a", blk_config("a", transport, {"device": "blk", "size": 1 << 20, "queues": 1}))
        g, t, q = a.guest, a.guest.transport, a.dev.queues[0]
        await g.reset()
        with faults(a.dev, {GuestFault.RING_STATE_NOT_NEGOTIATED: 2}):     # before FEATURES_OK
            t.set_ring_state(0, 5)
            assert t.ring_state(0) == 0
        t.set_status(Status.ACKNOWLEDGE)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        t.set_driver_features(t.device_features() & (Feature.VERSION_1 | Feature.RING_PACKED * packed
                                                     | rig.wanted))
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        bad = [0x10000] if not packed else [RingState.packed(0, QUEUE_SIZE, True, 0, True).base,
                                            RingState.packed(0, 0, True, QUEUE_SIZE, True).base]
        with faults(a.dev, {GuestFault.RING_STATE_INVALID: len(bad)}):
            for value in bad:
                t.set_ring_state(0, value)
            assert q.ring_base is None
        good = RingState.packed(0, 3, False, 3, False).base if packed else 0xFFF0
        with no_faults(a.dev):
            t.set_ring_state(0, good)
        assert q.ring_base == good
        with faults(a.dev, {GuestFault.QUEUE_SELECT: 1}):
            t.set_ring_state(7, 1)
        await g.reset()                                                      # a reset forgets it
        assert q.ring_base is None
        await a.driver.start(packed=packed, queue_size=QUEUE_SIZE, extra_features=rig.wanted)
        assert a.spy.set_bases == {0: PACKED_FRESH if packed else 0}
        with faults(a.dev, {GuestFault.RING_STATE_WRITE_TIME: 1}):          # after DRIVER_OK
            t.set_ring_state(0, 1)
        await g.stop_device()
        with faults(a.dev, {GuestFault.RING_STATE_WRITE_TIME: 1}):          # stopped: read-only
            t.set_ring_state(0, 1)
        assert t.ring_state(0) == a.spy.got[0] and q.ring_base is None


async def test_without_the_feature(transport: str) -> None:
    """Not offered (ring_state off) or offered and not accepted: reads 0, writes ignored, counted."""
    async with make_rig(False) as rig:
        off = await rig.add("off", blk_config("off", transport, {"device": "blk", "size": 1 << 20},
                                              ring_state=False))
        on = await rig.add("on", blk_config("on", transport, {"device": "blk", "size": 1 << 20}))
        assert not off.dev.device_features & (1 << RING_BIT) and on.dev.device_features & (1 << RING_BIT)
        await off.driver.start(queue_size=QUEUE_SIZE, extra_features=rig.wanted)
        await on.driver.start(queue_size=QUEUE_SIZE, extra_features=1 << STOP_BIT)
        for side in (off, on):
            await side.guest.stop_device()
            with faults(side.dev, {GuestFault.RING_STATE_NOT_NEGOTIATED: 2}):
                assert side.guest.transport.ring_state(0) == 0
                side.guest.transport.set_ring_state(0, 3)


# ---------------------------------------------------------------------- migration


async def test_written_base_migrates(transport: str) -> None:
    """A base written before DRIVER_OK is part of the device state; older streams read as none."""
    async with make_rig(False) as rig:
        a = await rig.add("a", blk_config("a", transport, {"device": "blk", "size": 1 << 20}))
        b = await rig.add("b", blk_config("b", transport, {"device": "blk", "size": 1 << 20}))
        t = a.guest.transport
        await a.guest.initialize(rig.wanted, queue_size=QUEUE_SIZE, set_driver_ok=False, ring_states={0: 40})
        state = await a.dev.export_state(rig.machine.slots["a"].transport)
        assert state.transport.queues[0].ring_base == 40
        assert state.transport.driver_features & (1 << RING_BIT)
        await b.dev.import_state(state, rig.machine.slots["b"].transport)
        assert b.dev.queues[0].ring_base == 40
        wire = state.transport.queues[0].to_wire()
        assert wire["ring_base"] == 40
        del wire["ring_base"]
        assert QueueState.from_wire(wire, 1, "q").ring_base is None
        with pytest.raises(StateFormatError, match="ring_base"):
            QueueState.from_wire({**wire, "ring_base": 1 << 32}, 1, "q")
        t.set_status(0)


# ---------------------------------------------------------------------- config


def doc(**device: Any) -> dict[str, Any]:
    return {"device": [{"name": "blk0", "backend": "inproc", **device}]}


def config_error(**device: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(doc(**device))
    return info.value


def test_config_bits() -> None:
    err = config_error(stop_dialect="stop")
    assert err.key == "device[0].stop_feature_bit" and "reserved by virtio 1.4 §6" in err.message
    cfg = parse(doc(stop_dialect="stop", stop_feature_bit=46, ring_state=True)).devices[0]
    spec = cfg.dialect_spec()
    assert (spec.feature, spec.ring_state) == (1 << 46, 1 << 47)
    spec = parse(doc(stop_dialect="stop", stop_feature_bit=49, ring_state=True,
                     ring_state_feature_bit=44)).devices[0].dialect_spec()
    assert spec.ring_state == 1 << 44
    assert config_error(stop_dialect="stop", stop_feature_bit=49, ring_state=True).key == \
        "device[0].ring_state_feature_bit"                                  # default 50: out of range
    assert config_error(stop_dialect="stop", stop_feature_bit=45, ring_state=True,
                        ring_state_feature_bit=45).key == "device[0].ring_state_feature_bit"
    assert config_error(stop_dialect="stop", stop_feature_bit=45, ring_state_feature_bit=43).key == \
        "device[0].ring_state_feature_bit"
    assert config_error(stop_dialect="suspend", ring_state=True).key == "device[0].ring_state"
    assert config_error(ring_state=True).key == "device[0].ring_state"
    assert parse(doc(stop_dialect="suspend")).devices[0].dialect_spec().ring_state == 0


def test_policy_owns_the_bit() -> None:
    assert DialectSpec.make(StopDialect.STOP).feature == 1 << 44            # the Python API's default
    spec = DialectSpec.make(StopDialect.STOP, 44, ring_state=True)
    policy = FeaturePolicy(spec)
    offered = policy.offer(int(Feature.VERSION_1))
    assert offered & (1 << 44) and offered & (1 << 45)
    assert not policy.to_backend(offered) & ((1 << 44) | (1 << 45))
    assert not FeaturePolicy(DialectSpec.make(StopDialect.STOP)).offer(int(Feature.VERSION_1)) & (1 << 45)
