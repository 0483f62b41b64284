"""The ring and I/O model of the reference back-end: one session's guest memory, dirty log and
split rings, served by the device-side split ring code and the in-process blk model.

``latency_us`` holds each popped request that long before it is executed and
used, so stops and crashes land mid-I/O (with ``latency_data_only`` only
reads and writes wait: other requests are used at once, ahead of them, out of
order as a device may).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import mmap
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from shadowvmm.backends.inproc import BlkModel
from shadowvmm.errors import ArgumentError, GuestMemoryError, ProtocolError, RingError
from shadowvmm.memory import DirtyLog, GuestMemory, MemoryRegion
from shadowvmm.virtio.constants import BlkRequestType, Feature
from shadowvmm.virtio.split import DescChain, SplitDeviceQueue, SplitLayout

from .. import protocol as vu
from .inflight import InflightQueue, InflightRegion, inflight_queue_bytes

__all__ = ["BlkRings", "Ring", "Session"]

log = logging.getLogger(__name__)

PF = vu.ProtocolFeature

#: virtio-blk request types held by ``latency_data_only`` (v1.4 §5.2.6).
_DATA_REQUESTS = frozenset({BlkRequestType.IN, BlkRequestType.OUT})


@dataclass
class _Delayed:
    """Popped chains waiting out the latency; ``done`` resolves when they are used (or dropped)."""

    chains: list[DescChain]
    done: asyncio.Future[None]
    timer: asyncio.TimerHandle | None = None


@dataclass
class Ring:
    index: int
    num: int = 0
    base: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    log: bool = False
    kick: int = -1
    call: int = -1
    enabled: bool = False
    queue: SplitDeviceQueue | None = None      #: started while set
    resubmit: collections.deque[int] = field(default_factory=collections.deque)
    delayed: list[_Delayed] = field(default_factory=list)


@dataclass
class Session:
    sock: socket.socket
    features: int = 0
    protocol: int = 0
    status: int = 0
    memory: GuestMemory | None = None
    uaddr: list[tuple[int, int, int]] = field(default_factory=list)
    rings: dict[int, Ring] = field(default_factory=dict)
    log_buf: mmap.mmap | None = None
    inflight: InflightRegion | None = None
    transfer: asyncio.Task | None = None
    transfer_error: str = ""
    buf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)


class BlkRings:
    """Guest memory, dirty log, rings and in-flight region of the session being served."""

    def __init__(self, *, queues: int, size: int, image: str | None, serial: str, latency_us: int,
                 latency_data_only: bool) -> None:
        if latency_us < 0:
            raise ArgumentError(f"latency_us {latency_us} is negative")
        self.queues = queues
        self.latency_us = latency_us
        self.latency_data_only = latency_data_only
        options: dict[str, Any] = {"queues": queues, "size": size, "serial": serial}
        if image:
            options["image"] = image
        self.model = BlkModel(options)
        self.requests = 0
        self.resubmitted = 0
        self._session: Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ring(self, s: Session, index: int) -> Ring:
        if not 0 <= index < self.queues:
            raise ProtocolError(f"vring {index} out of range (0..{self.queues - 1})")
        return s.rings.setdefault(index, Ring(index))

    # ------------------------------------------------------------------ memory and log

    def _drop_memory(self, s: Session) -> None:
        if s.memory is not None:
            s.memory.close()
            s.memory = None
        s.uaddr = []

    def _set_mem_table(self, s: Session, regions: tuple[vu.MemRegion, ...], fds: list[int]) -> None:
        if len(fds) != len(regions):
            raise ProtocolError(f"{len(regions)} regions with {len(fds)} fds")
        self._drop_memory(s)
        mapped = []
        for region, fd in zip(regions, fds):
            buf = mmap.mmap(fd, region.memory_size, mmap.MAP_SHARED, offset=region.mmap_offset)
            mapped.append(MemoryRegion(region.guest_phys_addr, region.memory_size, fd, buf, region.mmap_offset))
            s.uaddr.append((region.userspace_addr, region.memory_size, region.guest_phys_addr))
        s.memory = GuestMemory(mapped)
        self._update_logging(s)
        for ring in s.rings.values():
            if ring.queue is not None:
                ring.queue = self._new_queue(s, ring, ring.queue.last_avail_idx)

    def _gpa(self, s: Session, uaddr: int) -> int:
        for start, size, gpa in s.uaddr:
            if start <= uaddr < start + size:
                return gpa + uaddr - start
        raise GuestMemoryError(f"user address {uaddr:#x} is in no memory region")

    def _set_log_base(self, s: Session, p: vu.Log, fd: int) -> None:
        if s.log_buf is not None:
            s.log_buf.close()
        try:
            s.log_buf = mmap.mmap(fd, p.mmap_size, mmap.MAP_SHARED, offset=p.mmap_offset)
        finally:
            os.close(fd)
        self._update_logging(s)

    def _update_logging(self, s: Session) -> None:
        if s.memory is None:
            return
        if s.features & vu.F_LOG_ALL and s.log_buf is not None:
            s.memory.dirty_log = DirtyLog.over(s.log_buf, len(s.log_buf) & ~7)
        else:
            s.memory.dirty_log = None

    # ------------------------------------------------------------------ rings

    def _set_vring_addr(self, s: Session, p: vu.VringAddr) -> None:
        ring = self._ring(s, p.index)
        ring.desc, ring.avail, ring.used = self._gpa(s, p.desc), self._gpa(s, p.avail), self._gpa(s, p.used)
        ring.log = bool(p.flags & vu.VRING_F_LOG)

    def _set_kick(self, s: Session, ring: Ring, fd: int) -> None:
        """SET_VRING_KICK starts the ring ("Ring states"); a stopped ring with an
        inflight region first recovers what a previous back-end left in flight."""
        self._unwatch(ring)
        if ring.kick >= 0:
            os.close(ring.kick)
        ring.kick = fd
        if s.memory is None or not ring.num or not ring.desc:
            raise ProtocolError(f"vring {ring.index} kicked before it was configured")
        if ring.queue is None:
            ring.queue = self._new_queue(s, ring, ring.base)
            self._check_inflights(s, ring)
        if not s.features & vu.F_PROTOCOL_FEATURES:
            ring.enabled = True
        if fd >= 0:
            assert self._loop is not None
            self._loop.add_reader(fd, self._on_kick, ring)
        self._process(ring)

    @staticmethod
    def _new_queue(s: Session, ring: Ring, last_avail_idx: int) -> SplitDeviceQueue:
        assert s.memory is not None
        layout = SplitLayout(ring.num, ring.desc, ring.avail, ring.used)
        return SplitDeviceQueue(s.memory, layout, event_idx=bool(s.features & Feature.EVENT_IDX),
                                indirect=bool(s.features & Feature.INDIRECT_DESC), last_avail_idx=last_avail_idx)

    def _inflight_queue(self, s: Session | None, ring: Ring) -> InflightQueue | None:
        if s is None or s.inflight is None or not s.protocol & PF.INFLIGHT_SHMFD:
            return None
        return s.inflight.queues[ring.index] if ring.index < s.inflight.num_queues else None

    def _check_inflights(self, s: Session, ring: Ring) -> None:
        """libvhost-user ``vu_check_queue_inflights``: resume after the heads in flight.

        The next avail index becomes used idx + heads in flight (the front-end's
        SET_VRING_BASE is ignored); those heads are served first, by counter.
        """
        inflight = self._inflight_queue(s, ring)
        if inflight is None or ring.queue is None:
            return
        heads = inflight.recover(ring.queue.used_idx)
        if heads is None:
            return
        ring.queue.last_avail_idx = (ring.queue.used_idx + len(heads)) & 0xFFFF
        ring.resubmit = collections.deque(heads)
        self.resubmitted += len(heads)

    def _set_enable(self, s: Session, ring: Ring, enabled: bool) -> None:
        """SET_VRING_ENABLE; a started ring then serves what is already available ("Ring states")."""
        ring.enabled = enabled
        if enabled:
            self._process(ring)

    def _unwatch(self, ring: Ring) -> None:
        if ring.kick >= 0 and self._loop is not None:
            self._loop.remove_reader(ring.kick)

    def _halt(self, ring: Ring) -> None:
        """Stop watching kicks and close the kick fd (no new request is popped)."""
        self._unwatch(ring)
        if ring.kick >= 0:
            os.close(ring.kick)
            ring.kick = -1

    async def _stop_ring(self, ring: Ring) -> int:
        """GET_VRING_BASE: stop the ring; requests already popped are used first, then the reply."""
        self._halt(ring)
        queue, ring.queue = ring.queue, None
        while ring.delayed:
            await asyncio.shield(ring.delayed[0].done)
        if queue is not None:
            ring.base = queue.last_avail_idx
        ring.resubmit.clear()
        return ring.base

    def _reset_rings(self, s: Session) -> None:
        """Forget every ring; delayed requests are dropped (they stay in the inflight region)."""
        for ring in s.rings.values():
            self._halt(ring)
            for batch in ring.delayed:
                if batch.timer is not None:
                    batch.timer.cancel()
                if not batch.done.done():
                    batch.done.set_result(None)
            ring.delayed.clear()
            ring.queue = None
            if ring.call >= 0:
                os.close(ring.call)
                ring.call = -1
        s.rings.clear()

    def _on_kick(self, ring: Ring) -> None:
        try:
            os.eventfd_read(ring.kick)
        except (BlockingIOError, OSError):
            pass
        self._process(ring)

    def _process(self, ring: Ring) -> None:
        """Pop what is available (resubmitted heads first) if the ring is started and enabled."""
        s = self._session
        queue = ring.queue
        if s is None or queue is None or s.memory is None or not ring.enabled:
            return
        inflight = self._inflight_queue(s, ring)
        chains: list[DescChain] = []
        try:
            while ring.resubmit:
                chains.append(queue.chain_at(ring.resubmit.popleft()))
            while (chain := queue.pop()) is not None:
                if inflight is not None:
                    inflight.get(chain.head)
                chains.append(chain)
        except (RingError, GuestMemoryError) as exc:
            log.error("refblk: vring %d broken: %s", ring.index, exc)
            self._unwatch(ring)
        if not self.latency_us:
            self._complete(ring, queue, chains)
            return
        if self.latency_data_only:
            data = [self._is_data(s.memory, chain) for chain in chains]
            self._complete(ring, queue, [chain for chain, held in zip(chains, data) if not held])
            chains = [chain for chain, held in zip(chains, data) if held]
        if not chains:
            return
        assert self._loop is not None
        batch = _Delayed(chains, self._loop.create_future())
        batch.timer = self._loop.call_later(self.latency_us / 1e6, self._finish, ring, queue, batch)
        ring.delayed.append(batch)

    @staticmethod
    def _is_data(memory: GuestMemory, chain: DescChain) -> bool:
        """Whether *chain* is a virtio-blk read or write (its header's ``type``)."""
        if not chain.readable or chain.readable[0][1] < 4:
            return False
        return memory.load_u32(chain.readable[0][0]) in _DATA_REQUESTS

    def _finish(self, ring: Ring, queue: SplitDeviceQueue, batch: _Delayed) -> None:
        ring.delayed.remove(batch)
        try:
            self._complete(ring, ring.queue or queue, batch.chains)
        finally:
            batch.done.set_result(None)

    def _complete(self, ring: Ring, queue: SplitDeviceQueue, chains: list[DescChain]) -> None:
        """Execute *chains* and use them, then one call if the driver wants it.

        With an inflight region each head is published on its own, between
        ``pre_put`` and ``post_put`` as libvhost-user's ``vu_queue_push``, so
        a crash leaves at most ``last_batch_head`` ambiguous.
        """
        s = self._session
        if s is None or s.memory is None:
            return
        inflight = self._inflight_queue(s, ring)
        done: list[tuple[int, int]] = []
        try:
            for chain in chains:
                done.append((chain.head, self.model.handle(s.memory, chain)))
                self.requests += 1
        except (RingError, GuestMemoryError) as exc:
            log.error("refblk: vring %d broken: %s", ring.index, exc)
            self._unwatch(ring)
        if not done:
            return
        if inflight is None:
            queue.push_batch(done)
        else:
            for head, written in done:
                inflight.pre_put(head)
                queue.push(head, written)
                inflight.post_put(head, queue.used_idx)
        if queue.should_notify() and ring.call >= 0:
            os.eventfd_write(ring.call, 1)

    # ------------------------------------------------------------------ inflight

    def _get_inflight(self, s: Session, p: vu.Inflight) -> tuple[bytes, list[int]]:
        """GET_INFLIGHT_FD: a zeroed, sealed memfd (libvhost-user ``vu_get_inflight_fd``)."""
        size = inflight_queue_bytes(p.queue_size) * p.num_queues
        fd = os.memfd_create("refblk-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        if s.inflight is not None:
            s.inflight.close()
        s.inflight = InflightRegion(os.dup(fd), mmap.mmap(fd, size, mmap.MAP_SHARED), p.num_queues, p.queue_size)
        return vu.Inflight(size, 0, p.num_queues, p.queue_size).pack(), [fd]

    def _set_inflight(self, s: Session, p: vu.Inflight, fd: int) -> None:
        """SET_INFLIGHT_FD: map the front-end's region (possibly of a crashed back-end)."""
        if p.num_queues > self.queues or p.mmap_size < inflight_queue_bytes(p.queue_size) * p.num_queues:
            os.close(fd)
            raise ProtocolError(f"inflight region of {p.mmap_size} bytes for {p.num_queues}x{p.queue_size}")
        buf = mmap.mmap(fd, p.mmap_size, mmap.MAP_SHARED, offset=p.mmap_offset)
        if s.inflight is not None:
            s.inflight.close()
        s.inflight = InflightRegion(fd, buf, p.num_queues, p.queue_size)
        for queue in s.inflight.queues:
            queue.set_desc_num()

    def inflight_pending(self) -> int:
        """Heads marked in flight in the current session's region, all queues."""
        s = self._session
        if s is None or s.inflight is None:
            return 0
        return sum(len(queue.pending()) for queue in s.inflight.queues)

    def delayed(self) -> int:
        """Requests popped and waiting out the latency, all rings."""
        s = self._session
        if s is None:
            return 0
        return sum(len(batch.chains) for ring in s.rings.values() for batch in ring.delayed)
