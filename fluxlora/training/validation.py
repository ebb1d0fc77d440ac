"""Validation loss that means the same thing at every step and in every run (spec §9, fixing §12.17-12.18).

Every validation batch is scored at fixed noise levels σ ∈ {0.2, 0.4, 0.6, 0.8} (the timesteps 200..800 that
sd-scripts intends but its FLUX sampler ignores) with noise drawn from a generator seeded by (validation seed,
batch, σ index). The LoRA runs in eval mode (no dropout) and schedule-free optimizers use their averaged
weights. Nothing here touches the training RNG streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from fluxlora.training import flow
from fluxlora.training.step import Conditioning, StepOutput, step_generator

VALIDATION_SIGMAS = (0.2, 0.4, 0.6, 0.8)


@torch.no_grad()
def validation_loss(
    batches: Iterable[dict[str, Any]],
    score: Callable[[dict[str, Any], torch.Tensor, torch.Tensor], StepOutput],
    latents_of: Callable[[dict[str, Any]], torch.Tensor],
    *,
    seed: int,
    max_batches: int | None = None,
    sigmas: tuple[float, ...] = VALIDATION_SIGMAS,
) -> float:
    """Mean loss over validation batches × fixed σ values. `score(batch, sigmas, noise)` runs the training loss."""
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        latents = latents_of(batch)
        for j, sigma in enumerate(sigmas):
            generator = step_generator(seed, 0, i, purpose=1000 + j)
            noise = flow.sample_noise(latents.shape, generator=generator)
            fixed = torch.full((latents.shape[0],), float(sigma), dtype=torch.float32)
            out = score(batch, fixed, noise)
            total += float(out.loss)
            count += 1
    return total / count if count else float("nan")


__all__ = ["VALIDATION_SIGMAS", "validation_loss", "Conditioning"]
