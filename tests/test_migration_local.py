"""Local migration (shared guest memory): virtio-blk between two qemu-storage-daemon exports
of one image under guest load, and seed scenario 2.3 (devices never or half initialised)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_for_count

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.errors import DeviceStateError, MigrationError
from shadowvmm.guest.blk import WANTED, BlkDriver
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import BlkLoad, machine_sharing, move_guest
from shadowvmm.migration.migrate import AUTO_BUSY_POLL_US, MigrationHooks, MigrationOptions, migrate_in, migrate_out
from shadowvmm.migration.stream import Endpoint
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import Feature, Status
from shadowvmm.workload import StatusWatcher
from shadowvmm_vhost_user import VhostUserBackend

DRIVER_OK_STATUS = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
IMAGE_BYTES = 64 << 20


@dataclass
class Pair:
    src: Machine
    dst: Machine
    tmp: Path

    async def migrate(self, hooks: MigrationHooks | None = None,
                      options: MigrationOptions | None = None):
        options = options if options is not None else MigrationOptions(mode="local")
        endpoint = Endpoint.parse(f"unix:{self.tmp / 'migrate.sock'}")
        listener = await endpoint.listen()
        try:
            incoming = asyncio.ensure_future(self._incoming(listener))
            report = await migrate_out(self.src, await endpoint.connect(), options, hooks)
            return report, await incoming
        finally:
            await listener.close()

    async def _incoming(self, listener):
        return await migrate_in(self.dst, await listener.accept(10))


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QsdBlk]:
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=tmp_path / "disk.img", size=IMAGE_BYTES, create=True, num_queues=4,
                exports=2, binary=binary) as peer:
        yield peer


def vhost_blk(path: Path) -> VhostUserBackend:
    return VhostUserBackend({"socket": str(path), "device": "blk", "queues": 4})


@pytest.fixture
async def qsd_pair(qsd: QsdBlk, tmp_path: Path) -> AsyncIterator[Pair]:
    src = Machine(64 << 20)
    dst = machine_sharing(src.memory)
    cfg = DeviceConfig("blk0", "vhost-user", {}, transport="pci", queue_size=128)
    try:
        await src.add_device(cfg, vhost_blk(qsd.socket_paths[0]))
        await dst.add_device(cfg, vhost_blk(qsd.socket_paths[1]))
        yield Pair(src, dst, tmp_path)
    finally:
        await dst.close()
        await src.close()


@pytest.mark.peer
async def test_blk_local_migration_under_load(qsd_pair: Pair) -> None:
    src, dst = qsd_pair.src, qsd_pair.dst
    sdev, ddev = src.device("blk0"), dst.device("blk0")
    guest = src.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start(queue_size=128)
    assert len(guest.queues) == 4
    load = BlkLoad(driver, blocks_per_queue=512, depth=8, seed=7).start()
    watcher = StatusWatcher(guest.status, interval=0.0002)
    try:
        before = await wait_for_count(lambda: load.completed, 101, timeout=10, what="guest I/O before the migration")
        assert before > 100 and not load.stats.errors
        assert guest.status() == DRIVER_OK_STATUS
        log_mark = len(guest.transport.status_log.values)
        watcher.start()
        polls: dict[str, list[float]] = {"src": [], "dst": []}
        for side, dev in (("src", sdev), ("dst", ddev)):
            def record(seconds: float, _dev=dev, _log=polls[side], _set=dev.set_busy_poll) -> float:
                _log.append(seconds)
                return _set(seconds)
            dev.set_busy_poll = record  # type: ignore[method-assign]
        hooks = MigrationHooks(switch_over=lambda: move_guest(guest, sdev, ddev, dst.slots["blk0"].transport))
        report, incoming = await qsd_pair.migrate(hooks)
        at_switch = load.completed
        await wait_for_count(lambda: load.completed, at_switch + 101, timeout=10,
                             what="guest I/O on the destination")
        await watcher.stop()
        await load.stop()
        assert report.ok and incoming.devices == ["blk0"]
        assert load.completed > at_switch + 100, "guest I/O did not continue on the destination"
        assert not load.stats.errors and load.stats.read_mismatches == []
        assert await load.verify() == []
        assert ddev.rings_running and sdev.run_state.value == "stopped"
        assert sorted(ddev.ring_states) == [0, 1, 2, 3]
        assert watcher.values == {DRIVER_OK_STATUS} and watcher.reads > 10
        assert guest.transport.status_log.values[log_mark - 1:] == [DRIVER_OK_STATUS]
        assert sdev.faults.total == ddev.faults.total == 0
        # A lone device busy-polls its backend's replies for the migration, then stops.
        assert polls == {"src": [AUTO_BUSY_POLL_US / 1e6, 0.0], "dst": [AUTO_BUSY_POLL_US / 1e6, 0.0]}
        assert isinstance(sdev.backend, VhostUserBackend) and isinstance(ddev.backend, VhostUserBackend)
        assert sdev.backend.busy_poll == ddev.backend.busy_poll == 0.0
    finally:
        guest.close()


def test_busy_poll_option() -> None:
    assert MigrationOptions().busy_poll_seconds(1) == AUTO_BUSY_POLL_US / 1e6
    assert MigrationOptions().busy_poll_seconds(2) == 0.0       # spinning would serialize them
    assert MigrationOptions(busy_poll_us=50).busy_poll_seconds(8) == 50e-6
    assert MigrationOptions(busy_poll_us=0).busy_poll_seconds(1) == 0.0
    with pytest.raises(MigrationError, match="busy_poll_us"):
        MigrationOptions(busy_poll_us=-1).validate()


# ---------------------------------------------------------------------- seed scenario 2.3


async def continue_init(guest: GuestDevice, wanted: int, queue_size: int = 64, **_: object) -> int:
    """Finish virtio v1.4 §3.1.1 from wherever the guest left off (no reset)."""
    t = guest.transport
    status = guest.status()
    if not status & Status.ACKNOWLEDGE:
        t.set_status(Status.ACKNOWLEDGE)
    if not status & Status.DRIVER:
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    if not status & Status.FEATURES_OK:
        accepted = t.device_features() & (wanted | Feature.VERSION_1)
        t.set_driver_features(accepted)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert guest.status() & Status.FEATURES_OK
        guest.features = accepted
    guest._start_interrupts()
    t.set_config_vector(0)
    for index in range(len(guest.queues), t.num_queues()):
        guest.queues.append(guest._setup_queue(index, queue_size))
    guest.driver_ok()
    return guest.features


@dataclass
class InprocPair(Pair):
    image: Path = Path()


@contextlib.asynccontextmanager
async def make_inproc_pair(tmp_path: Path, dst_backend: type[InProcBackend] | None = None
                           ) -> AsyncIterator[InprocPair]:
    """Two machines sharing guest memory, each with an in-process blk on one image file."""
    src = Machine(32 << 20)
    dst = machine_sharing(src.memory)
    backend = {"device": "blk", "image": str(tmp_path / "disk.img"), "size": 8 << 20, "queues": 2}
    cfg = DeviceConfig("blk0", "inproc", backend, transport="pci", queue_size=64)
    try:
        await src.add_device(cfg)
        await dst.add_device(cfg, dst_backend(backend) if dst_backend is not None else None)
        yield InprocPair(src, dst, tmp_path, tmp_path / "disk.img")
    finally:
        await dst.close()
        await src.close()


@pytest.fixture
async def inproc_pair(tmp_path: Path) -> AsyncIterator[InprocPair]:
    async with make_inproc_pair(tmp_path) as pair:
        yield pair


@pytest.mark.parametrize("stage", ["never", "ack_driver", "features_ok"])
async def test_scenario_2_3_half_initialised_device_migrates(inproc_pair: InprocPair, stage: str) -> None:
    src, dst = inproc_pair.src, inproc_pair.dst
    sdev, ddev = src.device("blk0"), dst.device("blk0")
    guest = src.guest("blk0")
    t = guest.transport
    await guest.reset()
    if stage != "never":
        t.set_status(Status.ACKNOWLEDGE)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    if stage == "features_ok":
        accepted = t.device_features() & (WANTED | Feature.VERSION_1)
        t.set_driver_features(accepted)
        t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        guest.features = accepted
        guest.queues.append(guest._setup_queue(0, 64))
    status = guest.status()
    hooks = MigrationHooks(switch_over=lambda: move_guest(guest, sdev, ddev, dst.slots["blk0"].transport))
    report, _ = await inproc_pair.migrate(hooks)
    try:
        assert report.ok and not sdev.started and not ddev.started
        assert guest.status() == status == ddev.read_status()
        assert ddev.driver_features == sdev.driver_features
        if stage == "features_ok":
            assert ddev.queues[0].enabled and ddev.queues[0].desc == sdev.queues[0].desc
        driver = BlkDriver(guest)
        driver.dev.initialize = lambda wanted, **kw: continue_init(guest, wanted, **kw)  # type: ignore[method-assign]
        await driver.start(queue_size=64)
        await ddev.settle()
        assert guest.status() == DRIVER_OK_STATUS and ddev.rings_running and not sdev.started
        data = bytes(range(256)) * 16
        await driver.write(8, data, queue=len(guest.queues) - 1)
        assert await driver.read(8, len(data)) == data
        assert ddev.faults.total == 0
    finally:
        guest.close()


async def test_export_requires_stop(inproc_pair: InprocPair) -> None:
    from shadowvmm.errors import DeviceStateError
    guest = inproc_pair.src.guest("blk0")
    try:
        await BlkDriver(guest).start(queue_size=64)
        device: VirtioDevice = inproc_pair.src.device("blk0")
        await device.settle()
        with pytest.raises(DeviceStateError, match="stopped"):
            await device.export_state()
        await device.stop()
        state = await device.export_state(inproc_pair.src.slots["blk0"].transport)
        assert state.transport.guest_status == DRIVER_OK_STATUS and len(state.rings) == 2
        assert state.opaque is not None and state.opaque.implementation == "inproc-blk"
        await device.resume()
    finally:
        guest.close()


# ---------------------------------------------------------------------- start preview (prestage)


class Recording(InProcBackend):
    """The in-process backend, recording the start messages it gets."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.log: list[str] = []

    async def set_features(self, features: int) -> None:
        self.log.append("features")
        await super().set_features(features)

    async def set_vring_call(self, index: int, fd: int) -> None:
        self.log.append(f"call{index}")
        await super().set_vring_call(index, fd)

    async def set_vring_num(self, index: int, num: int) -> None:
        self.log.append(f"num{index}={num}")
        await super().set_vring_num(index, num)

    async def set_vring_base(self, index: int, base: int) -> None:
        self.log.append(f"base{index}")
        await super().set_vring_base(index, base)


@pytest.fixture
async def recording_pair(tmp_path: Path) -> AsyncIterator[InprocPair]:
    async with make_inproc_pair(tmp_path, Recording) as pair:
        yield pair


async def test_destination_stages_what_the_preview_fixes(recording_pair: InprocPair) -> None:
    src, dst = recording_pair.src, recording_pair.dst
    sdev, ddev = src.device("blk0"), dst.device("blk0")
    guest = src.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start(queue_size=32)
    await driver.write(0, b"p" * 4096)
    preview = sdev.start_preview()
    assert preview == {"features": sdev.driver_features, "msix": True, "queues": [[0, 32, 1], [1, 32, 2]]}
    hooks = MigrationHooks(switch_over=lambda: move_guest(guest, sdev, ddev, dst.slots["blk0"].transport))
    try:
        report, _ = await recording_pair.migrate(hooks)
        assert report.ok
        # Staged at setup, each once; the start after the state sends only the bases on.
        assert isinstance(ddev.backend, Recording)
        assert ddev.backend.log == ["features", "call0", "num0=32", "call1", "num1=32", "base0", "base1"]
        assert await driver.read(0, 4096) == b"p" * 4096
        await driver.write(8, b"q" * 4096, queue=1)
        assert await driver.read(8, 4096, queue=1) == b"q" * 4096
    finally:
        guest.close()


async def test_a_stale_preview_is_corrected_at_start(recording_pair: InprocPair) -> None:
    """The guest changed sizes and routing after the preview: the start re-sends what differs."""
    src, dst = recording_pair.src, recording_pair.dst
    sdev, ddev = src.device("blk0"), dst.device("blk0")
    guest = src.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start(queue_size=32)
    stale = {"features": sdev.driver_features & ~int(Feature.EVENT_IDX), "msix": True,
             "queues": [[0, 16, 1], [1, 32, 2]]}
    await ddev.prestage(stale)
    await sdev.stop()
    state = await sdev.export_state(src.slots["blk0"].transport)
    await ddev.import_state(state, dst.slots["blk0"].transport)
    try:
        assert isinstance(ddev.backend, Recording)
        assert ddev.backend.log == ["features", "call0", "num0=16", "call1", "num1=32",
                                    "features", "num0=32", "base0", "base1"]
        move_guest(guest, sdev, ddev, dst.slots["blk0"].transport)
        await driver.write(16, b"s" * 4096)
        assert await driver.read(16, 4096) == b"s" * 4096
    finally:
        guest.close()


@pytest.mark.parametrize("preview", [
    {"features": "x", "msix": True, "queues": []},
    {"features": 1, "msix": 1, "queues": []},
    {"features": 1, "msix": True, "queues": [[0, 64]]},
    {"features": 1, "msix": True, "queues": [[5, 64, 1]]},        # no queue 5
    {"features": 1, "msix": True, "queues": [[0, 4096, 1]]},      # beyond queue_num_max
    {"features": 1, "msix": True, "queues": [[0, 64, 77]]},       # no such vector
    {"features": -1, "msix": True, "queues": []},
], ids=["features-type", "msix-type", "short-entry", "queue-index", "queue-size", "vector", "negative"])
async def test_malformed_preview_is_refused_before_anything_is_sent(recording_pair: InprocPair,
                                                                     preview: dict) -> None:
    ddev = recording_pair.dst.device("blk0")
    with pytest.raises(DeviceStateError, match="preview"):
        await ddev.prestage(preview)
    assert isinstance(ddev.backend, Recording)
    assert ddev.backend.log == []
