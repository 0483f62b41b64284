"""Hostile peers: a well-framed stream (CRC recomputed) carrying crafted device state, a raw
source, a destination that answers ok without loading anything, and unix endpoints that are
not ours. Every refusal is typed, names what was wrong, leaves the destination able to take
the next attempt and the source running."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import wait_until

from shadowvmm.backends.base import RingState
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import IncompatibleStateError, MigrationError, StreamError
from shadowvmm.guest.blk import BlkDriver, BlkOp
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.machine import Machine
from shadowvmm.memory import PAGE_SIZE
from shadowvmm.migration.migrate import DestinationRefused, MigrationOptions, memory_layout, migrate_in, migrate_out
from shadowvmm.migration.state import DeviceState, RingPart, StateFormatError
from shadowvmm.migration.stream import (
    Channel,
    Endpoint,
    PageBatch,
    RecordHeader,
    RecordType,
    StreamReader,
    StreamWriter,
)
from shadowvmm.shadow import RunState, StopDialect
from shadowvmm.virtio.constants import BlkRequestType, Feature, Status

MEMORY = 16 << 20
OPTIONS = MigrationOptions(mode="copy", max_rounds=2, result_timeout=3.0)


async def blk_machine(tmp: Path, name: str) -> Machine:
    machine = Machine(MEMORY)
    backend = {"device": "blk", "image": str(tmp / f"{name}.img"), "size": 4 << 20, "queues": 2}
    await machine.add_device(DeviceConfig("blk0", "inproc", backend, queue_size=64))
    return machine


@dataclass
class Rig:
    tmp: Path
    src: Machine
    dst: Machine
    guest: GuestDevice
    driver: BlkDriver
    attempts: int = 0

    def endpoint(self) -> Endpoint:
        self.attempts += 1
        return Endpoint.parse(f"unix:{self.tmp / f'm{self.attempts}.sock'}")

    async def write_block(self, block: int, fill: int) -> None:
        await self.driver.submit([BlkOp(BlkRequestType.OUT, block * 8, data=bytes([fill]) * 4096)], 0)

    async def read_block(self, block: int) -> bytes:
        return (await self.driver.submit([BlkOp(BlkRequestType.IN, block * 8, length=4096)], 0))[0]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    src = await blk_machine(tmp_path, "src")
    # the same image on both sides: a destination device that could take the state
    dst = Machine(MEMORY)
    backend = {"device": "blk", "image": str(tmp_path / "src.img"), "size": 4 << 20, "queues": 2}
    await dst.add_device(DeviceConfig("blk0", "inproc", backend, queue_size=64))
    guest = src.guest("blk0")
    driver = BlkDriver(guest)
    await driver.start(queue_size=64)
    r = Rig(tmp_path, src, dst, guest, driver)
    for block in range(8):
        await r.write_block(block, block + 1)
    try:
        yield r
    finally:
        guest.close()
        await dst.close()
        await src.close()


class TamperChannel:
    """The source's channel, with every DEVICE record's state map edited and its CRC recomputed."""

    def __init__(self, inner: Channel, edit: Callable[[dict[str, Any]], None]) -> None:
        self.inner = inner
        self.duplex = inner.duplex
        self.edit = edit

    async def send(self, data: bytes) -> None:
        size = RecordHeader.STRUCT.size
        if len(data) >= size and data[:4] != b"SVMM" and struct.unpack_from("<H", data)[0] == RecordType.DEVICE:
            state = msgpack.unpackb(data[size:], raw=False)
            self.edit(state)
            payload = msgpack.packb(state, use_bin_type=True)
            data = RecordHeader.for_payload(RecordType.DEVICE, payload).pack() + payload
        await self.inner.send(data)

    async def recv_exactly(self, size: int) -> bytes:
        return await self.inner.recv_exactly(size)

    async def close(self) -> None:
        await self.inner.close()

    async def abort(self) -> None:
        await self.inner.abort()


async def migrate(rig: Rig, edit: Callable[[dict[str, Any]], None] | None = None, *, digest: bool = False):
    """One attempt; returns (source report or error, destination report or error)."""
    endpoint = rig.endpoint()
    listener = await endpoint.listen()
    try:
        async def incoming():
            return await migrate_in(rig.dst, await listener.accept(5), timeout=10, digest=digest)
        task = asyncio.ensure_future(incoming())
        channel: Channel = await endpoint.connect()
        if edit is not None:
            channel = TamperChannel(channel, edit)
        options = MigrationOptions(mode="copy", max_rounds=2, result_timeout=3.0, digest=digest)
        outcomes = await asyncio.gather(migrate_out(rig.src, channel, options), task, return_exceptions=True)
        return outcomes[0], outcomes[1]
    finally:
        await listener.close()


def assert_untouched(machine: Machine) -> None:
    device = machine.device("blk0")
    assert not device.started and device.shadow.guest_status == 0
    assert device.run_state is RunState.RUNNING and device._staged is None


async def assert_source_running(rig: Rig) -> None:
    device = rig.src.device("blk0")
    assert device.run_state is RunState.RUNNING and device.rings_running
    assert rig.src.memory.dirty_log is None
    await rig.write_block(20, 0xAB)
    assert await rig.read_block(20) == bytes([0xAB]) * 4096
    assert await rig.read_block(3) == bytes([4]) * 4096


async def assert_good_attempt(rig: Rig) -> None:
    """The destination takes the next, good attempt; its memory is the source's."""
    report, dest = await migrate(rig, digest=True)
    assert not isinstance(report, BaseException), report
    assert not isinstance(dest, BaseException), dest
    assert report.ok and report.confirmed
    assert dest.memory_digest == report.memory_digest
    assert rig.dst.device("blk0").rings_running


def _transport(d: dict[str, Any]) -> dict[str, Any]:
    return d["!device"]["!transport"]


def _queue(d: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return _transport(d)["!queues"][index]


def _set(getter: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any):
    return lambda d: getter(d).__setitem__(key, value)


def _shift(getter: Callable[[dict[str, Any]], dict[str, Any]], key: str, delta: int):
    return lambda d: getter(d).__setitem__(key, getter(d)[key] + delta)


def _flip_byte(key: str, offset: int, bits: int):
    def edit(d: dict[str, Any]) -> None:
        buf = bytearray(_transport(d)[key])
        buf[offset] ^= bits
        _transport(d)[key] = bytes(buf)
    return edit


def _features(extra: int, *, offered: bool):
    def edit(d: dict[str, Any]) -> None:
        t = _transport(d)
        t["!driver_features"] |= extra
        if offered:
            t["!device_features"] |= extra
    return edit


def _capacity(sectors: int):
    def edit(d: dict[str, Any]) -> None:
        config = bytearray(_transport(d)["!config"])
        config[:8] = sectors.to_bytes(8, "little")
        _transport(d)["!config"] = bytes(config)
    return edit


def _q0(d: dict[str, Any]) -> dict[str, Any]:
    return _queue(d, 0)


OUTSIDE = MEMORY + 0x10000
CASES = [
    ("desc-outside", _set(_q0, "!desc", OUTSIDE), IncompatibleStateError,
     (rf"blk0: queue 0 desc area \[{OUTSIDE:#x}, \+0x400\) of a 64-entry ring lies outside guest memory "
      rf"\(\[0x0, {MEMORY:#x}\)\)")),
    ("driver-outside", _set(_q0, "!driver", MEMORY - 2), IncompatibleStateError,
     rf"blk0: queue 0 driver area \[{MEMORY - 2:#x}, \+0x86\) .* outside guest memory"),
    ("device-outside", _set(_q0, "!device", MEMORY), IncompatibleStateError,
     rf"blk0: queue 0 device area \[{MEMORY:#x}, \+0x206\) .* outside guest memory"),
    ("desc-misaligned", _shift(_q0, "!desc", 8), StreamError,
     r"blk0: queue 0\.desc: 0x[0-9a-f]+ is not 16-byte aligned"),
    ("used-misaligned", _shift(_q0, "!device", 2), StreamError,
     r"blk0: queue 0\.device: 0x[0-9a-f]+ is not 4-byte aligned"),
    ("size-0", _set(_q0, "!size", 0), StreamError, r"blk0: queue 0\.size: 0 is outside \[1, 64\]"),
    ("size-3", _set(_q0, "!size", 3), StreamError, r"blk0: queue 0\.size: 3 is not a power of 2"),
    ("size-over-own-max", _set(_q0, "!size", 128), StreamError, r"blk0: queue 0\.size: 128 is outside \[1, 64\]"),
    ("size-over-destination-max", lambda d: _q0(d).update({"!size": 128, "max_size": 256}), IncompatibleStateError,
     r"blk0: queue 0 size 128 exceeds the destination's maximum 64"),
    ("msix-vector-100", _set(_q0, "!msix_vector", 100), IncompatibleStateError,
     r"blk0: queue 0 msix_vector 100 is beyond the MSI-X table \(3 vectors: 0\.\.2, or NO_VECTOR 0xffff\)"),
    ("config-msix-vector-60000", _set(_transport, "!config_msix_vector", 60000), IncompatibleStateError,
     r"blk0: config_msix_vector 60000 is beyond the MSI-X table \(3 vectors"),
    ("format-99", lambda d: d.__setitem__("!format", 99), IncompatibleStateError,
     r"blk0: state format 99 is newer than this reader supports \(formats 1\.\.2\)"),
    ("feature-not-offered-by-destination", _features(1 << 50, offered=True), IncompatibleStateError,
     r"blk0: the guest negotiated features 0x4000000000000 the destination does not offer"),
    ("feature-never-offered", _features(1 << 50, offered=False), StreamError,
     r"blk0: transport\.driver_features: 0x[0-9a-f]+ accepts bits 0x4000000000000 the device did not offer"),
    ("no-version-1", lambda d: _transport(d).__setitem__("!driver_features",
                                                         _transport(d)["!driver_features"] & ~int(Feature.VERSION_1)),
     StreamError, r"blk0: transport\.driver_features: 0x[0-9a-f]+ lacks VERSION_1 with FEATURES_OK set"),
    ("driver-ok-without-features-ok", _set(_transport, "!guest_status", int(Status.ACKNOWLEDGE | Status.DRIVER
                                                                            | Status.DRIVER_OK)),
     StreamError, r"blk0: transport\.guest_status: 0x7 has DRIVER_OK without FEATURES_OK"),
    ("stop-without-dialect", _set(_transport, "!guest_stop_requested", True), StreamError,
     r"blk0: transport: a guest stop \(status 0xf\) without a negotiated stop dialect"),
    ("isr-bits", _set(_transport, "!isr", 0x80), StreamError,
     r"blk0: transport\.isr: 0x80 has bits outside the queue and config interrupt bits 0x3"),
    ("config-size", lambda d: _transport(d).__setitem__("!config", _transport(d)["!config"] + b"\0"),
     IncompatibleStateError, r"blk0: config space of \d+ bytes, the destination serves \d+"),
    ("config-capacity", _capacity(4096), IncompatibleStateError,
     r"blk0: destination disk has 8192 sectors, the source 4096"),
    ("pci-read-only-byte", _flip_byte("!pci_config_space", 0x00, 0x01), IncompatibleStateError,
     r"blk0: PCI config byte 0x0 is 0xf5, a read-only value the destination has as 0xf4"),
    ("pci-table-size", lambda d: _transport(d).__setitem__("!msix_table", _transport(d)["!msix_table"] + bytes(16)),
     IncompatibleStateError, r"blk0: MSI-X table of 64 bytes, the destination's is 48"),
    ("msix-enable-contradiction", lambda d: _transport(d).__setitem__("!msix_enabled", False),
     IncompatibleStateError, r"blk0: msix_enabled False contradicts the MSI-X control word"),
    ("transport-kind", _set(_transport, "!kind", "mmio"), IncompatibleStateError,
     r"blk0: state of a mmio transport, the destination's is pci"),
    ("feature-select", _set(_transport, "!device_feature_select", 1 << 40), StreamError,
     r"blk0: transport\.device_feature_select: 1099511627776 is outside \[0, 4294967295\]"),
]


@pytest.mark.parametrize("edit, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_crafted_device_record_refused_before_anything_is_applied(
        rig: Rig, edit: Callable[[dict[str, Any]], None], error: type[Exception], match: str) -> None:
    source_error, dest_error = await migrate(rig, edit)
    assert isinstance(dest_error, error), dest_error
    with pytest.raises(error, match=match):
        raise dest_error
    assert isinstance(source_error, DestinationRefused), source_error
    assert "refused" in str(source_error) and type(dest_error).__name__ in str(source_error)
    assert_untouched(rig.dst)
    await assert_source_running(rig)
    await assert_good_attempt(rig)


async def test_unknown_device_record_refused(rig: Rig) -> None:
    source_error, dest_error = await migrate(rig, _set(lambda d: d["!device"], "!name", "blk9"))
    assert isinstance(dest_error, MigrationError) and "'blk9', which the destination does not have" in str(dest_error)
    assert isinstance(source_error, DestinationRefused)
    assert_untouched(rig.dst)
    await assert_good_attempt(rig)


@pytest.mark.parametrize("dialect", [StopDialect.STOP, StopDialect.SUSPEND])
async def test_a_guest_stopped_device_passes_the_checks(tmp_path: Path, dialect: StopDialect) -> None:
    """Control: the status and dialect rules take a device the guest stopped through its dialect."""
    src, dst = Machine(MEMORY), Machine(MEMORY)
    backend = {"device": "blk", "image": str(tmp_path / "d.img"), "size": 4 << 20, "queues": 2}
    cfg = DeviceConfig("blk0", "inproc", backend, queue_size=64, stop_dialect=dialect)
    try:
        sdev = await src.add_device(cfg)
        await dst.add_device(cfg)
        guest = src.guest("blk0")
        await BlkDriver(guest).start(queue_size=64, extra_features=sdev.policy.dialect.feature)
        guest.transport.set_status(guest.status() | sdev.policy.dialect.status)
        await wait_until(lambda: sdev.shadow.guest_stopped, timeout=5, what="the guest's stop")
        rig = Rig(tmp_path, src, dst, guest, BlkDriver(guest))
        report, dest = await migrate(rig)
        assert not isinstance(dest, BaseException), dest
        assert not isinstance(report, BaseException) and report.confirmed
        assert dst.device("blk0").shadow.guest_stopped
        guest.close()
    finally:
        await dst.close()
        await src.close()


async def test_a_wrapped_packed_ring_passes_the_checks(tmp_path: Path) -> None:
    """Control: a packed ring that wrapped (positions and wrap counters) migrates."""
    src, dst = Machine(MEMORY), Machine(MEMORY)
    backend = {"device": "blk", "image": str(tmp_path / "d.img"), "size": 4 << 20, "queues": 2}
    cfg = DeviceConfig("blk0", "inproc", backend, queue_size=64, packed=True)
    try:
        await src.add_device(cfg)
        await dst.add_device(cfg)
        guest = src.guest("blk0")
        rig = Rig(tmp_path, src, dst, guest, BlkDriver(guest))
        await rig.driver.start(packed=True, queue_size=64)
        for i in range(100):
            await rig.write_block(i % 16, i)
        report, dest = await migrate(rig)
        assert not isinstance(dest, BaseException), dest
        assert not isinstance(report, BaseException) and report.confirmed
        avail, avail_wrap, used, used_wrap = dst.device("blk0").ring_states[0].unpack_packed()
        assert avail == used and (avail, avail_wrap) == (used, used_wrap) != (0, True)   # went round
        assert dst.device("blk0").rings_running
        guest.close()
    finally:
        await dst.close()
        await src.close()


def test_packed_ring_position_outside_the_ring_refused() -> None:
    from test_migration_state import blk_state, transport
    regs = transport(packed=True)
    good = RingPart.from_ring_state(RingState.packed(0, 127, True, 5, False), packed=True)
    DeviceState.unpack(blk_state(transport=regs, rings=(good,)).pack())
    bad = RingPart.from_ring_state(RingState.packed(0, 128, True, 5, False), packed=True)
    with pytest.raises(StateFormatError, match=r"ring 0\.avail_idx: 128 is outside the packed ring of 128 entries"):
        DeviceState.unpack(blk_state(transport=regs, rings=(bad,)).pack())


# ---------------------------------------------------------------------- a raw hostile source


@dataclass
class RawSource:
    """Speaks the stream to a destination by hand."""

    writer: StreamWriter
    reader: StreamReader

    @classmethod
    async def connect(cls, endpoint: Endpoint, machine: Machine) -> RawSource:
        channel = await endpoint.connect()
        raw = cls(StreamWriter(channel), StreamReader(channel))
        await raw.writer.start()
        await raw.writer.write_map(RecordType.HELLO, {
            "mode": "copy", "memory": memory_layout(machine.memory), "identity": [],
            "devices": [{"name": n, "device_id": int(s.device.device_id), "queues": s.device.num_queues,
                         "preview": None} for n, s in machine.slots.items()]})
        await raw.reader.start()
        await raw.reader.expect(RecordType.READY)
        return raw

    async def result(self, timeout: float = 2.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return (await self.reader.expect(RecordType.RESULT)).decode()


async def exported_state(machine: Machine) -> bytes:
    slot = machine.slots["blk0"]
    await slot.device.stop()
    try:
        return (await slot.device.export_state(slot.transport)).pack()
    finally:
        await slot.device.resume()


async def test_pages_of_a_failed_attempt_do_not_survive_into_the_next(rig: Rig) -> None:
    """The first round skips the source's zero pages: what a failed attempt wrote is zeroed again."""
    garbage = MEMORY - PAGE_SIZE
    assert rig.src.memory.read(garbage, PAGE_SIZE) == bytes(PAGE_SIZE)
    endpoint = rig.endpoint()
    listener = await endpoint.listen()
    try:
        incoming = asyncio.ensure_future(_incoming(rig.dst, listener))
        raw = await RawSource.connect(endpoint, rig.src)
        await raw.writer.write(RecordType.PAGES, PageBatch(((garbage, b"\xee" * PAGE_SIZE),)).pack())
        await raw.writer.write_map(RecordType.ABORT, {"reason": "hostile"})
        with pytest.raises(MigrationError, match="abandoned"):
            await incoming
    finally:
        await listener.close()
    assert rig.dst.memory.read(garbage, PAGE_SIZE) == bytes(PAGE_SIZE)
    await assert_good_attempt(rig)


async def _incoming(machine: Machine, listener) -> Any:
    return await migrate_in(machine, await listener.accept(5), timeout=5)


@pytest.mark.parametrize("second", ["duplicate", "unknown"])
async def test_extra_device_records_refused_as_they_arrive(rig: Rig, second: str) -> None:
    """One state per destination device: a repeated or unknown one is refused at once, not
    buffered until END."""
    blob = await exported_state(rig.src)
    if second == "unknown":
        data = msgpack.unpackb(blob, raw=False)
        data["!device"]["!name"] = "blk7"
        extra = msgpack.packb(data, use_bin_type=True)
    else:
        extra = blob
    endpoint = rig.endpoint()
    listener = await endpoint.listen()
    try:
        incoming = asyncio.ensure_future(_incoming(rig.dst, listener))
        raw = await RawSource.connect(endpoint, rig.src)
        await raw.writer.write(RecordType.DEVICE, blob)
        await raw.writer.write(RecordType.DEVICE, extra)
        result = await raw.result()            # no END was sent: the refusal came on arrival
        assert result["ok"] is False
        assert ("sent twice" if second == "duplicate" else "'blk7'") in result["error"]
        with pytest.raises(MigrationError):
            await incoming
    finally:
        await listener.close()
    assert_untouched(rig.dst)
    await assert_good_attempt(rig)


# ---------------------------------------------------------------------- a destination that lies


async def fake_destination(listener, behaviour: str) -> None:
    """Reads the stream and answers RESULT ok without applying anything."""
    channel = await listener.accept(5)
    reader, writer = StreamReader(channel), StreamWriter(channel)
    try:
        await reader.start()
        await reader.expect(RecordType.HELLO)
        await writer.start()
        await writer.write_map(RecordType.READY, {"ok": True})
        if behaviour == "early":
            await writer.write_map(RecordType.RESULT, {"ok": True, "report": {}})
        digests: dict[str, str] = {}
        pages = 0
        while True:
            record = await reader.read()
            if record.type is RecordType.PAGES:
                pages += len(PageBatch.unpack(record.payload).pages)
            elif record.type is RecordType.DEVICE:
                digests[DeviceState.unpack(record.payload).name] = hashlib.sha256(record.payload).hexdigest()
            elif record.type in (RecordType.END, RecordType.ABORT):
                break
        if behaviour == "early":
            return
        applied = {"devices": digests, "pages": pages}
        if behaviour == "wrong-digest":
            applied["devices"] = {name: "0" * 64 for name in digests}
        elif behaviour == "wrong-pages":
            applied["pages"] = pages - 1
        elif behaviour == "missing":
            applied = {}
        await writer.write_map(RecordType.RESULT, {"ok": True, "report": {"applied": applied}})
    except StreamError:
        pass
    finally:
        await channel.close()


@pytest.mark.parametrize("behaviour, match", [
    ("early", "before the stream ended"),
    ("wrong-digest", r"confirmed device 'blk0' with digest 0000000000000000, the source sent [0-9a-f]{16}"),
    ("wrong-pages", r"confirmed \d+ pages applied, the source sent \d+"),
    ("missing", "did not confirm what it applied"),
])
async def test_source_resumes_unless_the_destination_confirms_what_it_loaded(rig: Rig, behaviour: str,
                                                                          match: str) -> None:
    endpoint = rig.endpoint()
    listener = await endpoint.listen()
    try:
        fake = asyncio.ensure_future(fake_destination(listener, behaviour))
        with pytest.raises(DestinationRefused, match=match):
            await migrate_out(rig.src, await endpoint.connect(), OPTIONS)
        await fake
    finally:
        await listener.close()
    await assert_source_running(rig)


async def test_honest_confirmation_completes(rig: Rig) -> None:
    """Control: the same fake, confirming exactly what was sent, completes the migration."""
    endpoint = rig.endpoint()
    listener = await endpoint.listen()
    try:
        fake = asyncio.ensure_future(fake_destination(listener, "honest"))
        report = await migrate_out(rig.src, await endpoint.connect(), OPTIONS)
        await fake
    finally:
        await listener.close()
    assert report.ok and report.confirmed and report.pages_sent > 0
    assert rig.src.device("blk0").run_state is RunState.STOPPED


# ---------------------------------------------------------------------- unix endpoints


@pytest.mark.parametrize("kind", ["regular file", "directory", "symbolic link"])
async def test_listener_never_replaces_what_is_not_a_socket(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "m.sock"
    target = tmp_path / "precious"
    target.write_text("keep me")
    if kind == "regular file":
        path.write_text("keep me too")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(target)
    with pytest.raises(StreamError, match=rf"unix:{path}: it exists and is not a socket \(a {kind}\); "
                                          "refusing to replace it"):
        await Endpoint.parse(f"unix:{path}").listen()
    assert os.path.lexists(path) and target.read_text() == "keep me"
    if kind == "regular file":
        assert path.read_text() == "keep me too"


async def test_listener_replaces_a_stale_socket_and_keeps_it_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "m.sock"
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    listener = await Endpoint.parse(f"unix:{path}").listen()
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        await listener.close()
    assert not path.exists()


async def test_listener_creates_a_private_directory(tmp_path: Path) -> None:
    base = tmp_path / "run"
    path = base / "mig" / "m.sock"
    old_umask = os.umask(0)
    try:
        listener = await Endpoint.parse(f"unix:{path}").listen()
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        for directory in (base, base / "mig"):
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    finally:
        await listener.close()
    assert not base.exists()


async def test_listener_refuses_a_peer_of_another_uid(tmp_path: Path) -> None:
    endpoint = Endpoint.parse(f"unix:{tmp_path / 'm.sock'}")
    listener = await endpoint.listen(peer_uid=12345)
    try:
        channel = await endpoint.connect()
        try:
            with pytest.raises(StreamError, match=rf"refused: pid {os.getpid()} uid {os.geteuid()}, "
                                                  r"and only uid 12345 is allowed"):
                await listener.accept(0.5)
            with pytest.raises(StreamError, match="truncated"):
                await channel.recv_exactly(1)
        finally:
            await channel.close()
    finally:
        await listener.close()


async def test_connect_refuses_a_listener_of_another_uid(tmp_path: Path) -> None:
    endpoint = Endpoint.parse(f"unix:{tmp_path / 'm.sock'}")
    listener = await endpoint.listen()
    try:
        with pytest.raises(StreamError, match=rf"listening process is pid {os.getpid()} uid {os.geteuid()}, "
                                              r"and only uid 12345 is allowed"):
            await endpoint.connect(peer_uid=12345)
        channel = await endpoint.connect()
        assert await listener.accept(1) is not None
        await channel.close()
    finally:
        await listener.close()


async def test_listener_takes_one_connection(tmp_path: Path) -> None:
    """Connections beyond the migration's one are closed, not queued without bound."""
    endpoint = Endpoint.parse(f"unix:{tmp_path / 'm.sock'}")
    listener = await endpoint.listen()
    try:
        first = await endpoint.connect()
        accepted = await listener.accept(1)
        extra = [await endpoint.connect() for _ in range(3)]
        for channel in extra:
            with pytest.raises(StreamError):
                async with asyncio.timeout(1):
                    await channel.recv_exactly(1)
            await channel.close()
        await accepted.close()
        await first.close()
    finally:
        await listener.close()


async def test_a_destination_that_stops_reading_cannot_keep_the_source_stopped(rig: Rig) -> None:
    """After READY the fake destination reads nothing more: the source's sends fill the socket
    buffer. Each send is bounded (MigrationOptions.send_timeout): the migration fails and the
    source resumes instead of staying stopped for good."""
    endpoint = rig.endpoint()
    listener = await endpoint.listen()
    stalled = asyncio.Event()

    async def stalling_destination() -> None:
        channel = await listener.accept(5)
        reader, writer = StreamReader(channel), StreamWriter(channel)
        await reader.start()
        await reader.expect(RecordType.HELLO)
        await writer.start()
        await writer.write_map(RecordType.READY, {"ok": True})
        await stalled.wait()
        await channel.close()

    try:
        fake = asyncio.ensure_future(stalling_destination())
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(MigrationError, match="stopped reading|did not answer in time"):
            await migrate_out(rig.src, await endpoint.connect(), dataclasses.replace(OPTIONS, send_timeout=0.3))
        assert asyncio.get_running_loop().time() - t0 < 10
        stalled.set()
        await fake
    finally:
        await listener.close()
    await assert_source_running(rig)
