"""Guest workloads of the conformance kit: one per device type, on the guest driver models.

A workload initialises its device (DRIVER_OK), runs a verified I/O round trip
on a queue, and counts the buffers it made available per queue, so a stopped
ring's base (vhost GET_VRING_BASE: the next avail index, split rings) can be
checked exactly. :meth:`Workload.write_probe` has the device write one whole
guest page the guest itself never touches, for the dirty-log step.

virtio-blk writes a block and reads it back; virtio-net sends a batch of frames
and counts them back, payloads compared (an echoing peer: testpmd's io
forwarding, vdpa_sim_net); virtio-fs sends FUSE_INIT at start and writes a file,
then reads it back (FsDriver); virtio-rng checks the entropy is not all zero.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import secrets
import struct
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from ...errors import ArgumentError
from ...guest import fuse
from ...guest.blk import BlkDriver
from ...guest.driver import GuestDevice
from ...guest.fs import FIRST_REQUEST_QUEUE, FsDriver
from ...guest.net import NET_HDR_SIZE
from ...guest.rng import RngDriver
from ...memory import PAGE_SHIFT, PAGE_SIZE
from ...virtio.constants import BLK_SECTOR_SIZE, BlkRequestType, BlkStatus, DeviceId, NetFeature
from ...virtio.split import SplitDriverQueue

__all__ = ["DEVICE_TYPES", "BlkWorkload", "FsWorkload", "NetWorkload", "RngWorkload", "Workload",
           "WorkloadOptions", "device_id_of", "io_unavailable", "workload_for"]

T = TypeVar("T")
BLK_HEADER = struct.Struct("<IIQ")          #: virtio_blk_req header (v1.4 §5.2.6)
NET_HDR_V1 = NET_HDR_SIZE                   #: struct virtio_net_hdr_v1 (v1.4 §5.1.6)
BLOCK = 4096
NET_NO_ECHO = "virtio-net I/O needs a peer that sends frames back (net_echo=True)"
#: Blocks the round trips cycle through (the first 1 MiB of a disk).
BLK_SPAN = 256


@dataclass(frozen=True)
class WorkloadOptions:
    packed: bool = False
    queue_size: int = 64
    #: virtio-net: the peer sends every frame back (a loopback such as vdpa_sim_net or testpmd io
    #: forwarding); without it virtio-net has no verifiable I/O and the I/O steps are skipped.
    net_echo: bool = False
    timeout: float = 10.0
    #: Feature bits the guest asks for beyond the workload's own (VIRTIO_F_RING_RESET for queue-reset).
    extra_features: int = 0


async def _within(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """*awaitable*'s result; AssertionError naming *what* when it takes longer than *seconds*."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"{what}: no completion within {seconds} s") from None


def _pattern(tag: int, length: int) -> bytes:
    head = struct.pack("<QQ", 0x5348414457564D4D, tag)      # "SHADWVMM" + the tag
    return (head + bytes((tag + i) & 0xFF for i in range(240))) * (length // 256)


class Workload:
    """What every device type's workload offers (the base: init only, no verified I/O)."""

    device_id: DeviceId
    #: Without a verified round trip the I/O steps are skipped, with this reason.
    no_io: str | None = None
    #: Requests written before a guest reset are still readable after it (a disk).
    keeps_data = False
    #: Queues the basic rig has.
    base_queues = 1
    #: :meth:`round_trip` runs on any queue (else on the first ones only).
    any_queue = False
    #: What :meth:`round_trip` stored outlives the session (a disk image, read again after a reconnect).
    durable = False
    #: The queue the queue-reset step resets.
    reset_index = 0

    def __init__(self, guest: GuestDevice, options: WorkloadOptions) -> None:
        self.guest = guest
        self.options = options
        #: Buffers made available per queue since the last start.
        self.made_available: Counter[int] = Counter()

    async def start(self, num_queues: int | None = None) -> int:
        """Reset, initialise, DRIVER_OK; the negotiated features."""
        self.made_available.clear()
        return await self.guest.initialize(self.options.extra_features, packed=self.options.packed,
                                           queue_size=self.options.queue_size,
                                           num_queues=num_queues or self.base_queues)

    async def round_trip(self, tag: int, queue: int = 0) -> None:
        """One verified exchange on *queue*; AssertionError when the data is wrong."""
        raise AssertionError(self.no_io or "no I/O")

    def tally(self) -> str:
        """What the round trips so far moved, for a step's detail ("" when nothing to add)."""
        return ""

    async def in_flight_trip(self, tag: int) -> None:
        """:meth:`round_trip` left running across a stop; what the device type may lose there
        (a network drops frames) is not held against it."""
        await self.round_trip(tag)

    def available(self, queue: int) -> int:
        """Buffers made available on *queue* since the last start (what a quiet stop's base is)."""
        return self.made_available[queue]

    def most_taken(self, queue: int) -> int:
        """The most buffers the device can have taken from *queue* since the last start (a
        stop's base with requests in flight is at most this)."""
        return self.available(queue)

    async def cleanup(self) -> None:
        """Remove what the round trips left on the device's medium, when that is not a scratch disk."""

    async def verify(self, tag: int, queue: int = 0) -> None:
        """What :meth:`round_trip` *tag* stored is still there (only with :attr:`keeps_data`)."""

    async def write_probe(self) -> int:
        """Have the device write one whole page; its page number."""
        raise AssertionError(self.no_io or "no I/O")

    def _page(self) -> int:
        return self.guest.alloc.alloc(PAGE_SIZE, PAGE_SIZE)

    async def _request(self, queue: int, out: list[tuple[int, int]], inp: list[tuple[int, int]]) -> int:
        self.made_available[queue] += 1
        return await _within(self.guest.queue(queue).request(out, inp), self.options.timeout,
                             f"{self.device_id.name} request on queue {queue}")


class BlkWorkload(Workload):
    """virtio-blk: write a block, read it back (BlkDriver)."""

    device_id = DeviceId.BLOCK
    keeps_data = True
    any_queue = True
    durable = True

    def __init__(self, guest: GuestDevice, options: WorkloadOptions) -> None:
        super().__init__(guest, options)
        self.driver = BlkDriver(guest, max_request=BLOCK, slots_per_queue=8)

    async def start(self, num_queues: int | None = None) -> int:
        self.made_available.clear()
        return await self.driver.start(packed=self.options.packed, queue_size=self.options.queue_size,
                                       num_queues=num_queues or self.base_queues,
                                       extra_features=self.options.extra_features)

    def _sector(self, tag: int) -> int:
        capacity = self.driver.capacity_bytes // BLOCK
        if capacity < 1:
            raise AssertionError(f"virtio-blk capacity {self.driver.capacity_bytes} bytes: not one block")
        return (tag % min(BLK_SPAN, capacity)) * (BLOCK // BLK_SECTOR_SIZE)

    async def round_trip(self, tag: int, queue: int = 0) -> None:
        data = _pattern(tag, BLOCK)
        self.made_available[queue] += 1
        await _within(self.driver.write(self._sector(tag), data, queue), self.options.timeout,
                      f"write of block {tag} on queue {queue}")
        await self.verify(tag, queue)

    async def verify(self, tag: int, queue: int = 0) -> None:
        self.made_available[queue] += 1
        got = await _within(self.driver.read(self._sector(tag), BLOCK, queue), self.options.timeout,
                            f"read of block {tag} on queue {queue}")
        if got != _pattern(tag, BLOCK):
            raise AssertionError(f"block {tag} read back on queue {queue} differs from what was written")

    async def write_probe(self) -> int:
        meta, page = self.guest.alloc.alloc(32, 16), self._page()
        self.guest.memory.write(meta, BLK_HEADER.pack(BlkRequestType.IN, 0, 0) + b"\xff")
        await self._request(0, [(meta, BLK_HEADER.size)], [(page, PAGE_SIZE), (meta + BLK_HEADER.size, 1)])
        status = self.guest.memory.read(meta + BLK_HEADER.size, 1)[0]
        if status != BlkStatus.OK:
            raise AssertionError(f"virtio-blk read of sector 0 completed with status {status}")
        return page >> PAGE_SHIFT


class RngWorkload(Workload):
    """virtio-rng: entropy into a buffer (v1.4 §5.4)."""

    device_id = DeviceId.RNG
    REQUEST = 256

    def __init__(self, guest: GuestDevice, options: WorkloadOptions) -> None:
        super().__init__(guest, options)
        self.driver = RngDriver(guest)

    async def start(self, num_queues: int | None = None) -> int:
        self.made_available.clear()
        return await self.driver.start(packed=self.options.packed, queue_size=self.options.queue_size,
                                       extra_features=self.options.extra_features)

    async def round_trip(self, tag: int, queue: int = 0) -> None:
        memory = self.guest.memory
        buffer = self.guest.alloc.alloc(self.REQUEST, 64)    # its own: round trips may overlap
        memory.write(buffer, bytes(self.REQUEST))
        written = await self._request(queue, [], [(buffer, self.REQUEST)])
        if not 0 < written <= self.REQUEST:
            raise AssertionError(f"virtio-rng used length {written} for a {self.REQUEST}-byte buffer")
        if written >= 16 and not any(memory.read(buffer, written)):
            raise AssertionError(f"virtio-rng wrote {written} zero bytes")

    async def write_probe(self) -> int:
        page = self._page()
        if not await self._request(0, [], [(page, PAGE_SIZE)]):
            raise AssertionError("virtio-rng wrote nothing")
        return page >> PAGE_SHIFT


class NetWorkload(Workload):
    """virtio-net, one queue pair without a control queue: a batch of frames sent on the
    transmitq comes back on the receiveq, counted and compared byte for byte (needs an echoing
    peer, :attr:`WorkloadOptions.net_echo`)."""

    device_id = DeviceId.NET
    base_queues = 2
    RX, TX = 0, 1

    #: Frames per round trip.
    BATCH = 4

    def __init__(self, guest: GuestDevice, options: WorkloadOptions) -> None:
        super().__init__(guest, options)
        if not options.net_echo:
            self.no_io = NET_NO_ECHO
        self.sent = self.received = 0
        #: Frames sent and not back yet -> what their echo resolves. Round trips may overlap (a
        #: stop with requests in flight): a frame may land in another round trip's buffer.
        self.waiting: dict[bytes, asyncio.Future[None]] = {}
        #: Frames that came back although nobody sent them, or came back twice.
        self.stray = 0
        #: Frames a network may drop (warm-up, around a stop): their echoes, if any, are ignored.
        self.droppable: set[bytes] = set()
        #: Receive buffers the device filled since the last start.
        self.rx_used = 0

    async def start(self, num_queues: int | None = None) -> int:
        self.made_available.clear()
        self.rx_used = 0
        features = await self.guest.initialize(NetFeature.MAC | self.options.extra_features,
                                               packed=self.options.packed, queue_size=self.options.queue_size,
                                               num_queues=self.base_queues)
        if self.no_io is None:
            await self._warm_up()
        return features

    async def _warm_up(self) -> None:
        """Send single frames until one comes back: a peer may drop what arrives before it has
        taken the started device up (testpmd, between its new-device and link events)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.timeout
        attempt = 0
        while not await self._echo(0xFF00 + attempt, [(self.guest.alloc.alloc(2048, 64), 2048)], wait=0.1,
                                   droppable=True):
            attempt += 1
            if loop.time() > deadline:
                raise AssertionError(f"no frame came back within {self.options.timeout} s of DRIVER_OK "
                                     f"({attempt} sent)")

    def tally(self) -> str:
        return f"{self.received} frames sent and echoed back as sent, {self.stray} stray"

    def available(self, queue: int) -> int:
        """A receive buffer is taken only when a frame arrives (a lost frame leaves one waiting)."""
        return self.rx_used if queue == self.RX else self.made_available[queue]

    def most_taken(self, queue: int) -> int:
        """Every receive buffer made available: with frames in flight the device may have filled
        buffers whose completions the guest has not reaped yet (``rx_used`` lags the used idx)."""
        return self.made_available[queue]

    @staticmethod
    def frame(tag: int, index: int) -> bytes:
        """A broadcast frame of the local experimental EtherType 0x88b5 carrying *tag* and *index*."""
        return (b"\xff" * 6 + bytes([0x02, 0, 0, 0, index & 0xFF, tag & 0xFF]) + b"\x88\xb5"
                + _pattern(tag * 16 + index, 256)[:46])

    def _on_rx(self, gpa: int, used: asyncio.Future[int]) -> None:
        if used.cancelled() or used.exception() is not None:      # a reset dropped the buffer
            return
        self.rx_used += 1
        frame = self.guest.memory.read(gpa + NET_HDR_V1, max(0, used.result() - NET_HDR_V1))
        waiter = self.waiting.pop(frame, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif frame in self.droppable:
            self.droppable.discard(frame)       # the late echo of a frame given up on
        else:
            self.stray += 1

    async def _echo(self, tag: int, rx_buffers: list[tuple[int, int]], *, wait: float | None = None,
                    droppable: bool = False) -> int:
        """Send one frame per receive buffer; every one comes back, as sent, once, within *wait*
        seconds (default: the I/O timeout). *droppable* frames may be lost (they may still come
        back later): how many came back in time."""
        memory, rx, tx = self.guest.memory, self.guest.queue(self.RX), self.guest.queue(self.TX)
        frames = [self.frame(tag, i) for i in range(len(rx_buffers))]
        loop = asyncio.get_running_loop()
        waiters = {frame: loop.create_future() for frame in frames}
        self.waiting.update(waiters)
        for gpa, size in rx_buffers:
            rx.add([], [(gpa, size)]).add_done_callback(functools.partial(self._on_rx, gpa))
        self.made_available[self.RX] += len(rx_buffers)
        rx.kick()
        sent = []
        for frame in frames:
            gpa = self.guest.alloc.alloc(NET_HDR_V1 + len(frame), 64)
            memory.write(gpa, bytes(NET_HDR_V1) + frame)
            sent.append(tx.add([(gpa, NET_HDR_V1 + len(frame))], []))
        self.made_available[self.TX] += len(frames)
        tx.kick()
        await _within(asyncio.gather(*sent), self.options.timeout, f"transmit of {len(frames)} frames (tag {tag})")
        self.sent += len(frames)
        wait = self.options.timeout if wait is None else wait
        _, late = await asyncio.wait(waiters.values(), timeout=wait)
        if late:
            for frame in frames:
                self.waiting.pop(frame, None)
            if droppable:
                self.droppable.update(frame for frame, waiter in waiters.items() if not waiter.done())
                return len(frames) - len(late)
            raise AssertionError(f"{len(frames) - len(late)} of {len(frames)} frames (tag {tag}) came back "
                                 f"within {wait} s")
        self.received += len(frames)
        if self.stray:
            raise AssertionError(f"{self.stray} frame(s) came back that were not sent, or came back twice "
                                 f"({self.received} of {self.sent} sent came back as sent)")
        return len(frames)

    async def round_trip(self, tag: int, queue: int = 0) -> None:
        if self.no_io:
            raise AssertionError(self.no_io)
        await self._echo(tag, [(self.guest.alloc.alloc(2048, 64), 2048) for _ in range(self.BATCH)])

    async def in_flight_trip(self, tag: int) -> None:
        """Transmitted in full (every transmit buffer used) across the stop; the echoes of frames
        the peer forwarded while the receive ring was stopped may be lost (v1.2 §5.1.6.4)."""
        await self._echo(tag, [(self.guest.alloc.alloc(2048, 64), 2048) for _ in range(self.BATCH)],
                         droppable=True)

    async def write_probe(self) -> int:
        page = self._page()
        await self._echo(0x7F, [(page, PAGE_SIZE)])
        return page >> PAGE_SHIFT


class FsWorkload(Workload):
    """virtio-fs: FUSE_INIT at every start; a round trip writes a file through FUSE and reads it
    back (:class:`FsDriver`, v1.4 §5.11.6). The files are removed again by :meth:`cleanup`."""

    device_id = DeviceId.FS
    keeps_data = True
    base_queues = FIRST_REQUEST_QUEUE + 1       #: hiprio + one request queue
    reset_index = FIRST_REQUEST_QUEUE
    PREFIX = ".shadowvmm-check"

    def __init__(self, guest: GuestDevice, options: WorkloadOptions) -> None:
        super().__init__(guest, options)
        self.driver = FsDriver(guest, max_payload=fuse.FUSE_MIN_READ_BUFFER, slots_per_queue=8, hiprio_slots=16,
                               request_timeout=options.timeout)
        self.run = secrets.token_hex(3)
        self.files: set[str] = set()

    async def start(self, num_queues: int | None = None) -> int:
        self.made_available.clear()
        await self.driver.start(queue_size=self.options.queue_size, request_queues=1,
                                extra_features=self.options.extra_features)
        return self.guest.features

    def available(self, queue: int) -> int:
        ring = self.guest.queue(queue).ring
        if isinstance(ring, SplitDriverQueue):      # FsDriver makes several requests per operation
            return ring.memory.load_u16(ring.layout.avail + 2)
        return 0

    def _path(self, tag: int) -> str:
        return f"/{self.PREFIX}-{self.run}-{tag}"

    async def round_trip(self, tag: int, queue: int = 0) -> None:
        path = self._path(tag)
        self.files.add(path)        # before: a write cut short may still have created it
        await _within(self.driver.write_file(path, _pattern(tag, BLOCK)), self.options.timeout,
                      f"FUSE write of {path}")
        await self.verify(tag)

    async def verify(self, tag: int, queue: int = 0) -> None:
        path = self._path(tag)
        got = await _within(self.driver.read_file(path), self.options.timeout, f"FUSE read of {path}")
        if got != _pattern(tag, BLOCK):
            raise AssertionError(f"{path} read back through FUSE ({len(got)} bytes) differs from what was written")

    async def write_probe(self) -> int:
        """A FUSE_GETATTR of the root whose reply lands in a fresh page."""
        meta, page = self.guest.alloc.alloc(256, 64), self._page()
        unique = 0x5348_0000 + self.guest.queue(FIRST_REQUEST_QUEUE).completed
        raw = fuse.encode_request(fuse.Opcode.GETATTR, unique, fuse.FUSE_ROOT_ID, fuse.GetattrIn())
        self.guest.memory.write(meta, raw)
        written = await self._request(FIRST_REQUEST_QUEUE, [(meta, len(raw))], [(page, PAGE_SIZE)])
        fuse.decode_reply(self.guest.memory.read(page, written), unique, fuse.Opcode.GETATTR, "/")
        return page >> PAGE_SHIFT

    async def cleanup(self) -> None:
        for path in sorted(self.files):
            try:
                await _within(self.driver.remove(path), self.options.timeout, f"FUSE unlink of {path}")
            except fuse.FuseError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        self.files.clear()


#: Device type name -> device id (the names the backends' ``device`` options use).
DEVICE_TYPES: dict[str, DeviceId] = {"blk": DeviceId.BLOCK, "block": DeviceId.BLOCK, "rng": DeviceId.RNG,
                                     "net": DeviceId.NET, "fs": DeviceId.FS}
WORKLOADS: dict[DeviceId, type[Workload]] = {DeviceId.BLOCK: BlkWorkload, DeviceId.RNG: RngWorkload,
                                             DeviceId.NET: NetWorkload, DeviceId.FS: FsWorkload}


def device_id_of(device_type: str | DeviceId) -> DeviceId:
    if isinstance(device_type, DeviceId):
        return device_type
    try:
        return DEVICE_TYPES[device_type]
    except KeyError:
        raise ArgumentError(f"device type {device_type!r} is not one of {', '.join(DEVICE_TYPES)}") from None


def io_unavailable(device_id: DeviceId, options: WorkloadOptions) -> str | None:
    """Why *device_id* has no verified I/O with *options* (None: it has)."""
    kind = WORKLOADS.get(device_id)
    if kind is None:
        return f"the kit has no guest workload for {device_id.name}"
    if kind is NetWorkload and not options.net_echo:
        return NET_NO_ECHO
    return None


def workload_for(device_id: DeviceId, guest: GuestDevice, options: WorkloadOptions) -> Workload:
    """The workload of *device_id*; a device type without one initialises only (no I/O steps)."""
    kind = WORKLOADS.get(device_id)
    if kind is not None:
        return kind(guest, options)
    workload = Workload(guest, options)
    workload.device_id = device_id
    workload.no_io = f"the kit has no guest workload for {device_id.name}"
    return workload

