"""A one-line progress bar on stderr, drawn only on a terminal and only once a run has taken more than a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "samples") as p: ... p.advance(n)``; silent when disabled, off a TTY, or when quick."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None,
                 delay_s: float = 1.0, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = bool(enabled and total > 0 and isatty())
        self.total, self.label, self.delay_s, self.width = total, label, delay_s, width
        self.done = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.drawn = False

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start < self.delay_s or (now - self.last_draw < 0.1 and self.done < self.total):
            return
        self.last_draw = now
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {now - self.start:.1f}s")
        self.stream.flush()
        self.drawn = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
