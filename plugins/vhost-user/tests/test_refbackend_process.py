"""The reference vhost-user-blk back-end: latency, ring enable, GET_VRING_BASE drain, inflight resubmission.

Driven at the protocol level by a tiny front-end (one memfd of guest memory,
one split ring) through :class:`Connection`; the headline kills the back-end
process with requests in flight, restarts it and checks that the inflight
region (vhost-user.rst "Inflight I/O tracking") makes every request complete
exactly once.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shadowvmm.memory import GuestMemory
from shadowvmm.testing.peers import RefBlk
from shadowvmm.virtio.constants import BlkRequestType, BlkStatus, Feature
from shadowvmm.virtio.split import USED_ELEM, SplitDriverQueue, SplitLayout
from shadowvmm_vhost_user import protocol as vu
from shadowvmm_vhost_user.connection import Connection, Runstate, unix_connector
from shadowvmm_vhost_user.refbackend import (
    INFLIGHT_DESC,
    INFLIGHT_HEADER,
    InflightQueue,
    RefBlkServer,
    inflight_queue_bytes,
)

FR = vu.FrontendRequest
PF = vu.ProtocolFeature

QUEUE_SIZE = 64              #: 3 descriptors per request: up to 21 requests without reusing one
SECTOR = 512
IMAGE_SIZE = 4 << 20
MEMORY_SIZE = 1 << 20
LAYOUT = SplitLayout(QUEUE_SIZE, 0x1000, 0x2000, 0x3000)
BUFFERS = 0x10000            #: request i: header at +0, status at +16, data at +512 (one 4 KiB slot each)
BLK_HEADER = struct.Struct("<IIQ")
WANTED_PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.CONFIG | PF.INFLIGHT_SHMFD
LATENCY_US = 300_000


@dataclass
class Front:
    """The front-end: guest memory, ring 0 as a driver fills it, kick/call eventfds, the inflight fd."""

    memory: GuestMemory
    driver: SplitDriverQueue
    kick: int = field(default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
    call: int = field(default_factory=lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
    inflight_fd: int = -1
    inflight_size: int = 0
    heads: dict[int, int] = field(default_factory=dict)     #: token -> head descriptor

    @classmethod
    def create(cls) -> Front:
        memory = GuestMemory.create([(0, MEMORY_SIZE)])
        return cls(memory, SplitDriverQueue(memory, LAYOUT))

    def close(self) -> None:
        for fd in (self.kick, self.call, self.inflight_fd):
            if fd >= 0:
                os.close(fd)
        self.memory.close()

    def uaddr(self, gpa: int) -> int:
        region, offset = self.memory.translate(gpa, 1)
        return region.host_addr + offset

    async def connect(self, path: Path, *, base: int = 0, enable: bool = True,
                      keep_inflight: bool = False) -> Connection:
        """QEMU's start order (vhost-user-blk): features, inflight, memory, ring 0."""
        conn = Connection(unix_connector(path), timeout=5.0, name="front")
        await conn.connect()
        offered = (await conn.request(FR.GET_FEATURES)).payload.value
        assert offered & Feature.VERSION_1 and offered & vu.F_PROTOCOL_FEATURES
        await conn.request(FR.SET_FEATURES, vu.U64(int(Feature.VERSION_1) | vu.F_PROTOCOL_FEATURES))
        protocol = (await conn.request(FR.GET_PROTOCOL_FEATURES)).payload.value
        await conn.request(FR.SET_PROTOCOL_FEATURES, vu.U64(protocol & int(WANTED_PROTOCOL)))
        await conn.request(FR.SET_OWNER)
        if not keep_inflight:
            reply = await conn.request(FR.GET_INFLIGHT_FD, vu.Inflight(0, 0, 1, QUEUE_SIZE))
            assert reply.payload.mmap_size == inflight_queue_bytes(QUEUE_SIZE) and len(reply.fds) == 1
            if self.inflight_fd >= 0:
                os.close(self.inflight_fd)
            self.inflight_fd, self.inflight_size = reply.fds[0], reply.payload.mmap_size
        await conn.request(FR.SET_INFLIGHT_FD, vu.Inflight(self.inflight_size, 0, 1, QUEUE_SIZE),
                           [self.inflight_fd])
        region = self.memory.regions[0]
        table = vu.MemoryTable((vu.MemRegion(region.gpa, region.size, region.host_addr, 0),))
        await conn.request(FR.SET_MEM_TABLE, table, [region.fd])
        await conn.request(FR.SET_VRING_NUM, vu.VringState(0, QUEUE_SIZE))
        await conn.request(FR.SET_VRING_BASE, vu.VringState(0, base))
        await conn.request(FR.SET_VRING_ADDR, vu.VringAddr(0, 0, self.uaddr(LAYOUT.desc), self.uaddr(LAYOUT.used),
                                                           self.uaddr(LAYOUT.avail), 0))
        await conn.request(FR.SET_VRING_KICK, vu.VringFile(0), [self.kick])
        await conn.request(FR.SET_VRING_CALL, vu.VringFile(0), [self.call])
        if enable:
            await conn.request(FR.SET_VRING_ENABLE, vu.VringState(0, 1))
        return conn

    def slot(self, token: int) -> int:
        return BUFFERS + 0x1000 * token

    def write(self, token: int, sector: int) -> None:
        """Add a WRITE of one sector (content :func:`pattern`) under *token*; not yet published."""
        hdr = self.slot(token)
        self.memory.write(hdr, BLK_HEADER.pack(BlkRequestType.OUT, 0, sector))
        self.memory.write(hdr + 16, b"\xff")
        self.memory.write(hdr + SECTOR, pattern(token))
        self.heads[token] = self.driver.add([(hdr, BLK_HEADER.size), (hdr + SECTOR, SECTOR)], [(hdr + 16, 1)], token)

    def publish(self, kick: bool = True) -> None:
        self.driver.publish()
        if kick:
            os.eventfd_write(self.kick, 1)

    def flush(self, token: int) -> None:
        """Add a FLUSH under *token*; not yet published."""
        hdr = self.slot(token)
        self.memory.write(hdr, BLK_HEADER.pack(BlkRequestType.FLUSH, 0, 0))
        self.memory.write(hdr + 16, b"\xff")
        self.heads[token] = self.driver.add([(hdr, BLK_HEADER.size)], [(hdr + 16, 1)], token)

    def status(self, token: int) -> int:
        return self.memory.read(self.slot(token) + 16, 1)[0]

    def used_idx(self) -> int:
        return self.memory.load_u16(LAYOUT.used + 2)

    def used_heads(self, first: int, count: int) -> list[int]:
        """Heads of used entries *first* .. *first + count - 1*, in ring order."""
        return [USED_ELEM.unpack(self.memory.read(LAYOUT.used + 4 + 8 * ((first + i) % QUEUE_SIZE), 8))[0]
                for i in range(count)]

    async def wait_used(self, idx: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.used_idx() != idx:
            if time.monotonic() > deadline:
                raise AssertionError(f"used idx {self.used_idx()}, expected {idx}")
            await asyncio.sleep(0.002)

    def inflight(self) -> tuple[mmap.mmap, InflightQueue]:
        buf = mmap.mmap(self.inflight_fd, self.inflight_size, mmap.MAP_SHARED)
        return buf, InflightQueue(buf, 0, QUEUE_SIZE)

    def inflight_heads(self) -> list[int]:
        buf, queue = self.inflight()
        try:
            return queue.pending()
        finally:
            buf.close()


def pattern(token: int) -> bytes:
    return bytes([token + 1]) * SECTOR


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def front() -> Iterator[Front]:
    f = Front.create()
    yield f
    f.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


async def server(tmp_path: Path, image: Path, latency_us: int = 0) -> RefBlkServer:
    return await RefBlkServer(str(tmp_path / "ref.sock"), queues=1, size=IMAGE_SIZE, image=str(image),
                              latency_us=latency_us).start()


@pytest.fixture
async def slow(tmp_path: Path, image: Path) -> AsyncIterator[RefBlkServer]:
    srv = await server(tmp_path, image, LATENCY_US)
    yield srv
    await srv.close()


def image_sector(image: Path, sector: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(SECTOR)


# ---------------------------------------------------------------------- in process


async def test_latency_keeps_requests_in_flight(slow: RefBlkServer, front: Front) -> None:
    conn = await front.connect(Path(slow.path))
    try:
        for token in range(4):
            front.write(token, token)
        start = time.monotonic()
        front.publish()
        await until(lambda: slow.delayed() == 4)
        assert front.used_idx() == 0 and slow.inflight_pending() == 4
        assert sorted(front.inflight_heads()) == sorted(front.heads.values())
        await front.wait_used(4)
        assert time.monotonic() - start >= LATENCY_US / 1e6 * 0.9
        assert slow.inflight_pending() == 0 and front.inflight_heads() == []
        assert sorted(token for token, _ in front.driver.get_used()) == [0, 1, 2, 3]
        assert all(front.status(token) == BlkStatus.OK for token in range(4))
        assert eventfd_count(front.call) >= 1
    finally:
        await conn.disconnect()


async def test_pipelined_messages_keep_their_own_fds(tmp_path: Path, image: Path) -> None:
    """A front-end that does not wait for acks writes messages back to back: an fd-less
    SET_VRING_NUM then SET_VRING_CALL with its eventfd arrive in one read, and the fd must
    go to SET_VRING_CALL (the server once gave every fd of a read to its first message)."""
    srv = await server(tmp_path, image)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        await loop.sock_connect(sock, srv.path)
        header = vu.Header.STRUCT
        sock.sendmsg([header.pack(FR.SET_VRING_NUM, vu.VERSION, 8) + vu.VringState(0, QUEUE_SIZE).pack()])
        sock.sendmsg([header.pack(FR.SET_VRING_CALL, vu.VERSION, 8) + vu.VringFile(0).pack()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", call))])
        sock.sendmsg([header.pack(FR.GET_FEATURES, vu.VERSION, 0)])
        async with asyncio.timeout(2.0):
            reply = await loop.sock_recv(sock, header.size + 8)
        assert header.unpack_from(reply)[0] == FR.GET_FEATURES
        assert srv.last_error == ""
        assert srv.received == [FR.SET_VRING_NUM, FR.SET_VRING_CALL, FR.GET_FEATURES]
        session = srv._session
        assert session is not None and session.rings[0].call >= 0 and session.rings[0].num == QUEUE_SIZE
    finally:
        os.close(call)
        sock.close()
        await srv.close()


async def test_kick_before_enable_is_served_on_enable(tmp_path: Path, image: Path, front: Front) -> None:
    srv = await server(tmp_path, image)
    conn = await front.connect(Path(srv.path), enable=False)
    try:
        front.write(0, 7)
        front.publish()
        await asyncio.sleep(0.05)
        assert front.used_idx() == 0 and srv.requests == 0, "a started but disabled ring was processed"
        await conn.request(FR.SET_VRING_ENABLE, vu.VringState(0, 1))
        await front.wait_used(1, timeout=1.0)
        assert front.status(0) == BlkStatus.OK and image_sector(image, 7) == pattern(0)
    finally:
        await conn.disconnect()
        await srv.close()


async def test_get_vring_base_waits_for_delayed_completions(slow: RefBlkServer, front: Front) -> None:
    conn = await front.connect(Path(slow.path))
    try:
        for token in range(3):
            front.write(token, 10 + token)
        front.publish()
        await until(lambda: slow.delayed() == 3)
        eventfd_count(front.call)
        start = time.monotonic()
        reply = await conn.request(FR.GET_VRING_BASE, vu.VringState(0, 0))
        waited = time.monotonic() - start
        assert front.used_idx() == 3, "GET_VRING_BASE answered before the popped requests were used"
        assert reply.payload.num == 3
        assert eventfd_count(front.call) >= 1, "no call for the drained completions"
        assert 0.1 < waited < LATENCY_US / 1e6 + 1.0
        assert all(front.status(token) == BlkStatus.OK for token in range(3))
        assert slow.inflight_pending() == 0
    finally:
        await conn.disconnect()


async def test_torn_completion_is_repaired_and_inflight_resubmitted_by_counter(
        tmp_path: Path, image: Path, front: Front) -> None:
    """A back-end that died between publishing a used entry and clearing its inflight flag.

    Heads 0..2 were fetched (counters 12, 10, 11); head 0 was used (used idx 1) but
    its flag is still set and the region's used_idx is still 0. The new back-end
    must clear head 0 (``last_batch_head``), resubmit heads 1 then 2 (counter
    order) and carry on with the avail ring after them, whatever SET_VRING_BASE says.
    """
    srv = await server(tmp_path, image)
    try:
        conn = await front.connect(Path(srv.path), enable=False)
        await conn.disconnect()
        await until(lambda: not srv.serving)
        for token in range(3):
            front.write(token, 20 + token)
        heads = [front.heads[token] for token in range(3)]
        front.publish(kick=False)
        buf = mmap.mmap(front.inflight_fd, front.inflight_size, mmap.MAP_SHARED)
        INFLIGHT_HEADER.pack_into(buf, 0, 0, 1, QUEUE_SIZE, heads[0], 0)
        for head, counter in zip(heads, (12, 10, 11)):
            INFLIGHT_DESC.pack_into(buf, INFLIGHT_HEADER.size + INFLIGHT_DESC.size * head, 1, 0, counter)
        front.memory.write(LAYOUT.used + 4, USED_ELEM.pack(heads[0], 0))
        front.memory.store_u16(LAYOUT.used + 2, 1)
        front.write(3, 23)
        front.publish(kick=False)

        conn = await front.connect(Path(srv.path), base=0, keep_inflight=True)
        await front.wait_used(4, timeout=1.0)
        assert srv.resubmitted == 2
        assert front.used_heads(1, 3) == [heads[1], heads[2], front.heads[3]]
        assert sorted(token for token, _ in front.driver.get_used()) == [0, 1, 2, 3]
        assert INFLIGHT_HEADER.unpack_from(buf, 0)[4] == 4 and InflightQueue(buf, 0, QUEUE_SIZE).pending() == []
        buf.close()
        reply = await conn.request(FR.GET_VRING_BASE, vu.VringState(0, 0))
        assert reply.payload.num == 4
        await conn.disconnect()
    finally:
        await srv.close()


# ---------------------------------------------------------------------- as a process


@pytest.fixture
def refblk(tmp_path: Path) -> Iterator[RefBlk]:
    peer = RefBlk(tmp_path, size=IMAGE_SIZE, queues=1, latency_us=LATENCY_US, latency_data_only=True)
    with peer:
        yield peer


async def test_kill_9_mid_io_then_restart_completes_every_request_once(refblk: RefBlk, front: Front) -> None:
    """Writes 8..15 are in flight and FLUSH 16, behind them, was used first: the used
    index (9) no longer tells where to resume. Popping again from SET_VRING_BASE = 9
    would lose write 8 and use the flush twice; the inflight region resubmits 8..15."""
    conn = await front.connect(refblk.socket_path)
    first, second, flush, after = range(0, 8), range(8, 16), 16, range(17, 21)
    for token in first:
        front.write(token, token)
    front.publish()
    await front.wait_used(len(first))
    for token in second:
        front.write(token, token)
    front.flush(flush)
    front.publish()
    await until(lambda: front.used_idx() == len(first) + 1 and len(front.inflight_heads()) == len(second))
    assert front.used_heads(len(first), 1) == [front.heads[flush]]

    assert refblk.kill() == -9
    await until(lambda: conn.runstate is Runstate.DISCONNECTED)
    in_flight = front.inflight_heads()
    assert in_flight == [front.heads[token] for token in second], "the region must hold the unused heads, by counter"
    assert all(image_sector(refblk.image, token) == bytes(SECTOR) for token in second)

    for token in after:
        front.write(token, token)
    front.publish(kick=False)
    refblk.restart()
    resume = front.used_idx()
    conn = await front.connect(refblk.socket_path, base=resume, keep_inflight=True)
    try:
        total = after[-1] + 1
        await front.wait_used(total, timeout=LATENCY_US / 1e6 * 4 + 5)
        assert front.used_heads(resume, len(second)) == in_flight, "resubmitted out of counter order"
        assert front.used_heads(resume + len(second), len(after)) == [front.heads[token] for token in after]
        done = [token for token, _ in front.driver.get_used()]
        assert sorted(done) == list(range(total)), "a request was lost or used twice"
        assert front.driver.in_flight == 0
        await asyncio.sleep(LATENCY_US / 1e6 * 1.5)
        assert front.used_idx() == total, "a request was used twice"
        assert front.inflight_heads() == []
        assert all(front.status(token) == BlkStatus.OK for token in range(total))
        for token in [*first, *second, *after]:
            assert image_sector(refblk.image, token) == pattern(token)
        reply = await conn.request(FR.GET_VRING_BASE, vu.VringState(0, 0))
        assert reply.payload.num == total
    finally:
        await conn.disconnect()


async def test_sigusr1_drops_the_session_and_serves_the_next(refblk: RefBlk) -> None:
    conn = Connection(unix_connector(refblk.socket_path), timeout=5.0, name="first")
    await conn.connect()
    assert (await conn.request(FR.GET_FEATURES)).payload.value & vu.F_PROTOCOL_FEATURES
    refblk.drop_session()
    await until(lambda: conn.runstate is Runstate.DISCONNECTED, timeout=2.0)
    assert refblk.running
    again = Connection(unix_connector(refblk.socket_path), timeout=5.0, name="second")
    await again.connect()
    try:
        assert (await again.request(FR.GET_FEATURES)).payload.value & vu.F_PROTOCOL_FEATURES
    finally:
        await again.disconnect()
