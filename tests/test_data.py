import textwrap

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.calib.data import Dataset, load_dataset, load_split, split_dataset, validate_dataset
from llc_onnx.errors import LLCError


def two_input_model(batch="N"):
    """x: float32 [batch, 3, 4], mask: int64 [batch, 'T'] -> y [batch, 3]"""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("ReduceMean", ["xw", "axes"], ["y"], keepdims=0)]
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, [batch, "T"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], [w, axes])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _arrays(n=10, t=7):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 3, 4)).astype(np.float32), "mask": np.ones((n, t), np.int64),
            "labels": np.arange(n) % 3}


def test_npz_batches_and_seeded_split(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, **_arrays(10))
    ds = load_dataset(str(p), two_input_model(), batch_size=4)
    assert [b.size for b in ds.batches] == [4, 4, 2] and ds.n_samples == 10 and ds.source == str(p)
    np.testing.assert_array_equal(ds.batches[1].labels, np.arange(4, 8) % 3)
    assert set(ds.batches[0].inputs) == {"x", "mask"}
    calib, held = split_dataset(ds, holdout=0.3, seed=7)
    perm = np.random.default_rng(7).permutation(10)
    np.testing.assert_array_equal(held.indices, np.sort(perm[:3]))
    np.testing.assert_array_equal(calib.indices, np.sort(perm[3:]))
    assert set(held.indices).isdisjoint(calib.indices) and set(held.indices) | set(calib.indices) == set(range(10))
    assert (held.n_samples, calib.n_samples) == (3, 7) and [b.size for b in calib.batches] == [4, 3]
    # the held-out samples really are the selected ones
    x_all = _arrays(10)["x"]
    np.testing.assert_array_equal(np.concatenate([b.inputs["x"] for b in held.batches]), x_all[held.indices])
    again = split_dataset(ds, holdout=0.3, seed=7)
    np.testing.assert_array_equal(again[1].indices, held.indices)
    assert not np.array_equal(split_dataset(ds, holdout=0.3, seed=8)[1].indices, held.indices)
    with pytest.raises(LLCError) as e:
        split_dataset(ds, holdout=0.01)
    assert str(e.value) == (f"{p}: splitting 10 samples with a held-out fraction of 0.01 leaves the held-out part "
                            "empty; provide more data or change the fraction")


def test_directory_of_batches_splits_by_batch(tmp_path):
    d = tmp_path / "batches"
    d.mkdir()
    for i, n in enumerate([3, 5, 2, 4]):
        a = _arrays(n)
        a["labels"] = np.full(n, i)
        np.savez(d / f"b{i:02d}.npz", **a)
    ds = load_dataset(str(d), two_input_model())
    assert [b.size for b in ds.batches] == [3, 5, 2, 4] and ds.n_samples == 14
    calib, held = split_dataset(ds, holdout=0.5, seed=1)
    perm = np.random.default_rng(1).permutation(4)
    assert [int(b.labels[0]) for b in held.batches] == sorted(perm[:2].tolist())
    assert [int(b.labels[0]) for b in calib.batches] == sorted(perm[2:].tolist())


def test_reader_object_class_and_factory(tmp_path, monkeypatch):
    (tmp_path / "myreader.py").write_text(textwrap.dedent("""
        import numpy as np
        class Reader:
            def __init__(self):
                self.items = iter([{"x": np.zeros((2, 3, 4), np.float32), "mask": np.ones((2, 5), np.int64),
                                    "labels": np.array([0, 1])} for _ in range(3)])
            def get_next(self):
                return next(self.items, None)
        reader = Reader()
        def make():
            return Reader()
        class Broken:
            def get_next(self):
                return {"x": np.zeros((2, 3, 4), np.float32), "labels": np.array([0, 1])}
    """))
    monkeypatch.chdir(tmp_path)
    for spec in ("myreader:reader", "myreader:Reader", "myreader:make"):
        ds = load_dataset(spec, two_input_model())
        assert [b.size for b in ds.batches] == [2, 2, 2] and ds.source == spec
    with pytest.raises(LLCError) as e:
        load_dataset("myreader:Broken", two_input_model())
    assert str(e.value) == ("myreader:Broken[batch 0]: missing array 'mask' for graph input 'mask' "
                            "(model inputs: 'x', 'mask'); add it, e.g. np.savez(path, mask=..., labels=...)")


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("mask"), "missing array 'mask' for graph input 'mask' (model inputs: 'x', 'mask'); "
                              "add it, e.g. np.savez(path, mask=..., labels=...)"),
    (lambda a: a.update(extra=np.zeros(10)), "array 'extra' is not a graph input of the model "
                                             "(inputs: 'x', 'mask', plus 'labels' and 'groups'); remove or rename it"),
    (lambda a: a.update(x=np.zeros((10, 12), np.float32)),
     "array 'x' has shape (10, 12) (rank 2), model input expects rank 3 [?, 3, 4]; reshape the data"),
    (lambda a: a.update(x=np.zeros((10, 3, 5), np.float32)),
     "array 'x' has shape (10, 3, 5), model input expects [?, 3, 4] (dim 2 must be 4); fix the data"),
    (lambda a: a.update(x=a["x"].astype(np.float64)),
     "array 'x' has dtype float64, model input expects float32; cast it with .astype(np.float32)"),
    (lambda a: a.update(mask=a["mask"].astype(np.float32)),
     "array 'mask' has dtype float32, model input expects int64; cast it with .astype(np.int64)"),
    (lambda a: a["x"].__setitem__((2, 0, 0), np.nan),
     "array 'x' contains NaN/Inf (1 values); clean or drop those samples"),
    (lambda a: a.update(labels=np.zeros(9, np.int64)),
     "arrays have different batch sizes (x: 10, mask: 10, labels: 9); "
     "all arrays must share the leading (batch) dimension"),
])
def test_validation_errors(tmp_path, change, message):
    a = _arrays(10)
    change(a)
    p = tmp_path / "bad.npz"
    np.savez(p, **a)
    with pytest.raises(LLCError) as e:
        load_dataset(str(p), two_input_model())
    assert str(e.value) == f"{p}: {message}"


def test_not_npz_and_missing(tmp_path):
    p = tmp_path / "x.npz"
    p.write_text("nope")
    with pytest.raises(LLCError) as e:
        load_dataset(str(p), two_input_model())
    assert str(e.value).startswith(f"{p}: cannot read as .npz (") and str(e.value).endswith(
        "); save the data with numpy.savez")
    with pytest.raises(LLCError) as e:
        load_dataset(str(tmp_path / "missing.npz"), two_input_model())
    assert str(e.value) == (f"{tmp_path / 'missing.npz'}: no such file or directory; "
                            "give a .npz file, a directory of .npz files or module:attr")


def test_static_batch_dim_and_load_split(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, **_arrays(10))
    ds = load_dataset(str(p), two_input_model(batch=4), batch_size=64)
    assert [b.size for b in ds.batches] == [4, 4]  # remainder of 2 dropped
    calib, held = split_dataset(load_dataset(str(p), two_input_model(batch=2)), holdout=0.5)
    assert [b.size for b in calib.batches] == [2, 2] and [b.size for b in held.batches] == [2, 2]  # 5 -> 4 each
    q = tmp_path / "h.npz"
    np.savez(q, **_arrays(3))
    calib, held = load_split(str(p), str(q), two_input_model(), batch_size=5)
    assert (calib.n_samples, held.n_samples, len(calib)) == (10, 3, 2)
    validate_dataset(held, two_input_model())
    with pytest.raises(LLCError) as e:
        validate_dataset(held, two_input_model(batch=4))
    assert str(e.value) == (f"{q}[batch 0]: array 'x' has shape (3, 3, 4), model input expects [4, 3, 4] "
                            "(dim 0 must be 4); fix the data")
    assert isinstance(Dataset([], "s").n_samples, int)


def test_sample_subset_takes_whole_seeded_batches_and_cuts_the_last(tmp_path):
    """The CET curvature's sub-sample: whole batches in a seeded random order, the last cut to the count, kept
    in source order; the samples are real rows of the data; a static batch dim is never cut."""
    from llc_onnx.calib.data import sample_subset

    p = tmp_path / "d.npz"
    arrays = _arrays(10)
    np.savez(p, **arrays)
    ds = load_dataset(str(p), two_input_model(), batch_size=4)  # batches [0:4], [4:8], [8:10]
    sub = sample_subset(ds, 5, seed=3)
    order = np.random.default_rng(3).permutation(3).tolist()
    first, second = order[0], order[1]
    sizes = {0: 4, 1: 4, 2: 2}
    assert sub.n_samples == 5 and len(sub.batches) == 2
    # the second chosen batch is cut to what is left; both appear in source order
    expect = {first: sizes[first], second: 5 - sizes[first]}
    starts = {0: 0, 1: 4, 2: 8}
    for b, i in zip(sub.batches, sorted(expect)):
        assert b.size == expect[i]
        np.testing.assert_array_equal(b.inputs["x"], arrays["x"][starts[i]:starts[i] + expect[i]])
        np.testing.assert_array_equal(b.labels, arrays["labels"][starts[i]:starts[i] + expect[i]])
    assert sample_subset(ds, 5, seed=3).batches[0].inputs["x"].tobytes() == sub.batches[0].inputs["x"].tobytes()
    assert sample_subset(ds, 10) is ds and sample_subset(ds, 100) is ds
    fixed = load_dataset(str(p), two_input_model(batch=4), batch_size=64)  # static batch 4: never cut
    assert all(b.size == 4 for b in sample_subset(fixed, 5).batches) and sample_subset(fixed, 5).n_samples == 8
    with pytest.raises(LLCError, match="at least 1"):
        sample_subset(ds, 0)
