"""Tiny models and datasets shared by the flow / CLI tests (built with onnx.helper, opset 21, IR 10).

Every builder returns a plain ``onnx.ModelProto`` plus the float weights it used, so tests can recompute
things independently in numpy / pure torch. Datasets are ``.npz`` files with one array per graph input and
``labels``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def make(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m)
    return m


def mlp(seed: int = 0, d_in: int = 8, hidden: int = 16, classes: int = 4):
    """x[N, d_in] -> Gemm(transB=1, W1[hidden, d_in], b1) -> Relu -> MatMul(W2[hidden, classes]) -> Add(b2)
    -> logits.  Node names: 'fc1' (Gemm), 'fc2' (MatMul)."""
    rng = np.random.default_rng(seed)
    w = {"W1": (rng.normal(size=(hidden, d_in)) / np.sqrt(d_in)).astype(np.float32),
         "b1": (0.1 * rng.normal(size=hidden)).astype(np.float32),
         "W2": (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
         "b2": (0.1 * rng.normal(size=classes)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["z"], name="fc2"),
             helper.make_node("Add", ["z", "b2"], ["logits"], name="add")]
    m = make(nodes, [helper.make_tensor_value_info("x", F, ["N", d_in])],
             [helper.make_tensor_value_info("logits", F, ["N", classes])], w)
    return m, w


def mlp_forward(w, x):
    """numpy float64 forward of :func:`mlp` (logits)."""
    h = np.maximum(x @ w["W1"].T.astype(np.float64) + w["b1"], 0)
    return h @ w["W2"].astype(np.float64) + w["b2"]


def cnn(seed: int = 0, size: int = 6, ch: int = 4, classes: int = 3):
    """x[N, 1, size, size] -> Conv(W[ch, 1, 3, 3], pad 1, bias) -> Relu -> Flatten -> MatMul(Wf) -> logits.
    Node names: 'conv', 'fc'."""
    rng = np.random.default_rng(seed)
    w = {"Wc": (rng.normal(size=(ch, 1, 3, 3)) / 3).astype(np.float32),
         "bc": (0.1 * rng.normal(size=ch)).astype(np.float32),
         "Wf": (rng.normal(size=(ch * size * size, classes)) / np.sqrt(ch * size * size)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1),
             helper.make_node("MatMul", ["f", "Wf"], ["logits"], name="fc")]
    m = make(nodes, [helper.make_tensor_value_info("x", F, ["N", 1, size, size])],
             [helper.make_tensor_value_info("logits", F, ["N", classes])], w)
    return m, w


def shared(seed: int = 0, d: int = 6, classes: int = 3):
    """x[N, d] -> MatMul(W) 'mm1' -> Tanh -> MatMul(W) 'mm2' (same initializer) -> MatMul(Wo) 'out' -> logits."""
    rng = np.random.default_rng(seed)
    w = {"W": (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32),
         "Wo": (rng.normal(size=(d, classes)) / np.sqrt(d)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
             helper.make_node("Tanh", ["a"], ["t"], name="tanh"),
             helper.make_node("MatMul", ["t", "W"], ["b"], name="mm2"),
             helper.make_node("MatMul", ["b", "Wo"], ["logits"], name="out")]
    m = make(nodes, [helper.make_tensor_value_info("x", F, ["N", d])],
             [helper.make_tensor_value_info("logits", F, ["N", classes])], w)
    return m, w


def lowrank_mlp(seed: int = 0, d: int = 64, rank: int = 4, classes: int = 4, noise: float = 1e-3):
    """x[N, d] -> Gemm(transB=1, W[d, d] = rank-``rank`` matrix + ``noise``, b) 'big' -> Relu
    -> MatMul(Wo[d, classes]) 'head' -> logits."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(d, rank)) / np.sqrt(d)
    v = rng.normal(size=(rank, d))
    big = (u @ v + noise * rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32)
    w = {"W": big, "b": (0.1 * rng.normal(size=d)).astype(np.float32),
         "Wo": (rng.normal(size=(d, classes)) / np.sqrt(d)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="big", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "Wo"], ["logits"], name="head")]
    m = make(nodes, [helper.make_tensor_value_info("x", F, ["N", d])],
             [helper.make_tensor_value_info("logits", F, ["N", classes])], w)
    return m, w


def teacher_labels(logits: np.ndarray, seed: int = 1, flip: float = 0.1) -> np.ndarray:
    """Labels = argmax of the logits, a fraction ``flip`` replaced by random classes (so the loss is not 0)."""
    rng = np.random.default_rng(seed)
    y = logits.argmax(1).astype(np.int64)
    mask = rng.random(len(y)) < flip
    y[mask] = rng.integers(0, logits.shape[1], size=int(mask.sum()))
    return y


def save_npz(path, labels, **inputs) -> str:
    np.savez(path, labels=labels, **inputs)
    return str(path)


def ort_logits(model: onnx.ModelProto, **feeds) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def write_mlp_files(tmp_path, n: int = 400, seed: int = 0, d_in: int = 16, hidden: int = 32, classes: int = 4):
    """model.onnx (the :func:`mlp`) + data.npz whose labels come from a *different* teacher (the model's
    weights plus noise, some labels flipped), so the loss gradient is systematic. Returns (model, data)."""
    model, w = mlp(seed, d_in, hidden, classes)
    rng = np.random.default_rng(seed + 100)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    teacher = {k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32) * np.abs(v).mean() for k, v in w.items()}
    y = teacher_labels(mlp_forward(teacher, x), seed=seed + 1, flip=0.1)
    mpath, dpath = tmp_path / "model.onnx", tmp_path / "data.npz"
    onnx.save_model(model, str(mpath))
    save_npz(dpath, y, x=x)
    return str(mpath), str(dpath)


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run with ``n`` torch intra-op threads (the shared CI box is oversubscribed: with the default thread
    count the gradient pass is up to ~40x slower there), restoring the previous setting afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_lowrank_files(tmp_path, n: int = 400, seed: int = 0, d: int = 64, rank: int = 4, noise: float = 0.5):
    """model.onnx (:func:`lowrank_mlp` with full-rank ``noise`` on top of the rank-``rank`` weight) + data.npz
    labelled by the *noise-free* low-rank teacher: truncating the noise away lowers the loss. Returns
    (model path, data path, weights)."""
    model, w = lowrank_mlp(seed, d, rank, noise=noise)
    clean, _ = lowrank_mlp(seed, d, rank, noise=0.0)
    rng = np.random.default_rng(seed + 200)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = teacher_labels(ort_logits(clean, x=x), seed=seed + 1, flip=0.1)
    mpath, dpath = tmp_path / "model.onnx", tmp_path / "data.npz"
    onnx.save_model(model, str(mpath))
    save_npz(dpath, y, x=x)
    return str(mpath), str(dpath), w


def ort_session(model: onnx.ModelProto, optimized: bool = True, path=None):
    """A one-thread CPU InferenceSession of ``model``; ``optimized=False`` turns ORT's graph optimizations off
    (the graph as written), ``path`` saves ORT's optimized graph there (what actually runs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if path is not None:
        so.optimized_model_filepath = str(path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
