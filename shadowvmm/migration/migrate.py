"""Live migration of a machine's devices (and, in the copy model, its memory).

Phases, source side (:func:`migrate_out`, :mod:`.source`):

1. **setup**: refuse early if a device cannot migrate (:func:`blockers`,
   :mod:`.blockers`); send HELLO (memory layout and model, devices); the
   destination creates its devices, connects their backends and answers
   READY. Copy model: dirty logging on (guest memory log + every backend,
   QEMU's vhost order).
2. **pre-copy** (copy model, :mod:`.pages`): every non-zero page, then rounds
   of the pages the dirty log marked, until a round's dirty set is small.
3. **stop-and-copy**: every device stopped at once (``asyncio.gather``) with
   a per-device bound; one that misses it abandons the migration. Then the
   final dirty pages, the devices' IOMMU tables (:mod:`.iommu`, when any is
   programmed), each device's state (ring bases, DEVICE_STATE where
   negotiated) and END.
4. **resume** on the destination (:func:`migrate_in`, :mod:`.destination`):
   it validates everything it buffered, applies the device states and starts
   the backends from the saved ring bases, then answers RESULT.
5. **cleanup** on the source: devices stay stopped, dirty logging is off.

A failure or cancellation at any phase resumes every source device and
turns dirty logging off: the source runs as if nothing happened.

Memory models: ``local`` (both sides map the same guest memory memfds; only
device state moves) and ``copy`` (the destination has its own memory; pages
travel in the stream).

Each phase is logged at INFO on the ``shadowvmm.migration`` loggers (setup,
every pre-copy round with its pages, the stop, the device state sent, the
downtime). This module is the public face of the migration API: every name
below is importable from here.
"""

from __future__ import annotations

from ..errors import DestinationRefused, StopTimeoutError
from .blockers import blockers, open_file_handles, peer_pid, refuse_if_blocked
from .destination import check_state, destination_of, migrate_in
from .options import (
    AUTO_BUSY_POLL_US,
    FS_SESSION_POLICIES,
    MODES,
    MachineLike,
    MigrationHooks,
    MigrationOptions,
    RoundInfo,
    SlotLike,
    auto_busy_poll,
)
from .pages import PageSet, memory_digest, memory_identity, memory_layout
from .report import DestinationReport, MigrationReport, applied, check_confirmation
from .source import migrate_out, stop_all

#: Former private name of :func:`.source.stop_all` (tests drive it directly).
_stop_all = stop_all

__all__ = [
    "AUTO_BUSY_POLL_US", "FS_SESSION_POLICIES", "MODES", "DestinationRefused", "DestinationReport",
    "MachineLike", "MigrationHooks", "MigrationOptions", "MigrationReport", "PageSet", "RoundInfo", "SlotLike",
    "StopTimeoutError", "applied", "auto_busy_poll", "blockers", "check_confirmation", "check_state",
    "destination_of", "memory_digest", "memory_identity", "memory_layout", "migrate_in", "migrate_out",
    "open_file_handles", "peer_pid", "refuse_if_blocked",
]
