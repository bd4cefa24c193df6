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
* from Python also a :class:`Dataset`, such a reader object itself, or an iterable of such dicts (one per
  batch).

Streaming: a directory and a reader need not fit in memory. Their batches are :class:`FileBatch` objects —
the file's path, sample count and group ids — whose arrays are read from disk each time a pass reaches them
(the last two batches read are kept), so a split holds only references and a pass holds one batch at a time.
A reader (or a Python iterator) is read once, batch by batch, into ``.npz`` files in a temporary directory
(under ``$TMPDIR``; removed when no dataset refers to it any more). A single ``.npz`` file and a list of dicts
are held in memory (a ``.npz`` is re-batched by sample, which needs all of it).

Besides the graph inputs, two arrays have a meaning: ``labels`` (the task loss's targets) and ``groups``
(one id per sample, integers or strings): samples with the same id are *not independent* — augmented views
of one photo, spans of one document. Splits never separate a group (:func:`split_dataset`,
:func:`fit_measure_split`) and standard errors are clustered by group (``calib.noise``).

Splits (the statistical roles, see ``flows.context``): *test* (the verdict, once), *validation* (steers
back-off), and the calibration rest, cut into *fit* (chooses) and *measure* (predicts and measures) parts.

Every batch is validated against the model's graph inputs when the data is loaded (a streamed batch is read
once for it); a problem raises a one-line :class:`~llc_onnx.errors.LLCError` naming the file (``dir/b.npz``,
``module:attr[batch 3]``), the tensor and the fix. A batch file that changes after it was validated is an error
when it is read again. Labels are not required here; the loss checks them (:mod:`llc_onnx.calib.losses`).
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import shutil
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import tempdirs
from ..errors import LLCError, first_line

LABELS = "labels"
GROUPS = "groups"
RESERVED = (LABELS, GROUPS)  # arrays that are not graph inputs
_OBJECT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class Batch:
    inputs: dict[str, np.ndarray]   # graph input name -> array with leading batch dim
    labels: np.ndarray | None
    groups: np.ndarray | None = None  # one cluster id per sample (int64), None: every sample its own

    @property
    def size(self) -> int:
        """Number of samples (leading dim)."""
        arr = next(iter(self.inputs.values()), self.labels)
        return 0 if arr is None else int(arr.shape[0])


class _SpillDir:
    """A temporary directory of batch files written here (from a reader or an iterator); removed when the last
    :class:`FileBatch` that refers to it is gone. A copy sent to another process does not own it."""

    def __init__(self):
        self.path = tempdirs.make("data")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def __reduce__(self):
        return (_Borrowed, (self.path,))


class _Borrowed:
    """A spill directory owned by another process."""

    def __init__(self, path: str):
        self.path = path


class FileBatch:
    """A batch stored in one ``.npz`` file, read when used (see "Streaming" in the module doc): ``inputs`` and
    ``labels`` come from the file, ``groups`` and :attr:`size` are kept from the validating read."""

    __slots__ = ("path", "_size", "groups", "_stamp", "_owner")

    def __init__(self, path: str, size: int, groups: np.ndarray | None, owner=None):
        self.path = path
        self._size = int(size)
        self.groups = groups
        st = os.stat(path)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._owner = owner  # keeps a spill directory alive

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    @property
    def size(self) -> int:
        return self._size

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the file (the last two files read are kept in memory)."""
        hit = _READ_CACHE.get(self.path)
        if hit is not None and hit[0] == self._stamp:
            _READ_CACHE.move_to_end(self.path)
            return hit[1]
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise LLCError(f"{self.path}: cannot read the batch file any more ({exc.strerror}); keep the data in "
                           "place until the run ends") from None
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise LLCError(f"{self.path}: the batch file changed after it was validated; do not modify the data "
                           "while llc-onnx runs")
        arrays = _read_npz(self.path)
        _READ_CACHE[self.path] = (self._stamp, arrays)
        while len(_READ_CACHE) > _READ_CACHE_BATCHES:
            _READ_CACHE.popitem(last=False)
        return arrays

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.arrays().items() if k not in RESERVED}

    @property
    def labels(self) -> np.ndarray | None:
        return self.arrays().get(LABELS)

    def __repr__(self) -> str:
        return f"FileBatch({self.path!r}, {self._size} samples)"


_READ_CACHE: OrderedDict = OrderedDict()  # path -> (stamp, arrays) of the last batch files read
_READ_CACHE_BATCHES = 2


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

    @property
    def has_groups(self) -> bool:
        return bool(self.batches) and all(b.groups is not None for b in self.batches)

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
        if k not in RESERVED and k not in names:
            raise LLCError(f"{source}: array '{k}' is not a graph input of the model (inputs: {listed}, plus 'labels' "
                           "and 'groups'); remove or rename it")
    if GROUPS in arrays:
        g = arrays[GROUPS]
        if not isinstance(g, np.ndarray) or g.ndim != 1 or g.dtype.kind not in "iuU":
            raise LLCError(f"{source}: array 'groups' must be 1-D with one integer or string id per sample "
                           f"(got {getattr(g, 'dtype', type(g).__name__)} shape {getattr(g, 'shape', '?')}); "
                           "e.g. the index of the photo each view was made from")
    for k, a in arrays.items():
        if k == GROUPS and isinstance(a, np.ndarray) and a.dtype.kind == "U":
            continue
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
    inputs = {k: v for k, v in arrays.items() if k not in RESERVED}
    return Batch(inputs=inputs, labels=arrays.get(LABELS), groups=arrays.get(GROUPS))


def _batch_arrays(b: Batch | FileBatch) -> dict[str, np.ndarray]:
    if isinstance(b, FileBatch):
        return dict(b.arrays())
    arrays = dict(b.inputs)
    if b.labels is not None:
        arrays[LABELS] = b.labels
    if b.groups is not None:
        arrays[GROUPS] = b.groups
    return arrays


def _group_ids(ds: "Dataset") -> None:
    """Replace string/int group ids by dense int64 codes, consistently across the dataset's batches (and its
    sample arrays), so that a group id means the same thing in every batch."""
    if not ds.has_groups:
        if any(b.groups is not None for b in ds.batches):
            raise LLCError(f"{ds.source}: some batches have a 'groups' array and others do not; give it in all or none")
        return
    _, codes = np.unique(np.concatenate([b.groups for b in ds.batches]), return_inverse=True)
    start = 0
    for b in ds.batches:
        b.groups = codes[start:start + b.size].astype(np.int64)
        start += b.size
    if ds._arrays is not None and GROUPS in ds._arrays:
        _, ds._arrays[GROUPS] = np.unique(ds._arrays[GROUPS], return_inverse=True)


def validate_dataset(ds: Dataset, model: onnx.ModelProto) -> None:
    """Re-check every batch of ``ds`` against ``model`` (e.g. a candidate with the same inputs)."""
    specs = model_inputs(model)
    for i, b in enumerate(ds.batches):
        validate_arrays(_batch_arrays(b), specs, f"{ds.source}[batch {i}]")


# ---------------------------------------------------------------------------------------------- load
def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("not an .npz archive")
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise LLCError(f"{path}: cannot read as .npz ({first_line(exc)}); save the data with numpy.savez") from None


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
    if static is not None and static < 1:
        raise LLCError(f"{path}: the model's inputs have a fixed batch dim of {static}; export the model with a "
                       "dynamic (or positive) batch dim")
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
        batches.append(_file_batch(full, arrays))
    return Dataset(batches, path, unit="batch")


def _file_batch(path: str, arrays: dict[str, np.ndarray], owner=None) -> FileBatch:
    """The streamed form of a validated batch: its file, sample count and group ids."""
    b = _to_batch(arrays)
    return FileBatch(path, b.size, b.groups, owner)


class _Spill:
    """Writes validated batches of a reader or an iterator to a temporary directory, one ``.npz`` each."""

    def __init__(self):
        self.dir: _SpillDir | None = None

    def add(self, index: int, arrays: dict[str, np.ndarray]) -> FileBatch:
        if self.dir is None:
            self.dir = _SpillDir()
        path = os.path.join(self.dir.path, f"batch_{index:07d}.npz")
        try:
            with open(path, "wb") as f:
                np.savez(f, **arrays)
        except OSError as exc:
            raise LLCError(f"{path}: cannot store a data batch on disk ({exc.strerror}); free space in $TMPDIR "
                           "or point TMPDIR to a larger disk") from None
        return _file_batch(path, arrays, self.dir)


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _as_arrays(item: dict, source: str) -> dict[str, np.ndarray]:
    """A batch dict's values as numpy arrays (a value numpy cannot make one array of is bad input)."""
    arrays = {}
    for k, v in item.items():
        try:
            arrays[str(k)] = np.asarray(v)
        except Exception as exc:  # e.g. ragged nested lists
            raise LLCError(f"{source}: value of '{k}' is not an array ({_one_line(exc)}); give numpy arrays") from None
    return arrays


def _load_reader(spec, specs) -> Dataset:
    obj = import_object(spec) if isinstance(spec, str) else spec
    spec = spec if isinstance(spec, str) else type(obj).__name__
    if isinstance(obj, type) or (not hasattr(obj, "get_next") and callable(obj)):
        try:
            obj = obj()
        except Exception as exc:
            raise LLCError(f"{spec}: calling it to create the data reader failed ({type(exc).__name__}: {exc}); "
                           "it must be a reader, a class or a zero-argument factory") from None
    if not callable(getattr(obj, "get_next", None)):
        raise LLCError(f"{spec}: not a CalibrationDataReader (no get_next() method); "
                       "give an object with get_next() returning a dict of arrays, or None at the end")
    return _load_iterable(iter(obj.get_next, None), specs, spec, "get_next() returned",
                          "get_next() must return dicts before None", calls="get_next()")


def _load_iterable(items, specs, source: str, got: str = "got",
                   fix: str = "give at least one dict of arrays", calls: str = "iterating the data") -> Dataset:
    """One batch per dict of ``items`` (a reader's ``get_next()`` until None, or any iterable), validated. A
    list/tuple of dicts stays in memory; any other iterable (a reader, a generator) is streamed to disk."""
    batches, spill = [], None if isinstance(items, (list, tuple)) else _Spill()
    iterator = iter(items)
    for i in itertools.count():
        where = f"{source}[batch {i}]"
        try:
            item = next(iterator)
        except StopIteration:
            break
        except Exception as exc:  # the user's iterable failed
            raise LLCError(f"{where}: {calls} raised {type(exc).__name__}: {_one_line(exc)}; fix the data "
                           "source") from None
        if not isinstance(item, dict):
            raise LLCError(f"{where}: {got} {type(item).__name__}, expected a dict of arrays per batch")
        arrays = _as_arrays(item, where)
        validate_arrays(arrays, specs, where)
        batches.append(_to_batch(arrays) if spill is None else spill.add(i, arrays))
    if not batches:
        raise LLCError(f"{source}: no batches; {fix}")
    return Dataset(batches, source, unit="batch")


def load_dataset(spec, model: onnx.ModelProto, batch_size: int = 64) -> Dataset:
    """Load ``spec`` and validate it against ``model``'s graph inputs: a ``.npz`` file, a directory of ``.npz``
    batches, a ``"module:attr"`` reader, or (from Python) a :class:`Dataset`, a reader object or an iterable of
    dicts (see the module docstring). Group ids become dense int64 codes."""
    if batch_size < 1:
        raise LLCError(f"data.batch_size {batch_size}: must be ≥ 1")
    specs = model_inputs(model)
    if isinstance(spec, Dataset):
        ds = Dataset(list(spec.batches), spec.source, indices=spec.indices, unit=spec.unit,
                     batch_size=spec.batch_size, arrays=spec._arrays, fixed_batch=spec.fixed_batch)
        for i, b in enumerate(ds.batches):
            validate_arrays(_batch_arrays(b), specs, f"{ds.source}[batch {i}]")
    elif isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            ds = _load_dir(spec, specs)
        elif os.path.isfile(spec):
            ds = _load_npz(spec, specs, batch_size)
        elif is_object_spec(spec):
            ds = _load_reader(spec, specs)
        else:
            raise LLCError(f"{spec}: no such file or directory; give a .npz file, a directory of .npz files or "
                           "module:attr")
    elif callable(getattr(spec, "get_next", None)):
        ds = _load_reader(spec, specs)
    elif hasattr(spec, "__iter__"):
        ds = _load_iterable(spec, specs, "data")
    else:
        raise LLCError(f"data: {type(spec).__name__} is not a data source; give a path, a Dataset, a "
                       "CalibrationDataReader or an iterable of dicts of arrays")
    _group_ids(ds)
    return ds


# --------------------------------------------------------------------------------------------- split
def _split_counts(n: int, fraction: float, source: str, unit: str, part: str = "held-out") -> int:
    if not 0.0 < fraction < 1.0:
        raise LLCError(f"{part} fraction {fraction}: must be between 0 and 1 (exclusive)")
    k = round(fraction * n)
    if k == 0 or k == n:
        empty = part if k == 0 else "remaining"
        raise LLCError(f"{source}: splitting {n} {unit}s with a {part} fraction of {fraction} leaves the {empty} "
                       "part empty; provide more data or change the fraction")
    return k


def _unit_ids(ds: Dataset) -> tuple[np.ndarray, str]:
    """Per sample of a sample-unit dataset, the unit a split moves as a whole: its group (when the data has
    ``groups``) or the sample itself; and the unit's name."""
    n = int(next(iter(ds._arrays.values())).shape[0])
    if GROUPS in ds._arrays:
        return np.asarray(ds._arrays[GROUPS]), "group"
    return np.arange(n), "sample"


def _sample_split(ds: Dataset, fraction: float, seed: int, part: str) -> tuple[Dataset, Dataset]:
    units, unit = _unit_ids(ds)
    uniq = np.unique(units)
    n_part = _split_counts(len(uniq), fraction, ds.source, unit, part)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    chosen = np.isin(units, uniq[np.sort(perm[:n_part])])
    out = []
    for mask in (~chosen, chosen):
        idx = np.flatnonzero(mask)
        arrays = {k: v[idx] for k, v in ds._arrays.items()}
        out.append(_sample_dataset(arrays, ds.source, ds.batch_size, ds.indices[idx], ds.fixed_batch))
    return out[0], out[1]


def _groups_apart(ds: Dataset, a_idx, b_idx) -> None:
    """A split of ``ds`` by whole batches into batch indices ``a_idx`` / ``b_idx`` must not put one group on both
    sides (its samples are not independent): a one-line :class:`LLCError` naming the group when it does."""
    if not ds.has_groups or not len(a_idx) or not len(b_idx):
        return
    a = set(np.concatenate([ds.batches[i].groups for i in a_idx]).tolist())
    b = set(np.concatenate([ds.batches[i].groups for i in b_idx]).tolist())
    if a & b:
        raise LLCError(f"{ds.source}: group {min(a & b)} has samples in several batches, so a split by batch "
                       "would put one group on both sides; keep each group in one batch file, or give the data "
                       "as one .npz")


def _batch_split(ds: Dataset, fraction: float, seed: int, part: str) -> tuple[Dataset, Dataset]:
    n = len(ds.batches)
    n_part = _split_counts(n, fraction, ds.source, "batch", part)
    perm = np.random.default_rng(seed).permutation(n)
    part_idx, rest_idx = np.sort(perm[:n_part]), np.sort(perm[n_part:])
    _groups_apart(ds, part_idx, rest_idx)
    rest = Dataset([ds.batches[i] for i in rest_idx], ds.source, indices=ds.indices[rest_idx], unit="batch")
    held = Dataset([ds.batches[i] for i in part_idx], ds.source, indices=ds.indices[part_idx], unit="batch")
    return rest, held


def split_dataset(ds: Dataset, holdout: float = 0.5, seed: int = 0, part: str = "held-out"
                  ) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into disjoint ``(rest, part)`` with ``part`` holding a fraction ``holdout`` of the units.

    Rule: ``perm = numpy.random.default_rng(seed).permutation(n_units)``; the first ``round(holdout * n)``
    units of ``perm`` (Python ``round``, half to even) go to ``part``, the rest stay; inside each part the
    source order is kept. Units: for a single ``.npz`` the samples — or the groups, when the data has a
    ``groups`` array, so that correlated samples never straddle the split — and each part is re-batched with
    the dataset's batch size; for a directory / reader whole batches (a group split across batches is then an
    error). Either part being empty is an :class:`LLCError`. ``Dataset.indices`` holds the source indices.
    """
    if ds.unit == "sample" and ds._arrays is not None:
        return _sample_split(ds, holdout, seed, part)
    return _batch_split(ds, holdout, seed, part)


def fit_measure_split(calib: Dataset, measure_samples: int | None = None, seed: int = 0
                      ) -> tuple[Dataset, Dataset]:
    """(fit, measure) parts of the calibration split. Without groups: whole batches in a seeded random order go
    to the measure part — half of them, or as many as hold ``measure_samples`` samples — and the rest to the fit
    part (at least one batch each; both keep the source order). With groups (single-``.npz`` data): half the
    groups (or enough to hold ``measure_samples``) by the same seeded rule, so no group is on both sides; whole
    batches with groups that straddle two batches are an error, as in :func:`split_dataset`. A one-batch split
    gives the same batch to both (in-sample)."""
    batches = calib.batches
    if len(batches) < 2:
        return calib, calib
    if calib.has_groups and calib.unit == "sample" and calib._arrays is not None:
        units, _ = _unit_ids(calib)
        n_units = len(np.unique(units))
        if n_units >= 2:
            frac = 0.5 if measure_samples is None else min(max(measure_samples / max(calib.n_samples, 1),
                                                                1 / n_units), (n_units - 1) / n_units)
            k = min(max(round(frac * n_units), 1), n_units - 1)
            fit, measure = _sample_split(calib, k / n_units, seed, "measure")
            fit.source = f"{calib.source} (fit part: {fit.n_samples} samples)"
            measure.source = f"{calib.source} (measure part: {measure.n_samples} samples)"
            return fit, measure
    order = np.random.default_rng(seed).permutation(len(batches))
    if measure_samples is None:
        k = (len(batches) + 1) // 2
    else:
        k, count = 0, 0
        while k < len(batches) - 1 and count < measure_samples:
            count += batches[order[k]].size
            k += 1
        k = max(k, 1)
    chosen = set(order[:k].tolist())
    _groups_apart(calib, sorted(chosen), [i for i in range(len(batches)) if i not in chosen])
    measure = Dataset(batches=[b for i, b in enumerate(batches) if i in chosen],
                      source=f"{calib.source} (measure part: {k} of {len(batches)} batches)")
    fit = Dataset(batches=[b for i, b in enumerate(batches) if i not in chosen],
                  source=f"{calib.source} (fit part: {len(batches) - k} of {len(batches)} batches)")
    return fit, measure


def sample_subset(ds: Dataset, n_samples: int, seed: int = 0) -> Dataset:
    """At most ``n_samples`` samples of ``ds`` for a pass that needs only a sub-sample (the CET curvature):
    whole batches in a seeded random order until they hold ``n_samples``, the last one cut to fit (not cut for a
    model with a static batch dimension), kept in source order. ``ds`` itself when it holds no more than that."""
    if n_samples < 1:
        raise LLCError(f"{ds.source}: a sub-sample of {n_samples} samples; use at least 1")
    if ds.n_samples <= n_samples:
        return ds
    order = np.random.default_rng(seed).permutation(len(ds.batches))
    chosen: dict[int, Batch | FileBatch] = {}
    count = 0
    for i in order:
        if count >= n_samples:
            break
        b = ds.batches[i]
        take = min(b.size, n_samples - count)
        if take < b.size and not ds.fixed_batch:
            b = _to_batch({k: v[:take] for k, v in _batch_arrays(b).items()})
        chosen[int(i)] = b
        count += b.size
    keep = sorted(chosen)
    return Dataset([chosen[i] for i in keep], f"{ds.source} (sub-sample: {count} samples)",
                   indices=np.arange(len(keep)), unit="batch")


def load_split(calib_spec: str, held_spec: str, model: onnx.ModelProto, batch_size: int = 64) -> tuple[Dataset, Dataset]:
    """Load explicit calibration and held-out data (two specs) as ``(calibration, held_out)``."""
    return load_dataset(calib_spec, model, batch_size), load_dataset(held_spec, model, batch_size)
