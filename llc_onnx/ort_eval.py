"""Evaluate models with ONNX Runtime (CPU) on a dataset: loss, metrics, and reference/candidate comparison.

Every session is made from a :class:`SessionConfig`: the thread count and the session-config entries of the
deployment target whose verdict is being taken (the session README tells users to run), so the model that is
verified is numerically the model the user runs.

Threads: :func:`evaluate` and :func:`compare_models` run each batch on one ONNX Runtime thread and up to
``SessionConfig.threads`` batches at once (0: one per CPU), summing in batch order. Some ORT kernels round
differently with more intra-op threads (the MatMulNBits that ORT fuses from a blocked DequantizeLinear + MatMul
moves outputs by ~4e-6 with 2 threads at 8–64 rows, measured here), so a loss would otherwise depend on the
thread count, and with it a plan choice or the bytes of the output.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from . import tempdirs
from .calib.data import Dataset
from .calib.losses import LossTotals, TaskLoss
from .errors import LLCError, first_line


@dataclass
class Evaluation:
    loss: float
    metrics: dict[str, float]
    n: int                    # samples evaluated
    seconds: float = 0.0      # time spent in ONNX Runtime, summed over batches
    samples: "LossSamples | None" = None  # per-unit loss sums (with groups) when asked for: paired SEs


@dataclass(frozen=True)
class SessionConfig:
    """How an ONNX Runtime session is made: intra-op threads (0 = ORT's default) and session-config entries
    (``SessionOptions.add_session_config_entry``), e.g. a target's MatMulNBits accuracy level."""

    threads: int = 0
    entries: tuple[tuple[str, str], ...] = ()
    description: str = "ONNX Runtime CPU, default session options"
    settings: object = None  # a targets.SessionSettings: when given, it makes the session (providers, options)

    @classmethod
    def of_target(cls, settings, threads: int = 0) -> "SessionConfig":
        """The session of a deployment target's verdict (``targets.base.SessionSettings``)."""
        return cls(threads=threads, entries=tuple(settings.config), description=settings.description,
                   settings=settings)


#: the session llc-onnx used before deployment targets: MatMulNBits at full weight precision (accuracy level 0)
EXACT = SessionConfig(entries=(("session.qdq_matmulnbits_accuracy_level", "0"),),
                      description="ONNX Runtime CPU, session.qdq_matmulnbits_accuracy_level=0")


@dataclass
class Comparison:
    reference: Evaluation
    candidate: Evaluation
    max_abs_diff: float       # max |candidate - reference| over all elements of the loss output
    mean_abs_diff: float      # mean of the same
    n: int
    extra: dict = field(default_factory=dict)


@dataclass
class OutputDiff:
    """Max and mean of |candidate − reference| (float64) over every output element seen."""

    max: float = 0.0
    total: float = 0.0
    numel: int = 0

    def add(self, candidate: np.ndarray, reference: np.ndarray) -> None:
        d = np.abs(np.asarray(candidate, np.float64) - np.asarray(reference, np.float64))
        if d.size:
            self.max = max(self.max, float(d.max()))
        self.total += float(d.sum())
        self.numel += d.size

    @property
    def mean(self) -> float:
        return self.total / self.numel if self.numel else 0.0


#: protos above this size reach ONNX Runtime as files with external data (``model_io.write_for_session``): from
#: serialized bytes ORT holds the bytes, its own parsed copy and the tensors at once (SmolLM2, 0.65 GB: peak +1.5 GB
#: and +1.05 GB held, against +0.14 GB and +0.55 GB from the files; the same outputs, bit for bit)
SESSION_FILE_BYTES = 64 << 20


def inference_session(model: onnx.ModelProto | str | os.PathLike, sess_options, providers) -> ort.InferenceSession:
    """``ort.InferenceSession`` of a path, or of a proto: small ones from their bytes, large ones (more than
    :data:`SESSION_FILE_BYTES`) written to a temporary directory first, removed once the session is made."""
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), sess_options=sess_options, providers=providers)
    from .model_io import proto_size, write_for_session

    if proto_size(model) > SESSION_FILE_BYTES:
        with tempfile.TemporaryDirectory(prefix=tempdirs.prefix("session")) as d:
            return ort.InferenceSession(write_for_session(model, d), sess_options=sess_options, providers=providers)
    return ort.InferenceSession(model.SerializeToString(), sess_options=sess_options, providers=providers)


class SessionInput:
    """A model as ONNX Runtime will read it, so that a large proto need not stay alive while sessions run:
    ``source`` is the proto itself when it is small, else the path of its files (``model_io.write_for_session``,
    written once into a temporary directory, removed by :meth:`close` or when this object is collected). The
    caller drops its own reference to a large proto after making this; every session made from ``source`` gives
    the same outputs as one made from the proto (the files are what :func:`inference_session` would write).
    ``held``: the data of initializers ``model`` leaves out (``FlowContext.held_data``), written into the files
    one tensor at a time (files then, whatever the size)."""

    def __init__(self, model: onnx.ModelProto, held: dict | None = None):
        self.source: onnx.ModelProto | str = model
        self._finalizer = None
        from .model_io import proto_size, write_for_session

        if held or proto_size(model) > SESSION_FILE_BYTES:
            import shutil
            import weakref

            d = tempdirs.make("session")
            self._finalizer = weakref.finalize(self, shutil.rmtree, d, True)
            try:
                self.source = write_for_session(model, d, held=held)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "SessionInput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_session(model: onnx.ModelProto | str, config: SessionConfig | int | None = None) -> ort.InferenceSession:
    """CPU :class:`onnxruntime.InferenceSession` for a model proto or path, made from ``config`` (a
    :class:`SessionConfig`; an int is a thread count with default options), with deterministic compute."""
    from .targets.base import SessionSettings

    if config is None or isinstance(config, int):
        config = SessionConfig(threads=int(config or 0))
    settings = config.settings or SessionSettings(providers=(("CPUExecutionProvider", ()),),
                                                  config=tuple(config.entries))
    return settings.make_session(model, intra_op_num_threads=config.threads)


def output_names(model: onnx.ModelProto | ort.InferenceSession) -> list[str]:
    if isinstance(model, ort.InferenceSession):
        return [o.name for o in model.get_outputs()]
    return [o.name for o in model.graph.output]


def resolve_output(model: onnx.ModelProto | ort.InferenceSession, name: str | None, source: str = "model") -> str:
    """``name`` if it is a graph output of ``model`` (the first output when ``name`` is None), else an
    LLCError listing the available outputs."""
    outputs = output_names(model)
    if not outputs:
        raise LLCError(f"{source}: the model has no outputs; check the export")
    if name is None:
        return outputs[0]
    if name not in outputs:
        listed = ", ".join(repr(o) for o in outputs)
        raise LLCError(f"{source}: output '{name}' is not a graph output; available outputs: {listed}; "
                       "pick one with --output")
    return name


def _session(model, config):
    """(session, batches run at once): a session on one intra-op thread (see the module doc), or ``model``
    itself when it is already a session (then one batch at a time)."""
    if isinstance(model, ort.InferenceSession):
        return model, 1
    if config is None or isinstance(config, int):
        config = SessionConfig(threads=int(config or 0))
    workers = config.threads or os.cpu_count() or 1
    return make_session(model, dataclasses.replace(config, threads=1)), workers


def _batch_outputs(sess, dataset: Dataset, output: str, workers: int, progress: bool, description: str):
    """Yield ``(i, batch, output array, seconds)`` in batch order, running up to ``workers`` batches at once."""
    batches = _track(dataset.batches, len(dataset.batches), description, progress)

    def one(item):
        i, batch = item
        t0 = time.perf_counter()
        out = _run(sess, batch.inputs, output, f"{dataset.source}[batch {i}]")
        return i, batch, out, time.perf_counter() - t0

    if workers <= 1 or len(dataset.batches) <= 1:
        yield from map(one, enumerate(batches))
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending: deque = deque()
        for item in enumerate(batches):
            pending.append(pool.submit(one, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run(sess, feeds, output: str, source: str) -> np.ndarray:
    try:
        return sess.run([output], feeds)[0]
    except Exception as exc:
        raise LLCError(f"{source}: ONNX Runtime failed on the data ({first_line(exc)}); "
                       "check the data shapes against the model") from None


def _track(batches, total, description, progress):
    if not progress:
        return batches
    from .report import track

    return track(batches, total=total, description=description)


def evaluate(model, dataset: Dataset, loss: TaskLoss, *, session: SessionConfig | int | None = None,
             progress: bool = False, samples: bool = False) -> Evaluation:
    """Run ``model`` (proto, path or session) on every batch and return the mean loss (Σ sums / Σ
    counts), metrics and the number of samples; with ``samples`` also the per-unit loss sums
    (``Evaluation.samples``, with the data's groups) for paired standard errors."""
    sess, workers = _session(model, session)
    resolve_output(sess, loss.output)
    totals, secs = LossTotals(loss), 0.0
    unit_sums, unit_counts, unit_groups = [], [], []
    for _, batch, out, seconds in _batch_outputs(sess, dataset, loss.output, workers, progress, "evaluate"):
        labels = loss.batch_labels(batch, dataset.source)
        secs += seconds
        totals.add(out, labels, batch.size)
        if samples:
            import torch

            with torch.no_grad():
                for j in range(out.shape[0]):
                    for us, uc in loss.unit_terms(torch.from_numpy(np.ascontiguousarray(out[j:j + 1])),
                                                  torch.as_tensor(np.asarray(labels)[j:j + 1], device="cpu")):
                        unit_sums.append(us)
                        unit_counts.append(uc)
                        if batch.groups is not None:
                            unit_groups.append(int(batch.groups[j]))
    mean, metrics = totals.mean()
    if sess is not model:  # made here: give its memory back now (memory.release)
        del sess
        from .memory import release

        release()
    per_unit = None
    if samples:
        from .calib.noise import LossSamples

        per_unit = LossSamples(np.asarray(unit_sums, dtype=np.float64), np.asarray(unit_counts, dtype=np.float64),
                               np.asarray(unit_groups, dtype=np.int64) if dataset.has_groups else None)
    return Evaluation(loss=mean, metrics=metrics, n=totals.n, seconds=secs, samples=per_unit)


def compare_models(reference, candidate, dataset: Dataset, loss: TaskLoss, *,
                   session: SessionConfig | int | None = None, progress: bool = False) -> Comparison:
    """Run both models batch by batch; accumulate loss/metrics of each and the max / mean absolute
    difference of the loss output (``loss.output``) between them."""
    (ref_sess, workers), (cand_sess, _) = _session(reference, session), _session(candidate, session)
    sessions = [ref_sess, cand_sess]
    for which, sess in zip(("reference", "candidate"), sessions):
        resolve_output(sess, loss.output, which)
    totals, secs, diff = [LossTotals(loss), LossTotals(loss)], [0.0, 0.0], OutputDiff()
    ref_outs = _batch_outputs(ref_sess, dataset, loss.output, workers, progress, "compare")
    cand_outs = _batch_outputs(cand_sess, dataset, loss.output, workers, False, "compare")
    for (_, batch, ref_out, ref_s), (_, _, cand_out, cand_s) in zip(ref_outs, cand_outs):
        labels = loss.batch_labels(batch, dataset.source)
        outs = []
        for k, (out, seconds) in enumerate(((ref_out, ref_s), (cand_out, cand_s))):
            secs[k] += seconds
            totals[k].add(out, labels, batch.size)
            outs.append(out)
        if outs[0].shape != outs[1].shape:
            raise LLCError(f"candidate: output '{loss.output}' has shape {outs[1].shape}, the reference "
                           f"{outs[0].shape}; the models are not comparable")
        diff.add(outs[1], outs[0])
    evals = [Evaluation(*t.mean(), n=t.n, seconds=s) for t, s in zip(totals, secs)]
    return Comparison(reference=evals[0], candidate=evals[1], max_abs_diff=diff.max, mean_abs_diff=diff.mean,
                      n=totals[0].n)
