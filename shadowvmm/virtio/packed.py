"""Packed virtqueue layout and accessors (virtio v1.4 §2.8 "Packed Virtqueues").

The API mirrors :mod:`shadowvmm.virtio.split` so device models and guest
drivers can use either ring type: :class:`PackedDeviceQueue` pops
:class:`~shadowvmm.virtio.split.DescChain` objects and pushes used buffers,
:class:`PackedDriverQueue` adds buffers, decides kicks and reaps completions.

One difference is inherent to the format: :meth:`PackedDriverQueue.add`
makes the buffer visible at once (its first descriptor's flags are the last
store, v1.4 §2.8.21.1); :meth:`PackedDriverQueue.publish` only decides
whether a kick is needed.

Every access goes through :class:`~shadowvmm.memory.GuestMemory` (bounds
checked) and every descriptor ``flags`` or event-suppression field is
written with a single 16-bit store.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import ClassVar

from ..errors import RingError
from ..memory import GuestMemory
from .constants import MAX_QUEUE_SIZE
from .packedfmt import (
    _AVAIL,
    _DESC_HEAD,
    _INDIRECT,
    _NEXT,
    _USED,
    _USED_BODY,
    _WRITE,
    DESC_SIZE,
    EVENT_SUPPRESS,
    FLAGS_OFFSET,
    PACKED_DESC,
    WRAP_BIT,
    EventFlags,
    PackedDescFlags,
    avail_flags,
    desc_event_due,
    is_avail,
    is_used,
    off_wrap,
    suppression_allows,
    used_flags,
)
from .split import INDIRECT_MAX, DescChain, RingAreas
from .vring import RingState

__all__ = [
    "DESC_SIZE",
    "EVENT_SUPPRESS",
    "EventFlags",
    "FLAGS_OFFSET",
    "PACKED_DESC",
    "PackedDescFlags",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "PackedLayout",
    "WRAP_BIT",
    "avail_flags",
    "desc_event_due",
    "is_avail",
    "is_used",
    "off_wrap",
    "suppression_allows",
    "used_flags",
]

_MISSING = object()
#: bytes.translate tables: a byte -> 1 if its bit 7 (AVAIL in the low flags byte, USED in the
#: high one) or bit 1 (WRITE, low byte) is set, else 0
_BIT7 = bytes(b >> 7 for b in range(256))
_BIT1 = bytes(b >> 1 & 1 for b in range(256))


@dataclass(frozen=True, slots=True)
class PackedLayout(RingAreas):
    """Guest-physical placement of one packed ring (v1.4 §2.8.10.1)."""

    size: int
    desc: int
    driver: int
    device: int

    ALIGN: ClassVar[tuple[int, int, int]] = (16, 4, 4)

    @staticmethod
    def area_sizes(size: int) -> tuple[int, int, int]:
        """Bytes of descriptor ring, driver and device event suppression areas."""
        return DESC_SIZE * size, EVENT_SUPPRESS.size, EVENT_SUPPRESS.size

    def validate(self) -> None:
        """Size 1..32768 (any value) and alignments 16/4/4 (v1.4 §2.8.10.1)."""
        if not 0 < self.size <= MAX_QUEUE_SIZE:
            raise RingError(f"packed queue size {self.size} is not in 1..{MAX_QUEUE_SIZE}")
        self.check_alignment()


class PackedDeviceQueue:
    """Device side of a packed ring: consume available chains, write used descriptors.

    The ring position lives outside guest memory (v1.4 §2.8.1): next avail
    index + avail wrap counter and next used index + used wrap counter. It is
    saved with :meth:`ring_state` and restored with ``state=`` (vhost base
    encoding). Chains popped but not yet pushed are not part of that state:
    complete them before stopping the queue, as vhost GET_VRING_BASE expects.
    A new queue writes nothing to guest memory until it pops, pushes or
    :meth:`set_notification` is called.
    """

    def __init__(self, memory: GuestMemory, layout: PackedLayout, *, event_idx: bool = False,
                 indirect: bool = True, state: RingState | None = None) -> None:
        layout.validate()
        layout.check_memory(memory)
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = 0
        self.avail_wrap = True
        self.next_used = 0
        self.used_wrap = True
        self._outstanding = 0
        if state is not None:
            avail_idx, avail_wrap, used_idx, used_wrap = state.unpack_packed()
            if avail_idx >= self.size or used_idx >= self.size:
                raise RingError(f"ring state {state.base:#x} has an index beyond size {self.size}")
            span = 2 * self.size
            avail_pos = avail_idx + (0 if avail_wrap else self.size)
            used_pos = used_idx + (0 if used_wrap else self.size)
            outstanding = (avail_pos - used_pos) % span
            if outstanding > self.size:
                raise RingError(f"ring state {state.base:#x}: used position is ahead of avail")
            self.next_avail, self.avail_wrap = avail_idx, avail_wrap
            self.next_used, self.used_wrap = used_idx, used_wrap
            self._outstanding = outstanding
        self._inflight: dict[int, int] = {}
        self._unsignalled = 0
        self._notify_enabled = True
        self._device_flags: int | None = None

    def ring_state(self, index: int) -> RingState:
        """The ring position in the vhost base encoding (vhost-user GET_VRING_BASE)."""
        return RingState.packed(index, self.next_avail, self.avail_wrap, self.next_used,
                                self.used_wrap)

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return len(self._inflight)

    def _flags_at(self, slot: int) -> int:
        return self.memory.load_u16(self.layout.desc + DESC_SIZE * slot + FLAGS_OFFSET)

    def pending(self) -> int:
        """Complete available chains not yet popped (scans flags only)."""
        slot, wrap = self.next_avail, self.avail_wrap
        chains = 0
        for _ in range(self.size - self._outstanding):
            flags = self._flags_at(slot)
            if not is_avail(flags, wrap):
                break
            if not flags & _NEXT:
                chains += 1
            slot += 1
            if slot == self.size:
                slot, wrap = 0, not wrap
        return chains

    def pop(self) -> DescChain | None:
        """Next available chain, or None; ``head`` is its buffer ID (v1.4 §2.8.6).

        Raises RingError (or GuestMemoryError for addresses outside guest
        memory) on a malformed ring; the queue position is then unchanged.
        """
        slot, wrap = self.next_avail, self.avail_wrap
        if not is_avail(self._flags_at(slot), wrap):
            return None
        memory = self.memory
        table = self.layout.desc
        limit = self.size - self._outstanding
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        count = 0
        while True:
            if count >= limit:
                raise RingError(f"descriptor chain at {self.next_avail} loops or overruns "
                                f"the {limit} free ring slots")
            addr, length, buf_id, flags = PACKED_DESC.unpack(
                memory.read(table + DESC_SIZE * slot, DESC_SIZE))
            if count and not is_avail(flags, wrap):
                raise RingError(f"chained descriptor {slot} is not available")
            count += 1
            if flags & _INDIRECT:
                if not self.indirect:
                    raise RingError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & _NEXT:
                    raise RingError("INDIRECT and NEXT both set")
                if count > 1:
                    raise RingError("indirect descriptor inside a NEXT chain")
                self._walk_indirect(addr, length, readable, writable)
                break
            memory.translate(addr, length)
            if flags & _WRITE:
                writable.append((addr, length))
            elif writable:
                raise RingError("device-readable descriptor after a writable one")
            else:
                readable.append((addr, length))
            if not flags & _NEXT:
                break
            slot += 1
            if slot == self.size:
                slot, wrap = 0, not wrap
        if buf_id in self._inflight:
            raise RingError(f"buffer id {buf_id} is already in flight")
        slot += 1
        if slot == self.size:
            slot, wrap = 0, not wrap
        self.next_avail, self.avail_wrap = slot, wrap
        self._inflight[buf_id] = count
        self._outstanding += count
        if self.event_idx and self._notify_enabled:
            self._arm_avail_event()
        return DescChain(buf_id, readable, writable)

    def pop_many(self, out: list[DescChain]) -> None:
        """Append every available chain to *out* (:meth:`pop` until None; a malformed chain
        raises RingError once the ones before it are in *out*)."""
        pop, append = self.pop, out.append
        while (chain := pop()) is not None:
            append(chain)

    def _walk_indirect(self, addr: int, length: int, readable: list[tuple[int, int]],
                       writable: list[tuple[int, int]]) -> None:
        """Indirect table (v1.4 §2.8.7): entries are sequential, only WRITE is meaningful.

        It holds the whole descriptor list: one longer than the queue size (v1.4 §2.8.17)
        or :data:`~shadowvmm.virtio.split.INDIRECT_MAX` is refused before it is read.
        """
        if length == 0 or length % DESC_SIZE:
            raise RingError(f"indirect table length {length} is not a multiple of 16")
        if length // DESC_SIZE > max(self.size, INDIRECT_MAX):
            raise RingError(f"indirect table of {length // DESC_SIZE} descriptors is longer "
                            f"than {max(self.size, INDIRECT_MAX)}")
        data = self.memory.read(addr, length)
        for gpa, size, _, flags in PACKED_DESC.iter_unpack(data):
            self.memory.translate(gpa, size)
            if flags & _WRITE:
                writable.append((gpa, size))
            elif writable:
                raise RingError("device-readable descriptor after a writable one")
            else:
                readable.append((gpa, size))

    def _take(self, buffer_id: int) -> int:
        count = self._inflight.pop(buffer_id, None)
        if count is None:
            raise RingError(f"buffer id {buffer_id} is not in flight")
        return count

    def _write_used(self, buffer_id: int, written: int) -> tuple[int, int]:
        """Write id and len of one used descriptor, advance; returns (flags address, flags)."""
        count = self._take(buffer_id)
        addr = self.layout.desc + DESC_SIZE * self.next_used
        self.memory.write(addr + 8, _USED_BODY.pack(written, buffer_id))
        flags = used_flags(self.used_wrap) | (_WRITE if written else 0)
        self.next_used += count
        if self.next_used >= self.size:
            self.next_used -= self.size
            self.used_wrap = not self.used_wrap
        self._outstanding -= count
        self._unsignalled += count
        return addr + FLAGS_OFFSET, flags

    def push(self, buffer_id: int, written: int) -> None:
        """Mark buffer *buffer_id* used (v1.4 §2.8.6): flags are the last, single 16-bit store."""
        flags_addr, flags = self._write_used(buffer_id, written)
        self.memory.store_u16(flags_addr, flags)

    def push_batch(self, entries: Iterable[tuple[int, int]]) -> None:
        """Write several used descriptors; the first one's flags are stored last (v1.4 §2.8.9).

        Every buffer ID is checked before anything is written.
        """
        entries = list(entries)
        ids = [buffer_id for buffer_id, _ in entries]
        if len(set(ids)) != len(ids) or not self._inflight.keys() >= set(ids):
            raise RingError(f"push_batch ids {ids} are not distinct in-flight buffers")
        pending = [self._write_used(buffer_id, written) for buffer_id, written in entries]
        for flags_addr, flags in pending[1:]:
            self.memory.store_u16(flags_addr, flags)
        if pending:
            self.memory.store_u16(*pending[0])

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call.

        Reads the Driver Event Suppression area (v1.4 §2.8.10).
        """
        count, self._unsignalled = self._unsignalled, 0
        return suppression_allows(self.memory, self.layout.driver, self.event_idx, self.size,
                                  self.next_used, self.used_wrap, count)

    def _arm_avail_event(self) -> None:
        self.memory.store_u16(self.layout.device, off_wrap(self.next_avail, self.avail_wrap))
        if self._device_flags != EventFlags.DESC:
            self._set_device_flags(EventFlags.DESC)

    def _set_device_flags(self, flags: int) -> None:
        self.memory.store_u16(self.layout.device + 2, flags)
        self._device_flags = flags

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver (not) to kick (advisory, v1.4 §2.8.10)."""
        self._notify_enabled = enabled
        if not enabled:
            self._set_device_flags(EventFlags.DISABLE)
        elif self.event_idx:
            self._arm_avail_event()
        else:
            self._set_device_flags(EventFlags.ENABLE)


class PackedDriverQueue:
    """Driver side of a packed ring, as a guest driver runs it (v1.4 §2.8.21-22)."""

    def __init__(self, memory: GuestMemory, layout: PackedLayout, *, event_idx: bool = False,
                 state: RingState | None = None, adopt: bool = False) -> None:
        """*state* (vhost base encoding: avail idx + wrap, used idx + wrap) starts the ring there
        instead of at slot 0 of lap 1; nothing may be in flight in it (avail = used position).
        With *adopt* the descriptor areas already hold the ring that state was read from and are
        kept; without it they are cleared (a cleared slot is never available, v1.4 §2.8.1)."""
        avail_idx, avail_wrap, used_idx, used_wrap = 0, True, 0, True
        if state is not None:
            avail_idx, avail_wrap, used_idx, used_wrap = state.unpack_packed()
            if avail_idx >= layout.size or (avail_idx, avail_wrap) != (used_idx, used_wrap):
                raise RingError(f"ring state {state.base:#x}: not a drained ring of size {layout.size}")
        if adopt:
            layout.validate()
            layout.check_memory(memory)
        else:
            layout.initialize(memory)
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self.free_ids = list(range(self.size - 1, -1, -1))
        self.free_slots = self.size
        self.next_avail = avail_idx
        self.avail_wrap = avail_wrap
        self.next_used = used_idx
        self.used_wrap = used_wrap
        self._added = 0
        self._interrupts = True
        self.tokens: dict[int, object] = {}
        self._slots: dict[int, int] = {}       #: ring slots of each buffer that takes more than one
        region, off = memory.translate(layout.desc, DESC_SIZE * self.size)
        self._desc_map, self._desc_off, self._desc16 = region.mmap, off, region.view16
        self._desc8, self._desc32, self._desc64 = region.view, region.view32, region.view64
        self._multi = 0         #: buffers in flight that take more than one ring slot
        if event_idx:
            self._arm_used_event()

    @property
    def num_free(self) -> int:
        """Free descriptor ring slots."""
        return self.free_slots

    @property
    def in_flight(self) -> int:
        return len(self.tokens)

    def outstanding(self) -> list[object]:
        """Tokens of buffers the device has not used yet."""
        return list(self.tokens.values())

    def add(self, out: list[tuple[int, int]], inp: list[tuple[int, int]], token: object, *,
            indirect_table: int | None = None) -> int:
        """Make *out* (device-readable) then *inp* (device-writable) available; returns the ID.

        Descriptors are consumed in ring order with the driver wrap counter;
        the first one's flags are stored last (v1.4 §2.8.21.1). With
        *indirect_table* (guest address of ``16 * len(out + inp)`` bytes) the
        elements go there and the ring gets one INDIRECT descriptor (v1.4 §2.8.7).
        """
        count = len(out) + len(inp)
        slots = 1 if indirect_table is not None else count
        if count == 0 or slots > self.free_slots:
            raise RingError(f"need {slots} descriptors, {self.free_slots} free")
        buf_id = self.free_ids.pop()
        elements = [(g, n, 0) for g, n in out] + [(g, n, _WRITE) for g, n in inp]
        memory = self.memory
        if indirect_table is not None:
            memory.write(indirect_table,
                         b"".join(PACKED_DESC.pack(g, n, 0, f) for g, n, f in elements))
            elements = [(indirect_table, DESC_SIZE * count, _INDIRECT)]
        table = self.layout.desc
        slot, wrap = self.next_avail, self.avail_wrap
        head_addr = table + DESC_SIZE * slot
        head_flags = 0
        last = len(elements) - 1
        for i, (gpa, length, flags) in enumerate(elements):
            flags |= avail_flags(wrap) | (_NEXT if i < last else 0)
            addr = table + DESC_SIZE * slot
            memory.write(addr, _DESC_HEAD.pack(gpa, length, buf_id))
            if i == 0:
                head_flags = flags
            else:
                memory.store_u16(addr + FLAGS_OFFSET, flags)
            slot += 1
            if slot == self.size:
                slot, wrap = 0, not wrap
        memory.store_u16(head_addr + FLAGS_OFFSET, head_flags)
        self.next_avail, self.avail_wrap = slot, wrap
        self.free_slots -= slots
        self._added += slots
        self.tokens[buf_id] = token
        if slots > 1:
            self._slots[buf_id] = slots
        self._multi += slots > 1
        return buf_id

    def publish(self) -> bool:
        """True if the device wants a kick for what was added since the last call.

        Reads the Device Event Suppression area (v1.4 §2.8.21.2).
        """
        count, self._added = self._added, 0
        return suppression_allows(self.memory, self.layout.device, self.event_idx, self.size,
                                  self.next_avail, self.avail_wrap, count)

    def add_many(self, addrs: Sequence[int], lengths: Sequence[int], tokens: Sequence[object], *,
                 write: bool = False) -> int:
        """Make one-descriptor buffers available as a batch, written as strided array stores
        (64-bit addr, 32-bit len, 32-bit id | flags << 16) with the first descriptor's flags
        stored last, alone, in one 16-bit store (v1.4 §2.8.21.1). Returns how many fitted."""
        ids = self._add_run(addrs, lengths, write)
        self.tokens.update(zip(ids, tokens))
        return len(ids)

    def _add_run(self, addrs: Sequence[int], lengths: Sequence[int], write: bool,
                 words: tuple[array[int], array[int]] | None = None) -> list[int]:
        """Write one-descriptor buffers (see :meth:`add_many`); returns their ids. *words*:
        given when the ids are consecutive (mod size), each id's ``id | flags << 16`` for a
        driver wrap counter of 0 and of 1, indexed by id over two laps."""
        count = min(len(addrs), self.free_slots)
        if count == 0:
            return []
        free_ids = self.free_ids
        ids = free_ids[-count:]
        ids.reverse()
        del free_ids[-count:]
        size, q, d32 = self.size, self._desc64, self._desc32
        head_slot, wrap = self.next_avail, self.avail_wrap
        head_flags = (_WRITE if write else 0) | avail_flags(wrap)
        head_at = (self._desc_off + DESC_SIZE * head_slot + FLAGS_OFFSET) >> 1
        done, slot = 0, head_slot
        while done < count:
            part = min(count - done, size - slot)
            high = ((_WRITE if write else 0) | avail_flags(wrap)) << 16
            if words is None:
                tail = array("I", map(high.__or__, ids[done:done + part]))     # id | flags << 16
            else:
                tail = words[wrap][ids[done]:ids[done] + part]
            if done == 0:       # the head keeps its old flags until the whole batch is written
                tail[0] = ids[0] | self._desc16[head_at] << 16
            at = (self._desc_off >> 2) + 4 * slot
            q[at >> 1:(at >> 1) + 2 * part:2] = array("Q", addrs[done:done + part])
            d32[at + 2:at + 4 * part:4] = array("I", lengths[done:done + part])
            d32[at + 3:at + 4 * part:4] = tail
            done += part
            slot += part
            if slot == size:
                slot, wrap = 0, not wrap
        self._desc16[head_at] = head_flags
        self._advance(head_slot, count, slot, wrap)
        return ids

    def _advance(self, first: int, count: int, slot: int, wrap: bool) -> None:
        """Account for *count* descriptors written from slot *first* (dirty-logged): the next
        free slot is *slot* with wrap counter *wrap*."""
        dirty = self.memory.dirty_log
        if dirty is not None:
            size, desc = self.size, self.layout.desc
            for k in range(count):
                dirty.mark(desc + DESC_SIZE * ((first + k) % size), DESC_SIZE)
        self.next_avail, self.avail_wrap = slot, wrap
        self.free_slots -= count
        self._added += count

    def get_used(self) -> list[tuple[object, int]]:
        """Reap used descriptors: ``(token, bytes written)`` in completion order (v1.4 §2.8.22)."""
        return self.pop_used_many(self.size)

    def pop_used_many(self, limit: int) -> list[tuple[object, int]]:
        """Reap at most *limit* used descriptors in one pass; re-arms the used event
        (EVENT_IDX) unless interrupts are off.

        While every buffer in flight takes one ring slot, used descriptors follow each other:
        the run of them is found from the flag bytes as strided arrays and ids and lengths
        are read the same way; otherwise descriptor by descriptor."""
        out = self._pop_single(limit) if not self._multi else self._pop_each(limit)
        if self.event_idx and self._interrupts:
            self.memory.store_u16(self.layout.driver, off_wrap(self.next_used, self.used_wrap))
        return out

    def _pop_single(self, limit: int) -> list[tuple[object, int]]:
        size, view, tokens = self.size, self._desc8, self.tokens
        out: list[tuple[object, int]] = []
        remaining = min(limit, len(tokens))
        while remaining:
            used, wrap = self.next_used, self.used_wrap
            part = min(remaining, size - used)
            at = self._desc_off + DESC_SIZE * used
            low = bytes(view[at + FLAGS_OFFSET:at + DESC_SIZE * part:DESC_SIZE])
            high = bytes(view[at + FLAGS_OFFSET + 1:at + DESC_SIZE * part:DESC_SIZE])
            other = b"\x00" if wrap else b"\x01"     # AVAIL (bit 7) and USED (bit 15) both == wrap
            ends = [i for i in (low.translate(_BIT7).find(other), high.translate(_BIT7).find(other)) if i >= 0]
            count = min(ends, default=part)
            if count == 0:
                break
            ids = self._desc16[(at + 12) >> 1:(at + DESC_SIZE * count) >> 1:8].tolist()
            lens = self._desc32[(at + 8) >> 2:(at + DESC_SIZE * count) >> 2:4].tolist()
            got = list(map(tokens.pop, ids, repeat(_MISSING, count)))
            if _MISSING in got:
                raise RingError(f"device used unknown buffer id {ids[got.index(_MISSING)]}")
            self.free_ids += ids
            self.free_slots += count
            wrote = low[:count].translate(_BIT1)
            if wrote.count(1) != count:
                lens = [n if w else 0 for n, w in zip(lens, wrote)]
            out += zip(got, lens)
            used += count
            if used == size:
                used, wrap = 0, not wrap
            self.next_used, self.used_wrap = used, wrap
            remaining -= count
            if count < part:
                break
        return out

    def _pop_each(self, limit: int) -> list[tuple[object, int]]:
        dmap, doff, desc16, size = self._desc_map, self._desc_off, self._desc16, self.size
        tokens, slots_of, free_ids = self.tokens, self._slots, self.free_ids
        unpack = _USED_BODY.unpack_from
        used, wrap = self.next_used, self.used_wrap
        want = _AVAIL | _USED if wrap else 0
        out: list[tuple[object, int]] = []
        while tokens and len(out) < limit:
            at = doff + DESC_SIZE * used
            flags = desc16[(at + FLAGS_OFFSET) >> 1]
            if flags & (_AVAIL | _USED) != want:
                break
            written, buf_id = unpack(dmap, at + 8)
            token = tokens.pop(buf_id, _MISSING)
            if token is _MISSING:
                raise RingError(f"device used unknown buffer id {buf_id}")
            slots = slots_of.pop(buf_id, 1)
            self._multi -= slots > 1
            free_ids.append(buf_id)
            self.free_slots += slots
            used += slots
            if used >= size:
                used -= size
                wrap = not wrap
                want = _AVAIL | _USED if wrap else 0
            self.next_used, self.used_wrap = used, wrap
            out.append((token, written if flags & _WRITE else 0))
        return out

    def _arm_used_event(self) -> None:
        self.memory.store_u16(self.layout.driver, off_wrap(self.next_used, self.used_wrap))
        self.memory.store_u16(self.layout.driver + 2, EventFlags.DESC)

    def set_interrupts(self, enabled: bool) -> None:
        """Ask the device (not) to interrupt (advisory, v1.4 §2.8.10)."""
        self._interrupts = enabled
        if not enabled:
            self.memory.store_u16(self.layout.driver + 2, EventFlags.DISABLE)
        elif self.event_idx:
            self._arm_used_event()
        else:
            self.memory.store_u16(self.layout.driver + 2, EventFlags.ENABLE)
