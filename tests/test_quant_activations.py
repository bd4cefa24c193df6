import numpy as np
import pytest
import torch

from llc_onnx.errors import LLCError
from llc_onnx.quant import ActivationQuant, activation_scale, fake_quant_activation


@pytest.mark.parametrize("bits,qmax", [(8, 127), (16, 32767)])
def test_activation_scale(bits, qmax):
    s = activation_scale(3.5, bits)
    assert s == pytest.approx(3.5 / qmax, rel=1e-7)
    assert np.float32(s) == s                        # stored as float32 in the graph
    assert activation_scale(0.0, bits) > 0
    with pytest.raises(LLCError):
        activation_scale(float("nan"), bits)
    with pytest.raises(LLCError):
        activation_scale(1.0, 4)


@pytest.mark.parametrize("bits", [8, 16])
def test_forward_values(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 33, generator=g) * 2
    absmax = float(x.abs().max())
    aq = ActivationQuant(scale=activation_scale(absmax * 0.5, bits), bits=bits)   # half range: clamps
    y = fake_quant_activation(x, aq)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # reference in numpy: round half to even, saturate, dequantize (QuantizeLinear -> DequantizeLinear)
    xs = x.numpy() / np.float32(aq.scale)
    ref = np.clip(np.rint(xs), qmin, qmax).astype(np.float32) * np.float32(aq.scale)
    np.testing.assert_array_equal(y.numpy(), ref)
    q = (y / aq.scale).round()
    assert float(q.min()) >= qmin and float(q.max()) <= qmax
    inside = x.abs() <= qmax * aq.scale
    assert torch.all((y - x)[inside].abs() <= aq.scale / 2 * (1 + 1e-5))
    assert torch.all(y[~inside].abs() >= (qmax * aq.scale) * (1 - 1e-6))


def test_round_half_to_even():
    aq = ActivationQuant(scale=1.0, bits=8)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0])
    y = fake_quant_activation(x, aq)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -128.0]


def test_straight_through_gradient():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 20, generator=g) * 3).requires_grad_(True)
    aq = ActivationQuant(scale=activation_scale(1.0, 8), bits=8)     # many elements clamp
    y = fake_quant_activation(x, aq)
    w = torch.randn(3, 20, generator=g)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w)                            # identity, also where clamped
    assert y.dtype == x.dtype


def test_float64_and_bad_scale():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    y = fake_quant_activation(x, ActivationQuant(scale=0.25, bits=8))
    assert y.dtype == torch.float64
    assert torch.all((y / 0.25) == (y / 0.25).round())
    with pytest.raises(LLCError):
        fake_quant_activation(x, ActivationQuant(scale=0.0, bits=8))
