"""Activation recomputation (checkpointing) for the interpreter's gradient pass and the language-model loss.

:func:`recompute` runs ``fn(*args)`` so that the backward pass keeps none of the tensors its ops save, only
``args``, and runs ``fn`` again when it needs them: memory of one piece at a time for about one more forward.
The same numbers bit for bit where ``fn`` is deterministic (the interpreter's ops on the CPU are).

Written here rather than taken from ``torch.utils.checkpoint``, which does the same: that one imports
``torch._dynamo`` (~900 modules) on first use, and the import creates ``$TMPDIR/torchinductor_<user>`` — a
temporary directory an interrupted or finished llc-onnx run would leave behind (tests/test_signals.py).
"""

from __future__ import annotations

import weakref

import torch

from ..errors import LLCError

__all__ = ["recompute"]


def recompute(fn, *args):
    """``fn(*args)``, with what its ops save for the backward recomputed there instead of kept (module doc)."""
    return _Piece(fn, list(args)).run()


class _Holder:
    """What the graph keeps of one saved tensor: its index in the piece. When autograd lets it go (that node's
    backward has run, or the graph is freed) the recomputed tensor is dropped too."""

    __slots__ = ("k", "__weakref__")

    def __init__(self, k: int):
        self.k = k


class _Piece:
    """One recomputed call. Its first run packs every tensor an op saves as a :class:`_Holder`
    (``torch.autograd.graph.saved_tensors_hooks``). The first unpack runs ``fn`` again on the same inputs
    (detached, same ``requires_grad``) and collects what its ops save — the same ops in the same order, so the
    k-th is the k-th; each is kept while its holder lives, and dropped with it.
    The piece references ``fn``: a caller must not let ``fn`` reach tensors of the graph being built (through a
    closure), or graph and piece keep each other alive where Python's collector cannot see (autograd's C++)."""

    __slots__ = ("fn", "args", "count", "saved", "holders", "__weakref__")

    def __init__(self, fn, args: list):
        self.fn, self.args = fn, args
        self.count, self.saved, self.holders = 0, {}, {}

    def run(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self.fn(*self.args)

    def _pack(self, t: torch.Tensor) -> _Holder:
        h = _Holder(self.count)
        self.holders[h.k] = weakref.ref(h, _forget(self, h.k))
        self.count += 1
        return h

    def _unpack(self, h: _Holder) -> torch.Tensor:
        if h.k not in self.saved:
            args = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
                    else a for a in self.args]
            collect = _Collect()
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(collect, _never):
                self.fn(*args)
            got, collect.got = collect.got, None
            if len(got) != self.count:
                raise LLCError(f"recomputation saved {len(got)} tensors where the first run saved {self.count}: "
                               "the recomputed function is not deterministic")
            self.saved = {k: got[k] for k, ref in self.holders.items() if ref() is not None}
        return self.saved[h.k]


def _forget(piece: _Piece, k: int):
    """The callback that drops piece's k-th recomputed tensor once autograd has let its holder go."""
    ref = weakref.ref(piece)

    def drop(_):
        p = ref()
        if p is not None:
            p.saved.pop(k, None)
            p.holders.pop(k, None)
    return drop


class _Collect:
    """The pack hook of a recomputation: appends each saved tensor, detached, to ``got``, which the caller takes
    and clears afterwards — autograd keeps a graph's hooks, so a hook still holding the list (``got.append``) made
    got → tensor → its graph → hook → got, a cycle Python's collector cannot see through."""

    __slots__ = ("got",)

    def __init__(self):
        self.got: list[torch.Tensor] | None = []

    def __call__(self, t: torch.Tensor) -> None:
        self.got.append(t.detach())


def _never(_):
    raise AssertionError("a recomputed call's own graph is never run backward")
