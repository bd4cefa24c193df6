"""TorchGraph (ONNX -> torch interpreter) against onnxruntime: exported models at two batch sizes,
a table of single-op graphs, per-node gradients vs finite differences, hooks, errors, float64."""

from __future__ import annotations

import io
import warnings
import weakref

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from _opcheck import assert_close, check_against_ort, ort_run
from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph

OPSET = 21


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def export(module: torch.nn.Module, args: tuple, names: list[str], dynamo: bool, dyn: dict[str, dict[int, str]]):
    """torch.onnx.export at opset 21 with the given dynamic axes (input name -> {axis: dim name})."""
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims: dict[str, torch.export.Dim] = {}
            shapes = {
                n: {ax: dims.setdefault(d, torch.export.Dim(d, min=1, max=64)) for ax, d in dyn.get(n, {}).items()}
                for n in names
            }
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=shapes,
                                     input_names=names, verbose=False)
            model = prog.model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(module, args, f, dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=["out"], dynamic_axes=dyn)
            model = onnx.load_from_string(f.getvalue())
    return model


# --------------------------------------------------------------------------------------------------
# exported models
# --------------------------------------------------------------------------------------------------


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped
        self.b2 = torch.nn.BatchNorm2d(8)
        self.c3 = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=8)  # depthwise
        self.fc = torch.nn.Linear(8 * 2 * 2, 5)
        for b in (self.b1, self.b2):  # non-trivial running statistics
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.c3(x))
        return self.fc(torch.flatten(x, 1))


class Block(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(cout)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.l1 = Block(8, 8, 1)
        self.l2 = Block(8, 16, 2)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = self.l2(self.l1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, activation="gelu")
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(dim=1))


class TinyBert(torch.nn.Module):
    def __init__(self, vocab=40, d=16, heads=2, max_pos=16):
        super().__init__()
        self.h, self.d = heads, d
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(max_pos, d)
        self.ln0 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d)
        self.ln1 = torch.nn.LayerNorm(d)
        self.ff1 = torch.nn.Linear(d, 2 * d)
        self.ff2 = torch.nn.Linear(2 * d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.pool = torch.nn.Linear(d, d)
        self.cls = torch.nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask):
        b, s = input_ids.shape
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        x = self.ln0(self.tok(input_ids) + self.pos(pos))
        q, k, v = self.qkv(x).split(self.d, dim=-1)
        hd = self.d // self.h
        q, k, v = (t.reshape(b, s, self.h, hd).transpose(1, 2) for t in (q, k, v))
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + ext, dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, s, self.d)
        x = self.ln1(x + self.o(a))
        x = self.ln2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))
        return self.cls(torch.tanh(self.pool(x[:, 0])))


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.w = torch.nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=32, d=16, heads=2):
        super().__init__()
        self.h, self.d = heads, d
        self.emb = torch.nn.Embedding(vocab, d)
        self.n1 = RMSNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.n2 = RMSNorm(d)
        self.up = torch.nn.Linear(d, 2 * d, bias=False)
        self.gate = torch.nn.Linear(d, 2 * d, bias=False)
        self.down = torch.nn.Linear(2 * d, d, bias=False)
        self.nf = RMSNorm(d)

    def forward(self, ids):
        b, s = ids.shape
        x = self.emb(ids)
        i = torch.arange(s, device=ids.device)
        causal = i[None, :] > i[:, None]  # True above the diagonal
        tri = torch.triu(torch.ones(s, s, device=ids.device), diagonal=1)
        q, k, v = self.qkv(self.n1(x)).split(self.d, dim=-1)
        hd = self.d // self.h
        q, k, v = (t.reshape(b, s, self.h, hd).transpose(1, 2) for t in (q, k, v))
        sc = q @ k.transpose(-1, -2) / hd**0.5
        sc = sc.masked_fill(causal, float("-inf")) - 0.0 * tri
        x = x + self.o((torch.softmax(sc, -1) @ v).transpose(1, 2).reshape(b, s, self.d))
        h = self.n2(x)
        x = x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        # tied output layer; on 2-D input the dynamo exporter keeps it as Gemm on the shared initializer
        return torch.nn.functional.linear(self.nf(x).reshape(b * s, self.d), self.emb.weight).reshape(b, s, -1)


def _cnn_case(rng, b):
    return {"x": rng.standard_normal((b, 3, 8, 8)).astype(np.float32)}


def _enc_case(rng, b):
    return {"x": rng.standard_normal((b, 6, 16)).astype(np.float32)}


def _bert_case(rng, b):
    mask = np.ones((b, 7), np.int64)
    mask[0, 4:] = 0
    mask[-1, 2:] = 0
    return {"input_ids": rng.integers(0, 40, (b, 7)).astype(np.int64), "attention_mask": mask}


def _lm_case(rng, b, s=None):
    return {"ids": rng.integers(0, 32, (b, s or 5 + b)).astype(np.int64)}


MODELS = {
    "cnn": (SmallCNN, _cnn_case, {"x": {0: "batch"}}),
    "resnet": (TinyResNet, _cnn_case, {"x": {0: "batch"}}),
    "encoder": (Encoder, _enc_case, {"x": {0: "batch"}}),
    "bert": (TinyBert, _bert_case, {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}}),
    "lm": (TinyLM, _lm_case, {"ids": {0: "batch", 1: "seq"}}),
}

_EXPORTS: dict[tuple[str, bool], onnx.ModelProto] = {}


def exported(kind: str, dynamo: bool) -> onnx.ModelProto:
    key = (kind, dynamo)
    if key not in _EXPORTS:
        cls, case, dyn = MODELS[kind]
        torch.manual_seed(0)
        module = cls()
        feeds = case(np.random.default_rng(0), 2)
        args = tuple(torch.from_numpy(v) for v in feeds.values())
        _EXPORTS[key] = export(module, args, list(feeds), dynamo, dyn)
    return _EXPORTS[key]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_exported_models_match_ort_at_two_batch_sizes(kind, dynamo):
    model = exported(kind, dynamo)
    rng = np.random.default_rng(1)
    g = TorchGraph(model)
    assert g.input_names == list(MODELS[kind][1](rng, 2))
    for b in (2, 5):
        feeds = MODELS[kind][1](rng, b)
        ref = ort_run(model, feeds)
        outs, _ = g.run(feeds)
        assert outs[g.output_names[0]].shape[0] == b
        for name, r in zip(g.output_names, ref):
            assert_close(outs[name], r)


def test_lm_tied_embedding_is_one_initializer_and_gradients_split_per_node():
    model = exported("lm", True)
    head = [n for n in model.graph.node if "emb.weight" in n.input and n.op_type in ("Gemm", "MatMul")]
    assert len(head) == 1 and any(n.op_type == "Gather" and "emb.weight" in n.input for n in model.graph.node)
    head = head[0].name
    g = TorchGraph(model, dtype=torch.float64).requires_grad_(["emb.weight"])
    feeds = _lm_case(np.random.default_rng(3), 2, 4)
    outs, cap = g.run(feeds, capture=[head])
    logits = next(iter(outs.values()))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.arange(8) % 32)
    g_total, g_head = torch.autograd.grad(loss, [g.params["emb.weight"], cap[head][0]])
    # the same loss with the head's use of the weight cut off from autograd: only the Gather path is left
    outs2, _ = g.run(feeds, weight_fns={head: torch.Tensor.detach})
    logits2 = next(iter(outs2.values()))
    torch.testing.assert_close(logits2, logits)
    loss2 = torch.nn.functional.cross_entropy(logits2.reshape(-1, logits2.shape[-1]), torch.arange(8) % 32)
    (g_gather,) = torch.autograd.grad(loss2, [g.params["emb.weight"]])
    torch.testing.assert_close(g_head + g_gather, g_total, rtol=1e-10, atol=1e-12)
    assert g_head.abs().sum() > 0 and g_gather.abs().sum() > 0
    g.requires_grad_(requires_grad=False)


@pytest.mark.parametrize("kind", ["encoder", "bert", "cnn"])
def test_float64_matches_float32(kind):
    model = exported(kind, True)
    feeds = MODELS[kind][1](np.random.default_rng(5), 3)
    o32 = TorchGraph(model).run(feeds)[0]
    o64 = TorchGraph(model, dtype=torch.float64).run(feeds)[0]
    for k in o32:
        assert o32[k].dtype == torch.float32 and o64[k].dtype == torch.float64
        assert_close(o32[k], o64[k].numpy())


# --------------------------------------------------------------------------------------------------
# single-op graphs
# --------------------------------------------------------------------------------------------------

_R = np.random.default_rng(7)


def f32(*shape, lo=None):
    a = _R.standard_normal(shape).astype(np.float32)
    return np.abs(a) + lo if lo is not None else a


def i64(*vals):
    return np.array(vals, dtype=np.int64)


class Init:  # force an input to be an initializer
    def __init__(self, arr):
        self.arr = np.asarray(arr)


def single_op_model(op, inputs, attrs=None, n_out=1, opset=OPSET, out_types=None, domain=""):
    """One node; float arrays become graph inputs, others (and Init) initializers, None empty inputs."""
    names, ginputs, inits, feeds = [], [], [], {}
    for i, a in enumerate(inputs):
        if a is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(a, Init) or a.dtype.kind != "f":
            arr = a.arr if isinstance(a, Init) else a
            inits.append(numpy_helper.from_array(arr, name))
        else:
            ginputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape))
            feeds[name] = a
    outs = [f"out{i}" for i in range(n_out)]
    out_types = out_types or [TensorProto.FLOAT] * n_out
    node = helper.make_node(op, names, outs, domain=domain, **(attrs or {}))
    graph = helper.make_graph([node], "g", ginputs, [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, out_types)],
                              initializer=inits)
    imports = [helper.make_opsetid("", opset)]
    if domain:
        imports.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=imports, ir_version=11 if opset > 21 else 10)
    return model, feeds


B, I64 = TensorProto.BOOL, TensorProto.INT64
x_nan = f32(3, 4)
x_nan[1, 2] = np.nan
x_nan[0, 0] = np.inf

CASES = [
    # op, inputs, attrs, n_out, opset, out_types
    ("Gemm", [f32(5, 3), f32(4, 5), f32(4)], dict(transA=1, transB=1, alpha=0.5, beta=2.0)),
    ("Gemm", [f32(3, 5), Init(f32(5, 4))], dict(alpha=1.5)),
    ("Gemm", [f32(3, 5), f32(4, 5), f32(3, 1)], dict(transB=1)),
    ("MatMul", [f32(2, 3, 4, 5), f32(5, 6)], {}),
    ("MatMul", [f32(5), f32(2, 5, 3)], {}),
    ("Trilu", [f32(2, 4, 5), i64(1)], dict(upper=1)),
    ("Trilu", [f32(4, 5), i64(-1)], dict(upper=0)),
    ("Trilu", [f32(3, 6, 4)], {}),
    ("Clip", [f32(3, 4), Init(np.float32(-0.5)), Init(np.float32(0.3))], {}),
    ("Clip", [f32(3, 4), None, Init(np.float32(0.3))], {}),
    ("Clip", [f32(3, 4)], dict(min=-0.2, max=0.4), 1, 6),
    ("HardSwish", [f32(3, 7) * 4], {}),
    ("HardSigmoid", [f32(3, 7) * 4], dict(alpha=0.3, beta=0.4)),
    ("Split", [f32(6, 4), i64(1, 3, 2)], dict(axis=0), 3),
    ("Split", [f32(4, 7)], dict(axis=1, num_outputs=3), 3),
    ("Split", [f32(4, 6)], dict(axis=-1), 2, 13),
    ("Split", [f32(6, 4)], dict(axis=0, split=[2, 4]), 2, 11),
    ("GatherND", [f32(3, 4, 5), np.array([[0, 1], [2, -1], [1, 3]], np.int64)], {}),
    ("GatherND", [f32(2, 4, 5), np.array([[[1], [3]], [[-1], [0]]], np.int64)], dict(batch_dims=1)),
    ("GatherElements", [f32(3, 4), np.array([[0, -1, 2], [3, 1, 0], [1, 1, -4]], np.int64)], dict(axis=1)),
    ("Gather", [f32(5, 4), np.array([[0, -1], [3, 2]], np.int64)], dict(axis=0)),
    ("Gather", [f32(5, 4), np.array(2, np.int64)], dict(axis=1)),
    ("Mod", [i64(7, -7, 7, -7, 5), i64(3, 3, -3, -3, 5)], {}, 1, OPSET, [I64]),
    ("Mod", [f32(3, 4) * 5, Init(np.full((4,), 1.3, np.float32))], dict(fmod=1)),
    ("Range", [np.array(2, np.int64), np.array(17, np.int64), np.array(3, np.int64)], {}, 1, OPSET, [I64]),
    ("Range", [Init(np.float32(0.5)), Init(np.float32(-2.0)), Init(np.float32(-0.7))], {}),
    ("IsNaN", [x_nan], {}, 1, OPSET, [B]),
    ("IsInf", [x_nan], {}, 1, OPSET, [B]),
    ("Conv", [f32(2, 3, 7, 7), f32(4, 3, 3, 3), f32(4)], dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ("Conv", [f32(2, 3, 6, 6), f32(4, 3, 2, 2)], dict(auto_pad="SAME_LOWER")),
    ("Conv", [f32(2, 3, 6, 6), f32(4, 3, 3, 2)], dict(auto_pad="VALID", strides=[1, 2])),
    ("Conv", [f32(2, 4, 6, 6), f32(6, 2, 3, 3)], dict(pads=[0, 1, 2, 1], group=2, dilations=[1, 2])),
    ("Conv", [f32(2, 3, 11), f32(5, 3, 3), f32(5)], dict(pads=[2, 2], dilations=[2], strides=[2])),
    ("ConvTranspose", [f32(2, 4, 5, 5), f32(4, 3, 3, 3), f32(3)], dict(strides=[2, 2], pads=[1, 0, 1, 2])),
    ("ConvTranspose", [f32(2, 4, 5, 5), f32(4, 2, 3, 2)], dict(strides=[2, 3], output_padding=[1, 2], group=2)),
    ("ConvTranspose", [f32(2, 4, 6), f32(4, 3, 3)], dict(strides=[2], auto_pad="SAME_UPPER", dilations=[2])),
    ("ConvTranspose", [f32(1, 2, 4, 4), f32(2, 2, 3, 3)], dict(strides=[2, 2], output_shape=[9, 8])),
    ("MaxPool", [f32(1, 2, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", [f32(1, 2, 6, 6)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("MaxPool", [f32(1, 2, 8, 8)], dict(kernel_shape=[2, 3], pads=[0, 1, 1, 0], dilations=[2, 1])),
    # last ceil_mode window would start in the right padding: dropped
    ("MaxPool", [f32(1, 2, 1, 3)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 2, 2], ceil_mode=1)),
    ("AveragePool", [f32(1, 2, 1, 3)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 2, 2], ceil_mode=1,
                                             count_include_pad=1)),
    ("MaxPool", [f32(2, 3, 9)], dict(kernel_shape=[2], strides=[2], auto_pad="SAME_UPPER")),
    ("AveragePool", [f32(1, 2, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", [f32(1, 2, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", [f32(1, 2, 6, 6)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1, count_include_pad=1)),
    ("AveragePool", [f32(1, 2, 6, 6)], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("GlobalAveragePool", [f32(2, 3, 4, 5)], {}),
    ("CumSum", [f32(3, 5), np.array(1, np.int64)], {}),
    ("CumSum", [f32(3, 5), np.array(-2, np.int64)], dict(exclusive=1, reverse=1)),
    ("CumSum", [f32(3, 5), np.array(1, np.int64)], dict(exclusive=1)),
    ("Einsum", [f32(2, 3, 4), f32(2, 4, 5)], dict(equation="bij,bjk->bik")),
    ("Einsum", [f32(3, 4), f32(4)], dict(equation="ij, j -> i")),
    ("Slice", [f32(5, 6), i64(-1, 1), i64(-2**62, 1000), i64(0, 1), i64(-1, 2)], {}),
    ("Slice", [f32(5, 6), i64(4), i64(-100), i64(1), i64(-2)], {}),
    ("Slice", [f32(5, 6), i64(1, 2), i64(4, -1)], {}),
    ("Slice", [f32(5, 6)], dict(starts=[1], ends=[-1], axes=[1]), 1, 9),
    ("Squeeze", [f32(1, 3, 1, 4), i64(0, -2)], {}),
    ("Squeeze", [f32(1, 3, 1, 4)], dict(axes=[2]), 1, 11),
    ("Squeeze", [f32(1, 3, 1, 4)], {}),
    ("Unsqueeze", [f32(3, 4), i64(0, -1)], {}),
    ("Unsqueeze", [f32(3, 4)], dict(axes=[1]), 1, 11),
    ("ReduceMean", [f32(2, 3, 4)], dict(axes=[1, -1], keepdims=1), 1, 13),
    ("ReduceMean", [f32(2, 3, 4)], {}),
    ("ReduceSum", [f32(2, 3, 4), i64(0, 2)], dict(keepdims=0)),
    ("ReduceSum", [f32(2, 3, 4), np.zeros(0, np.int64)], dict(noop_with_empty_axes=1)),
    ("ReduceMax", [f32(2, 3, 4), i64(-1)], dict(keepdims=0)),
    ("ReduceMax", [f32(2, 3, 4)], dict(axes=[0], keepdims=1), 1, 13),
    ("ReduceMin", [f32(2, 3, 4), i64(1)], {}),
    ("Softmax", [f32(2, 3, 4)], dict(axis=1)),
    ("Softmax", [f32(2, 3, 4)], dict(axis=1), 1, 11),
    ("LogSoftmax", [f32(2, 3, 4)], dict(axis=0)),
    ("LayerNormalization", [f32(2, 3, 4), f32(3, 4), f32(3, 4)], dict(axis=-2, epsilon=1e-3)),
    ("LayerNormalization", [f32(2, 3, 4), f32(4)], {}),
    ("BatchNormalization", [f32(2, 3, 4, 4), f32(3), f32(3), f32(3), f32(3, lo=0.5)], dict(epsilon=1e-3)),
    ("RMSNormalization", [f32(2, 3, 4), f32(4)], dict(epsilon=1e-4), 1, 23),
    ("SimplifiedLayerNormalization", [f32(2, 3, 8), f32(8)], dict(epsilon=1e-5, axis=-1)),
    ("Gelu", [f32(3, 5)], {}),
    ("Gelu", [f32(3, 5)], dict(approximate="tanh")),
    ("Erf", [f32(3, 5)], {}),
    ("Expand", [f32(3, 1), i64(2, 1, 4)], {}),
    ("Expand", [f32(2, 3, 1), i64(3, 1)], {}),
    ("Reshape", [f32(2, 3, 4), i64(0, -1, 2)], {}),
    ("Reshape", [f32(2, 3, 4), i64(4, 6)], dict(allowzero=1)),
    ("Flatten", [f32(2, 3, 4, 5)], dict(axis=2)),
    ("Flatten", [f32(2, 3, 4, 5)], dict(axis=-1)),
    ("Shape", [f32(2, 3, 4, 5)], dict(start=1, end=-1), 1, OPSET, [I64]),
    ("ConstantOfShape", [i64(2, 3)], dict(value=numpy_helper.from_array(np.array([1.5], np.float32)))),
    ("ConstantOfShape", [i64(2, 3)], dict(value=numpy_helper.from_array(np.array([7], np.int64))), 1, OPSET, [I64]),
    ("Cast", [f32(3, 4) * 4], dict(to=TensorProto.INT64), 1, OPSET, [I64]),
    ("Cast", [i64(1, -2, 3)], dict(to=TensorProto.FLOAT)),
    ("Where", [np.array([[True, False, True]]), f32(2, 3), f32(1)], {}),
    ("Pow", [f32(3, 4, lo=0.1), f32(4)], {}),
    ("Pow", [f32(3, 4), Init(np.float32(2.0))], {}),
    ("Transpose", [f32(2, 3, 4)], dict(perm=[1, 2, 0])),
    ("Transpose", [f32(2, 3, 4)], {}),
    ("Concat", [f32(2, 3), f32(2, 1), f32(2, 2)], dict(axis=-1)),
    ("Max", [f32(3, 4), f32(4), f32(3, 1)], {}),
    ("Min", [f32(3, 4), f32(4)], {}),
    ("Equal", [i64(1, 2, 3), i64(1, 0, 3)], {}, 1, OPSET, [B]),
    ("Greater", [f32(3, 4), f32(4)], {}, 1, OPSET, [B]),
    ("GreaterOrEqual", [f32(3, 4), f32(4)], {}, 1, OPSET, [B]),
    ("Less", [f32(3, 4), f32(4)], {}, 1, OPSET, [B]),
    ("LessOrEqual", [i64(1, 2, 3), i64(2, 2, 2)], {}, 1, OPSET, [B]),
    ("And", [np.array([True, False, True]), np.array([True, True, False])], {}, 1, OPSET, [B]),
    ("Or", [np.array([True, False, False]), np.array([False, False, True])], {}, 1, OPSET, [B]),
    ("Not", [np.array([True, False])], {}, 1, OPSET, [B]),
    ("Div", [i64(7, -7, 9), i64(2, 2, -4)], {}, 1, OPSET, [I64]),
    ("Div", [f32(3, 4), f32(4, lo=0.5)], {}),
    ("Sub", [f32(3, 4), f32(4)], {}),
    ("Sqrt", [f32(3, 4, lo=0.0)], {}),
    ("Log", [f32(3, 4, lo=0.1)], {}),
    ("Reciprocal", [f32(3, 4, lo=0.5)], {}),
    ("Exp", [f32(3, 4)], {}),
    ("Abs", [f32(3, 4)], {}),
    ("Neg", [f32(3, 4)], {}),
    ("Sigmoid", [f32(3, 4)], {}),
    ("Tanh", [f32(3, 4)], {}),
    ("Relu", [f32(3, 4)], {}),
    ("Identity", [f32(3, 4)], {}),
    ("Dropout", [f32(3, 4)], {}),
    ("Pad", [f32(2, 3, 4), i64(0, 1, 2, 0, 2, 1), Init(np.float32(0.5))], dict(mode="constant")),
    ("Pad", [f32(2, 3, 4), i64(0, 1, 2, 0, 2, 1)], dict(mode="reflect")),
    ("Pad", [f32(2, 3, 4), i64(0, 0, 2, 0, 0, 1)], dict(mode="edge")),
    ("Tile", [f32(2, 3), i64(2, 3)], {}),
    ("ArgMax", [f32(3, 4)], dict(axis=1, keepdims=0), 1, OPSET, [I64]),
    ("LeakyRelu", [f32(3, 4)], dict(alpha=0.2)),
    ("Sum", [f32(3, 4), f32(4), f32(3, 4)], {}),
    ("Sin", [f32(3, 4)], {}),
]


def _case_id(c):
    attrs = ",".join(f"{k}" for k in c[2])
    return f"{c[0]}-{attrs}-op{c[4] if len(c) > 4 else OPSET}"


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{_case_id(c)}" for i, c in enumerate(CASES)])
def test_single_op_matches_ort(case):
    op, inputs, attrs = case[:3]
    n_out = case[3] if len(case) > 3 else 1
    opset = case[4] if len(case) > 4 else OPSET
    out_types = case[5] if len(case) > 5 else None
    model, feeds = single_op_model(op, inputs, attrs, n_out, opset, out_types)
    check_against_ort(model, feeds)


def test_constant_variants_and_shape_chain_dynamic():
    """Constant value/value_float(s)/value_int(s) feeding a Shape->Gather->Concat->Reshape chain."""
    nodes = [
        helper.make_node("Constant", [], ["c_ints"], value_ints=[-1]),
        helper.make_node("Constant", [], ["c_int"], value_int=0),
        helper.make_node("Constant", [], ["c_float"], value_float=2.0),
        helper.make_node("Constant", [], ["c_floats"], value_floats=[1.0, -1.0, 0.5]),
        helper.make_node("Constant", [], ["c_t"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "c_int"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "c_t"], ["b1"]),
        helper.make_node("Unsqueeze", ["b1", "c_t"], ["b2"]),
        helper.make_node("Squeeze", ["b2", "c_t"], ["b3"]),
        helper.make_node("Concat", ["b3", "c_ints"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Mul", ["flat", "c_float"], ["m"]),
        helper.make_node("Reshape", ["m", "s"], ["back"]),
        helper.make_node("Mul", ["back", "c_floats"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    for n in (1, 4):
        check_against_ort(model, {"x": f32(n, 2, 3)})


# --------------------------------------------------------------------------------------------------
# gradients, hooks, errors
# --------------------------------------------------------------------------------------------------


def grad_model() -> onnx.ModelProto:
    r = np.random.default_rng(11)

    def w(*s):
        return (r.standard_normal(s) * 0.3).astype(np.float32)

    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("Wc", w(4, 2, 3, 3)), ("Bc", w(4)), ("Wg", w(10, 64)), ("Cg", w(10)),
        ("Ws", w(10, 10)), ("Wo", w(10, 3)),
    ]]
    nodes = [
        helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Tanh", ["c"], ["ct"]),
        helper.make_node("Flatten", ["ct"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "Wg", "Cg"], ["g"], name="gemm", transB=1, alpha=0.7, beta=1.3),
        helper.make_node("Tanh", ["g"], ["h"]),
        helper.make_node("MatMul", ["h", "Ws"], ["m1"], name="mm1"),
        helper.make_node("Tanh", ["m1"], ["m1t"]),
        helper.make_node("MatMul", ["m1t", "Ws"], ["m2"], name="mm2"),  # shared weight
        helper.make_node("Add", ["m2", "h"], ["s"]),  # h is shared by mm1 and this Add
        helper.make_node("MatMul", ["s", "Wo"], ["y"]),  # unnamed -> "MatMul_9"
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def _loss(y: torch.Tensor) -> torch.Tensor:
    target = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).reshape(y.shape)
    return (torch.tanh(y) * target).sum() + 0.1 * (y * y).sum()


@pytest.mark.parametrize("node", ["conv", "gemm", "mm1", "MatMul_9"])
def test_captured_gradients_match_finite_differences(node):
    model = grad_model()
    g = TorchGraph(model, dtype=torch.float64)
    x = np.random.default_rng(2).standard_normal((2, 2, 8, 8))
    outs, cap = g.run({"x": x}, capture=[node])
    W, X = cap[node]
    gw, gx = torch.autograd.grad(_loss(outs["y"]), [W, X])
    assert gw.shape == W.shape and gx.shape == X.shape
    rng = np.random.default_rng(3)
    eps = 1e-6
    for which, grad, shape in (("w", gw, W.shape), ("x", gx, X.shape)):
        flat = grad.reshape(-1)
        idx = rng.choice(flat.numel(), size=min(12, flat.numel()), replace=False)
        fd = []
        for i in idx:
            vals = []
            for sgn in (1.0, -1.0):
                e = torch.zeros(flat.numel(), dtype=torch.float64)
                e[i] = sgn * eps
                fn = {node: (lambda t, e=e: t + e.reshape(shape))}
                kw = {"weight_fns": fn} if which == "w" else {"input_fns": fn}
                with torch.no_grad():
                    vals.append(float(_loss(g.run({"x": x}, **kw)[0]["y"])))
            fd.append((vals[0] - vals[1]) / (2 * eps))
        np.testing.assert_allclose(flat[idx].numpy(), np.array(fd), rtol=1e-5, atol=1e-7 * float(flat.abs().max()))


def test_shared_weight_per_node_gradients_sum_to_initializer_gradient():
    g = TorchGraph(grad_model(), dtype=torch.float64)
    assert not g.params["Ws"].requires_grad and g.params["Ws"].is_leaf
    g.requires_grad_(["Ws"])
    x = np.random.default_rng(4).standard_normal((3, 2, 8, 8))
    outs, cap = g.run({"x": x}, capture=["mm1", "mm2"])
    w1, w2 = cap["mm1"][0], cap["mm2"][0]
    g_shared, g1, g2 = torch.autograd.grad(_loss(outs["y"]), [g.params["Ws"], w1, w2])
    assert not torch.allclose(g1, g2)
    torch.testing.assert_close(g1 + g2, g_shared, rtol=1e-10, atol=1e-12)
    # the activation h feeds mm1 and an Add: the captured X gradient is mm1's share only
    g.requires_grad_()
    outs, cap = g.run({"x": x}, capture=["mm1"], outputs=["y", "h"])
    h, x1 = outs["h"], cap["mm1"][1]
    assert h.requires_grad
    g_h, g_x1 = torch.autograd.grad(_loss(outs["y"]), [h, x1])
    assert not torch.allclose(g_h, g_x1)
    g.requires_grad_(requires_grad=False)
    assert not any(p.requires_grad for p in g.params.values())


def test_capture_without_requires_grad_gives_leaf_aliases():
    g = TorchGraph(grad_model())
    x = np.random.default_rng(4).standard_normal((2, 2, 8, 8)).astype(np.float32)
    outs, cap = g.run({"x": x}, capture=["gemm"])
    W, X = cap["gemm"]
    assert W.requires_grad and X.requires_grad and W.shape == (10, 64) and X.shape == (2, 64)
    gw, gx = torch.autograd.grad(outs["y"].sum(), [W, X])
    assert gw.abs().sum() > 0 and gx.abs().sum() > 0
    with torch.no_grad():
        _, cap = g.run({"x": x}, capture=["gemm"])
    assert not cap["gemm"][0].requires_grad
    torch.testing.assert_close(cap["gemm"][0], g.params["Wg"])


@pytest.mark.parametrize("node,init", [("gemm", "Wg"), ("conv", "Wc"), ("MatMul_9", "Wo")])
def test_weight_fn_zero_matches_ort_with_zeroed_initializer(node, init):
    model = grad_model()
    x = np.random.default_rng(5).standard_normal((3, 2, 8, 8)).astype(np.float32)
    g = TorchGraph(model)
    outs, _ = g.run({"x": x}, weight_fns={node: torch.zeros_like})
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for t in zeroed.graph.initializer:
        if t.name == init:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), init))
    ref = ort_run(zeroed, {"x": x})[0]
    assert_close(outs["y"], ref)
    assert not np.allclose(ref, ort_run(model, {"x": x})[0])
    # the stored initializer itself is untouched
    assert g.params[init].abs().sum() > 0


def test_weight_fn_on_exported_conv_matches_ort():
    model = exported("cnn", True)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    name = conv.name
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for t in zeroed.graph.initializer:
        if t.name == conv.input[1]:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    feeds = _cnn_case(np.random.default_rng(6), 3)
    outs, _ = TorchGraph(model).run(feeds, weight_fns={name: torch.zeros_like})
    assert_close(next(iter(outs.values())), ort_run(zeroed, feeds)[0])


def test_input_fn_scales_activation():
    g = TorchGraph(grad_model())
    x = np.random.default_rng(8).standard_normal((2, 2, 8, 8)).astype(np.float32)
    a = g.run({"x": x}, input_fns={"conv": lambda t: 2 * t}, outputs=["c"])[0]["c"]
    b = g.run({"x": 2 * x}, outputs=["c"])[0]["c"]
    torch.testing.assert_close(a, b)


def test_intermediates_are_freed_after_last_use():
    g = TorchGraph(grad_model())
    x = np.random.default_rng(9).standard_normal((2, 2, 8, 8)).astype(np.float32)
    seen, alive_at_last_node = [], []

    def spy(t):
        seen.append(weakref.ref(t))
        return t

    def check(t):  # runs at the last node: f (read by gemm) and h (read by mm1 and the Add) are gone
        alive_at_last_node.extend(r() is not None for r in seen)
        return t

    with torch.no_grad():
        outs, _ = g.run({"x": x}, input_fns={"gemm": spy, "mm1": spy, "MatMul_9": check})
    assert outs["y"].shape == (2, 3)
    assert alive_at_last_node == [False, False]
    # a requested intermediate output is kept
    with torch.no_grad():
        outs, _ = g.run({"x": x}, outputs=["y", "h"], input_fns={"mm1": spy})
    assert outs["h"].shape == (2, 10)


def test_unknown_op_raises_llcerror_naming_node_and_op():
    model, _ = single_op_model("FooBar", [f32(2, 3)], {}, domain="")
    with pytest.raises(LLCError, match=r"node 'FooBar_0' \(op FooBar\).*not supported"):
        TorchGraph(model)
    model.graph.node[0].name = "mystery"
    with pytest.raises(LLCError, match=r"'mystery'.*FooBar"):
        TorchGraph(model)


def test_bad_feeds_and_hook_targets_raise_llcerror():
    g = TorchGraph(grad_model())
    x = np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(LLCError, match="'x'"):
        g.run({})
    with pytest.raises(LLCError, match="'nope'"):
        g.run({"x": x, "nope": x})
    with pytest.raises(LLCError, match="'missing_node'"):
        g.run({"x": x}, capture=["missing_node"])
    assert g.input_names == ["x"] and g.output_names == ["y"]
    assert set(g.params) == {"Wc", "Bc", "Wg", "Cg", "Ws", "Wo"}
    assert all(p.dtype == torch.float32 and p.is_leaf and not p.requires_grad for p in g.params.values())
