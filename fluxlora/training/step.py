"""One training step's forward pass: σ and noise, the noisy input, the transformer call, the loss (spec §4).

Everything random in a step comes from one `torch.Generator` that the caller seeds from (seed, epoch, batch
index), so a resumed run draws exactly what an uninterrupted one would, and sampling or validation in between
never shift the stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxlora.config.train_config import FlowSettings
from fluxlora import flow


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of a batch: CLIP-L pooled [B,768], T5 states [B,L,4096], T5 mask [B,L] (bool)."""

    clip_pooled: Tensor
    t5_out: Tensor
    t5_mask: Tensor


@dataclass
class StepOutput:
    loss: Tensor  # scalar, float32, with grad
    per_sample: Tensor  # [B] float32, detached (after weights)
    sigmas: Tensor  # [B] float32


def step_seed(seed: int, epoch: int, batch_index: int, purpose: int = 0) -> int:
    """A seed that depends only on (seed, epoch, batch index, purpose)."""
    return (seed * 1_000_003 + epoch * 10_007 + batch_index * 101 + purpose) % (2**63 - 1)


def step_generator(seed: int, epoch: int, batch_index: int, purpose: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, batch index, purpose)."""
    return torch.Generator(device="cpu").manual_seed(step_seed(seed, epoch, batch_index, purpose))


def trim_text(cond: Conditioning) -> Conditioning:
    """Drop T5 positions that are padding in every sample of the batch.

    Exact only when the padded tokens are masked out of attention (`--apply_t5_attn_mask`): then they influence
    nothing, and removing them changes no output while saving their share of every block's work.
    """
    longest = int(cond.t5_mask.sum(dim=1).max().item()) if cond.t5_mask.numel() else 0
    longest = max(longest, 1)
    if longest >= cond.t5_out.shape[1]:
        return cond
    return Conditioning(cond.clip_pooled, cond.t5_out[:, :longest], cond.t5_mask[:, :longest])


def predict_velocity(
    flux: torch.nn.Module,
    x_t: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    *,
    guidance_scale: float | None,
    apply_t5_attn_mask: bool,
    compute_dtype: torch.dtype,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """Run the transformer on unpacked noisy latents [B,16,h,w]; returns the unpacked prediction (float32)."""
    batch, _, height, width = x_t.shape
    device = next(p.device for p in flux.parameters())
    img = flow.pack_latents(x_t).to(device=device, dtype=compute_dtype)
    img_ids = flow.image_ids(batch, height // 2, width // 2, device=device)
    txt = cond.t5_out.to(device=device, dtype=compute_dtype)
    txt_ids = flow.text_ids(batch, txt.shape[1], device=device)
    guidance = None
    if guidance_scale is not None:
        guidance = torch.full((batch,), float(guidance_scale), device=device, dtype=torch.float32)
    mask = cond.t5_mask.to(device) if apply_t5_attn_mask else None
    with autocast():
        pred = flux(img, img_ids, txt, txt_ids, sigmas.to(device), cond.clip_pooled.to(device=device, dtype=compute_dtype),
                    guidance, mask)
    return flow.unpack_latents(pred.float(), height, width)


def training_loss(
    flux: torch.nn.Module,
    latents: Tensor,
    cond: Conditioning,
    settings: FlowSettings,
    *,
    generator: torch.Generator,
    guidance: bool,
    compute_dtype: torch.dtype,
    loss_weights: Tensor | None = None,
    alpha_masks: Tensor | None = None,
    dop: Tensor | None = None,
    set_multiplier: Callable[[float], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    sigmas: Tensor | None = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """The loss of one batch (spec §4.2-4.7). `sigmas`/`noise` may be given (validation uses fixed ones)."""
    x0 = latents.float()
    batch, _, height, width = x0.shape
    if noise is None:
        noise = flow.sample_noise(x0.shape, generator=generator)
    if sigmas is None:
        sigmas = flow.sample_sigmas(
            settings.timestep_sampling, batch, generator=generator, sigmoid_scale=settings.sigmoid_scale,
            discrete_flow_shift=settings.discrete_flow_shift, seq_len=(height // 2) * (width // 2),
            weighting_scheme=settings.weighting_scheme, logit_mean=settings.logit_mean,
            logit_std=settings.logit_std, mode_scale=settings.mode_scale,
        )
    ip_noise = None
    if settings.ip_noise_gamma:
        gamma = flow.ip_noise_strength(settings.ip_noise_gamma, settings.ip_noise_gamma_random_strength, generator)
        ip_noise = gamma * flow.sample_noise(x0.shape, generator=generator)
    noise, sigmas = noise.to(x0.device), sigmas.to(x0.device)
    x_t = flow.noisy_latents(x0, noise, sigmas, ip_noise=None if ip_noise is None else ip_noise.to(x0.device))
    if settings.apply_t5_attn_mask:
        cond = trim_text(cond)

    def predict() -> Tensor:
        return predict_velocity(flux, x_t, sigmas, cond, guidance_scale=settings.guidance_scale if guidance else None,
                                apply_t5_attn_mask=settings.apply_t5_attn_mask, compute_dtype=compute_dtype,
                                autocast=autocast)

    pred = predict().to(x0.device)
    value, type_weight = flow.apply_prediction_type(settings.model_prediction_type, pred, x_t, sigmas,
                                                    settings.weighting_scheme)
    target = flow.flow_target(x0, noise)
    if dop is not None and bool(dop.any()) and set_multiplier is not None:
        target = _preservation_target(target, dop, predict, set_multiplier, settings, x_t, sigmas)
    c = None
    if settings.loss_type in ("huber", "smooth_l1"):
        c = flow.huber_c(settings.huber_schedule, settings.huber_c, settings.huber_scale, sigmas)
    elementwise = flow.elementwise_loss(settings.loss_type, value, target, c)
    weights = torch.ones(batch, device=x0.device) if loss_weights is None else loss_weights.to(x0.device).float()
    if type_weight is not None:
        weights = weights * type_weight.to(x0.device)
    mask = None if alpha_masks is None else flow.latent_mask(alpha_masks.to(x0.device), height, width)
    per_sample = flow.per_sample_loss(elementwise, mask=mask) * weights
    return StepOutput(loss=per_sample.mean(), per_sample=per_sample.detach(), sigmas=sigmas)


def _preservation_target(
    target: Tensor, dop: Tensor, predict: Callable[[], Tensor], set_multiplier: Callable[[float], None],
    settings: FlowSettings, x_t: Tensor, sigmas: Tensor,
) -> Tensor:
    """Differential output preservation (spec §4.7): for marked samples the target is the base model's own
    prediction (LoRA multiplier 0), so the LoRA learns to leave those prompts unchanged."""
    set_multiplier(0.0)
    try:
        with torch.no_grad():
            prior = predict()
    finally:
        set_multiplier(1.0)
    prior_value, _ = flow.apply_prediction_type(settings.model_prediction_type, prior.to(x_t.device), x_t, sigmas,
                                                settings.weighting_scheme)
    keep = dop.to(target.device).view(-1, *([1] * (target.dim() - 1)))
    return torch.where(keep, prior_value, target)
