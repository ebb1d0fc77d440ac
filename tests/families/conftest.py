"""Fixtures for the family tests: diffusers' FluxTransformer2DModel holding our FLUX weights (the oracle); the
dataset and command-line fixtures of tests/training (the family tests train through the same command line)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fluxlora.models.diffusers_keys import bfl_to_diffusers
from fluxlora.models.flux import Flux

_spec = importlib.util.spec_from_file_location("training_fixtures", Path(__file__).parents[1] / "training" / "conftest.py")
_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_training)

tiny_dataset = _training.tiny_dataset
train_argv = _training.train_argv

def diffusers_flux_from(flux: Flux):
    """A diffusers FluxTransformer2DModel with `flux`'s weights (shared storage where the key map slices)."""
    from diffusers import FluxTransformer2DModel

    p = flux.params
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
            num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
            joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim)
    model.load_state_dict(bfl_to_diffusers(flux.state_dict()), strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="session")
def diffusers_flux() -> Callable[[Flux], object]:
    return diffusers_flux_from
