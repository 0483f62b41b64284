"""Guest memory in a migration: its layout and identity in HELLO, the pre-copy rounds of the
copy model (source) and the pages an incoming attempt wrote (destination)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ShadowVmmError
from ..memory import PAGE_SHIFT, PAGE_SIZE, DirtyLog, GuestMemory
from ..timeline import EventKind, Tap
from .options import MigrationHooks, MigrationOptions, RoundInfo
from .report import MigrationReport
from .stream import PageBatch, RecordType, StreamWriter

log = logging.getLogger(__name__)

ZERO_PAGE = bytes(PAGE_SIZE)
#: Pages scanned between two chances for the guest to run during pre-copy.
SCAN_PAGES = 512

Outcome = asyncio.Future[dict[str, Any]]


def memory_layout(memory: GuestMemory) -> list[list[int]]:
    return [[r.gpa, r.size] for r in memory]


def memory_identity(memory: GuestMemory) -> list[list[int]]:
    """(st_dev, st_ino, fd offset) of each region's memfd: equal iff both sides map the same memory."""
    out = []
    for r in memory:
        st = os.fstat(r.fd)
        out.append([st.st_dev, st.st_ino, r.fd_offset])
    return out


def memory_digest(memory: GuestMemory) -> str:
    h = hashlib.sha256()
    for region in memory:
        h.update(struct.pack("<QQ", region.gpa, region.size))
        h.update(region.view)
    return h.hexdigest()


def page_gpas(memory: GuestMemory) -> Iterable[int]:
    for region in memory:
        yield from range(region.gpa, region.end, PAGE_SIZE)


def snapshot(memory: GuestMemory, gpas: Iterable[int], skip_zero: bool) -> list[tuple[int, bytes]]:
    """``(gpa, page)`` of each of *gpas* (zero pages left out when *skip_zero*)."""
    out = []
    for gpa in gpas:
        try:
            data = memory.read(gpa, PAGE_SIZE)
        except ShadowVmmError:
            continue
        if skip_zero and data == ZERO_PAGE:
            continue
        out.append((gpa, data))
    return out


async def send_pages(writer: StreamWriter, pages: list[tuple[int, bytes]], batch: int) -> None:
    for start in range(0, len(pages), batch):
        await writer.write(RecordType.PAGES, PageBatch(tuple(pages[start:start + batch])).pack())


async def _copy_chunk(memory: GuestMemory, writer: StreamWriter, gpas: list[int], skip_zero: bool,
                      batch: int) -> int:
    """Pre-copy one scan chunk, then let the guest run (it keeps dirtying memory meanwhile)."""
    pages = snapshot(memory, gpas, skip_zero)
    await send_pages(writer, pages, batch)
    await asyncio.sleep(0)
    return len(pages)


async def precopy(memory: GuestMemory, writer: StreamWriter, dirty_log: DirtyLog,
                  options: MigrationOptions, hooks: MigrationHooks, report: MigrationReport,
                  pending: set[int], clock: Callable[[], float],
                  check: Callable[[], None], timeline: Tap | None = None) -> None:
    """Round 0 sends every non-zero page; later rounds the dirty ones, until few remain.

    *check* runs before each round (it raises when the destination gave up); the pages still
    dirty after the last round go into *pending* for the stop-and-copy.
    """
    gpas: Iterable[int] = page_gpas(memory)
    for round_no in range(options.max_rounds):
        check()
        t_round = clock()
        sent = 0
        chunk: list[int] = []
        for gpa in gpas:
            chunk.append(gpa)
            if len(chunk) == SCAN_PAGES:
                sent += await _copy_chunk(memory, writer, chunk, round_no == 0, options.batch_pages)
                chunk = []
        sent += await _copy_chunk(memory, writer, chunk, round_no == 0, options.batch_pages)
        report.pages_sent += sent
        dirty = dirty_log.take()
        report.rounds = round_no + 1
        info = RoundInfo(round_no, sent, len(dirty), (clock() - t_round) * 1e3)
        report.round_info.append(info)
        await writer.write_map(RecordType.ROUND, {"round": round_no, "pages": sent})
        log.info("pre-copy round %d: %d pages sent, %d dirtied meanwhile (%.1f ms)",
                 round_no, sent, len(dirty), info.ms)
        if hooks.progress is not None:
            hooks.progress(info)
        if timeline is not None:
            timeline.record(EventKind.PRECOPY_ROUND, round=round_no, pages=sent, dirty=len(dirty))
        if len(dirty) <= options.converge_pages or round_no + 1 == options.max_rounds:
            pending.update(dirty)
            return
        gpas = [p << PAGE_SHIFT for p in dirty]


def final_pages(memory: GuestMemory, pending: set[int]) -> list[tuple[int, bytes]]:
    """Every page still to send after the stop (page numbers *pending*), zero pages included."""
    return snapshot(memory, ((p << PAGE_SHIFT) for p in sorted(pending)), False)


class PageSet:
    """Pages of *memory* an incoming migration wrote (a bitmap over its span), to zero them
    again when the attempt fails: the next attempt's first round skips the source's zero pages."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._bits = bytearray((memory.span // PAGE_SIZE + 7) // 8)

    def add(self, gpa: int) -> None:
        page = gpa >> PAGE_SHIFT
        self._bits[page >> 3] |= 1 << (page & 7)

    def zero(self) -> None:
        bits = self._bits
        for index, byte in enumerate(bits):
            if not byte:
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    self.memory.view(((index << 3) | bit) << PAGE_SHIFT, PAGE_SIZE)[:] = ZERO_PAGE
            bits[index] = 0
