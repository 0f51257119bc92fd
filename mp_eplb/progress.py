"""Progress of long runs on stderr, without a dependency.

On a terminal, one line redrawn in place (a bar, the count, the elapsed time and a note); when
stderr is not a terminal (a log file, CI), a plain line at most every ``every_s`` seconds and
one at the end, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "announce"]

_BAR_WIDTH = 24


def announce(message: str, stream: TextIO | None = None) -> None:
    """Write one line at once (e.g. ``started 2 rank processes``), flushed."""
    out = stream or sys.stderr
    out.write(f"{message}\n")
    out.flush()


class Progress:
    """``total`` units of work named ``label``; call :meth:`update` with the units done (any
    rate; drawing is throttled) and :meth:`close` once. ``tty`` overrides the terminal check."""

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None,
                 every_s: float = 10.0, tty: bool | None = None) -> None:
        self.total, self.label = max(total, 1), label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.started = time.monotonic()
        self._drawn_at = float("-inf")
        self._done = 0

    def line(self, note: str = "") -> str:
        """The text of the current state (no newline)."""
        elapsed = time.monotonic() - self.started
        count = f"{self._done}/{self.total}"
        if self.tty:
            filled = round(min(self._done / self.total, 1.0) * _BAR_WIDTH)
            text = (f"{self.label} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {count} "
                    f"{elapsed:.0f} s")
        else:
            text = f"{self.label} {count} ({elapsed:.0f} s)"
        return f"{text} {note}".rstrip()

    def update(self, done: int, note: str = "") -> None:
        """Record ``done`` units; redraw (terminal: at most 10 times a second; otherwise one
        line every ``every_s`` seconds)."""
        self._done = done
        now = time.monotonic()
        if now - self._drawn_at < (0.1 if self.tty else self.every_s):
            return
        self._drawn_at = now
        self._write(note)

    def close(self, note: str = "") -> None:
        """Draw the final state and end the line."""
        self._write(note)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _write(self, note: str) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[K{self.line(note)}")
        else:
            self.stream.write(self.line(note) + "\n")
        self.stream.flush()
