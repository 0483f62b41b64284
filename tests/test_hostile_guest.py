"""A hostile guest and a hostile backend against the in-process devices.

Requests whose buffers add up to gigabytes (every descriptor pointing at the same 32 MiB of
guest memory), status buffers with no room for the status, chains past the queue size, and
a backend truncating the guest's memfds. The VMM must allocate nothing of the requests' size,
write nothing outside a chain, and keep serving.

Every hostile request runs under :func:`bounded_memory`: Python allocations are traced and
the address space may grow by 512 MiB at most, so code that tries to allocate a request's
gigabytes fails at once (MemoryError) instead of exhausting the machine.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import struct
import subprocess
import sys
import tracemalloc
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from helpers import wait_until, wait_value

from shadowvmm.backends.inproc import BLK_MAX_TRANSFER, RNG_REQUEST_MAX
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import RingError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.guest.driver import GuestDevice, GuestQueue
from shadowvmm.guest.rng import RngDriver
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.shadow import RunState
from shadowvmm.virtio.constants import BlkRequestType, BlkStatus, Status
from shadowvmm.virtio.devcfg import CTRL_ERR, CTRL_HEADER, CTRL_OK, CtrlClass
from shadowvmm.virtio.packed import PackedDeviceQueue, PackedDriverQueue, PackedLayout
from shadowvmm.virtio.split import (
    DESC,
    INDIRECT_MAX,
    DescChain,
    DescFlags,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
)
from shadowvmm.vmmqueue import NetControl, VmmQueue

MiB = 1 << 20
GUEST_BYTES = 64 * MiB
#: The top half of guest memory: no guest model allocates there, so nothing touched it.
HOSTILE = 32 * MiB
HOSTILE_GPA = GUEST_BYTES - HOSTILE
DISK_BYTES = 1 * MiB
HEADER = struct.Struct("<IIQ")
NEXT, WRITE, INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


# ---------------------------------------------------------------------------- guards


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def _guest_pages(memory: GuestMemory) -> int:
    """Bytes of guest memory that have pages (memfd blocks): what the VMM ever touched."""
    return sum(os.fstat(region.fd).st_blocks * 512 for region in memory)


@contextmanager
def bounded_memory(memory: GuestMemory, *, traced: int = 2 * MiB, touched: int = 0):
    """The block allocates under *traced* bytes (tracemalloc peak) and gives at most *touched*
    new bytes of guest memory pages; meanwhile the address space may grow by 512 MiB only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + 512 * MiB
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    pages = _guest_pages(memory)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert peak < traced, f"{peak} bytes allocated for one request"
    assert _guest_pages(memory) - pages <= touched


# ---------------------------------------------------------------------------- rigs


async def start_blk(tmp_path=None, *, queue_size: int = 256, packed: bool = False,
                    disk_bytes: int = DISK_BYTES):
    """Machine, device and BlkDriver over 2 queues of *queue_size* (the device's maximum too);
    the disk is a file in *tmp_path* (sparse) or an in-memory image."""
    machine = Machine(GUEST_BYTES)
    options = {"device": "blk", "queues": 2, "size": disk_bytes}
    if tmp_path is not None:
        options["image"] = str(tmp_path / "disk.img")
    device = await machine.add_device(DeviceConfig("blk0", "inproc", options, queue_size=queue_size))
    guest = machine.guest("blk0")
    driver = BlkDriver(guest, slots_per_queue=4)
    await driver.start(queue_size=queue_size, packed=packed)
    return machine, device, guest, driver


async def assert_serving(device, driver: BlkDriver, queue: int = 0) -> None:
    """The device is running and carries out a write, a read and a GET_ID on *queue*."""
    assert device.run_state is RunState.RUNNING and device.failure is None
    data = os.urandom(4096)
    await asyncio.wait_for(driver.write(16, data, queue), 2)
    assert await asyncio.wait_for(driver.read(16, 4096, queue), 2) == data
    assert await asyncio.wait_for(driver.get_id(queue), 2) == "shadowvmm-blk"


def blk_request(guest: GuestDevice, rtype: int, sector: int = 0, *,
                header_len: int = HEADER.size) -> tuple[int, int]:
    """A request header (padded to *header_len*) and a status byte preset to 0xFF."""
    header = guest.alloc.alloc(header_len, 16)
    status = guest.alloc.alloc(1, 1)
    guest.memory.write(header, HEADER.pack(rtype, 0, sector).ljust(header_len, b"\0"))
    guest.memory.write(status, b"\xff")
    return header, status


def indirect_table(guest: GuestDevice, entries: list[tuple[int, int, int]]) -> tuple[int, int]:
    """A split indirect table of *entries* ``(gpa, len, flags)`` chained in order: (gpa, len)."""
    table = guest.alloc.alloc(16 * len(entries), 16)
    last = len(entries) - 1
    guest.memory.write(table, b"".join(
        DESC.pack(gpa, length, flags | (NEXT if i < last else 0), i + 1 if i < last else 0)
        for i, (gpa, length, flags) in enumerate(entries)))
    return table, 16 * len(entries)


def post_indirect(guest: GuestDevice, queue: GuestQueue, table: tuple[int, int]) -> asyncio.Future:
    """Make one INDIRECT descriptor for *table* available and kick; returns its completion."""
    ring: SplitDriverQueue = queue.ring
    [head] = ring.reserve([table], [])
    ring.rewrite(head, *table, INDIRECT, 0)
    future = guest.loop.create_future()
    ring.post([head], [future])
    queue.kick()
    return future


# ---------------------------------------------------------------------------- virtio-blk bombs


@pytest.mark.parametrize("backing", ["memory", "file"])
@pytest.mark.parametrize("header_len", [16, 24])
async def test_blk_write_of_200_segments_of_32_mib(tmp_path, backing, header_len):
    """6.25 GiB of OUT data (200 direct descriptors) is refused with IOERR, unread."""
    machine, device, guest, driver = await start_blk(tmp_path if backing == "file" else None)
    try:
        queue = guest.queues[0]
        header, status = blk_request(guest, BlkRequestType.OUT, 0, header_len=header_len)
        with bounded_memory(machine.memory):
            future = queue.add([(header, header_len)] + [(HOSTILE_GPA, HOSTILE)] * 200, [(status, 1)])
            queue.kick()
            assert await asyncio.wait_for(future, 5) == 1
        assert guest.memory.read(status, 1)[0] == BlkStatus.IOERR
        assert await driver.read(0, 4096) == bytes(4096)
        await assert_serving(device, driver)
    finally:
        await machine.close()


@pytest.mark.parametrize("rtype", [BlkRequestType.IN, BlkRequestType.OUT])
async def test_blk_request_over_max_transfer(tmp_path, rtype):
    """512 bytes past BLK_MAX_TRANSFER, inside the disk, in 2 segments: IOERR, nothing moved."""
    machine, device, guest, driver = await start_blk(tmp_path, disk_bytes=2 * BLK_MAX_TRANSFER)
    try:
        queue = guest.queues[0]
        header, status = blk_request(guest, rtype)
        data = [(HOSTILE_GPA, HOSTILE), (HOSTILE_GPA, BLK_MAX_TRANSFER - HOSTILE + 512)]
        out, inp = ([(header, 16)], data + [(status, 1)]) if rtype == BlkRequestType.IN else \
            ([(header, 16)] + data, [(status, 1)])
        with bounded_memory(machine.memory):
            future = queue.add(out, inp)
            queue.kick()
            assert await asyncio.wait_for(future, 5) == 1
        assert guest.memory.read(status, 1)[0] == BlkStatus.IOERR
        assert os.stat(tmp_path / "disk.img").st_blocks * 512 < MiB
        await assert_serving(device, driver)
    finally:
        await machine.close()


@pytest.mark.parametrize("count,expected", [(126, BlkStatus.OK), (127, BlkStatus.IOERR)])
@pytest.mark.parametrize("rtype", [BlkRequestType.IN, BlkRequestType.OUT])
async def test_blk_seg_max(count, expected, rtype):
    """seg_max (126, advertised) data segments are served, one more is IOERR."""
    machine, device, guest, driver = await start_blk()
    try:
        assert driver.config is not None and driver.config.seg_max == 126
        queue = guest.queues[0]
        header, status = blk_request(guest, rtype, 8)
        buf = guest.alloc.alloc(512 * count, 512)
        payload = os.urandom(512 * count)
        if rtype == BlkRequestType.OUT:
            guest.memory.write(buf, payload)
            await driver.write(8, bytes(512 * count))
        else:
            await driver.write(8, payload)
        segments = [(buf + 512 * k, 512) for k in range(count)]
        out, inp = ([(header, 16)], segments + [(status, 1)]) if rtype == BlkRequestType.IN else \
            ([(header, 16)] + segments, [(status, 1)])
        future = queue.add(out, inp)
        queue.kick()
        written = await asyncio.wait_for(future, 2)
        assert guest.memory.read(status, 1)[0] == expected
        if rtype == BlkRequestType.IN:
            assert written == (512 * count + 1 if expected == BlkStatus.OK else 1)
            got = guest.memory.read(buf, 512 * count)
            assert got == (payload if expected == BlkStatus.OK else bytes(512 * count))
        else:
            disk = await driver.read(8, 512 * count)
            assert disk == (payload if expected == BlkStatus.OK else bytes(512 * count))
        await assert_serving(device, driver)
    finally:
        await machine.close()


async def test_blk_indirect_table_past_the_queue_size_breaks_the_ring_and_fails_the_device():
    """4,094 indirect data segments of 32 MiB on a 256-entry queue: a chain longer than
    INDIRECT_MAX is a broken ring (v1.4 §2.7.5.3.1), refused before any buffer is read. The
    device shows DEVICE_NEEDS_RESET (as QEMU's virtio_error does); another device keeps
    serving, and the guest's reset recovers this one."""
    machine, device, guest, driver = await start_blk()
    await machine.add_device(DeviceConfig("blk1", "inproc", {"device": "blk", "queues": 2}))
    other_driver = BlkDriver(machine.guest("blk1"))
    await other_driver.start(queue_size=64)
    try:
        header, status = blk_request(guest, BlkRequestType.OUT, header_len=24)
        table = indirect_table(guest, [(header, 24, 0)] + [(HOSTILE_GPA, HOSTILE, 0)] * 4094
                               + [(status, 1, WRITE)])
        with bounded_memory(machine.memory):
            future = post_indirect(guest, guest.queues[0], table)
            await wait_until(lambda: device.backend.broken_rings, timeout=0.5, interval=0.005,
                             what="the ring to be broken")
        assert device.backend.broken_rings == {0}
        assert not future.done() and guest.memory.read(status, 1) == b"\xff"
        assert device.run_state is RunState.FAILED and guest.status() & Status.NEEDS_RESET
        assert isinstance(device.failure, RingError)
        await other_driver.write(0, b"o" * 4096)
        assert await other_driver.read(0, 4096) == b"o" * 4096
        await driver.start(queue_size=64)
        await assert_serving(device, driver, queue=1)
    finally:
        await machine.close()


async def test_blk_indirect_4094_segments_on_a_4096_queue():
    """The same chain on a 4096-entry queue is a well-formed ring: the device's limits
    refuse it (IOERR) and the queue keeps serving."""
    machine, device, guest, driver = await start_blk(queue_size=4096)
    try:
        header, status = blk_request(guest, BlkRequestType.OUT, header_len=24)
        table = indirect_table(guest, [(header, 24, 0)] + [(HOSTILE_GPA, HOSTILE, 0)] * 4094
                               + [(status, 1, WRITE)])
        with bounded_memory(machine.memory):
            future = post_indirect(guest, guest.queues[0], table)
            assert await asyncio.wait_for(future, 5) == 1
        assert guest.memory.read(status, 1)[0] == BlkStatus.IOERR
        assert not device.backend.broken_rings
        await assert_serving(device, driver)
    finally:
        await machine.close()


async def test_blk_packed_indirect_bomb():
    """Packed ring: 1,000 indirect data segments of 32 MiB (under INDIRECT_MAX) get IOERR."""
    machine, device, guest, driver = await start_blk(packed=True)
    try:
        queue = guest.queues[0]
        header, status = blk_request(guest, BlkRequestType.OUT, header_len=24)
        table = guest.alloc.alloc(16 * 1002, 16)
        future = guest.loop.create_future()
        with bounded_memory(machine.memory):
            queue.ring.add([(header, 24)] + [(HOSTILE_GPA, HOSTILE)] * 1000, [(status, 1)], future,
                           indirect_table=table)
            queue.kick()
            assert await asyncio.wait_for(future, 5) == 1
        assert guest.memory.read(status, 1)[0] == BlkStatus.IOERR
        await assert_serving(device, driver)
    finally:
        await machine.close()


async def test_blk_read_streams_into_guest_memory_and_marks_it_dirty(tmp_path):
    """A multi-segment read lands in guest memory segment by segment, dirty-logged."""
    machine, _, guest, driver = await start_blk(tmp_path)
    try:
        payload = os.urandom(3 * 4096)
        await driver.write(24, payload)
        header, status = blk_request(guest, BlkRequestType.IN, 24)
        bufs = [guest.alloc.alloc(4096, 4096) for _ in range(3)]
        log = machine.memory.enable_dirty_log()
        log.take()
        future = guest.queues[0].add([(header, 16)], [(gpa, 4096) for gpa in reversed(bufs)]
                                     + [(status, 1)])
        guest.queues[0].kick()
        assert await asyncio.wait_for(future, 2) == 3 * 4096 + 1
        assert b"".join(guest.memory.read(gpa, 4096) for gpa in reversed(bufs)) == payload
        assert {gpa >> 12 for gpa in bufs} <= set(log.take())
        machine.memory.disable_dirty_log()
    finally:
        await machine.close()


# ---------------------------------------------------------------------------- status byte


@pytest.mark.parametrize("layout", ["out-empty-status", "get-id-empty-status", "no-writable"])
async def test_blk_request_without_room_for_its_status(layout):
    """Used with 0 bytes written and not carried out; nothing in or next to the chain is
    written; the queue keeps serving."""
    machine, device, guest, driver = await start_blk()
    try:
        mem = guest.memory
        queue = guest.queues[0]
        pad = guest.alloc.alloc(16, 16)
        mem.write(pad, bytes(range(0xA0, 0xB0)))
        data = guest.alloc.alloc(512, 512)
        mem.write(data, b"\x5a" * 512)
        if layout == "get-id-empty-status":
            header, _ = blk_request(guest, BlkRequestType.GET_ID)
            out, inp = [(header, 16)], [(data, 20), (pad + 8, 0)]
        else:
            header, _ = blk_request(guest, BlkRequestType.OUT, 2)
            out = [(header, 16), (data, 512)]
            inp = [(pad + 8, 0)] if layout == "out-empty-status" else []
        future = queue.add(out, inp)
        queue.kick()
        assert await asyncio.wait_for(future, 2) == 0
        assert mem.read(pad, 16) == bytes(range(0xA0, 0xB0))
        assert mem.read(data, 512) == b"\x5a" * 512
        assert await driver.read(2, 512) == bytes(512)
        assert not device.backend.broken_rings
        await assert_serving(device, driver)
    finally:
        await machine.close()


# ---------------------------------------------------------------------------- virtio-rng


async def test_rng_request_of_251_buffers_of_32_mib():
    """8 GiB of writable buffers get RNG_REQUEST_MAX bytes, reported as such."""
    machine = Machine(GUEST_BYTES)
    try:
        device = await machine.add_device(DeviceConfig("rng0", "inproc", {"device": "rng"},
                                                       transport="mmio"))
        guest = machine.guest("rng0")
        driver = RngDriver(guest)
        await driver.start(queue_size=256)
        queue = guest.queues[0]
        with bounded_memory(machine.memory, touched=RNG_REQUEST_MAX):
            future = queue.add([], [(HOSTILE_GPA, HOSTILE)] * 251)
            queue.kick()
            assert await asyncio.wait_for(future, 5) == RNG_REQUEST_MAX
        assert guest.memory.read(HOSTILE_GPA, RNG_REQUEST_MAX) != bytes(RNG_REQUEST_MAX)
        assert guest.memory.read(HOSTILE_GPA + RNG_REQUEST_MAX, 4096) == bytes(4096)
        assert len(await asyncio.wait_for(driver.read(4096), 2)) == 4096
        assert device.run_state is RunState.RUNNING and not device.backend.broken_rings
    finally:
        await machine.close()


# ---------------------------------------------------------------------------- VMM-served queue


class _StubDevice:
    """What VmmQueue needs of a device: one split queue on *memory*, a call eventfd."""

    def __init__(self, memory: GuestMemory, layout: SplitLayout) -> None:
        self.memory = memory
        self.name = "net0"
        self.driver_features = 0
        self.queues = [SimpleNamespace(size=layout.size, desc=layout.desc, driver=layout.avail,
                                       device=layout.used)]
        self.config = bytearray(6)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def call_fd(self, index: int) -> int:
        return self.call


async def test_vmm_control_queue_bomb_and_empty_ack():
    memory = GuestMemory.create([(0, GUEST_BYTES)], name="ctrl")
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    layout = SplitLayout(256, 0x1000, 0x3000, 0x4000)
    stub = _StubDevice(memory, layout)
    control = NetControl(stub, 1)
    vmmq = VmmQueue(stub, 0, control)
    try:
        driver = SplitDriverQueue(memory, layout)
        vmmq.start(kick, 0)
        header, ack = 0x10000, 0x10010
        memory.write(header, CTRL_HEADER.pack(CtrlClass.RX, 0))

        async def request(out, inp) -> int:
            memory.write(ack, b"\xff")
            driver.add(out, inp, "t")
            driver.publish()
            os.eventfd_write(kick, 1)
            used = await wait_value(driver.get_used, bool, timeout=1, interval=0.005, what="the control request used")
            return used[0][1]

        with bounded_memory(memory):
            assert await request([(header, 2)] + [(HOSTILE_GPA, HOSTILE)] * 200, [(ack, 1)]) == 1
        assert memory.read(ack, 1)[0] == CTRL_ERR and control.commands == []
        assert await request([(header, 2)], [(ack, 0)]) == 0
        assert memory.read(ack, 1) == b"\xff" and control.commands == []
        assert await request([(header, 2)], [(ack, 1)]) == 1
        assert memory.read(ack, 1)[0] == CTRL_OK and control.commands == [(CtrlClass.RX, 0)]
    finally:
        vmmq.stop()
        os.close(kick)
        os.close(stub.call)
        memory.close()


# ---------------------------------------------------------------------------- ring walkers


@pytest.fixture
def mem():
    memory = GuestMemory.create([(0, GUEST_BYTES)], name="walk")
    yield memory
    memory.close()


def test_split_chain_counts_indirect_buffers_after_direct_ones(mem):
    """Direct buffers plus an indirect table past INDIRECT_MAX: refused, not walked."""
    layout = SplitLayout(8, 0x1000, 0x2000, 0x3000)
    SplitDriverQueue(mem, layout)
    table = 0x10000
    last = INDIRECT_MAX - 1
    mem.write(table, b"".join(DESC.pack(HOSTILE_GPA, HOSTILE, NEXT if i < last else 0, i + 1)
                              for i in range(INDIRECT_MAX)))
    mem.write(layout.desc, DESC.pack(HOSTILE_GPA, HOSTILE, NEXT, 1)
              + DESC.pack(table, 16 * INDIRECT_MAX, INDIRECT, 0))
    mem.store_u16(layout.avail + 4, 0)
    mem.store_u16(layout.avail + 2, 1)
    with pytest.raises(RingError, match="longer than 1024 buffers"):
        SplitDeviceQueue(mem, layout).pop()
    mem.write(layout.desc, DESC.pack(table, 16 * INDIRECT_MAX, INDIRECT, 0))
    chain = SplitDeviceQueue(mem, layout).pop()       # the table alone fits
    assert chain is not None and len(chain.readable) == INDIRECT_MAX
    assert chain.readable_len == INDIRECT_MAX * HOSTILE


def test_packed_indirect_table_past_the_limit(mem):
    layout = PackedLayout(8, 0x1000, 0x2000, 0x2010)
    driver = PackedDriverQueue(mem, layout)
    table = 0x10000
    driver.add([(HOSTILE_GPA, HOSTILE)] * (INDIRECT_MAX + 1), [], "t", indirect_table=table)
    with pytest.raises(RingError, match="longer than 1024"):
        PackedDeviceQueue(mem, layout).pop()


def test_chain_segments_and_bounded_read(mem):
    chain = DescChain(0, [(0x100, 4), (0x200, 0), (0x300, 8)], [(0x400, 2), (0x500, 6)])
    mem.write(0x100, b"abcd")
    mem.write(0x300, b"efghijkl")
    assert chain.read(mem, 6) == b"abcdef"
    assert chain.read(mem) == b"abcdefghijkl"
    assert chain.segments(False, 3) == [(0x103, 1), (0x300, 8)]
    assert chain.segments(True, 1, 4) == [(0x401, 1), (0x500, 3)]
    assert chain.segments(True, 8) == []
    assert (chain.readable_len, chain.writable_len) == (12, 8)


# ---------------------------------------------------------------------------- sealed memfds


_TRUNCATE = """
import os, sys
fd, size = int(sys.argv[1]), int(sys.argv[2])
try:
    os.ftruncate(fd, 0)
except PermissionError:
    print("EPERM")
else:
    os.ftruncate(fd, size)      # do not leave the parent to SIGBUS on the old code
    print("TRUNCATED")
"""


def _assert_sealed(fd: int, size: int) -> None:
    """F_GET_SEALS shows grow/shrink/seal, and neither this process (a dup) nor a child
    (a backend given the fd) can change the size."""
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    dup = os.dup(fd)
    try:
        for new in (0, size // 2, size * 2):
            try:
                os.ftruncate(dup, new)
            except PermissionError:
                continue
            os.ftruncate(dup, size)
            raise AssertionError(f"ftruncate to {new} of a guest memfd succeeded")
        with pytest.raises(PermissionError):
            fcntl.fcntl(dup, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        os.close(dup)
    child = subprocess.run([sys.executable, "-c", _TRUNCATE, str(fd), str(size)], pass_fds=[fd],
                           capture_output=True, text=True, timeout=30, check=True)
    assert child.stdout.strip() == "EPERM"
    assert os.fstat(fd).st_size == size


async def test_guest_and_dirty_log_memfds_cannot_be_truncated():
    """Guest RAM and the dirty log are sealed against a backend's ftruncate (EPERM), so the
    VMM cannot be made to SIGBUS; the device keeps serving."""
    machine, device, _, driver = await start_blk()
    try:
        await driver.write(0, b"\x11" * 4096)
        for region in machine.memory:
            _assert_sealed(region.fd, region.size)
        log = machine.memory.enable_dirty_log()
        _assert_sealed(log.fd, os.fstat(log.fd).st_size)
        await driver.write(8, b"\x22" * 4096)
        assert log.take()
        machine.memory.disable_dirty_log()
        assert await driver.read(0, 4096) == b"\x11" * 4096
        await assert_serving(device, driver)
    finally:
        await machine.close()
