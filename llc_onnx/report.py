"""Presentation helpers for the CLI: summary tables (rich), JSON output, progress bars.

A :class:`Summary` is a titled table: either key/value pairs (:meth:`Summary.add`) or rows under
``columns`` (:meth:`Summary.add_row`). :func:`print_summaries` renders them with rich on stdout;
:func:`emit_json` writes one JSON object (numpy scalars/arrays, NaN/Inf handled) and nothing else.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np


@dataclass
class Summary:
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    kv: dict[str, Any] = field(default_factory=dict)
    footer: str | None = None

    def add(self, key: str, value: Any) -> "Summary":
        self.kv[key] = value
        return self

    def add_row(self, *values: Any) -> "Summary":
        self.rows.append(list(values))
        return self

    def to_dict(self) -> dict:
        """JSON-ready form: key/value pairs as an object, rows as a list of objects keyed by column."""
        out: dict[str, Any] = {"title": self.title}
        if self.kv:
            out["values"] = {k: to_jsonable(v) for k, v in self.kv.items()}
        if self.rows:
            out["rows"] = [{c: to_jsonable(v) for c, v in zip(self.columns, r)} for r in self.rows]
        return out

    def table(self):
        from rich.table import Table

        t = Table(title=self.title, title_justify="left", caption=self.footer, caption_justify="left")
        if self.rows or not self.kv:
            for i, c in enumerate(self.columns):
                cells = [r[i] for r in self.rows if i < len(r) and r[i] is not None]
                numeric = bool(cells) and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                              for v in cells)
                t.add_column(c, justify="right" if numeric else "left")
            for r in self.rows:
                t.add_row(*(fmt(v) for v in r))
        else:
            t.add_column("", style="bold")
            t.add_column("")
            t.show_header = False
            for k, v in self.kv.items():
                t.add_row(str(k), fmt(v))
        return t


def fmt(v: Any) -> str:
    """Human formatting for table cells: floats with 6 significant digits, ints with separators."""
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join("?" if x is None else str(x) for x in v) + "]"
    return str(v)


def format_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def to_jsonable(v: Any) -> Any:
    """Convert numpy types / tuples / dataclass-like values to JSON types; NaN/Inf become null."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return to_jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    return str(v)


def emit_json(data: dict, file=None) -> None:
    """Write ``data`` as one JSON object (one line) to ``file`` (stdout by default)."""
    file = file or sys.stdout
    file.write(json.dumps(to_jsonable(data), allow_nan=False) + "\n")
    file.flush()


def _console(file=None):
    from rich.console import Console

    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    # piped / captured output: wide enough that cells are not wrapped (greppable logs)
    return Console(file=file, highlight=False, soft_wrap=False, width=None if tty else 200)


def print_summaries(summaries: Iterable[Summary], file=None) -> None:
    """Render each summary as a rich table on ``file`` (stdout)."""
    console = _console(file)
    for s in summaries:
        console.print(s.table())


def print_line(text: str, file=None, style: str | None = None) -> None:
    _console(file).print(text, style=style)


def track(iterable, total: int | None = None, description: str = "", enabled: bool | None = None):
    """Iterate with a rich progress bar on stderr, only when stderr is a TTY (or ``enabled`` is True)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rich.console import Console

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)
