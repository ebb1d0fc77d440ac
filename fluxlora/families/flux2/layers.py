"""FLUX.2 transformer blocks in the BFL layout: attribute names equal the checkpoint keys.

What differs from FLUX.1 (`fluxlora.models.flux_layers`, whose RoPE, attention and QK-norm are reused): no biases;
SwiGLU MLPs (`img_mlp.0` projects to 2·mlp_hidden, silu(first half) · second half, `img_mlp.2` back); modulation is
not per block but computed once by the model (`double_stream_modulation_img/txt`, `single_stream_modulation`) and
passed in; the single block's fused `linear1` holds q, k, v and both SwiGLU halves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fluxlora.models.flux_layers import QKNorm, attention


def swiglu(x: Tensor) -> Tensor:
    """silu(first half) · second half, along the last dimension."""
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class SwiGLU(nn.Module):
    """Parameter-free activation between `mlp.0` and `mlp.2` (index 1 of the BFL Sequential)."""

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


class MLPEmbedder(nn.Module):
    """Timestep / guidance embedder: in_layer → SiLU → out_layer, without biases."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """Shared adaLN parameters: `lin(silu(vec))` split into `sets` × (shift, scale, gate), each [B, 1, D]."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1)
        return tuple((out[3 * i], out[3 * i + 1], out[3 * i + 2]) for i in range(self.sets))


class SelfAttention(nn.Module):
    """One stream's qkv / QK-norm / output projection (the attention itself is joint over both streams)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


Mod = tuple[Tensor, Tensor, Tensor]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * x + shift


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, joint attention over [txt ‖ img]; modulation comes from the model."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, img_mod: tuple[Mod, Mod], txt_mod: tuple[Mod, Mod],
                pe: Tensor) -> tuple[Tensor, Tensor]:
        (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = img_mod
        (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = txt_mod
        img_q, img_k, img_v = self.img_attn.qkv_heads(_modulate(self.img_norm1(img), i_shift1, i_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(_modulate(self.txt_norm1(txt), t_shift1, t_scale1))
        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp(_modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(_modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU MLP over the joint sequence: `linear1` → [q k v | gate value], `linear2` back."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + 2 * self.mlp_hidden_dim, bias=False)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = SwiGLU()

    def forward(self, x: Tensor, mod: Mod, pe: Tensor) -> Tensor:
        shift, scale, gate = mod
        qkv, mlp = torch.split(self.linear1(_modulate(self.pre_norm(x), shift, scale)),
                               [3 * self.hidden_size, 2 * self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe=pe), self.mlp_act(mlp)), dim=2))
        return x + gate * out


class LastLayer(nn.Module):
    """adaLN (shift, scale) from `adaLN_modulation.1`, then the linear projection back to patch channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift[:, None, :], scale[:, None, :]))
