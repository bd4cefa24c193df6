"""Giving freed memory back to the operating system.

glibc's allocator keeps freed blocks of the heap for reuse instead of returning them, and after a large block is
freed it raises its threshold for serving blocks that size from the heap. So after a large model's copy, a
gradient accumulator or an ONNX Runtime session is freed, the process's resident memory (RSS) stays as high as
before: on SmolLM2, dropping the loaded copy of the model frees 0.53 GB of RSS only with ``malloc_trim(0)``, and
dropping a session 0.44 GB. :func:`release` calls it where llc-onnx has just freed something large; elsewhere
(not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc = None


def release() -> None:
    """Collect garbage, drop the pages of spilled arrays (:func:`drop_mapped_pages`), then return the allocator's
    free memory to the OS (:func:`trim`)."""
    gc.collect()
    drop_mapped_pages()
    trim()


def trim(min_free: int = 0) -> None:
    """Return the allocator's free memory to the OS (``malloc_trim(0)``, glibc only; no garbage collection). With
    ``min_free``, only when the heap holds at least that many free bytes (``mallinfo2``, glibc ≥ 2.33; without it
    always): run between two measurement tasks, whose node-sized temporaries otherwise leave the heap at its
    high-water mark (SmolLM2's candidate stage: ~1 GB above what it holds), without giving back, and faulting in
    again, a few free pages after every task."""
    libc = _glibc()
    if not libc:
        return
    if min_free > 0 and _mallinfo2 and libc.mallinfo2().fordblks < min_free:
        return
    libc.malloc_trim(0)


#: :func:`trim` between measurement tasks once the heap holds this much free memory
TASK_TRIM_BYTES = 256 << 20

_mallinfo2 = False


def _glibc():
    global _libc, _mallinfo2
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
            return _libc
        try:
            class _MallInfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                           "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

            _libc.mallinfo2.restype = _MallInfo2
            _mallinfo2 = True
        except AttributeError:  # glibc < 2.33
            _mallinfo2 = False
    return _libc


class Spill:
    """Large arrays moved out of the process's memory into files (a temporary directory under ``$TMPDIR``, removed
    with this object) and mapped back read-only (``np.load(mmap_mode="r")``): the same values, read from the page
    cache when used. :func:`drop_mapped_pages` drops the pages a pass touched from the process's memory again
    (``madvise(MADV_DONTNEED)``; the data stays in the file). Used for the gradient accumulators, which the
    candidate stage reads one node at a time.

    The directory is a :mod:`llc_onnx.tempdirs` one (``llc-spill-<pid>-…``): one left by a killed process is
    removed by the next run."""

    def __init__(self):
        import shutil
        import weakref

        from . import tempdirs

        self.dir = tempdirs.make("spill")
        self.arrays: list = []
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)
        _SPILLS.add(self)

    def put(self, arr):
        """``arr`` written to a file, returned as a read-only memory map of it."""
        import os

        import numpy as np

        path = os.path.join(self.dir, f"{len(self.arrays)}.npy")
        np.save(path, np.ascontiguousarray(arr))
        mapped = np.load(path, mmap_mode="r")
        self.arrays.append(mapped)
        return mapped

    def drop_pages(self) -> None:
        import mmap

        for a in self.arrays:
            m = getattr(a, "_mmap", None)
            if m is not None and not m.closed:
                m.madvise(mmap.MADV_DONTNEED)


def _weak_set():
    import weakref

    return weakref.WeakSet()


_SPILLS = _weak_set()


def drop_mapped_pages() -> None:
    """Drop every live :class:`Spill`'s touched pages from this process's memory (between two tasks)."""
    for s in list(_SPILLS):
        s.drop_pages()


# -- measuring (benchmarks and tests) -------------------------------------------------------------------------
def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss() -> int:
    """This process's resident memory now (VmRSS), in bytes."""
    return status_bytes("VmRSS")


def high_water() -> int:
    """The kernel's peak RSS of this process since the last :func:`reset_high_water` (VmHWM), in bytes: exact,
    where a sampler misses what happens while a C call holds the GIL (protobuf, ONNX Runtime session creation)."""
    return status_bytes("VmHWM")


def reset_high_water() -> bool:
    """Reset VmHWM to the current RSS (``/proc/self/clear_refs`` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
