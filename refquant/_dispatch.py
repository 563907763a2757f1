"""When a dispatcher runs its readable NumPy path instead of its Numba kernel: small calls, and only a few of them.

A Numba kernel costs seconds to compile on the first run after an install (and tens of milliseconds to load from
the cache afterwards); the readable path it repeats, which the tests prove equal to it bit for bit, costs
microseconds to a millisecond on a small input. A run that makes a few small calls (the default crosscheck study)
is fastest with NumPy alone; a run that makes many (a golden model run sample by sample), or any large call, with
the kernel. :class:`SmallCalls` decides so for one dispatcher (refquant.quantize, refquant.engines,
refquant.matmul): the readable path for a call smaller than ``min_size`` while fewer than ``max_calls`` such calls
were made in this process, the kernel otherwise. Both paths give the same bits, so the choice changes no result.
"""

from __future__ import annotations

SMALL_CALLS = 64
"""How many small calls of one dispatcher run its readable path before it switches to its kernel for good: a few
milliseconds of NumPy at most, less than a kernel costs to load."""


class SmallCalls:
    """``readable(size)``: True to run the readable path for a call of ``size`` (elements, multiply-adds: what the
    dispatcher's ``min_size`` counts); counts it. Threads may race on the count: that only moves the switch by a
    call."""

    def __init__(self, min_size: int, max_calls: int = SMALL_CALLS) -> None:
        self.min_size = min_size
        self.max_calls = max_calls
        self.calls = 0

    def readable(self, size: int) -> bool:
        if size >= self.min_size or self.calls >= self.max_calls:
            return False
        self.calls += 1
        return True
