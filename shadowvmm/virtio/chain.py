"""A descriptor chain as the device sees it (virtio v1.4 §2.7.5.2, §2.8.6), for both layouts.

:mod:`.split` and :mod:`.packed` device queues pop :class:`DescChain` objects.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

from ..memory import GuestMemory

_LENGTH = operator.itemgetter(1)     #: of a ``(gpa, length)`` buffer


def _pieces(bufs: list[tuple[int, int]], skip: int, length: int | None) -> Iterator[tuple[int, int]]:
    """``(gpa, bytes)`` of *bufs* covering *length* bytes (None: all) after the first *skip*;
    empty pieces are left out."""
    for gpa, size in bufs:
        if skip >= size:
            skip -= size
            continue
        gpa, size, skip = gpa + skip, size - skip, 0
        if length is not None:
            if length <= 0:
                return
            size = min(size, length)
            length -= size
        yield gpa, size


@dataclass(slots=True)
class DescChain:
    """One available buffer as the device sees it (v1.4 §2.7.5.2).

    The walk bounds how many buffers a chain has (:func:`walk_descriptors`), not how many
    bytes they span: a guest can point every descriptor at the same large buffer. A chain
    past 2^32 bytes (which drivers MUST NOT make, v1.4 §2.7.5.2) is not a broken ring here:
    the sums are exact, and every device limit is far below 2^32. Device code checks
    :attr:`readable_len` / :attr:`writable_len` against its own limits before it touches
    the buffers, and streams them (:meth:`segments`, guest memory views) instead of
    copying the chain whole.
    """

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]

    @property
    def readable_len(self) -> int:
        return sum(map(_LENGTH, self.readable))

    @property
    def writable_len(self) -> int:
        return sum(map(_LENGTH, self.writable))

    def segments(self, writable: bool, skip: int = 0,
                 length: int | None = None) -> list[tuple[int, int]]:
        """``(gpa, bytes)`` of the readable (or writable) buffers covering *length* bytes
        (None: to the end) after the first *skip*, without empty pieces."""
        return list(_pieces(self.writable if writable else self.readable, skip, length))

    def read(self, memory: GuestMemory, length: int | None = None) -> bytes:
        """The device-readable bytes (the first *length* if given), concatenated: a copy,
        so the caller bounds :attr:`readable_len` or *length* first."""
        first = self.readable[0] if self.readable else None
        if first is not None and (length is None and len(self.readable) == 1 or
                                  length is not None and 0 <= length <= first[1]):
            return memory.read(first[0], first[1] if length is None else length)
        return b"".join(memory.read(gpa, size) for gpa, size in _pieces(self.readable, 0, length))

    def write(self, memory: GuestMemory, data: bytes | memoryview, skip: int = 0) -> int:
        """Scatter *data* into the writable buffers after *skip* bytes; returns bytes written."""
        view = memoryview(data)
        done = 0
        for gpa, length in self.writable:
            if skip >= length:
                skip -= length
                continue
            room = length - skip
            chunk = view[done:done + room]
            if not chunk:
                break
            memory.write(gpa + skip, chunk)
            done += len(chunk)
            skip = 0
        return done
