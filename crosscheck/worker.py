"""Run the torch side of a study in a worker process, so that torch's import and work (about 1.5 s) overlap with
refquant's Numba start-up on another core. Only NumPy arrays cross the pipe; the parent never imports torch.

If torch is already imported in this process (tests, notebooks), there is nothing to overlap: the events are
produced in-process instead.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from typing import Any, Iterator


class UsageError(ValueError):
    """The torch side refused the options (e.g. an engine this torch build does not support): exit code 2."""


class TorchSideError(RuntimeError):
    """The torch side failed unexpectedly; carries the worker's traceback."""


def _entry(config, conn) -> None:
    from .torch_study import _worker  # imports torch: in the worker only

    _worker(config, conn)


def _in_process(config) -> Iterator[tuple[str, Any]]:
    from .torch_study import torch_events

    yield from torch_events(config)


def _in_subprocess(config) -> Iterator[tuple[str, Any]]:
    """Start the worker now; return the iterator over its events."""
    # fork is quick, and safe while this process has not loaded torch (its thread pools do not survive a fork)
    fork_ok = "fork" in mp.get_all_start_methods() and "torch" not in sys.modules
    ctx = mp.get_context("fork" if fork_ok else "spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_entry, args=(config, sender), daemon=True, name="crosscheck-torch")
    proc.start()
    sender.close()
    return _receive(proc, receiver)


def _receive(proc, receiver) -> Iterator[tuple[str, Any]]:
    try:
        while True:
            try:
                kind, payload = receiver.recv()
            except EOFError:
                proc.join(timeout=5)
                raise TorchSideError(f"the torch worker process exited unexpectedly (exit code {proc.exitcode})")
            if kind == "done":
                return
            if kind == "usage_error":
                raise UsageError(payload)
            if kind == "error":
                raise TorchSideError("the torch side failed:\n" + payload)
            yield kind, payload
    finally:
        receiver.close()
        proc.join(timeout=5)
        if proc.is_alive():  # pragma: no cover - only if the parent stops early
            proc.terminate()
            proc.join()


def torch_events(config, *, subprocess: bool | None = None) -> Iterator[tuple[str, Any]]:
    """The events of crosscheck.torch_study.torch_events, from a worker process (started at once) unless torch is
    already loaded (``subprocess=None``), or as forced by ``subprocess``."""
    if subprocess is None:
        subprocess = "torch" not in sys.modules
    return _in_subprocess(config) if subprocess else _in_process(config)
