"""Task losses and metrics, as sums and counts so that they add up over batches.

Mean loss over a dataset = Σ sums / Σ counts (:meth:`TaskLoss.summarize` does it, and is what the CLI
uses). All losses are computed in float64.

* ``"ce"`` — cross-entropy of an output ``[B, C]`` (or ``[B, C, d1, ...]`` with labels ``[B, d1, ...]``)
  against integer class labels; label ``-100`` (``ignore_index``) is skipped. Metrics ``top1`` and
  ``top5`` (only when C ≥ 5). Count = number of labelled positions. The output is read as logits
  (``CE = −log_softmax(z)[y]``) unless it is already a probability — a ``Softmax`` feeds the graph output
  (possibly through Identity/Reshape/...: :func:`probability_source`, pass ``model=`` to
  :func:`make_loss`), or, when not told, the first batch the loss sees has every value in [0, 1] and
  class sums within 1e-3 of 1 — then ``CE = −log(max(p[y], tiny))`` (NLL of the log-probability, clamped
  at float32's smallest normal so a 0 gives a finite loss). ``loss.note`` says so for the summary.
* ``"lm"`` — next-token cross-entropy, Hugging Face convention: logits ``[B, T, V]``, labels ``[B, T]``
  aligned with ``input_ids``; ``logits[:, :-1]`` is compared with ``labels[:, 1:]``, ``-100`` ignored.
  Metrics ``top1``, ``top5`` (V ≥ 5) and ``ppl`` = ``exp(Σ loss sums / Σ counts)`` (computed in
  :meth:`summarize`, not a sum itself). When a batch has no ``labels`` the ``input_ids`` input is used.
* ``"mse"`` — mean squared error over all output elements against float labels of the same shape
  (labels ``[B]`` for an output ``[B, 1]`` are accepted). Metric ``mae``.
* ``"fidelity"`` (:class:`FidelityLoss`) — no labels: the *labels* are the float model's own outputs on the
  same inputs (:func:`teacher_dataset`), and the loss is KL(p_float ‖ p_compressed) over the class axis (axis 1,
  or the last axis of an LM's ``[B, T, V]`` logits), or the squared difference for regression outputs. The float
  model's own fidelity loss is 0; a compressed model's is ≥ 0, so "no worse" needs a tolerance there.
* ``"module:function"`` — ``fn(output, labels)`` called with **torch tensors** (output float64, labels
  as stored), returning either a per-sample tensor of shape ``[B]`` (summed, count B) or a 0-d scalar
  (taken as the batch mean: sum = value·B, count B). Write it with operations numpy and torch share
  (``((o - l) ** 2).mean(1)``) and it will also work on arrays. No metrics.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import LLCError


def _need_labels(labels, loss: "TaskLoss") -> None:
    if labels is None:
        raise LLCError(f"labels: none given; the '{loss.name}' loss needs labels, add labels=... to the data "
                       "(integer classes for ce/lm, targets for mse)")


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class TaskLoss:
    """Base class. ``name`` is the loss kind, ``output`` the graph output it reads, ``note`` a one-line
    remark for the summary on how the output is read (None when there is nothing to say)."""

    name: str = ""
    needs_labels: bool = True
    note: str | None = None

    def __init__(self, output: str):
        self.output = output

    # -- contract ------------------------------------------------------------------------------
    def terms(self, output: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum, count) of the loss over the batch; differentiable w.r.t. ``output``; float64."""
        raise NotImplementedError

    def metrics(self, output: np.ndarray, labels: np.ndarray) -> dict[str, tuple[float, int]]:
        """name -> (sum, count) for each metric of the batch."""
        return {}

    def fisher_terms(self, output: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                     ) -> tuple[torch.Tensor, int] | None:
        """(sum, count) of the loss with labels drawn from the model's own output distribution (the same
        positions and count as :meth:`terms`), whose per-sample gradients' outer products average to the loss's
        Gauss-Newton matrix (``calib.fisher``); None where the loss has no such form (the data's labels are
        used then: the empirical Fisher)."""
        return None

    def unit_terms(self, output: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
        """(sum, count) of each *unit* of one sample, the pieces whose paired differences give a standard
        error (``calib.noise``). Default: the sample is one unit."""
        s, c = self.terms(output, labels)
        return [(float(s), int(c))]

    # -- helpers -------------------------------------------------------------------------------
    def batch_labels(self, batch, source: str = "data"):
        """Labels of ``batch`` (a :class:`~llc_onnx.calib.data.Batch`); LLCError when missing."""
        if batch.labels is None:
            raise LLCError(f"{source}: no 'labels' array; the '{self.name}' loss needs labels, "
                           "add labels=... to the data (integer classes for ce/lm, targets for mse)")
        return batch.labels

    def loss_sum(self, output, labels) -> tuple[float, int]:
        """:meth:`terms` on numpy (or torch) input without autograd: (float sum, count)."""
        with torch.no_grad():
            s, c = self.terms(_as_tensor(output), _as_tensor(labels))
        return float(s), int(c)

    def summarize(self, loss_sum: float, count: int, metric_sums: dict[str, tuple[float, int]] | None = None
                  ) -> tuple[float, dict[str, float]]:
        """Means from accumulated sums: ``(Σ sums / Σ counts, {metric: Σ / Σ})``."""
        loss = loss_sum / count if count else float("nan")
        metrics = {k: (s / c if c else float("nan")) for k, (s, c) in (metric_sums or {}).items()}
        return loss, metrics

    def __repr__(self) -> str:
        return f"{type(self).__name__}(output={self.output!r})"


def accumulate(total: dict[str, tuple[float, int]], part: dict[str, tuple[float, int]]) -> dict:
    """Add the (sum, count) pairs of ``part`` into ``total`` (in place); returns ``total``."""
    for k, (s, c) in part.items():
        s0, c0 = total.get(k, (0.0, 0))
        total[k] = (s0 + float(s), c0 + int(c))
    return total


class LossTotals:
    """A :class:`TaskLoss` summed over batches: Σ loss terms, Σ counts, Σ metric terms and the samples seen;
    :meth:`mean` gives (Σ sums / Σ counts, metric means)."""

    def __init__(self, loss: TaskLoss):
        self.loss = loss
        self.sum, self.count, self.n = 0.0, 0, 0
        self.metric_sums: dict[str, tuple[float, int]] = {}

    def add(self, output, labels, n_samples: int) -> None:
        s, c = self.loss.loss_sum(output, labels)
        self.sum += s
        self.count += c
        accumulate(self.metric_sums, self.loss.metrics(output, labels))
        self.n += int(n_samples)

    def mean(self) -> tuple[float, dict[str, float]]:
        return self.loss.summarize(self.sum, self.count, self.metric_sums)


class _ClassLoss(TaskLoss):
    def __init__(self, output: str, ignore_index: int = -100):
        super().__init__(output)
        self.ignore_index = int(ignore_index)

    def _check(self, output_shape: tuple, labels: np.ndarray | torch.Tensor) -> None:
        dtype = labels.dtype
        is_int = (not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool) \
            if isinstance(labels, torch.Tensor) else np.issubdtype(dtype, np.integer)
        if not is_int:
            raise LLCError(f"labels: dtype {str(dtype).replace('torch.', '')} but the '{self.name}' loss needs integer class indices; "
                           "cast them with .astype(np.int64) (or use --loss mse for regression targets)")

    def _range_check(self, labels, n_classes: int) -> None:
        lab = _as_numpy(labels)
        bad = (lab != self.ignore_index) & ((lab < 0) | (lab >= n_classes))
        if bad.any():
            value = int(lab[bad].flat[0])
            raise LLCError(f"labels: value {value} out of range for output '{self.output}' with {n_classes} classes; "
                           f"labels must be in [0, {n_classes - 1}] (or {self.ignore_index} to ignore), "
                           "check --output and the labels")

    @staticmethod
    def _topk(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray, k: int) -> float:
        """scores [N, C], labels [N]; number of valid rows whose label is among the k best scores."""
        rows = _chunk_rows(scores.shape[1])  # row chunks: a language model's [T, V] index arrays not all at once
        hits = 0
        for a in range(0, scores.shape[0], rows):
            s, y = scores[a:a + rows], labels[a:a + rows]
            if k == 1:
                hit = s.argmax(axis=1) == y
            else:
                idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
                hit = (idx == y[:, None]).any(axis=1)
            hits += int(np.count_nonzero(hit & valid[a:a + rows]))
        return float(hits)

    def _class_metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, tuple[float, int]]:
        valid = labels != self.ignore_index
        n = int(np.count_nonzero(valid))
        safe = np.where(valid, labels, 0)
        out = {"top1": (self._topk(scores, safe, valid, 1), n)}
        if scores.shape[1] >= 5:
            out["top5"] = (self._topk(scores, safe, valid, 5), n)
        return out


# ops that pass a probability through unchanged in value (what lies between a Softmax and the graph output)
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}
PROBABILITY_TOL = 1e-3  # |Σ_c p - 1| allowed when the probability check runs on data
_TINY = float(np.finfo(np.float32).tiny)


def probability_source(model, output: str) -> str | None:
    """The op type (``"Softmax"``) when a Softmax feeds graph output ``output`` of ``model`` (an
    ``onnx.ModelProto``), directly or through value-preserving ops (Identity, Reshape, Flatten, Squeeze,
    Unsqueeze, Transpose, Cast); None otherwise."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name, seen = output, set()
    while name in producer and name not in seen:
        seen.add(name)
        node = producer[name]
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Softmax":
            return "Softmax"
        if node.op_type not in _PASS_THROUGH or not node.input:
            return None
        name = node.input[0]
    return None


def looks_like_probability(output, axis: int = 1) -> bool:
    """True when every value is in [0, 1] and the sums over ``axis`` are within 1e-3 of 1."""
    o = _as_numpy(output).astype(np.float64)
    if o.ndim <= axis or o.size == 0 or not np.all(np.isfinite(o)) or o.min() < 0 or o.max() > 1:
        return False
    return bool(np.all(np.abs(o.sum(axis=axis) - 1.0) <= PROBABILITY_TOL))


def _sampled_nll(logp: torch.Tensor, valid: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """−Σ log p(ŷ) over the valid rows of ``logp`` [rows, classes], ŷ drawn from p (detached) per row."""
    probs = logp.detach().exp().to("cpu", torch.float64)
    y = torch.multinomial(probs, 1, generator=generator)[:, 0].to(logp.device)
    picked = logp.gather(1, y[:, None])[:, 0]
    return -(picked * valid.to(picked.dtype)).sum(), int(valid.sum())


class CrossEntropyLoss(_ClassLoss):
    """``probabilities``: True when the output is a probability (a Softmax feeds it), False for logits, None
    to decide on the first batch (module docstring); ``source`` says why, for :attr:`note`."""

    name = "ce"

    def __init__(self, output: str, ignore_index: int = -100, probabilities: bool | None = None,
                 source: str | None = None):
        super().__init__(output, ignore_index)
        self.probabilities = probabilities
        self.source = source

    @property
    def note(self) -> str | None:
        if not self.probabilities:
            return None
        why = f"({self.source})" if self.source else "(its values sum to 1 over the classes)"
        return f"the output is a probability {why}: ce uses its log"

    def _flat(self, output_shape, labels_shape):
        if len(output_shape) < 2:
            raise LLCError(f"output '{self.output}': shape {tuple(output_shape)} has no class dimension; "
                           "the 'ce' loss needs [batch, classes, ...] (pick another --output or --loss)")
        want = (output_shape[0],) + tuple(output_shape[2:])
        if tuple(labels_shape) != want:
            hint = ""
            if len(output_shape) >= 3:
                hint = (" (classes on axis 1); for a [batch, seq, classes] output use --loss lm (next-token) or "
                        "--loss module:function with your own fn(output, labels)")
            raise LLCError(f"labels: shape {tuple(labels_shape)} does not match output '{self.output}' of shape "
                           f"{tuple(output_shape)}; the 'ce' loss needs labels of shape {want}{hint}")

    def terms(self, output, labels):
        _need_labels(labels, self)
        output, labels = _as_tensor(output), _as_tensor(labels)
        self._check(output.shape, labels)
        self._flat(tuple(output.shape), tuple(labels.shape))
        self._range_check(labels, output.shape[1])
        labels = labels.long()
        if self.probabilities is None:  # decided once, on the first batch seen (the reference model's)
            self.probabilities = looks_like_probability(output.detach())
        if self.probabilities:
            logp = torch.log(output.double().clamp_min(_TINY))
            s = torch.nn.functional.nll_loss(logp, labels, reduction="sum", ignore_index=self.ignore_index)
        else:
            s = torch.nn.functional.cross_entropy(output.double(), labels, reduction="sum",
                                                  ignore_index=self.ignore_index)
        return s, int((labels != self.ignore_index).sum())

    def fisher_terms(self, output, labels, generator):
        self.terms(output.detach(), labels)  # the same checks (and the logits/probabilities decision)
        output, labels = _as_tensor(output), _as_tensor(labels)
        logp = (torch.log(output.double().clamp_min(_TINY)) if self.probabilities
                else torch.log_softmax(output.double(), dim=1))
        rows = logp.movedim(1, -1).reshape(-1, logp.shape[1])
        return _sampled_nll(rows, labels.reshape(-1) != self.ignore_index, generator)

    def metrics(self, output, labels):
        _need_labels(labels, self)
        output, labels = _as_numpy(output), _as_numpy(labels)
        self._check(output.shape, labels)
        self._flat(output.shape, labels.shape)
        self._range_check(labels, output.shape[1])
        scores = np.moveaxis(output, 1, -1).reshape(-1, output.shape[1])
        return self._class_metrics(scores, labels.reshape(-1).astype(np.int64))


#: the 'lm' loss works in float64 on this many bytes of logits at a time (:func:`_nll_sum`)
NLL_CHUNK_BYTES = 32 << 20


def _chunk_rows(v: int) -> int:
    """Rows of ``v`` classes in one float64 chunk of ``NLL_CHUNK_BYTES``."""
    return max(1, NLL_CHUNK_BYTES // (8 * max(v, 1)))


def _chunked_sum(part, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ over row chunks of ``part(z_chunk, t_chunk)`` (a float64 scalar), z [N, V] with ``_chunk_rows(V)`` rows
    a chunk. Under autograd each chunk runs under ``interpreter.recompute``: its float64 copies are made again in
    the backward instead of kept. The chunk sums add up in a fixed order (a result depends on the row count, not
    the data)."""
    rows = _chunk_rows(z.shape[1])
    if z.shape[0] <= rows:
        return part(z, t)
    from ..interpreter.recompute import recompute

    grad = torch.is_grad_enabled() and z.requires_grad
    return torch.stack([recompute(part, z[a:a + rows], t[a:a + rows]) if grad else part(z[a:a + rows], t[a:a + rows])
                        for a in range(0, z.shape[0], rows)]).sum()


def _nll_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Σ_rows −log_softmax(float64(z))[y] (rows whose target is ``ignore_index`` skipped), float64, over row
    chunks of ≤ ``NLL_CHUNK_BYTES`` of float64 logits (:func:`_chunked_sum`): a language model's [T, V] logits
    (255 × 49,152 on SmolLM2: 0.1 GB in float64, 0.2 GB at the loss's peak) never exist in float64 all at once."""
    def part(z, t):
        return torch.nn.functional.cross_entropy(z.double(), t, reduction="sum", ignore_index=ignore_index)

    return _chunked_sum(part, logits, target)


def _nll_rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """−log_softmax(float64(z))[y] per row (0 where the target is ``ignore_index``), float64, computed in row
    chunks of ≤ ``NLL_CHUNK_BYTES`` of float64 logits like :func:`_nll_sum` (each row's value does not depend on
    the chunking); no autograd."""
    n, v = logits.shape
    rows = _chunk_rows(v)
    out = torch.empty(n, dtype=torch.float64)
    with torch.no_grad():
        for a in range(0, n, rows):
            out[a:a + rows] = torch.nn.functional.cross_entropy(logits[a:a + rows].double(), target[a:a + rows],
                                                                reduction="none", ignore_index=ignore_index)
    return out


class NextTokenLoss(_ClassLoss):
    name = "lm"
    unit_tokens = 64  # predicted tokens per standard-error unit (``unit_terms``)

    def batch_labels(self, batch, source: str = "data"):
        if batch.labels is None and "input_ids" in batch.inputs:
            return batch.inputs["input_ids"]
        return super().batch_labels(batch, source)

    def _shift(self, output_shape, labels_shape):
        if len(output_shape) != 3:
            raise LLCError(f"output '{self.output}': shape {tuple(output_shape)} is not [batch, seq, vocab]; "
                           "the 'lm' loss needs rank-3 logits (pick another --output or --loss)")
        if tuple(labels_shape) != tuple(output_shape[:2]):
            raise LLCError(f"labels: shape {tuple(labels_shape)} does not match output '{self.output}' of shape "
                           f"{tuple(output_shape)}; the 'lm' loss needs labels [batch, seq] aligned with input_ids")

    def _shifted(self, output, labels, double: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, V] float64 — in the output's dtype with ``double=False`` —, targets [N]) of the predicted
        positions, after the input checks."""
        _need_labels(labels, self)
        output, labels = _as_tensor(output), _as_tensor(labels)
        self._check(output.shape, labels)
        self._shift(tuple(output.shape), tuple(labels.shape))
        self._range_check(labels, output.shape[2])
        logits = output[:, :-1]
        logits = logits.double() if double else logits
        return logits.reshape(-1, logits.shape[-1]), labels[:, 1:].long().reshape(-1)

    def terms(self, output, labels):
        logits, target = self._shifted(output, labels, double=False)
        return _nll_sum(logits, target, self.ignore_index), int((target != self.ignore_index).sum())

    def fisher_terms(self, output, labels, generator):
        logits, target = self._shifted(output, labels)
        return _sampled_nll(torch.log_softmax(logits, dim=-1), target != self.ignore_index, generator)

    def unit_terms(self, output, labels):
        """A sequence's loss in spans of ``unit_tokens`` predicted tokens: with one long sequence per sample
        (batch 1, few samples) the per-sample standard error would rest on 1–2 numbers, or be undefined.
        Spans of one sequence share context, so the SE they give is a lower estimate, better than none."""
        logits, target = self._shifted(output, labels, double=False)
        tok = _nll_rows(logits, target, self.ignore_index)
        valid = target != self.ignore_index
        out = []
        for start in range(0, tok.shape[0], self.unit_tokens):
            c = int(valid[start:start + self.unit_tokens].sum())
            if c:
                out.append((float(tok[start:start + self.unit_tokens].sum()), c))
        return out

    def metrics(self, output, labels):
        _need_labels(labels, self)
        output, labels = _as_numpy(output), _as_numpy(labels)
        self._check(output.shape, labels)
        self._shift(output.shape, labels.shape)
        self._range_check(labels, output.shape[2])
        scores = output[:, :-1].reshape(-1, output.shape[2])
        return self._class_metrics(scores, labels[:, 1:].reshape(-1).astype(np.int64))

    def summarize(self, loss_sum, count, metric_sums=None):
        loss, metrics = super().summarize(loss_sum, count, metric_sums)
        metrics["ppl"] = math.exp(loss) if loss < 700 else float("inf")
        return loss, metrics


class MSELoss(TaskLoss):
    name = "mse"

    def _labels(self, output, labels):
        if tuple(labels.shape) != tuple(output.shape):
            numel = int(np.prod(tuple(labels.shape))), int(np.prod(tuple(output.shape)))
            if numel[0] == numel[1] and labels.ndim >= 1 and output.ndim >= 1 and labels.shape[0] == output.shape[0]:
                return labels.reshape(tuple(output.shape))
            raise LLCError(f"labels: shape {tuple(labels.shape)} does not match output '{self.output}' of shape "
                           f"{tuple(output.shape)}; the 'mse' loss needs targets of the output's shape")
        return labels

    def terms(self, output, labels):
        _need_labels(labels, self)
        output, labels = _as_tensor(output), _as_tensor(labels)
        labels = self._labels(output, labels)
        d = output.double() - labels.double()
        return (d * d).sum(), int(d.numel())

    def metrics(self, output, labels):
        _need_labels(labels, self)
        output, labels = _as_numpy(output), _as_numpy(labels)
        labels = self._labels(output, labels)
        d = output.astype(np.float64) - labels.astype(np.float64)
        return {"mae": (float(np.abs(d).sum()), int(d.size))}


class UserLoss(TaskLoss):
    """``fn(output, labels)`` from ``module:function`` (see the module docstring)."""

    def __init__(self, output: str, spec: str, fn):
        super().__init__(output)
        self.name = spec
        self.fn = fn

    def terms(self, output, labels):
        _need_labels(labels, self)
        output, labels = _as_tensor(output), _as_tensor(labels)
        b = int(output.shape[0]) if output.ndim else 1
        try:
            r = self.fn(output.double(), labels)
        except LLCError:
            raise
        except Exception as exc:
            raise LLCError(f"{self.name}: the loss function raised {type(exc).__name__}: {exc}; "
                           "it is called as fn(output, labels) with torch tensors") from None
        r = _as_tensor(r) if not isinstance(r, (float, int)) else torch.tensor(float(r), dtype=torch.float64,
                                                                                 device=output.device)
        if r.ndim == 0:
            return r.double() * b, b
        if r.ndim == 1 and r.shape[0] == b:
            return r.double().sum(), b
        raise LLCError(f"{self.name}: returned shape {tuple(r.shape)}; return a per-sample array of shape ({b},) "
                       "or a scalar batch mean")


class FidelityLoss(TaskLoss):
    """KL(p_teacher ‖ p_student) per position over the class axis (``axis``), or the squared difference to the
    teacher's output (``mode="mse"``). ``labels`` are the teacher's (float model's) outputs; ``probs=True`` when
    the output already is a probability (no softmax). Metric ``agree``: top-1 agreement with the teacher."""

    name = "fidelity"
    unit_tokens = 64

    def __init__(self, output: str, axis: int = 1, mode: str = "kl", probs: bool = False):
        super().__init__(output)
        if mode not in ("kl", "mse"):
            raise LLCError(f"fidelity loss: mode {mode!r}; use 'kl' or 'mse'")
        self.axis, self.mode, self.probs = int(axis), mode, bool(probs)

    def _check(self, output, teacher):
        if tuple(teacher.shape) != tuple(output.shape):
            raise LLCError(f"output '{self.output}': shape {tuple(output.shape)} differs from the float model's "
                           f"{tuple(teacher.shape)} on the same inputs; the fidelity loss compares the two")

    def _logp(self, x, dim: int | None = None):
        x = x.double()
        if self.probs:
            return torch.log(x.clamp_min(1e-12))
        return torch.log_softmax(x, dim=self.axis if dim is None else dim)

    def _kl(self, teacher: torch.Tensor, output: torch.Tensor, dim: int) -> torch.Tensor:
        """KL(p_teacher ‖ p_output) over axis ``dim``, float64."""
        lt, ls = self._logp(teacher, dim), self._logp(output, dim)
        return (lt.exp() * (lt - ls)).sum(dim=dim)

    def _rows(self, output, teacher) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both outputs as [positions, classes] when the class axis is the last one (a language model's [B, T, V],
        a classifier's [B, C]): KL then runs in row chunks; None otherwise (e.g. [B, C, H, W]: one piece)."""
        if self.axis not in (-1, output.dim() - 1):
            return None
        c = output.shape[-1]
        return output.reshape(-1, c), teacher.reshape(-1, c)

    def pointwise(self, output, teacher) -> torch.Tensor:
        """The loss per position: the class axis reduced (KL) or kept (mse), float64. With the class axis last,
        KL runs in row chunks of ≤ ``NLL_CHUNK_BYTES`` of float64 scores (a language model's [T, V]: never all in
        float64 at once); each position's value does not depend on the chunking."""
        output, teacher = _as_tensor(output), _as_tensor(teacher)
        self._check(output, teacher)
        if self.mode == "mse":
            d = output.double() - teacher.double()
            return d * d
        rows = self._rows(output, teacher)
        if rows is None:
            return self._kl(teacher, output, self.axis)
        z, t = rows
        r = _chunk_rows(z.shape[1])
        return torch.cat([self._kl(t[a:a + r], z[a:a + r], -1) for a in range(0, z.shape[0], r)]
                         ).reshape(output.shape[:-1])

    def terms(self, output, labels):
        _need_labels(labels, self)
        output, labels = _as_tensor(output), _as_tensor(labels)
        rows = None if self.mode == "mse" else self._rows(output, labels)
        if rows is None:
            p = self.pointwise(output, labels)
            return p.sum(), int(p.numel())
        self._check(output, labels)
        z, t = rows
        return _chunked_sum(lambda zc, tc: self._kl(tc, zc, -1).sum(), z, t), int(z.shape[0])

    def fisher_terms(self, output, labels, generator):
        """KL's Gauss-Newton matrix at the float point is the Fisher of the model's own distribution: the
        sampled negative log-likelihood over the class axis, one draw per position."""
        if self.mode != "kl":
            return None
        _need_labels(labels, self)
        self._check(_as_tensor(output), _as_tensor(labels))
        logp = self._logp(_as_tensor(output))
        rows = logp.movedim(self.axis, -1).reshape(-1, logp.shape[self.axis])
        return _sampled_nll(rows, torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device), generator)

    def unit_terms(self, output, labels):
        p = self.pointwise(output, labels).reshape(-1)
        n = self.unit_tokens if p.numel() > self.unit_tokens else p.numel()
        return [(float(p[i:i + n].sum()), int(p[i:i + n].numel())) for i in range(0, p.numel(), n)]

    def metrics(self, output, labels):
        if self.mode == "mse":
            return {}
        output, labels = _as_numpy(output), _as_numpy(labels)
        agree = np.argmax(output, axis=self.axis) == np.argmax(labels, axis=self.axis)
        return {"agree": (float(agree.sum()), int(agree.size))}


def fidelity_loss_for(task_kind: str, output: str, rank: int | None, probs: bool = False) -> FidelityLoss:
    """The fidelity loss matching a task loss kind: KL over axis 1 (ce), over the last axis (lm), squared
    difference (mse and user losses, whose output may be anything)."""
    if task_kind == "lm":
        return FidelityLoss(output, axis=-1, probs=probs)
    if task_kind == "ce" and (rank is None or rank >= 2):
        return FidelityLoss(output, axis=1, probs=probs)
    return FidelityLoss(output, mode="mse")


def teacher_dataset(dataset, run_float) -> "Dataset":
    """``dataset`` with each batch's labels replaced by the float model's output on its inputs
    (``run_float(inputs) -> array``): the labels of the fidelity loss. Groups are kept."""
    from .data import Batch, Dataset

    batches = [Batch(inputs=b.inputs, labels=np.asarray(run_float(b.inputs)), groups=b.groups)
               for b in dataset.batches]
    return Dataset(batches, dataset.source, indices=dataset.indices, unit="batch")


def make_loss(kind: str, output: str, model=None, **opts) -> TaskLoss:
    """``kind``: ``"ce"`` | ``"lm"`` (``ignore_index`` option, default -100) | ``"mse"`` | ``"module:function"``.
    ``model`` (optional, the ``onnx.ModelProto``): for ``ce``, a Softmax feeding ``output`` makes it read the
    output as a probability (:func:`probability_source`); without it ``ce`` checks the first batch."""
    if kind == "ce":
        if model is not None and "probabilities" not in opts:
            src = probability_source(model, output)
            opts = {**opts, "probabilities": src is not None or None, "source": src}
        return CrossEntropyLoss(output, **opts)
    if kind == "lm":
        return NextTokenLoss(output, **opts)
    if kind == "mse":
        return MSELoss(output)
    if ":" in kind:
        from .data import import_object

        fn = import_object(kind)
        if not callable(fn):
            raise LLCError(f"{kind}: not callable; give a function fn(output, labels)")
        return UserLoss(output, kind, fn)
    raise LLCError(f"--loss {kind}: unknown loss; use ce, lm, mse or module:function")
