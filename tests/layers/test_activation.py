"""Pointwise activations against transformers' own, applied in place: GPT-2's gelu_new by
the native one-pass kernel (contiguous float32) and by torch's fused op (anything else)."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from distserve.layers.activation import PointwiseActivation, get_activation


@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_pointwise_activation_matches_transformers(name: str, layout: str) -> None:
    x = torch.randn(37, 301, generator=torch.Generator().manual_seed(0)) * 4
    x[0, :6] = torch.tensor([0.0, -0.0, 1e-30, -60.0, 60.0, 1e-4])
    expected = ACT2FN[name](x.clone())
    act = get_activation(name)
    assert isinstance(act, PointwiseActivation)
    y = x.clone() if layout == "contiguous" else x.t().contiguous().t()
    got = act(y)
    assert got.data_ptr() == y.data_ptr()  # in place
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)  # torch's own scalar and vector paths differ by 1e-6


def test_other_activations_come_from_transformers_and_unknown_ones_are_an_error() -> None:
    assert not isinstance(get_activation("quick_gelu"), PointwiseActivation)
    with pytest.raises(ValueError, match="not supported"):
        get_activation("no-such-activation")
