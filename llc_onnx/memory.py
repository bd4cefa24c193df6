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
    """Collect garbage, drop the pages of all spilled arrays (:func:`drop_mapped_pages`, the interpreter's
    file-backed weights included), then return the allocator's free memory to the OS (:func:`trim`)."""
    gc.collect()
    drop_mapped_pages(every=True)
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


def bound_heap() -> bool:
    """Make glibc give freed memory back at once for the rest of the process (``mallopt``): every allocation of
    at least ``MMAP_THRESHOLD`` gets its own mapping, unmapped when freed, and the heap's free top is returned
    above ``TRIM_THRESHOLD``. By default the threshold rises to 32 MiB after the first large free, and then a
    large model's activations (0.6–2.4 MB each on SmolLM2) live in the heap, whose freed blocks stay resident:
    SmolLM2's gradient pass peaked 0.4 GB higher (2.24 against 1.81 GB). Called for large models only
    (``flows.context.interpreter_for``): a small model's run keeps the faster default. False where not glibc."""
    libc = _glibc()
    if not libc:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
#: :func:`bound_heap`: allocations of at least this many bytes get their own mapping
MMAP_THRESHOLD = 1 << 20
#: :func:`bound_heap`: the heap's free top is returned to the OS above this many bytes
TRIM_THRESHOLD = 4 << 20

#: :func:`trim` between measurement tasks once the heap holds this much free memory
TASK_TRIM_BYTES = 256 << 20

_mallinfo2 = False


def _glibc():
    global _libc, _mallinfo2
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
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

    def __init__(self, between_tasks: bool = True):
        import shutil
        import weakref

        from . import tempdirs

        self.dir = tempdirs.make("spill")
        self.arrays: list = []
        #: whether :func:`drop_mapped_pages` drops this spill's pages between two measurement tasks too (else only
        #: :func:`release` does: the interpreter's weights, which every task reads again)
        self.between_tasks = between_tasks
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)
        _SPILLS.add(self)

    def put(self, arr, mode: str = "r"):
        """``arr`` written to a file, returned as a read-only memory map of it (``mode="c"``: copy-on-write, for
        a consumer such as ``torch.from_numpy`` that wants a writable array; nothing writes into it)."""
        import os

        import numpy as np

        path = os.path.join(self.dir, f"{len(self.arrays)}.npy")
        np.save(path, np.ascontiguousarray(arr))
        mapped = np.load(path, mmap_mode=mode)
        self.arrays.append(mapped)
        return mapped

    def zeros(self, shape, dtype):
        """A zero-filled array in a new file, mapped back writable (shared: what is written goes to the file).
        :meth:`drop` after an update takes its pages out of the process's memory; the values stay in the file.
        Used for out-of-core accumulators (``calib.gradients``)."""
        import os

        import numpy as np

        path = os.path.join(self.dir, f"{len(self.arrays)}.npy")
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        self.arrays.append(arr)
        return arr

    def drop_pages(self) -> None:
        for a in self.arrays:
            drop(a)


def drop(arr) -> None:
    """Take a memory-mapped array's touched pages out of the process's memory (``madvise(MADV_DONTNEED)``): a
    read-only or shared mapping reads them from its file again when used. Nothing for an ordinary array."""
    import mmap

    m = getattr(arr, "_mmap", None)
    if m is not None and not m.closed:
        m.madvise(mmap.MADV_DONTNEED)


def _weak_set():
    import weakref

    return weakref.WeakSet()


_SPILLS = _weak_set()


def drop_mapped_pages(every: bool = False) -> None:
    """Drop the touched pages of every live :class:`Spill` that is dropped between tasks from this process's
    memory (between two tasks); ``every``: of all of them (:func:`release`, before a session or a stage)."""
    for s in list(_SPILLS):
        if every or s.between_tasks:
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
