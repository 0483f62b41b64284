"""Progress of long work on a terminal: one line rewritten in place (``\\r``), throttled.

:class:`Progress` writes only when its stream is a TTY (a pipe or a file gets nothing, so
``--json`` output and logs stay clean); the stream and the clock are injected, nothing is
global. :meth:`Progress.update` redraws ``label: done/total (pct%) detail`` at most every
*interval* seconds; :meth:`Progress.note` prints a finished line (a pre-copy round);
:meth:`Progress.close` clears the line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

#: Seconds between two redraws.
DEFAULT_INTERVAL = 0.2
_CLEAR = "\r\033[K"


class Progress:
    """A progress line on *stream* (only when it is a TTY, or when *enabled* says so)."""

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None,
                 clock: Callable[[], float] = time.monotonic, interval: float = DEFAULT_INTERVAL,
                 enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self.enabled = stream is not None and (stream.isatty() if enabled is None else enabled)
        self._last: float | None = None
        self._drawn = False

    def _write(self, text: str) -> None:
        assert self.stream is not None
        self.stream.write(text)
        self.stream.flush()

    def update(self, done: int, detail: str = "", *, force: bool = False) -> None:
        """Redraw with *done* units of work finished (at most every ``interval`` seconds)."""
        if not self.enabled:
            return
        now = self.clock()
        if not force and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        if self.total:
            text = f"{self.label}: {done}/{self.total} ({100 * done // self.total}%)"
        else:
            text = f"{self.label}: {done}"
        self._write(_CLEAR + text + (f" {detail}" if detail else ""))
        self._drawn = True

    def note(self, line: str) -> None:
        """A line that stays (the progress line, if any, is redrawn at the next update)."""
        if not self.enabled:
            return
        self._write((_CLEAR if self._drawn else "") + line + "\n")
        self._drawn = False
        self._last = None

    def close(self) -> None:
        """Clear the progress line."""
        if self.enabled and self._drawn:
            self._write(_CLEAR)
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
