"""A driver and a device over one virtqueue, for both layouts: split (v1.4 §2.7) and packed
(§2.8). The harness tracks per-token buffers and expected lengths so that a test can check
every completion; :func:`make_harness` picks the layout by name (the ``ring_layout`` fixture)."""

from __future__ import annotations

from typing import Any

from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.packed import (
    DESC_SIZE as PACKED_DESC_SIZE,
)
from shadowvmm.virtio.packed import (
    EVENT_SUPPRESS,
    EventFlags,
    PackedDeviceQueue,
    PackedDriverQueue,
    PackedLayout,
)
from shadowvmm.virtio.split import (
    AVAIL_F_NO_INTERRUPT,
    USED_F_NO_NOTIFY,
    DescChain,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
)

MEM_SIZE = 1 << 20
RING_BASE = 0x1000
BUF_BASE = 0x80000
BUF_STRIDE = 256
BUF_SLOTS = (MEM_SIZE - BUF_BASE) // BUF_STRIDE
IN_LEN = 32
INDIRECT_BASE = 0x60000


def make_split_layout(size: int) -> SplitLayout:
    d, a, _ = SplitLayout.area_sizes(size)
    avail = RING_BASE + d
    used = (avail + a + 3) & ~3
    return SplitLayout(size, RING_BASE, avail, used)


def make_packed_layout(size: int) -> PackedLayout:
    driver = (RING_BASE + PACKED_DESC_SIZE * size + 3) & ~3
    return PackedLayout(size, RING_BASE, driver, driver + 4)


class Harness:
    """What both layouts share: queue requests, pop, serve, complete, reap and check."""

    #: Whether the driver side can post indirect tables (the split driver cannot).
    SUPPORTS_INDIRECT = False
    layout: Any
    drv: Any
    dev: Any

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool = False) -> None:
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.next_token = 0
        self.expected: dict[int, int] = {}
        self.completed: dict[int, int] = {}
        self.popped: list[DescChain] = []

    def _post(self, out: list[tuple[int, int]], inp: list[tuple[int, int]], token: int,
              indirect: bool) -> None:
        raise NotImplementedError

    def add(self, n_out: int, n_in: int, *, indirect: bool = False) -> int | None:
        """Queue one request (token in its first readable buffer); None if the ring is full."""
        need = 1 if indirect else n_out + n_in
        if need > self.drv.num_free:
            return None
        token = self.next_token
        self.next_token += 1
        base = BUF_BASE + BUF_STRIDE * (token % BUF_SLOTS)
        self.memory.write(base, token.to_bytes(8, "little"))
        out = [(base + 16 * k, 8) for k in range(n_out)]
        inp = [(base + 128 + IN_LEN * k, IN_LEN) for k in range(n_in)]
        self._post(out, inp, token, indirect)
        self.expected[token] = token % (n_in * IN_LEN + 1)
        return token

    def pop_all(self) -> int:
        count = 0
        while (chain := self.dev.pop()) is not None:
            self.popped.append(chain)
            count += 1
        return count

    def serve(self, chain: DescChain) -> tuple[int, int]:
        """What a device model does: read the request, fill the reply, return (id, written)."""
        token = int.from_bytes(chain.read(self.memory)[:8], "little")
        written = token % (chain.writable_len + 1)
        assert chain.write(self.memory, bytes([token & 0xFF]) * written) == written
        return chain.head, written

    def complete(self, chains: list[DescChain], *, batch: bool = False) -> None:
        entries = [self.serve(c) for c in chains]
        for c in chains:
            self.popped.remove(c)
        if batch:
            self.dev.push_batch(entries)
        else:
            for head, written in entries:
                self.dev.push(head, written)

    def reap(self) -> list[tuple[object, int]]:
        used: list[tuple[object, int]] = self.drv.get_used()
        for token, written in used:
            assert isinstance(token, int)
            assert token not in self.completed, f"token {token} completed twice"
            assert written == self.expected[token], (token, written)
            base = BUF_BASE + BUF_STRIDE * (token % BUF_SLOTS) + 128
            assert self.memory.read(base, written) == bytes([token & 0xFF]) * written
            self.completed[token] = written
        return used

    def can_restore(self) -> bool:
        """Whether :meth:`restore_device` may run now."""
        return True

    def restore_device(self) -> None:
        """Stop the device queue and build a new one from its saved position."""
        raise NotImplementedError

    def check_all_done(self) -> None:
        assert set(self.completed) == set(self.expected)
        assert self.drv.in_flight == 0 and self.drv.num_free == self.size

    def assert_kicks(self, enabled: bool) -> None:
        """The device's kick suppression in guest memory reads *enabled*."""
        raise NotImplementedError

    def assert_interrupts(self, enabled: bool) -> None:
        """The driver's interrupt suppression in guest memory reads *enabled*."""
        raise NotImplementedError


class SplitHarness(Harness):
    """Split ring; *start_idx* starts every index there (to test the 16-bit wrap)."""

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool = False,
                 start_idx: int = 0) -> None:
        super().__init__(memory, size, event_idx=event_idx)
        self.layout = make_split_layout(size)
        self.drv = SplitDriverQueue(memory, self.layout, event_idx=event_idx)
        if start_idx:
            self.drv.avail_idx = self.drv._kicked_avail = self.drv.last_used_idx = start_idx
            memory.store_u16(self.layout.avail + 2, start_idx)
            memory.store_u16(self.layout.used + 2, start_idx)
            if event_idx:
                memory.store_u16(self.layout.avail + 4 + 2 * size, start_idx)
                memory.store_u16(self.layout.used + 4 + 8 * size, start_idx)
        self.dev = SplitDeviceQueue(memory, self.layout, event_idx=event_idx,
                                    last_avail_idx=start_idx)

    def _post(self, out: list[tuple[int, int]], inp: list[tuple[int, int]], token: int,
              indirect: bool) -> None:
        assert not indirect, "SplitDriverQueue posts no indirect tables"
        self.drv.add(out, inp, token)

    def restore_device(self) -> None:
        """A new device queue from last_avail_idx (the vhost base), even with chains in flight."""
        base = self.dev.last_avail_idx
        self.dev = SplitDeviceQueue(self.memory, self.layout, event_idx=self.event_idx,
                                    last_avail_idx=base)

    def check_all_done(self) -> None:
        super().check_all_done()
        assert self.dev.pending() == 0

    def assert_kicks(self, enabled: bool) -> None:
        assert self.memory.load_u16(self.layout.used) == (0 if enabled else USED_F_NO_NOTIFY)

    def assert_interrupts(self, enabled: bool) -> None:
        assert self.memory.load_u16(self.layout.avail) == (0 if enabled else AVAIL_F_NO_INTERRUPT)


class PackedHarness(Harness):
    """Packed ring; requests may go through indirect tables."""

    SUPPORTS_INDIRECT = True

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool = False) -> None:
        super().__init__(memory, size, event_idx=event_idx)
        self.layout = make_packed_layout(size)
        self.drv = PackedDriverQueue(memory, self.layout, event_idx=event_idx)
        self.dev = PackedDeviceQueue(memory, self.layout, event_idx=event_idx)

    def _post(self, out: list[tuple[int, int]], inp: list[tuple[int, int]], token: int,
              indirect: bool) -> None:
        table = INDIRECT_BASE + 128 * (token % 256) if indirect else None
        self.drv.add(out, inp, token, indirect_table=table)

    def can_restore(self) -> bool:
        return bool(self.dev.in_flight == 0)

    def restore_device(self) -> None:
        """A new device queue from the saved ring state (no buffer may be in flight)."""
        assert self.dev.in_flight == 0
        state = self.dev.ring_state(3)
        assert state.index == 3
        self.dev = PackedDeviceQueue(self.memory, self.layout, event_idx=self.event_idx,
                                     state=state)

    def check_all_done(self) -> None:
        super().check_all_done()
        assert self.dev.in_flight == 0

    def event(self, addr: int) -> tuple[int, int]:
        """An event suppression structure: (off_wrap, flags)."""
        off_wrap, flags = EVENT_SUPPRESS.unpack(self.memory.read(addr, 4))
        return off_wrap, flags

    def assert_kicks(self, enabled: bool) -> None:
        assert self.event(self.layout.device)[1] == (EventFlags.ENABLE if enabled else EventFlags.DISABLE)

    def assert_interrupts(self, enabled: bool) -> None:
        assert self.event(self.layout.driver)[1] == (EventFlags.ENABLE if enabled else EventFlags.DISABLE)


HARNESSES: dict[str, type[Harness]] = {"split": SplitHarness, "packed": PackedHarness}


def make_harness(ring_layout: str, memory: GuestMemory, size: int, *, event_idx: bool = False) -> Harness:
    return HARNESSES[ring_layout](memory, size, event_idx=event_idx)
