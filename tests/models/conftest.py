"""Fixtures for the FLUX model tests: a small FLUX (independent of the text-encoder module) and its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxlora.files import save_safetensors
from fluxlora.models.flux import FluxParams
from fluxlora.models.tiny import random_flux

# Width 64, 2 heads of 32 (RoPE axes (4, 14, 14)), 2 + 2 blocks; CLIP/T5 widths 32/48 differ so that a
# swapped vec_in_dim/context_in_dim shows up as a shape error.
SMALL_FLUX = FluxParams(in_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64, num_heads=2, depth=2,
                        depth_single_blocks=2, axes_dim=(4, 14, 14))


@pytest.fixture(scope="session")
def small_flux_params() -> FluxParams:
    return SMALL_FLUX


@pytest.fixture(scope="session")
def flux_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small BFL-layout dev and schnell files (fp32, seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("flux_files")
    out = {}
    for seed, variant in enumerate(("dev", "schnell")):
        out[variant] = root / f"flux1-{variant}.safetensors"
        save_safetensors(out[variant], random_flux(SMALL_FLUX.with_variant(variant), seed).state_dict())
    return out
