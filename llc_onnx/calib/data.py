"""Calibration / held-out data: loading, validation against the model, batching and splitting.

Data specs accepted by :func:`load_dataset`:

* ``file.npz`` — one array per graph input (named after it) plus an optional ``labels`` array; all
  arrays share the leading (sample) dimension. Cut into batches of ``batch_size`` consecutive samples
  (the last batch may be smaller). If every graph input has the same *static* leading dim ``s``, batches
  have exactly ``s`` samples and a remainder is dropped (also in each part after :func:`split_dataset`).
* a directory — every ``*.npz`` in it (sorted by file name) is one batch, as is.
* ``"module:attr"`` — an object following ONNX Runtime's ``CalibrationDataReader`` protocol:
  ``get_next()`` returns a dict ``{input name: array, ..., "labels": array}`` per batch and ``None`` at
  the end. ``attr`` may be the reader itself, a class or a zero-argument factory. The current directory
  is put on ``sys.path`` for the import.

Every batch is validated against the model's graph inputs; a problem raises a one-line
:class:`~llc_onnx.errors.LLCError` naming the file (``dir/b.npz``, ``module:attr[batch 3]``), the tensor
and the fix. Labels are not required here; the loss checks them (:mod:`llc_onnx.calib.losses`).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import LLCError

LABELS = "labels"
_OBJECT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class Batch:
    inputs: dict[str, np.ndarray]   # graph input name -> array with leading batch dim
    labels: np.ndarray | None

    @property
    def size(self) -> int:
        """Number of samples (leading dim)."""
        arr = next(iter(self.inputs.values()), self.labels)
        return 0 if arr is None else int(arr.shape[0])


class Dataset:
    """A list of batches plus where they came from.

    ``indices`` says which units of the source the dataset holds: sample indices for a single ``.npz``
    (``unit == "sample"``), batch (file / ``get_next`` call) indices otherwise (``unit == "batch"``).
    """

    def __init__(self, batches: list[Batch], source: str, *, indices=None, unit: str = "batch",
                 batch_size: int | None = None, arrays: dict[str, np.ndarray] | None = None,
                 fixed_batch: bool = False):
        self.batches = list(batches)
        self.fixed_batch = fixed_batch  # model has a static batch dim: every batch exactly batch_size
        self.source = source
        self.unit = unit
        self.batch_size = batch_size
        self.indices = np.arange(len(self.batches)) if indices is None else np.asarray(indices)
        # for unit == "sample": all samples (inputs + labels) so that split_dataset can re-batch
        self._arrays = arrays

    @property
    def n_samples(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def has_labels(self) -> bool:
        return bool(self.batches) and all(b.labels is not None for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def __repr__(self) -> str:
        return f"Dataset({self.source!r}, {len(self.batches)} batches, {self.n_samples} samples)"


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: np.dtype | None
    shape: tuple | None   # int for static dims, None for symbolic/unknown; None when rank is unknown


def model_inputs(model: onnx.ModelProto) -> list[_InputSpec]:
    """Graph inputs that are not initializers, with numpy dtype and static dims (None for symbolic, unknown
    and ``-1`` dims)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = None
        if tt.elem_type:
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
            except Exception:
                dtype = None
        shape = None
        if tt.HasField("shape"):
            # -1 is how some converters write a dynamic dim: read it as one
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tt.shape.dim)
        specs.append(_InputSpec(vi.name, dtype, shape))
    return specs


def _fmt_dims(shape: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def validate_arrays(arrays: dict[str, np.ndarray], model: onnx.ModelProto | list, source: str,
                    check_batch_dim: bool = True) -> None:
    """Check one batch (or a whole ``.npz``) against the model's inputs. ``arrays`` may contain
    ``labels``. Raises :class:`LLCError` on the first problem found."""
    specs = model if isinstance(model, list) else model_inputs(model)
    names = [s.name for s in specs]
    listed = ", ".join(repr(n) for n in names)
    for s in specs:
        if s.name not in arrays:
            raise LLCError(f"{source}: missing array '{s.name}' for graph input '{s.name}' (model inputs: {listed}); "
                           f"add it, e.g. np.savez(path, {s.name}=..., labels=...)")
    for k in arrays:
        if k != LABELS and k not in names:
            raise LLCError(f"{source}: array '{k}' is not a graph input of the model (inputs: {listed}, plus 'labels'); "
                           "remove or rename it")
    for k, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype == object:
            raise LLCError(f"{source}: array '{k}' is not a numeric numpy array ({type(a).__name__}); "
                           "store plain numeric arrays")
        if a.ndim == 0:
            raise LLCError(f"{source}: array '{k}' is a scalar; every array needs a leading batch dimension")
    for s in specs:
        a = arrays[s.name]
        if s.shape is not None:
            if a.ndim != len(s.shape):
                raise LLCError(f"{source}: array '{s.name}' has shape {_fmt_shape(a.shape)} (rank {a.ndim}), model input "
                               f"expects rank {len(s.shape)} {_fmt_dims(s.shape)}; reshape the data")
            for axis, (got, want) in enumerate(zip(a.shape, s.shape)):
                if want is None or (axis == 0 and not check_batch_dim):
                    continue
                if got != want:
                    raise LLCError(f"{source}: array '{s.name}' has shape {_fmt_shape(a.shape)}, model input expects "
                                   f"{_fmt_dims(s.shape)} (dim {axis} must be {want}); fix the data")
        if s.dtype is not None and a.dtype != s.dtype:
            raise LLCError(f"{source}: array '{s.name}' has dtype {a.dtype}, model input expects {s.dtype}; "
                           f"cast it with .astype(np.{s.dtype})")
    for k, a in arrays.items():
        if a.dtype.kind in "fc":
            bad = int(np.count_nonzero(~np.isfinite(a)))
            if bad:
                raise LLCError(f"{source}: array '{k}' contains NaN/Inf ({bad} values); clean or drop those samples")
    sizes = {k: int(a.shape[0]) for k, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise LLCError(f"{source}: arrays have different batch sizes ({listing}); "
                       "all arrays must share the leading (batch) dimension")
    if sizes and next(iter(sizes.values())) == 0:
        raise LLCError(f"{source}: arrays have 0 samples; provide data")


def _to_batch(arrays: dict[str, np.ndarray]) -> Batch:
    inputs = {k: v for k, v in arrays.items() if k != LABELS}
    return Batch(inputs=inputs, labels=arrays.get(LABELS))


def validate_dataset(ds: Dataset, model: onnx.ModelProto) -> None:
    """Re-check every batch of ``ds`` against ``model`` (e.g. a candidate with the same inputs)."""
    specs = model_inputs(model)
    for i, b in enumerate(ds.batches):
        arrays = dict(b.inputs)
        if b.labels is not None:
            arrays[LABELS] = b.labels
        validate_arrays(arrays, specs, f"{ds.source}[batch {i}]")


# ---------------------------------------------------------------------------------------------- load
def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("not an .npz archive")
            return {k: z[k] for k in z.files}
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LLCError(f"{path}: cannot read as .npz ({reason}); save the data with numpy.savez") from None


def import_object(spec: str):
    """Import ``"module:attr"`` (attr may be dotted), with the current directory on ``sys.path``."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise LLCError(f"{spec}: cannot import module '{module_name}' ({type(exc).__name__}: {exc}); "
                       "check the module is in the current directory or on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LLCError(f"{spec}: module '{module_name}' has no attribute '{attr}'; check the name")
        obj = getattr(obj, part)
    return obj


def is_object_spec(spec: str) -> bool:
    return not os.path.exists(spec) and bool(_OBJECT_SPEC.match(spec))


def _static_batch(specs: list[_InputSpec]) -> int | None:
    dims = {s.shape[0] if s.shape else None for s in specs}
    return dims.pop() if len(dims) == 1 and None not in dims else None


def _batches_from_arrays(arrays: dict[str, np.ndarray], batch_size: int, drop_last: bool = False) -> list[Batch]:
    n = int(next(iter(arrays.values())).shape[0])
    if drop_last:
        n = (n // batch_size) * batch_size
    return [_to_batch({k: v[i:i + batch_size] for k, v in arrays.items()}) for i in range(0, n, batch_size)]


def _sample_dataset(arrays, source, batch_size, indices, fixed_batch=False) -> Dataset:
    ds = Dataset(_batches_from_arrays(arrays, batch_size, fixed_batch), source, indices=indices, unit="sample",
                 batch_size=batch_size, arrays=arrays, fixed_batch=fixed_batch)
    if not ds.batches:
        raise LLCError(f"{source}: {len(indices)} samples but the model has a fixed batch size of {batch_size}; "
                       f"provide at least {batch_size} samples per part or export the model with a dynamic batch dim")
    return ds


def _load_npz(path: str, specs, batch_size: int) -> Dataset:
    arrays = _read_npz(path)
    validate_arrays(arrays, specs, path, check_batch_dim=False)
    n = int(next(iter(arrays.values())).shape[0])
    static = _static_batch(specs)
    if static is not None:
        batch_size = static
        usable = (n // static) * static
        if usable == 0:
            raise LLCError(f"{path}: {n} samples but the model has a fixed batch size of {static}; "
                           f"provide at least {static} samples or export the model with a dynamic batch dim")
        arrays = {k: v[:usable] for k, v in arrays.items()}
        n = usable
    return _sample_dataset(arrays, path, batch_size, np.arange(n), fixed_batch=static is not None)


def _load_dir(path: str, specs) -> Dataset:
    files = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
    if not files:
        raise LLCError(f"{path}: directory has no .npz files; put one .npz per batch in it")
    batches = []
    for f in files:
        full = os.path.join(path, f)
        arrays = _read_npz(full)
        validate_arrays(arrays, specs, full)
        batches.append(_to_batch(arrays))
    return Dataset(batches, path, unit="batch")


def _load_reader(spec: str, specs) -> Dataset:
    obj = import_object(spec)
    if isinstance(obj, type) or (not hasattr(obj, "get_next") and callable(obj)):
        try:
            obj = obj()
        except Exception as exc:
            raise LLCError(f"{spec}: calling it to create the data reader failed ({type(exc).__name__}: {exc}); "
                           "it must be a reader, a class or a zero-argument factory") from None
    if not callable(getattr(obj, "get_next", None)):
        raise LLCError(f"{spec}: not a CalibrationDataReader (no get_next() method); "
                       "give an object with get_next() returning a dict of arrays, or None at the end")
    batches = []
    while True:
        item = obj.get_next()
        if item is None:
            break
        source = f"{spec}[batch {len(batches)}]"
        if not isinstance(item, dict):
            raise LLCError(f"{source}: get_next() returned {type(item).__name__}, expected a dict of arrays or None")
        arrays = {str(k): np.asarray(v) for k, v in item.items()}
        validate_arrays(arrays, specs, source)
        batches.append(_to_batch(arrays))
    if not batches:
        raise LLCError(f"{spec}: the data reader returned no batches; get_next() must return dicts before None")
    return Dataset(batches, spec, unit="batch")


def load_dataset(spec: str, model: onnx.ModelProto, batch_size: int = 64) -> Dataset:
    """Load ``spec`` (``.npz`` file, directory of ``.npz`` batches, or ``"module:attr"`` reader; see the
    module docstring) and validate it against ``model``'s graph inputs."""
    spec = os.fspath(spec)
    if batch_size < 1:
        raise LLCError(f"--batch-size {batch_size}: must be ≥ 1")
    specs = model_inputs(model)
    if os.path.isdir(spec):
        return _load_dir(spec, specs)
    if os.path.isfile(spec):
        return _load_npz(spec, specs, batch_size)
    if is_object_spec(spec):
        return _load_reader(spec, specs)
    raise LLCError(f"{spec}: no such file or directory; give a .npz file, a directory of .npz files or module:attr")


# --------------------------------------------------------------------------------------------- split
def _split_counts(n: int, holdout: float, source: str, unit: str) -> int:
    if not 0.0 < holdout < 1.0:
        raise LLCError(f"holdout {holdout}: must be between 0 and 1 (exclusive)")
    n_held = round(holdout * n)
    if n_held == 0 or n_held == n:
        part = "held-out" if n_held == 0 else "calibration"
        raise LLCError(f"{source}: splitting {n} {unit}s with holdout={holdout} leaves the {part} part empty; "
                       "provide more data or change the holdout fraction")
    return n_held


def split_dataset(ds: Dataset, holdout: float = 0.5, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into disjoint ``(calibration, held_out)`` parts.

    Rule: ``perm = numpy.random.default_rng(seed).permutation(n)``; the first ``round(holdout * n)``
    entries of ``perm`` (Python ``round``, i.e. half to even) go to held-out, the rest to calibration;
    inside each part the indices are sorted (source order kept). For a single ``.npz`` the units are
    samples and each part is re-batched with the dataset's batch size; for a directory / reader the units
    are whole batches. Either part being empty is an :class:`LLCError`. ``Dataset.indices`` of each part
    holds the source indices it took.
    """
    if ds.unit == "sample" and ds._arrays is not None:
        n = int(next(iter(ds._arrays.values())).shape[0])
        n_held = _split_counts(n, holdout, ds.source, "sample")
        perm = np.random.default_rng(seed).permutation(n)
        held_idx, calib_idx = np.sort(perm[:n_held]), np.sort(perm[n_held:])
        parts = []
        for idx in (calib_idx, held_idx):
            arrays = {k: v[idx] for k, v in ds._arrays.items()}
            parts.append(_sample_dataset(arrays, ds.source, ds.batch_size, ds.indices[idx], ds.fixed_batch))
        return parts[0], parts[1]
    n = len(ds.batches)
    n_held = _split_counts(n, holdout, ds.source, "batch")
    perm = np.random.default_rng(seed).permutation(n)
    held_idx, calib_idx = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    calib = Dataset([ds.batches[i] for i in calib_idx], ds.source, indices=ds.indices[calib_idx], unit="batch")
    held = Dataset([ds.batches[i] for i in held_idx], ds.source, indices=ds.indices[held_idx], unit="batch")
    return calib, held


def load_split(calib_spec: str, held_spec: str, model: onnx.ModelProto, batch_size: int = 64) -> tuple[Dataset, Dataset]:
    """Load explicit calibration and held-out data (two specs) as ``(calibration, held_out)``."""
    return load_dataset(calib_spec, model, batch_size), load_dataset(held_spec, model, batch_size)
