"""fp8 base weights: storage round trip, scaled vs plain accuracy, gradients, and the training loss vs bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxlora.models.fp8 import FP8_MAX, fp8_quantize, store_linears_in_fp8
from fluxlora.training.cli import train


def _linear(std: float, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=g) * std)
        layer.bias.copy_(torch.randn(48, generator=g) * 0.1)
    return layer.requires_grad_(False)


def test_plain_fp8_storage_is_the_e4m3_cast_and_the_output_its_linear():
    layer = _linear(0.05)
    weight, bias = layer.weight.clone(), layer.bias.clone()
    assert store_linears_in_fp8(layer) == 1
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.float(), weight.to(torch.float8_e4m3fn).float())  # round trip = one cast
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    expected = x @ weight.to(torch.float8_e4m3fn).float().T + bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert store_linears_in_fp8(layer) == 0  # already fp8: left as it is


def test_scaled_fp8_keeps_small_weights_accurate():
    weight = _linear(1e-3).weight.data  # like FLUX's ~N(0, 1/3072) weights, deep in e4m3's subnormal range unscaled
    plain, _ = fp8_quantize(weight, scaled=False)
    scaled, scale = fp8_quantize(weight, scaled=True)
    assert scale.shape == (48,) and scaled.dtype == torch.float8_e4m3fn
    assert torch.equal(scaled.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))  # each row's max maps to 448
    def rel(w):
        return float((w - weight).norm() / weight.norm())
    # e4m3 has 3 mantissa bits: a normal value is within 2^-4 relative; subnormals (|w| < 2^-6) lose much more
    assert rel(scaled.float() * scale[:, None]) < 2**-4
    assert rel(plain.float()) > 4 * rel(scaled.float() * scale[:, None])


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_layer_gradient_wrt_input_matches_the_dequantised_weight(scaled):
    layer = _linear(0.02)
    store_linears_in_fp8(layer, scaled=scaled)
    dequant = layer.weight.float() * (layer.fp8_scale[:, None] if scaled else 1.0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).sin().sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((x_ref @ dequant.T + layer.bias).sin().sum(), x_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["flux1", "chroma", "kontext", "fill"])
def test_fp8_training_loss_stays_within_three_percent_of_bf16(train_argv, tmp_path, family):
    common = ("--max_train_steps=3", "--mixed_precision=bf16", "--cache_latents")
    bf16 = train(train_argv(*common, output_dir=tmp_path / "bf16", family=family)).losses
    fp8 = train(train_argv(*common, "--fp8_base", output_dir=tmp_path / "fp8", family=family)).losses
    assert len(bf16) == len(fp8) == 3
    assert fp8 != bf16  # the weights really were fp8
    assert max(abs(a - b) / b for a, b in zip(fp8, bf16, strict=True)) < 0.03, (fp8, bf16)
