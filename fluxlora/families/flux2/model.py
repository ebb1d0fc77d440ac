"""The FLUX.2 rectified-flow transformer (BFL layout: parameter names equal the checkpoint keys).

Maths as diffusers' `Flux2Transformer2DModel` and BFL's `flux2` reference: σ and guidance are embedded ×1000 with the
FLUX sinusoidal embedding; `vec = time_in(t) [+ guidance_in(g)]` (no pooled text vector); the three shared
modulations are computed once from `vec`; RoPE over 4 position axes (t, h, w, l), text first in the joint sequence.
The model is only the maths: checkpointing, block swap, offload and compile wrap it from `fluxlora.training`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fluxlora.families.flux2.layers import (
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlock,
)
from fluxlora.families.flux2.params import Flux2Params
from fluxlora.models.flux_layers import EmbedND, timestep_embedding


class Flux2(nn.Module):
    """FLUX.2 [dev] / [klein] transformer: predicts the flow (noise − data) for packed 128-channel latent tokens."""

    def __init__(self, params: Flux2Params):
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        self.in_channels = self.out_channels = params.in_channels
        self.hidden_size = hidden
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(params.in_channels, hidden, bias=False)
        self.time_in = MLPEmbedder(params.time_dim, hidden)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(params.time_dim, hidden)
        self.txt_in = nn.Linear(params.context_in_dim, hidden, bias=False)
        self.double_stream_modulation_img = Modulation(hidden, sets=2)
        self.double_stream_modulation_txt = Modulation(hidden, sets=2)
        self.single_stream_modulation = Modulation(hidden, sets=1)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(hidden, params.in_channels)

    @property
    def guidance_embed(self) -> bool:
        return self.params.guidance_embed

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """Predict the flow for packed image tokens (reference-image tokens may follow the target's).

        Args:
            img: [B, N, in_channels] patched, normalised latents; img_ids: [B, N, 4] (t, h, w, l) positions.
            txt: [B, L, context_in_dim] stacked text-encoder layers; txt_ids: [B, L, 4] (0, 0, 0, token index).
            timesteps: [B] σ in [0, 1]. guidance: [B] guidance scale, required by guidance-distilled [dev] only.
        Returns: [B, N, in_channels].
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, N, C] tensors, got {list(img.shape)} and {list(txt.shape)}")
        img = self.img_in(img)
        dtype = img.dtype
        vec = self.time_in(timestep_embedding(timesteps, self.params.time_dim).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this is a guidance-distilled FLUX.2 [dev] model: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, self.params.time_dim).to(dtype))
        txt = self.txt_in(txt)
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        (single_mod,) = self.single_stream_modulation(vec)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for block in self.double_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, single_mod, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)
