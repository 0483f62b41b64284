"""Helpers shared by the benchmark scripts (not part of the package).

Every script prints one JSON document on stdout; these helpers only measure, they never adjust
a figure: a rate is requests divided by the wall-clock seconds the requests took.

The convention ``benchmarks/run_all.py`` (``make bench``) relies on: a benchmark is a
``benchmarks/*.py`` whose name does not start with ``_``; it accepts ``--quick`` (tiny
iteration counts: a smoke run whose figures mean nothing) and ``--profile`` (cProfile's top
entries of the measured operation); the JSON document it prints carries ``"goals"``: a list of
:meth:`Goal.record` dicts, one per figure the project has a goal for (:func:`goals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import os
import platform
import pstats
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Goal:
    """One figure and the project's goal for it.

    *better* says which way is good: ``"lower"`` (a time: met when value <= goal) or
    ``"higher"`` (a rate: met when value >= goal). A figure that could not be measured is
    ``None`` and never met.
    """

    name: str
    value: float | None
    goal: float
    unit: str
    better: Literal["lower", "higher"] = "lower"

    @property
    def met(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.goal if self.better == "lower" else self.value >= self.goal

    def record(self) -> dict[str, Any]:
        """The JSON form ``run_all.py`` reads: name, value, goal, unit, better, ratio (value/goal), met."""
        ratio = None if self.value is None or not self.goal else round(self.value / self.goal, 4)
        return {"name": self.name, "value": self.value, "goal": self.goal, "unit": self.unit,
                "better": self.better, "ratio": ratio, "met": self.met}


def goals(*items: Goal) -> list[dict[str, Any]]:
    """The ``"goals"`` list of a benchmark's JSON document."""
    return [g.record() for g in items]


def run_loop(coro_factory: Callable[[], Awaitable[T]], loop: str = "uvloop") -> T:
    """Run ``coro_factory()`` on a fresh event loop: ``uvloop`` (what ``shadowvmm run`` uses) or ``asyncio``."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro_factory())  # type: ignore[arg-type]
    if loop != "asyncio":
        raise ValueError(f"unknown loop {loop!r}")
    with asyncio.Runner() as runner:
        return runner.run(coro_factory())  # type: ignore[arg-type]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (they are only comparable within one run)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)),
            "loadavg_1m": round(load[0], 2)}


def pin_threads(pid: int, cpu: int) -> list[int]:
    """Pin every thread of *pid* to *cpu*; returns the thread ids pinned."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for tid in tids:
        os.sched_setaffinity(tid, {cpu})
    return tids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class Stopwatch:
    """Wall-clock seconds plus the CPU seconds of this process and, optionally, one peer."""

    def __init__(self, peer_pid: int | None = None) -> None:
        self.peer_pid = peer_pid
        self.wall = self.cpu_self = self.cpu_peer = 0.0

    def __enter__(self) -> Stopwatch:
        self._t = time.perf_counter()
        self._c = time.process_time()
        self._p = cpu_seconds(self.peer_pid) if self.peer_pid else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t
        self.cpu_self = time.process_time() - self._c
        if self.peer_pid:
            self.cpu_peer = cpu_seconds(self.peer_pid) - self._p


@contextlib.contextmanager
def profiled(enabled: bool, timer: Callable[[], float] | None = None) -> Iterator[cProfile.Profile | None]:
    """cProfile the block when *enabled*; *timer* replaces the wall clock (e.g. ``time.thread_time``:
    CPU time, so time the process spent descheduled on a busy machine is not charged to a function)."""
    if not enabled:
        yield None
        return
    prof = cProfile.Profile(timer) if timer is not None else cProfile.Profile()
    prof.enable()
    try:
        yield prof
    finally:
        prof.disable()


def profile_table(prof: cProfile.Profile, requests: int, top: int = 25) -> list[dict[str, Any]]:
    """The *top* functions by own time, as µs per request (profiler overhead included)."""
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in entries:
        where = f"{os.path.basename(filename)}:{line}({name})" if line else name
        rows.append({"function": where, "calls_per_request": round(ncalls / requests, 3),
                     "own_us_per_request": round(tottime / requests * 1e6, 3),
                     "cum_us_per_request": round(cumtime / requests * 1e6, 3)})
    rows.sort(key=lambda r: r["own_us_per_request"], reverse=True)
    return rows[:top]


def run_checked(argv: list[str], timeout: float = 120.0) -> str:
    """Run a command; its stdout+stderr, or raise with them on failure."""
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res.stdout + res.stderr
