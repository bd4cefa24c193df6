"""Atomic file writes: a temporary file in the destination's directory, then ``os.replace``.

A reader (or a crash) never sees a partial file. ``tempfile.mkstemp`` creates files readable by the owner only;
the result gets the permissions an ordinary ``open()`` would give (0o666 minus the umask), so a report or cache
entry is as readable as any other file the user writes.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file next to ``path``, which then replaces ``path``; on any failure the
    temporary file is removed and ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(path, write)
