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

The same call also makes one cache entry's validity cover the whole package. Numba keys a cached kernel to the
hash of the one file that defines it, but a kernel holds the code of every function it calls, and refquant's
kernels call functions of other modules (refquant.fused_linear's epilogues are refquant.engines' and
refquant.fixed_point's per-element functions): after an edit of refquant/engines.py alone, Numba would load the old
fused kernel and compute the old arithmetic, silently. So for a function defined in refquant's directory the
stamp is :func:`package_source_stamp`, a hash of every module of the package: any edit recompiles every kernel.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
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


def package_source_stamp() -> bytes:
    """sha256 over (name, sha256 of the source) of every module in refquant's directory, in name order: the stamp
    Numba stores with, and checks before loading, the cache entry of every refquant kernel. Each file's hash is
    Numba's own (``caching._hash_source_file``, memoized on the file's mtime and size)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(PACKAGE_DIR)):
        if name.endswith(".py"):
            path = os.path.join(PACKAGE_DIR, name)
            st = os.stat(path)
            h.update(name.encode())
            h.update(caching._hash_source_file(path, st.st_mtime, st.st_size))
    return h.digest()


_numba_source_stamp = caching._SourceFileBackedLocatorMixin.get_source_stamp


def _source_stamp_package_wide(self):
    """Numba's source stamp of a cached function's file, or :func:`package_source_stamp` for refquant's files."""
    if not getattr(sys, "frozen", False) and os.path.dirname(os.path.abspath(self._py_file)) == PACKAGE_DIR:
        return package_source_stamp()
    return _numba_source_stamp(self)


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
    if caching._SourceFileBackedLocatorMixin.get_source_stamp is not _source_stamp_package_wide:
        caching._SourceFileBackedLocatorMixin.get_source_stamp = _source_stamp_package_wide
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
