"""FLUX.1's numbers for the memory planner: parameter counts by block kind from the hyper-parameters, the measured
activation bytes per token, and what its text encoder and AE hold while encoding."""

from __future__ import annotations

from fluxlora.families.base import ModelShape
from fluxlora.models.flux import FluxParams

# Saved-for-backward bytes per token per unit of width for one block (LoRA on every Linear). Measured with
# torch.autograd.graph.saved_tensors_hooks at width 256 with rank-4 LoRA; "bf16" is bf16 autocast over bf16
# activations.
ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH = {
    ("fp32", "double"): 102.5, ("fp32", "single"): 82.3,
    ("bf16", "double"): 54.3, ("bf16", "single"): 50.3,
}
# Full-resolution 128-channel maps the AE encoder holds at once (a ResNet block's input, GroupNorm output, SiLU
# output, conv output); see `ae_encode_bytes`.
AE_ENCODE_MAPS = 4


def _stream_linears(p: FluxParams) -> list[tuple[int, int]]:
    h, m = p.hidden_size, p.mlp_hidden_dim
    return [(h, 6 * h), (h, 3 * h), (h, h), (h, m), (m, h)]  # mod, qkv, proj, mlp.0, mlp.2


def _single_linears(p: FluxParams) -> list[tuple[int, int]]:
    h, m = p.hidden_size, p.mlp_hidden_dim
    return [(h, 3 * h + m), (h + m, h), (h, 3 * h)]  # linear1, linear2, modulation


def block_params(p: FluxParams) -> tuple[int, int]:
    """(all parameters of one double block, of one single block)."""
    h, m, hd = p.hidden_size, p.mlp_hidden_dim, p.head_dim
    double_linear = 2 * sum(i * o for i, o in _stream_linears(p))
    double_bias = 2 * (6 * h + (3 * h if p.qkv_bias else 0) + h + m + h)
    double = double_linear + double_bias + 2 * 2 * hd  # + QK-norm scales
    single = sum(i * o + o for i, o in _single_linears(p)) + 2 * hd
    return double, single


def linear_weight_params(p: FluxParams) -> tuple[int, int]:
    """(Linear weights of one double block, of one single block)."""
    return 2 * sum(i * o for i, o in _stream_linears(p)), sum(i * o for i, o in _single_linears(p))


def flux_param_count(p: FluxParams) -> int:
    h = p.hidden_size
    double, single = block_params(p)
    outer = (p.in_channels * h + h) + 2 * (256 * h + h + h * h + h) + (p.vec_in_dim * h + h + h * h + h)
    outer -= 0 if p.guidance_embed else (256 * h + h + h * h + h)
    outer += p.context_in_dim * h + h + (h * 2 * h + 2 * h) + (h * p.out_channels + p.out_channels)  # Fill: 64 out
    return p.depth * double + p.depth_single_blocks * single + outer


def lora_param_count(p: FluxParams, rank: int) -> int:
    """LoRA parameters of rank `rank` on every block Linear."""
    per_double = 2 * sum(i + o for i, o in _stream_linears(p))
    per_single = sum(i + o for i, o in _single_linears(p))
    return rank * (p.depth * per_double + p.depth_single_blocks * per_single)


def flux_shape(p: FluxParams) -> ModelShape:
    double, single = block_params(p)
    lin_double, lin_single = linear_weight_params(p)
    outer = flux_param_count(p) - p.depth * double - p.depth_single_blocks * single
    return ModelShape(
        double_blocks=p.depth, single_blocks=p.depth_single_blocks, width=p.hidden_size, head_dim=p.head_dim,
        context_dim=p.context_in_dim, double_params=double, single_params=single, double_linear_params=lin_double,
        single_linear_params=lin_single, outer_params=outer, lora_params_per_rank=lora_param_count(p, 1),
        activation_bytes=ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH,
    )


def ae_encode_bytes(pixels: int, dtype_bytes: int) -> int:
    """Device bytes the FLUX.1 AE encoder holds at once for one image of `pixels` pixels (no grad): a few
    128-channel full-resolution feature maps (`AE_ENCODE_MAPS`) and the float32 input."""
    return int(pixels * (AE_ENCODE_MAPS * 128 * dtype_bytes + 3 * 4))


def t5_encode_bytes(tokens: int, dtype_bytes: int) -> int:
    """Device bytes T5-XXL holds at once for one caption of `tokens` tokens (no grad, analytic): one layer's
    attention scores and their float32 softmax (64 heads), the gated FFN (3 × 10240 wide), a few 4096-wide hidden
    states, and the float32 output the cache copies."""
    heads, d_model, d_ff = 64, 4096, 10240
    return int(heads * tokens ** 2 * (2 * dtype_bytes + 4) + tokens * (3 * d_ff + 5 * d_model) * dtype_bytes
               + tokens * d_model * 4)
