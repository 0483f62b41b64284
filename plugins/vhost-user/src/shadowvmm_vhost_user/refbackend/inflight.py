"""The in-flight tracking region of the reference back-end ("Inflight I/O tracking" in QEMU's
``docs/interop/vhost-user.rst``), in libvhost-user's split layout."""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shadowvmm.errors import ProtocolError, RingError

__all__ = ["INFLIGHT_ALIGN", "INFLIGHT_DESC", "INFLIGHT_HEADER", "INFLIGHT_VERSION", "InflightHeader",
           "InflightQueue", "InflightRegion", "inflight_queue_bytes"]

#: libvhost-user ``INFLIGHT_ALIGNMENT`` and ``INFLIGHT_VERSION``.
INFLIGHT_ALIGN = 64
INFLIGHT_VERSION = 1
#: ``VuVirtqInflight`` header: u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx.
INFLIGHT_HEADER = struct.Struct("<QHHHH")
#: ``VuDescStateSplit``: u8 inflight, u8 padding[5], u16 next, u64 counter.
INFLIGHT_DESC = struct.Struct("<B5xHQ")
#: Byte offsets of the fields written one at a time (header, then descriptor).
_VERSION, _DESC_NUM, _LAST_BATCH_HEAD, _USED_IDX = 8, 10, 12, 14
_DESC_INFLIGHT, _DESC_COUNTER = 0, 8
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")


def inflight_queue_bytes(queue_size: int) -> int:
    """Per-queue split region size, libvhost-user's ``vu_inflight_queue_size``.

    ``ALIGN_UP(16 * queue_size + 2, 64)``: it counts a u16 where the 16-byte
    header goes, but since the descriptors are 16 bytes each the rounding
    always leaves room for the header.
    """
    raw = INFLIGHT_DESC.size * queue_size + _U16.size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


class InflightHeader(NamedTuple):
    features: int
    version: int
    desc_num: int
    last_batch_head: int
    used_idx: int


class InflightQueue:
    """One split queue's part of the inflight region (libvhost-user ``VuVirtqInflight``).

    "Inflight I/O tracking" (vhost-user.rst): a head is marked when it is
    fetched (:meth:`get`) and cleared once its used entry is published
    (:meth:`pre_put` / :meth:`post_put`), every field written singly in
    libvhost-user's order, so a back-end killed at any point leaves a region
    :meth:`recover` can repair. Works over any buffer (the front-end can map
    the same memfd to inspect it).
    """

    def __init__(self, buf: Any, offset: int, queue_size: int) -> None:
        if offset + INFLIGHT_HEADER.size + INFLIGHT_DESC.size * queue_size > len(buf):
            raise ProtocolError(f"inflight region of {len(buf)} bytes is too small for queue at {offset}")
        self.buf = buf
        self.offset = offset
        self.queue_size = queue_size
        self.counter = 0

    def header(self) -> InflightHeader:
        return InflightHeader(*INFLIGHT_HEADER.unpack_from(self.buf, self.offset))

    def desc(self, head: int) -> tuple[int, int, int]:
        """``(inflight, next, counter)`` of descriptor *head*."""
        return INFLIGHT_DESC.unpack_from(self.buf, self._desc(head))

    def _desc(self, head: int) -> int:
        if not 0 <= head < self.queue_size:
            raise RingError(f"inflight descriptor {head} out of range ({self.queue_size})")
        return self.offset + INFLIGHT_HEADER.size + INFLIGHT_DESC.size * head

    def _set16(self, field_offset: int, value: int) -> None:
        _U16.pack_into(self.buf, self.offset + field_offset, value & 0xFFFF)

    def set_desc_num(self) -> None:
        """What SET_INFLIGHT_FD does to every queue (``desc_num = queue_size``)."""
        self._set16(_DESC_NUM, self.queue_size)

    def pending(self) -> list[int]:
        """Heads with ``inflight == 1``, in increasing ``counter`` order."""
        heads = []
        for head in range(self.queue_size):
            inflight, _, counter = self.desc(head)
            if inflight == 1:
                heads.append((counter, head))
        return [head for _, head in sorted(heads)]

    def get(self, head: int) -> None:
        """Head fetched from the avail ring (``vu_queue_inflight_get``)."""
        at = self._desc(head)
        _U64.pack_into(self.buf, at + _DESC_COUNTER, self.counter)
        self.counter += 1
        self.buf[at + _DESC_INFLIGHT] = 1

    def pre_put(self, head: int) -> None:
        """Before the used index moves: record the head (``vu_queue_inflight_pre_put``)."""
        self._set16(_LAST_BATCH_HEAD, head)

    def post_put(self, head: int, used_idx: int) -> None:
        """After the used index moved: clear the head, copy the index (``vu_queue_inflight_post_put``)."""
        self.buf[self._desc(head) + _DESC_INFLIGHT] = 0
        self._set16(_USED_IDX, used_idx)

    def recover(self, used_idx: int) -> list[int] | None:
        """A ring starts (``vu_check_queue_inflights``): the heads to resubmit, by counter.

        ``None`` for a region never used (version 0, now initialised). A head
        whose used entry was published just before a crash is still marked;
        the region's used_idx then differs from *used_idx* (read from the
        used ring) and that head, ``last_batch_head``, is cleared.
        """
        header = self.header()
        if header.version == 0:
            self._set16(_VERSION, INFLIGHT_VERSION)
            return None
        if header.used_idx != used_idx:
            self.buf[self._desc(header.last_batch_head) + _DESC_INFLIGHT] = 0
            self._set16(_USED_IDX, used_idx)
        heads = self.pending()
        self.counter = self.desc(heads[-1])[2] + 1 if heads else 0
        return heads


@dataclass
class InflightRegion:
    """The inflight region: one :class:`InflightQueue` per queue, back to back."""

    fd: int
    buf: mmap.mmap
    num_queues: int
    queue_size: int
    queues: list[InflightQueue] = field(init=False)

    def __post_init__(self) -> None:
        step = inflight_queue_bytes(self.queue_size)
        self.queues = [InflightQueue(self.buf, q * step, self.queue_size) for q in range(self.num_queues)]

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)
