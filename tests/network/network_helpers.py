"""Helpers for the LoRA network tests: small FLUX / CLIP-L / T5 models with seeded weights, built fresh per test
(attaching a network replaces Linear forwards, so tests never share a model)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fluxlora.models.flux import Flux, FluxParams

# Width 32 = 2 heads of 16 with RoPE axes (4, 6, 6): the shape diffusers' tiny FluxTransformer2DModel accepts.
SMALL = FluxParams(in_channels=16, vec_in_dim=32, context_in_dim=24, hidden_size=32, num_heads=2, depth=2,
                   depth_single_blocks=2, axes_dim=(4, 6, 6))


@torch.no_grad()
def seeded_(module: nn.Module, seed: int) -> nn.Module:
    """Matrices N(0, 1/fan_in), vectors N(0, 0.05²) (+1 for norm scales): O(1) activations, deterministic."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        else:
            p.normal_(1.0 if ("norm" in name or name.endswith("scale")) and not name.endswith("bias") else 0.0, 0.05,
                      generator=g)
    return module


def small_flux(variant: str = "dev", seed: int = 0, params: FluxParams = SMALL) -> Flux:
    return seeded_(Flux(params.with_variant(variant)), seed).eval()


def flux_inputs(params: FluxParams = SMALL, *, batch: int = 2, seed: int = 1, tokens: int = 6, txt_len: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, tokens, 3)
    ids[:, :, 1] = torch.arange(tokens) // 3
    ids[:, :, 2] = torch.arange(tokens) % 3
    return {
        "img": torch.randn(batch, tokens, params.in_channels, generator=g),
        "img_ids": ids,
        "txt": torch.randn(batch, txt_len, params.context_in_dim, generator=g),
        "txt_ids": torch.zeros(batch, txt_len, 3),
        "timesteps": torch.rand(batch, generator=g),
        "y": torch.randn(batch, params.vec_in_dim, generator=g),
        "guidance": torch.full((batch,), 3.5),
    }


def tiny_clip(seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=49406, eos_token_id=49407, hidden_act="quick_gelu")
    return seeded_(CLIPTextModel(config), seed).eval()


def tiny_t5(seed: int = 3):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=128, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, dropout_rate=0.0)
    return seeded_(T5EncoderModel(config), seed).eval()


@torch.no_grad()
def randomize_lora_(network: nn.Module, seed: int = 5, std: float = 0.2) -> None:
    """Give every LoRA up/down weight non-zero values (lora_up starts at zero, which would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(network.named_parameters(), key=lambda kv: kv[0]):
        p.copy_(torch.randn(p.shape, generator=g) * std)


