"""The Chroma transformer in the BFL/ComfyUI checkpoint layout (parameter names equal the file keys).

Chroma (lodestones) is FLUX.1-schnell with the conditioning pathway replaced: no `vector_in` (no CLIP-L), no
`guidance_in`, no per-block modulation linears (`img_mod`, `txt_mod`, `modulation`, `final_layer.adaLN_modulation`).
One `distilled_guidance_layer` (an MLP "approximator") maps, for every modulation vector the blocks need, the
embedding of (σ, guidance, index of that vector) to the vector itself. The blocks are FLUX.1's, fed those vectors.

Modulation vector layout (lodestone-rock/flow, ComfyUI, sd-scripts, diffusers): `3·S` single-block vectors, then
`6·D` image-stream and `6·D` text-stream double-block vectors, then 2 for the final layer (shift, scale); the full
model has S = 38, D = 19: 344 vectors. The approximator input is [timestep_embedding(σ, 16) ‖
timestep_embedding(guidance, 16) ‖ timestep_embedding(index, 32)] (all with the ×1000 time factor).

Text masking: Chroma attends to the real T5 tokens plus one padding token; that mask is built by the family's
conditioning (`chroma_text_mask`), the model masks text keys with whatever `txt_mask` it gets, as `Flux` does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxlora.errors import CheckpointError
from fluxlora.models.flux import axes_dim_for
from fluxlora.models.flux_layers import (
    DoubleStreamBlock,
    EmbedND,
    MLPEmbedder,
    ModulationOut,
    RMSNorm,
    SingleStreamBlock,
    timestep_embedding,
)

_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")
_APPROX = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ChromaParams:
    in_channels: int = 64
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    approximator_in_dim: int = 64
    approximator_depth: int = 5
    approximator_hidden_size: int = 5120

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dimension {self.hidden_size // self.num_heads}")
        if self.approximator_in_dim % 4:
            raise ValueError(f"approximator input width {self.approximator_in_dim} must be divisible by 4")
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def mod_index_length(self) -> int:
        """How many modulation vectors the approximator produces: 3 per single block, 12 per double, 2 final."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]], *, path: str | Path | None = None) -> ChromaParams:
        """Every hyper-parameter from BFL-layout key names and shapes (prefix stripped); pruned models load.

        A missing key or an inconsistent shape raises CheckpointError naming it.
        """
        where = f"{path}: " if path is not None else ""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"{where}Chroma transformer key {key!r} is missing; the file is incomplete or "
                                      "not a Chroma transformer", path=path, key=key)
            value = tuple(shapes[key])
            if len(value) != ndim:
                raise CheckpointError(f"{where}{key!r} has shape {list(value)}, expected {ndim} dimensions",
                                      path=path, key=key)
            return value

        hidden, in_channels = shape("img_in.weight", 2)
        context_in_dim = shape("txt_in.weight", 2)[1]
        approx_hidden, approx_in = shape("distilled_guidance_layer.in_proj.weight", 2)
        depth = 1 + max((int(m.group(1)) for k in shapes if (m := _DOUBLE.match(k))), default=-1)
        depth_single = 1 + max((int(m.group(1)) for k in shapes if (m := _SINGLE.match(k))), default=-1)
        approx_depth = 1 + max((int(m.group(1)) for k in shapes if (m := _APPROX.match(k))), default=-1)
        if depth:
            head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale", 1)[0]
            mlp_hidden = shape("double_blocks.0.img_mlp.0.weight", 2)[0]
        elif depth_single:
            head_dim = shape("single_blocks.0.norm.query_norm.scale", 1)[0]
            mlp_hidden = shape("single_blocks.0.linear1.weight", 2)[0] - 3 * hidden
        else:
            head_dim, mlp_hidden = min(128, hidden), 4 * hidden
        if head_dim <= 0 or hidden % head_dim or head_dim % 2 or mlp_hidden <= 0 or approx_in % 4:
            raise CheckpointError(
                f"{where}width {hidden} with QK-norm size {head_dim}, MLP width {mlp_hidden} and approximator input "
                f"{approx_in} is not a valid Chroma transformer; the file is damaged or of another architecture",
                path=path)
        return cls(
            in_channels=in_channels,
            context_in_dim=context_in_dim,
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=axes_dim_for(head_dim),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes if depth else True,
            approximator_in_dim=approx_in,
            approximator_depth=approx_depth,
            approximator_hidden_size=approx_hidden,
        )


class Approximator(nn.Module):
    """`distilled_guidance_layer`: in_proj, then residual RMSNorm→MLP layers, then out_proj to the model width."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, n_layers: int):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim, bias=True)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden_dim) for _ in range(n_layers))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


class ChromaLastLayer(nn.Module):
    """FLUX.1's final layer without its own `adaLN_modulation`: (shift, scale) come from the approximator."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return self.linear((1 + scale) * self.norm_final(x) + shift)


def approximator_input(timesteps: Tensor, guidance: Tensor, params: ChromaParams) -> Tensor:
    """[B, mod_index_length, approximator_in_dim] float32: the (σ, guidance) embedding beside each vector index's."""
    quarter = params.approximator_in_dim // 4
    index = torch.arange(params.mod_index_length, device=timesteps.device, dtype=torch.float32)
    index_emb = timestep_embedding(index, 2 * quarter)  # [L, in/2]
    tg = torch.cat([timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)], dim=1)  # [B, in/2]
    batch, length = timesteps.shape[0], params.mod_index_length
    return torch.cat([tg[:, None, :].expand(batch, length, -1), index_emb[None].expand(batch, -1, -1)], dim=-1)


def _mod(vectors: Tensor, i: int) -> ModulationOut:
    return ModulationOut(shift=vectors[:, i : i + 1], scale=vectors[:, i + 1 : i + 2], gate=vectors[:, i + 2 : i + 3])


class Chroma(nn.Module):
    """Chroma: FLUX.1 blocks modulated by one approximator; `forward` mirrors `Flux.forward` without CLIP or guidance."""

    def __init__(self, params: ChromaParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=params.head_dim, theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.distilled_guidance_layer = Approximator(params.approximator_in_dim, self.hidden_size,
                                                     params.approximator_hidden_size, params.approximator_depth)
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio, qkv_bias=params.qkv_bias,
                              modulation=False)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio, modulation=False)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = ChromaLastLayer(self.hidden_size, self.out_channels)

    def modulations(self, timesteps: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """All modulation vectors [B, mod_index_length, hidden] for σ `timesteps` (guidance None = 0, as trained)."""
        if guidance is None:
            guidance = torch.zeros_like(timesteps, dtype=torch.float32)
        return self.distilled_guidance_layer(approximator_input(timesteps, guidance, self.params).to(dtype))

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        guidance: Tensor | None = None,
        txt_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow for packed image tokens.

        Args:
            img: [B, N, in_channels]; img_ids: [B, N, 3]; txt: [B, L, context_in_dim]; txt_ids: [B, L, 3].
            timesteps: [B] σ in [0, 1]. guidance: [B] or None (= 0: Chroma is trained with guidance 0).
            txt_mask: [B, L] True = attended text token (Chroma: the real tokens and one padding token).
        Returns: [B, N, out_channels].
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, N, C] tensors, got {list(img.shape)} and {list(txt.shape)}")
        img = self.img_in(img)
        mods = self.modulations(timesteps, guidance, img.dtype)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        attn_mask = None
        if txt_mask is not None:
            keys = torch.cat([txt_mask.bool(), txt_mask.new_ones(img.shape[:2], dtype=torch.bool)], dim=1)
            attn_mask = keys[:, None, None, :]

        p = self.params
        img_base, txt_base = 3 * p.depth_single_blocks, 3 * p.depth_single_blocks + 6 * p.depth
        for i, block in enumerate(self.double_blocks):
            i_img, i_txt = img_base + 6 * i, txt_base + 6 * i
            vec = ((_mod(mods, i_img), _mod(mods, i_img + 3)), (_mod(mods, i_txt), _mod(mods, i_txt + 3)))
            img, txt = block(img, txt, vec, pe, attn_mask)
        img = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            img = block(img, _mod(mods, 3 * i), pe, attn_mask)
        img = img[:, txt.shape[1] :, ...]
        return self.final_layer(img, shift=mods[:, -2:-1], scale=mods[:, -1:])
