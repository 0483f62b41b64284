"""This process's open file descriptors (no pytest: the ``check`` command uses it too)."""

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
