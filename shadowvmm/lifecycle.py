"""Backend liveness: the reconnect policy, the link state and the events a device reports.

A backend session can die under the device (a vhost-user daemon killed,
crashed or closing its socket). The device learns it from the backend's
``DISCONNECTED`` event, never by polling, and then follows its
:class:`ReconnectPolicy`:

``off`` (default)
    DEVICE_NEEDS_RESET at once (v1.4 §2.1.2) with a configuration-change
    interrupt. The guest's own reset completes once the backend answers again
    (the device retries every ``interval``), as real hardware whose reset
    completes when it is back.
bounded (``interval``, ``deadline``)
    Retry every ``interval`` for up to ``deadline``; within it the guest sees
    nothing but latency (the rings resume where they stood); past it, as ``off``.
unbounded (``interval``, no deadline)
    Retry forever; the guest only ever sees latency.

QEMU's ``reconnect=N`` chardev option retries forever with no deadline and
no way for the guest to learn about it; Cloud Hypervisor latches a device off
for good once its backend is gone. Here the guest always ends up either
resumed or told (NEEDS_RESET), and recovers by its own reset.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .errors import ConfigError, DeviceFailedError


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a device reacts to a lost backend session (module docstring)."""

    enabled: bool = False
    #: Seconds between two connection attempts (also while a guest reset waits for the backend).
    interval: float = 0.05
    #: Seconds after the loss past which the guest is told (NEEDS_RESET); None: never.
    deadline: float | None = 2.0
    #: Seconds between two samples of the rings' outstanding buffers (see virtio/ledger.py).
    track_interval: float = 0.001

    @classmethod
    def off(cls, interval: float = 0.05) -> ReconnectPolicy:
        return cls(False, interval, 0.0)

    @classmethod
    def bounded(cls, interval: float = 0.05, deadline: float = 2.0) -> ReconnectPolicy:
        return cls(True, interval, deadline)

    @classmethod
    def unbounded(cls, interval: float = 0.05) -> ReconnectPolicy:
        return cls(True, interval, None)

    @classmethod
    def parse(cls, value: Any, key: str = "reconnect") -> ReconnectPolicy:
        """From a config value: ``"off"``, ``"unbounded"``, or a table with ``interval_ms``,
        ``deadline_ms`` (omitted or 0: unbounded) and ``track_interval_ms``."""
        if value == "off" or value is False or value is None:
            return cls.off()
        if value == "unbounded":
            return cls.unbounded()
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be \"off\", \"unbounded\" or a table, not {value!r}")
        known = {"interval_ms", "deadline_ms", "track_interval_ms"}
        for name in value:
            if name not in known:
                raise ConfigError(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(known))})")

        def ms(name: str, default: float, low: float, high: float) -> float:
            raw = value.get(name, default)
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not low <= raw <= high:
                raise ConfigError(f"{key}.{name}", f"must be a number of milliseconds in [{low:g}, {high:g}], "
                                                   f"not {raw!r}")
            return float(raw) / 1e3

        interval = ms("interval_ms", 50, 1, 60_000)
        deadline = ms("deadline_ms", 0, 0, 86_400_000)
        track = ms("track_interval_ms", 1, 0.1, 1000)
        return cls(True, interval, deadline or None, track)

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        bound = "unbounded" if self.deadline is None else f"deadline {self.deadline * 1e3:g} ms"
        return f"every {self.interval * 1e3:g} ms, {bound}"


class LinkState(enum.Enum):
    """The device's view of its backend session."""

    UP = "up"                   #: the session answers
    RECONNECTING = "reconnecting"   #: lost; the guest has not been told (policy within its deadline)
    DOWN = "down"               #: lost and given up on for now; the guest sees NEEDS_RESET


class DeviceEventKind(enum.Enum):
    BACKEND_LOST = "backend lost"
    RECONNECT_ATTEMPT_FAILED = "reconnect attempt failed"
    RECONNECTED = "reconnected"
    RESUMED = "rings resumed"
    FAILED = "failed"           #: DEVICE_NEEDS_RESET raised
    RESET = "reset completed"
    BACKEND_ERROR = "backend error"     #: a backend error that did not fail the device (a guest
                                        #: reset completed over it; the backend is reset again
                                        #: before the next start)


@dataclass(frozen=True)
class DeviceEvent:
    """Something that happened to a device; ``at`` is its clock's time."""

    kind: DeviceEventKind
    at: float
    detail: str = ""
    error: BaseException | None = None


DeviceListener = Callable[[DeviceEvent], None]


@dataclass
class EventLog:
    """The device's recent events (bounded) and its listeners."""

    clock: Callable[[], float] = time.monotonic
    limit: int = 256
    events: list[DeviceEvent] = field(default_factory=list)
    _listeners: list[DeviceListener] = field(default_factory=list)

    def subscribe(self, listener: DeviceListener) -> Callable[[], None]:
        """Call *listener* for every event from now on; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def emit(self, kind: DeviceEventKind, detail: str = "", error: BaseException | None = None) -> DeviceEvent:
        event = DeviceEvent(kind, self.clock(), detail, error)
        self.events.append(event)
        if len(self.events) > self.limit:
            del self.events[:len(self.events) - self.limit]
        for listener in list(self._listeners):
            listener(event)
        return event

    def last(self, kind: DeviceEventKind) -> DeviceEvent | None:
        return next((e for e in reversed(self.events) if e.kind is kind), None)


class _Watchable(Protocol):
    name: str
    events: EventLog
    failure: BaseException | None

    def failed(self) -> bool: ...


T = TypeVar("T")


async def unless_failed(device: _Watchable, awaitable: Awaitable[T]) -> T:
    """Await *awaitable*, but raise :class:`DeviceFailedError` the moment *device* fails.

    Requests in flight on a failed device never complete (their buffers stay in the
    ring until the guest resets it), so anything waiting for I/O should wait through this.
    """
    if device.failed():
        raise DeviceFailedError(device.name, device.failure) from device.failure
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[None] = loop.create_future()

    def on_event(event: DeviceEvent) -> None:
        if event.kind is DeviceEventKind.FAILED and not failed.done():
            failed.set_result(None)

    unsubscribe = device.events.subscribe(on_event)
    work = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait((work, failed), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        unsubscribe()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise DeviceFailedError(device.name, device.failure) from device.failure
