"""Guest memory: memfd-backed regions, GPA translation, dirty bitmap.

Every region is a memfd mapped ``MAP_SHARED`` so it can be handed to an
out-of-process backend (vhost-user SET_MEM_TABLE, vhost-vdpa IOTLB) and both
sides see the same pages. All guest-physical accesses go through
:meth:`GuestMemory.translate`, which refuses anything that is not wholly
inside one region: a descriptor pointing outside guest memory raises
:class:`~shadowvmm.errors.GuestMemoryError`, it never reads or writes out of
bounds.

Ring indexes must be published with a single 16-bit store (a polling backend
would otherwise observe a torn index): :meth:`GuestMemory.store_u16` uses a
``memoryview.cast('H')`` element store, which is one aligned 16-bit write.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .errors import GuestMemoryError

PAGE_SIZE = 4096
PAGE_SHIFT = 12

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _host_address(buf: mmap.mmap) -> int:
    """Host virtual address of a mapping (vhost's ``userspace_addr``)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous guest-physical range backed by (part of) a memfd."""

    gpa: int
    size: int
    fd: int
    mmap: mmap.mmap
    fd_offset: int = 0
    name: str = ""
    view: memoryview = field(init=False, repr=False)
    view16: memoryview = field(init=False, repr=False)
    host_addr: int = field(init=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mmap)
        self.view16 = self.view.cast("H")
        self.host_addr = _host_address(self.mmap)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def close(self) -> None:
        self.view16.release()
        self.view.release()
        self.mmap.close()
        os.close(self.fd)


class DirtyLog:
    """Dirty-page bitmap, one bit per 4 KiB guest page, in a shared memfd.

    The layout is the vhost log layout (bit ``p % 8`` of byte ``p // 8`` is
    page ``p``), so the same memfd can be given to a vhost-user backend with
    SET_LOG_BASE and both sides mark into it.
    """

    def __init__(self, span: int) -> None:
        pages = (span + PAGE_SIZE - 1) >> PAGE_SHIFT
        self.size = max(8, ((pages + 63) // 64) * 8)
        self.fd = os.memfd_create("shadowvmm-dirty-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
        self.pages = pages

    def mark(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        buf = self.mmap
        for page in range(first, min(last, self.pages - 1) + 1):
            buf[page >> 3] |= 1 << (page & 7)

    def dirty_pages(self) -> list[int]:
        """Pages currently marked, in ascending order (does not clear)."""
        out = []
        data = self.mmap[:]
        for byte_index, byte in enumerate(data):
            if byte:
                base = byte_index << 3
                for bit in range(8):
                    if byte >> bit & 1:
                        out.append(base + bit)
        return out

    def take(self) -> list[int]:
        """Return the dirty pages and clear the bitmap."""
        pages = self.dirty_pages()
        self.mmap[:] = bytes(self.size)
        return pages

    def close(self) -> None:
        self.mmap.close()
        os.close(self.fd)


class GuestMemory:
    """The guest-physical address space: sorted, non-overlapping regions."""

    def __init__(self, regions: Iterable[MemoryRegion]) -> None:
        self.regions: list[MemoryRegion] = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise GuestMemoryError(f"regions overlap at {b.gpa:#x}")
        self._starts = [r.gpa for r in self.regions]
        self.dirty_log: DirtyLog | None = None

    @classmethod
    def create(cls, layout: Iterable[tuple[int, int]], name: str = "guest") -> "GuestMemory":
        """Allocate one memfd per ``(gpa, size)`` entry of *layout*."""
        regions = []
        try:
            for index, (gpa, size) in enumerate(layout):
                if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
                    raise GuestMemoryError(
                        f"region {index}: gpa {gpa:#x} and size {size:#x} must be page multiples")
                fd = os.memfd_create(f"shadowvmm-{name}-{index}", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
                regions.append(MemoryRegion(gpa, size, fd, mmap.mmap(fd, size, mmap.MAP_SHARED),
                                            name=f"{name}-{index}"))
            return cls(regions)
        except BaseException:
            for region in regions:
                region.close()
            raise

    @property
    def span(self) -> int:
        """One past the highest guest-physical address."""
        return self.regions[-1].end if self.regions else 0

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    def translate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        """Region and offset of ``[gpa, gpa+length)``; it must lie in one region."""
        if len(self.regions) == 1:      # the common layout: no search
            region = self.regions[0]
            offset = gpa - region.gpa
            if offset >= 0 and length >= 0 and offset + length <= region.size:
                return region, offset
            raise GuestMemoryError(f"guest access [{gpa:#x}, +{length:#x}) is outside guest memory")
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index >= 0 and length >= 0:
            region = self.regions[index]
            offset = gpa - region.gpa
            if offset + length <= region.size:
                return region, offset
        raise GuestMemoryError(f"guest access [{gpa:#x}, +{length:#x}) is outside guest memory")

    def view(self, gpa: int, length: int) -> memoryview:
        """Zero-copy view of guest memory (bounds checked)."""
        region, offset = self.translate(gpa, length)
        return region.view[offset:offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        region, offset = self.translate(gpa, length)
        return region.mmap[offset:offset + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write *data* at *gpa* (device-side writes are dirty-logged)."""
        length = len(data)
        region, offset = self.translate(gpa, length)
        region.view[offset:offset + length] = data
        if self.dirty_log is not None:
            self.dirty_log.mark(gpa, length)

    def load_u16(self, gpa: int) -> int:
        """Single 16-bit load (ring indexes); *gpa* must be 2-byte aligned."""
        if gpa & 1:
            raise GuestMemoryError(f"unaligned 16-bit access at {gpa:#x}")
        region, offset = self.translate(gpa, 2)
        return region.view16[offset >> 1]

    def store_u16(self, gpa: int, value: int) -> None:
        """Single 16-bit store (ring indexes); *gpa* must be 2-byte aligned."""
        if gpa & 1:
            raise GuestMemoryError(f"unaligned 16-bit access at {gpa:#x}")
        region, offset = self.translate(gpa, 2)
        region.view16[offset >> 1] = value & 0xFFFF
        if self.dirty_log is not None:
            self.dirty_log.mark(gpa, 2)

    def load_u32(self, gpa: int) -> int:
        region, offset = self.translate(gpa, 4)
        return _U32.unpack_from(region.mmap, offset)[0]

    def store_u32(self, gpa: int, value: int) -> None:
        region, offset = self.translate(gpa, 4)
        _U32.pack_into(region.mmap, offset, value)
        if self.dirty_log is not None:
            self.dirty_log.mark(gpa, 4)

    def load_u64(self, gpa: int) -> int:
        region, offset = self.translate(gpa, 8)
        return _U64.unpack_from(region.mmap, offset)[0]

    def enable_dirty_log(self) -> DirtyLog:
        if self.dirty_log is None:
            self.dirty_log = DirtyLog(self.span)
        return self.dirty_log

    def disable_dirty_log(self) -> None:
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None

    def close(self) -> None:
        self.disable_dirty_log()
        for region in self.regions:
            region.close()
        self.regions = []
        self._starts = []


class GuestAllocator:
    """Bump allocator over guest-physical memory, for guest driver models."""

    def __init__(self, memory: GuestMemory, start: int | None = None, end: int | None = None) -> None:
        self.memory = memory
        self.next = memory.regions[0].gpa if start is None else start
        self.end = memory.span if end is None else end

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self.next + align - 1) & ~(align - 1)
        if gpa + size > self.end:
            raise GuestMemoryError(f"guest allocator exhausted ({size} bytes wanted)")
        self.memory.translate(gpa, size)
        self.next = gpa + size
        self.memory.view(gpa, size)[:] = bytes(size)
        return gpa
