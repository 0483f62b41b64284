"""Packed virtqueue wire format and event suppression (virtio v1.4 §2.8.1, §2.8.10, §2.8.13-14).

Shared by both sides of :mod:`.packed`: descriptor and event-suppression layouts, the flag bits,
the wrap-counter tests and the notification decision.
"""

from __future__ import annotations

import enum
import struct

from ..memory import GuestMemory
from .split import need_event

PACKED_DESC = struct.Struct("<QIHH")  #: pvirtq_desc: addr, len, id, flags (v1.4 §2.8.13)
#: pvirtq_event_suppress: le16 desc {off:15, wrap:1}, le16 flags (v1.4 §2.8.14)
EVENT_SUPPRESS = struct.Struct("<HH")
DESC_SIZE = 16
FLAGS_OFFSET = 14
_DESC_HEAD = struct.Struct("<QIH")   #: a descriptor without its flags (written before them)
_USED_BODY = struct.Struct("<IH")    #: len, id of a used descriptor (at offset 8)
WRAP_BIT = 15


class PackedDescFlags(enum.IntFlag):
    """pvirtq_desc flags (v1.4 §2.8.1, §2.8.3, §2.8.6, §2.8.7)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7
    USED = 1 << 15


class EventFlags(enum.IntEnum):
    """Descriptor Ring Change Event Flags (v1.4 §2.8.10)."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2  #: only with VIRTIO_F_EVENT_IDX


_NEXT = int(PackedDescFlags.NEXT)
_WRITE = int(PackedDescFlags.WRITE)
_INDIRECT = int(PackedDescFlags.INDIRECT)
_AVAIL = int(PackedDescFlags.AVAIL)
_USED = int(PackedDescFlags.USED)
_EVENT_FLAGS_MASK = 0x3


def is_avail(flags: int, wrap: bool) -> bool:
    """Whether *flags* mark a descriptor available in lap *wrap* (v1.4 §2.8.1)."""
    return bool(flags & _AVAIL) == wrap and bool(flags & _USED) != wrap


def is_used(flags: int, wrap: bool) -> bool:
    """Whether *flags* mark a descriptor used in lap *wrap* (v1.4 §2.8.1)."""
    return bool(flags & _AVAIL) == wrap and bool(flags & _USED) == wrap


def avail_flags(wrap: bool) -> int:
    """AVAIL/USED bits a driver sets in lap *wrap* (v1.4 §2.8.1)."""
    return _AVAIL if wrap else _USED


def used_flags(wrap: bool) -> int:
    """AVAIL/USED bits a device sets in lap *wrap* (v1.4 §2.8.1)."""
    return _AVAIL | _USED if wrap else 0


def off_wrap(off: int, wrap: bool) -> int:
    """Encode an event-suppression ``desc`` field (v1.4 §2.8.14)."""
    return (off & 0x7FFF) | int(wrap) << WRAP_BIT


def desc_event_due(off_wrap_value: int, size: int, new: int, wrap: bool, count: int) -> bool:
    """DESC-mode test (v1.4 §2.8.10): was the event descriptor crossed?

    *new* / *wrap* is the position after the last *count* descriptors were
    made available (or used); the event is due if ``off_wrap_value`` names one
    of them. An event offset in the other lap is taken as the previous lap.
    """
    if count >= size:
        return True
    event = off_wrap_value & 0x7FFF
    if bool(off_wrap_value >> WRAP_BIT) != wrap:
        event -= size
    return need_event(event & 0xFFFF, new, (new - count) & 0xFFFF)


def suppression_allows(memory: GuestMemory, area: int, event_idx: bool, size: int, next_idx: int,
                       wrap: bool, count: int) -> bool:
    """Whether the other side's event suppression area asks for a notification covering
    *count* new entries ending before (*next_idx*, *wrap*) (v1.4 §2.8.10, §2.8.21.2)."""
    if count == 0:
        return False
    desc, flags = EVENT_SUPPRESS.unpack(memory.read(area, EVENT_SUPPRESS.size))
    flags &= _EVENT_FLAGS_MASK
    if flags == EventFlags.DISABLE:
        return False
    if flags == EventFlags.DESC and event_idx:
        return desc_event_due(desc, size, next_idx, wrap, count)
    return True
