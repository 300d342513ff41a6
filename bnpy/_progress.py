"""A one-line progress counter for the long commands (bench, demo, gradcheck).

It draws on standard error, and only when standard error is a terminal: in a
pipe, a log or a test it writes nothing, so what a command prints stays the
same there. Lines the command prints while it runs go through ``print``, which
clears the counter first and draws it again after the line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    """'42 s' or '3 min 05 s'."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


class Progress:
    """`total` units of work; `advance()` after each, `close()` at the end.

    The counter reads ``label 7/40 (17%), 12 s, about 57 s left``; the time
    left is the mean time per unit so far times the units left.
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self.start = time.monotonic()
        self._drawn = False
        self._drawn_at = -1.0
        self._draw()

    def text(self) -> str:
        elapsed = time.monotonic() - self.start
        text = f"{self.label} {self.done}/{self.total} ({self.done / self.total:.0%}), "
        text += _duration(elapsed)
        if 0 < self.done < self.total:
            left = elapsed / self.done * (self.total - self.done)
            text += f", about {_duration(left)} left"
        return text

    def _draw(self, *, every: float = 0.0) -> None:
        """Draw the counter, unless it was drawn less than `every` seconds ago."""
        now = time.monotonic()
        if self.enabled and now - self._drawn_at >= every:
            self.stream.write("\r\x1b[K" + self.text())
            self.stream.flush()
            self._drawn, self._drawn_at = True, now

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def advance(self, units: int = 1) -> None:
        self.done = min(self.done + units, self.total)
        self._draw(every=0.0 if self.done == self.total else 0.1)  # ten times a second at most

    def print(self, *values: object) -> None:
        """print(*values) to standard output, under the counter rather than through it."""
        self._clear()
        print(*values, flush=True)
        self._draw()

    def close(self) -> None:
        self._clear()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
