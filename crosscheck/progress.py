"""Progress on stderr for the phases of a study that take long, and silence for those that do not.

A phase that is still running after ``delay_s`` announces itself; one that ends sooner prints nothing:

* on a terminal, a line redrawn in place (``\\r``): the label, then a bar ``[####.....] done/total`` when the phase
  counts something, and the elapsed time;
* anywhere else (a pipe, a log file, CI), exactly one line per phase, written in two parts: ``crosscheck: <label> ...``
  when the delay has passed, and `` done in 3.2 s`` (or `` 1000/1000 in 3.2 s``) when the phase ends.

A timer thread does the announcing, so a phase that blocks (Numba compiling, waiting for the torch worker) is
announced on time too. Only stderr is written, never stdout (``--json -`` and ``--quiet`` keep stdout clean).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

PREFIX = "crosscheck: "
DELAY_S = 2.0
"""A phase shorter than this prints nothing."""


class Progress:
    """``with Progress("samples", total) as p: ... p.advance(n)``, or ``with Progress("label"):`` for a phase that
    counts nothing; silent when disabled or when the phase ends within ``delay_s`` (default :data:`DELAY_S`)."""

    def __init__(self, label: str, total: int | None = None, *, enabled: bool = True, stream: TextIO | None = None,
                 delay_s: float | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = bool(enabled)
        self.label, self.total, self.width = label, total, width
        self.delay_s = DELAY_S if delay_s is None else delay_s
        self.done = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.announced = False
        self.finished = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "Progress":
        self.start = time.perf_counter()
        if self.enabled:
            self._timer = threading.Timer(self.delay_s, self._announce)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _status(self) -> str:
        if self.total is None:
            return ""
        if not self.tty:
            return f" {self.done}/{self.total}"
        filled = int(self.width * min(self.done, self.total) / self.total) if self.total else self.width
        return f" [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"

    def _draw(self) -> None:  # terminal only; caller holds the lock
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{PREFIX}{self.label}{self._status()} {elapsed:.1f} s")
        self.stream.flush()
        self.last_draw = time.perf_counter()

    def _announce(self) -> None:
        with self._lock:
            if self.finished or self.announced:
                return
            self.announced = True
            if self.tty:
                self._draw()
            else:
                self.stream.write(f"{PREFIX}{self.label} ...")
                self.stream.flush()

    def advance(self, n: int) -> None:
        self.done += n
        if not (self.enabled and self.tty and self.announced):
            return
        if time.perf_counter() - self.last_draw >= 0.1:
            with self._lock:
                if not self.finished:
                    self._draw()

    def __exit__(self, exc_type, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self.finished = True
            if not self.announced:
                return
            elapsed = time.perf_counter() - self.start
            ending = "stopped" if exc_type is not None else "done"
            if self.tty:
                self.stream.write(f"\r{PREFIX}{self.label}{self._status()} {elapsed:.1f} s, {ending}\n")
            elif self.total is None:
                self.stream.write(f" {ending} in {elapsed:.1f} s\n")
            else:
                self.stream.write(f"{self._status()} in {elapsed:.1f} s{'' if exc_type is None else ', stopped'}\n")
            self.stream.flush()
