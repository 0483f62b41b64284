"""Which buffers of a split ring are outstanding, as seen from outside both ends.

A back-end that dies takes its ``last_avail_idx`` and the set of requests it
had fetched with it. Resuming from the used index alone (what QEMU does
without INFLIGHT_SHMFD) is exact only when every request completed in order;
virtio-blk back-ends complete out of order, so some requests would run
twice and others never complete.

A :class:`SplitLedger` follows the avail and used rings (v1.4 §2.7.6,
§2.7.8) by sampling them: every head the driver made available and the
device has not used is outstanding. Heads alternate between the two rings
(a head is reused only after its completion), so each used entry completes
the oldest available occurrence of its head. The ledger stays exact while
fewer than a ring's worth of entries pass between two samples (older
entries are overwritten); past that it is *lost* until the ring is quiet
(avail idx == used idx: nothing outstanding). :meth:`repack` then rewrites
the avail entries between the used idx and the avail idx with exactly the
outstanding heads, in the order they were made available, so a fresh
back-end started at the used idx fetches each of them once.

The driver never reads avail entries back, and the rewritten slots are
published ones the driver does not touch again before the device passes
them (at most ``size`` buffers can be outstanding).
"""

from __future__ import annotations

from collections import deque

from ..memory import GuestMemory
from .split import SplitLayout


class SplitLedger:
    """Outstanding heads of one split ring (module docstring)."""

    __slots__ = ("memory", "layout", "size", "avail_idx", "used_idx", "exact", "_heads", "_order",
                 "_avail_ring", "_used_ring", "_avail_idx_addr", "_used_idx_addr", "lost_count")

    def __init__(self, memory: GuestMemory, layout: SplitLayout, base: int) -> None:
        """Start following a ring a back-end starts at *base* (its next avail index).

        Exact only if the used idx equals *base* (nothing fetched is still out) or the
        ring is quiet; otherwise lost until it is.
        """
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self._avail_idx_addr = layout.avail + 2
        self._avail_ring = layout.avail + 4
        self._used_idx_addr = layout.used + 2
        self._used_ring = layout.used + 4
        self.lost_count = 0
        #: head -> avail positions (oldest first) of its outstanding occurrences
        self._heads: dict[int, deque[int]] = {}
        #: outstanding (position, head) in avail order; stale entries skipped lazily
        self._order: deque[tuple[int, int]] = deque()
        used = memory.load_u16(self._used_idx_addr)
        self.used_idx = used
        self.avail_idx = used
        self.exact = (base - used) & 0xFFFF == 0
        if self.exact:
            self.sample()
        else:
            self.avail_idx = memory.load_u16(self._avail_idx_addr)

    @property
    def outstanding(self) -> int:
        return (self.avail_idx - self.used_idx) & 0xFFFF

    def _lose(self) -> None:
        self.exact = False
        self.lost_count += 1
        self._heads.clear()
        self._order.clear()

    def sample(self) -> bool:
        """Take in what both sides published since the last sample; returns :attr:`exact`."""
        load = self.memory.load_u16
        avail = load(self._avail_idx_addr)
        used = load(self._used_idx_addr)
        size = self.size
        new_avail = (avail - self.avail_idx) & 0xFFFF
        new_used = (used - self.used_idx) & 0xFFFF
        if not self.exact or new_avail > size or new_used > size or (avail - used) & 0xFFFF > size:
            if self.exact:
                self._lose()
            self.avail_idx, self.used_idx = avail, used
            if avail == used:
                self.exact = True       # quiet: nothing outstanding, so nothing unknown
            return self.exact
        heads, order = self._heads, self._order
        mask = size - 1
        ring, pos = self._avail_ring, self.avail_idx
        for _ in range(new_avail):
            head = load(ring + 2 * (pos & mask))
            heads.setdefault(head, deque()).append(pos)
            order.append((pos, head))
            pos = (pos + 1) & 0xFFFF
        load32 = self.memory.load_u32
        ring, pos = self._used_ring, self.used_idx
        for _ in range(new_used):
            head = load32(ring + 8 * (pos & mask))
            occurrences = heads.get(head)
            if not occurrences:
                self._lose()        # a completion of nothing outstanding: not a ring we can follow
                self.avail_idx, self.used_idx = avail, used
                return False
            occurrences.popleft()
            if not occurrences:
                del heads[head]
            pos = (pos + 1) & 0xFFFF
        self.avail_idx, self.used_idx = avail, used
        if len(order) > 2 * size:
            self._compact()
        return True

    def _compact(self) -> None:
        """Drop completed entries from the order (an old request outstanding keeps them)."""
        avail = self.avail_idx
        live = [(pos, head) for head, occurrences in self._heads.items() for pos in occurrences]
        live.sort(key=lambda entry: -((avail - entry[0]) & 0xFFFF))
        self._order = deque(live)

    def pending(self) -> list[int]:
        """Outstanding heads in the order they were made available (needs :attr:`exact`)."""
        heads = self._heads
        live = {pos for occurrences in heads.values() for pos in occurrences}
        order = self._order
        while order and order[0][0] not in live:
            order.popleft()
        return [head for pos, head in order if pos in live]

    def repack(self) -> int | None:
        """Rewrite the avail entries from the used idx on with the outstanding heads.

        Returns the ring base a new back-end must start at (the used idx), or ``None``
        when the ledger is lost and no exact restart point exists. Call it only when no
        back-end runs the ring.
        """
        if not self.sample():
            return None
        pending = self.pending()
        if len(pending) != self.outstanding:
            return None
        store = self.memory.store_u16
        mask = self.size - 1
        pos = self.used_idx
        for head in pending:
            store(self._avail_ring + 2 * (pos & mask), head)
            pos = (pos + 1) & 0xFFFF
        return self.used_idx
