"""Run the torch side of a study in a worker process, so that torch's import and work (about 1.5 s) overlap with
refquant's Numba start-up on another core. Only NumPy arrays cross the pipe; the parent never imports torch.

The worker is forked before the parent has imported torch, so the environment of ``--isa``
(crosscheck.isa.worker_environment, e.g. FBGEMM_ENABLE_INSTRUCTIONS=AVX2) is set in the child before its
``import torch``; the child's first event reports the kernel family its probe found, and the study refuses to go on
when that is not the family asked for.

If torch is already imported in this process (tests, notebooks), there is nothing to overlap: the events are
produced in-process instead — unless ``--isa`` asks for a family this process does not run (fbgemm fixed it at the
first quantized op); then a fresh worker is spawned with that environment.

Which torch side runs is the config's ``torch_side`` ("module:function", a generator of events taking
``(config, where)``): crosscheck.torch_study's for crosscheck.linear (the default), crosscheck.torch_model's for
crosscheck.model. The config must be picklable (the spawn start method pickles it).
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing as mp
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn

DEFAULT_TORCH_SIDE = "crosscheck.torch_study:torch_events"


class UsageError(ValueError):
    """The torch side refused the options (e.g. an engine this torch build does not support): exit code 2."""


class TorchSideError(RuntimeError):
    """The torch side failed unexpectedly; carries the worker's traceback."""


@contextmanager
def collector_paused(*, freeze: bool = False) -> Iterator[None]:
    """Python's cyclic garbage collector paused (if it ran) for a large import: importing torch, or refquant with
    Numba, creates hundreds of thousands of objects that live on, and the collector's passes over them cost ~10-20%
    of the import (measured here: torch 1.85 -> 1.67 s, refquant 1.08 -> 0.95 s). Objects are freed by reference
    counting meanwhile as always; only cycles wait for the collector, which runs again after the block.
    ``freeze`` (the worker process, which exits after its study) moves every object alive at the end into the
    collector's permanent generation (``gc.freeze``), so that its first pass afterwards does not walk them all
    (~0.1 s after torch's import)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()


def exit_after_main(code: int) -> NoReturn:
    """``sys.exit(code)`` for a CLI's ``__main__`` block, without the interpreter's last collector pass: the
    objects alive at the end (Numba's and llvmlite's hundreds of thousands after refquant's import) move to the
    collector's permanent generation first (``gc.freeze``), so the final pass at shutdown does not walk them (it cost
    ~170 ms of a 2.5 s study here, measured from the last line printed to the process's end). Everything else
    of the shutdown runs as usual: atexit handlers, module teardown, the flush of stdout and stderr; every file
    refquant and crosscheck write is closed (and renamed into place) before main returns."""
    gc.freeze()
    sys.exit(code)


def torch_side(config, side: str | None = None) -> Callable[..., Iterator[tuple[str, Any]]]:
    """The events function ``side`` ("module:function"; None: ``config.torch_side``) names (imports its module,
    hence torch)."""
    module, _, function = (side or getattr(config, "torch_side", DEFAULT_TORCH_SIDE)).partition(":")
    return getattr(importlib.import_module(module), function)


def run_events(events: Callable[..., Iterator[tuple[str, Any]]], config, conn, where: str) -> None:
    """Send every event of ``events(config, where)`` through ``conn``, then ("done", None); a UsageError as
    ("usage_error", message), any other exception as ("error", traceback)."""
    try:
        for event in events(config, where):
            conn.send(event)
        conn.send(("done", None))
    except UsageError as e:
        conn.send(("usage_error", str(e)))
    except BaseException:  # pragma: no cover - reported by the parent
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _entry(config, conn, start_method: str, side: str | None = None) -> None:
    from .isa import apply_environment, worker_environment

    where = f"worker process ({start_method}ed"
    where += ", torch already imported)" if "torch" in sys.modules else " before torch was imported)"
    apply_environment(worker_environment(config.isa))  # before torch is imported in this process
    with collector_paused(freeze=True):
        events = torch_side(config, side)  # imports torch: in the worker only
    run_events(events, config, conn, where)


def _in_process(config, side: str | None = None) -> Iterator[tuple[str, Any]]:
    yield from torch_side(config, side)(config, where="this process (torch already imported)")


def _in_subprocess(config, side: str | None = None) -> Iterator[tuple[str, Any]]:
    """Start the worker now; return the iterator over its events."""
    # fork is quick, and safe while this process has not loaded torch (its thread pools do not survive a fork)
    fork_ok = "fork" in mp.get_all_start_methods() and "torch" not in sys.modules
    method = "fork" if fork_ok else "spawn"
    ctx = mp.get_context(method)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_entry, args=(config, sender, method, side), daemon=True, name="crosscheck-torch")
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


def torch_events(config, *, subprocess: bool | None = None, side: str | None = None) -> Iterator[tuple[str, Any]]:
    """The events of the torch side ``side`` ("module:function"; None: ``config.torch_side``, by default
    crosscheck.torch_study.torch_events), from a worker process (started at once) unless torch is already loaded
    and runs the kernel family ``config.isa`` asks for (``subprocess=None``), or as forced by ``subprocess``
    (run_study then refuses a family the in-process torch cannot honour)."""
    if subprocess is None:
        subprocess = "torch" not in sys.modules
        if not subprocess and config.isa != "auto":
            from .isa import torch_fbgemm_kernel_family

            subprocess = torch_fbgemm_kernel_family() != config.isa  # this process cannot switch: a fresh one can
    return _in_subprocess(config, side) if subprocess else _in_process(config, side)
