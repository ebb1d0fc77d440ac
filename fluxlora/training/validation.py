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

from fluxlora import flow
from fluxlora.training.step import StepOutput, step_generator

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
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Mean loss over validation batches × fixed σ values. `score(batch, sigmas, noise)` runs the training loss.

    Noise is keyed by the batch's own `batch_index` (its place in the whole validation list), so a process that
    scores only its share of the batches draws the same noise as a single process would; `reduce_sum` (a sum
    over processes, e.g. `accelerator.reduce(t, "sum")`) then turns the per-process sums into the global mean.
    """
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        index = int(batch.get("batch_index", i))
        if max_batches is not None and index >= max_batches:
            continue
        latents = latents_of(batch)
        for j, sigma in enumerate(sigmas):
            generator = step_generator(seed, 0, index, purpose=1000 + j)
            noise = flow.sample_noise(latents.shape, generator=generator)
            fixed = torch.full((latents.shape[0],), float(sigma), dtype=torch.float32)
            out = score(batch, fixed, noise)
            total += float(out.loss)
            count += 1
    if reduce_sum is not None:
        summed = reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64))
        total, count = float(summed[0]), int(round(float(summed[1])))
    return total / count if count else float("nan")

__all__ = ["VALIDATION_SIGMAS", "validation_loss"]
