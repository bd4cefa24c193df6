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
    """Collect garbage, then return the allocator's free memory to the OS (``malloc_trim(0)``, glibc only)."""
    global _libc
    gc.collect()
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
