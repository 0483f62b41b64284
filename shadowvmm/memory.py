"""Guest memory: memfd-backed regions, GPA translation, dirty bitmap.

Every region is a memfd mapped ``MAP_SHARED`` so it can be handed to an
out-of-process backend (vhost-user SET_MEM_TABLE, vhost-vdpa IOTLB) and both
sides see the same pages; its size is sealed, so no backend can truncate it
under the VMM's mappings (SIGBUS). All guest-physical accesses go through
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
import ctypes.util
import fcntl
import functools
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import GuestMemoryError

PAGE_SIZE = 4096
PAGE_SHIFT = 12

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


#: Seals every memfd shared with a backend gets once sized: nobody (a backend included) can
#: shrink it, which would SIGBUS every process mapping it, or grow it, or change the seals.
_MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int) -> int:
    """A memfd of *size* bytes whose size is sealed (as QEMU's memfd backend seals guest RAM)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
    #: For an alias (:meth:`GuestMemory.alias`): where the range sits in the parent address space
    #: (L2 RAM inside L1's: its L1 guest-physical address; an IOVA range: the GPA it maps).
    parent_gpa: int | None = None
    view: memoryview = field(init=False, repr=False)
    view16: memoryview = field(init=False, repr=False)
    #: 32- and 64-bit views (one store per aligned element: ring batches write through them)
    view32: memoryview = field(init=False, repr=False)
    view64: memoryview = field(init=False, repr=False)
    host_addr: int = field(init=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mmap)
        self.view16 = self.view.cast("H")
        self.view32 = self.view.cast("I")
        self.view64 = self.view.cast("Q")
        self.host_addr = _host_address(self.mmap)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def close(self) -> None:
        for view in (self.view64, self.view32, self.view16, self.view):
            view.release()
        self.mmap.close()
        os.close(self.fd)


_SEQ_CST = 5


@dataclass(frozen=True)
class _Atomics:
    exchange_8: Any
    fetch_or_1: Any


@functools.cache
def _libatomic() -> _Atomics:
    """GCC's ``__atomic`` helpers from libatomic, through ctypes."""
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
        exchange = getattr(lib, "__atomic_exchange_8")
        fetch_or = getattr(lib, "__atomic_fetch_or_1")
    except (OSError, AttributeError) as exc:
        raise GuestMemoryError(f"libatomic is needed for a dirty log shared with a backend: {exc}") from exc
    exchange.restype = ctypes.c_uint64
    exchange.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int)
    fetch_or.restype = ctypes.c_uint8
    fetch_or.argtypes = (ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int)
    return _Atomics(exchange, fetch_or)


class DirtyLog:
    """Dirty-page bitmap, one bit per 4 KiB guest page, in a shared memfd.

    The layout is the vhost log layout (bit ``p % 8`` of byte ``p // 8`` is
    page ``p``), so the same memfd can be given to a vhost-user backend with
    SET_LOG_BASE and both sides mark into it. Because the other side marks
    concurrently, marking is an atomic OR per byte and :meth:`take` exchanges
    each 64-bit word with 0 (QEMU: ``qatomic_xchg`` per chunk): a read followed
    by a clear would lose the bits set in between.
    """

    def __init__(self, span: int) -> None:
        pages = (span + PAGE_SIZE - 1) >> PAGE_SHIFT
        size = max(8, ((pages + 63) // 64) * 8)
        fd = sealed_memfd("shadowvmm-dirty-log", size)
        try:
            buf = mmap.mmap(fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self._setup(buf, size, pages, fd)

    @classmethod
    def over(cls, buf: mmap.mmap, size: int) -> DirtyLog:
        """A log over a mapping someone else owns (a backend given SET_LOG_BASE); not closed here."""
        log = cls.__new__(cls)
        log._setup(buf, size, size * 8, -1)
        return log

    def _setup(self, buf: mmap.mmap, size: int, pages: int, fd: int) -> None:
        if size % 8 or size > len(buf):
            raise GuestMemoryError(f"dirty log of {size} bytes: not whole 64-bit words inside its mapping")
        self.mmap, self.size, self.pages, self.fd = buf, size, pages, fd
        atomics = _libatomic()
        self._fetch_or, self._exchange = atomics.fetch_or_1, atomics.exchange_8
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def mark(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = min((gpa + length - 1) >> PAGE_SHIFT, self.pages - 1)
        fetch_or, addr = self._fetch_or, self._addr
        for page in range(first, last + 1):
            fetch_or(addr + (page >> 3), 1 << (page & 7), _SEQ_CST)

    def mark_all(self) -> None:
        """Mark every page (a conservative resend)."""
        self.mark(0, self.pages << PAGE_SHIFT)

    def _marked_words(self) -> list[int]:
        view = memoryview(self.mmap)[:self.size].cast("Q")
        try:
            return [i for i, word in enumerate(view) if word]
        finally:
            view.release()

    def dirty_pages(self) -> list[int]:
        """Pages currently marked, in ascending order (does not clear)."""
        view = memoryview(self.mmap)[:self.size].cast("Q")
        try:
            pages = [p for i in self._marked_words() for p in _pages_of_word(i, view[i])]
        finally:
            view.release()
        return [p for p in pages if p < self.pages]

    def take(self) -> list[int]:
        """The dirty pages, ascending, clearing them: each marked word is exchanged with 0."""
        exchange, addr = self._exchange, self._addr
        pages: list[int] = []
        for index in self._marked_words():
            pages.extend(_pages_of_word(index, exchange(addr + 8 * index, 0, _SEQ_CST)))
        return [p for p in pages if p < self.pages]

    def close(self) -> None:
        if self.fd >= 0:
            self.mmap.close()
            os.close(self.fd)
            self.fd = -1


def _pages_of_word(index: int, word: int) -> list[int]:
    """Pages whose bits are set in 64-bit word *index* of the log (little-endian)."""
    base = index << 6
    out = []
    while word:
        low = word & -word
        out.append(base + low.bit_length() - 1)
        word ^= low
    return out


class GuestMemory:
    """The guest-physical address space: sorted, non-overlapping regions."""

    def __init__(self, regions: Iterable[MemoryRegion]) -> None:
        self.regions: list[MemoryRegion] = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise GuestMemoryError(f"regions overlap at {b.gpa:#x}")
        self._starts = [r.gpa for r in self.regions]
        self.dirty_log: DirtyLog | None = None
        #: The only region's start, end and 16-bit view (ring index loads skip translate), if one.
        self._one16: tuple[int, int, memoryview] | None = None
        if len(self.regions) == 1:
            only = self.regions[0]
            self._one16 = (only.gpa, only.end, only.view16)

    @classmethod
    def create(cls, layout: Iterable[tuple[int, int]], name: str = "guest") -> GuestMemory:
        """Allocate one memfd per ``(gpa, size)`` entry of *layout*, its size sealed
        (:func:`sealed_memfd`): a backend that truncates it fails with EPERM."""
        regions = []
        try:
            for index, (gpa, size) in enumerate(layout):
                if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
                    raise GuestMemoryError(
                        f"region {index}: gpa {gpa:#x} and size {size:#x} must be page multiples")
                fd = sealed_memfd(f"shadowvmm-{name}-{index}", size)
                try:
                    buf = mmap.mmap(fd, size, mmap.MAP_SHARED)
                except BaseException:
                    os.close(fd)
                    raise
                regions.append(MemoryRegion(gpa, size, fd, buf, name=f"{name}-{index}"))
            return cls(regions)
        except BaseException:
            for region in regions:
                region.close()
            raise

    @classmethod
    def alias(cls, parent: GuestMemory, layout: Iterable[tuple[int, int, int]],
              name: str = "alias") -> GuestMemory:
        """An address space whose ``(gpa, parent_gpa, size)`` ranges are ranges of *parent*.

        Nothing is copied: each region maps the same memfd as the parent region holding
        ``[parent_gpa, parent_gpa+size)``, at the matching file offset (``fd_offset``, the
        vhost-user ``mmap_offset``), through its own fd (a dup) and mapping, so the alias is
        closed on its own and stays valid however long its user keeps it. This is how a
        nested guest's RAM lives inside its hypervisor's (L2 GPA -> L1 GPA) and how an IOMMU's
        IOVA space maps guest memory (IOVA -> GPA). Every range must be page aligned and lie
        wholly inside one parent region.
        """
        regions: list[MemoryRegion] = []
        try:
            for index, (gpa, parent_gpa, size) in enumerate(layout):
                if size <= 0 or (gpa | parent_gpa | size) % PAGE_SIZE:
                    raise GuestMemoryError(f"alias {index}: gpa {gpa:#x}, parent gpa {parent_gpa:#x} and "
                                           f"size {size:#x} must be page multiples")
                source, offset = parent.translate(parent_gpa, size)
                fd_offset = source.fd_offset + offset
                fd = os.dup(source.fd)
                try:
                    buf = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=fd_offset)
                except BaseException:
                    os.close(fd)
                    raise
                regions.append(MemoryRegion(gpa, size, fd, buf, fd_offset, f"{name}-{index}", parent_gpa))
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
        one = self._one16
        if one is not None and not gpa & 1 and one[0] <= gpa < one[1]:
            return one[2][(gpa - one[0]) >> 1]
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
        self._one16 = None


class GuestAllocator:
    """First-fit allocator over guest-physical memory, for guest driver models.

    The free list is sorted and coalesced. An allocation takes the alignment padding
    in front of it from its free block too (returned with it by :meth:`free`), so
    consecutive allocations pack as a bump allocator's would. Allocations are
    zero-filled, and one that would straddle a region boundary or a hole is refused
    by :meth:`GuestMemory.translate`.
    """

    def __init__(self, memory: GuestMemory, start: int | None = None, end: int | None = None) -> None:
        self.memory = memory
        self.start = memory.regions[0].gpa if start is None else start
        self.end = memory.span if end is None else end
        self._free_starts: list[int] = [self.start] if self.end > self.start else []
        self._free_ends: list[int] = [self.end] if self.end > self.start else []
        #: gpa handed out -> the block ``[first, last)`` it holds (padding included).
        self._blocks: dict[int, tuple[int, int]] = {}
        self.free_bytes = max(self.end - self.start, 0)

    @property
    def next(self) -> int:
        """One past the highest byte in use (*start* when nothing is allocated)."""
        return max((last for _, last in self._blocks.values()), default=self.start)

    @property
    def allocations(self) -> int:
        """How many allocations are live."""
        return len(self._blocks)

    def alloc(self, size: int, align: int = 16) -> int:
        """A zeroed block of *size* bytes at a multiple of *align* (a power of 2)."""
        if size < 1 or align < 1 or align & (align - 1):
            raise GuestMemoryError(f"bad allocation: {size} bytes aligned to {align}")
        starts, ends = self._free_starts, self._free_ends
        for index in range(len(starts)):
            first, last = starts[index], ends[index]
            gpa = (first + align - 1) & ~(align - 1)
            if gpa + size <= last:
                break
        else:
            raise GuestMemoryError(f"guest allocator exhausted ({size} bytes wanted, "
                                   f"{self.free_bytes} free)")
        self.memory.translate(gpa, size)
        if gpa + size == last:
            del starts[index], ends[index]
        else:
            starts[index] = gpa + size
        self._blocks[gpa] = (first, gpa + size)
        self.free_bytes -= gpa + size - first
        self.memory.view(gpa, size)[:] = bytes(size)
        return gpa

    def free(self, gpa: int) -> None:
        """Give back the block :meth:`alloc` returned as *gpa*, merging it with free neighbours."""
        block = self._blocks.pop(gpa, None)
        if block is None:
            raise GuestMemoryError(f"free of {gpa:#x}: not an allocated block (double free?)")
        first, last = block
        starts, ends = self._free_starts, self._free_ends
        index = bisect.bisect_left(starts, first)
        merge_prev = index > 0 and ends[index - 1] == first
        merge_next = index < len(starts) and starts[index] == last
        if merge_prev and merge_next:
            ends[index - 1] = ends[index]
            del starts[index], ends[index]
        elif merge_prev:
            ends[index - 1] = last
        elif merge_next:
            starts[index] = first
        else:
            starts.insert(index, first)
            ends.insert(index, last)
        self.free_bytes += last - first
