"""Device lifecycle in the orders a user hits first (lifecycle issue), against real peers where
the bug was seen: a backend that dies (kill -9, SIGTERM, closing its socket) with and without
reconnect, reset and immediate re-init, a reset on a migration destination that never started
the device (seed scenario 2.2), per-queue reset on every interrupt routing, the start order seen
by a backend, exceptions inside the device worker, and the §3.4 rules while suspended."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_for_count, wait_until

from shadowvmm import cli
from shadowvmm import config as configmod
from shadowvmm.backends.base import Backend, Capability, load_backend
from shadowvmm.backends.inproc import BlkModel, InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.errors import ArgumentError, BackendError, DeviceStateError
from shadowvmm.guest.blk import WANTED, BlkDriver
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.lifecycle import DeviceEventKind, LinkState, ReconnectPolicy
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import machine_sharing, move_guest
from shadowvmm.shadow import GuestFault, RunState, StopDialect
from shadowvmm.testing.blkcheck import BLOCK, Writers, pattern
from shadowvmm.testing.guards import guarded
from shadowvmm.testing.peers import QsdBlk, RefBlk
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import Feature, Status
from shadowvmm.virtio.split import SplitDeviceQueue, SplitLayout
from shadowvmm.workload import StatusWatcher
from shadowvmm_vhost_user import VhostUserBackend

IMAGE_BYTES = 16 << 20
BLOCKS = 1024                       #: the writers' part of the disk (4 MiB)
LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
RECONNECT = ReconnectPolicy.bounded(interval=0.01, deadline=3.0)


def qsd_peer(tmp_path: Path, queues: int, *, exports: int = 1, qmp: bool = False, iops: int | None = None) -> QsdBlk:
    binary = require_peer("qemu-storage-daemon")
    return QsdBlk(tmp_path, image=tmp_path / "disk.img", size=IMAGE_BYTES, create=True, num_queues=queues,
                  exports=exports, qmp=qmp, iops=iops, binary=binary)


def vhost_blk(path: Path, queues: int) -> VhostUserBackend:
    return VhostUserBackend({"socket": str(path), "device": "blk", "queues": queues, "timeout": 3.0})


@dataclass
class Rig:
    machine: Machine
    device: VirtioDevice
    guest: GuestDevice
    driver: BlkDriver
    writers: Writers | None = None

    def start_writers(self, seed: int, **options) -> Writers:
        self.writers = Writers(self.driver, queues=len(self.guest.queues), writers=8, blocks=BLOCKS, seed=seed,
                               **options).start()
        return self.writers

    async def close(self) -> None:
        if self.writers is not None:
            await self.writers.stop()
        await self.machine.close()


async def make_rig(backend: Backend, *, queues: int = 2, transport: str = "pci", msix: bool = True,
                   dialect: StopDialect = StopDialect.NONE, reconnect: ReconnectPolicy | None = None,
                   memory_mib: int = 48) -> Rig:
    machine = Machine(memory_mib << 20)
    cfg = DeviceConfig("blk0", "test", {}, transport=transport, queue_size=64, num_queues=queues,
                       stop_dialect=dialect, reconnect=reconnect or ReconnectPolicy.off(0.01))
    device = await machine.add_device(cfg, backend)
    guest = machine.guest("blk0", msix=msix)
    return Rig(machine, device, guest, BlkDriver(guest, slots_per_queue=16))


def needs_reset(guest: GuestDevice) -> bool:
    return bool(guest.status() & Status.NEEDS_RESET)


# ---------------------------------------------------------------------- backend death, qsd


def lose_backend(peer: QsdBlk, how: str) -> None:
    if how == "close":
        peer.close_export(0)
    else:
        peer.kill(signal.SIGKILL if how == "kill" else signal.SIGTERM)


def bring_back(peer: QsdBlk, how: str) -> None:
    if how == "close":
        peer.add_export(0)
    else:
        peer.restart()


@pytest.mark.peer
@pytest.mark.parametrize("how", ["kill", "term", "close"])
async def test_qsd_lost_without_reconnect_needs_reset_then_recovers(tmp_path: Path, how: str) -> None:
    """Reconnect off: NEEDS_RESET within 100 ms, and the guest's own reset + re-init works on the
    restarted daemon; every write the guest saw complete is in the image."""
    with qsd_peer(tmp_path, 2, qmp=True) as qsd:
        rig = await make_rig(vhost_blk(qsd.socket_path, 2))
        try:
            await rig.driver.start(queue_size=64)
            writers = rig.start_writers(3, needs_reset=lambda: needs_reset(rig.guest))
            await wait_until(lambda: writers.writes > 300, timeout=10, what="writes before the loss")
            t0 = time.monotonic()
            await asyncio.to_thread(lose_backend, qsd, how)
            await wait_until(lambda: needs_reset(rig.guest), timeout=1.0, what="DEVICE_NEEDS_RESET")
            seen = time.monotonic() - t0
            assert seen <= 0.1, f"DEVICE_NEEDS_RESET {seen * 1e3:.1f} ms after the loss"
            assert rig.device.run_state is RunState.FAILED and rig.device.link is LinkState.DOWN
            await wait_until(lambda: rig.guest.config_changes >= 1, timeout=1.0,
                             what="the config interrupt announcing it")
            lost_at = writers.writes
            await asyncio.to_thread(bring_back, qsd, how)
            writers.freeze()
            await rig.driver.start(queue_size=64)       # reset (completes once qsd answers) + init
            writers.resume()
            await wait_until(lambda: writers.writes > lost_at + 300, timeout=10, what="writes after the recovery")
            await writers.pause(5)
            assert not writers.violations
            assert await writers.check_through(rig.driver) == []
            await rig.driver.flush()
        finally:
            await rig.close()
        assert writers.check_image((tmp_path / "disk.img").read_bytes()) == []
        assert "panic" not in qsd.log_tail(50)


@pytest.mark.peer
@pytest.mark.parametrize("how", ["kill", "term", "close"])
async def test_qsd_lost_with_reconnect_io_continues(tmp_path: Path, how: str) -> None:
    """Reconnect on: the guest sees nothing but latency; the requests that were in flight
    complete exactly once (the ring ledger repacks them); everything written is on disk."""
    with qsd_peer(tmp_path, 2, qmp=True) as qsd:
        rig = await make_rig(vhost_blk(qsd.socket_path, 2), reconnect=RECONNECT)
        try:
            await rig.driver.start(queue_size=64)
            writers = rig.start_writers(4)
            watcher = StatusWatcher(rig.guest.status, interval=0.001).start()
            await wait_until(lambda: writers.writes > 300, timeout=10, what="writes before the loss")
            await asyncio.to_thread(lose_backend, qsd, how)
            await wait_until(lambda: rig.device.link is not LinkState.UP, timeout=1.0, what="the loss noticed")
            lost_at = writers.completed
            await asyncio.sleep(0.05)
            await asyncio.to_thread(bring_back, qsd, how)
            await wait_until(lambda: writers.completed > lost_at + 300, timeout=10, what="I/O after the restart")
            await watcher.stop()
            await writers.pause(5)
            assert watcher.values == {LIVE}, "the guest must not see the backend go"
            assert writers.failed == 0 and not writers.violations and not rig.guest.violations
            assert rig.device.stats.reconnects == 1
            assert rig.device.events.last(DeviceEventKind.RESUMED) is not None
            assert await writers.check_through(rig.driver) == []
            await rig.driver.flush()
        finally:
            await rig.close()
        assert writers.check_image((tmp_path / "disk.img").read_bytes()) == []


@pytest.mark.peer
async def test_reconnect_deadline_passes_then_guest_reset_waits_for_the_backend(tmp_path: Path) -> None:
    with qsd_peer(tmp_path, 2) as qsd:
        rig = await make_rig(vhost_blk(qsd.socket_path, 2),
                             reconnect=ReconnectPolicy.bounded(interval=0.01, deadline=0.2))
        try:
            await rig.driver.start(queue_size=64)
            await rig.driver.write(0, pattern(0, 1))
            await asyncio.to_thread(qsd.kill)
            await wait_until(lambda: needs_reset(rig.guest), timeout=1.0, what="NEEDS_RESET past the deadline")
            assert rig.device.link is LinkState.DOWN
            rig.guest.transport.set_status(0)
            await asyncio.sleep(0.1)
            assert rig.guest.status() != 0, "the reset cannot complete while the backend is away"
            await asyncio.to_thread(qsd.restart)
            await wait_until(lambda: rig.guest.status() == 0, timeout=2.0, what="the reset once the backend is back")
            await rig.driver.start(queue_size=64)
            assert await rig.driver.read(0, BLOCK) == pattern(0, 1)
        finally:
            await rig.close()


@pytest.mark.peer
async def test_reset_at_status_zero_while_reconnecting_keeps_the_next_init(tmp_path: Path) -> None:
    """Chaos seed 118: a reset written while the status already reads 0 and the backend is away.
    The driver goes on at once (it reads 0); the reset owed to the backend must not undo the
    initialisation that follows once the backend is back."""
    with qsd_peer(tmp_path, 2, qmp=True) as qsd:
        rig = await make_rig(vhost_blk(qsd.socket_path, 2), reconnect=RECONNECT)
        try:
            await rig.driver.start(queue_size=64)
            await rig.driver.write(0, pattern(0, 1))
            await rig.guest.reset()
            await asyncio.to_thread(qsd.close_export, 0)
            await wait_until(lambda: rig.device.link is not LinkState.UP, timeout=1.0, what="the loss noticed")
            rig.guest._settle = None
            await asyncio.wait_for(rig.driver.start(queue_size=64), 2)    # reads 0 at once, initialises
            await asyncio.to_thread(qsd.add_export, 0)
            assert await asyncio.wait_for(rig.driver.read(0, BLOCK, 1), 5) == pattern(0, 1)
            assert rig.guest.status() == LIVE
        finally:
            await rig.close()


# ---------------------------------------------------------------------- a backend failing the reset


def faulty_backend(inner: str, inner_config: dict, **faults: object) -> Backend:
    """The example fault-injection plugin (plugins/faulty) around *inner*, through the registry."""
    return load_backend("faulty")({"inner": inner, "inner_config": inner_config, **faults})


@pytest.mark.parametrize("inner", ["inproc", "qsd"])
@pytest.mark.parametrize("faults", [
    {"fail_op": "get_vring_base", "fail_at": 1, "fail_count": 1},
    {"fail_op": "reset", "fail_at": 1, "fail_count": 1},
    {"fail_op": "get_vring_base", "fail_at": 1, "fail_count": 0, "fail_error": "protocol"},
], ids=["stop-fails-once", "reset-fails-once", "stop-always-fails"])
async def test_a_backend_failing_during_the_guest_reset_still_completes_it(
        tmp_path: Path, inner: str, faults: dict) -> None:
    """Found by the conformance kit: a backend error while the guest's reset stops the rings left
    the reset unfinished (status 0x4f for ever; a driver that writes 0 once and polls, as Linux
    does, hung). The reset completes, the backend is reset again before the next start, and the
    data written before is still there."""
    with contextlib.ExitStack() as stack:
        if inner == "qsd":
            qsd = stack.enter_context(qsd_peer(tmp_path, 2))
            config = {"socket": str(qsd.socket_path), "device": "blk", "queues": 2, "timeout": 3.0}
            backend = faulty_backend("vhost-user", config, **faults)
        else:
            backend = faulty_backend("inproc", {"device": "blk", "size": IMAGE_BYTES, "queues": 2}, **faults)
        rig = await make_rig(backend)
        try:
            for round_ in range(2 if faults["fail_count"] == 0 else 1):
                await rig.driver.start(queue_size=64)
                await rig.driver.write(round_ * BLOCK // 512, pattern(round_, 1))
                await asyncio.wait_for(rig.guest.reset(timeout=3.0), 4)   # one write of 0, then polls
                assert rig.guest.status() == 0
            await asyncio.wait_for(rig.driver.start(queue_size=64), 4)
            for round_ in range(2 if faults["fail_count"] == 0 else 1):
                assert await asyncio.wait_for(rig.driver.read(round_ * BLOCK // 512, BLOCK, 1), 4) \
                    == pattern(round_, 1)
            assert rig.guest.status() == LIVE
        finally:
            await rig.close()


# ---------------------------------------------------------------------- reconnect, reference back-end


@pytest.mark.peer
async def test_ref_backend_killed_mid_io_resubmits_inflight_exactly_once(tmp_path: Path) -> None:
    """The reference back-end offers INFLIGHT_SHMFD: the frontend keeps the area across the
    crash and the new process resubmits the requests it finds in flight there."""
    ref = RefBlk(tmp_path, size=IMAGE_BYTES, queues=2, latency_us=3000)
    with ref:
        rig = await make_rig(vhost_blk(ref.socket_path, 2), reconnect=RECONNECT)
        try:
            await rig.driver.start(queue_size=64)
            writers = rig.start_writers(5)
            await wait_until(lambda: writers.writes > 200, timeout=10, what="writes before the kill")
            await wait_until(lambda: sum(q.ring.in_flight for q in rig.guest.queues) >= 4, timeout=2,
                             what="requests in flight")
            in_flight = sum(q.ring.in_flight for q in rig.guest.queues)
            lost_at = writers.completed
            await asyncio.to_thread(ref.kill)
            await asyncio.sleep(0.05)
            await asyncio.to_thread(ref.restart)
            await wait_until(lambda: writers.completed > lost_at + in_flight + 100, timeout=10,
                             what="I/O after the restart")
            await writers.pause(5)
            assert writers.failed == 0 and not writers.violations and not rig.guest.violations
            assert not needs_reset(rig.guest)
            assert await writers.check_through(rig.driver) == []
        finally:
            await rig.close()
        assert writers.check_image(ref.image.read_bytes()) == []


@pytest.mark.peer
async def test_completion_published_unsignalled_by_a_killed_backend_reaches_the_guest(tmp_path: Path) -> None:
    """A back-end killed after publishing a used entry but before signalling its call fd
    (libvhost-user's vu_queue_push then vu_queue_notify) leaves a completion the guest was never
    told about; the new session has nothing in flight on that ring and never signals it. The
    device signals every ring once when a new session's rings start (a spurious interrupt is
    allowed, v1.4 §2.7.10), so the guest reaps it. The dying back-end is played by the test: the
    process is frozen with the request kicked, the test uses the request in guest memory (a
    throwaway model executes it), then the process is killed and restarted."""
    with RefBlk(tmp_path, size=IMAGE_BYTES, queues=2) as ref:
        rig = await make_rig(vhost_blk(ref.socket_path, 2), reconnect=RECONNECT)
        try:
            await rig.driver.start(queue_size=64)
            await asyncio.wait_for(rig.driver.write(0, pattern(0, 1), 1), 5)
            os.kill(ref.pid, signal.SIGSTOP)
            pending = asyncio.ensure_future(rig.driver.write(8, pattern(1, 1), 1))
            q = rig.device.queues[1]
            ring = SplitDeviceQueue(rig.device.memory, SplitLayout(q.size, q.desc, q.driver, q.device),
                                    event_idx=bool(rig.device.driver_features & Feature.EVENT_IDX),
                                    last_avail_idx=rig.device.memory.load_u16(q.device + 2))
            await wait_until(lambda: ring.avail_idx() != ring.last_avail_idx, timeout=2, what="the kicked write")
            chain = ring.pop()
            assert chain is not None
            ring.push(chain.head, BlkModel({"size": IMAGE_BYTES}).handle(rig.device.memory, chain))
            await asyncio.to_thread(ref.kill)
            await asyncio.to_thread(ref.restart)
            await asyncio.wait_for(pending, 5)
            await asyncio.wait_for(rig.driver.write(16, pattern(2, 1), 1), 5)
            assert rig.device.stats.reconnects == 1 and not rig.guest.violations
        finally:
            await rig.close()


# ---------------------------------------------------------------------- reset + immediate re-init


@pytest.mark.peer
@pytest.mark.parametrize("queues", [2, 4])
async def test_qsd_reset_and_immediate_reinit_100_rounds(tmp_path: Path, queues: int) -> None:
    """The guest writes, resets and initialises again at once, without waiting for the backend
    to have started (a guest cannot see that): the next I/O never hangs."""
    with qsd_peer(tmp_path, queues) as qsd:
        rig = await make_rig(vhost_blk(qsd.socket_path, queues), queues=queues)
        rig.guest._settle = None            # a real guest does not wait for the VMM's backend start
        try:
            for round_ in range(100):
                await asyncio.wait_for(rig.driver.start(queue_size=64), 5)
                queue = round_ % queues
                await asyncio.wait_for(rig.driver.write(round_ * 8, pattern(round_, round_), queue), 5)
                if round_:
                    got = await asyncio.wait_for(rig.driver.read((round_ - 1) * 8, BLOCK, (queue + 1) % queues), 5)
                    assert got == pattern(round_ - 1, round_ - 1), f"round {round_}"
            assert rig.device.faults.total == 0
        finally:
            await rig.close()
        assert qsd.running and "panic" not in qsd.log_tail(50)


# ---------------------------------------------------------------------- scenario 2.2 + reset


def scenario_backends(tmp_path: Path, kind: str) -> tuple[list, Backend, Backend]:
    """(peers to stop, source backend, destination backend) sharing one disk image."""
    if kind == "qsd":
        qsd = qsd_peer(tmp_path, 2, exports=2).start()
        return [qsd], vhost_blk(qsd.socket_paths[0], 2), vhost_blk(qsd.socket_paths[1], 2)
    if kind == "ref":
        src = RefBlk(tmp_path, size=IMAGE_BYTES, queues=2, name="ref-src").start()
        dst = RefBlk(tmp_path, image=src.image, create=False, size=IMAGE_BYTES, queues=2, name="ref-dst").start()
        return [src, dst], vhost_blk(src.socket_path, 2), vhost_blk(dst.socket_path, 2)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE_BYTES))
    config = {"device": "blk", "image": str(image), "size": IMAGE_BYTES, "queues": 2}
    return [], InProcBackend(config), InProcBackend(config)


@pytest.mark.parametrize("kind", [pytest.param("qsd", marks=pytest.mark.peer),
                                  pytest.param("ref", marks=pytest.mark.peer), "inproc"])
async def test_scenario_2_2_then_guest_reset_on_the_destination(tmp_path: Path, kind: str) -> None:
    """The guest stops its device (2021 STOP dialect), the VMM migrates it, and on the
    destination (which never started the device) the guest resets and initialises again, as the
    dialect requires: fresh rings, not the migrated bases nor the pre-staged start."""
    peers, src_backend, dst_backend = scenario_backends(tmp_path, kind)
    src = Machine(48 << 20)
    dst = machine_sharing(src.memory)
    cfg = DeviceConfig("blk0", "test", {}, queue_size=64, num_queues=2, stop_dialect=StopDialect.STOP)
    try:
        sdev = await src.add_device(cfg, src_backend)
        ddev = await dst.add_device(cfg, dst_backend)
        guest = src.guest("blk0")
        driver = BlkDriver(guest)
        stop_bit = sdev.policy.dialect.feature
        await driver.start(queue_size=64, extra_features=stop_bit)
        assert guest.features & stop_bit
        for block in range(32):
            await driver.write(block * 8, pattern(block, 1), queue=block % 2)
        guest.transport.set_status(guest.status() | Status.STOP)
        await wait_until(lambda: guest.status() & Status.STOP, timeout=5, what="STOP")
        await sdev.stop()
        state = await sdev.export_state(src.slots["blk0"].transport)
        preview = sdev.start_preview()
        if preview is not None:
            await ddev.prestage(preview)
        await ddev.import_state(state, dst.slots["blk0"].transport)
        move_guest(guest, sdev, ddev, dst.slots["blk0"].transport)
        assert guest.status() & Status.STOP and not ddev.started
        await asyncio.wait_for(driver.start(queue_size=64), 5)      # the reset STOP requires, then init
        assert guest.status() == LIVE
        for block in range(32):
            assert await asyncio.wait_for(driver.read(block * 8, BLOCK, block % 2), 5) == pattern(block, 1)
        await asyncio.wait_for(driver.write(40 * 8, pattern(40, 2), 1), 5)
        assert not guest.violations and ddev.faults.total == 0
    finally:
        await dst.close()
        await src.close()
        for peer in peers:
            peer.stop()


# ---------------------------------------------------------------------- queue reset


@pytest.mark.peer
@pytest.mark.parametrize("routing", ["mmio", "pci-intx", "pci-msix"])
async def test_qsd_queue_reset_on_every_interrupt_routing(tmp_path: Path, routing: str) -> None:
    """RING_RESET restarts a ring with its call fd (libvhost-user closed it at GET_VRING_BASE;
    without SET_VRING_CALL the next completion vu_panics on EBADF)."""
    with qsd_peer(tmp_path, 2) as qsd:
        rig = await make_rig(vhost_blk(qsd.socket_path, 2), transport="mmio" if routing == "mmio" else "pci",
                             msix=routing == "pci-msix")
        try:
            await rig.driver.start(queue_size=64, extra_features=int(Feature.RING_RESET))
            assert rig.guest.features & Feature.RING_RESET
            for round_ in range(3):
                await rig.driver.write(round_ * 8, pattern(round_, 1), queue=1)
                await rig.guest.reset_queue(1)
                await rig.guest.restart_queue(1, 32 if round_ % 2 else 64)
                assert await asyncio.wait_for(rig.driver.read(round_ * 8, BLOCK, queue=1), 5) == pattern(round_, 1)
                await asyncio.wait_for(rig.driver.write(100 + round_, pattern(100 + round_, 1), queue=0), 5)
            assert rig.device.run_state is RunState.RUNNING and not needs_reset(rig.guest)
        finally:
            await rig.close()
        assert qsd.running and "panic" not in qsd.log_tail(50)


@pytest.mark.peer
async def test_qsd_queue_reset_with_requests_in_flight(tmp_path: Path) -> None:
    """Chaos seed 490: qemu-storage-daemon answers GET_VRING_BASE before its requests in flight
    complete, then completes them into the ring. The guest frees that ring once the reset reads
    done and sets up a new one in the same memory, so the device must drain the ring first.
    A throttled disk (50 IOPS) keeps the writes in flight across the reset."""
    with qsd_peer(tmp_path, 2, iops=50) as qsd:
        rig = await make_rig(vhost_blk(qsd.socket_path, 2), transport="mmio")
        try:
            await rig.driver.start(queue_size=64, extra_features=int(Feature.RING_RESET))
            for block in range(8):              # empty the throttle's burst bucket
                await rig.driver.write(4096 + block * 8, pattern(block, 0), queue=1)
            for round_ in range(3):
                writes = [asyncio.ensure_future(rig.driver.write((round_ * 8 + i) * 8, pattern(i, round_), queue=0))
                          for i in range(4)]
                await wait_until(lambda: rig.guest.queues[0].ring.in_flight, timeout=1,
                                 what="the throttled writes in flight")
                await rig.guest.reset_queue(0)
                assert all(w.done() for w in writes), "the queue reset read done with writes in flight"
                await asyncio.gather(*writes, return_exceptions=True)
                await rig.guest.restart_queue(0, 64)
                await asyncio.wait_for(rig.driver.write(round_ * 8, pattern(round_, 9), queue=0), 5)
                assert not rig.guest.violations, f"round {round_}: {rig.guest.violations}"
        finally:
            await rig.close()
        assert qsd.running and "panic" not in qsd.log_tail(50)


@pytest.mark.peer
@pytest.mark.parametrize("how", ["vmm-stop", "guest-suspend"])
async def test_qsd_stop_waits_for_slow_requests_in_flight(tmp_path: Path, how: str) -> None:
    """A stop under a loaded host: qemu-storage-daemon's requests take longer than the drain's
    quiet-used-idx guess (DRAIN_STALL), so the old drain took GET_VRING_BASE with requests still
    in flight; qsd completed them after it had closed its call fd and vu_panic dropped the
    session (found by the admin-queue stop test on a busy machine). A throttled disk (10 IOPS)
    makes every request slow; the drain now reads qsd's inflight area and waits for it to empty."""
    with qsd_peer(tmp_path, 2, iops=10) as qsd:
        dialect = StopDialect.SUSPEND if how == "guest-suspend" else StopDialect.NONE
        rig = await make_rig(vhost_blk(qsd.socket_path, 2), dialect=dialect)
        try:
            extra = int(Feature.SUSPEND) if dialect is StopDialect.SUSPEND else 0
            await rig.driver.start(queue_size=64, extra_features=extra)
            await rig.driver.write(4096, pattern(99, 0), queue=1)       # empty the throttle's burst
            writes = [asyncio.ensure_future(rig.driver.write(i * 8, pattern(i, 1), queue=0)) for i in range(4)]
            await wait_until(lambda: rig.guest.queues[0].ring.in_flight >= 3, timeout=2,
                             what="the throttled writes in flight")
            ring = rig.device.queues[0]
            load = rig.machine.memory.load_u16

            def drained() -> bool:      # the used idx caught up with the avail idx
                return load(ring.device + 2) == load(ring.driver + 2)

            if how == "vmm-stop":
                await asyncio.wait_for(rig.device.stop(), 10)
                assert drained(), "stopped with requests in flight"
                await rig.device.resume()
            else:
                rig.guest.transport.set_status(rig.guest.status() | int(Status.SUSPEND))
                await wait_until(lambda: rig.guest.status() & Status.SUSPEND, timeout=10, what="SUSPEND shown")
                assert drained(), "suspended with requests in flight"
                rig.guest.transport.set_status((rig.guest.status() & ~int(Status.SUSPEND)) | int(Status.DRIVER_OK))
                await wait_until(lambda: rig.guest.status() == LIVE, timeout=5, what="resumed")
            await asyncio.gather(*writes)
            assert not needs_reset(rig.guest) and rig.device.link is LinkState.UP
            for i in range(4):
                assert await asyncio.wait_for(rig.driver.read(i * 8, BLOCK, queue=0), 5) == pattern(i, 1)
            assert not rig.guest.violations
        finally:
            await rig.close()
        assert qsd.running and "panic" not in qsd.log_tail(50)


@pytest.mark.peer
async def test_in_flight_count_from_the_inflight_area_drives_the_drain(tmp_path: Path) -> None:
    """A backend with an inflight area says how many requests it holds: the reference back-end
    (libvhost-user's layout) marks each fetched head until its used entry is published. The
    drain waits for that count, not for a quiet used idx, so 120 ms requests (longer than
    DRAIN_STALL) are all complete when the stop returns."""
    with RefBlk(tmp_path, size=IMAGE_BYTES, queues=2, latency_us=120_000) as ref:
        rig = await make_rig(vhost_blk(ref.socket_path, 2))
        try:
            await rig.driver.start(queue_size=64)
            backend = rig.device.backend
            assert backend.capabilities() & Capability.INFLIGHT and backend.in_flight(0) == 0
            writes = [asyncio.ensure_future(rig.driver.write(i * 8, pattern(i, 2), queue=0)) for i in range(3)]
            await wait_until(lambda: backend.in_flight(0) == 3, timeout=2, what="3 heads marked in flight")
            await asyncio.wait_for(rig.device.stop(), 5)
            ring = rig.device.queues[0]
            load = rig.machine.memory.load_u16
            assert load(ring.device + 2) == load(ring.driver + 2) and backend.in_flight(0) == 0
            await rig.device.resume()
            await asyncio.gather(*writes)
            assert [await rig.driver.read(i * 8, BLOCK, queue=0) for i in range(3)] == [pattern(i, 2) for i in range(3)]
        finally:
            await rig.close()


# ---------------------------------------------------------------------- start order


class KickWatcher(InProcBackend):
    """Records, per ring, whether a kick was pending when the ring got its kick fd, and when it
    was enabled: no guest notification may reach a ring before SET_VRING_ENABLE."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.log: list[str] = []

    async def set_vring_kick(self, index: int, fd: int) -> None:
        try:
            pending = os.eventfd_read(fd)
            os.eventfd_write(fd, pending)
        except BlockingIOError:
            pending = 0
        self.log.append(f"kick{index}:{'pending' if pending else 'clear'}")
        await super().set_vring_kick(index, fd)

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        self.log.append(f"enable{index}:{int(enable)}")
        await super().set_vring_enable(index, enable)

    async def set_status(self, status: int) -> None:
        self.log.append(f"status:{status:#x}")
        await super().set_status(status)


async def test_no_kick_reaches_a_ring_before_it_is_enabled() -> None:
    backend = KickWatcher({"device": "blk", "queues": 2, "size": 4 << 20})
    rig = await make_rig(backend)
    try:
        guest = rig.guest
        guest._settle = None
        for _ in range(3):
            backend.log.clear()
            await rig.driver.start(queue_size=64)          # DRIVER_OK written, backend not started yet
            reads = [asyncio.ensure_future(rig.driver.read(q * 8, 512, q)) for q in range(2)]
            await asyncio.wait_for(asyncio.gather(*reads), 5)
            kicks = [entry for entry in backend.log if entry.startswith("kick")]
            assert kicks and all(entry.endswith("clear") for entry in kicks), backend.log
            assert backend.log.index("enable1:1") < len(backend.log) - 1
    finally:
        await rig.close()


@pytest.mark.peer
async def test_request_right_after_driver_ok_on_a_backend_that_drops_disabled_rings(tmp_path: Path) -> None:
    """The reference back-end, like a spec-following net back-end, serves nothing on a ring that
    is not enabled: a GET_ID written right after DRIVER_OK must still complete."""
    with RefBlk(tmp_path, size=IMAGE_BYTES, queues=2) as ref:
        rig = await make_rig(vhost_blk(ref.socket_path, 2))
        rig.guest._settle = None
        try:
            for _ in range(5):
                await rig.driver.start(queue_size=64)
                assert await asyncio.wait_for(rig.driver.get_id(queue=1), 5)
        finally:
            await rig.close()


# ---------------------------------------------------------------------- worker robustness


class Faulty(InProcBackend):
    """Raises a non-backend exception (a plugin bug) while a ring is programmed."""

    broken = True

    async def set_vring_addr(self, addr) -> None:
        if self.broken:
            raise ValueError("plugin bug")
        await super().set_vring_addr(addr)


async def test_unexpected_exception_fails_the_device_not_the_worker() -> None:
    backend = Faulty({"device": "blk", "queues": 2, "size": 4 << 20})
    rig = await make_rig(backend)
    try:
        with pytest.raises(DeviceStateError):
            await rig.driver.start(queue_size=64)
        assert needs_reset(rig.guest) and rig.device.run_state is RunState.FAILED
        assert isinstance(rig.device.failure, ValueError)
        assert rig.device._worker is not None and not rig.device._worker.done()
        with pytest.raises(DeviceStateError):
            await asyncio.wait_for(rig.device.stop(), 1)
        backend.broken = False
        await asyncio.wait_for(rig.driver.start(queue_size=64), 5)     # the guest's reset recovers
        await rig.driver.write(0, pattern(0, 1))
        assert await rig.driver.read(0, BLOCK) == pattern(0, 1)
        assert rig.device.failure is None
    finally:
        await rig.close()


# ---------------------------------------------------------------------- v1.4 §3.4 while suspended


class ConfigRecorder(InProcBackend):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.config_writes: list[tuple[int, bytes]] = []

    async def set_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))
        await super().set_config(offset, data)


@pytest.mark.parametrize("dialect", [StopDialect.SUSPEND, StopDialect.STOP])
async def test_config_change_and_config_write_while_suspended(dialect: StopDialect) -> None:
    """virtio 1.4 §3.4: no config change and no notification while suspended (held until
    resume; a reset applies it silently), and config writes then are ignored, not forwarded."""
    backend = ConfigRecorder({"device": "blk", "queues": 1, "size": 4 << 20})
    rig = await make_rig(backend, queues=1, dialect=dialect)
    try:
        guest, device = rig.guest, rig.device
        bit = device.policy.dialect.feature
        await rig.driver.start(queue_size=64, extra_features=bit | int(WANTED))
        shown = Status.SUSPEND if dialect is StopDialect.SUSPEND else Status.STOP
        guest.transport.set_status(guest.status() | shown)
        await wait_until(lambda: guest.status() & shown, timeout=5, what="stopped")
        generation, changes = guest.transport.config_generation(), guest.config_changes
        backend.change_config(size=12345 * 512)       # a resize: capacity 12345 sectors
        await device.settle()
        await asyncio.sleep(0.01)                     # a while for a (wrong) config interrupt
        assert guest.config_int(0, 8) != 12345, "config changed while suspended"
        assert guest.transport.config_generation() == generation and guest.config_changes == changes
        with_faults = device.faults.counts[GuestFault.CONFIG_WHILE_STOPPED]
        guest.transport.write_config(32, 1, 0)                          # writeback off
        await device.settle()
        assert backend.config_writes == [] and device.faults.counts[GuestFault.CONFIG_WHILE_STOPPED] == with_faults + 1
        if dialect is StopDialect.SUSPEND:
            guest.transport.set_status((guest.status() & ~int(Status.SUSPEND)) | Status.DRIVER_OK)
            await wait_until(lambda: guest.status() == LIVE, timeout=5, what="resumed")
            await wait_for_count(lambda: guest.config_changes, changes + 1, what="the held config change")
            assert guest.config_int(0, 8) == 12345
            assert guest.transport.config_generation() != generation and guest.config_changes == changes + 1
        else:
            await guest.reset()                                           # STOP ends only by reset
            assert guest.config_changes == changes, "no notification for a device being reset"
            assert guest.config_int(0, 8) == 12345
    finally:
        await rig.close()



# ---------------------------------------------------------------------- who notices a dead backend


@pytest.mark.peer
async def test_guarded_fails_at_once_when_the_backend_dies(tmp_path: Path) -> None:
    with qsd_peer(tmp_path, 2) as qsd:
        rig = await make_rig(vhost_blk(qsd.socket_path, 2))
        try:
            await rig.driver.start(queue_size=64)
            writers = rig.start_writers(6, needs_reset=lambda: False)
            await wait_until(lambda: writers.writes > 100, timeout=10, what="writes")
            asyncio.get_running_loop().call_later(0.05, qsd.kill)
            t0 = time.monotonic()
            with pytest.raises(AssertionError, match="backend failed"):
                await guarded(rig.device, qsd.log_tail, asyncio.sleep(30))
            assert time.monotonic() - t0 < 1.0
        finally:
            await rig.close()


@pytest.mark.peer
async def test_cli_run_reports_a_dead_backend_instead_of_hanging(tmp_path: Path) -> None:
    with qsd_peer(tmp_path, 2) as qsd:
        config = tmp_path / "run.toml"
        config.write_text(f"""
[[device]]
name = "blk0"
backend = "vhost-user"
queue_size = 64
[device.backend_config]
socket = "{qsd.socket_path}"
device = "blk"
queues = 2
[run]
requests = 200000
stop_after = 100
""")
        out = io.StringIO()
        asyncio.get_running_loop().call_later(0.5, qsd.kill)
        rc = await asyncio.wait_for(cli.run(configmod.load(config), out), 30)
        assert rc == 1
        assert "FAILED: the backend of blk0 failed" in out.getvalue() and "RESULT: FAIL" in out.getvalue()


class FailsAtConfig(InProcBackend):
    async def get_config(self, offset: int, size: int) -> bytes:
        raise BackendError("injected: GET_CONFIG refused")


async def test_a_failed_realize_releases_everything() -> None:
    """realize() failing after the backend connected and the eventfds were made leaves no fd,
    reader or connection behind (the conftest fd check), and the machine stays usable."""
    machine = Machine(16 << 20)
    try:
        with pytest.raises(BackendError, match="GET_CONFIG"):
            await machine.add_device(DeviceConfig("blk0", "inproc", {}), FailsAtConfig({"device": "blk"}))
        assert "blk0" not in machine.slots
        with pytest.raises(DeviceStateError, match="queues"):
            await machine.add_device(DeviceConfig("blk0", "inproc", {}, num_queues=100_000),
                                     InProcBackend({"device": "blk"}))
        await machine.add_device(DeviceConfig("blk0", "inproc", {}), InProcBackend({"device": "blk"}))
        with pytest.raises(ArgumentError, match="already has a device"):
            await machine.add_device(DeviceConfig("blk0", "inproc", {}), InProcBackend({"device": "blk"}))
    finally:
        await machine.close()


async def test_an_idle_stop_pipelines_its_disables_and_waits_for_nothing_else() -> None:
    """Issue 14: the stop of an idle 2-ring device writes both SET_VRING_ENABLE 0 without
    NEED_REPLY (they pipeline), then the two GET_VRING_BASE round trips; it kicks no ring (all
    its buffers were used) and never asks whether the backend stops fetching (a /proc read)."""
    from shadowvmm_vhost_user import protocol as vu
    from shadowvmm_vhost_user.fake import FakeBackend

    fake = FakeBackend()
    backend = VhostUserBackend({"socket": "/nonexistent", "device": "blk", "queues": 2}, connector=fake.connector)
    asked: list[bool] = []
    answer = backend.disable_stops_fetch

    def counting() -> bool:
        asked.append(answer())
        return asked[-1]

    backend.disable_stops_fetch = counting      # type: ignore[method-assign]
    rig = await make_rig(backend)
    try:
        await rig.driver.start(queue_size=64)
        await rig.device.settle()
        await backend.request(vu.FrontendRequest.GET_FEATURES)     # everything before it was received
        mark = len(fake.received)
        kick_fds = [rig.device._kick_fds[i] for i in (0, 1)]
        for fd in kick_fds:         # the fake does not read them: empty them (the start's kicks)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
        await rig.device.stop()
        stop = [(m.request, m.flags, vu.VringState.unpack(m.payload)) for m in fake.received[mark:]]
        assert stop == [(18, 0x1, vu.VringState(0, 0)), (18, 0x1, vu.VringState(1, 0)),
                        (11, 0x1, vu.VringState(0, 0)), (11, 0x1, vu.VringState(1, 0))]
        assert asked == []
        for fd in kick_fds:
            with pytest.raises(BlockingIOError):
                os.eventfd_read(fd)
        await rig.device.resume()
        assert rig.device.rings_running and not needs_reset(rig.guest)
    finally:
        await rig.close()
        fake.stop()


async def test_a_session_lost_before_a_ring_was_kicked_resumes() -> None:
    """The back-end hangs up on the first SET_VRING_NUM of the start: ring 0 was never handed
    over (no KICK), so nothing of it is outstanding and the reconnect resumes the start; it
    once counted as live from its first message, had no ledger, and the device gave up
    (NEEDS_RESET: 'the outstanding requests are not known exactly')."""
    from shadowvmm_vhost_user.fake import CLOSE, FakeBackend

    fake = FakeBackend()
    fake.on(8, CLOSE)                                                   # SET_VRING_NUM: hang up
    backend = VhostUserBackend({"socket": "/nonexistent", "device": "blk", "queues": 2}, connector=fake.connector)
    rig = await make_rig(backend, reconnect=ReconnectPolicy.bounded(interval=0.01, deadline=2.0))
    try:
        await asyncio.wait_for(rig.driver.start(queue_size=64), 5)
        for _ in range(200):        # the hang-up may be seen after the start returned
            if rig.device.stats.reconnects or needs_reset(rig.guest):
                break
            await asyncio.sleep(0.01)
        await rig.device.settle()
        assert rig.device.stats.reconnects == 1 and rig.device.rings_running
        assert not needs_reset(rig.guest)
    finally:
        await rig.close()
        fake.stop()


async def test_a_session_lost_right_after_a_reply_records_nothing_for_the_next() -> None:
    """The back-end acks the memory table and hangs up at once: the connection reads the ack
    and the EOF in one go, so the loss is handled before the start resumes. The start must not
    then record 'memory table sent' (nor 'started') for the new session, which would skip
    ADD_MEM_REG there and fail at SET_VRING_ADDR."""
    from shadowvmm_vhost_user.fake import REPLY, U64, FakeBackend, Send

    fake = FakeBackend()
    fake.on(37, Send(37, U64.pack(0), flags=REPLY, hangup=True))        # ADD_MEM_REG: ack, then EOF
    backend = VhostUserBackend({"socket": "/nonexistent", "device": "blk", "queues": 2}, connector=fake.connector)
    rig = await make_rig(backend, reconnect=ReconnectPolicy.bounded(interval=0.01, deadline=2.0))
    try:
        await asyncio.wait_for(rig.driver.start(queue_size=64), 5)
        assert rig.device.stats.reconnects == 1 and rig.device.rings_running
        assert [m.request for m in fake.received].count(37) == 2, "the new session got its memory table"
        assert not needs_reset(rig.guest)
    finally:
        await rig.close()
        fake.stop()
