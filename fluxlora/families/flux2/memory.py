"""The sizes the planner needs for FLUX.2, as pure functions of the hyper-parameters (no weights, no torch).

Parameter counts are exact (the tests compare them with the modules built on the meta device). Activation counts are
the elements a block keeps for backward per token when it is not checkpointed, counted from the forward in
`layers.py` (inputs of every matmul, normalisation and gating that autograd saves; attention via SDPA keeps q, k, v,
its output and the log-sum-exp, which is per head and ignored here); multiply by the bytes of the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxlora.families.flux2.params import Flux2Params


def double_block_params(p: Flux2Params) -> int:
    """One double block: per stream qkv (3D²), proj (D²), SwiGLU in (2·D·M) and out (M·D), two QK-norm scales."""
    d, m = p.hidden_size, p.mlp_hidden_dim
    return 2 * (4 * d * d + 3 * d * m + 2 * p.head_dim)


def single_block_params(p: Flux2Params) -> int:
    """One single block: linear1 D·(3D + 2M), linear2 (D + M)·D, two QK-norm scales."""
    d, m = p.hidden_size, p.mlp_hidden_dim
    return d * (3 * d + 2 * m) + (d + m) * d + 2 * p.head_dim


def shared_params(p: Flux2Params) -> int:
    """Everything outside the blocks: img_in, txt_in, time (and guidance) embedders, the three shared modulations
    (6D² + 6D² + 3D²), the final layer."""
    d = p.hidden_size
    embedders = (2 if p.guidance_embed else 1) * (p.time_dim * d + d * d)
    return p.in_channels * d + p.context_in_dim * d + embedders + 15 * d * d + 2 * d * d + d * p.in_channels


def transformer_params(p: Flux2Params) -> int:
    return shared_params(p) + p.depth * double_block_params(p) + p.depth_single_blocks * single_block_params(p)


def double_block_activations_per_token(p: Flux2Params) -> int:
    """Elements kept per token of one stream: LN input and modulated input (2D), qkv out (3D), normed/rotated q, k
    (2D), attention out (D), proj out before gating (D), LN2 input and modulated (2D), SwiGLU in (2M) and out (M),
    MLP out before gating (D)."""
    d, m = p.hidden_size, p.mlp_hidden_dim
    return 12 * d + 3 * m


def single_block_activations_per_token(p: Flux2Params) -> int:
    """Elements kept per token: LN input and modulated (2D), linear1 out (3D + 2M), normed/rotated q, k (2D),
    attention out (D), SwiGLU out (M), linear2 in (D + M), out before gating (D)."""
    d, m = p.hidden_size, p.mlp_hidden_dim
    return 10 * d + 4 * m


@dataclass(frozen=True)
class EncoderShape:
    """What a decoder-only text encoder costs: width, layers built, MLP width, heads and vocabulary."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool

    @property
    def params(self) -> int:
        """Embedding + layers (attention, SwiGLU MLP, two RMSNorms, Qwen3's per-head q/k norms); no LM head or final
        norm (`text_encoders.load_text_encoder` builds neither)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        if self.qk_norm:
            layer += 2 * self.head_dim
        return self.vocab * h + self.layers * layer


# The encoders as FLUX.2 builds them: only up to the deepest stacked layer (30 of Mistral's 40, 27 of Qwen3's 36).
MISTRAL_SMALL_3 = EncoderShape(5120, 30, 32768, 32, 8, 128, 131072, qk_norm=False)
QWEN3_4B = EncoderShape(2560, 27, 9728, 32, 8, 128, 151936, qk_norm=True)
QWEN3_8B = EncoderShape(4096, 27, 12288, 32, 8, 128, 151936, qk_norm=True)
TEXT_ENCODER_SHAPES = {"dev": MISTRAL_SMALL_3, "klein-4b": QWEN3_4B, "klein-9b": QWEN3_8B}


def prompt_embedding_bytes(p: Flux2Params, *, tokens: int = 512, bytes_per_element: int = 2) -> int:
    """One cached prompt embedding [tokens, context_in_dim]: what the text-encoder cache stores per caption."""
    return tokens * p.context_in_dim * bytes_per_element
