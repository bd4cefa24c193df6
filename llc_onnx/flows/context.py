"""Everything a compression flow works on, loaded once: the prepared model, its compressible nodes, the
interpreter, the loss, the data splits and the float model's losses.

The statistical roles of the data (the contract every flow follows)
--------------------------------------------------------------------
* **test** (``held=`` / ``--held``, else a seeded ``data.holdout`` fraction of the data): evaluated exactly
  once, on the final model and the float model, for the verdict. Nothing is chosen after seeing it.
* **validation** (``val=`` / ``--val``, else a seeded ``data.val_fraction`` of the remaining data): the chosen
  plans are measured *jointly* (all nodes compressed at once, in ONNX Runtime) on it; back-off and the choice
  between candidate plans are steered by it.
* **calibration** (the rest) chooses: it is cut, by whole batches (by group when the data has groups), into a
  **fit** part, whose gradients *choose* (LLC rounding directions, the low-rank α step), and a disjoint
  **measure** part, on which those choices are *predicted* (Σ g·δ) and *measured* (loss with one node
  changed). A rounding chosen from a gradient always looks good on the samples that gradient came from; measured
  on other samples it shows its real effect. With a single calibration batch the two parts coincide
  (``in_sample``) and the summary says so.

Every split keeps whole groups (``calib.data``), so correlated samples never sit on both sides of a split.

Float types: a float16 or bfloat16 model is measured in the interpreter in float32 (its weights are exact
there); each format stores its scales in the weight's type (``targets.base.Format.float_type``; scales are
rounded to it before the codes are chosen, ``quant.weights``), the rewrite keeps the model's type, sizes count
the model's own bytes (2 per float16 parameter: :meth:`FlowContext.float_bytes`), and the verdict runs the
written model in ONNX Runtime in its type. ONNX Runtime's CPU provider has no bfloat16 kernels: a bfloat16
model is refused on CPU targets before any work.

Objectives: ``task`` uses the labelled loss; ``fidelity`` replaces every split's labels by the float model's
own outputs (``calib.losses.teacher_dataset``) and uses KL to them, so unlabelled data works.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from ..calib.data import Dataset, fit_measure_split, load_dataset, split_dataset
from ..calib.gradients import GradientPass, collect_gradients
from ..calib.losses import TaskLoss, fidelity_loss_for, looks_like_probability, make_loss, teacher_dataset
from ..calib.noise import LossSamples, measure, measure_base
from ..compressible import CompressibleNode, find_compressible
from ..config import OptimizeConfig
from ..errors import LLCError
from ..interpreter import TorchGraph
from ..memory import TASK_TRIM_BYTES, Spill, bound_heap, drop, drop_mapped_pages, release, trim
from ..model_io import load_model, prepare_model
from ..ort_eval import Evaluation, SessionConfig, SessionInput, evaluate, make_session, resolve_output
from ..progress import Progress, Silent, StageTimer
from .parallel import executor as parallel_executor

log = logging.getLogger(__name__)


class Sequential:
    """Runs measurement tasks one after the other in this process (the default executor); between two tasks the
    pages of spilled gradients a task read leave this process's memory (``memory.drop_mapped_pages``), and so
    does the heap's free memory once there is enough of it (``memory.trim``)."""

    def map(self, fn, tasks):
        out = []
        for t in tasks:
            out.append(fn(t))
            drop_mapped_pages()
            trim(TASK_TRIM_BYTES)
        return out


Executor = Sequential  # the protocol: ``map(fn, tasks) -> [fn(t) for t in tasks]`` in task order


def snapshot_bytes() -> int:
    """Memory for measurement snapshots, all measure batches together: ``LLC_ONNX_SNAPSHOT_BYTES`` or 2 GiB.
    Beyond it snapshots are thinned (measurements then start a little earlier; results are the same)."""
    try:
        return int(os.environ.get("LLC_ONNX_SNAPSHOT_BYTES", 2 << 30))
    except ValueError:
        raise LLCError(f"LLC_ONNX_SNAPSHOT_BYTES={os.environ['LLC_ONNX_SNAPSHOT_BYTES']!r}: "
                       "a number of bytes, e.g. 1000000000") from None


@dataclass
class FlowContext:
    source: str  # where the model came from (a path, or "model")
    model: onnx.ModelProto  # prepared (opset, names, shapes); the input is never touched
    nodes: list[CompressibleNode]
    skipped: list[tuple[str, str]]
    graph: TorchGraph
    loss: TaskLoss  # the objective's loss (task loss, or fidelity to the float model)
    objective: str  # "task" | "fidelity"
    calib: Dataset
    val: Dataset
    test: Dataset
    fit_data: Dataset  # calibration batches whose gradients choose roundings / α
    measure_data: Dataset  # disjoint calibration batches: predictions and measured ΔL
    calib_fp: Evaluation  # float model on calibration (ORT, per-unit samples)
    val_fp: Evaluation  # float model on validation (ORT, per-unit samples)
    session: SessionConfig  # the session of the verdict (the deployment target's)
    config: OptimizeConfig
    target: object = None  # the targets.Target the rewrite is for
    timer: StageTimer = field(default_factory=StageTimer)
    progress: Progress = field(default_factory=Silent)
    notes: list[str] = field(default_factory=list)
    task_loss: TaskLoss | None = None  # the labelled loss when the objective is fidelity and labels exist
    task_test: Dataset | None = None  # the labelled test split, for that loss (fidelity objective)
    executor: "Executor" = field(default_factory=lambda: Sequential())  # runs the candidate measurements
    _weights: dict[str, np.ndarray] = field(default_factory=dict)
    _base: LossSamples | None = None
    _snapshots: list | None = None  # per measure batch: interpreter.Snapshots of the unmodified run
    _float_bytes: int | None = None  # a later stage keeps the original model's float bytes as its reference
    _hold: "_Hold" = field(default_factory=lambda: _Hold())  # shared by dataclasses.replace copies (same graph)

    # -- measurements in the interpreter -----------------------------------------------------------
    def base(self) -> LossSamples:
        """Per-sample losses of the unmodified model on ``measure_data`` (interpreter), computed once, with the
        snapshots that let :meth:`measure` recompute only from the perturbed node on."""
        if self._base is None:
            per_batch = snapshot_bytes() // max(1, len(self.measure_data.batches))
            self._base, self._snapshots = measure_base(self.graph, self.measure_data, self.loss,
                                                       [n.name for n in self.nodes], per_batch)
        return self._base

    def measure(self, weight_fns: dict | None = None, input_fns: dict | None = None,
                output_fns: dict | None = None) -> LossSamples:
        """Per-sample losses on ``measure_data`` with these hooks (``calib.noise.measure``), starting each
        batch at the snapshot before the first hooked node: a candidate near the output costs a fraction of
        a forward pass."""
        self.base()
        return measure(self.graph, self.measure_data, self.loss, weight_fns, input_fns, snapshots=self._snapshots,
                       output_fns=output_fns)

    def forget_snapshots_before(self, name: str) -> None:
        """No measurement from here on perturbs a node before ``name``: drop the snapshots only such a
        measurement would start from (``interpreter.Snapshots.drop_before``). On SmolLM2 they hold ~0.9 GB at the
        start of the candidate stage, which measures the nodes in graph order; later measurements (the joint
        re-solve) start from an earlier kept snapshot or the inputs: the same numbers, a longer run."""
        for s in self._snapshots or ():
            s.drop_before(self.graph.position(s.outputs, name))
        self._drop_weights_read_before()

    def _drop_weights_read_before(self) -> None:
        """The interpreter's file-backed weights that no run from the kept snapshots reads (every node reading
        them comes before the earliest snapshot kept): their pages out of the process's memory. The candidate
        stage measures in graph order, so at the last nodes (SmolLM2's lm_head and its GPTQ candidates, the
        stage's peak) the weights before them are not resident. A later read faults them in again from the file
        (the same values)."""
        h, snaps = self._hold, self._snapshots
        if h.spill is None or not h.held or not snaps or not all(s.positions for s in snaps):
            return
        outs = snaps[0].outputs
        if h.last_read is None or h.last_read[0] != outs:
            h.last_read = (outs, self.graph.last_reads(outs, h.names))
        start = min(s.positions[0] for s in snaps if s.outputs == outs)
        for n, p in h.last_read[1].items():
            if p < start:
                drop(h.spill.arrays[h.spill_index[n]])

    def gradients(self, act_candidates=None, progress=None) -> tuple[GradientPass, GradientPass]:
        """(fit, measure) gradient passes over the two calibration parts — one pass over the calibration data
        in all. The measure pass needs only the mean gradient (and the activation-noise predictions); with a
        single calibration batch both are the same pass."""
        self.hold_weights()
        in_sample = self.fit_data is self.measure_data
        measure_pass = self._gradient_pass(self.measure_data, act_candidates, progress, magnitudes=in_sample)
        if in_sample:
            return measure_pass, measure_pass
        return self._gradient_pass(self.fit_data, None, progress), measure_pass

    def out_of_core(self) -> bool:
        """Whether the passes over the calibration data accumulate in files (gradients, Gram matrices): the
        compressible weights take ``SPILL_BYTES`` or more in the interpreter's dtype (one weight-gradient
        accumulator's size; SmolLM2's K×K Gram matrices add up to about as much)."""
        itemsize = torch.empty((), dtype=self.graph.dtype).element_size()
        return itemsize * sum(math.prod(n.weight_shape) for n in self.nodes) >= SPILL_BYTES

    def _gradient_pass(self, data, act_candidates, progress, magnitudes: bool = False) -> GradientPass:
        """One :func:`collect_gradients` pass. For a large model (:meth:`out_of_core`) it runs out of core: the
        accumulators in files (``spill``) and the forward in checkpointed pieces (``segments``,
        :func:`recompute_segments`), so it holds neither a second in-memory copy of the weights nor a whole
        forward's activations — the same numbers, about one forward pass more."""
        if not self.out_of_core():
            return _spilled(collect_gradients(self.graph, data, self.loss, self.nodes, act_candidates, progress,
                                              magnitudes=magnitudes))
        spill = Spill()
        gp = collect_gradients(self.graph, data, self.loss, self.nodes, act_candidates, progress,
                               magnitudes=magnitudes, segments=recompute_segments(self.graph), spill=spill)
        gp.spill = spill
        return _spilled(gp)

    # -- one copy of the weights -----------------------------------------------------------------
    def hold_weights(self) -> None:
        """While the interpreter measures (gradients, candidates, Gram matrices, joint measurements), let it
        hold the large float weights alone: ``model`` becomes the structure copy the interpreter was built from
        (:func:`interpreter_for`), and the full proto — a second copy of every weight, 0.65 GB on SmolLM2 — is
        dropped. Whatever needs the weights gets them from the interpreter's copy, byte for byte: a plan is
        written from the structure and completed (:meth:`complete`), the float model's session files are written
        with them streamed in (:meth:`held_data`), and :meth:`restore_weights` writes them back into the model
        where it is read whole (the latency table; a small model's last stage). A no-op unless the weights are
        large, or when the interpreter was not built from a structure copy."""
        h = self._hold
        if h.structure is None or h.held or self.graph.params_released:
            return
        h.held = True
        self.model = h.structure
        release()

    def update_digest(self, h) -> None:
        """Feed the model, with its weights whether they are held or not, to hash object ``h``
        (``model_io.update_digest``: the same digest either way)."""
        from ..model_io import update_digest

        update_digest(h, self.model, held=self.held_data())

    def held_data(self) -> dict | None:
        """Initializer name -> a function giving its ``raw_data`` from the interpreter's copy (the bytes
        :meth:`restore_weights` would write; a file-backed copy's pages leave again after the read), for every
        weight the model leaves to the interpreter now; None when none is held. For writers that take one tensor
        at a time (``model_io.update_digest``, ``ort_eval.SessionInput``)."""
        hd = self._hold
        if not hd.held:
            return None
        types = {t.name: t.data_type for t in self.model.graph.initializer if t.name in hd.names}
        return {n: (lambda n=n: self._held_bytes(n, types[n])) for n in hd.names}

    def _held_bytes(self, name: str, data_type: int) -> bytes:
        """Held weight ``name`` as ``raw_data`` of ``data_type`` from the interpreter's copy; a file-backed copy's
        pages leave the process's memory again at once (not every weight resident beside the bytes made)."""
        raw = _raw_bytes(self.graph.params[name], data_type)
        h = self._hold
        if h.spill is not None:
            drop(h.spill.arrays[h.spill_index[name]])
        return raw

    def restore_weights(self) -> None:
        """Undo :meth:`hold_weights`: each held initializer gets its data back from the interpreter's tensor, in
        the initializer's own type (exact: the interpreter holds float32 copies of float32/16 and bfloat16
        values), so ``model`` serializes to the bytes it had. Once restored, the weights are not held again."""
        h = self._hold
        if not h.held:
            return
        for t in h.structure.graph.initializer:
            if t.name in h.names:
                t.raw_data = self._held_bytes(t.name, t.data_type)
        h.structure, h.held = None, False

    def complete(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` — written from this context's model (a plan: the target's rewrite) — with the data of every
        held initializer it keeps filled in, in place, from the interpreter's copy and in the initializer's own
        type: the bytes the plan has when written from the restored model. While the weights are held
        (:meth:`hold_weights`) a plan is written from the structure copy, and each kept float weight is copied
        once, into the plan only; otherwise ``model`` is returned as it is."""
        h = self._hold
        if not h.held:
            return model
        for t in model.graph.initializer:
            if t.name in h.names and not t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL:
                t.raw_data = self._held_bytes(t.name, t.data_type)
        return model

    def release_interpreter(self) -> None:
        """After the last measurement: drop the snapshots of the unmodified run and the interpreter's copy of the
        weights (validation, test and latency run in ONNX Runtime); a later use of the interpreter (e.g. a GPTQ
        rounding first needed by a back-off round of a cached run) reads the weights from the model again. When
        the interpreter holds the weights in files (:func:`_file_backed`), they stay there instead and the model
        stays without them: the plans are completed from those files (:meth:`complete`) and nothing holds the
        float weights in memory while validation's sessions run (SmolLM2: the restored proto was 0.65 GB)."""
        from ..memory import release

        if not (self._hold.held and self._hold.spill is not None):
            self.restore_weights()
            self.graph.release_params(self.model)
        self._snapshots = None  # (the base losses stay: a later measurement then runs from the inputs)
        self._weights.clear()
        release()

    def drop_model(self) -> None:
        """After the last read of this context's model and interpreter (the final and float models are files by
        then): let go of the proto and the interpreter, which point into it; the float bytes stay known."""
        self.float_bytes()
        self.model, self.graph, self._hold = None, None, _Hold()
        self._weights.clear()
        self._snapshots = None

    # -- ONNX Runtime ------------------------------------------------------------------------------
    def evaluate(self, model: onnx.ModelProto, data: Dataset, samples: bool = False) -> Evaluation:
        """``model`` on ``data`` in the verdict's session (the deployment target's)."""
        return evaluate(model, data, self.loss, session=self.session, samples=samples)

    # -- nodes and weights -------------------------------------------------------------------------
    def node(self, name: str) -> CompressibleNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def weight_array(self, node: CompressibleNode) -> np.ndarray:
        """The node's float weight as float64 (ONNX layout). The last two asked for are kept (a node's formats
        are measured one after the other): a float64 copy of every weight would double the model's memory."""
        w = self._weights.pop(node.weight, None)
        if w is None:
            if self.graph.params_released:  # this one weight from the model, not every weight again
                w = _initializer_array(self.model, node.weight).astype(np.float64)
            else:
                w = self.graph.params[node.weight].detach().to(torch.float64).cpu().numpy()
        self._weights[node.weight] = w  # most recent last
        while len(self._weights) > 2:
            self._weights.pop(next(iter(self._weights)))
        return w

    def float_bytes(self) -> int:
        """Bytes of the compressible nodes' weights in the model's own float types (4 per parameter for
        float32, 2 for float16/bfloat16; a shared weight counted once per node); for a later stage
        (``derive_context``) those of the original model, so budgets and reductions stay relative to what the
        user gave."""
        if self._float_bytes is None:
            self._float_bytes = sum(float_itemsize(self.model, n) * math.prod(n.weight_shape) for n in self.nodes)
        return self._float_bytes

    @property
    def in_sample(self) -> bool:
        return self.fit_data is self.measure_data

    def measurement_info(self) -> dict:
        """Which calibration batches chose (fit) and which judged (measure), for the report."""
        return {"fit": self.fit_data.source, "measure": self.measure_data.source,
                "fit_samples": self.fit_data.n_samples, "measure_samples": self.measure_data.n_samples,
                "in_sample": self.in_sample}


#: float initializers of at least this many bytes are held by the interpreter alone while it measures
HOLD_BYTES = 1 << 20


@dataclass
class _Hold:
    """The structure copy a context's interpreter was built from (``interpreter_for``), the initializers whose
    data it leaves out, and whether the context's ``model`` is that copy now (:meth:`FlowContext.hold_weights`);
    one object for a context and its ``dataclasses.replace`` copies, which share the interpreter."""

    structure: onnx.ModelProto | None = None
    names: frozenset = frozenset()
    held: bool = False
    spill: Spill | None = None  # the files behind the interpreter's large weights (``interpreter_for``)
    spill_index: dict = field(default_factory=dict)  # initializer name -> its array in ``spill.arrays``
    last_read: tuple | None = None  # (outputs, name -> last position reading it): ``_drop_weights_read_before``


def _holdable(t: onnx.TensorProto) -> bool:
    """A float initializer whose data :meth:`FlowContext.hold_weights` may leave to the interpreter: large, in
    ``raw_data``, and with no field a structure copy (``model_io._copy``) would lose, so restoring ``raw_data``
    gives the proto back byte for byte."""
    from ..model_io import plain_raw

    return t.data_type in _ITEMSIZE and len(t.raw_data) >= HOLD_BYTES and plain_raw(t)


def _raw_bytes(tensor: torch.Tensor, data_type: int) -> bytes:
    """``tensor`` (the interpreter's float32/float64 copy of an initializer) as ``raw_data`` of ``data_type``."""
    from onnx.helper import tensor_dtype_to_np_dtype

    return tensor.detach().cpu().numpy().astype(tensor_dtype_to_np_dtype(data_type), copy=False).tobytes()


def interpreter_for(model: onnx.ModelProto, dtype: torch.dtype, device) -> tuple[TorchGraph, _Hold]:
    """(interpreter, its :class:`_Hold`): a model with large float weights (:func:`_holdable`) gets an
    interpreter built from a copy of its structure without their data, reading the weights from ``model``,
    so that nothing in the interpreter points into ``model``'s proto (see :meth:`FlowContext.hold_weights`).
    Gemm and Conv biases are never held: the rewrites read them from the model (plans are written from the
    structure copy, :meth:`FlowContext.complete`)."""
    from ..model_io import _copy

    biases = {n.input[2] for n in model.graph.node if n.op_type in ("Gemm", "Conv") and len(n.input) > 2}
    large = frozenset(t.name for t in model.graph.initializer if _holdable(t) and t.name not in biases)
    if not large:
        return TorchGraph(model, dtype=dtype, device=device), _Hold()
    structure = _copy(model, skip_data=dict.fromkeys(large))
    graph = TorchGraph(structure, dtype=dtype, device=device, weights=model)
    spill = _file_backed(graph, large)
    return graph, _Hold(structure, large, spill=spill,
                        spill_index={n: i for i, n in enumerate(sorted(large))} if spill is not None else {})


def _file_backed(graph: TorchGraph, names: frozenset) -> Spill | None:
    """Move the interpreter's large float weights (``names``) into files mapped back copy-on-write
    (``memory.Spill``; the same values, never written): while the interpreter runs they are read from the page
    cache, and :func:`memory.release` — before every ONNX Runtime session and between stages — takes their pages
    out of the process's memory, so the interpreter's copy of the weights (0.65 GB on SmolLM2) is not resident
    while sessions run. Only when the weights add up to ``SPILL_BYTES`` and live on the CPU; the pages are kept
    between measurement tasks, which all read them — except those of weights no later candidate measurement reads
    (:meth:`FlowContext._drop_weights_read_before`)."""
    params = graph.params
    if graph.device.type != "cpu" or sum(params[n].numel() * params[n].element_size() for n in names) < SPILL_BYTES:
        return None
    bound_heap()  # a large model: freed memory back to the OS at once (memory.bound_heap)
    spill = Spill(between_tasks=False)
    for n in sorted(names):
        params[n] = torch.from_numpy(spill.put(params[n].numpy(), mode="c"))
    release()
    return spill


def _initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(f"initializer {name!r}")


def _spilled(gp: GradientPass) -> GradientPass:
    """``gp`` with its weight-sized arrays in files mapped back read-only (``memory.Spill``, same values) when the
    model is large: two passes would otherwise hold two copies of every weight through the candidate stage,
    which reads them one node at a time (the executors drop the pages after each task)."""
    if sum(s.grad_w.nbytes for s in gp.nodes.values()) < SPILL_BYTES:
        return gp
    spill = Spill()
    for st in gp.nodes.values():
        for name in ("grad_w", "grad_w_abs", "grad_w_sq"):
            arr = getattr(st, name)
            if arr is not None and not isinstance(arr, np.memmap):  # (accumulated in a file already)
                setattr(st, name, spill.put(arr))
    gp.spill = (getattr(gp, "spill", None), spill)  # the files live as long as the pass
    release()
    return gp


def recompute_segments(graph: TorchGraph) -> int:
    """Checkpointed pieces for a large model's gradient pass: about √(nodes), so the pieces' boundaries and one
    piece's activations are both about √ of the whole forward's (the usual square-root schedule)."""
    return max(2, round(math.sqrt(len(graph.node_names()))))


#: gradient passes holding more than this many bytes of weight gradients go to files (``_spilled``)
SPILL_BYTES = 256 << 20


# ----------------------------------------------------------------------------------------------- building
def _default_loss_kind(model: onnx.ModelProto, output: str) -> str:
    """``"lm"`` when ``output`` has rank 3 and a graph input is named ``input_ids``, else ``"ce"``."""
    return "lm" if _rank(model, output) == 3 and any(i.name == "input_ids" for i in model.graph.input) else "ce"


def _rank(model: onnx.ModelProto, output: str) -> int | None:
    for o in model.graph.output:
        if o.name == output and o.type.tensor_type.HasField("shape"):
            return len(o.type.tensor_type.shape.dim)
    return None


def task_loss_for(model: onnx.ModelProto, config: OptimizeConfig, source: str = "model") -> TaskLoss:
    """The labelled loss ``criterion.loss`` (default: lm for LMs, else ce) on ``criterion.output``."""
    output = resolve_output(model, config.criterion.output, source)
    return make_loss(config.criterion.loss or _default_loss_kind(model, output), output, model=model)


def _splits(data, model, config: OptimizeConfig, held, val) -> tuple[Dataset, Dataset, Dataset, list[str]]:
    """(calibration, validation, test, notes) by the rules of the module doc."""
    d, notes = config.data, []
    ds = load_dataset(data, model, batch_size=d.batch_size)
    if held is not None:
        rest, test = ds, load_dataset(held, model, batch_size=d.batch_size)
    else:
        rest, test = split_dataset(ds, d.holdout, d.seed, part="test")
    if val is not None:
        return rest, load_dataset(val, model, batch_size=d.batch_size), test, notes
    if d.val_fraction > 0 and _units(rest) >= 4 and 1 <= round(d.val_fraction * _units(rest)) < _units(rest) - 1:
        calib, val_ds = split_dataset(rest, d.val_fraction, d.seed + 1, part="validation")
        return calib, val_ds, test, notes
    notes.append("validation = calibration data (too little data to hold a validation part out, or "
                 "data.val_fraction = 0): back-off is steered by data the search also chose on")
    return rest, rest, test, notes


def _units(ds: Dataset) -> int:
    """How many units a split can move: groups or samples of a single .npz, else batches."""
    if ds.unit == "sample" and ds._arrays is not None:
        from ..calib.data import GROUPS

        g = ds._arrays.get(GROUPS)
        return len(np.unique(g)) if g is not None else ds.n_samples
    return len(ds.batches)


_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}


def float_itemsize(model: onnx.ModelProto, node: CompressibleNode) -> int:
    """Bytes per parameter of ``node``'s weight in ``model`` (4 float32, 2 float16/bfloat16)."""
    for t in model.graph.initializer:
        if t.name == node.weight:
            return _ITEMSIZE.get(t.data_type, 4)
    return 4


def _require_runnable_type(model: onnx.ModelProto, nodes: list[CompressibleNode], settings, source: str) -> None:
    """A bfloat16 model cannot be verified on ONNX Runtime's CPU provider (it has no bfloat16 MatMul, Gemm,
    Conv or elementwise kernels): say so before any work."""
    if settings.providers[0][0] != "CPUExecutionProvider":
        return
    types = {t.name: t.data_type for t in model.graph.initializer}
    bf16 = [n for n in nodes if types.get(n.weight) == onnx.TensorProto.BFLOAT16]
    if bf16:
        raise LLCError(f"{source}: node '{bf16[0].name}' has a BFLOAT16 weight and ONNX Runtime's CPU provider has "
                       "no bfloat16 MatMul/Gemm/Conv kernels, so neither the model nor its compressed form can be "
                       "verified on CPU; use a GPU target (--target ort-cuda) or convert the model to float16 or "
                       "float32")


def create_context(model: onnx.ModelProto | str, data, config: OptimizeConfig, *, source: str = "model", held=None,
                   val=None, progress: Progress | None = None, session: SessionConfig | None = None) -> FlowContext:
    """Load and prepare everything a flow needs (see the module doc for the splits). ``model``: a proto (not
    modified) or a path, read here and dropped once prepared (a large model is then not held twice)."""
    timer = StageTimer()
    notes: list[str] = []
    with timer.stage("load"):
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model)
        prepared = prepare_model(model, opset=21)
        del model
        release()
        found, skipped = find_compressible(prepared)
        if config.nodes:
            unknown = sorted(set(config.nodes) - {n.name for n in found})
            if unknown:
                raise LLCError(f"{source}: nodes names {unknown[0]!r}, which is not a compressible node; "
                               f"run 'llc-onnx inspect {source}' to list them")
            found = [n for n in found if n.name in set(config.nodes)]
        if not found:
            raise LLCError(f"{source}: no compressible node (MatMul/Gemm/Conv with a constant weight); "
                           "nothing to compress")
        task = task_loss_for(prepared, config, source)
        target = _target(config)
        runtime_notes = []
        if session is None:
            settings = target.session()
            if not settings.available():
                fallback = getattr(target, "reference_session", None)
                settings = fallback() if fallback else _cpu_fallback(settings)
                runtime_notes.append(f"the {config.target.name} runtime is not installed here: the verdict ran in "
                                     f"{settings.description}")
            session = SessionConfig.of_target(settings, config.device.threads)
        if session.settings is not None:
            _require_runnable_type(prepared, found, session.settings, source)
        calib, val_ds, test, split_notes = _splits(data, prepared, config, held, val)
        notes += split_notes + runtime_notes
        objective = config.criterion.objective
        if objective == "auto":
            labelled = calib.has_labels or task.name == "lm"
            objective = "task" if labelled else "fidelity"
        fit, meas = fit_measure_split(calib, config.data.measure_samples, config.data.seed)
        loss, task_loss, task_test = task, None, None
        # the float model as ONNX Runtime reads it: a large one as files (ort_eval.SessionInput), so no session
        # made below serializes the whole proto into memory first (+1 GB on SmolLM2 when it did)
        float_in = SessionInput(prepared)
        if objective == "fidelity":
            ref = make_session(float_in.source, dataclasses.replace(session, threads=1))  # independent of threads

            def run_float(inputs):
                return ref.run([task.output], inputs)[0]

            loss = fidelity_loss_for(task.name, task.output, _rank(prepared, task.output),
                                     probs=getattr(task, "probabilities", None) is True)
            task_loss = task if test.has_labels else None
            task_test = test if test.has_labels else None
            val_is_calib = val_ds is calib
            fit_t = teacher_dataset(fit, run_float)
            meas_t = fit_t if meas is fit else teacher_dataset(meas, run_float)
            calib = fit_t if meas is fit else Dataset(fit_t.batches + meas_t.batches, calib.source, unit="batch")
            fit, meas = fit_t, meas_t
            val_ds = calib if val_is_calib else teacher_dataset(val_ds, run_float)
            test = teacher_dataset(test, run_float)
            del ref, run_float  # the teacher's session: not alive beside the baseline's
            if loss.mode == "kl" and not loss.probs and loss.axis == 1 and fit.batches and \
                    looks_like_probability(fit.batches[0].labels, axis=1):
                loss.probs = True  # the output already sums to 1 (no Softmax node to tell): KL of its values
        graph, hold = interpreter_for(prepared, torch.float32, config.device.device)
    if fit is meas:
        notes.append("fit and measure parts coincide (one calibration batch): measured costs are in-sample; "
                     "give more calibration data")
    ctx = FlowContext(source, prepared, found, skipped, graph, loss, objective, calib, val_ds, test, fit, meas,
                      None, None, session, config, target, timer, progress or Silent(), notes, task_loss,
                      task_test)
    ctx._hold = hold
    ctx.executor = parallel_executor()  # in-process, or shards across the workers' ranks (flows.parallel)
    del prepared
    # ONNX Runtime reads the float model from float_in's files from here on: the interpreter holds the weights
    # alone before the float session loads its own copy (on SmolLM2 the baseline held three copies, 2.7 GB)
    ctx.hold_weights()
    with timer.stage("baseline"), float_in:
        ctx.calib_fp = ctx.evaluate(float_in.source, calib, samples=True)
        ctx.val_fp = ctx.calib_fp if val_ds is calib else ctx.evaluate(float_in.source, val_ds, samples=True)
    note = se_units_note(ctx.val_fp.samples, val_ds.n_samples, "validation")
    if note:
        ctx.notes.append(note)
    return ctx


#: fewer independent units than this and a split's standard errors are called rough in the summary
FEW_UNITS = 10


def se_units_note(samples, n_samples: int, split: str) -> str | None:
    """What the summary should say about the units a split's standard errors rest on (``calib.noise``): too few
    of them (clusters of ``groups``, or samples), or spans of one sample (a language model's 64-token spans of
    a few sequences: units that share context, so the SE they give is a lower estimate). None when neither."""
    if samples is None:
        return None
    if samples.groups is not None:
        k, what = len(np.unique(samples.groups)), "groups"
    else:
        k, what = len(samples.sums), "samples"
        if k > n_samples:
            return (f"{split} standard errors are over {k} spans of {n_samples} sequence(s): spans of one sequence "
                    "share context, so the SE (back-off margins, the validation check) is a lower estimate; give "
                    "more sequences, or a 'groups' id per document")
    if k < FEW_UNITS:
        return (f"{split} standard errors rest on {k} independent {what}: the back-off margins and checks are "
                f"rough; give more data (at least {FEW_UNITS} {what})")
    return None


def _target(config: OptimizeConfig):
    from ..targets import get_target

    t = config.target
    if t.name == "qdq":
        return get_target("qdq", activations=config.quant.activations, series_form=config.series.form)
    if t.name == "tensorrt":
        return get_target("tensorrt", plugins=t.plugins)
    if t.name == "ort-cpu":
        if t.w8a8_codes != 7:
            from ..targets.ort_cpu import int8_full_range_exact

            why = int8_full_range_exact()
            if why:
                raise LLCError(f"--w8a8-codes {t.w8a8_codes}: {why}; verify on (or like) the CPU you deploy to, or "
                               "use --w8a8-codes 7")
        return get_target("ort-cpu", w8a8_code_bits=t.w8a8_codes, w8a8_activations=w8a8_activations(t))
    return get_target(t.name)


def w8a8_activations(t) -> str:
    """The W8A8 activation forms ort-cpu offers for a TargetConfig: ``auto`` is ``both`` when a latency budget
    is set (speed is asked for, and dynamic W8A8 is what ORT runs fastest on transformers), else ``static``."""
    if t.w8a8_activations == "auto":
        return "both" if t.latency_budget is not None else "static"
    return t.w8a8_activations


def _cpu_fallback(settings):
    from ..targets.base import SessionSettings

    return SessionSettings(providers=(("CPUExecutionProvider", ()),), config=settings.config,
                           description="ONNX Runtime CPU (the target's own provider is not installed)")


def derive_context(ctx: FlowContext, model: onnx.ModelProto) -> FlowContext:
    """A context for a further stage on ``model`` (e.g. quantizing low-rank factors): same data, loss and
    splits, and the *original* float model's losses as the reference every stage is judged against."""
    found, skipped = find_compressible(model)
    graph, hold = interpreter_for(model, ctx.graph.dtype, ctx.graph.device)
    return dataclasses.replace(ctx, model=model, nodes=found, skipped=skipped, graph=graph,
                               timer=StageTimer(), _weights={}, _base=None, _snapshots=None,
                               _float_bytes=ctx.float_bytes(), _hold=hold)
