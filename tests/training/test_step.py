"""`training_loss` against values computed by hand from spec §4.3-4.6 (a stub transformer with a known output)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from fluxlora.families.flux1.family import FLUX1
from fluxlora.training import step as step_module
from fluxlora.training.step import training_loss

BASE = step_module.FlowSettings(
    t5xxl_max_token_length=None, apply_t5_attn_mask=False, guidance_scale=1.0, timestep_sampling="sigmoid",
    sigmoid_scale=1.0, discrete_flow_shift=3.0, model_prediction_type="raw", weighting_scheme="none",
    logit_mean=0.0, logit_std=1.0, mode_scale=1.29, ip_noise_gamma=None, ip_noise_gamma_random_strength=False,
    loss_type="l2", huber_schedule="constant", huber_c=0.1, huber_scale=1.0)


class Stub(nn.Module):
    """pred = a·x_t + σ on the packed tokens: packing is a permutation, so unpacked it is a·x_t + σ too."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, mask):
        return self.a * img + timesteps.view(-1, 1, 1).to(img.dtype)


def _case():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 16, 4, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 16, 4, 6, generator=g, dtype=torch.float64)
    sigmas = torch.tensor([0.25, 0.8], dtype=torch.float64)
    cond = {"clip_pooled": torch.zeros(2, 768), "t5_out": torch.zeros(2, 3, 4096),
            "t5_mask": torch.ones(2, 3, dtype=torch.bool)}
    return x0, noise, sigmas, cond


def _by_hand(x0, noise, sigmas, a, *, prediction, loss_type, c=None, weighting="none", weights=(1.0, 1.0),
             mask=None):
    s = sigmas.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise  # §4.3
    pred = a * x_t + s  # the stub
    target = noise - x0  # §4.4: always the velocity
    value = {"raw": pred, "additive": pred + x_t, "sigma_scaled": x_t - s * pred}[prediction]
    d = value - target
    if loss_type == "l2":  # §4.6.1
        elementwise = d**2
    elif loss_type == "l1":
        elementwise = d.abs()
    elif loss_type == "huber":
        elementwise = 2 * c * (torch.sqrt(d**2 + c**2) - c)
    else:
        elementwise = 2 * (torch.sqrt(d**2 + c**2) - c)
    type_weight = torch.ones(2, dtype=torch.float64)
    if prediction == "sigma_scaled" and weighting == "sigma_sqrt":
        type_weight = sigmas**-2.0
    per_sample = []
    for i in range(2):
        e = elementwise[i]
        if mask is None:
            per_sample.append(e.mean())
        else:  # fluxlora: the mean over the masked area (spec §12.5 fix)
            m = mask[i].expand_as(e)
            per_sample.append((e * m).sum() / m.sum())
    per_sample = torch.stack(per_sample) * type_weight * torch.tensor(weights, dtype=torch.float64)
    return per_sample.mean(), per_sample


@pytest.mark.parametrize(("changes", "hand"), [
    ({}, {"prediction": "raw", "loss_type": "l2"}),
    ({"model_prediction_type": "additive", "loss_type": "l1"}, {"prediction": "additive", "loss_type": "l1"}),
    ({"model_prediction_type": "sigma_scaled", "weighting_scheme": "sigma_sqrt"},
     {"prediction": "sigma_scaled", "loss_type": "l2", "weighting": "sigma_sqrt"}),
    ({"loss_type": "huber", "huber_c": 0.3, "huber_scale": 2.0}, {"prediction": "raw", "loss_type": "huber", "c": 0.6}),
    ({"loss_type": "smooth_l1", "huber_c": 0.5}, {"prediction": "raw", "loss_type": "smooth_l1", "c": 0.5}),
])
def test_training_loss_equals_the_hand_computed_value(changes, hand):
    x0, noise, sigmas, cond = _case()
    settings = dataclasses.replace(BASE, **changes)
    out = training_loss(FLUX1, Stub(0.7), x0, cond, settings, generator=torch.Generator(), guidance=None,
                        compute_dtype=torch.float64, loss_weights=torch.tensor([1.0, 0.5]), sigmas=sigmas.float(),
                        noise=noise)
    loss, per_sample = _by_hand(x0, noise, sigmas.float().double(), 0.7, weights=(1.0, 0.5), **hand)
    assert math.isclose(out.loss.item(), loss.item(), rel_tol=1e-5)
    torch.testing.assert_close(out.per_sample.double(), per_sample, rtol=1e-5, atol=0)


def test_masked_loss_is_the_mean_over_the_mask_and_gradients_flow():
    x0, noise, sigmas, cond = _case()
    alpha = torch.zeros(2, 1, 32, 48)
    alpha[:, :, :, :24] = 1.0  # left half of the pixels -> left 3 of 6 latent columns
    flux = Stub(-0.4)
    out = training_loss(FLUX1, flux, x0, cond, BASE, generator=torch.Generator(), guidance=None,
                        compute_dtype=torch.float64, alpha_masks=alpha, sigmas=sigmas.float(), noise=noise)
    latent_mask = torch.zeros(2, 1, 4, 6, dtype=torch.float64)
    latent_mask[..., :3] = 1.0
    loss, _ = _by_hand(x0, noise, sigmas.float().double(), -0.4, prediction="raw", loss_type="l2", mask=latent_mask)
    assert math.isclose(out.loss.item(), loss.item(), rel_tol=1e-5)
    out.loss.backward()
    assert flux.a.grad is not None and flux.a.grad.abs().item() > 0
