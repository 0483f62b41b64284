"""Guest workloads of the conformance kit: one per device type, on the guest driver models.

A workload initialises its device (DRIVER_OK), runs a verified I/O round trip
on a queue, and counts the buffers it made available per queue, so a stopped
ring's base (vhost GET_VRING_BASE: the next avail index, split rings) can be
checked exactly. :meth:`Workload.write_probe` has the device write one whole
guest page the guest itself never touches, for the dirty-log step.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from ...errors import ArgumentError
from ...guest.blk import BlkDriver
from ...guest.driver import GuestDevice
from ...guest.rng import RngDriver
from ...memory import PAGE_SHIFT, PAGE_SIZE
from ...virtio.constants import BLK_SECTOR_SIZE, BlkRequestType, BlkStatus, DeviceId, NetFeature

__all__ = ["DEVICE_TYPES", "BlkWorkload", "NetWorkload", "RngWorkload", "Workload", "WorkloadOptions",
           "device_id_of", "io_unavailable", "workload_for"]

T = TypeVar("T")
BLK_HEADER = struct.Struct("<IIQ")          #: virtio_blk_req header (v1.4 §5.2.6)
NET_HDR_V1 = 12                             #: struct virtio_net_hdr_v1 (v1.4 §5.1.6)
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

    def __init__(self, guest: GuestDevice, options: WorkloadOptions) -> None:
        self.guest = guest
        self.options = options
        #: Buffers made available per queue since the last start.
        self.made_available: Counter[int] = Counter()

    async def start(self, num_queues: int | None = None) -> int:
        """Reset, initialise, DRIVER_OK; the negotiated features."""
        self.made_available.clear()
        return await self.guest.initialize(0, packed=self.options.packed, queue_size=self.options.queue_size,
                                           num_queues=num_queues or self.base_queues)

    async def round_trip(self, tag: int, queue: int = 0) -> None:
        """One verified exchange on *queue*; AssertionError when the data is wrong."""
        raise AssertionError(self.no_io or "no I/O")

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

    def __init__(self, guest: GuestDevice, options: WorkloadOptions) -> None:
        super().__init__(guest, options)
        self.driver = BlkDriver(guest, max_request=BLOCK, slots_per_queue=8)

    async def start(self, num_queues: int | None = None) -> int:
        self.made_available.clear()
        return await self.driver.start(packed=self.options.packed, queue_size=self.options.queue_size,
                                       num_queues=num_queues or self.base_queues)

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
        self.buffer = 0

    async def start(self, num_queues: int | None = None) -> int:
        self.made_available.clear()
        features = await self.driver.start(packed=self.options.packed, queue_size=self.options.queue_size)
        self.buffer = self._page()
        return features

    async def round_trip(self, tag: int, queue: int = 0) -> None:
        memory = self.guest.memory
        memory.write(self.buffer, bytes(self.REQUEST))
        written = await self._request(queue, [], [(self.buffer, self.REQUEST)])
        if not 0 < written <= self.REQUEST:
            raise AssertionError(f"virtio-rng used length {written} for a {self.REQUEST}-byte buffer")
        if written >= 16 and not any(memory.read(self.buffer, written)):
            raise AssertionError(f"virtio-rng wrote {written} zero bytes")

    async def write_probe(self) -> int:
        page = self._page()
        if not await self._request(0, [], [(page, PAGE_SIZE)]):
            raise AssertionError("virtio-rng wrote nothing")
        return page >> PAGE_SHIFT


class NetWorkload(Workload):
    """virtio-net, one queue pair without a control queue: a frame sent on the transmitq comes
    back on the receiveq (needs an echoing peer, :attr:`WorkloadOptions.net_echo`)."""

    device_id = DeviceId.NET
    base_queues = 2
    RX, TX = 0, 1

    def __init__(self, guest: GuestDevice, options: WorkloadOptions) -> None:
        super().__init__(guest, options)
        if not options.net_echo:
            self.no_io = NET_NO_ECHO

    async def start(self, num_queues: int | None = None) -> int:
        self.made_available.clear()
        return await self.guest.initialize(NetFeature.MAC, packed=self.options.packed,
                                           queue_size=self.options.queue_size, num_queues=self.base_queues)

    async def _echo(self, tag: int, rx_buffer: int, length: int) -> None:
        memory = self.guest.memory
        frame = b"\xff" * 6 + bytes([0x02, 0, 0, 0, 0, tag & 0xFF]) + b"\x88\xb5" + _pattern(tag, 256)[:46]
        tx_buffer = self.guest.alloc.alloc(NET_HDR_V1 + len(frame), 64)
        received = self.guest.queue(self.RX).add([], [(rx_buffer, length)])
        self.made_available[self.RX] += 1
        self.guest.queue(self.RX).kick()
        memory.write(tx_buffer, bytes(NET_HDR_V1) + frame)
        await self._request(self.TX, [(tx_buffer, NET_HDR_V1 + len(frame))], [])
        got = await _within(received, self.options.timeout, f"frame {tag} sent back")
        if got != NET_HDR_V1 + len(frame) or memory.read(rx_buffer + NET_HDR_V1, len(frame)) != frame:
            raise AssertionError(f"frame {tag} did not come back as sent ({got} bytes used)")

    async def round_trip(self, tag: int, queue: int = 0) -> None:
        if self.no_io:
            raise AssertionError(self.no_io)
        await self._echo(tag, self.guest.alloc.alloc(2048, 64), 2048)

    async def write_probe(self) -> int:
        page = self._page()
        await self._echo(0x7F, page, PAGE_SIZE)
        return page >> PAGE_SHIFT


#: Device type name -> device id (the names the backends' ``device`` options use).
DEVICE_TYPES: dict[str, DeviceId] = {"blk": DeviceId.BLOCK, "block": DeviceId.BLOCK, "rng": DeviceId.RNG,
                                     "net": DeviceId.NET, "fs": DeviceId.FS}
WORKLOADS: dict[DeviceId, type[Workload]] = {DeviceId.BLOCK: BlkWorkload, DeviceId.RNG: RngWorkload,
                                             DeviceId.NET: NetWorkload}


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

