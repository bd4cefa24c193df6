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
