"""FLUX.2's numbers for the memory planner (`ModelShape`), from the exact counts of `memory.py`, the measured
activation bytes per token, and what its text encoder holds while encoding."""

from __future__ import annotations

from fluxlora.families.base import ModelShape
from fluxlora.families.flux2 import memory
from fluxlora.families.flux2.params import Flux2Params

# Saved-for-backward bytes per token per unit of width for one block (LoRA on every Linear), measured with
# torch.autograd.graph.saved_tensors_hooks at width 256 (2 heads), MLP ratio 3, rank-4 LoRA, 128 tokens
# (tests/families/flux2/test_flux2_family.py re-measures them at another width); "bf16" is bf16 autocast over bf16
# activations. Close to FLUX.1's (102.5 / 82.3): SwiGLU keeps more per token, no biases and no modulation fewer.
ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH = {
    ("fp32", "double"): 100.8, ("fp32", "single"): 86.1,
    ("bf16", "double"): 54.5, ("bf16", "single"): 53.1,
}


def stream_linears(p: Flux2Params) -> list[tuple[int, int]]:
    """(in, out) of one double-block stream's Linears: qkv, proj, SwiGLU in, SwiGLU out."""
    d, m = p.hidden_size, p.mlp_hidden_dim
    return [(d, 3 * d), (d, d), (d, 2 * m), (m, d)]


def single_linears(p: Flux2Params) -> list[tuple[int, int]]:
    """(in, out) of a single block's Linears: linear1 (q, k, v, SwiGLU halves), linear2."""
    d, m = p.hidden_size, p.mlp_hidden_dim
    return [(d, 3 * d + 2 * m), (d + m, d)]


def lora_param_count(p: Flux2Params, rank: int) -> int:
    """LoRA parameters of rank `rank` on every block Linear."""
    per_double = 2 * sum(i + o for i, o in stream_linears(p))
    per_single = sum(i + o for i, o in single_linears(p))
    return rank * (p.depth * per_double + p.depth_single_blocks * per_single)


def flux2_shape(p: Flux2Params) -> ModelShape:
    """The planner's numbers for a FLUX.2 transformer (no biases: every Linear parameter is a weight)."""
    return ModelShape(
        double_blocks=p.depth, single_blocks=p.depth_single_blocks, width=p.hidden_size, head_dim=p.head_dim,
        context_dim=p.context_in_dim, double_params=memory.double_block_params(p),
        single_params=memory.single_block_params(p),
        double_linear_params=2 * sum(i * o for i, o in stream_linears(p)),
        single_linear_params=sum(i * o for i, o in single_linears(p)),
        outer_params=memory.shared_params(p), lora_params_per_rank=lora_param_count(p, 1),
        activation_bytes=ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH,
    )


def text_encode_bytes(tokens: int, dtype_bytes: int, shape: memory.EncoderShape = memory.MISTRAL_SMALL_3) -> int:
    """Device bytes the text encoder holds at once for one caption of `tokens` tokens (no grad, analytic): every
    layer's hidden state (the pipelines ask for all of them), one layer's attention scores with their float32 softmax,
    its SwiGLU MLP (gate, up and their product), and the stacked float output. Default: Mistral Small 3, the
    largest."""
    hidden_states = (shape.layers + 1) * tokens * shape.hidden * dtype_bytes
    attention = shape.heads * tokens ** 2 * (dtype_bytes + 4)
    mlp = 3 * tokens * shape.intermediate * dtype_bytes
    return int(hidden_states + attention + mlp + 3 * tokens * shape.hidden * 4)
