import math
import textwrap

import numpy as np
import pytest
import torch

from llc_onnx.calib.losses import accumulate, make_loss
from llc_onnx.errors import LLCError


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_ce_sum_count_and_metrics_match_numpy():
    rng = np.random.default_rng(0)
    out = rng.normal(size=(6, 7)).astype(np.float32)
    labels = np.array([0, 6, 3, -100, 2, 2])
    loss = make_loss("ce", "logits")
    s, c = loss.loss_sum(out, labels)
    valid = labels != -100
    lp = _log_softmax(out.astype(np.float64))
    ref = -lp[np.arange(6)[valid], labels[valid]].sum()
    assert c == 5 and s == pytest.approx(ref, rel=1e-12)
    m = loss.metrics(out, labels)
    top1 = np.count_nonzero(out.argmax(1)[valid] == labels[valid])
    top5 = sum(labels[i] in np.argsort(-out[i])[:5] for i in range(6) if valid[i])
    assert m == {"top1": (float(top1), 5), "top5": (float(top5), 5)}
    mean, metrics = loss.summarize(s, c, m)
    assert mean == pytest.approx(ref / 5) and metrics["top1"] == top1 / 5
    assert "top5" not in make_loss("ce", "o").metrics(out[:, :4], np.zeros(6, np.int64))


def test_ce_terms_differentiable_float64_and_spatial():
    out = torch.randn(2, 3, 4, requires_grad=True)  # [B, C, T] with labels [B, T]
    labels = torch.tensor([[0, 1, 2, 1], [2, 2, 0, -100]])
    s, c = make_loss("ce", "o").terms(out, labels)
    assert s.dtype == torch.float64 and c == 7
    ref = torch.nn.functional.cross_entropy(out.double(), labels, reduction="sum")
    assert float(s.detach()) == pytest.approx(float(ref.detach()))
    (g,) = torch.autograd.grad(s, [out])
    assert g.shape == out.shape and float(g.abs().sum()) > 0


def test_lm_shift_ppl_and_ignore():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 5))
    labels[1, 3] = -100
    loss = make_loss("lm", "logits")
    s, c = loss.loss_sum(logits, labels)
    lp = _log_softmax(logits.astype(np.float64))
    ref = [-lp[b, t, labels[b, t + 1]] for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    assert c == 7 and s == pytest.approx(sum(ref), rel=1e-12)
    mean, metrics = loss.summarize(s, c, loss.metrics(logits, labels))
    assert metrics["ppl"] == pytest.approx(math.exp(sum(ref) / 7))
    hits = [logits[b, t].argmax() == labels[b, t + 1] for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    assert metrics["top1"] == pytest.approx(np.mean(hits))
    # sums over two halves add up to the whole
    total = accumulate({}, {"loss": loss.loss_sum(logits[:1], labels[:1])})
    accumulate(total, {"loss": loss.loss_sum(logits[1:], labels[1:])})
    assert total["loss"][0] == pytest.approx(s) and total["loss"][1] == c


def test_mse_and_user_losses(tmp_path, monkeypatch):
    out = np.array([[1.0, 2.0], [3.0, 5.0]], np.float32)
    target = np.array([[1.0, 1.0], [1.0, 1.0]], np.float32)
    mse = make_loss("mse", "y")
    assert mse.loss_sum(out, target) == (pytest.approx(1 + 4 + 16), 4)
    assert mse.metrics(out, target) == {"mae": (pytest.approx(7.0), 4)}
    assert make_loss("mse", "y").loss_sum(out[:, :1], np.array([0.0, 1.0]))[0] == pytest.approx(1 + 4)
    (tmp_path / "myloss.py").write_text(textwrap.dedent("""
        def per_sample(output, labels):
            return ((output - labels) ** 2).sum(1)
        def scalar(output, labels):
            return ((output - labels) ** 2).sum(1).mean()
    """))
    monkeypatch.chdir(tmp_path)
    for spec in ("myloss:per_sample", "myloss:scalar"):
        user = make_loss(spec, "y")
        assert user.loss_sum(out, target) == (pytest.approx(21.0), 2)
        assert user.name == spec


def test_label_errors():
    with pytest.raises(LLCError) as e:
        make_loss("ce", "logits").loss_sum(np.zeros((3, 10), np.float32), np.array([1, 12, 3]))
    assert str(e.value) == ("labels: value 12 out of range for output 'logits' with 10 classes; labels must be in "
                            "[0, 9] (or -100 to ignore), check --output and the labels")
    with pytest.raises(LLCError) as e:
        make_loss("lm", "logits").metrics(np.zeros((1, 3, 4), np.float32), np.array([[0, -1, 2]]))
    assert str(e.value).startswith("labels: value -1 out of range for output 'logits' with 4 classes;")
    with pytest.raises(LLCError) as e:
        make_loss("ce", "logits").loss_sum(np.zeros((3, 10), np.float32), np.array([1.0, 2.0, 3.0]))
    assert str(e.value) == ("labels: dtype float64 but the 'ce' loss needs integer class indices; cast them "
                            "with .astype(np.int64) (or use --loss mse for regression targets)")
    with pytest.raises(LLCError) as e:
        make_loss("ce", "logits").terms(torch.zeros(3, 10), None)
    assert str(e.value).startswith("labels: none given; the 'ce' loss needs labels")
    with pytest.raises(LLCError) as e:
        make_loss("hinge", "logits")
    assert str(e.value) == "--loss hinge: unknown loss; use ce, lm, mse or module:function"


def test_lm_unit_terms_split_a_sequence_into_token_spans():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 150, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(1, 150))
    labels[0, 70:80] = -100  # ignored tokens count nowhere
    loss = make_loss("lm", "logits")
    units = loss.unit_terms(torch.as_tensor(logits), torch.as_tensor(labels))
    # 149 predicted positions in spans of 64: 64 + 64 + 21, the ignored ones dropped from the counts
    assert [c for _, c in units] == [64, 54, 21]
    s, c = loss.terms(logits, labels)
    assert sum(u for u, _ in units) == pytest.approx(float(s), rel=1e-12) and sum(c_ for _, c_ in units) == c
    # a span with no labelled token is not a unit; other losses keep one unit per sample
    labels[0, 1:] = -100
    labels[0, 140] = 3
    assert [c for _, c in loss.unit_terms(torch.as_tensor(logits), torch.as_tensor(labels))] == [1]
    ce = make_loss("ce", "logits")
    x, y = torch.as_tensor(logits[:, 0]), torch.as_tensor(labels[:, 140])
    assert ce.unit_terms(x, y) == [(pytest.approx(float(ce.terms(x, y)[0])), 1)]


# ------------------------------------------------------------------ probability heads
def _softmax_head_model(through=("Identity", "Reshape")):
    """logits = x·W, probs = Softmax(logits) -> Identity -> Reshape [B, C] -> graph output."""
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    w = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["logits"]), oh.make_node("Softmax", ["logits"], ["t0"], axis=1)]
    inits = [nh.from_array(w, "w"), nh.from_array(np.array([0, 6], np.int64), "shape")]
    name = "t0"
    for i, op in enumerate(through):
        nodes.append(oh.make_node(op, [name, "shape"] if op == "Reshape" else [name], [f"t{i + 1}"]))
        name = f"t{i + 1}"
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
                      [oh.make_tensor_value_info(name, TP.FLOAT, ["N", 6]),
                       oh.make_tensor_value_info("logits", TP.FLOAT, ["N", 6])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10), w, name


def test_ce_on_a_softmax_output_uses_the_log_probability():
    from llc_onnx.calib.losses import probability_source

    model, w, out = _softmax_head_model()
    assert probability_source(model, out) == "Softmax" and probability_source(model, "logits") is None
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    logits = x @ w
    probs = np.exp(_log_softmax(logits.astype(np.float64))).astype(np.float32)
    labels = rng.integers(0, 6, size=8)
    labels[2] = -100
    on_probs = make_loss("ce", out, model=model)
    on_logits = make_loss("ce", "logits", model=model)
    assert on_probs.note == "the output is a probability (Softmax): ce uses its log" and on_logits.note is None
    s_p, c_p = on_probs.loss_sum(probs, labels)
    s_l, c_l = on_logits.loss_sum(logits, labels)
    assert c_p == c_l == 7 and s_p == pytest.approx(s_l, rel=1e-6)  # same cross-entropy, read either way
    # what the old code computed on the probabilities (softmax of a softmax) is a different, wrong number
    wrong = make_loss("ce", out, probabilities=False).loss_sum(probs, labels)[0]
    assert abs(wrong - s_l) > 0.1 * s_l
    assert on_probs.metrics(probs, labels) == on_logits.metrics(logits, labels)


def test_ce_detects_probabilities_on_the_first_batch_and_clamps_zero():
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0])
    loss = make_loss("ce", "probs")  # no model: decided on the data
    assert loss.probabilities is None and loss.note is None
    s, c = loss.loss_sum(p, labels)
    assert loss.probabilities is True and loss.note == ("the output is a probability (its values sum to 1 over the "
                                                        "classes): ce uses its log")
    assert s == pytest.approx(-np.log(p[np.arange(6), labels].astype(np.float64)).sum(), rel=1e-12)
    # a zero probability for the label gives a large finite loss and a finite gradient
    t = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float32, requires_grad=True)
    s0, _ = make_loss("ce", "p", probabilities=True).terms(t, torch.tensor([1]))
    (g,) = torch.autograd.grad(s0, [t])
    assert float(s0.detach()) == pytest.approx(-math.log(np.finfo(np.float32).tiny))
    assert torch.isfinite(g).all()
    # logits are not mistaken for probabilities
    logits = make_loss("ce", "o")
    logits.loss_sum(rng.normal(size=(6, 5)).astype(np.float32), labels)
    assert logits.probabilities is False and logits.note is None


def test_ce_shape_error_on_a_sequence_output_points_to_a_custom_loss():
    out = np.zeros((2, 7, 5), np.float32)  # [B, T, C]
    with pytest.raises(LLCError) as e:
        make_loss("ce", "o").loss_sum(out, np.zeros((2, 7), np.int64))
    msg = str(e.value)
    assert "--loss module:function" in msg and "--loss lm" in msg and "\n" not in msg


def _terms_with_saved(loss, values, labels):
    """``loss.terms`` of float32 ``values`` under autograd: (sum, count, its gradient, the dtypes of every tensor
    autograd saved for the backward)."""
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    z = torch.tensor(values, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s, n = loss.terms(z, torch.tensor(labels))
    (g,) = torch.autograd.grad(s, z)
    return s, n, g, saved


def test_lm_loss_in_float64_chunks_equals_the_whole_and_keeps_no_float64_copy(monkeypatch):
    """The 'lm' loss sums float64 chunks of rows (``NLL_CHUNK_BYTES``): the same value and gradient as one
    float64 cross-entropy over all rows, to float64 rounding, and under autograd no float64 copy of the logits is
    kept for the backward (each chunk is recomputed)."""
    from llc_onnx.calib import losses as L

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50, 40)).astype(np.float32)
    labels = rng.integers(0, 40, size=(2, 50))
    labels[0, 7] = labels[1, 30] = -100
    loss = make_loss("lm", "logits")
    z = torch.tensor(logits, requires_grad=True)
    whole, count = loss.terms(z, torch.tensor(labels))
    (g_whole,) = torch.autograd.grad(whole, z)
    monkeypatch.setattr(L, "NLL_CHUNK_BYTES", 8 * 40 * 7)  # 7 rows per chunk: 98 rows in 14 chunks
    parts, count2, g_parts, saved = _terms_with_saved(loss, logits, labels)
    assert count2 == count == 96
    assert float(parts.detach()) == pytest.approx(float(whole.detach()), rel=1e-13)
    np.testing.assert_allclose(g_parts.numpy(), g_whole.numpy(), rtol=1e-6, atol=1e-9)
    assert torch.float64 not in saved  # only the float32 chunk inputs are kept
    with torch.no_grad():  # and without autograd the same chunks
        assert float(loss.terms(torch.tensor(logits), torch.tensor(labels))[0]) == float(parts.detach())


def test_lm_unit_terms_and_topk_metrics_in_row_chunks_are_those_of_the_whole(monkeypatch):
    """The lm loss's per-span terms and its top-1/top-5 metrics work on row chunks (``NLL_CHUNK_BYTES``): the same
    numbers, bit for bit, as one float64 cross-entropy and one argmax / argpartition over all rows."""
    from llc_onnx.calib import losses as L

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 150, 40)).astype(np.float32)
    labels = rng.integers(0, 40, size=(2, 150))
    labels[0, 9] = labels[1, 77] = -100
    loss = make_loss("lm", "logits")
    z, y = torch.tensor(logits), torch.tensor(labels)
    lg, tg = loss._shifted(z, y)
    tok = torch.nn.functional.cross_entropy(lg, tg, reduction="none", ignore_index=-100)
    whole = [(float(tok[a:a + 64].sum()), int((tg[a:a + 64] != -100).sum())) for a in range(0, len(tg), 64)]
    scores, t = logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1)
    valid, safe = t != -100, np.where(t != -100, t, 0)
    top1 = np.count_nonzero((scores.argmax(1) == safe) & valid)
    top5 = np.count_nonzero((np.argpartition(-scores, 4, axis=1)[:, :5] == safe[:, None]).any(1) & valid)
    monkeypatch.setattr(L, "NLL_CHUNK_BYTES", 8 * 40 * 7)  # 7 rows per chunk
    assert loss.unit_terms(z, y) == whole
    m = loss.metrics(logits, labels)
    assert m["top1"] == (top1, int(valid.sum())) and m["top5"] == (top5, int(valid.sum()))


@pytest.mark.parametrize("shape, axis", [((2, 50, 40), -1), ((3, 40, 4, 5), 1)])
def test_fidelity_kl_in_float64_chunks_equals_the_whole_and_keeps_no_float64_copy(monkeypatch, shape, axis):
    """The fidelity KL works on row chunks of ≤ ``NLL_CHUNK_BYTES`` float64 scores like the 'lm' loss: the same
    sum and gradient as one KL over all positions (the closed form, class axis anywhere), its per-position values
    and standard-error units bit for bit, and under autograd no float64 copy kept for the backward."""
    from llc_onnx.calib import losses as L
    from llc_onnx.calib.losses import FidelityLoss

    rng = np.random.default_rng(2)
    out, teacher = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    loss = FidelityLoss("y", axis=axis)
    lt = torch.log_softmax(torch.tensor(teacher).double(), dim=axis)
    ls = torch.log_softmax(torch.tensor(out).double(), dim=axis)
    ref = (lt.exp() * (lt - ls)).sum(dim=axis)                            # the KL as written in one piece
    z = torch.tensor(out, requires_grad=True)
    whole, n = loss.terms(z, torch.tensor(teacher))
    (g_whole,) = torch.autograd.grad(whole, z)
    assert n == ref.numel() and float(whole) == pytest.approx(float(ref.sum()), rel=1e-14)
    units = loss.unit_terms(torch.tensor(out), torch.tensor(teacher))
    monkeypatch.setattr(L, "NLL_CHUNK_BYTES", 8 * 40 * 7)                # 7 positions per chunk
    parts, n2, g_parts, saved = _terms_with_saved(loss, out, teacher)
    assert n2 == n and float(parts) == pytest.approx(float(whole), rel=1e-13)
    np.testing.assert_allclose(g_parts.numpy(), g_whole.numpy(), rtol=1e-6, atol=1e-12)
    assert torch.float64 not in saved or axis == 1         # [B, C, H, W]: one piece, as before (bits kept)
    assert torch.equal(loss.pointwise(torch.tensor(out), torch.tensor(teacher)), ref)
    assert loss.unit_terms(torch.tensor(out), torch.tensor(teacher)) == units
