"""Shared test hooks of the vhost-user plugin: every test gives back the fds and tasks it opened
(:mod:`shadowvmm.testing.leaks`); the real-peer fixtures come from the ``shadowvmm`` pytest plugin."""

from __future__ import annotations

from shadowvmm.testing.leaks import no_fd_leak, no_task_leak

__all__ = ["no_fd_leak", "no_task_leak"]
