"""Migration state records: versioned per-field sections a device and its transport are saved in.

The records sit below the device (which exports and imports them) and the
migration layer (which streams them and checks them against a destination).
:mod:`.schema` is the versioning scheme, :mod:`.records` the guest-visible
registers and rings, :mod:`.standard` the part per device type,
:mod:`.device_state` the whole device and its msgpack envelope,
:mod:`.transport` what a transport saves of itself.
"""

from __future__ import annotations

from .admin import AdminGroup, AdminObject, AdminState
from .device_state import DeviceState, OpaquePart
from .records import QueueState, RingPart, TransportState
from .schema import FORMAT_VERSION, MIN_FORMAT_VERSION, REQUIRED, FieldSpec, Section, check_range, shown
from .standard import (
    EMPTY_TRANSPORT,
    STANDARD_BY_ID,
    STANDARD_BY_NAME,
    STANDARD_TYPES,
    U16,
    U32,
    U64,
    BlkStandard,
    FsStandard,
    NetStandard,
    RngStandard,
    Standard,
)
from .transport import StatefulTransport, TransportImage

__all__ = [
    "EMPTY_TRANSPORT", "FORMAT_VERSION", "MIN_FORMAT_VERSION", "REQUIRED", "STANDARD_BY_ID", "STANDARD_BY_NAME",
    "STANDARD_TYPES", "U16", "U32", "U64", "AdminGroup", "AdminObject", "AdminState",
    "BlkStandard", "DeviceState", "FieldSpec", "FsStandard",
    "NetStandard", "OpaquePart", "QueueState", "RingPart", "RngStandard", "Section", "StatefulTransport",
    "Standard", "TransportImage", "TransportState", "check_range", "shown",
]
