"""The C heap under the Python one: glibc malloc figures and `malloc_trim`.

Engines (pocketsphinx, onnxruntime, CTranslate2) allocate with malloc from the thread that runs
them, and every call's recognition runs on its own thread, so glibc spreads those allocations over
up to 8 arenas per core. Freed memory stays in the arenas (counted in RSS) until it is trimmed:
`trim()` asks glibc to return it (the top of each arena and whole free pages inside them).
On other C libraries (musl, macOS) both functions are no-ops.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

log = logging.getLogger(__name__)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes obtained with sbrk (main arena)
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in mmapped chunks (large allocations)
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes in use in the arenas
            "fordblks",  # bytes free in the arenas (held, counted in RSS when touched)
            "keepcost",
        )
    ]


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _load() -> tuple[object | None, object | None]:
    """(malloc_trim, mallinfo2), each None where the C library has no such function."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None, None
    trim = getattr(libc, "malloc_trim", None)
    info = getattr(libc, "mallinfo2", None)  # glibc >= 2.33
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    if info is not None:
        info.argtypes = []
        info.restype = _MallInfo2
    return trim, info


_trim, _info = _load()
_lock = threading.Lock()
trims = 0  # how many times trim() ran (reported in /api/stats)


def available() -> bool:
    return _trim is not None


def limit_arenas(count: int | None = None) -> int | None:
    """Cap glibc's malloc arenas at `count` (default: one per core) unless the operator set
    MALLOC_ARENA_MAX; the cap applied, or None. Call it before the engines' threads start.

    glibc gives threads up to 8 arenas per core. An engine loaded on a call's thread lands in an
    arena; disposed later, the pages its neighbours still pin stay resident even after a trim.
    Measured with 12 pocketsphinx+Silero pairs loaded on 12 threads then closed and trimmed:
    132 MB left above the start with the default arenas, 49 MB with 2."""
    if _trim is None or "MALLOC_ARENA_MAX" in os.environ:
        return None
    count = count if count is not None else max(2, os.cpu_count() or 2)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return count if mallopt(_M_ARENA_MAX, count) == 1 else None


def malloc_figures() -> dict[str, object]:
    """`{"malloc_in_use_mb", "malloc_free_mb", "malloc_trims"}` on glibc, {} elsewhere."""
    if _info is None:
        return {}
    info = _info()  # type: ignore[operator]
    return {
        "malloc_in_use_mb": round((info.uordblks + info.hblkhd) / 2**20, 1),
        "malloc_free_mb": round(info.fordblks / 2**20, 1),
        "malloc_trims": trims,
    }


def trim() -> float:
    """Return the C heap's free memory to the system (glibc `malloc_trim(0)`); the seconds it took.

    It walks every arena with each one's lock held in turn, so it costs a few ms: call it off the
    event loop, after something large was freed (an engine disposed), not per frame."""
    global trims
    if _trim is None:
        return 0.0
    started = time.perf_counter()
    with _lock:  # one at a time: concurrent trims would only contend for the same arena locks
        _trim(0)  # type: ignore[operator]
        trims += 1
    return time.perf_counter() - started
