"""Atomic access to a shared dirty log (vhost log layout).

A vhost-user backend sets bits in the log with atomic OR while the VMM
harvests it, so harvesting must fetch-and-clear each 64-bit word atomically
(QEMU: ``qatomic_xchg`` per chunk); a read followed by a clear would lose
the bits set in between. The atomics come from ``libatomic`` through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..errors import MigrationError
from ..memory import PAGE_SHIFT, DirtyLog

_SEQ_CST = 5


@dataclass(frozen=True)
class _Atomics:
    exchange_8: Any
    fetch_or_1: Any


@cache
def _libatomic() -> _Atomics:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
        exchange = getattr(lib, "__atomic_exchange_8")
        fetch_or = getattr(lib, "__atomic_fetch_or_1")
    except (OSError, AttributeError) as exc:
        raise MigrationError(f"libatomic is needed to share a dirty log with a backend: {exc}") from exc
    exchange.restype = ctypes.c_uint64
    exchange.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int)
    fetch_or.restype = ctypes.c_uint8
    fetch_or.argtypes = (ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int)
    return _Atomics(exchange, fetch_or)


def buffer_address(buf: mmap.mmap) -> int:
    """Address of a mapping (the temporary ctypes export is released at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def pages_of_word(index: int, word: int) -> list[int]:
    base = index << 6
    out = []
    while word:
        low = word & -word
        out.append(base + low.bit_length() - 1)
        word ^= low
    return out


class LogHarvester:
    """Fetch-and-clear the pages marked in a :class:`~shadowvmm.memory.DirtyLog`."""

    def __init__(self, log: DirtyLog) -> None:
        if log.size % 8:
            raise MigrationError(f"dirty log of {log.size} bytes is not a whole number of 64-bit words")
        self.log = log
        self._lib = _libatomic()
        self._addr = buffer_address(log.mmap)

    def fetch_and_clear(self) -> list[int]:
        """Dirty pages since the last call, ascending; each word is exchanged with 0 atomically."""
        view = memoryview(self.log.mmap).cast("Q")
        try:
            marked = [i for i, word in enumerate(view) if word]
        finally:
            view.release()
        xchg = self._lib.exchange_8
        pages: list[int] = []
        for index in marked:
            pages.extend(pages_of_word(index, xchg(self._addr + 8 * index, 0, _SEQ_CST)))
        limit = self.log.pages
        return [p for p in pages if p < limit]

    def mark_all(self) -> None:
        """Mark every page (a conservative resend)."""
        self.log.mark(0, self.log.pages << PAGE_SHIFT)


class AtomicMarker:
    """Marks pages in a shared log with atomic OR (the backend side of the log)."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self._buf = buf
        self._addr = buffer_address(buf)
        self._lib = _libatomic()
        self.pages = size * 8

    def mark(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = min((gpa + length - 1) >> PAGE_SHIFT, self.pages - 1)
        fetch_or = self._lib.fetch_or_1
        for page in range(first, last + 1):
            fetch_or(self._addr + (page >> 3), 1 << (page & 7), _SEQ_CST)
