"""Virtqueues the VMM serves itself instead of the backend.

A vhost backend never sees some queues: QEMU answers the virtio-net control
queue in the VMM (it changes VMM-owned state: active queue pairs, MAC, RX
mode). :class:`VmmQueue` runs such a queue with the device-side ring code on
the guest's memory, woken by the same kick eventfd a backend would get, and
signals completions on the queue's call fd.

What a queue needs of its device is the narrow interface :class:`QueueHost`
(and :class:`ControlHost` for the net control queue), so this module does not
depend on the device class.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Protocol

from ..errors import GuestMemoryError, RingError
from ..memory import GuestMemory
from ..virtio.constants import DeviceId, Feature, NetFeature
from ..virtio.devcfg import CTRL_ERR, CTRL_HEADER, CTRL_MQ, CTRL_OK, CtrlClass, CtrlMq, NetConfig
from ..virtio.packed import PackedDeviceQueue, PackedLayout
from ..virtio.split import DescChain, SplitDeviceQueue, SplitLayout
from ..virtio.vring import RingState

log = logging.getLogger(__name__)

#: Device-readable bytes a VMM-served request may have: virtio-net control commands take a
#: few bytes to a few KiB (a MAC filter table); a longer request is refused unread.
VMM_REQUEST_MAX = 64 << 10


class RingRegs(Protocol):
    """Where the driver placed a queue's ring (v1.4 §2.7 split, §2.8 packed)."""

    @property
    def size(self) -> int: ...
    @property
    def desc(self) -> int: ...
    @property
    def driver(self) -> int: ...
    @property
    def device(self) -> int: ...


class QueueHost(Protocol):
    """What a :class:`VmmQueue` needs of its device."""

    @property
    def name(self) -> str: ...
    @property
    def memory(self) -> GuestMemory: ...
    @property
    def driver_features(self) -> int: ...
    @property
    def queues(self) -> Sequence[RingRegs]: ...

    def call_fd(self, index: int) -> int:
        """The fd to signal for queue *index*'s used buffers."""


class ControlHost(Protocol):
    """What the net control queue (:class:`NetControl`) needs of its device: its config bytes
    (a MAC change is written there) and the number of queues the driver uses."""

    config: bytearray

    def set_active_queues(self, count: int) -> None: ...


class DeviceHost(QueueHost, ControlHost, Protocol):
    """What :func:`vmm_queue_handlers` needs to choose the queues the VMM serves."""

    @property
    def device_id(self) -> DeviceId: ...
    @property
    def num_queues(self) -> int: ...


class QueueHandler(Protocol):
    #: Status byte of a request refused before it is read (over :data:`VMM_REQUEST_MAX`).
    error: int

    def handle(self, request: bytes) -> int:
        """Carry out one request; returns the status byte written back."""


class NetControl:
    """virtio-net control queue commands answered by the VMM (v1.4 §5.1.6.5)."""

    error = CTRL_ERR

    def __init__(self, device: ControlHost, max_pairs: int) -> None:
        self.device = device
        self.max_pairs = max_pairs
        self.active_pairs = 1
        self.commands: list[tuple[int, int]] = []

    def handle(self, request: bytes) -> int:
        if len(request) < CTRL_HEADER.size:
            return CTRL_ERR
        cls, cmd = CTRL_HEADER.unpack_from(request)
        data = request[CTRL_HEADER.size:]
        self.commands.append((cls, cmd))
        if cls == CtrlClass.MQ and cmd == CtrlMq.VQ_PAIRS_SET:
            if len(data) < CTRL_MQ.size:
                return CTRL_ERR
            pairs = CTRL_MQ.unpack_from(data)[0]
            if not 1 <= pairs <= self.max_pairs:
                return CTRL_ERR
            self.active_pairs = pairs
            self.device.set_active_queues(2 * pairs)
            return CTRL_OK
        if cls == CtrlClass.MAC and cmd == 1 and len(data) >= 6:       # MAC_ADDR_SET
            cfg = bytearray(self.device.config)
            cfg[0:6] = data[:6]
            self.device.config = cfg
            return CTRL_OK
        if cls in (CtrlClass.RX, CtrlClass.MAC, CtrlClass.ANNOUNCE):
            return CTRL_OK
        return CTRL_ERR


class VmmQueue:
    """One queue served in the VMM: pop, handle, push, interrupt."""

    def __init__(self, device: QueueHost, index: int, handler: QueueHandler) -> None:
        self.device = device
        self.index = index
        self.handler = handler
        self.queue: SplitDeviceQueue | PackedDeviceQueue | None = None
        self.kick_fd = -1

    def start(self, kick_fd: int, base: int) -> None:
        q = self.device.queues[self.index]
        event_idx = bool(self.device.driver_features & Feature.EVENT_IDX)
        if self.device.driver_features & Feature.RING_PACKED:
            self.queue = PackedDeviceQueue(self.device.memory, PackedLayout(q.size, q.desc, q.driver, q.device),
                                           event_idx=event_idx, state=RingState(self.index, base))
        else:
            self.queue = SplitDeviceQueue(self.device.memory, SplitLayout(q.size, q.desc, q.driver, q.device),
                                          event_idx=event_idx, last_avail_idx=base)
        self.kick_fd = kick_fd
        asyncio.get_running_loop().add_reader(kick_fd, self._on_kick)
        self._process()

    def stop(self) -> int:
        """Stop serving; returns the ring base (all requests complete synchronously)."""
        if self.kick_fd >= 0:
            asyncio.get_running_loop().remove_reader(self.kick_fd)
            self.kick_fd = -1
        queue, self.queue = self.queue, None
        if queue is None:
            return 0
        if isinstance(queue, SplitDeviceQueue):
            return queue.last_avail_idx
        return queue.ring_state(self.index).base

    def _on_kick(self) -> None:
        try:
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            pass
        self._process()

    def _process(self) -> None:
        queue = self.queue
        memory = self.device.memory
        if queue is None:
            return
        try:
            while (chain := queue.pop()) is not None:
                queue.push(chain.head, self._serve(memory, chain))
        except (RingError, GuestMemoryError) as exc:
            log.error("%s: VMM queue %d broken: %s", self.device.name, self.index, exc)
            self.stop()
            return
        if queue.should_notify():
            os.eventfd_write(self.device.call_fd(self.index), 1)

    def _serve(self, memory: GuestMemory, chain: DescChain) -> int:
        """One request; returns bytes written (the status byte, v1.4 §5.1.6.5).

        The status goes into the last byte of the last device-writable buffer; without one
        of at least a byte the request is used unprocessed, with 0 bytes written. A request
        longer than :data:`VMM_REQUEST_MAX` gets the handler's error status unread.
        """
        writable = chain.writable
        if not writable or writable[-1][1] == 0:
            return 0
        if chain.readable_len > VMM_REQUEST_MAX:
            status = self.handler.error
        else:
            status = self.handler.handle(chain.read(memory))
        gpa, length = writable[-1]
        memory.write(gpa + length - 1, bytes([status]))
        return 1


def vmm_queue_handlers(device: DeviceHost) -> dict[int, QueueHandler]:
    """The queues the VMM serves for this device with the negotiated features."""
    if device.device_id == DeviceId.NET and device.driver_features & NetFeature.CTRL_VQ:
        max_pairs = 1
        if device.driver_features & NetFeature.MQ and len(device.config) >= 6:
            max_pairs = max(1, NetConfig.unpack(bytes(device.config)).max_virtqueue_pairs)
        index = 2 * max_pairs
        if index < device.num_queues:
            return {index: NetControl(device, max_pairs)}
    return {}

