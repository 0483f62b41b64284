"""Every test gives back the fds and tasks it opened."""

from __future__ import annotations

from shadowvmm.testing.leaks import no_fd_leak, no_task_leak

__all__ = ["no_fd_leak", "no_task_leak"]
