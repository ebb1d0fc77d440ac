"""FLUX.2 latent layout: 2×2 patching of the AE's 32-channel latent, token packing and 4-axis position ids.

Pure functions, as BFL `flux2/sampling.py` and diffusers' Flux2 pipelines define them. Position ids are (t, h, w, l):
the target image has t = 0, reference image i has t = 10 + 10·i (`REF_TIME_SCALE`), text tokens are (0, 0, 0, index).
"""

from __future__ import annotations

import torch
from torch import Tensor

REF_TIME_SCALE = 10


def patchify(z: Tensor, p: int = 2) -> Tensor:
    """[B, C, H, W] → [B, C·p·p, H/p, W/p], channels ordered (c, row-in-patch, column-in-patch)."""
    b, c, h, w = z.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}×{w} is not a multiple of the {p}×{p} patch")
    return z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: Tensor, p: int = 2) -> Tensor:
    """Inverse of `patchify`: [B, C·p·p, h, w] → [B, C, p·h, p·w]."""
    b, c, h, w = z.shape
    return z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)


def pack(z: Tensor) -> Tensor:
    """[B, C, h, w] → tokens [B, h·w, C] (row-major)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens [B, h·w, C] (row-major, as `pack` made them) → [B, C, h, w]."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}×{w} latent")
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def image_ids(h: int, w: int, *, t: int = 0, batch: int = 1, device: torch.device | str | None = None) -> Tensor:
    """[B, h·w, 4] positions (t, row, column, 0) of a packed h×w latent."""
    ids = torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.to(device=device, dtype=torch.float32)[None].expand(batch, -1, -1)


def text_ids(length: int, *, batch: int = 1, device: torch.device | str | None = None) -> Tensor:
    """[B, L, 4] positions (0, 0, 0, index) of the text tokens."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.to(device=device, dtype=torch.float32)[None].expand(batch, -1, -1)


def reference_tokens(latents: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Reference-image latents [B, C, h_i, w_i] → (tokens [B, Σ h_i·w_i, C], ids [B, Σ, 4]) with t = 10 + 10·i."""
    if not latents:
        raise ValueError("reference_tokens needs at least one reference latent")
    batch = latents[0].shape[0]
    tokens = [pack(z) for z in latents]
    ids = [image_ids(z.shape[2], z.shape[3], t=REF_TIME_SCALE * (1 + i), batch=batch, device=z.device)
           for i, z in enumerate(latents)]
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)
