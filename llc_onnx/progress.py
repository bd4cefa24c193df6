"""Progress of long stages and their wall times.

Library code reports progress through a :class:`Progress` object it is handed (``progress.task(description,
total)`` yields an ``advance(k)`` function) and never decides how it is shown: :class:`Silent` shows nothing
(the API's default), the CLI passes :class:`RichBars` (bars on stderr when it is a terminal). A build script
can pass its own object with a ``task`` method.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    def task(self, description: str, total: int) -> contextlib.AbstractContextManager[Advance]: ...


class Silent:
    """Shows nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        yield lambda _k=1: None


class RichBars:
    """A rich progress bar per task on stderr, only when stderr is a terminal."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        if not sys.stderr.isatty():
            yield lambda _k=1: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 console=Console(stderr=True), transient=True) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda k=1: bar.advance(tid, k)


class StageTimer:
    """Wall time per named stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
