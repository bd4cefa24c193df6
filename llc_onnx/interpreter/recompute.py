"""Activation recomputation (checkpointing) for the interpreter's gradient pass and the language-model loss.

:func:`recompute` runs ``fn(*args)`` so that the backward pass keeps none of the tensors its ops save, only
``args``, and runs ``fn`` again when it needs them: memory of one piece at a time for about one more forward.
The same numbers bit for bit where ``fn`` is deterministic (the interpreter's ops on the CPU are).

Written here rather than taken from ``torch.utils.checkpoint``, which does the same: that one imports
``torch._dynamo`` (~900 modules) on first use, and the import creates ``$TMPDIR/torchinductor_<user>`` — a
temporary directory an interrupted or finished llc-onnx run would leave behind (tests/test_signals.py).
"""

from __future__ import annotations

import torch

from ..errors import LLCError

__all__ = ["recompute"]


def recompute(fn, *args):
    """``fn(*args)``, with what its ops save for the backward recomputed there instead of kept (module doc)."""
    return _Piece(fn, list(args)).run()


class _Piece:
    """One recomputed call. Its first run packs every tensor an op saves as a handle ``(piece, k)``
    (``torch.autograd.graph.saved_tensors_hooks``). The first unpack runs ``fn`` again on the same inputs
    (detached, same ``requires_grad``), collects what its ops save — the same ops in the same order, so the k-th is
    the k-th — and hands them out; once every one has been read they are dropped (a later unpack, e.g. a second
    backward with ``retain_graph``, recomputes again)."""

    __slots__ = ("fn", "args", "count", "saved", "read")

    def __init__(self, fn, args: list):
        self.fn, self.args = fn, args
        self.count, self.saved, self.read = 0, None, set()

    def run(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            return self.fn(*self.args)

    def _pack(self, t: torch.Tensor):
        self.count += 1
        return self, self.count - 1

    def get(self, k: int) -> torch.Tensor:
        if self.saved is None:
            got: list[torch.Tensor] = []
            args = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
                    else a for a in self.args]
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(got.append, _never):
                self.fn(*args)
            if len(got) != self.count:
                raise LLCError(f"recomputation saved {len(got)} tensors where the first run saved {self.count}: "
                               "the recomputed function is not deterministic")
            self.saved, self.read = got, set()
        t = self.saved[k]
        self.read.add(k)
        if len(self.read) == self.count:  # all handed out: the backward holds what it still needs
            self.saved = None
        return t


def _unpack(handle) -> torch.Tensor:
    piece, k = handle
    return piece.get(k)


def _never(_):
    raise AssertionError("a recomputed call's own graph is never run backward")
