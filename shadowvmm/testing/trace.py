"""The vhost-user message trace of one test, kept in a ring buffer (:class:`MessageTrace`).

The vhost-user plugin logs every message it sends and every reply at DEBUG on the
``shadowvmm_vhost_user`` loggers (request, flags, size, fds, latency). While a
:class:`MessageTrace` is installed those records reach its ring buffer; a record that would
not have been emitted without the trace is marked *trace only* (:data:`TRACE_ONLY`), and
:class:`TraceOnlyFilter` on a handler (the plugin puts one on pytest's log capture) drops
it, so a test's captured log does not fill with the trace.
"""

from __future__ import annotations

import logging
from collections import deque
from types import TracebackType
from typing import Final, Self

#: The vhost-user plugin's logger (every module logs on a child of it).
VHOST_USER_LOGGER: Final = "shadowvmm_vhost_user"
#: Messages kept by default.
DEFAULT_MESSAGES: Final = 50
#: Attribute set on every record a trace saw: True when it is there only for the trace.
TRACE_ONLY: Final = "shadowvmm_trace_only"
#: The level an installed trace gives the logger: DEBUG passes, and a level set by anyone
#: else during the test (``caplog.set_level``) is told apart from it.
_OWN_LEVEL: Final = logging.DEBUG - 1


class MessageTrace(logging.Handler):
    """The last *capacity* records of *logger* (DEBUG and up) while installed (``with``).

    Installing lets DEBUG through the logger; a record below the level that would have let
    it through without the trace (the logger's own level, or the root logger's when it has
    none; or the level a test sets with ``caplog.set_level`` meanwhile) is marked
    :data:`TRACE_ONLY`. Leaving restores the level.
    """

    def __init__(self, capacity: int = DEFAULT_MESSAGES, logger: str = VHOST_USER_LOGGER) -> None:
        super().__init__(logging.DEBUG)
        self.records: deque[logging.LogRecord] = deque(maxlen=max(1, capacity))
        self.seen = 0
        self._logger = logging.getLogger(logger)
        self._saved: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.seen += 1
        setattr(record, TRACE_ONLY, record.levelno < self._propagation_level())

    def _propagation_level(self) -> int:
        """The level from which a record would have been emitted without this trace."""
        level = self._logger.level
        if level != _OWN_LEVEL:
            return level                    # set during the test (caplog.set_level)
        saved = logging.NOTSET if self._saved is None else self._saved
        if saved != logging.NOTSET:
            return saved
        return logging.getLogger().getEffectiveLevel()

    def format_tail(self) -> str:
        """The kept records, oldest first, one line each (time since the first one kept)."""
        if not self.records:
            return "(no vhost-user message was logged)"
        start = self.records[0].created
        skipped = self.seen - len(self.records)
        head = [f"... {skipped} earlier records not kept"] if skipped else []
        return "\n".join(head + [f"+{r.created - start:8.4f}s {r.levelname:<7} {r.name}: {r.getMessage()}"
                                 for r in self.records])

    def install(self) -> Self:
        if self._saved is not None:
            return self
        logger = self._logger
        self._saved = logger.level
        logger.setLevel(_OWN_LEVEL)
        logger.addHandler(self)
        return self

    def uninstall(self) -> None:
        if self._saved is None:
            return
        logger = self._logger
        logger.removeHandler(self)
        logger.setLevel(self._saved)
        self._saved = None

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.uninstall()


class TraceOnlyFilter(logging.Filter):
    """Drops the records a :class:`MessageTrace` marked :data:`TRACE_ONLY`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.__dict__.get(TRACE_ONLY, False)
