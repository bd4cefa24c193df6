"""Calibration data that streams from disk (``calib.data``, "Streaming"): a directory of ``.npz`` batches and a
``CalibrationDataReader`` are held as file references and read when a pass reaches them, so data larger than
memory works; every batch is still validated (one-line errors naming the file), and the numbers are the same as
with the batches in memory."""

import gc
import os
import pickle
import tracemalloc

import numpy as np
import pytest

import llc_onnx
from _models import torch_threads, write_mlp_files
from llc_onnx.calib import data as data_mod
from llc_onnx.calib.data import FileBatch, fit_measure_split, load_dataset, split_dataset
from llc_onnx.config import CriterionConfig, DeviceConfig, OptimizeConfig, QuantConfig
from llc_onnx.errors import LLCError
from test_data import _arrays, two_input_model

MB = 1 << 20


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def _write_dir(d, sizes, seed=0):
    d.mkdir()
    for i, n in enumerate(sizes):
        a = _arrays(n)
        a["labels"] = np.full(n, i)
        np.savez(d / f"b{i:02d}.npz", **a)
    return d


def test_directory_batches_are_file_references_read_when_used(tmp_path):
    d = _write_dir(tmp_path / "batches", [3, 5, 2, 4])
    ds = load_dataset(str(d), two_input_model())
    assert all(isinstance(b, FileBatch) for b in ds.batches)
    assert [b.size for b in ds.batches] == [3, 5, 2, 4] and ds.n_samples == 14
    for i, b in enumerate(ds.batches):
        with np.load(d / f"b{i:02d}.npz") as z:
            np.testing.assert_array_equal(b.inputs["x"], z["x"])
            np.testing.assert_array_equal(b.labels, z["labels"])
        assert set(b.inputs) == {"x", "mask"}
    assert len(data_mod._READ_CACHE) <= 2  # at most the last two batches stay in memory
    calib, held = split_dataset(ds, holdout=0.5, seed=1)  # per split: references, not copies
    fit, meas = fit_measure_split(calib)
    assert all(isinstance(b, FileBatch) for part in (calib, held, fit, meas) for b in part.batches)


def test_a_batch_file_changed_or_removed_after_validation_is_an_error(tmp_path):
    d = _write_dir(tmp_path / "batches", [3, 4, 5])
    ds = load_dataset(str(d), two_input_model())
    data_mod._READ_CACHE.clear()
    a = _arrays(4)
    a["x"][0, 0, 0] = np.nan  # would have failed validation
    np.savez(d / "b01.npz", **a)
    with pytest.raises(LLCError, match=r"b01\.npz: the batch file changed after it was validated; do not modify"):
        ds.batches[1].inputs
    os.remove(d / "b02.npz")
    with pytest.raises(LLCError, match=r"b02\.npz: cannot read the batch file any more"):
        ds.batches[2].labels


def test_every_batch_of_a_directory_is_validated_with_its_file_named(tmp_path):
    d = _write_dir(tmp_path / "batches", [3, 4, 5])
    a = _arrays(4)
    a["x"][1, 2, 3] = np.inf
    np.savez(d / "b01.npz", **a)
    with pytest.raises(LLCError) as e:
        load_dataset(str(d), two_input_model())
    assert str(e.value) == f"{d / 'b01.npz'}: array 'x' contains NaN/Inf (1 values); clean or drop those samples"


class BigReader:
    """A CalibrationDataReader of ``n`` batches of ``mb`` MB each, made on the fly (never all in memory)."""

    def __init__(self, n=24, mb=2, bad=None):
        self.i, self.n, self.rows, self.bad = 0, n, mb * MB // (4 * 12), bad

    def get_next(self):
        if self.i >= self.n:
            return None
        rng = np.random.default_rng(self.i)
        x = rng.normal(size=(self.rows, 3, 4)).astype(np.float32)
        if self.i == self.bad:
            x = x.astype(np.float64)
        self.i += 1
        return {"x": x, "mask": np.ones((self.rows, 2), np.int64), "labels": np.zeros(self.rows, np.int64)}


def test_a_reader_larger_than_the_memory_it_may_use_is_streamed_to_disk():
    """24 batches of 2.3 MB (55 MB in all): loading, splitting and a full pass hold a few batches at a time (the
    reader's own float64 draw, the batch being validated or read, the last two read), never the whole data."""
    model = two_input_model()
    data_mod._READ_CACHE.clear()
    tracemalloc.start()
    try:
        ds = load_dataset(BigReader(), model)
        _, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        calib, held = split_dataset(ds, 0.25, seed=0)
        total = sum(float(b.inputs["x"].sum()) for part in (calib, held) for b in part.batches)
        _, pass_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds.batches) == 24 and all(isinstance(b, FileBatch) for b in ds.batches)
    assert load_peak < 14 * MB and pass_peak < 14 * MB, (load_peak / MB, pass_peak / MB)
    assert np.isfinite(total) and float(ds.batches[0].inputs["x"].sum()) == float(BigReader().get_next()["x"].sum())
    spill = os.path.dirname(ds.batches[0].path)
    assert os.path.isdir(spill) and len(os.listdir(spill)) == 24
    # a copy sent to another process (a worker) does not own the directory: dropping it removes nothing
    copy = pickle.loads(pickle.dumps(ds.batches))
    del copy
    gc.collect()
    assert os.path.isdir(spill)
    del ds, calib, held
    gc.collect()
    assert not os.path.exists(spill)  # the last reference gone: the temporary files are removed


def test_a_bad_reader_batch_names_the_batch():
    with pytest.raises(LLCError) as e:
        load_dataset(BigReader(n=5, mb=1, bad=3), two_input_model())
    assert str(e.value) == ("BigReader[batch 3]: array 'x' has dtype float64, model input expects float32; "
                            "cast it with .astype(np.float32)")


def test_a_generator_streams_and_a_list_stays_in_memory():
    model = two_input_model()
    items = [{k: v[i:i + 2] for k, v in _arrays(8).items()} for i in range(0, 8, 2)]
    listed = load_dataset(items, model)
    streamed = load_dataset((it for it in items), model)
    assert not any(isinstance(b, FileBatch) for b in listed.batches)
    assert all(isinstance(b, FileBatch) for b in streamed.batches)
    for a, b in zip(listed.batches, streamed.batches):
        np.testing.assert_array_equal(a.inputs["x"], b.inputs["x"])


def test_optimize_on_streamed_batches_writes_the_same_bytes_as_in_memory(tmp_path):
    model, data = write_mlp_files(tmp_path, n=320)
    with np.load(data) as z:
        arrays = {k: z[k] for k in z.files}
    batches = [{k: v[i:i + 40] for k, v in arrays.items()} for i in range(0, 320, 40)]
    d = tmp_path / "dir"
    d.mkdir()
    for i, b in enumerate(batches):
        np.savez(d / f"{i:03d}.npz", **b)
    cfg = OptimizeConfig(quant=QuantConfig(bits=(4, 8, "float")), device=DeviceConfig(threads=1),
                         criterion=CriterionConfig(allow_loss_increase=True))
    in_memory = llc_onnx.optimize(model, batches, cfg)
    from_dir = llc_onnx.optimize(model, str(d), cfg)
    assert from_dir.model.SerializeToString() == in_memory.model.SerializeToString()
    assert [c.to_dict() for c in from_dir.stages[0].candidates] == \
        [c.to_dict() for c in in_memory.stages[0].candidates]
