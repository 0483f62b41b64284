"""Guest memory: memfd regions, GPA translation bounds, 16-bit index stores, dirty log, allocator."""

from __future__ import annotations

import mmap
import os
import stat

import pytest

from shadowvmm.errors import GuestMemoryError
from shadowvmm.memory import PAGE_SIZE, DirtyLog, GuestAllocator, GuestMemory

MiB = 1 << 20

#: Two regions with a hole: [0, 1 MiB) and [2 MiB, 3 MiB).
LAYOUT = [(0, MiB), (2 * MiB, MiB)]


@pytest.fixture
def mem():
    memory = GuestMemory.create(LAYOUT, name="t")
    yield memory
    memory.close()


# ---------------------------------------------------------------------------- regions


def test_regions_are_shared_memfds(mem):
    for index, region in enumerate(mem):
        target = os.readlink(f"/proc/self/fd/{region.fd}")
        assert target.startswith(f"/memfd:shadowvmm-t-{index}"), target
        st = os.fstat(region.fd)
        assert stat.S_ISREG(st.st_mode)
        assert st.st_size == region.size == MiB
        assert region.name == f"t-{index}"
        assert region.host_addr != 0


def test_write_through_second_mapping_is_seen_by_guest_memory(mem):
    region = mem.regions[1]
    other = mmap.mmap(region.fd, region.size, mmap.MAP_SHARED)
    try:
        other[0x123:0x128] = b"hello"
        assert mem.read(2 * MiB + 0x123, 5) == b"hello"
        # and the other direction: a GuestMemory write shows in the second mapping
        mem.write(2 * MiB + 0x2000, b"\x01\x02\x03")
        assert other[0x2000:0x2003] == b"\x01\x02\x03"
        # load_u16 goes through the same pages
        other[0x10:0x12] = (0xBEEF).to_bytes(2, "little")
        assert mem.load_u16(2 * MiB + 0x10) == 0xBEEF
    finally:
        other.close()


def test_multi_region_layout_with_hole(mem):
    assert [(r.gpa, r.size, r.end) for r in mem] == [(0, MiB, MiB), (2 * MiB, MiB, 3 * MiB)]
    assert mem.span == 3 * MiB
    region, offset = mem.translate(2 * MiB + 5, 10)
    assert region is mem.regions[1] and offset == 5
    region, offset = mem.translate(MiB - 4, 4)
    assert region is mem.regions[0] and offset == MiB - 4
    # regions are independent: writes in one do not appear in the other
    mem.write(0x10, b"A")
    mem.write(2 * MiB + 0x10, b"B")
    assert mem.read(0x10, 1) == b"A" and mem.read(2 * MiB + 0x10, 1) == b"B"


def test_layout_sorted_and_overlap_rejected():
    memory = GuestMemory.create([(2 * MiB, MiB), (0, MiB)])
    try:
        assert [r.gpa for r in memory] == [0, 2 * MiB]
    finally:
        memory.close()
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemory.create([(0, 2 * MiB), (MiB, MiB)])


@pytest.mark.parametrize("layout", [[(0, 0)], [(0, 100)], [(0x800, PAGE_SIZE)], [(0, -PAGE_SIZE)]])
def test_layout_must_be_page_multiples(layout):
    with pytest.raises(GuestMemoryError):
        GuestMemory.create(layout)


# ---------------------------------------------------------------------------- translate bounds

BAD_ACCESSES = [
    pytest.param(MiB - 4, 8, id="straddles-end-of-region0-into-hole"),
    pytest.param(MiB, 1, id="hole-start"),
    pytest.param(MiB + 0x8000, 4, id="inside-hole"),
    pytest.param(2 * MiB - 2, 4, id="straddles-hole-into-region1"),
    pytest.param(0, 3 * MiB, id="straddles-both-regions"),
    pytest.param(3 * MiB - 1, 2, id="past-end"),
    pytest.param(3 * MiB, 1, id="at-span"),
    pytest.param(3 * MiB + 0x1000, 0, id="zero-length-past-end"),
    pytest.param(MiB + 0x1000, 0, id="zero-length-in-hole"),
    pytest.param(-1, 1, id="negative-gpa"),
    pytest.param(-1, 0, id="negative-gpa-zero-length"),
    pytest.param(-(1 << 63), 8, id="very-negative-gpa"),
    pytest.param(1 << 64, 1, id="gpa-2^64"),
    pytest.param((1 << 64) - 1, 2, id="gpa-u64-max"),
    pytest.param(1 << 200, 4, id="gpa-huge"),
    pytest.param(0, -1, id="negative-length"),
    pytest.param(0, 1 << 70, id="huge-length"),
]


@pytest.mark.parametrize("gpa,length", BAD_ACCESSES)
def test_translate_out_of_bounds_raises_guest_memory_error_only(mem, gpa, length):
    with pytest.raises(GuestMemoryError):
        mem.translate(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)
    if 0 <= length <= 4096:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, bytes(length))


@pytest.mark.parametrize("gpa", [MiB, MiB + 0x1000, 3 * MiB, 3 * MiB + 2, -2, -4096, 1 << 64])
def test_fixed_width_accessors_out_of_bounds(mem, gpa):
    for call in (lambda: mem.load_u16(gpa), lambda: mem.store_u16(gpa, 1),
                 lambda: mem.load_u32(gpa), lambda: mem.store_u32(gpa, 1),
                 lambda: mem.load_u64(gpa)):
        with pytest.raises(GuestMemoryError):
            call()


def test_fixed_width_accessors_straddling_the_hole(mem):
    assert mem.load_u16(MiB - 2) == 0                 # the last u16 fits
    for call in (lambda: mem.load_u32(MiB - 2), lambda: mem.store_u32(MiB - 2, 1),
                 lambda: mem.load_u64(MiB - 4), lambda: mem.load_u32(3 * MiB - 2)):
        with pytest.raises(GuestMemoryError):
            call()


def test_out_of_bounds_write_changes_nothing(mem):
    mem.enable_dirty_log()
    with pytest.raises(GuestMemoryError):
        mem.write(MiB - 2, b"\xff" * 4)
    assert mem.read(MiB - 2, 2) == b"\0\0"
    assert mem.dirty_log.dirty_pages() == []


def test_zero_length_inside_memory_is_empty(mem):
    assert mem.read(0x100, 0) == b""
    assert len(mem.view(2 * MiB, 0)) == 0
    region, offset = mem.translate(2 * MiB + 8, 0)
    assert region is mem.regions[1] and offset == 8


def test_empty_memory_refuses_everything():
    memory = GuestMemory([])
    assert memory.span == 0
    with pytest.raises(GuestMemoryError):
        memory.translate(0, 0)


# ---------------------------------------------------------------------------- 16-bit stores


def test_store_load_u16_aligned(mem):
    mem.store_u16(0x100, 0x1234)
    assert mem.read(0x100, 2) == b"\x34\x12"
    assert mem.load_u16(0x100) == 0x1234
    mem.store_u16(2 * MiB + 0x2, 0x1FFFF)          # masked to 16 bits
    assert mem.load_u16(2 * MiB + 0x2) == 0xFFFF
    assert mem.read(2 * MiB + 0x4, 1) == b"\0"      # neighbour untouched
    mem.store_u16(3 * MiB - 2, 7)                   # last aligned u16 of memory
    assert mem.load_u16(3 * MiB - 2) == 7


@pytest.mark.parametrize("gpa", [0x101, 1, 2 * MiB + 3, 3 * MiB - 3])
def test_u16_unaligned_refused(mem, gpa):
    before = mem.read(gpa - 1, 3)
    with pytest.raises(GuestMemoryError, match="unaligned"):
        mem.store_u16(gpa, 0xABCD)
    with pytest.raises(GuestMemoryError, match="unaligned"):
        mem.load_u16(gpa)
    assert mem.read(gpa - 1, 3) == before


def test_u32_u64_accessors(mem):
    mem.store_u32(0x200, 0xDEADBEEF)
    assert mem.read(0x200, 4) == b"\xef\xbe\xad\xde"
    assert mem.load_u32(0x200) == 0xDEADBEEF
    mem.write(0x300, (0x0102030405060708).to_bytes(8, "little"))
    assert mem.load_u64(0x300) == 0x0102030405060708


# ---------------------------------------------------------------------------- dirty log


def test_no_dirty_log_until_enabled(mem):
    assert mem.dirty_log is None
    mem.write(0x5000, b"x")
    mem.store_u16(0x6000, 1)
    mem.store_u32(0x7000, 1)
    log = mem.enable_dirty_log()
    assert mem.enable_dirty_log() is log            # idempotent
    assert log.dirty_pages() == []                  # earlier writes were not logged


def test_dirty_log_marks_written_pages(mem):
    log = mem.enable_dirty_log()
    assert log.pages == 3 * MiB // PAGE_SIZE
    mem.write(0x5000, b"x")                          # page 5
    mem.store_u16(0x6002, 1)                         # page 6
    mem.store_u32(2 * MiB + 0x10, 1)                 # page 512
    mem.write(0x8FFE, b"abcd")                       # straddles pages 8 and 9
    mem.write(2 * MiB + 3 * PAGE_SIZE, bytes(2 * PAGE_SIZE))  # pages 515, 516 (exactly)
    assert log.dirty_pages() == [5, 6, 8, 9, 512, 515, 516]
    # bit layout is vhost's: page p -> bit p % 8 of byte p // 8
    raw = log.mmap[:]
    assert raw[0] == 0b0110_0000 and raw[1] == 0b0000_0011
    assert raw[64] == 0b0001_1001


def test_dirty_log_ignores_reads_and_zero_length(mem):
    log = mem.enable_dirty_log()
    mem.read(0x1000, 16)
    mem.load_u16(0x2000)
    mem.load_u32(0x3000)
    mem.load_u64(0x4000)
    mem.write(0xA000, b"")
    assert log.dirty_pages() == []


def test_dirty_log_take_clears(mem):
    log = mem.enable_dirty_log()
    mem.write(0x3000, b"x")
    mem.write(0x1000, b"y")
    assert log.dirty_pages() == [1, 3]
    assert log.dirty_pages() == [1, 3]               # dirty_pages does not clear
    assert log.take() == [1, 3]
    assert log.take() == []
    assert log.dirty_pages() == []
    mem.write(0x1000, b"z")
    assert log.take() == [1]


def test_dirty_log_disable_stops_marking(mem):
    log = mem.enable_dirty_log()
    fd = log.fd
    mem.disable_dirty_log()
    assert mem.dirty_log is None
    with pytest.raises(OSError):
        os.fstat(fd)                                  # its memfd was closed
    mem.write(0x1000, b"x")                           # no log, no error
    assert mem.enable_dirty_log().dirty_pages() == []


def test_dirty_log_is_shared_memfd():
    log = DirtyLog(64 * PAGE_SIZE + 1)
    try:
        assert log.pages == 65
        assert log.size == 16                          # rounded to u64 words
        assert os.readlink(f"/proc/self/fd/{log.fd}").startswith("/memfd:shadowvmm-dirty-log")
        other = mmap.mmap(log.fd, log.size, mmap.MAP_SHARED)
        try:
            log.mark(64 * PAGE_SIZE, 1)
            assert other[8] == 1                        # visible through another mapping
            other[0] = 0x80                             # a backend marking page 7
            assert log.dirty_pages() == [7, 64]
            log.mark(100 * PAGE_SIZE, 1)                # beyond the span: ignored
            log.mark(0, 0)
            assert log.take() == [7, 64]
            assert other[:] == bytes(16)
        finally:
            other.close()
    finally:
        log.close()


# ---------------------------------------------------------------------------- allocator


def test_allocator_alignment_and_zeroing(mem):
    mem.write(0x1000, b"\xff" * 0x200)
    alloc = GuestAllocator(mem, start=0x1001)
    a = alloc.alloc(10)                               # default 16-byte alignment
    assert a == 0x1010
    b = alloc.alloc(3, align=2)
    assert b == 0x101A
    c = alloc.alloc(1, align=4096)
    assert c == 0x2000
    d = alloc.alloc(8, align=1)
    assert d == 0x2001
    assert mem.read(a, 10) == bytes(10)               # allocations are zeroed
    assert mem.read(b, 3) == bytes(3)
    assert mem.read(0x101D, 1) == b"\xff"             # ...and only the allocation
    for gpa, align in ((a, 16), (b, 2), (c, 4096)):
        assert gpa % align == 0


def test_allocator_defaults_to_whole_memory(mem):
    alloc = GuestAllocator(mem)
    assert alloc.next == 0 and alloc.end == 3 * MiB
    assert alloc.alloc(16) == 0


def test_allocator_exhaustion(mem):
    alloc = GuestAllocator(mem, start=0x1000, end=0x2000)
    assert alloc.alloc(0x800) == 0x1000
    assert alloc.alloc(0x800) == 0x1800
    with pytest.raises(GuestMemoryError, match="exhausted"):
        alloc.alloc(1)
    assert alloc.next == 0x2000                       # a failed alloc does not advance
    alloc = GuestAllocator(mem, start=0x1001, end=0x2000)
    with pytest.raises(GuestMemoryError, match="exhausted"):
        alloc.alloc(0x100, align=0x1000)              # alignment pushes it past the end
    assert alloc.alloc(0x100) == 0x1010               # unaligned it still fits


def test_allocator_refuses_the_hole(mem):
    alloc = GuestAllocator(mem, start=MiB - 0x100)
    with pytest.raises(GuestMemoryError):
        alloc.alloc(0x200)                            # would straddle into the hole
    assert alloc.next == MiB - 0x100
    assert alloc.alloc(0x100) == MiB - 0x100          # exactly up to the region end is fine


def test_dirty_log_take_loses_no_bit_marked_concurrently():
    """A backend thread marks through its own view of the log while the VMM takes it:
    every page marked shows up in exactly one take (atomic OR against atomic exchange)."""
    import threading

    log = DirtyLog(1 << 12 << 12)
    backend = DirtyLog.over(log.mmap, log.size)
    pages = list(range(1 << 12))
    taken: list[int] = []
    done = threading.Event()

    def mark() -> None:
        for page in pages:
            backend.mark(page * PAGE_SIZE, 1)
        done.set()

    thread = threading.Thread(target=mark)
    try:
        thread.start()
        while not done.is_set():
            taken.extend(log.take())
        thread.join()
        taken.extend(log.take())
        assert set(taken) == set(pages)
        assert log.take() == [] and log.dirty_pages() == []
    finally:
        backend.close()                  # not the owner: leaves the mapping alone
        assert not log.mmap.closed
        log.close()


# ---------------------------------------------------------------------------- aliases


def test_alias_maps_parent_ranges_at_new_addresses(mem):
    """L2 RAM inside L1's: [0, 64 KiB) of the alias is [2 MiB + 64 KiB, +64 KiB) of the parent."""
    alias = GuestMemory.alias(mem, [(0, 2 * MiB + 0x10000, 0x10000), (0x40000, 0x3000, PAGE_SIZE)], name="l2")
    try:
        first, second = alias.regions
        assert (first.gpa, first.parent_gpa, first.size, first.fd_offset) == (0, 2 * MiB + 0x10000, 0x10000, 0x10000)
        assert (second.gpa, second.parent_gpa, second.fd_offset) == (0x40000, 0x3000, 0x3000)
        assert os.fstat(first.fd).st_ino == os.fstat(mem.regions[1].fd).st_ino and first.fd != mem.regions[1].fd
        alias.write(0x123, b"nested")
        assert mem.read(2 * MiB + 0x10123, 6) == b"nested"
        assert mem.read(0x123, 6) != b"nested"
        mem.write(0x3010, b"up")
        assert alias.read(0x40010, 2) == b"up"
        with pytest.raises(GuestMemoryError):
            alias.read(0x10000, 1)              # past the alias: not the parent's next byte
        # the file offset is what a vhost-user back-end maps (mmap_offset)
        other = mmap.mmap(first.fd, PAGE_SIZE, mmap.MAP_SHARED, offset=first.fd_offset)
        try:
            assert other[0x123:0x129] == b"nested"
        finally:
            other.close()
    finally:
        alias.close()
    assert mem.read(2 * MiB + 0x10123, 6) == b"nested"     # the parent outlives its alias


@pytest.mark.parametrize("layout", [
    [(0, 0x100, PAGE_SIZE)],                    # not page aligned
    [(0, MiB - PAGE_SIZE, 2 * PAGE_SIZE)],      # straddles the parent's hole
    [(0, 4 * MiB, PAGE_SIZE)],                  # outside the parent
    [(0, 0, 2 * PAGE_SIZE), (PAGE_SIZE, 0x10000, PAGE_SIZE)],   # the alias ranges overlap
])
def test_alias_refuses_bad_layouts_and_leaks_nothing(mem, layout):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(GuestMemoryError):
        GuestMemory.alias(mem, layout)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("layout", [[(0x10000, 0x10000)], [(0, 0x10000), (0x10000, 0x10000)]])
def test_u16_loads_are_bounded_alike_with_one_region_or_several(layout: list[tuple[int, int]]) -> None:
    """A single-region memory loads ring indexes without a search; its bounds and alignment
    checks are those of any layout."""
    memory = GuestMemory.create(layout, name="u16")
    try:
        last = memory.span - 2
        memory.store_u16(0x10000, 0xBEEF)
        memory.store_u16(last, 0x1234)
        assert memory.load_u16(0x10000) == 0xBEEF and memory.load_u16(last) == 0x1234
        for bad in (0x10001, memory.span, memory.span + 0x1000, -2) + ((0xFFFE,) if len(layout) == 1 else ()):
            with pytest.raises(GuestMemoryError):
                memory.load_u16(bad)
    finally:
        memory.close()
    with pytest.raises(GuestMemoryError):
        memory.load_u16(0x10000)
