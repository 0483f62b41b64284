"""A timeline of what happened where: guest status accesses, stops, drains, ring bases, migration.

A :class:`Timeline` is a plain recorder with an injected clock (default :func:`time.monotonic`);
there is no global one. Whoever wants a recording creates it and hands it down:
``Machine(timeline=...)`` gives each device and guest transport a :class:`Tap` bound to its
row, ``(level, device)``: ``level`` names the nesting level (``"L0"`` the host VMM, ``"L1"`` a
guest hypervisor), ``device`` the device as that level names it. Code holding no timeline
holds ``None`` and guards each recording point with one ``if self.timeline is not None``.

Other code (an admin queue, an L1 plugin) records through the same entry point::

    tap = timeline.tap("L1", "blk0")
    tap.record(EventKind.ADMIN_COMMAND, opcode=0x0d, status=0)
    with tap.phase("admin: freeze"):
        ...

or :meth:`Timeline.record` directly. ``detail`` holds JSON scalars only.
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import TimelineFormatError

#: JSON format of :meth:`Timeline.to_json`.
FORMAT_VERSION = 1

Scalar = int | float | str | bool | None


class EventKind(enum.Enum):
    """What an :class:`Event` records; the value is its name in the JSON document."""

    STATUS_READ = "STATUS_READ"          #: the guest read device_status (a change of value; ``reads`` counts them)
    STATUS_WRITE = "STATUS_WRITE"        #: the guest wrote device_status (``value``)
    STOP_START = "STOP_START"            #: a stop began (``by``: ``vmm`` or ``guest``)
    STOP_END = "STOP_END"                #: the stop is complete (rings stopped, states captured)
    RESUME = "RESUME"                    #: the rings run again after a stop
    DRAIN_START = "DRAIN_START"          #: the sequencer began stopping rings (``how``: ``disable`` or ``suspend``)
    DRAIN_END = "DRAIN_END"              #: in-flight requests drained (or the backend suspended)
    GET_VRING_BASE = "GET_VRING_BASE"    #: one ring's state read back (``ring``, ``base``)
    ADMIN_COMMAND = "ADMIN_COMMAND"      #: an admin virtqueue command (recorded by its handler or driver)
    RING_STATE = "RING_STATE"            #: a driver read or wrote a ring-state register (``op``, ``ring``, ``value``)
    PRECOPY_ROUND = "PRECOPY_ROUND"      #: one pre-copy round (``round``, ``pages``, ``dirty``)
    SWITCH_OVER = "SWITCH_OVER"          #: the destination confirmed; the guest moves
    DEST_START = "DEST_START"            #: the destination applied the device states (``devices``)
    PHASE_START = "PHASE_START"          #: a phase span opens (``phase``)
    PHASE_END = "PHASE_END"              #: a phase span closes (``phase``)
    MARK = "MARK"                        #: a free-form marker (``text``)


#: Kinds the downtime starts and ends at (:meth:`Timeline.downtime`).
_DOWN_ENDS = (EventKind.RESUME, EventKind.DEST_START)


@dataclass(frozen=True)
class Event:
    """One recorded event; ``t`` is seconds since the timeline's origin."""

    t: float
    level: str
    device: str
    kind: EventKind
    detail: Mapping[str, Scalar] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"t": self.t, "level": self.level, "device": self.device, "kind": self.kind.value,
                "detail": dict(self.detail)}

    @classmethod
    def from_dict(cls, data: Any) -> Event:
        if not isinstance(data, dict):
            raise TimelineFormatError(f"event is not a map: {data!r}")
        try:
            t, level, device, kind = data["t"], data["level"], data["device"], EventKind(data["kind"])
        except (KeyError, ValueError) as exc:
            raise TimelineFormatError(f"bad event {data!r}: {exc}") from None
        detail = data.get("detail", {})
        if not isinstance(t, (int, float)) or not isinstance(level, str) or not isinstance(device, str) \
                or not isinstance(detail, dict):
            raise TimelineFormatError(f"bad event field types: {data!r}")
        return cls(float(t), level, device, kind, detail)


@dataclass(frozen=True)
class Span:
    """A phase: from its PHASE_START to its PHASE_END (or the last event, if never closed)."""

    level: str
    device: str
    phase: str
    start: float
    end: float


class Timeline:
    """The recorder (module docstring). Not thread-safe: record from the event loop's thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.origin = clock()
        self.events: list[Event] = []

    def record(self, level: str, device: str, kind: EventKind, **detail: Scalar) -> Event:
        """Append an event at the clock's current time: the entry point for any recorder."""
        event = Event(self.clock() - self.origin, level, device, kind, detail)
        self.events.append(event)
        return event

    def tap(self, level: str, device: str) -> Tap:
        """A recorder bound to the row ``(level, device)``."""
        return Tap(self, level, device)

    @contextlib.contextmanager
    def phase(self, level: str, device: str, name: str) -> Iterator[None]:
        """Record the block as the phase *name* of row ``(level, device)``."""
        self.record(level, device, EventKind.PHASE_START, phase=name)
        try:
            yield
        finally:
            self.record(level, device, EventKind.PHASE_END, phase=name)

    # ------------------------------------------------------------------ queries

    def rows(self) -> list[tuple[str, str]]:
        """Every ``(level, device)`` in order of first appearance."""
        return list(dict.fromkeys((e.level, e.device) for e in self.events))

    def of(self, kind: EventKind, *, level: str | None = None, device: str | None = None) -> list[Event]:
        return [e for e in self.events if e.kind is kind and (level is None or e.level == level)
                and (device is None or e.device == device)]

    def spans(self) -> list[Span]:
        """Phase spans, in order of their start; an unclosed one ends at the last event."""
        end_of_time = self.events[-1].t if self.events else 0.0
        open_: dict[tuple[str, str, str], list[float]] = {}
        spans: list[Span] = []
        for e in self.events:
            if e.kind is EventKind.PHASE_START:
                open_.setdefault((e.level, e.device, str(e.detail.get("phase"))), []).append(e.t)
            elif e.kind is EventKind.PHASE_END:
                starts = open_.get((e.level, e.device, str(e.detail.get("phase"))))
                if starts:
                    spans.append(Span(e.level, e.device, str(e.detail.get("phase")), starts.pop(), e.t))
        for (level, device, phase), starts in open_.items():
            spans.extend(Span(level, device, phase, t, end_of_time) for t in starts)
        return sorted(spans, key=lambda s: s.start)

    def downtime(self) -> tuple[float, float] | None:
        """From the first STOP_START to the first RESUME or DEST_START after it (None: no stop ended)."""
        stop = next((e.t for e in self.events if e.kind is EventKind.STOP_START), None)
        if stop is None:
            return None
        end = next((e.t for e in self.events if e.kind in _DOWN_ENDS and e.t >= stop), None)
        return None if end is None else (stop, end)

    # ------------------------------------------------------------------ JSON

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps({"format": "shadowvmm-timeline", "version": FORMAT_VERSION,
                           "events": [e.as_dict() for e in self.events]}, indent=indent)

    @classmethod
    def from_json(cls, text: str, clock: Callable[[], float] = time.monotonic) -> Timeline:
        """Read :meth:`to_json`'s document back (raises :class:`TimelineFormatError`)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TimelineFormatError(f"not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != "shadowvmm-timeline":
            raise TimelineFormatError("not a shadowvmm timeline document")
        if data.get("version") != FORMAT_VERSION:
            raise TimelineFormatError(f"timeline version {data.get('version')!r}, expected {FORMAT_VERSION}")
        events = data.get("events")
        if not isinstance(events, list):
            raise TimelineFormatError("no event list")
        timeline = cls(clock)
        timeline.events = [Event.from_dict(e) for e in events]
        return timeline


class Tap:
    """A :class:`Timeline` bound to one row: what devices, transports and migration hold."""

    __slots__ = ("timeline", "level", "device")

    def __init__(self, timeline: Timeline, level: str, device: str) -> None:
        self.timeline, self.level, self.device = timeline, level, device

    def record(self, kind: EventKind, **detail: Scalar) -> Event:
        return self.timeline.record(self.level, self.device, kind, **detail)

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.timeline.phase(self.level, self.device, name)
