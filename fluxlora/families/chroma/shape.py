"""Chroma's numbers for the memory planner: FLUX.1's blocks without their modulation linears, the approximator and
no CLIP/guidance embedders outside them; activations per token as FLUX.1's (the blocks' matmuls are the same)."""

from __future__ import annotations

from fluxlora.families.base import ModelShape
from fluxlora.families.chroma.model import ChromaParams
from fluxlora.families.flux1.shape import ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH


def _stream_linears(p: ChromaParams) -> list[tuple[int, int]]:
    h, m = p.hidden_size, p.mlp_hidden_dim
    return [(h, 3 * h), (h, h), (h, m), (m, h)]  # qkv, proj, mlp.0, mlp.2


def _single_linears(p: ChromaParams) -> list[tuple[int, int]]:
    h, m = p.hidden_size, p.mlp_hidden_dim
    return [(h, 3 * h + m), (h + m, h)]  # linear1, linear2


def block_params(p: ChromaParams) -> tuple[int, int]:
    """(all parameters of one double block, of one single block)."""
    h, m, hd = p.hidden_size, p.mlp_hidden_dim, p.head_dim
    double = 2 * sum(i * o for i, o in _stream_linears(p)) + 2 * ((3 * h if p.qkv_bias else 0) + h + m + h) + 4 * hd
    single = sum(i * o + o for i, o in _single_linears(p)) + 2 * hd
    return double, single


def chroma_param_count(p: ChromaParams) -> int:
    h, a = p.hidden_size, p.approximator_hidden_size
    double, single = block_params(p)
    approximator = (p.approximator_in_dim * a + a) + p.approximator_depth * (2 * (a * a + a) + a) + (a * h + h)
    outer = (p.in_channels * h + h) + (p.context_in_dim * h + h) + approximator + (h * p.out_channels + p.out_channels)
    return p.depth * double + p.depth_single_blocks * single + outer


def chroma_shape(p: ChromaParams) -> ModelShape:
    double, single = block_params(p)
    outer = chroma_param_count(p) - p.depth * double - p.depth_single_blocks * single
    per_double = 2 * sum(i + o for i, o in _stream_linears(p))
    per_single = sum(i + o for i, o in _single_linears(p))
    return ModelShape(
        double_blocks=p.depth, single_blocks=p.depth_single_blocks, width=p.hidden_size, head_dim=p.head_dim,
        context_dim=p.context_in_dim, double_params=double, single_params=single,
        double_linear_params=2 * sum(i * o for i, o in _stream_linears(p)),
        single_linear_params=sum(i * o for i, o in _single_linears(p)), outer_params=outer,
        lora_params_per_rank=p.depth * per_double + p.depth_single_blocks * per_single,
        activation_bytes=ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH,
    )
