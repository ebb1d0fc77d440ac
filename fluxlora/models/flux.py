"""The FLUX.1 rectified-flow transformer (BFL layout: parameter names equal the checkpoint keys).

`FluxParams.from_shapes` derives every hyper-parameter from a checkpoint's key names and shapes, so
pruned, tiny and full models go through the same code. Rule for the RoPE split of a head dimension
other than 128 (nothing extra is stored in a file): the (16, 56, 56) split of 128 scaled down,
`a = 2·⌊7·head_dim/32⌋`, `axes_dim = (head_dim − 2a, a, a)` — 128 → (16, 56, 56), 32 → (4, 14, 14),
64 → (8, 28, 28); every part stays even as rotation pairs need.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlora.errors import CheckpointError
from fluxlora.models.flux_layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)

_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")


def axes_dim_for(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes split for a head dimension: BFL's (16, 56, 56) for 128, scaled proportionally otherwise."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head dimension must be a positive even number, got {head_dim}")
    a = 2 * ((7 * head_dim) // 32)
    return (head_dim - 2 * a, a, a)


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True
    out_channels: int | None = None  # None = in_channels; FLUX.1 Fill reads 384 channels and predicts 64

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dimension {self.hidden_size // self.num_heads}")
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embed else "schnell"

    @classmethod
    def dev(cls) -> FluxParams:
        return cls()

    @classmethod
    def schnell(cls) -> FluxParams:
        return cls(guidance_embed=False)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], *, path: str | Path | None = None) -> FluxParams:
        """Derive every hyper-parameter from BFL key names and shapes (prefix already stripped).

        Depths are max block index + 1 (pruned models load); heads = width / QK-norm scale size; schnell iff
        there is no `guidance_in`. A missing key or an inconsistent shape raises CheckpointError naming it.
        """
        where = f"{path}: " if path is not None else ""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"{where}FLUX transformer key {key!r} is missing; the file is incomplete or not a "
                                      "FLUX.1 transformer", path=path, key=key)
            value = tuple(shapes[key])
            if len(value) != ndim:
                raise CheckpointError(f"{where}{key!r} has shape {list(value)}, expected {ndim} dimensions",
                                      path=path, key=key)
            return value

        hidden, in_channels = shape("img_in.weight", 2)
        vec_in_dim = shape("vector_in.in_layer.weight", 2)[1]
        context_in_dim = shape("txt_in.weight", 2)[1]
        depth = 1 + max((int(m.group(1)) for k in shapes if (m := _DOUBLE.match(k))), default=-1)
        depth_single = 1 + max((int(m.group(1)) for k in shapes if (m := _SINGLE.match(k))), default=-1)

        if depth:
            head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale", 1)[0]
            mlp_hidden = shape("double_blocks.0.img_mlp.0.weight", 2)[0]
        elif depth_single:
            head_dim = shape("single_blocks.0.norm.query_norm.scale", 1)[0]
            mlp_hidden = shape("single_blocks.0.linear1.weight", 2)[0] - 3 * hidden
        else:
            head_dim, mlp_hidden = min(128, hidden), 4 * hidden
        if head_dim <= 0 or hidden % head_dim or head_dim % 2 or mlp_hidden <= 0:
            raise CheckpointError(
                f"{where}width {hidden} with QK-norm size {head_dim} and MLP width {mlp_hidden} is not a valid FLUX "
                "transformer; the file is damaged or of another architecture", path=path)
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes if depth else True
        return cls(
            in_channels=in_channels,
            vec_in_dim=vec_in_dim,
            context_in_dim=context_in_dim,
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=axes_dim_for(head_dim),
            qkv_bias=qkv_bias,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            out_channels=shape("final_layer.linear.weight", 2)[0],
        )

    def with_variant(self, variant: str) -> FluxParams:
        return replace(self, guidance_embed=(variant == "dev"))


class Flux(nn.Module):
    """Transformer model for flow matching on sequences (BFL `Flux`). Training policy (checkpointing, offload, block
    swap, compile) wraps its blocks from `fluxlora.training`; the model itself is plain."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio, qkv_bias=params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    @property
    def variant(self) -> str:
        return self.params.variant

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow for packed image tokens.

        Args:
            img: [B, N, in_channels] packed latents; img_ids: [B, N, 3]; txt: [B, L, context_in_dim]; txt_ids: [B, L, 3].
            timesteps: [B] σ in [0, 1] (kept fp32; ×1000 inside). y: [B, vec_in_dim] pooled CLIP.
            guidance: [B] raw guidance scale (dev only, required there). txt_mask: [B, L] True = real token;
                it masks text keys only (all image tokens are always attended to).
        Returns: [B, N, out_channels] (= in_channels except for FLUX.1 Fill).
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, N, C] tensors, got {list(img.shape)} and {list(txt.shape)}")
        img = self.img_in(img)
        dtype = img.dtype  # activation dtype (autocast or weight dtype)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this is a FLUX.1-dev model (guidance-distilled): pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = self.pe_embedder(ids)
        attn_mask = None
        if txt_mask is not None:
            keys = torch.cat([txt_mask.bool(), txt_mask.new_ones(img.shape[:2], dtype=torch.bool)], dim=1)
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, L + N], broadcast over heads and queries

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, attn_mask)

        img = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            img = block(img, vec, pe, attn_mask)
        img = img[:, txt.shape[1] :, ...]
        return self.final_layer(img, vec)  # [B, N, out_channels]
