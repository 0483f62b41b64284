"""virtio-net guest driver model (virtio v1.4 §5.1).

Queues: receiveq k is ``2k``, transmitq k is ``2k + 1``, and the control
queue, when ``VIRTIO_NET_F_CTRL_VQ`` is negotiated, is ``2 * max_virtqueue_pairs``
(v1.4 §5.1.2). Every frame travels behind a 12-byte ``virtio_net_hdr``
(VERSION_1 layout, v1.4 §5.1.6); this model negotiates no offloads, so the
header is all zero on transmit and only ``num_buffers`` matters on receive
(with ``VIRTIO_NET_F_MRG_RXBUF`` a frame may span several buffers).

Receive queues are filled before DRIVER_OK and refilled after every batch of
completions (one kick per batch); received frames wait in a per-queue FIFO
for :meth:`NetDriver.receive` or :meth:`NetDriver.frames`. :meth:`NetDriver.send`
makes a batch of frames available with one kick and waits for the device
to use them. Multiqueue needs the control queue: with ``VIRTIO_NET_F_MQ``
only pair 0 runs until ``VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`` (v1.4 §5.1.6.5.5).

``start(poll=True)`` is the polling mode of a busy-polling guest (NAPI busy-poll, a DPDK PMD):
no interrupts are asked for (v1.4 §2.7.10, §2.8.10), :meth:`NetDriver.send_batch` and
:meth:`NetDriver.recv_batch` reap and post whole batches (one avail-index store each, a kick
only when the device's event suppression asks for one), and the per-buffer API is refused.
"""

from __future__ import annotations

import asyncio
import functools
import mmap
import operator
import os
import struct
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import astuple, dataclass, field

from ..errors import ArgumentError, DeviceStateError, NetCtrlError
from ..memory import GuestMemory
from ..virtio.constants import Feature, NetFeature, Status
from ..virtio.devcfg import (
    CTRL_HEADER,
    CTRL_MQ,
    CTRL_MQ_PAIRS_MAX,
    CTRL_OK,
    NET_CONFIG_BASE_SIZE,
    CtrlClass,
    CtrlMq,
    NetConfig,
    NetStatus,
)
from .driver import GuestDevice, GuestQueue
from .nettx import FixedTxSlots

#: Features the model asks for by default. EVENT_IDX is optional (``start(event_idx=True)``):
#: GuestQueue.reap does not re-read used->idx after arming used_event, so a completion published
#: in that window would not be signalled (not seen against testpmd, but a real race).
WANTED = int(NetFeature.MAC | NetFeature.STATUS | NetFeature.MTU)

ETH_HEADER = 14
ETH_MIN_MTU = 68
ETH_DEFAULT_MTU = 1500


@dataclass(frozen=True)
class NetHeader:
    """``virtio_net_hdr`` as VERSION_1 devices use it (12 bytes, v1.4 §5.1.6)."""

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    STRUCT = struct.Struct("<BBHHHHH")

    def pack(self) -> bytes:
        return self.STRUCT.pack(*astuple(self))

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> NetHeader:
        return cls(*cls.STRUCT.unpack_from(data, offset))


NET_HDR_SIZE = NetHeader.STRUCT.size


_TOKEN, _WRITTEN = operator.itemgetter(0), operator.itemgetter(1)

#: Control buffer: header + the largest command data this model sends, then the ack byte.
CTRL_BUFFER = 64


def _consume(future: asyncio.Future) -> None:
    """Retrieve an abandoned future's outcome (a reset fails it later)."""
    if not future.cancelled():
        future.exception()


@dataclass
class RxQueue:
    """One receiveq: its buffers, the frames received and not yet taken, counters."""

    queue: GuestQueue
    idle: list[int]                       #: buffers not made available
    frames: deque[bytes] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    parts: list[bytes] = field(default_factory=list)
    remaining: int = 0
    refill_scheduled: bool = False
    received: int = 0
    errors: int = 0
    host: BufferHost | None = None     #: polling mode: where the buffers are mapped


@dataclass(frozen=True)
class BufferHost:
    """The one guest memory region holding a queue's buffers (polling mode): buffer *gpa*
    is at ``mmap[gpa - gpa_base:]``, so a batch copies frames without translating each."""

    mmap: mmap.mmap
    gpa_base: int

    @classmethod
    def of(cls, memory: GuestMemory, gpas: Sequence[int], size: int) -> BufferHost:
        regions = {id(memory.translate(gpa, size)[0]) for gpa in gpas}
        if len(regions) != 1:
            raise DeviceStateError("polling mode needs a queue's buffers in one memory region")
        region = memory.translate(gpas[0], size)[0]
        return cls(region.mmap, region.gpa)


@dataclass
class TxQueue:
    """One transmitq: its slots (header + frame, one descriptor each) and a lock."""

    queue: GuestQueue
    slots: list[int]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sent: int = 0
    host: BufferHost | None = None     #: polling mode: where the slots are mapped
    fixed: FixedTxSlots | None = None  #: polling mode, in-order ring: a fixed slot per id


class NetDriver:
    """virtio-net on a :class:`GuestDevice`."""

    def __init__(self, device: GuestDevice, *, buffer_size: int = 2048, tx_slots: int = 128,
                 ctrl_timeout: float = 2.0) -> None:
        self.dev = device
        self.buffer_size = buffer_size
        self.tx_slots = tx_slots
        self.ctrl_timeout = ctrl_timeout
        self.config = NetConfig()
        self.active_pairs = 0
        self.rx: list[RxQueue] = []
        self.tx: list[TxQueue] = []
        self._ctrl: GuestQueue | None = None
        self._ctrl_buffer = 0
        self._ctrl_lock = asyncio.Lock()
        self._ctrl_broken = False
        self._mrg = False
        self._running = False
        self._poll = False

    # ------------------------------------------------------------------ setup

    @property
    def features(self) -> int:
        return self.dev.features

    def read_config(self, features: int | None = None) -> NetConfig:
        """``virtio_net_config`` (v1.4 §5.1.4), fields not negotiated replaced by their meaning.

        Without MAC the driver picks a random locally administered address; without STATUS the
        link is up; without MQ there is one pair; without MTU the MTU is 1500.
        """
        f = self.dev.features if features is None else features
        raw = self.dev.read_config(0, NET_CONFIG_BASE_SIZE)
        status, pairs, mtu = struct.unpack_from("<HHH", raw, NetConfig.offset("status"))
        if f & NetFeature.MQ and not 1 <= pairs <= CTRL_MQ_PAIRS_MAX:
            raise DeviceStateError(f"virtio-net config: max_virtqueue_pairs {pairs} with MQ")
        if f & NetFeature.MTU and mtu < ETH_MIN_MTU:
            raise DeviceStateError(f"virtio-net config: mtu {mtu} with MTU (does the VMM serve the config?)")
        return NetConfig(mac=raw[:6] if f & NetFeature.MAC else bytes([0x02]) + os.urandom(5),
                         status=status if f & NetFeature.STATUS else NetStatus.LINK_UP,
                         max_virtqueue_pairs=pairs if f & NetFeature.MQ else 1,
                         mtu=mtu if f & NetFeature.MTU else ETH_DEFAULT_MTU)

    @property
    def mac(self) -> bytes:
        return self.config.mac

    @property
    def mtu(self) -> int:
        return self.config.mtu

    @property
    def link_up(self) -> bool:
        """Live link state from the config space (always up without STATUS)."""
        if not self.features & NetFeature.STATUS:
            return True
        return bool(self.dev.config_int(NetConfig.offset("status"), 2) & NetStatus.LINK_UP)

    @property
    def ctrl_queue(self) -> GuestQueue | None:
        """The control queue, when CTRL_VQ is negotiated."""
        return self._ctrl

    @property
    def max_frame(self) -> int:
        """Largest frame :meth:`send` takes (an Ethernet frame without FCS)."""
        return self.buffer_size - NET_HDR_SIZE

    async def start(self, *, pairs: int = 1, mrg_rxbuf: bool = False, packed: bool = False,
                    event_idx: bool = False, queue_size: int = 256, extra_features: int = 0,
                    poll: bool = False, in_order: bool | None = None) -> int:
        """Initialise the device, fill the receive queues, DRIVER_OK, then set the active pairs.

        ``pairs > 1`` negotiates MQ and CTRL_VQ and sends VQ_PAIRS_SET. *poll* puts the data
        queues in polling mode (no interrupts asked for; :meth:`send_batch` / :meth:`recv_batch`
        instead of :meth:`send` / :meth:`receive`; not with *mrg_rxbuf*). *in_order* (default:
        *poll*) asks for VIRTIO_F_IN_ORDER (v1.4 §2.7.9, §2.8.16), taken if the device offers it:
        completions are then reaped by count and batch. Returns the features.
        """
        if poll and mrg_rxbuf:
            raise ArgumentError("polling mode does not take mergeable receive buffers")
        self._poll = False
        transport = self.dev.transport
        want = WANTED | extra_features
        if mrg_rxbuf:
            want |= NetFeature.MRG_RXBUF
        if event_idx:
            want |= Feature.EVENT_IDX
        if poll if in_order is None else in_order:
            want |= Feature.IN_ORDER
        if pairs > 1:
            want |= NetFeature.MQ | NetFeature.CTRL_VQ
        offered = transport.device_features()
        if pairs > 1 and (offered & (NetFeature.MQ | NetFeature.CTRL_VQ)) != NetFeature.MQ | NetFeature.CTRL_VQ:
            raise DeviceStateError(f"{pairs} queue pairs need MQ and CTRL_VQ; device offers {offered:#x}")
        max_pairs = self.read_config(offered & want & NetFeature.MQ).max_virtqueue_pairs
        if not 1 <= pairs <= max_pairs:
            raise DeviceStateError(f"{pairs} queue pairs asked, device has {max_pairs}")
        ctrl = bool(offered & want & NetFeature.CTRL_VQ)
        count = 2 * max_pairs + int(ctrl)
        if count > transport.num_queues():
            raise DeviceStateError(f"virtio-net needs {count} queues, device has {transport.num_queues()}")
        features = await self.dev.initialize(want, packed=packed, queue_size=queue_size, num_queues=count,
                                             set_driver_ok=False)
        self._take_queues(features)
        if poll:
            self._poll_mode()
        for rx in self.rx:
            self._fill(rx)
        self.dev.driver_ok()
        await self.dev.started()
        for rx in self.rx:
            rx.queue.kick()
        self.active_pairs = 1
        if features & NetFeature.MQ:
            await self.set_queue_pairs(pairs)
        return features

    def queue_count(self, features: int) -> int:
        """The queues a driver with *features* sets up: every pair, and the control queue if
        negotiated (v1.4 §5.1.2)."""
        pairs = self.read_config(features & NetFeature.MQ).max_virtqueue_pairs
        return 2 * pairs + int(bool(features & NetFeature.CTRL_VQ))

    def attach(self) -> None:
        """Take the device as its core initialised it (a driver that finished, on a migration
        destination, an initialisation begun before: scenario 2.3): the queues' buffers, then
        the receive buffers made available and kicked (v1.4 §5.1.6.3). Pair 0 runs."""
        if not self.dev.status() & Status.DRIVER_OK:
            raise DeviceStateError("virtio-net: attach before DRIVER_OK")
        self._take_queues(self.dev.features)
        for rx in self.rx:
            self._fill(rx)
            rx.queue.kick()
        self.active_pairs = 1

    def _take_queues(self, features: int) -> None:
        """Config, receive and transmit buffers and the control buffer for the set-up queues."""
        self.config = self.read_config(features)
        self._mrg = bool(features & NetFeature.MRG_RXBUF)
        need = NET_HDR_SIZE + ETH_HEADER + max(self.config.mtu, ETH_DEFAULT_MTU)
        if not self._mrg and self.buffer_size < need:
            raise DeviceStateError(f"receive buffers of {self.buffer_size} bytes, MTU {self.config.mtu} "
                                   f"needs {need} without MRG_RXBUF")
        pairs = self.config.max_virtqueue_pairs
        queues = self.dev.queues
        if len(queues) < self.queue_count(features):
            raise DeviceStateError(f"virtio-net needs {self.queue_count(features)} queues set up, "
                                   f"the driver has {len(queues)}")
        alloc = self.dev.alloc
        self.rx = [RxQueue(queues[2 * k], [alloc.alloc(self.buffer_size, 64) for _ in range(queues[2 * k].size)])
                   for k in range(pairs)]
        self.tx = [TxQueue(queues[2 * k + 1], [alloc.alloc(self.buffer_size, 64)
                                               for _ in range(min(self.tx_slots, queues[2 * k + 1].size))])
                   for k in range(pairs)]
        if features & NetFeature.CTRL_VQ:
            self._ctrl = queues[2 * pairs]
            self._ctrl_buffer = alloc.alloc(CTRL_BUFFER, 64)
        self._running = True

    # ------------------------------------------------------------------ receive

    def _poll_mode(self) -> None:
        self._poll = True
        memory = self.dev.memory
        for rx in self.rx:
            rx.queue.poll()
            rx.host = BufferHost.of(memory, rx.idle, self.buffer_size)
        for tx in self.tx:
            tx.queue.poll()
            tx.host = BufferHost.of(memory, tx.slots, self.buffer_size)
            tx.fixed = FixedTxSlots.of(memory, tx.queue, tx.slots, self.buffer_size, NET_HDR_SIZE)

    def _polling(self, polled: bool) -> None:
        if self._poll != polled:
            raise DeviceStateError("in polling mode use send_batch/recv_batch" if not polled
                                   else "send_batch/recv_batch need start(poll=True)")

    def _fill(self, rx: RxQueue) -> int:
        """Make every idle buffer available (not yet kicked); returns how many."""
        if rx.host is not None:
            idle = rx.idle
            count = rx.queue.add_many(idle, [self.buffer_size] * len(idle), idle, write=True)
            del idle[:count]
            return count
        count = 0
        while rx.idle and rx.queue.num_free:
            gpa = rx.idle.pop()
            future = rx.queue.add([], [(gpa, self.buffer_size)])
            future.add_done_callback(functools.partial(self._on_rx, rx, gpa))
            count += 1
        return count

    def _on_rx(self, rx: RxQueue, gpa: int, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        written = min(future.result(), self.buffer_size)
        data = self.dev.memory.read(gpa, written)
        rx.idle.append(gpa)
        if rx.remaining == 0:
            if written < NET_HDR_SIZE:
                rx.errors += 1
            else:
                header = NetHeader.unpack(data)
                rx.parts = [data[NET_HDR_SIZE:]]
                rx.remaining = max(header.num_buffers, 1) if self._mrg else 1
        else:
            rx.parts.append(data)
        if rx.parts:
            rx.remaining -= 1
            if rx.remaining == 0:
                rx.frames.append(b"".join(rx.parts))
                rx.parts = []
                rx.received += 1
                rx.arrived.set()
        if not rx.refill_scheduled:
            rx.refill_scheduled = True
            self.dev.loop.call_soon(self._refill, rx)

    def _refill(self, rx: RxQueue) -> None:
        rx.refill_scheduled = False
        if self._running and self._fill(rx):
            rx.queue.kick()

    def _rx_queue(self, pair: int) -> RxQueue:
        if not 0 <= pair < len(self.rx):
            raise DeviceStateError(f"no receiveq for pair {pair} ({len(self.rx)} set up)")
        return self.rx[pair]

    async def receive(self, count: int, timeout: float = 1.0, pair: int = 0) -> list[bytes]:
        """Up to *count* frames from receiveq *pair*, waiting at most *timeout* seconds for them."""
        self._polling(False)
        rx = self._rx_queue(pair)
        out: list[bytes] = []
        deadline = self.dev.loop.time() + timeout
        while True:
            while rx.frames and len(out) < count:
                out.append(rx.frames.popleft())
            remaining = deadline - self.dev.loop.time()
            if len(out) >= count or remaining <= 0:
                return out
            rx.arrived.clear()
            try:
                await asyncio.wait_for(rx.arrived.wait(), remaining)
            except TimeoutError:
                pass

    async def frames(self, pair: int = 0) -> AsyncIterator[bytes]:
        """Every frame received on receiveq *pair*, as it arrives."""
        self._polling(False)
        rx = self._rx_queue(pair)
        while True:
            while rx.frames:
                yield rx.frames.popleft()
            rx.arrived.clear()
            await rx.arrived.wait()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.frames(0)

    # ------------------------------------------------------------------ transmit

    async def send(self, frames: Sequence[bytes], pair: int = 0) -> int:
        """Transmit *frames* on transmitq *pair*: one kick per batch of free slots, then wait for
        the device to use them. Returns the number of frames sent."""
        self._polling(False)
        if not 0 <= pair < max(self.active_pairs, 1) or pair >= len(self.tx):
            raise DeviceStateError(f"queue pair {pair} is not active ({self.active_pairs} active)")
        for frame in frames:
            if not 0 < len(frame) <= self.max_frame:
                raise ArgumentError(f"frame of {len(frame)} bytes; 1..{self.max_frame} fit a buffer")
        tx = self.tx[pair]
        header = NetHeader().pack()
        memory = self.dev.memory
        async with tx.lock:
            done = 0
            while done < len(frames):
                batch = frames[done:done + min(len(tx.slots), tx.queue.num_free)]
                if not batch:
                    raise DeviceStateError(f"transmitq {pair}: no free slot")
                used: list[tuple[int, asyncio.Future]] = []
                try:
                    for frame in batch:
                        gpa = tx.slots.pop()
                        memory.write(gpa, header + frame)
                        used.append((gpa, tx.queue.add([(gpa, NET_HDR_SIZE + len(frame))], [])))
                    tx.queue.kick()
                    await asyncio.gather(*(future for _, future in used))
                finally:
                    tx.slots += [gpa for gpa, future in used if future.done()]
                done += len(batch)
                tx.sent += len(batch)
        return done

    # ------------------------------------------------------------------ polling mode

    def send_batch(self, frames: Sequence[bytes], pair: int = 0) -> int:
        """Polling mode: reap the transmitq's completions, then make as many of *frames* as
        there are free slots available (one descriptor each, header + frame) with one
        avail-index store and a kick only if the device asks for one. Returns how many were
        queued (the rest: call again); :meth:`tx_pending` says how many are not used yet. On
        an in-order ring a batch whose frame sizes need another layout of the transmit slots
        waits until the device has used every frame in flight (0 meanwhile; see
        :mod:`~shadowvmm.guest.nettx`)."""
        if not self._poll:
            self._polling(True)
        if not 0 <= pair < max(self.active_pairs, 1) or pair >= len(self.tx):
            raise DeviceStateError(f"queue pair {pair} is not active ({self.active_pairs} active)")
        tx = self.tx[pair]
        if tx.fixed is not None:
            count = tx.fixed.send(tx.queue, frames)
            tx.sent += count
            return count
        queue, slots, host = tx.queue, tx.slots, tx.host
        assert host is not None
        used = queue.pop_used_many(queue.size)
        if used:
            slots += map(_TOKEN, used)
        count = min(len(frames), len(slots))
        if count == 0:
            return 0
        batch = frames[:count]
        sizes = list(map(len, batch))
        if min(sizes) < 1 or max(sizes) > self.max_frame:
            raise ArgumentError(f"frames of {min(sizes)}..{max(sizes)} bytes; 1..{self.max_frame} fit a buffer")
        taken = slots[-count:]
        del slots[-count:]
        mm, shift = host.mmap, NET_HDR_SIZE - host.gpa_base
        for gpa, frame, size in zip(taken, batch, sizes):
            at = gpa + shift      # the header stays as the slot was allocated: all zero
            mm[at:at + size] = frame
        dirty = self.dev.memory.dirty_log
        if dirty is not None:
            for gpa, size in zip(taken, sizes):
                dirty.mark(gpa + NET_HDR_SIZE, size)
        queue.add_many(taken, list(map(NET_HDR_SIZE.__add__, sizes)), taken)
        queue.kick()
        tx.sent += count
        return count

    def tx_pending(self, pair: int = 0) -> int:
        """Polling mode: frames made available on transmitq *pair* and not used yet (reaps)."""
        self._polling(True)
        tx = self.tx[pair]
        if tx.fixed is not None:
            tx.fixed.free += tx.queue.reap_count()
        else:
            tx.slots += map(_TOKEN, tx.queue.pop_used_many(tx.queue.size))
        return tx.queue.ring.in_flight

    def recv_batch(self, limit: int, pair: int = 0) -> list[bytes]:
        """Polling mode: at most *limit* frames the device put in receiveq *pair* (used
        buffers reaped in one pass), then every buffer back with one avail-index store and a
        kick only if the device asks for one."""
        if not self._poll:
            self._polling(True)
        rx = self.rx[pair] if 0 <= pair < len(self.rx) else self._rx_queue(pair)
        host = rx.host
        assert host is not None
        used = rx.queue.pop_used_many(limit)
        if not used:
            return []
        mm, base, cap = host.mmap, host.gpa_base - NET_HDR_SIZE, self.buffer_size
        rx.idle += map(_TOKEN, used)
        written = list(map(_WRITTEN, used))
        if min(written) >= NET_HDR_SIZE and max(written) <= cap:
            frames = [mm[gpa - base:gpa - base + size - NET_HDR_SIZE] for gpa, size in used]   # type: ignore[operator]
        else:
            frames = [mm[gpa - base:gpa - base + min(size, cap) - NET_HDR_SIZE]   # type: ignore[operator]
                      for gpa, size in used if size >= NET_HDR_SIZE]
            rx.errors += len(used) - len(frames)
        rx.received += len(frames)
        if self._running and self._fill(rx):
            rx.queue.kick()
        return frames

    # ------------------------------------------------------------------ control queue

    async def ctrl(self, cls: int, cmd: int, data: bytes = b"") -> None:
        """One control command (v1.4 §5.1.6.5); raises :class:`NetCtrlError` unless acked OK."""
        queue = self._ctrl
        if queue is None:
            raise DeviceStateError("VIRTIO_NET_F_CTRL_VQ is not negotiated")
        if self._ctrl_broken:
            raise DeviceStateError("the control queue has an unanswered command")
        ack_at = CTRL_BUFFER - 1
        if CTRL_HEADER.size + len(data) > ack_at:
            raise ArgumentError(f"control command data of {len(data)} bytes does not fit")
        memory = self.dev.memory
        buf = self._ctrl_buffer
        async with self._ctrl_lock:
            memory.write(buf, CTRL_HEADER.pack(cls, cmd) + data)
            memory.write(buf + ack_at, bytes([0xFF]))
            future = queue.add([(buf, CTRL_HEADER.size + len(data))], [(buf + ack_at, 1)])
            queue.kick()
            try:
                await asyncio.wait_for(asyncio.shield(future), self.ctrl_timeout)
            except TimeoutError:
                self._ctrl_broken = True
                future.add_done_callback(_consume)
                raise DeviceStateError(f"control command {cls}/{cmd} not answered in "
                                       f"{self.ctrl_timeout:g} s") from None
            ack = memory.read(buf + ack_at, 1)[0]
        if ack != CTRL_OK:
            raise NetCtrlError(cls, cmd, ack)

    async def set_queue_pairs(self, pairs: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (v1.4 §5.1.6.5.5)."""
        if not self.features & NetFeature.MQ:
            raise DeviceStateError("VIRTIO_NET_F_MQ is not negotiated")
        if not 1 <= pairs <= self.config.max_virtqueue_pairs:
            raise ArgumentError(f"queue pairs must be 1..{self.config.max_virtqueue_pairs}, not {pairs}")
        await self.ctrl(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, CTRL_MQ.pack(pairs))
        self.active_pairs = pairs

    # ------------------------------------------------------------------ teardown

    async def close(self) -> None:
        """Reset the device (in-flight buffers fail) and stop taking interrupts."""
        self._running = False
        try:
            await self.dev.reset()
        finally:
            self.dev.close()
