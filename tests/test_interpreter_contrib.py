"""ONNX Runtime contrib ops in the interpreter, against ORT itself.

The BERT-style models are real: a small BERT written like Hugging Face's, exported with torch.onnx at opset
17 and fused by ORT's own transformer optimizer (``onnxruntime.transformers.optimizer``), which writes
EmbedLayerNormalization, Attention (1-D mask index, or the raw 2-D mask), MultiHeadAttention,
SkipLayerNormalization, BiasGelu/FastGelu with its own attribute conventions. MatMulNBits models come from
ORT's MatMulNBitsQuantizer. GroupQueryAttention, RotaryEmbedding and the other attention formats are built
with onnx.helper from ORT 1.31's schemas.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from _models import torch_threads
from _opcheck import Init, check_against_ort, check_gradient, one_node_model, ort_run
from llc_onnx.interpreter import TorchGraph
from llc_onnx.interpreter.ops.contrib import matmul_nbits_reference
from llc_onnx.model_io import prepare_model

MS = "com.microsoft"
R = np.random.default_rng(5)


def f32(*shape, scale=1.0):
    return (scale * R.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------ a small BERT, fused by ORT
class _SelfAttention(torch.nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.n, self.h = n, d // n
        self.query, self.key, self.value = (torch.nn.Linear(d, d) for _ in range(3))

    def split(self, x):
        return x.view(x.size()[:-1] + (self.n, self.h)).permute(0, 2, 1, 3)

    def forward(self, h, ext):
        q, k, v = self.split(self.query(h)), self.split(self.key(h)), self.split(self.value(h))
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.h) + ext, dim=-1)
        c = torch.matmul(p, v).permute(0, 2, 1, 3).contiguous()
        return c.view(c.size()[:-2] + (self.n * self.h,))


class _Layer(torch.nn.Module):
    def __init__(self, d, n, f):
        super().__init__()
        self.att, self.dense, self.ln1 = _SelfAttention(d, n), torch.nn.Linear(d, d), torch.nn.LayerNorm(d, eps=1e-12)
        self.inter, self.out, self.ln2 = torch.nn.Linear(d, f), torch.nn.Linear(f, d), torch.nn.LayerNorm(d, eps=1e-12)

    def forward(self, h, ext):
        a = self.ln1(self.dense(self.att(h, ext)) + h)
        return self.ln2(self.out(torch.nn.functional.gelu(self.inter(a))) + a)


class TinyBert(torch.nn.Module):
    def __init__(self, vocab=50, d=32, n=4, f=64, layers=2, maxpos=16):
        super().__init__()
        self.word, self.pos, self.tok = torch.nn.Embedding(vocab, d), torch.nn.Embedding(maxpos, d), torch.nn.Embedding(2, d)
        self.ln = torch.nn.LayerNorm(d, eps=1e-12)
        self.layers = torch.nn.ModuleList([_Layer(d, n, f) for _ in range(layers)])
        self.cls = torch.nn.Linear(d, 3)
        with torch.no_grad():  # distinct layer-norm weights (equal ones would be merged by the exporter)
            for m in self.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    def forward(self, input_ids, attention_mask, token_type_ids):
        s = input_ids.size(1)
        pos = torch.arange(s, dtype=torch.long).unsqueeze(0).expand_as(input_ids)
        h = self.ln(self.word(input_ids) + self.pos(pos) + self.tok(token_type_ids))
        ext = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
        for layer in self.layers:
            h = layer(h, ext)
        return self.cls(h[:, 0])


@pytest.fixture(scope="module")
def bert_export() -> onnx.ModelProto:
    torch.manual_seed(0)
    model = TinyBert().eval()
    ids = torch.randint(0, 50, (2, 7))
    args = (ids, torch.ones(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    f = io.BytesIO()
    with warnings.catch_warnings(), torch_threads(1):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17, input_names=names, output_names=["logits"],
                          dynamic_axes={n: {0: "B", 1: "S"} for n in names})
    return onnx.load_from_string(f.getvalue())


def _fuse(model: onnx.ModelProto, variant: str) -> onnx.ModelProto:
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("bert")
    if variant in ("raw_mask", "mha"):
        opts.use_raw_attention_mask(True)
    if variant == "mha":
        opts.use_multi_head_attention = True
    if variant == "fast_gelu":
        opts.enable_gelu_approximation = True
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return optimizer.optimize_model(m, model_type="bert", num_heads=4, hidden_size=32, optimization_options=opts).model


EXPECTED = {
    "mask_index": {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"},
    "raw_mask": {"Attention", "SkipLayerNormalization", "BiasGelu"},
    "mha": {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"},
    "fast_gelu": {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "FastGelu"},
}


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_bert_fused_by_ort_optimizer_matches_ort(bert_export, variant):
    fused = _fuse(bert_export, variant)
    contrib = {n.op_type for n in fused.graph.node if n.domain == MS}
    assert EXPECTED[variant] <= contrib, contrib
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, (3, 7)).astype(np.int64)
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0  # right padding
    mask[2, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (rng.random((3, 7)) > 0.5).astype(np.int64)}
    want = ort_run(fused, feeds)[0]
    got = TorchGraph(fused).run(feeds)[0]["logits"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    p = prepare_model(fused)  # opset 17 -> 21, contrib nodes kept
    np.testing.assert_allclose(TorchGraph(p).run(feeds)[0]["logits"].numpy(), want, rtol=1e-4, atol=1e-5)


def test_bert_weight_gradients_flow_through_fused_attention(bert_export):
    """Per-node weight gradients through Attention/SkipLayerNormalization (captured on the MatMul after the
    attention) match finite differences of the loss."""
    fused = prepare_model(_fuse(bert_export, "mask_index"))
    g = TorchGraph(fused, dtype=torch.float64)
    node = next(n.name for n in fused.graph.node if n.op_type == "MatMul")
    rng = np.random.default_rng(2)
    feeds = {"input_ids": rng.integers(0, 50, (2, 6)).astype(np.int64), "attention_mask": np.ones((2, 6), np.int64),
             "token_type_ids": np.zeros((2, 6), np.int64)}
    out, cap = g.run(feeds, capture=[node])
    out["logits"].square().sum().backward()
    w, _ = cap[node]
    d = torch.tensor(rng.standard_normal(tuple(w.shape)))
    analytic = float((w.grad * d).sum())

    def loss(t):
        o, _ = g.run(feeds, weight_fns={node: lambda x: x + t * d})
        return float(o["logits"].square().sum())

    numeric = (loss(1e-6) - loss(-1e-6)) / 2e-6
    assert abs(analytic) > 1e-6 and abs(analytic - numeric) < 1e-4 * abs(numeric)


# ------------------------------------------------------------------------------ Attention formats
def _attention_model(b, s, d, n, mask=None, past=None, attn_bias=None, **attrs):
    x = f32(b, s, d)
    inputs = [x, Init(f32(d, 3 * d, scale=0.3)), Init(f32(3 * d, scale=0.1)), mask, past, attn_bias]
    while inputs[-1] is None:
        inputs.pop()
    n_out = 2 if past is not None else 1
    return one_node_model("Attention", inputs, dict(num_heads=n, **attrs), n_out=n_out, domain=MS)


B, S, D, N = 2, 5, 16, 4


@pytest.mark.parametrize("case", ["lengths", "end_start", "raw_2d", "raw_3d", "unidirectional", "bias", "scale"])
def test_attention_mask_formats(case):
    mask, bias, attrs = None, None, {}
    if case == "lengths":
        mask = np.array([5, 3], np.int32)
    elif case == "end_start":
        mask = np.array([5, 4, 0, 1], np.int32)
    elif case == "raw_2d":
        mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.int32)
    elif case == "raw_3d":
        mask = (R.random((B, S, S)) > 0.3).astype(np.int32)
        mask[:, :, 0] = 1
    elif case == "unidirectional":
        attrs = dict(unidirectional=1)
        mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)
    elif case == "bias":
        bias = f32(1, N, S, S)
    elif case == "scale":
        attrs = dict(scale=0.3, mask_filter_value=-1000.0)
        mask = np.array([4, 2], np.int32)
    model, feeds = _attention_model(B, S, D, N, mask=mask, attn_bias=bias, **attrs)
    check_against_ort(model, feeds)
    check_gradient(model, {k: v for k, v in feeds.items()}, ["in0"])


def test_attention_with_past_and_present():
    past = f32(2, B, N, 3, D // N)
    model, feeds = _attention_model(B, 1, D, N, past=past, unidirectional=1)
    check_against_ort(model, feeds)


# ------------------------------------------------------------------------------ MultiHeadAttention
def _mha(inputs, n_out=1, **attrs):
    return one_node_model("MultiHeadAttention", inputs, dict(num_heads=N, **attrs), n_out=n_out, domain=MS)


@pytest.mark.parametrize("case", ["separate_bias_mask", "kv_lengths", "cross_bnsh", "past", "unidirectional",
                                  "attention_bias"])
def test_multi_head_attention_formats(case):
    h = D // N
    q, k, v = f32(B, S, D), f32(B, 6, D), f32(B, 6, D)
    if case == "separate_bias_mask":
        model, feeds = _mha([q, k, v, f32(3 * D), np.array([[1, 1, 1, 1, 0, 0], [1] * 6], np.int32)])
    elif case == "kv_lengths":
        model, feeds = _mha([q, k, v, None, np.array([6, 2], np.int32)])
    elif case == "cross_bnsh":
        model, feeds = _mha([q, f32(B, N, 6, h), f32(B, N, 6, h)])
    elif case == "past":
        model, feeds = _mha([f32(B, 1, D), f32(B, 1, D), f32(B, 1, D), None, None, None, f32(B, N, 4, h),
                             f32(B, N, 4, h)], n_out=3)
    elif case == "unidirectional":
        model, feeds = _mha([q, f32(B, S, D), f32(B, S, D)], unidirectional=1)
    else:
        model, feeds = _mha([q, k, v, None, None, f32(B, N, S, 6)])
    check_against_ort(model, feeds)
    check_gradient(model, feeds, [name for name in feeds if feeds[name].dtype == np.float32])


def test_multi_head_attention_packed_layouts_equal_the_unpacked_op():
    """ORT 1.31's CPU kernel has no packed KV [B, L, N, 2, H] / packed QKV [B, S, N, 3, H]: the interpreter's
    reading of those layouts is checked against ORT on the same tensors unpacked."""
    h = D // N
    q, kv = f32(B, S, D), f32(B, 6, N, 2, h)
    k, v = (np.ascontiguousarray(kv[:, :, :, i].reshape(B, 6, D)) for i in range(2))
    want = ort_run(*_mha([q, k, v]))[0]
    model, feeds = _mha([q, kv])
    np.testing.assert_allclose(TorchGraph(model).run(feeds)[0]["out0"].numpy(), want, rtol=1e-5, atol=1e-5)
    qkv = f32(B, S, N, 3, h)
    q, k, v = (np.ascontiguousarray(qkv[:, :, :, i].reshape(B, S, D)) for i in range(3))
    want = ort_run(*_mha([q, k, v]))[0]
    model, feeds = _mha([qkv])
    np.testing.assert_allclose(TorchGraph(model).run(feeds)[0]["out0"].numpy(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ RotaryEmbedding
def _caches(max_pos, half, base=10000.0):
    inv = 1.0 / base ** (np.arange(half) / half)
    ang = np.arange(max_pos)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pytest.mark.parametrize("layout", ["bsd", "bnsh"])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("pos_kind", ["ids", "offset"])
@pytest.mark.parametrize("rot_dim", [0, 4])
def test_rotary_embedding(layout, interleaved, pos_kind, rot_dim):
    h = 8
    cos, sin = _caches(16, (rot_dim or h) // 2)
    x = f32(B, S, N * h) if layout == "bsd" else f32(B, N, S, h)
    pos = R.integers(0, 11, (B, S)).astype(np.int64) if pos_kind == "ids" else np.array([3], np.int64)
    attrs = dict(interleaved=interleaved)
    if rot_dim:
        attrs.update(rotary_embedding_dim=rot_dim, num_heads=N)
    elif layout == "bsd":
        attrs.update(num_heads=N)
    model, feeds = one_node_model("RotaryEmbedding", [x, Init(pos), Init(cos), Init(sin)], attrs, domain=MS)
    check_against_ort(model, feeds)
    check_gradient(model, feeds, ["in0"])


# ------------------------------------------------------------------------------ GroupQueryAttention
def _gqa(b, s, n, nkv, h, past=0, seqlens=None, rotary=False, packed=False, n_out=3, **attrs):
    q = f32(b, s, n * h)
    k, v = f32(b, s, nkv * h), f32(b, s, nkv * h)
    total = past + s
    seqlens = np.full(b, total - 1, np.int32) if seqlens is None else np.asarray(seqlens, np.int32)
    inputs = [np.concatenate([q, k, v], -1) if packed else q, None if packed else k, None if packed else v,
              f32(b, nkv, past, h) if past else None, f32(b, nkv, past, h) if past else None,
              Init(seqlens), Init(np.array(total, np.int32))]
    if rotary:
        cos, sin = _caches(32, h // 2)
        inputs += [Init(cos), Init(sin)]
    while inputs[-1] is None:
        inputs.pop()
    attrs = dict(num_heads=n, kv_num_heads=nkv, do_rotary=int(rotary), **attrs)
    return one_node_model("GroupQueryAttention", inputs, attrs, n_out=n_out, domain=MS)


@pytest.mark.parametrize("case", ["prompt", "prompt_rotary", "prompt_rotary_interleaved", "packed", "padded",
                                  "decode_past", "decode_past_rotary", "window", "softcap", "smooth_softmax"])
def test_group_query_attention(case):
    kw = {}
    if case == "prompt_rotary":
        kw = dict(rotary=True)
    elif case == "prompt_rotary_interleaved":
        kw = dict(rotary=True, rotary_interleaved=1)
    elif case == "packed":
        kw = dict(packed=True)
    elif case == "padded":
        kw = dict(seqlens=[5, 2])  # right padding: batch 1 has 3 valid tokens
    elif case == "decode_past":
        kw = dict(past=4)
    elif case == "decode_past_rotary":
        kw = dict(past=4, rotary=True)
    elif case == "window":
        kw = dict(local_window_size=2)
    elif case == "softcap":
        kw = dict(softcap=2.0)
    elif case == "smooth_softmax":
        kw = dict(smooth_softmax=1)
    s = 1 if case.startswith("decode") else 6
    model, feeds = _gqa(2, s, 4, 2, 16, **kw)  # ORT's rotary needs a head size that is a multiple of 16
    if case == "padded":  # ORT leaves the padded query rows unspecified: compare the valid ones
        want = ort_run(model, feeds)
        got = TorchGraph(model).run(feeds)[0]
        np.testing.assert_allclose(got["out0"].numpy()[1, :3], want[0][1, :3], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["out0"].numpy()[0], want[0][0], rtol=1e-5, atol=1e-5)
    else:
        check_against_ort(model, feeds)
    check_gradient(model, feeds, ["in0"])


# ------------------------------------------------------------------------------ MatMulNBits
def _matmul_model(k, n):
    w = f32(k, n)
    g = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["M", k])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["M", n])], [nh.from_array(w, "w")])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), w


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,block", [(80, 32), (64, 16), (96, 64)])
def test_matmul_nbits_from_ort_quantizer(bits, symmetric, k, block):
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    model, _ = _matmul_model(k, 24)
    cfg = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    quant = mq.MatMulNBitsQuantizer(model, algo_config=cfg)
    quant.process()
    qm = quant.model.model
    node = next(n for n in qm.graph.node if n.op_type == "MatMulNBits")
    assert (len(node.input) == 4) == (not symmetric)  # asymmetric: packed uint8 zero points
    x = f32(5, k)
    check_against_ort(qm, {"x": x}, rtol=1e-4, atol=1e-5)
    check_gradient(qm, {"x": x}, ["x"])


def test_matmul_nbits_float_zero_points_bias_and_batched_input():
    k, n, bs = 48, 8, 16
    nb = k // bs
    codes = R.integers(0, 16, (n, k)).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, nb, bs // 2)
    scales, zp, bias = f32(n, nb, scale=0.1), f32(n, nb, scale=4.0), f32(n)
    x = f32(2, 3, k)
    model, feeds = one_node_model("MatMulNBits", [x, Init(packed), Init(scales), Init(zp), None, Init(bias)],
                                  dict(K=k, N=n, bits=4, block_size=bs), domain=MS)
    check_against_ort(model, feeds, rtol=1e-4)
    w = (codes.astype(np.float32) - np.repeat(zp, bs, 1)) * np.repeat(scales, bs, 1)
    np.testing.assert_allclose(TorchGraph(model).run(feeds)[0]["out0"].numpy(), x @ w.T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmul_nbits_reference_reads_our_symmetric_codes(bits):
    """notes/formats.md: our symmetric code q is stored as u = q + 2^(bits-1) with no zero_points input, and
    the bytes give x·(q·scale)ᵀ in ORT and in matmul_nbits_reference (same arguments a GPU kernel takes)."""
    from llc_onnx.quant import WeightQuantSpec, quantize_weight

    k, n, bs = 96, 12, 32
    w = f32(k, n)  # MatMul weight [K, N]
    qw = quantize_weight(w, WeightQuantSpec(bits, bs), out_axis=1, reduce_axis=0)
    u = (qw.q.T + (1 << (bits - 1))).astype(np.uint8)  # [N, K]
    per = 8 // bits
    packed = np.zeros((n, k // per), np.uint8)
    for j in range(per):
        packed |= (u[:, j::per] << (j * bits)).astype(np.uint8)
    b = packed.reshape(n, k // bs, bs * bits // 8)
    scales = np.ascontiguousarray(qw.scale.T)  # [N, nb]
    x = f32(4, k)
    model, feeds = one_node_model("MatMulNBits", [x, Init(b), Init(scales)], dict(K=k, N=n, bits=bits, block_size=bs),
                                  domain=MS)
    want = ort_run(model, feeds)[0]
    np.testing.assert_allclose(want, x @ qw.dequant, rtol=1e-4, atol=1e-4)
    got = matmul_nbits_reference(torch.from_numpy(x), torch.from_numpy(b), torch.from_numpy(scales), None, k, n, bits, bs)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ ONNX-domain Attention (opset 23+)
def _onnx_attention(q, k, v, mask=None, past=None, opset=23, n_out=1, **attrs):
    inputs = [q, k, v, mask] + (list(past) if past is not None else [])
    while inputs[-1] is None:
        inputs.pop()
    return one_node_model("Attention", inputs, attrs, n_out=n_out, opset=opset)


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "gqa_3d", "past_causal",
                                  "softcap", "scale", "qk_mode_2", "qk_mode_3"])
def test_onnx_attention_23(case):
    b, n, s, h = 2, 4, 5, 8
    q, k, v = f32(b, n, s, h), f32(b, n, s, h), f32(b, n, s, h)
    kw: dict = {}
    if case == "causal":
        kw = dict(is_causal=1)
    elif case == "bool_mask":
        kw = dict(mask=R.random((b, 1, s, s)) > 0.3)
        kw["mask"][..., 0] = True
    elif case == "float_mask":  # (ORT 1.31 refuses a mask shorter than the keys, which ONNX pads)
        kw = dict(mask=f32(s, s))
    elif case == "gqa_3d":
        q, k, v = f32(b, s, n * h), f32(b, s, 2 * h), f32(b, s, 2 * h)
        kw = dict(q_num_heads=n, kv_num_heads=2, is_causal=1)
    elif case == "past_causal":
        q, k, v = f32(b, n, 2, h), f32(b, n, 2, h), f32(b, n, 2, h)
        kw = dict(past=(f32(b, n, 3, h), f32(b, n, 3, h)), is_causal=1, n_out=3)
    elif case == "softcap":
        kw = dict(softcap=1.5, is_causal=1)
    elif case == "scale":
        kw = dict(scale=0.2)
    elif case.startswith("qk_mode"):
        kw = dict(qk_matmul_output_mode=int(case[-1]), mask=f32(1, 1, s, s), n_out=4)
    model, feeds = _onnx_attention(q, k, v, **kw)
    check_against_ort(model, feeds)
    check_gradient(model, feeds, ["in0", "in1", "in2"])


def test_onnx_attention_from_torch_sdpa_at_opset_23():
    """torch.onnx (dynamo) writes ai.onnx Attention for scaled_dot_product_attention at opset 23; prepare_model
    keeps opset 23 and the interpreter runs it."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.lin(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return y.transpose(1, 2).reshape(2, 5, 16)

    torch.manual_seed(0)
    with warnings.catch_warnings(), torch_threads(1):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(M().eval(), (torch.randn(2, 5, 16),), dynamo=True, opset_version=23, verbose=False)
    m = prog.model_proto
    assert "Attention" in {n.op_type for n in m.graph.node}
    p = prepare_model(m)
    assert {o.domain: o.version for o in p.opset_import}[""] == 23
    x = f32(2, 5, 16)
    check_against_ort(p, {p.graph.input[0].name: x})


@pytest.mark.parametrize("layout", ["bsd", "bnsh"])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("with_ids", [True, False])
def test_onnx_rotary_embedding_23(layout, interleaved, with_ids):
    h, rd = 8, 6
    cos, sin = _caches(16, rd // 2)
    x = f32(B, S, N * h) if layout == "bsd" else f32(B, N, S, h)
    pos = R.integers(0, 16, (B, S)).astype(np.int64)
    attrs = dict(interleaved=interleaved, rotary_embedding_dim=rd)
    if layout == "bsd":
        attrs["num_heads"] = N
    inputs = [x, Init(cos), Init(sin), Init(pos)] if with_ids else [x, Init(cos[pos]), Init(sin[pos])]
    model, feeds = one_node_model("RotaryEmbedding", inputs, attrs, opset=23)
    check_against_ort(model, feeds)
    check_gradient(model, feeds, ["in0"])
