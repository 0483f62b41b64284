"""virtio-blk I/O errors injected between any backend and the guest, on split rings.

The wrapper gives the inner backend its own call eventfd per ring instead of the
device's. When the inner backend signals a completion, the wrapper walks the
used ring entries published since the last signal (v1.4 §2.7.8), counts them,
and for every Nth one overwrites the request's status byte (the last byte of
its last device-writable buffer, v1.4 §5.2.6) with ``VIRTIO_BLK_S_IOERR``; then
it signals the device's call eventfd. The guest sees a used buffer only after
its interrupt, so it reads the rewritten status.

This works for every backend that completes into the VMM's guest memory
(in-process models, vhost-user and vhost-vdpa peers alike), since the ring is
read where the guest reads it. Limits: split rings only (packed rings are left
alone: their used entries overwrite the descriptors, so the chain is no longer
there to walk), and a guest that reaps used entries without waiting for an
interrupt may see a status before it is rewritten.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from dataclasses import dataclass

from shadowvmm.backends.base import VringAddr
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.constants import BlkStatus

log = logging.getLogger(__name__)

DESC = struct.Struct("<QIHH")       #: struct virtq_desc: addr, len, flags, next (v1.4 §2.7.5)
USED_ELEM = struct.Struct("<II")    #: struct virtq_used_elem: id, len (v1.4 §2.7.8)
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
_IOERR = bytes([BlkStatus.IOERR])


@dataclass
class Ring:
    index: int
    num: int = 0
    addr: VringAddr | None = None
    own_fd: int = -1        #: the call eventfd the inner backend signals
    target_fd: int = -1     #: the device's call eventfd
    cursor: int = 0         #: the next used idx to look at


def status_byte(memory: GuestMemory, table: int, num: int, head: int) -> int | None:
    """GPA of the status byte of the chain at *head* (None: no device-writable buffer)."""
    last: int | None = None
    index, steps = head, 0
    while steps <= num:
        gpa, length, flags, nxt = DESC.unpack(memory.read(table + DESC.size * index, DESC.size))
        if flags & F_INDIRECT:
            # an indirect table is a chain of its own, starting at its entry 0 (v1.4 §2.7.5.3)
            return status_byte(memory, gpa, length // DESC.size, 0) if length >= DESC.size else last
        if flags & F_WRITE and length:
            last = gpa + length - 1
        if not flags & F_NEXT or nxt >= num:
            return last
        index, steps = nxt, steps + 1
    return last


class IoErrorInjector:
    """Every *every*-th completed request on any ring of one device ends with IOERR."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.memory: GuestMemory | None = None
        self.packed = False
        self.rings: dict[int, Ring] = {}
        self.completed = 0
        self.injected = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def ring(self, index: int) -> Ring:
        return self.rings.setdefault(index, Ring(index))

    def set_addr(self, addr: VringAddr) -> None:
        ring = self.ring(addr.index)
        ring.addr = addr
        # A (re)started ring: what is already used was seen, or predates us. Read even at the same
        # addresses: a queue reset (v1.2 §2.6.1) sets a fresh ring up where the old one was.
        ring.cursor = self.memory.load_u16(addr.device + 2) if self.memory is not None else 0

    def call_fd(self, index: int, fd: int) -> int:
        """The fd to give the inner backend instead of the device's *fd*."""
        ring = self.ring(index)
        ring.target_fd = fd
        if self.packed or fd < 0:
            return fd
        if ring.own_fd < 0:
            ring.own_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(ring.own_fd, self._on_call, ring)
        return ring.own_fd

    def _on_call(self, ring: Ring) -> None:
        try:
            os.eventfd_read(ring.own_fd)
        except BlockingIOError:
            return
        self._forward(ring)

    def _forward(self, ring: Ring) -> None:
        self._rewrite(ring)
        if ring.target_fd >= 0:
            try:
                os.eventfd_write(ring.target_fd, 1)
            except OSError as exc:
                log.warning("faulty: ring %d: signalling the device failed: %s", ring.index, exc)

    def flush(self) -> None:
        """Pass on what the inner backend signalled and was not yet forwarded (at a ring stop)."""
        for ring in self.rings.values():
            if ring.own_fd >= 0:
                try:
                    os.eventfd_read(ring.own_fd)
                except BlockingIOError:
                    continue
                self._forward(ring)

    def _rewrite(self, ring: Ring) -> None:
        memory, addr = self.memory, ring.addr
        if memory is None or addr is None or not ring.num:
            return
        used = memory.load_u16(addr.device + 2)
        while ring.cursor != used:
            head, length = USED_ELEM.unpack(memory.read(addr.device + 4 + USED_ELEM.size * (ring.cursor % ring.num),
                                                        USED_ELEM.size))
            ring.cursor = (ring.cursor + 1) & 0xFFFF
            self.completed += 1
            if self.completed % self.every or not length or head >= ring.num:
                continue
            gpa = status_byte(memory, addr.desc, ring.num, head)
            if gpa is not None:
                memory.write(gpa, _IOERR)
                self.injected += 1

    def forget_rings(self) -> None:
        """A device reset: the rings will be set up again."""
        for ring in self.rings.values():
            ring.addr = None

    def close(self) -> None:
        for ring in self.rings.values():
            if ring.own_fd >= 0:
                if self._loop is not None:
                    self._loop.remove_reader(ring.own_fd)
                os.close(ring.own_fd)
                ring.own_fd = -1
        self.rings.clear()
