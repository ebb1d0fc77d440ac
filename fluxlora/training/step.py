"""One optimizer step, top to bottom: batch → conditioning → noise and σ → prediction → loss → backward →
(accumulation, all-reduce, clip) → optimizer and scheduler → the values logged.

`train_step` is the whole step; `training_loss` is the part of it that validation scores too (at fixed σ and noise).
Everything random in a step comes from generators seeded by (seed, epoch, batch index), so a resumed run draws
exactly what an uninterrupted one would, and sampling or validation in between never shift the streams.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fluxlora import flow
from fluxlora.config.train_config import FlowSettings
from fluxlora.data.pairs import pair_conditioning
from fluxlora.families.base import Autocast, Conditioning, ModelFamily, TextEncoders
from fluxlora.training.models import Models, latent_encoder
from fluxlora.training.plan import RunPlan
from fluxlora.training.processes import Processes


@dataclass
class StepOutput:
    loss: Tensor  # scalar, float32, with grad
    per_sample: Tensor  # [B] float32, detached (after weights)
    sigmas: Tensor  # [B] float32


@dataclass
class Trainable:
    """What the optimizer updates: the LoRA network, its optimizer, scheduler and fp16 gradient scaler."""

    network: Any  # LoRANetwork (or another adapter network with the same interface)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any | None
    param_group_names: list[str]
    trained_encoders: frozenset[str]  # text-encoder components that carry LoRA modules

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def lr_logs(self) -> dict[str, float]:
        return {f"lr/{name}": float(group["lr"])
                for name, group in zip(self.param_group_names, self.optimizer.param_groups, strict=False)}


@dataclass
class StepResult:
    stepped: bool  # False: a non-finite loss or gradient, the step was skipped (and the gradients cleared)
    loss: float  # mean over micro-batches and processes
    grad_norm: float | None
    logs: dict[str, float] = field(default_factory=dict)


def step_seed(seed: int, epoch: int, batch_index: int, purpose: int = 0) -> int:
    """A seed that depends only on (seed, epoch, batch index, purpose)."""
    return (seed * 1_000_003 + epoch * 10_007 + batch_index * 101 + purpose) % (2**63 - 1)


def step_generator(seed: int, epoch: int, batch_index: int, purpose: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, batch index, purpose)."""
    return torch.Generator(device="cpu").manual_seed(step_seed(seed, epoch, batch_index, purpose))


def train_step(plan: RunPlan, models: Models, trainable: Trainable, processes: Processes,
               batches: list[dict[str, Any]], *, epoch: int, agree: Callable[[float], float],
               on_loss: Callable[[Tensor], Tensor] | None = None) -> StepResult:
    """One optimizer step over `batches` (its gradient-accumulation micro-batches, this process's share).

    `agree(loss)` turns this process's loss into the loss of all processes (one small all-reduce); `on_loss` may
    replace a micro-batch's loss before backward (fault injection in tests)."""
    cfg, device = plan.cfg, processes.device
    accum = cfg.training.gradient_accumulation_steps
    autocast = plan.precision.autocast(device)
    losses = []
    for batch in batches:
        index = batch["batch_index"]
        # LoRA dropouts draw from torch's global RNG: reseed it per batch so they too depend only on the position
        torch.manual_seed(step_seed(plan.seed, epoch, index, purpose=1))
        latents = latents_of(batch, models, plan, device)
        cond = conditioning_of(batch, models.text, trainable.trained_encoders, pixel_encoder(models, plan, device))
        out = training_loss(
            plan.family, models.transformer, latents, cond, cfg.flow, generator=step_generator(plan.seed, epoch, index),
            guidance=plan.guidance, compute_dtype=plan.precision.compute, autocast=autocast,
            loss_weights=batch["loss_weights"], alpha_masks=batch.get("alpha_masks"), dop=batch.get("dop"),
            set_multiplier=trainable.network.set_multiplier,
        )
        loss = on_loss(out.loss) if on_loss is not None else out.loss
        scaled = loss / accum
        (trainable.scaler.scale(scaled) if trainable.scaler is not None else scaled).backward()
        losses.append(float(loss.detach()))
    loss = agree(sum(losses) / len(losses))

    # all processes reduce the same gradients before unscaling, so the fp16 scaler sees the same inf/NaN everywhere
    # and they all skip or step together
    params = trainable.params
    processes.average_gradients(params)
    if trainable.scaler is not None:
        trainable.scaler.unscale_(trainable.optimizer)
    max_norm = cfg.optim.max_grad_norm
    if max_norm and max_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack(
            [p.grad.detach().float().norm() for p in params if p.grad is not None] or [torch.zeros(())])))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        trainable.optimizer.zero_grad(set_to_none=True)
        if trainable.scaler is not None:
            trainable.scaler.update()
        return StepResult(stepped=False, loss=loss, grad_norm=grad_norm)

    trainable.network.update_norms()  # GGPO's weight norms, before the weights change
    if trainable.scaler is not None:
        trainable.scaler.step(trainable.optimizer)
        trainable.scaler.update()
    else:
        trainable.optimizer.step()
    trainable.scheduler.step()
    trainable.optimizer.zero_grad(set_to_none=True)

    logs = {"loss/current": loss, **trainable.lr_logs(), "norm/avg_grad_norm": grad_norm}
    if cfg.network.scale_weight_norms:
        scaled_keys, mean, largest = trainable.network.apply_max_norm(cfg.network.scale_weight_norms, device)
        logs.update({"max_norm/keys_scaled": scaled_keys, "max_norm/average_key_norm": mean,
                     "max_norm/max_key_norm": largest})
    return StepResult(stepped=True, loss=loss, grad_norm=grad_norm, logs=logs)


def latents_of(batch: dict[str, Any], models: Models, plan: RunPlan, device: torch.device) -> Tensor:
    """The batch's latents: from the cache, or encoded now with the AE."""
    if "latents" in batch:
        return batch["latents"].to(device, torch.float32)
    return latent_encoder(models.ae, plan.precision, device)(batch["images"])


def pixel_encoder(models: Models, plan: RunPlan, device: torch.device) -> Callable[[Tensor], Tensor] | None:
    """The AE as pixels → latents, for the images of pairs that are not cached (None when the AE is gone)."""
    return latent_encoder(models.ae, plan.precision, device) if models.ae is not None else None


def conditioning_of(batch: dict[str, Any], text: TextEncoders, trained: Collection[str],
                    encode: Callable[[Tensor], Tensor] | None = None) -> Conditioning:
    """The batch's text conditioning: cached outputs (with the outputs of encoders whose LoRA trains recomputed,
    sd-scripts' partial caching), or encoded now; plus the image conditioning of its pairs (reference latents, or a
    mask and the masked image's latents), cached or encoded now with `encode`."""
    captions = list(batch["captions"])
    if "text" in batch:
        cond = text.update(dict(batch["text"]), captions, trained)
    else:
        cond = text.encode(captions, grad=trained)
    return {**cond, **pair_conditioning(batch, encode)}  # [fam1 hook: pairs]


def training_loss(
    family: ModelFamily,
    model: nn.Module,
    latents: Tensor,
    cond: Conditioning,
    settings: FlowSettings,
    *,
    generator: torch.Generator,
    guidance: float | None,
    compute_dtype: torch.dtype,
    loss_weights: Tensor | None = None,
    alpha_masks: Tensor | None = None,
    dop: Tensor | None = None,
    set_multiplier: Callable[[float], None] | None = None,
    autocast: Autocast = contextlib.nullcontext,
    sigmas: Tensor | None = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """The loss of one batch (spec §4.2-4.7): noise and σ (drawn from `generator` unless given: validation fixes
    them) → noisy latents → the family's prediction → the flow-matching loss, weighted per sample."""
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
    if settings.apply_t5_attn_mask:  # padding is masked out, so dropping it changes nothing and saves work
        cond = family.trim_text(cond)

    def predict() -> Tensor:
        return family.predict(model, x_t, sigmas, cond, guidance=guidance, mask_text=settings.apply_t5_attn_mask,
                              compute_dtype=compute_dtype, autocast=autocast).to(x0.device)

    pred = predict()
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
