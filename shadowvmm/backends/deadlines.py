"""Callbacks at monotonic deadlines to the microsecond, from one Linux timerfd.

An event loop's own timers are too coarse for a device model's latency: uvloop
(libuv) keeps them in whole milliseconds of a clock read when the timer starts,
so a 5 ms ``call_later`` made while the loop is busy fires anywhere from 4.1 to
5.9 ms later, and asyncio rounds its poll timeout up to the next millisecond
(5.0-6.1 ms). A timerfd armed at an absolute ``CLOCK_MONOTONIC`` deadline
(timerfd_create(2)) wakes the loop's poll when the deadline passes, whatever
the loop did meanwhile: the same clock as :func:`time.monotonic_ns`.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from ..errors import BackendError

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFd:
    """The two libc calls (Python's ``os.timerfd_*`` only exist from 3.13)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._create = libc.timerfd_create
        self._create.argtypes = [ctypes.c_int, ctypes.c_int]
        self._settime = libc.timerfd_settime
        self._settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                  ctypes.POINTER(_Itimerspec)]
        self._spec = _Itimerspec()
        self._ref = ctypes.byref(self._spec)
        fd = self._create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise BackendError(f"timerfd_create: {os.strerror(err)}")
        self.fd = fd

    def arm(self, deadline_ns: int) -> None:
        """Fire once at *deadline_ns* (CLOCK_MONOTONIC; one in the past fires at once)."""
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(max(deadline_ns, 1), 1_000_000_000)
        if self._settime(self.fd, _TFD_TIMER_ABSTIME, self._ref, None) < 0:
            err = ctypes.get_errno()
            raise BackendError(f"timerfd_settime: {os.strerror(err)}")

    def close(self) -> None:
        os.close(self.fd)


class DeadlineTimer:
    """``call_later`` kept to the microsecond on *loop* (module docstring).

    Callbacks due at the same time run in the order they were scheduled; one that raises
    goes to the loop's exception handler and the others still run. :meth:`close` drops
    whatever is still pending.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timerfd = _TimerFd()
        self._heap: list[tuple[int, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._armed = 0         # the deadline the timerfd is set to; 0: none
        self._soon = False      # a pass over what is due is queued on the loop
        loop.add_reader(self._timerfd.fd, self._fire)

    def __len__(self) -> int:
        return len(self._heap)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` once *delay* seconds have passed."""
        if self._timerfd.fd < 0:
            raise BackendError("the deadline timer is closed")
        deadline = time.monotonic_ns() + int(delay * 1e9)
        heapq.heappush(self._heap, (deadline, next(self._order), callback, args))
        if not self._armed or deadline < self._armed:
            self._timerfd.arm(deadline)
            self._armed = deadline

    def _fire(self) -> None:
        try:
            os.read(self._timerfd.fd, 8)
        except BlockingIOError:
            pass
        self._armed = 0
        self._run_due()

    def _run_due(self, soon: bool = False) -> None:
        """Run what is due; what came due meanwhile runs in a later pass, after the callbacks
        the loop got ready meanwhile (the tasks they woke), not after a timer wake-up."""
        heap = self._heap
        if self._timerfd.fd < 0 or self._soon and not soon:
            return      # closed; or a pass is already on its way
        now = time.monotonic_ns()
        while heap and heap[0][0] <= now:
            _, _, callback, args = heapq.heappop(heap)
            try:
                callback(*args)
            except Exception as exc:
                self._loop.call_exception_handler({"message": f"deadline callback {callback!r} failed",
                                                   "exception": exc})
        self._soon = False
        if not heap:
            return
        first = heap[0][0]
        if first <= time.monotonic_ns():
            self._soon = True
            self._loop.call_soon(self._run_due, True)
        elif not self._armed or first < self._armed:
            self._timerfd.arm(first)
            self._armed = first

    def close(self) -> None:
        if self._timerfd.fd < 0:
            return
        self._loop.remove_reader(self._timerfd.fd)
        self._timerfd.close()
        self._timerfd.fd = -1
        self._heap.clear()
