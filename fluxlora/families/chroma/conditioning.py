"""Chroma's text conditioning: T5 only (no CLIP-L), encoded with the T5 mask, and the DiT's text-key mask.

Chroma was trained attending to the real T5 tokens plus exactly one padding token (lodestone-rock/flow
`train_chroma.py`, sd-scripts `attn_padding=1`, ComfyUI, diffusers' `ChromaPipeline`).
"""

from __future__ import annotations

import torch
from torch import Tensor

ATTENDED_PADDING = 1  # padding tokens after the real ones that Chroma attends to


def chroma_text_mask(t5_mask: Tensor, padding: int = ATTENDED_PADDING) -> Tensor:
    """Bool [B, L] DiT text mask: the tokenizer's (right-padded) mask extended by `padding` tokens, within L."""
    lengths = t5_mask.to(torch.int64).sum(dim=1, keepdim=True)
    positions = torch.arange(t5_mask.shape[1], device=t5_mask.device)[None]
    return positions < lengths + padding
