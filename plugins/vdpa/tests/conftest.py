"""Shared test hooks of the vDPA plugin: every test gives back the fds and tasks it opened
(:mod:`shadowvmm.testing.leaks`). The in-VM tests under ``vm/`` have their own conftest."""

from __future__ import annotations

from shadowvmm.testing.leaks import no_fd_leak, no_task_leak

__all__ = ["no_fd_leak", "no_task_leak"]
