"""Fill's transformer input: per packed token, the noisy latents (64) ‖ the masked image's latents (64) ‖ the mask
(256: its 8×8 pixel patches at latent resolution, then 2×2-packed), 384 channels, as BFL's `prepare_fill` and
diffusers' `FluxFillPipeline` build them. The mask is 1 where the model paints; the masked image
(`fluxlora.data.pairs.masked_image`) is the image in [-1, 1] with those pixels set to 0.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

AE_FACTOR = 8  # pixels per latent side
MASK_CHANNELS = 4 * AE_FACTOR * AE_FACTOR  # 256 per packed token


def pack(latents: Tensor) -> Tensor:
    """Latents [B, C, h, w] → 2×2-patch tokens [B, (h/2)(w/2), 4C] (the FLUX.1 packing)."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def pack_mask(mask: Tensor) -> Tensor:
    """Pixel mask [B, 1, H, W] → [B, (H/16)(W/16), 256]: each 8×8 pixel patch becomes 64 channels of one latent
    pixel, then 2×2 latent pixels one token (H, W multiples of 16)."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] % 16 or mask.shape[3] % 16:
        raise ValueError(f"Fill mask must be [B, 1, H, W] with H and W multiples of 16, got {list(mask.shape)}")
    patches = rearrange(mask[:, 0], "b (h ph) (w pw) -> b (ph pw) h w", ph=AE_FACTOR, pw=AE_FACTOR)
    return pack(patches)


def fill_conditioning(masked_latents: Tensor, mask: Tensor) -> Tensor:
    """[B, N, 320]: the packed masked-image latents [B, 16, h, w] ‖ the packed pixel mask [B, 1, 8h, 8w]."""
    return torch.cat([pack(masked_latents), pack_mask(mask).to(masked_latents.dtype)], dim=-1)


def fill_input(img: Tensor, conditioning: Tensor) -> Tensor:
    """The transformer input [B, N, 384]: noisy tokens [B, N, 64] ‖ their Fill conditioning [B, N, 320]."""
    return torch.cat([img, conditioning.to(device=img.device, dtype=img.dtype)], dim=-1)
