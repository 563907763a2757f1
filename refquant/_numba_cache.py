"""When Numba cannot cache refquant's kernels: compile them uncached, with one warning.

refquant's kernels are ``@njit(cache=True)``. Numba stores compiled code in the first location it can write:
NUMBA_CACHE_DIR, the ``__pycache__`` next to the source, the user's cache directory (``$XDG_CACHE_HOME/numba`` or
``~/.cache/numba``). When it can write none of them (a read-only install in a container, a locked-down home),
Numba raises "cannot cache function ...: no locator available" at the decorator, so importing the module fails.

:func:`install`, called by ``refquant/__init__.py`` before any kernel is defined, asks Numba once whether it finds
a cache location for a file in refquant's directory (all of refquant's modules are there, so Numba's answer is the
same for each). If it does, nothing changes. If not, it warns once (:class:`NumbaCacheWarning`, saying how to set
NUMBA_CACHE_DIR) and lets the ``cache=True`` of functions defined in refquant's directory compile without a cache:
the same bits, compiled again in each process. Functions outside refquant keep Numba's behaviour.
"""

from __future__ import annotations

import inspect
import os
import warnings

from numba.core import caching, config, dispatcher

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class NumbaCacheWarning(RuntimeWarning):
    """Numba found no writable cache location: refquant's kernels are compiled in every process."""


def _probe() -> None:
    """A function defined in refquant's directory: Numba's cache locators decide by its file."""


def numba_can_cache() -> bool:
    """True if Numba finds a writable cache location for refquant's files (it creates the directory if needed)."""
    try:
        caching.FunctionCache(_probe)
    except RuntimeError as e:
        if "no locator available" not in str(e):
            raise
        return False
    return True


def _defined_in_refquant(py_func) -> bool:
    try:
        path = os.path.abspath(inspect.getfile(py_func))
    except TypeError:  # a built-in: not refquant's
        return False
    return os.path.dirname(path) == PACKAGE_DIR


_numba_enable_caching = dispatcher.Dispatcher.enable_caching


def _enable_caching_outside_refquant(self) -> None:
    """Dispatcher.enable_caching, except for refquant's functions, which keep the NullCache (compile uncached)."""
    if _defined_in_refquant(self.py_func):
        return
    _numba_enable_caching(self)


def install() -> bool:
    """Check once whether Numba can cache refquant's kernels; if not, warn and compile them uncached.
    Returns True if they are cached."""
    if dispatcher.Dispatcher.enable_caching is _enable_caching_outside_refquant:
        return False  # already installed (refquant reloaded)
    if numba_can_cache():
        return True
    tried = [f"NUMBA_CACHE_DIR={config.CACHE_DIR!r}" if config.CACHE_DIR else "NUMBA_CACHE_DIR (not set)",
             os.path.join(PACKAGE_DIR, "__pycache__"),
             os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "numba")]
    warnings.warn(
        f"refquant: Numba can write none of its cache locations ({', '.join(tried)}), so refquant's kernels are "
        f"compiled without a cache, again in every process (same results, slower first calls). To cache them, set "
        f"NUMBA_CACHE_DIR to a writable directory before importing refquant, e.g. "
        f"`export NUMBA_CACHE_DIR=/tmp/numba-cache`.",
        NumbaCacheWarning,
        stacklevel=3,
    )
    dispatcher.Dispatcher.enable_caching = _enable_caching_outside_refquant
    return False
