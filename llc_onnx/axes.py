"""Axis arithmetic shared by the interpreter (ONNX ``axis`` attributes), the weight quantizers and the passes."""

from __future__ import annotations

from .errors import LLCError


def norm_axis(axis: int, rank: int, what: str = "axis", where: str = "") -> int:
    """``axis`` in ``[0, rank)``: a negative axis counts from the end (``axis + rank``). Outside
    ``[-rank, rank)``: ``LLCError("<where>: <what>=<axis> is out of range for a <rank>-D tensor; ...")``."""
    if not -rank <= axis < rank:
        prefix = f"{where}: " if where else ""
        raise LLCError(f"{prefix}{what}={axis} is out of range for a {rank}-D tensor; give an axis in "
                       f"[{-rank}, {rank - 1}]")
    return axis + rank if axis < 0 else axis
