"""What each side of a migration measured, and the destination's confirmation of what it applied."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DestinationRefused
from .options import RoundInfo
from .state import DeviceState, shown


@dataclass
class MigrationReport:
    """What the source measured; durations in milliseconds (``_ms``), the unit and the names of
    :meth:`as_dict` (the ``--json`` report) and of every shadowvmm report.

    ``downtime_ms`` runs from the guest pause (before the devices stop, so the drain of requests
    in flight counts) to the destination's RESULT (its devices applied and started). QEMU's
    ``downtime`` (migration/migration.c, ``migration_completion``/``migration_calculate_complete``)
    starts the same way, before ``vm_stop_force_state`` (which drains the block layer and stops
    vhost rings), but ends when the source has sent the last state, so ours is the stricter figure.
    """

    mode: str
    ok: bool = False
    total_ms: float = 0.0
    setup_ms: float = 0.0
    precopy_ms: float = 0.0
    downtime_ms: float = 0.0
    stop_ms: float = 0.0
    rounds: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    device_state_bytes: int = 0
    stop_ms_per_device: dict[str, float] = field(default_factory=dict)
    round_info: list[RoundInfo] = field(default_factory=list)
    memory_digest: str = ""
    destination: dict[str, Any] = field(default_factory=dict)
    #: The destination confirmed what it applied (False: a one-way channel without ``confirm``).
    confirmed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "confirmed": self.confirmed, "mode": self.mode, "total_ms": round(self.total_ms, 3),
            "setup_ms": round(self.setup_ms, 3), "precopy_ms": round(self.precopy_ms, 3),
            "downtime_ms": round(self.downtime_ms, 3), "stop_ms": round(self.stop_ms, 3),
            "rounds": self.rounds, "pages_sent": self.pages_sent, "bytes_sent": self.bytes_sent,
            "device_state_bytes": self.device_state_bytes,
            "stop_ms_per_device": {k: round(v, 3) for k, v in self.stop_ms_per_device.items()},
            "dirty_per_round": [r.dirty for r in self.round_info],
            "memory_digest": self.memory_digest, "destination": self.destination,
        }


@dataclass
class DestinationReport:
    """What the destination measured; ``applied`` is its confirmation (:func:`applied`)."""

    mode: str = ""
    devices: list[str] = field(default_factory=list)
    pages_received: int = 0
    rounds: int = 0
    bytes_received: int = 0
    device_state_bytes: int = 0
    memory_digest: str = ""
    apply_ms: float = 0.0
    applied: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "devices": self.devices, "pages_received": self.pages_received,
                "rounds": self.rounds, "bytes_received": self.bytes_received,
                "device_state_bytes": self.device_state_bytes, "memory_digest": self.memory_digest,
                "apply_ms": round(self.apply_ms, 3), "applied": self.applied}


def applied(states: Iterable[DeviceState], pages: int) -> dict[str, Any]:
    """The confirmation a destination sends in RESULT, and the source expects: each device
    state's :meth:`~DeviceState.digest` by name, and the pages written (copy model)."""
    return {"devices": {state.name: state.digest() for state in states}, "pages": pages}


def check_confirmation(confirmed: Any, expected: dict[str, Any]) -> None:
    """Refuse (:class:`DestinationRefused`) a confirmation that is missing or differs from what was sent."""
    if not isinstance(confirmed, dict) or not isinstance(confirmed.get("devices"), dict):
        raise DestinationRefused("the destination did not confirm what it applied (no device digests in "
                                 "its answer); the migration is not complete, source resumed")
    theirs, ours = confirmed["devices"], expected["devices"]
    for name in sorted(set(ours) | set(map(str, theirs))):
        if theirs.get(name) != ours.get(name):
            raise DestinationRefused(f"the destination confirmed device {shown(name)!r} with digest "
                                     f"{str(theirs.get(name))[:16]}, the source sent "
                                     f"{str(ours.get(name))[:16]}; source resumed")
    if confirmed.get("pages") != expected["pages"]:
        raise DestinationRefused(f"the destination confirmed {confirmed.get('pages')!r} pages applied, the "
                                 f"source sent {expected['pages']}; source resumed")
