"""The process's open fds (no pytest needed: the conformance kit and `shadowvmm check` use it)."""

from __future__ import annotations

import os

__all__ = ["open_fds"]


def open_fds() -> dict[int, str]:
    """This process's open fds and what they point at."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return fds
