"""The vhost-user message trace of one test, kept in a ring buffer (:class:`MessageTrace`).

The vhost-user plugin logs every message it sends and every reply at DEBUG on the
``shadowvmm_vhost_user`` loggers (request, flags, size, fds, latency). While a
:class:`MessageTrace` is installed those records go to its ring buffer only; records at
or above the level the logger had before still reach the root handlers (pytest's log
capture) as they would have, so a test's captured log does not fill with the trace.
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
#: The level an installed trace gives the logger: DEBUG passes, and a level set by anyone
#: else during the test (``caplog.set_level``) is told apart from it.
_OWN_LEVEL: Final = logging.DEBUG - 1


class MessageTrace(logging.Handler):
    """The last *capacity* records of *logger* (DEBUG and up) while installed (``with``).

    Installing lets DEBUG through the logger and stops its propagation; a record that would
    have propagated without the trace (at or above the logger's own level, or the root
    logger's when it has none; or the level a test sets with ``caplog.set_level`` meanwhile)
    is still handed to the root logger's handlers. Leaving restores the level and propagation.
    """

    def __init__(self, capacity: int = DEFAULT_MESSAGES, logger: str = VHOST_USER_LOGGER) -> None:
        super().__init__(logging.DEBUG)
        self.records: deque[logging.LogRecord] = deque(maxlen=max(1, capacity))
        self.seen = 0
        self._logger = logging.getLogger(logger)
        self._saved: tuple[int, bool] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.seen += 1
        if record.levelno >= self._propagation_level():
            logging.getLogger().handle(record)

    def _propagation_level(self) -> int:
        """The level from which a record would reach the root handlers without this trace."""
        level = self._logger.level
        if level != _OWN_LEVEL:
            return level                    # set during the test (caplog.set_level)
        saved = logging.NOTSET if self._saved is None else self._saved[0]
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
        self._saved = (logger.level, logger.propagate)
        logger.setLevel(_OWN_LEVEL)
        logger.propagate = False
        logger.addHandler(self)
        return self

    def uninstall(self) -> None:
        if self._saved is None:
            return
        logger = self._logger
        logger.removeHandler(self)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]
        self._saved = None

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.uninstall()
