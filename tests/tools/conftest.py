"""Small BFL-keyed FLUX / CLIP-L / T5 files and LoRA builders for the merge / extract / convert tool tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fluxlora.models.flux import Flux, FluxParams, axes_dim_for

HIDDEN = 16
PREFIX = "model.diffusion_model."


def tiny_flux_sd(*, depth: int = 19, single: int = 2, dev: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with exactly the keys and shapes of a (narrow) BFL FLUX; all 19 double blocks by default."""
    params = FluxParams(in_channels=8, vec_in_dim=8, context_in_dim=8, hidden_size=HIDDEN, num_heads=2, depth=depth,
                        depth_single_blocks=single, axes_dim=axes_dim_for(HIDDEN // 2), guidance_embed=dev)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) / 4 for k, s in sorted(shapes.items())}


def clip_sd(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"text_model.embeddings.token_embedding.weight": torch.randn(10, 8, generator=g)}
    for i in range(2):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q", "k", "v", "out"):
            sd[f"{p}.self_attn.{proj}_proj.weight"] = torch.randn(8, 8, generator=g)
            sd[f"{p}.self_attn.{proj}_proj.bias"] = torch.randn(8, generator=g)
        sd[f"{p}.mlp.fc1.weight"] = torch.randn(12, 8, generator=g)
        sd[f"{p}.mlp.fc2.weight"] = torch.randn(8, 12, generator=g)
        sd[f"{p}.layer_norm1.weight"] = torch.ones(8)
    return sd


def t5_sd(seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"shared.weight": torch.randn(10, 8, generator=g)}
    for i in range(2):
        p = f"encoder.block.{i}.layer"
        for proj in ("q", "k", "v", "o"):
            sd[f"{p}.0.SelfAttention.{proj}.weight"] = torch.randn(8, 8, generator=g)
        sd[f"{p}.1.DenseReluDense.wi_0.weight"] = torch.randn(12, 8, generator=g)
        sd[f"{p}.1.DenseReluDense.wi_1.weight"] = torch.randn(12, 8, generator=g)
        sd[f"{p}.1.DenseReluDense.wo.weight"] = torch.randn(8, 12, generator=g)
        sd[f"{p}.0.layer_norm.weight"] = torch.ones(8)
    return sd


def make_lora(model_sd: dict[str, torch.Tensor], keys: list[str], prefix: str, *, rank: int = 2,
              alpha: float | None = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA on the given model keys (`.weight` of 2-D tensors); up is non-zero so the delta is visible."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key in keys:
        out_f, in_f = model_sd[key].shape
        name = f"{prefix}_{key[:-len('.weight')].replace('.', '_')}"
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / 2
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) / 2
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """write(name, tensors, metadata=None) -> path of a safetensors file in tmp_path."""

    def _write(name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    return _write


@pytest.fixture
def h():
    """The builders above, as a fixture (test modules cannot import a conftest reliably)."""
    from types import SimpleNamespace

    return SimpleNamespace(tiny_flux_sd=tiny_flux_sd, clip_sd=clip_sd, t5_sd=t5_sd, make_lora=make_lora,
                           PREFIX=PREFIX, HIDDEN=HIDDEN)
