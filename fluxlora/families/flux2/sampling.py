"""FLUX.2 sampling: the empirical time-shift schedule and the Euler flow-matching loop (BFL `flux2/sampling.py`,
diffusers `Flux2Pipeline` / `Flux2KleinPipeline` with `FlowMatchEulerDiscreteScheduler`).

Schedule: σ_i = linspace(1, 0, steps + 1) shifted by σ' = e^μ / (e^μ + 1/σ − 1), with μ fitted by BFL to the image
token count and the step count (`empirical_mu`). Guidance: [dev] is guidance-distilled (the scale goes into the model,
default 4.0 in BFL's CLI); klein distilled runs without guidance (4 steps); klein base uses classifier-free guidance
with an empty negative prompt (default 4.0, 50 steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# (steps, guidance) defaults per model version, as the BFL / diffusers pipelines document them.
SAMPLER_DEFAULTS: dict[str, tuple[int, float]] = {
    "dev": (50, 4.0),
    "klein-4b": (4, 1.0),
    "klein-9b": (4, 1.0),
    "klein-base-4b": (50, 4.0),
    "klein-base-9b": (50, 4.0),
}


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's fitted shift μ: linear in the token count, interpolated in the step count below 4300 tokens."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def time_shift(mu: float, sigma: Tensor) -> Tensor:
    """σ' = e^μ / (e^μ + (1/σ − 1)); 0 stays 0 and 1 stays 1."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))


def schedule(num_steps: int, image_seq_len: int) -> Tensor:
    """The steps + 1 noise levels, from 1 down to 0 (float32)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = time_shift(empirical_mu(image_seq_len, num_steps), sigmas)
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).float()


Predict = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None], Tensor]


def denoise(model: Predict, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, sigmas: Tensor, *,
            guidance: float | None = None, negative: tuple[Tensor, Tensor] | None = None, cfg_scale: float = 1.0,
            ref: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Euler steps x ← x + (σ_next − σ)·v from pure noise `img` [B, N, C] along `sigmas`; returns the final tokens.

    `guidance` feeds a guidance-distilled model; `negative` = (txt, txt_ids) of the empty prompt turns on classifier-
    free guidance v = v_neg + cfg_scale·(v − v_neg) (klein base); `ref` = (tokens, ids) of reference images, appended
    after the target tokens and cut from the prediction. The state is kept in float32 between steps.
    """
    x = img.float()
    batch, n = x.shape[:2]
    g = None if guidance is None else torch.full((batch,), guidance, device=x.device, dtype=torch.float32)
    ids = img_ids if ref is None else torch.cat([img_ids, ref[1]], dim=1)
    dtype = txt.dtype
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        t = torch.full((batch,), sigma, device=x.device, dtype=torch.float32)
        inp = (x if ref is None else torch.cat([x, ref[0].float()], dim=1)).to(dtype)
        v = model(inp, ids, txt, txt_ids, t, g)[:, :n].float()
        if negative is not None and cfg_scale > 1.0:
            v_neg = model(inp, ids, negative[0], negative[1], t, g)[:, :n].float()
            v = v_neg + cfg_scale * (v - v_neg)
        x = x + (sigma_next - sigma) * v
    return x
