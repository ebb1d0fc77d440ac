"""Kontext input: our FLUX.1-dev fed reference tokens equals FluxTransformer2DModel fed as FluxKontextPipeline does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxKontextPipeline

from fluxlora.families.kontext.tokens import REFERENCE_INDEX, grid_ids, noisy_part, pack, with_reference
from fluxlora.families.tiny import random_model
from fluxlora.models.flux import Flux, FluxParams
from fluxlora.models.tiny import tiny_flux_params


def pipeline_inputs(noisy: torch.Tensor, reference: torch.Tensor):
    """FluxKontextPipeline.prepare_latents itself (the reference given as latents, so no AE is needed)."""
    batch, channels, h, w = noisy.shape
    fake = SimpleNamespace(vae_scale_factor=8, latent_channels=channels, _pack_latents=FluxKontextPipeline._pack_latents,
                           _prepare_latent_image_ids=FluxKontextPipeline._prepare_latent_image_ids)
    latents, image_latents, latent_ids, image_ids = FluxKontextPipeline.prepare_latents(
        fake, reference, batch, channels, 8 * h, 8 * w, torch.float32, torch.device("cpu"),
        latents=FluxKontextPipeline._pack_latents(noisy, batch, channels, h, w))
    return torch.cat([latents, image_latents], dim=1), torch.cat([latent_ids, image_ids], dim=0), latents.shape[1]


def compare(flux: Flux, theirs, *, grid=(6, 8), ref_grid=(4, 10), batch=2, txt_len=5, seed=0) -> float:
    p = flux.params
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, 16, *grid, generator=g)
    reference = torch.randn(batch, 16, *ref_grid, generator=g)
    txt, y = torch.randn(batch, txt_len, p.context_in_dim, generator=g), torch.randn(batch, p.vec_in_dim, generator=g)
    t, guidance = torch.tensor([0.8, 0.3])[:batch], torch.full((batch,), 2.5)
    hidden, ids, n = pipeline_inputs(noisy, reference)
    with torch.no_grad():
        expected = theirs(hidden_states=hidden, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                          img_ids=ids, txt_ids=torch.zeros(txt_len, 3), guidance=guidance, return_dict=False)[0][:, :n]
        img, img_ids = with_reference(pack(noisy), grid_ids(batch, grid[0] // 2, grid[1] // 2), reference)
        got = noisy_part(flux(img, img_ids, txt, torch.zeros(batch, txt_len, 3), t, y, guidance), pack(noisy).shape[1])
        without = flux(pack(noisy), grid_ids(batch, grid[0] // 2, grid[1] // 2), txt, torch.zeros(batch, txt_len, 3), t,
                       y, guidance)
    assert got.shape == (batch, n, 64) and expected.abs().max() > 0.1
    assert (got - without).abs().max() > 1e-2  # the reference tokens really take part
    return float((got - expected).abs().max())


def test_reference_ids_and_packing() -> None:
    ids = grid_ids(2, 2, 3, index=REFERENCE_INDEX)
    assert ids.shape == (2, 6, 3) and (ids[..., 0] == 1).all()
    assert ids[0, 4].tolist() == [1.0, 1.0, 1.0] and ids[0, 2].tolist() == [1.0, 0.0, 2.0]
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    assert torch.equal(pack(x), FluxKontextPipeline._pack_latents(x, 2, 16, 4, 6))


def test_matches_diffusers_kontext_feed_tiny(diffusers_flux) -> None:
    flux = random_model(Flux, tiny_flux_params("dev"), torch.Generator().manual_seed(3))
    assert compare(flux, diffusers_flux(flux)) <= 1e-5


@pytest.mark.slow
def test_matches_diffusers_kontext_feed_full_width(diffusers_flux) -> None:
    flux = random_model(Flux, FluxParams(depth=1, depth_single_blocks=1), torch.Generator().manual_seed(0))
    assert compare(flux, diffusers_flux(flux), grid=(4, 4), ref_grid=(4, 6), batch=1, txt_len=4) <= 1e-5
