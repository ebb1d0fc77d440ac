"""Kontext's transformer input: the reference image's packed latent tokens after the noisy ones, told apart by
their position ids' first axis (0 = the image being generated, 1 = the reference), as BFL's `prepare_kontext` and
diffusers' `FluxKontextPipeline` build them. The reference keeps its own grid (it may differ in size from the
output); the transformer's prediction for the reference tokens is dropped.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

REFERENCE_INDEX = 1  # first position-id axis of reference tokens (noisy tokens have 0)


def pack(latents: Tensor) -> Tensor:
    """Latents [B, C, h, w] → 2×2-patch tokens [B, (h/2)(w/2), 4C] (the FLUX.1 packing)."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def grid_ids(batch: int, h2: int, w2: int, *, index: float = 0.0, device: torch.device | str | None = None) -> Tensor:
    """Position ids [B, h2·w2, 3] of a token grid: (index, row, col) in row-major order, float32."""
    ids = torch.zeros(h2, w2, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h2, device=device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(w2, device=device, dtype=torch.float32)[None, :]
    return ids.reshape(1, h2 * w2, 3).expand(batch, -1, -1)


def with_reference(img: Tensor, img_ids: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens, ids) of the noisy tokens [B, N, 4C] (ids [B, N, 3]) followed by those of the reference latents
    [B, C, h', w'] (cast to the tokens' dtype and device)."""
    batch, _, h, w = reference.shape
    ref = pack(reference).to(device=img.device, dtype=img.dtype)
    ref_ids = grid_ids(batch, h // 2, w // 2, index=REFERENCE_INDEX, device=img.device).to(img_ids.dtype)
    return torch.cat([img, ref], dim=1), torch.cat([img_ids, ref_ids], dim=1)


def noisy_part(prediction: Tensor, num_noisy: int) -> Tensor:
    """The prediction for the noisy tokens only (the first `num_noisy`)."""
    return prediction[:, :num_noisy]
