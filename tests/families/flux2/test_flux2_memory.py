"""The planner's FLUX.2 sizes equal the modules built on the meta device, for the real architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluxlora.families.flux2 import memory
from fluxlora.families.flux2.model import Flux2
from fluxlora.families.flux2.params import ARCHITECTURES
from fluxlora.families.flux2.text_encoders import build_encoder, mistral_config, qwen3_config


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("name", "billions"), [("dev", 32.2), ("klein-4b", 3.88), ("klein-9b", 9.08)])
def test_transformer_counts_are_exact(name, billions):
    params = ARCHITECTURES[name]
    with torch.device("meta"):
        model = Flux2(params)
    assert memory.transformer_params(params) == _count(model)
    assert memory.double_block_params(params) == _count(model.double_blocks[0])
    assert memory.single_block_params(params) == _count(model.single_blocks[0])
    assert round(memory.transformer_params(params) / 1e9, 2 if billions < 10 else 1) == billions


@pytest.mark.parametrize(("shape", "kind", "config"), [
    (memory.MISTRAL_SMALL_3, "mistral3", lambda: mistral_config(num_hidden_layers=30)),
    (memory.QWEN3_4B, "qwen3", lambda: qwen3_config("4b", num_hidden_layers=27)),
    (memory.QWEN3_8B, "qwen3", lambda: qwen3_config("8b", num_hidden_layers=27)),
])
def test_truncated_text_encoder_counts_are_exact(shape, kind, config):
    with torch.device("meta"):
        model = build_encoder(kind, config())
    model.norm = nn.Identity()  # as load_text_encoder builds it
    assert shape.params == _count(model)


def test_activation_and_cache_sizes():
    dev = ARCHITECTURES["dev"]
    assert memory.double_block_activations_per_token(dev) == 12 * 6144 + 3 * 18432
    assert memory.prompt_embedding_bytes(dev) == 512 * 15360 * 2  # 15.7 MB per cached caption
