"""Temporary directories of a run, named so that a later run can remove the ones a killed run left behind.

A run writes large temporaries under ``$TMPDIR``: spilled gradients and plan codes (``memory.Spill``), a large
model's files for ONNX Runtime sessions (``ort_eval``), streamed calibration batches (``calib.data``), the
workers' hand-over files (``flows.parallel``). Each is removed when its owner is (and on SIGINT/SIGTERM, which
unwind the run), but a process killed outright (SIGKILL, the kernel's OOM killer) removes nothing: on SmolLM2 that
is 0.5–1.3 GB per directory. So every directory is ``llc-<kind>-<pid>-<random>``, and the first one a process
makes removes those of processes that no longer run (:func:`remove_stale`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

__all__ = ["KINDS", "make", "prefix", "remove_stale"]

#: what the run keeps in each kind of directory (module doc)
KINDS = ("spill", "session", "data", "workers")
_NAME = re.compile(r"llc-(" + "|".join(KINDS) + r")-(\d+)-")
_checked = False


def prefix(kind: str) -> str:
    """The name prefix of a new ``kind`` directory of this process (for ``tempfile``), after removing, once per
    process, the stale directories in ``$TMPDIR``."""
    global _checked
    if kind not in KINDS:
        raise ValueError(f"tempdirs: unknown kind {kind!r}; one of {', '.join(KINDS)}")
    if not _checked:
        _checked = True
        remove_stale()
    return f"llc-{kind}-{os.getpid()}-"


def make(kind: str) -> str:
    """A new private directory of ``kind`` under ``$TMPDIR`` (``tempfile.mkdtemp``); the caller removes it."""
    return tempfile.mkdtemp(prefix=prefix(kind))


def remove_stale(directory: str | None = None) -> list[str]:
    """Remove the run directories in ``directory`` (default ``$TMPDIR``) whose process (the pid in the name) no
    longer runs and that belong to this user; returns them. A directory of a live process, another user's, or
    one whose name carries no pid is left alone."""
    directory = directory or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        m = _NAME.match(e.name)
        if not m:
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_uid != os.getuid() \
                    or _alive(int(m.group(2))):
                continue
        except OSError:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid a run could have written: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it runs as another user (EPERM)
    return True
